"""Run a `runtime_mlx.kernels.Launch` (the exact arguments our code passes to ``mx.fast.metal_kernel``) on the CPU.

`emulate(launch, seed)` does what MLX does with a launch, with g++ and `shim.h` in place of the Metal compiler
and GPU:

1. it generates the kernel's signature as MLX does (the template arguments ``T``, ``N``, ... in scope, one
   parameter per input in ``input_names`` order with ``<name>_shape``/``_strides``/``_ndim`` when the source
   uses them, a ``const T&`` scalar for a 0-d input, one per output, then each thread attribute the source
   names), with buffers as bounds-checked views (``emu::Buf``) instead of ``device`` pointers;
2. it compiles that file with g++ into a shared object, cached by the hash of the generated source in
   ``$TMPDIR/dsfs-metal-emu`` (so a test session compiles each kernel configuration once);
3. it runs the grid (see `shim.h`): threadgroups one after another, the threads of a group as fibers in a
   seeded random order, real barriers and 32-lane simd functions, threadgroup memory poisoned per group;
4. it returns the outputs as mx arrays (poisoned before the run: NaN bytes for floats, 0x7F bytes otherwise).

Raises `MetalEmulationError` on a compile error (with g++'s message), an out-of-bounds access, a barrier not
reached by every thread, divergent simd functions, or a threadgroup over 1024 threads.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np

HERE = Path(__file__).resolve().parent
SHIM = HERE / "shim.h"
CXX = os.environ.get("CXX", "/usr/bin/g++" if Path("/usr/bin/g++").exists() else "g++")
CXXFLAGS = ["-std=c++17", "-O1", "-fPIC", "-shared", "-fno-strict-aliasing", "-w"]
CACHE = Path(tempfile.gettempdir()) / "dsfs-metal-emu"

# MLX's type names in generated signatures (mlx get_type_string).
TYPE_NAMES = {
    mx.float32: "float", mx.float16: "float16_t", mx.bfloat16: "bfloat16_t", mx.bool_: "bool",
    mx.int8: "int8_t", mx.int16: "int16_t", mx.int32: "int32_t", mx.int64: "int64_t",
    mx.uint8: "uint8_t", mx.uint16: "uint16_t", mx.uint32: "uint32_t", mx.uint64: "uint64_t",
}
NP_DTYPES = {
    mx.float32: np.float32, mx.float16: np.float16, mx.bfloat16: np.uint16, mx.bool_: np.bool_,
    mx.int8: np.int8, mx.int16: np.int16, mx.int32: np.int32, mx.int64: np.int64,
    mx.uint8: np.uint8, mx.uint16: np.uint16, mx.uint32: np.uint32, mx.uint64: np.uint64,
}
# The thread attributes MLX adds to the signature when the source names them, and their types.
ATTRIBUTES = {
    "dispatch_threads_per_threadgroup": "uint3",
    "thread_index_in_simdgroup": "uint",
    "thread_index_in_threadgroup": "uint",
    "thread_position_in_grid": "uint3",
    "thread_position_in_threadgroup": "uint3",
    "threadgroup_position_in_grid": "uint3",
    "threadgroups_per_grid": "uint3",
    "threads_per_grid": "uint3",
    "threads_per_simdgroup": "uint",
    "threads_per_threadgroup": "uint3",
    "simdgroup_index_in_threadgroup": "uint",
    "simdgroups_per_threadgroup": "uint",
    "grid_size": "uint3",
}
ATTR_EXPR = {"grid_size": "a.threads_per_grid"}


def find_cxx() -> str | None:
    """The C++ compiler the emulation uses (``$CXX``, else /usr/bin/g++), or None when there is none."""
    return shutil.which(CXX)


class MetalEmulationError(RuntimeError):
    """A kernel that fails to compile or faults under the emulation."""


def _template_consts(template) -> str:
    """MLX template arguments ``[(name, dtype | int | bool)]`` as namespace-scope constants (``using T = float;``,
    ``constexpr int N = 5;``). MLX makes the body a template; here it is a plain function with these constants in
    scope, because g++ drops the section attribute (the poisoned threadgroup memory) of statics in templates."""
    lines = []
    for name, value in template:
        if isinstance(value, mx.Dtype):
            lines.append(f"using {name} = {TYPE_NAMES[value]};")
        elif isinstance(value, bool):
            lines.append(f"constexpr bool {name} = {'true' if value else 'false'};")
        elif isinstance(value, int):
            lines.append(f"constexpr int {name} = {value};")
        else:
            raise MetalEmulationError(f"template argument {name}={value!r}: MLX takes a dtype, an int or a bool")
    return "\n".join(lines)


def generate(launch, source: str | None = None, header: str | None = None) -> str:
    """The C++ translation unit for ``launch`` (``source``/``header`` override the spec's, for planted faults)."""
    spec = launch.spec
    source = spec.source if source is None else source
    header = spec.header if header is None else header
    params, args = [], []
    slot = 0

    def buf(ctype: str, name: str) -> None:
        nonlocal slot
        params.append(f"emu::Buf<{ctype}> {name}")
        args.append(f"emu::Buf<{ctype}>{{({ctype}*)emu_bufs[{slot}], emu_sizes[{slot}], 0, \"{name}\"}}")
        slot += 1

    for name, a in zip(spec.input_names, launch.inputs, strict=True):
        t = TYPE_NAMES[a.dtype]
        if a.ndim == 0:
            params.append(f"const {t}& {name}")
            args.append(f"*(const {t}*)emu_bufs[{slot}]")
            slot += 1
            continue
        buf(f"const {t}", name)
        if f"{name}_shape" in source:
            buf("const int", f"{name}_shape")
        if f"{name}_strides" in source:
            buf("const int64_t", f"{name}_strides")
        if f"{name}_ndim" in source:
            params.append(f"const int& {name}_ndim")
            args.append(f"*(const int*)emu_bufs[{slot}]")
            slot += 1
    for name, dtype in zip(spec.output_names, launch.output_dtypes, strict=True):
        t = TYPE_NAMES[dtype]
        buf(f"metal::atomic<{t}>" if spec.atomic_outputs else t, name)
    for attr, ctype in ATTRIBUTES.items():
        if attr in source:
            params.append(f"{ctype} {attr}")
            args.append(ATTR_EXPR.get(attr, f"a.{attr}"))
    kname = f"custom_kernel_{spec.name}"
    sep = ",\n    "
    return f"""#include "shim.h"
{header}
namespace emu_kernel {{
{_template_consts(launch.template)}

void {kname}(
    {sep.join(params)}) {{
{source}
}}
}}  // namespace emu_kernel

static void* emu_bufs[{max(slot, 1)}];
static long long emu_sizes[{max(slot, 1)}];

static void emu_thread(const emu::Attrs& a) {{
  emu_kernel::{kname}(
      {sep.join(args)});
}}

extern "C" char __start_emu_tg[] __attribute__((weak));
extern "C" char __stop_emu_tg[] __attribute__((weak));

extern "C" int emu_launch(void** bufs, const long long* sizes, const long* grid, const long* tg,
                          unsigned long long seed, char* err, int errlen) {{
  for (int i = 0; i < {slot}; i++) {{
    emu_bufs[i] = bufs[i];
    emu_sizes[i] = sizes[i];
  }}
  return emu::run(grid, tg, seed, &emu_thread, __start_emu_tg, __stop_emu_tg, err, errlen);
}}
"""


def compile_source(code: str) -> Path:
    """Compile (or reuse) the shared object for ``code``; raises `MetalEmulationError` with g++'s output."""
    key = hashlib.sha256((code + SHIM.read_text() + " ".join([CXX, *CXXFLAGS])).encode()).hexdigest()[:24]
    CACHE.mkdir(parents=True, exist_ok=True)
    so = CACHE / f"{key}.so"
    if so.exists():
        return so
    src = CACHE / f"{key}.{os.getpid()}.cpp"
    src.write_text(code)
    tmp = CACHE / f"{key}.{os.getpid()}.so"
    proc = subprocess.run([CXX, *CXXFLAGS, f"-I{_pch_dir()}", "-o", str(tmp), str(src)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise MetalEmulationError(f"g++ failed on the generated kernel {src}:\n{proc.stderr[-4000:]}")
    os.replace(tmp, so)
    src.unlink(missing_ok=True)
    return so


def _pch_dir() -> Path:
    """A folder with shim.h and its precompiled header (built once per shim version; g++ uses the .gch when the
    flags match, and falls back to parsing shim.h otherwise). Saves about a third of each compile."""
    text = SHIM.read_text()
    d = CACHE / ("pch-" + hashlib.sha256((text + " ".join([CXX, *CXXFLAGS])).encode()).hexdigest()[:16])
    if not (d / "shim.h.gch").exists():
        d.mkdir(parents=True, exist_ok=True)
        (d / "shim.h").write_text(text)
        tmp = d / f"shim.{os.getpid()}.gch"
        flags = [f for f in CXXFLAGS if f != "-shared"]
        proc = subprocess.run([CXX, *flags, "-x", "c++-header", str(d / "shim.h"), "-o", str(tmp)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise MetalEmulationError(f"g++ failed on shim.h:\n{proc.stderr[-4000:]}")
        os.replace(tmp, d / "shim.h.gch")
    return d


_LIBS: dict[Path, ctypes.CDLL] = {}


def _to_numpy(a: mx.array) -> np.ndarray:
    if a.dtype == mx.bfloat16:
        a = a.view(mx.uint16)
    return np.ascontiguousarray(np.array(a))


def _poisoned(shape, dtype, init_value) -> np.ndarray:
    npdt = NP_DTYPES[dtype]
    n = int(np.prod(shape, dtype=np.int64))
    if init_value is not None:
        full = mx.full((n,), init_value, dtype=dtype)
        return _to_numpy(full).reshape(shape).copy()
    fill = 0xFF if dtype in (mx.float32, mx.float16, mx.bfloat16) else 0x7F
    return np.full(n * np.dtype(npdt).itemsize, fill, dtype=np.uint8).view(npdt).reshape(shape)


def _from_numpy(a: np.ndarray, dtype) -> mx.array:
    out = mx.array(a)
    return out.view(mx.bfloat16) if dtype == mx.bfloat16 else out


def emulate(launch, seed: int = 0, source: str | None = None, header: str | None = None,
            numpy: bool = False) -> list:
    """Run ``launch`` under the emulation with thread order ``seed``; returns the outputs (mx arrays, or NumPy
    arrays with ``numpy=True``; bfloat16 comes back as uint16 bits there)."""
    code = generate(launch, source, header)
    so = compile_source(code)
    lib = _LIBS.get(so)
    if lib is None:
        lib = _LIBS[so] = ctypes.CDLL(str(so))
        lib.emu_launch.restype = ctypes.c_int
    keep = []
    for name, a in zip(launch.spec.input_names, launch.inputs, strict=True):
        arr = _to_numpy(a)
        keep.append(arr)
        if a.ndim:
            src = launch.spec.source if source is None else source
            if f"{name}_shape" in src:
                keep.append(np.array(a.shape, dtype=np.int32))
            if f"{name}_strides" in src:
                keep.append(np.array(np.array(arr.strides) // max(arr.itemsize, 1), dtype=np.int64))
            if f"{name}_ndim" in src:
                keep.append(np.array([a.ndim], dtype=np.int32))
    outs = [_poisoned(tuple(s), d, launch.init_value) for s, d in
            zip(launch.output_shapes, launch.output_dtypes, strict=True)]
    bufs = keep + outs
    ptrs = (ctypes.c_void_p * len(bufs))(*[b.ctypes.data for b in bufs])
    sizes = (ctypes.c_longlong * len(bufs))(*[b.size for b in bufs])
    grid = (ctypes.c_long * 3)(*launch.grid)
    # as MLX's CustomKernel::eval_gpu: the group is clipped to the grid in each dimension
    tg = (ctypes.c_long * 3)(*(min(t, g) for t, g in zip(launch.threadgroup, launch.grid, strict=True)))
    err = ctypes.create_string_buffer(2048)
    rc = lib.emu_launch(ptrs, sizes, grid, tg, ctypes.c_ulonglong(seed), err, len(err))
    if rc:
        raise MetalEmulationError(f"{launch.spec.name}: {err.value.decode()}")
    if numpy:
        return outs
    return [_from_numpy(o, d) for o, d in zip(outs, launch.output_dtypes, strict=True)]


def runner(seed: int = 0, **overrides):
    """A ``runner`` for the ``runner=`` argument of `runtime_mlx.kernels`' Metal paths: runs each launch here."""
    return lambda launch: emulate(launch, seed, **overrides)
