"""The launch machinery of `runtime_mlx.kernels`: which path an op takes, kernel specs and launches, the Metal
runner, the one-time self-check with its fallback, and the argument checks every op shares.

Paths. On a Metal device (Apple Silicon) an op launches the kernel bodies of ``kernels/metal/<family>.metal``;
elsewhere (MLX's Linux CPU back end, its CUDA back end, or ``DSFS_MLX_KERNELS=mlx``) it runs its pure-MLX
implementation. No Metal kernel has been proven on every Mac, so the first call of an op (per static
configuration: dtypes, row length, routing sizes, ...) on the Metal path runs a self-check: the op's Metal
kernels (forward and backward) against its pure-MLX path on a small fixed input (its own PRNG key, so the
global random state is untouched). A kernel that fails to compile or to run, or whose result misses the
pure-MLX one by more than the dtype's bound (DESIGN.md "Tolerance"; exactly, for indices and e4m3 bits),
sends that op to the pure-MLX path for the rest of the process, with one `MetalFallbackWarning` naming the op
and the error. With ``DSFS_REQUIRE_METAL=1`` (the macOS CI job) the failure raises `MetalKernelError` instead.

Specs and launches. Each kernel is a `KernelSpec` (static: names and source) and each call builds a `Launch`
(per call: inputs, template, grid, threadgroup, outputs). The real launch (`run_metal`) and the CPU emulation in
``tests/metal_emulation`` take the same `Launch`, so they cannot drift apart: every ``_<op>_metal`` function
takes ``runner=`` (None: `run_metal`, looked up here at call time, which the emulation tests replace).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import mlx.core as mx

METAL_DIR = Path(__file__).resolve().parents[2] / "kernels" / "metal"
FLOATS = (mx.float32, mx.float16, mx.bfloat16)
BOUNDS = {mx.float32: 1e-5, mx.float16: 1.6e-2, mx.bfloat16: 1.6e-2}
"""Relative-error bounds of the self-check per dtype (DESIGN.md "Tolerance")."""

POISON = False
"""When true (the test session sets it), outputs without an ``init_value`` are filled before the kernel runs:
NaN when every output is floating, else 127 (an e4m3 NaN in uint8, an out-of-range index in int32), so an
element no thread writes fails the comparison (DESIGN.md, "Tolerance")."""


class MetalKernelError(RuntimeError):
    """A Metal kernel failed to compile, to run, or its self-check, while ``DSFS_REQUIRE_METAL=1``."""


class MetalFallbackWarning(RuntimeWarning):
    """An op's Metal kernel failed (compile, run or self-check); the op runs its pure-MLX path from now on."""


# ---------------------------------------------------------------------------------------------------------------
# Which path runs
# ---------------------------------------------------------------------------------------------------------------

_LAST_PATH: dict[str, str] = {}
_FALLBACK: dict[str, str] = {}  # op -> the error that sent it to the pure-MLX path
_CHECKED: set[tuple] = set()  # (op, static configuration) whose self-check passed


def metal_available() -> bool:
    """True when the Metal kernels can run: MLX has a Metal device and ``DSFS_MLX_KERNELS`` is not ``mlx``."""
    if os.environ.get("DSFS_MLX_KERNELS", "").lower() == "mlx":
        return False
    try:
        return bool(mx.metal.is_available())
    except Exception:  # an MLX build without the metal module
        return False


def backend() -> str:
    """The path the next op call takes on this machine: ``"metal"`` or ``"mlx"`` (before any fallback)."""
    return "metal" if metal_available() else "mlx"


def kernel_path(op: str | None = None):
    """Which path an op took on its last call (None if never called). With no ``op``, a dict of every op called
    so far -> its path. Values:

    - ``"metal"``: its Metal kernels ran;
    - ``"mlx"``: its pure-MLX path ran because there is no Metal device (or ``DSFS_MLX_KERNELS=mlx``);
    - ``"fallback"``: a Metal device is there, but the op's kernel failed to compile, to run or its self-check
      earlier in this process, so its pure-MLX path ran (`fallbacks` gives the error).
    """
    return dict(_LAST_PATH) if op is None else _LAST_PATH.get(op)


def fallbacks() -> dict[str, str]:
    """Ops sent to the pure-MLX path in this process -> the error that sent them."""
    return dict(_FALLBACK)


def reset_checks() -> None:
    """Forget every self-check, fallback and recorded path (the next Metal call of each op checks again). For
    tests."""
    _FALLBACK.clear()
    _CHECKED.clear()
    _LAST_PATH.clear()


def use_metal(op: str, key: tuple = (), check: Callable[[], None] | None = None) -> bool:
    """Whether ``op`` runs its Metal kernels now; records the answer for `kernel_path`.

    On the Metal path, the first call per ``(op, key)`` (``key``: the static configuration the kernels are
    specialized on) runs ``check()``, which raises on a compile or run error or a mismatch. A failure marks
    ``op`` as fallen back (one `MetalFallbackWarning`) and returns False, or raises `MetalKernelError` when the
    environment sets ``DSFS_REQUIRE_METAL=1``.
    """
    if not metal_available():
        _LAST_PATH[op] = "mlx"
        return False
    if op not in _FALLBACK and check is not None and (op, key) not in _CHECKED:
        try:
            check()
        except Exception as e:  # a compile error surfaces as RuntimeError at evaluation; a mismatch as SelfCheckError
            msg = f"{type(e).__name__}: {e}"
            if os.environ.get("DSFS_REQUIRE_METAL") == "1":
                raise MetalKernelError(f"{op}: the Metal kernel failed ({msg}) and DSFS_REQUIRE_METAL=1 forbids "
                                       "the pure-MLX fallback") from e
            _FALLBACK[op] = msg
            warnings.warn(f"{op}: the Metal kernel failed ({msg}); using the pure-MLX path for {op}",
                          MetalFallbackWarning, stacklevel=3)
        else:
            _CHECKED.add((op, key))
    path = "fallback" if op in _FALLBACK else "metal"
    _LAST_PATH[op] = path
    return path == "metal"


class SelfCheckError(AssertionError):
    """A Metal kernel's result differs from the pure-MLX path's in a self-check."""


def check_close(what: str, got: mx.array, want: mx.array, dtype) -> None:
    """Raise `SelfCheckError` unless ``||got - want|| / ||want|| <= BOUNDS[dtype]`` (float32 norms; a NaN in
    ``got`` never passes). ``dtype``: the mx float dtype whose bound applies."""
    g, w = got.astype(mx.float32), want.astype(mx.float32)
    if g.shape != w.shape:
        raise SelfCheckError(f"{what}: shape {tuple(g.shape)}, expected {tuple(w.shape)}")
    err = (mx.linalg.norm((g - w).reshape(-1)) / mx.maximum(mx.linalg.norm(w.reshape(-1)), 1e-30)).item()
    if not err <= BOUNDS[dtype]:  # NaN fails
        raise SelfCheckError(f"{what}: relative error {err:.2e} against the pure-MLX path exceeds {BOUNDS[dtype]:.0e}")


def check_equal(what: str, got: mx.array, want: mx.array) -> None:
    """Raise `SelfCheckError` unless ``got`` and ``want`` have the same shape and the same bits (integers)."""
    if got.shape != want.shape or not mx.array_equal(got, want).item():
        raise SelfCheckError(f"{what}: differs from the pure-MLX path")


def sample(shape: tuple, seed: int, dtype=mx.float32) -> mx.array:
    """A fixed normal draw for a self-check, from its own key (the global PRNG state is untouched)."""
    return mx.random.normal(shape, key=mx.random.key(seed)).astype(dtype)


# ---------------------------------------------------------------------------------------------------------------
# Kernel specs and launches (the data both the real launch and the emulation consume)
# ---------------------------------------------------------------------------------------------------------------


@cache
def metal_file(family: str) -> dict[str, str]:
    """Sections of ``kernels/metal/<family>.metal``: ``{"header": text, "<kernel>": body, ...}``.

    A file holds a header (helper functions, before the first marker) and kernel bodies, each introduced by a
    line ``// @kernel <name>``. Raises FileNotFoundError if the file is missing.
    """
    text = (METAL_DIR / f"{family}.metal").read_text()
    sections, name, lines = {}, "header", []
    for line in text.splitlines(keepends=True):
        if line.startswith("// @kernel "):
            sections[name] = "".join(lines)
            name, lines = line.split()[2], []
        else:
            lines.append(line)
    sections[name] = "".join(lines)
    return sections


@dataclass(frozen=True)
class KernelSpec:
    """One Metal kernel: its name, file (op family), input and output buffer names, and whether outputs are
    ``device atomic<T>*``. ``source``/``header`` are read from ``kernels/metal/<family>.metal``."""

    name: str
    family: str
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    atomic_outputs: bool = False

    @property
    def source(self) -> str:
        return metal_file(self.family)[self.name]

    @property
    def header(self) -> str:
        return metal_file(self.family)["header"]


@dataclass
class Launch:
    """One call of a kernel: the arguments of ``mx.fast.metal_kernel(...)(**)``.

    ``inputs``: mx arrays in ``spec.input_names`` order (0-d arrays become ``constant T&`` scalars);
    ``template``: ``[(name, mx.Dtype | int | bool)]``; ``grid``: total threads per dimension (MLX dispatches
    threads, not groups: the last group of a dimension may be partial); ``threadgroup``: threads per group;
    ``output_shapes``/``output_dtypes``: one per ``spec.output_names``; ``init_value``: fill for the outputs
    (None: left uninitialised, as on the GPU).
    """

    spec: KernelSpec
    inputs: list
    template: list
    grid: tuple[int, int, int]
    threadgroup: tuple[int, int, int]
    output_shapes: list
    output_dtypes: list
    init_value: float | None = None


SPECS: dict[str, KernelSpec] = {}
"""Every kernel of ``kernels/metal`` by name; each family module adds its own with `spec`."""


def spec(name: str, family: str, inputs: str, outputs: str, atomic: bool = False) -> KernelSpec:
    """Make and register the `KernelSpec` of kernel ``name`` in ``kernels/metal/<family>.metal``; ``inputs`` and
    ``outputs``: space-separated buffer names. Raises ValueError if ``name`` is already registered."""
    if name in SPECS:
        raise ValueError(f"kernel {name!r} is registered twice")
    SPECS[name] = KernelSpec(name, family, tuple(inputs.split()), tuple(outputs.split()), atomic)
    return SPECS[name]


@cache
def _metal_kernel(name: str):
    """The ``mx.fast.metal_kernel`` for ``SPECS[name]``, built once per process."""
    s = SPECS[name]
    return mx.fast.metal_kernel(name=s.name, input_names=list(s.input_names), output_names=list(s.output_names),
                                source=s.source, header=s.header, atomic_outputs=s.atomic_outputs)


def run_metal(launch: Launch) -> list:
    """Launch on the GPU through the cached ``mx.fast.metal_kernel``; returns the outputs (mx arrays)."""
    init = launch.init_value
    if init is None and (POISON or os.environ.get("DSFS_POISON_OUTPUTS") == "1"):
        floating = all(d in FLOATS for d in launch.output_dtypes)
        init = float("nan") if floating else 127.0
    return _metal_kernel(launch.spec.name)(
        inputs=launch.inputs, template=launch.template, grid=launch.grid, threadgroup=launch.threadgroup,
        output_shapes=launch.output_shapes, output_dtypes=launch.output_dtypes, init_value=init)


def run(runner, launch: Launch) -> list:
    """Run ``launch`` with ``runner`` (a callable taking a `Launch`, e.g. the CPU emulation in the tests), or
    with `run_metal` when None (looked up at call time)."""
    return (runner or run_metal)(launch)


# ---------------------------------------------------------------------------------------------------------------
# Shared helpers and argument checks
# ---------------------------------------------------------------------------------------------------------------


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def scalar(v: float) -> mx.array:
    """A 0-d float32 array (a ``constant float&`` kernel argument)."""
    return mx.array(v, dtype=mx.float32)


def f32(a: mx.array) -> mx.array:
    return a if a.dtype == mx.float32 else a.astype(mx.float32)


def tg_size(n: int, cap: int = 256) -> int:
    """Threads per group for a row of ``n`` elements: a multiple of 32, at least 32, at most ``cap``."""
    return max(32, min(cap, 32 * cdiv(n, 32)))


def check_float(name: str, a) -> None:
    """Raise TypeError unless ``a`` is an mx.array of float32, float16 or bfloat16."""
    if not isinstance(a, mx.array):
        raise TypeError(f"{name}: expected an mx.array, got {type(a).__name__}")
    if a.dtype not in FLOATS:
        raise TypeError(f"{name}: expected float32, float16 or bfloat16, got {a.dtype}")


def check_shape(name: str, a, shape: tuple) -> None:
    """Raise ValueError unless ``a.shape`` matches ``shape`` (None matches any size)."""
    if len(shape) != a.ndim or any(s is not None and s != d for s, d in zip(shape, a.shape, strict=True)):
        want = tuple("*" if s is None else s for s in shape)
        raise ValueError(f"{name}: expected shape {want}, got {tuple(a.shape)}")
