"""``dsfs bench OP [--impl module:function]``: time a candidate beside the reference, our kernel, ``torch.compile``
of the reference and the library's built-in, on the op's realistic shapes (its spec's ``bench_samples``).

Implementations, named so in the output:

- ``candidate``: the function given by ``--impl`` (optional), checked first for the op's signature and for the
  shape of its outputs on the first shape (a wrong candidate is not timed: ``dsfs check`` says what is wrong);
- ``reference``: ``spec.reference`` on the same inputs in the dtype under test (on ``--device mlx``: the same
  values as torch tensors on the CPU);
- ``compiled``: ``torch.compile`` of the reference (torch devices only; compilation happens before timing, and a
  failed compilation is reported in its row);
- ``ours``: our kernel, ``spec.ours["cuda"]`` (Triton) on ``cuda`` and ``spec.ours["mlx"]`` on ``mlx``; never under
  Triton's interpreter, so on ``cpu`` it is skipped with the reason;
- ``builtin``: ``spec.builtin["torch"]`` on torch devices, ``spec.builtin["mlx"]`` on ``mlx``, where one exists.

Timing: one process, every implementation on the same inputs. Each shape is timed in rounds; a round runs every
implementation once, the order rotated from round to round, so that drift (clocks, caches, a busy machine) falls on
all of them alike. ``--warmup`` untimed rounds first, then ``--repeat`` timed ones. A timed sample is ``n`` back-to-
back calls followed by a device synchronization (``torch.cuda.synchronize``, ``torch.mps.synchronize``, ``mx.eval``,
which MLX's laziness needs after every call), inside the timed region; ``n`` is sized in the warm-up so that a
sample lasts at least ``--min-time``. Reported per (shape, mode, implementation): the median and the minimum over
the rounds of the time per call (ms), the ratios of the median to the reference's and to the candidate's (below 1:
faster), GB/s and TFLOP/s from the spec's byte and FLOP counts (``spec.bytes``, ``spec.flops``: the minimum traffic
and work of one forward call), and the percentage of the device's peak (`dsfs.peaks.PEAKS`) where the device is
known. ``--mode backward`` times forward+backward: a fixed random cotangent on the outputs that carry gradients,
gradients of the op's ``grads`` inputs; its work is counted as 3x the forward's (an estimate: a backward does about
twice a forward's work). Caches are not flushed between calls: inputs that fit in a GPU's L2 cache read from it. On
a CPU shared with other work, ``--threads 1`` keeps torch's threads from waiting on each other (a 2-thread OpenMP
region can take 1000x longer while another process holds a core).

The same `build` makes the timed callables of the asv suite ``bench/ops.py``; `sync` and `forward_backward` are
the device synchronization and the forward+backward step of every asv suite (``bench/common.py`` imports them).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from dsfs.errors import KernelError
from dsfs.peaks import Peak, device_name, find_peak

IMPLS = ("candidate", "reference", "compiled", "ours", "builtin")
MODES = ("forward", "backward")
# The names of `reference.testing.DEVICES` and `reference.testing.FLOATS`, spelled here so that building the CLI's
# parser imports no torch (tests/test_bench.py checks they agree).
DEVICES = ("cpu", "cuda", "mps", "mlx")
DTYPES = ("float32", "bfloat16", "float16")
MLX_NAMES = ("mlx", "mlx_lm")  # where-names that mean MLX arrays: the device, and the asv backends
MAX_CALLS = 10_000  # at most this many back-to-back calls in one timed sample


# ----------------------------------------------------------------------------- synchronization and steps
# Shared with every asv suite (bench/common.py). ``where`` is a device of `DEVICES` or an asv backend name
# (reference, cuda, mlx, transformers, mlx_lm): the MLX names mean mx arrays, anything else torch tensors.


def is_mlx(where: str) -> bool:
    """Whether ``where`` names MLX arrays (``mlx`` or ``mlx_lm``) rather than torch tensors."""
    return where in MLX_NAMES


def as_tuple(out) -> tuple:
    """The outputs of a call as a tuple (a single array becomes a 1-tuple)."""
    return tuple(out) if isinstance(out, tuple | list) else (out,)


def sync(where: str, *outs) -> None:
    """Wait until ``outs`` are computed: ``mx.eval(*outs)`` for MLX (lazy: nothing runs before it); for torch,
    ``torch.mps.synchronize`` on ``mps``, nothing on ``cpu``, else (``cuda`` and the asv backends) a CUDA
    synchronize when a GPU is present."""
    if is_mlx(where):
        import mlx.core as mx

        mx.eval(*outs)
        return
    if where == "cpu":
        return
    import torch

    if where == "mps":
        torch.mps.synchronize()
    elif torch.cuda.is_available():
        torch.cuda.synchronize()


def total(out):
    """The sum of every element of ``out`` (an array/tensor or a tuple of them): the loss of a backward pass."""
    outs = as_tuple(out)
    loss = outs[0].sum()
    for o in outs[1:]:
        loss = loss + o.sum()
    return loss


def no_grad(where: str):
    """A context manager that disables autograd for torch (nothing for MLX)."""
    if is_mlx(where):
        return contextlib.nullcontext()
    import torch

    return torch.no_grad()


def forward_backward(where: str, fn: Callable, module=None, argnums: Sequence[int] | None = None,
                     cotangents: Sequence | None = None, synchronize: bool = True) -> Callable:
    """A function ``step(*inputs)`` that runs ``fn(*inputs)`` and its backward pass.

    Without ``cotangents`` the loss is the sum of every output (`total`); with them (one per output, None for an
    output without a gradient, each an array of that output's shape and dtype on ``where``) the backward starts
    from those cotangents (a vector-Jacobian product, no loss formed). Gradients of: with a ``module``, its
    parameters (and, for torch, of the inputs that require grad); without, for torch, the inputs that require
    grad, for MLX the inputs at ``argnums`` (default: every float input). Torch gradients are reset to None after
    each step. ``synchronize``: wait for the device at the end of each step (MLX always evaluates)."""
    outs_sel = None if cotangents is None else [i for i, c in enumerate(cotangents) if c is not None]
    if is_mlx(where):
        import mlx.core as mx
        import mlx.nn as nn

        def loss(*a):
            return total(fn(*a))

        grad_fn = nn.value_and_grad(module, loss) if module is not None else None

        def step(*inputs):
            pos = list(argnums) if argnums is not None else [
                i for i, a in enumerate(inputs) if isinstance(a, mx.array) and mx.issubdtype(a.dtype, mx.floating)]
            if cotangents is not None:
                def f(*primals):
                    a = list(inputs)
                    for i, p in zip(pos, primals, strict=True):
                        a[i] = p
                    outs = as_tuple(fn(*a))
                    return [outs[i] for i in outs_sel]

                outs, grads = mx.vjp(f, [inputs[i] for i in pos], [cotangents[i] for i in outs_sel])
                mx.eval(outs, grads)
            elif module is None:
                value, grads = mx.value_and_grad(loss, argnums=pos)(*inputs)
                mx.eval(value, grads)
            else:
                value, grads = grad_fn(*inputs)
                mx.eval(value, grads)

        return step

    import torch

    params = [p for p in module.parameters() if p.requires_grad] if module is not None else []

    def step(*inputs):
        if cotangents is None:
            total(fn(*inputs)).float().backward()
        else:
            outs = as_tuple(fn(*inputs))
            torch.autograd.backward([outs[i] for i in outs_sel], [cotangents[i] for i in outs_sel])
        if synchronize:
            sync(where)
        for t in (*params, *inputs):
            if getattr(t, "grad", None) is not None:
                t.grad = None

    return step


# ----------------------------------------------------------------------------- devices, dtypes, shapes


def default_device() -> str:
    """``cuda`` when torch sees a GPU, else ``cpu``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str):
    """float32 on ``cpu``, bfloat16 on ``cuda``, ``mps`` and ``mlx``."""
    import torch

    return torch.float32 if device == "cpu" else torch.bfloat16


def unavailable(device: str) -> str | None:
    """Why ``device`` cannot run here (one line, `reference.testing.arrays_for`'s), or None when it can."""
    from reference.testing import arrays_for

    try:
        arrays_for(device)
    except ValueError as e:
        return str(e)
    return None


def bench_samples(spec) -> list:
    """The op's bench shapes in order (`reference.testing.Sample` s with CPU float32 tensors): the samples of
    ``spec.cases(bench=True)``, each once (the battery's samples where the spec has no bench shapes)."""
    out, seen = [], set()
    for sample, _ in spec.cases(bench=True):
        if id(sample) not in seen:
            seen.add(id(sample))
            out.append(sample)
    return out


def describe(spec, counts: bool = True) -> list[dict]:
    """The op's bench shapes without their data: per shape its ``index``, ``name``, ``shape`` (``shape_str``), and
    with ``counts`` ``flops`` / ``bytes`` of one float32 forward call (None where the spec has no count, or where
    the count needs the tensors' values). The samples are drawn as torch fake tensors (shapes, no memory: the V3
    LM head alone is 3.7 GB in float32)."""
    import torch

    def count(f, smp):
        try:
            return None if f is None else float(f(smp, torch.float32))
        except Exception:  # a count that reads values (.item(), nonzero) of a fake tensor
            return None

    def rows(samples):
        out = []
        for i, smp in enumerate(samples):
            row = dict(index=i, name=smp.name, shape=smp.shape_str())
            if counts:
                row.update(flops=count(spec.flops, smp), bytes=count(spec.bytes, smp))
            out.append(row)
        return out

    from torch._subclasses.fake_tensor import FakeTensorMode

    # Shapes only, never real work: asv imports bench/ops.py (which calls this) in the server it forks every
    # benchmark from, and a process forked after torch's OpenMP pool was set up fails in its next parallel region
    # ("Invalid thread pool", or a hang). So bench samples must draw without reading values (tests/test_bench.py).
    with FakeTensorMode(allow_non_fake_inputs=True):
        return rows(bench_samples(spec))


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _target(fn) -> str:
    """``module:qualname`` of a function (its repr for other callables)."""
    mod, name = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    return f"{mod}:{name}" if mod and name else repr(fn)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:200]


# ----------------------------------------------------------------------------- building the timed calls


@dataclass
class Timed:
    """One implementation on one shape, ready to time: ``run()`` makes one call (forward, or forward+backward)
    without waiting for the device (MLX evaluates, as it must), ``sync()`` waits for it; ``call()`` does both.
    ``where``: the device it runs on; ``target``: what it calls (``module:function``)."""

    impl: str
    where: str
    target: str
    run: Callable[[], None]
    sync: Callable[[], None]

    def call(self) -> None:
        self.run()
        self.sync()


def resolve(spec, impl: str, device: str, candidate: Callable | None = None) -> tuple[Callable, str, str]:
    """``(fn, where, target)`` of implementation ``impl`` (one of `IMPLS`) of ``spec`` for ``device``: the
    function in the op's signature, the device it runs on, and what it is. Raises ``NotImplementedError`` with
    the reason where it cannot run here (asv records that as skipped)."""
    import torch

    ref_target = _target(spec.reference)
    if impl == "candidate":
        if candidate is None:
            raise NotImplementedError("no --impl given")
        return candidate, device, _target(candidate)
    if impl == "reference":
        return spec.reference, "cpu" if device == "mlx" else device, ref_target
    if impl == "compiled":
        if device == "mlx":
            raise NotImplementedError("torch.compile needs a torch device (cpu, cuda, mps)")
        # A fresh cache and static shapes: each shape gets its own specialized code, and earlier shapes' graphs
        # never reach dynamo's recompile limit (past which it would run the reference eagerly, silently).
        torch._dynamo.reset()
        return torch.compile(spec.reference, dynamic=False), device, f"torch.compile({ref_target})"
    if impl == "ours":
        if device == "cpu":
            raise NotImplementedError("our Triton kernels are timed on --device cuda only (the Triton interpreter "
                                      "is never timed)")
        if device == "mps":
            raise NotImplementedError("no kernel of ours for mps (ours run on cuda and mlx)")
        if device == "cuda" and os.environ.get("TRITON_INTERPRET") == "1":
            raise NotImplementedError("TRITON_INTERPRET=1 is set: interpreted Triton is never timed")
        backend = "mlx" if device == "mlx" else "cuda"
        if backend not in spec.ours:
            raise NotImplementedError(f"no {backend} implementation of ours for {spec.name}")
        from reference.testing import ImplError, load_impl

        try:
            return load_impl(spec.ours[backend]), device, spec.ours[backend]
        except ImplError as e:
            raise NotImplementedError(str(e)) from None
    if impl == "builtin":
        lib = "mlx" if device == "mlx" else "torch"
        if lib not in spec.builtin:
            raise NotImplementedError(f"no {lib} built-in for {spec.name}")
        try:
            fn = spec.builtin[lib]()
        except Exception as e:  # a library that is missing or too old here
            raise NotImplementedError(f"the {lib} built-in is unavailable here ({_one_line(e)})") from None
        return fn, device, f"builtin[{lib}] {_target(fn)}"
    raise ValueError(f"unknown implementation {impl!r}; expected one of {', '.join(IMPLS)}")


def device_args(spec, sample, dtype, where: str, cache: dict | None = None) -> list:
    """The sample's arguments as the battery gives them to a candidate on ``where`` (`reference.testing.battery`'s
    ``cast_args`` and ``arrays_for(where).put``): float tensors in ``dtype`` (but the spec's ``keep``), copied to the
    torch device (the op's ``grads`` requiring grad when the op is differentiable) or as ``mx.array`` s (FP8 as
    uint8 bits), other arguments through ``put_value`` (on MLX a torch dtype becomes the mx dtype). ``cache``
    (a dict) shares them between implementations on the same device."""
    if cache is not None and where in cache:
        return cache[where]
    import torch

    from reference.testing.battery import arrays_for, cast_args

    arrays = arrays_for("mlx" if is_mlx(where) else where)
    grads = set(spec.grads) if spec.differentiable else set()
    out = []
    for name, a in zip(spec.params, cast_args(sample, spec.params, dtype), strict=False):
        if isinstance(a, torch.Tensor):
            a = arrays.put(a, name in grads and a.is_floating_point() and not is_mlx(where))
        else:
            a = arrays.put_value(a)
        out.append(a)
    if cache is not None:
        cache[where] = out
    return out


def _cotangents(spec, sample, outs, where: str) -> list:
    """A fixed N(0, 1) cotangent per output with ``grad=True`` (None for the others), seeded by the op and shape so
    every implementation gets the same values, in each output's dtype on ``where``."""
    import torch

    cots = []
    for i, (o, out_spec) in enumerate(zip(outs, spec.outputs, strict=False)):
        if not out_spec.grad:
            cots.append(None)
            continue
        c = torch.randn(tuple(o.shape), generator=spec.rng(f"{sample.name}/cotangent/{i}"))
        if is_mlx(where):
            from reference.testing.battery import to_mx

            cots.append(to_mx(c).astype(o.dtype))
        else:
            cots.append(c.to(o.device, o.dtype))
    cots += [None] * (len(outs) - len(cots))
    return cots


def build(spec, impl: str, sample, dtype, device: str, mode: str = "forward", fn: Callable | None = None,
          candidate: Callable | None = None, cache: dict | None = None, warm: bool = True) -> Timed:
    """The timed call of implementation ``impl`` of ``spec`` on one bench ``sample`` in ``dtype`` on ``device``
    (``mode``: ``forward``, or ``backward`` for forward+backward): the function `dsfs bench` times and the asv
    suite ``bench/ops.py`` calls in its ``setup``.

    ``fn``: time this function (in the op's signature, on ``device``) under the name ``impl`` instead of resolving
    it (the asv suite's peers); ``candidate``: the ``--impl`` function; ``cache``: shared inputs (`device_args`).
    ``warm``: make one call before returning (it compiles what needs compiling, and a backward's first forward
    gives the cotangents' shapes). Raises ``NotImplementedError`` where the implementation cannot run here (no
    kernel, no built-in, a forward-only op in ``backward`` mode, a dtype the op or shape is not specified for, a
    failed ``torch.compile``); any other exception is the implementation's own failure."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: expected one of {', '.join(MODES)}")
    backward = mode == "backward"
    if backward and not spec.differentiable:
        raise NotImplementedError(f"{spec.name} is forward only (no gradients)")
    if dtype not in spec.dtypes or (sample.dtypes is not None and dtype not in sample.dtypes):
        raise NotImplementedError(f"{spec.name} shape '{sample.name}' is not specified for {_dtype_name(dtype)}")
    try:
        if fn is None:
            fn, where, target = resolve(spec, impl, device, candidate)
        else:
            where, target = device, _target(fn)
        args = device_args(spec, sample, dtype, where, cache)
        return _timed(spec, impl, fn, args, sample, where, target, backward, warm)
    except NotImplementedError:
        raise
    except Exception as e:
        if impl == "compiled":
            raise NotImplementedError(f"torch.compile failed: {_one_line(e)}") from None
        raise


def _timed(spec, impl, fn, args, sample, where, target, backward, warm) -> Timed:
    def wait():
        sync(where)

    if is_mlx(where):
        import mlx.core as mx

        def forward():
            out = as_tuple(fn(*args))
            mx.eval([o for o in out if isinstance(o, mx.array)])
            return out
    else:
        import torch

        def forward():
            with torch.no_grad():
                return as_tuple(fn(*args))

    if not backward:
        run = forward
    else:
        grad_pos = [spec.params.index(g) for g in spec.grads]
        if is_mlx(where):
            outs = forward()
        else:
            import torch

            with torch.enable_grad():
                outs = as_tuple(fn(*args))
        cots = _cotangents(spec, sample, outs, where)
        del outs
        step = forward_backward(where, fn, argnums=grad_pos, cotangents=cots, synchronize=False)

        def run():
            step(*args)

    timed = Timed(impl, where, target, run, wait)
    if warm:
        timed.call()
    return timed


def check_candidate(spec, fn: Callable, target: str, sample, dtype, device: str, cache: dict | None = None) -> None:
    """Check the candidate before timing it: its signature (`reference.testing.check_signature`), the forward
    checks of the op's first three battery cases at ``dtype`` (values, dtypes, inputs unchanged), then one call on
    ``sample`` whose outputs must be as many, and of the same shapes, as the reference's on the same inputs.
    Raises `KernelError` (one line, pointing to ``dsfs check``) otherwise."""
    import shlex

    from reference.testing import ImplError, arrays_for, check_signature, run_case

    hint = f"run `dsfs check {spec.name} --impl {shlex.quote(target)} --device {device}` for the whole battery"
    try:
        takes_out = check_signature(spec, fn)
    except ImplError as e:
        raise KernelError(f"--impl: {e}; {hint}") from None
    # values first, cheaply: the forward checks of the battery's first samples at this dtype (a kernel that is
    # wrong is not timed)
    arrays = arrays_for(device)
    for case, case_dtype in [c for c in spec.cases([dtype])][:3]:
        bad = [r for r in run_case(spec, fn, case, case_dtype, arrays, takes_out, backward=False) if not r.passed]
        if bad:
            r = bad[0]
            raise KernelError(f"--impl {target} fails the battery's case '{r.case}' ({r.dtype}, {r.check}: "
                              f"{r.note}); {hint}")
    ref_args = device_args(spec, sample, dtype, "cpu" if device == "mlx" else device, cache)
    with no_grad("cpu"):
        ref = as_tuple(spec.reference(*ref_args))
    args = device_args(spec, sample, dtype, device, cache)
    try:
        with no_grad(device):
            got = as_tuple(fn(*args))
        sync(device, *[o for o in got if type(o).__module__.startswith("mlx")] if is_mlx(device) else ())
    except KeyboardInterrupt:
        raise
    except BaseException as e:
        raise KernelError(f"--impl {target} fails on shape '{sample.name}' ({_one_line(e)}); {hint}") from None
    if len(got) != len(ref):
        raise KernelError(f"--impl {target} returns {len(got)} output(s) on shape '{sample.name}', the reference "
                         f"{len(ref)}; {hint}")
    for o, r, out in zip(got, ref, spec.outputs, strict=False):
        shape = getattr(o, "shape", None)
        if shape is None or tuple(shape) != tuple(r.shape):
            what = f"shape {tuple(shape)}" if shape is not None else f"a {type(o).__name__}"
            raise KernelError(f"--impl {target}: output {out.name} is {what} on shape '{sample.name}', expected "
                             f"{tuple(r.shape)}; {hint}")


# ----------------------------------------------------------------------------- timing


def _rotated(names: list[str], r: int) -> list[str]:
    k = r % len(names) if names else 0
    return names[k:] + names[:k]


def measure(timeds: dict[str, Timed], warmup: int = 2, repeat: int = 10, min_time: float = 0.002,
            failed: dict[str, str] | None = None) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Time ``timeds`` interleaved: ``warmup`` untimed rounds (at least one, which also sizes the samples), then
    ``repeat`` timed rounds, each calling every implementation once in an order rotated by one per round.

    Returns ``(times, calls)``: per implementation its seconds per call in each timed round, and the calls per
    timed sample (``n`` back-to-back calls then a synchronization, ``n`` the smallest making a sample last at
    least ``min_time`` seconds, at most `MAX_CALLS`). An implementation that raises is dropped and its one-line
    error put in ``failed``."""
    failed = {} if failed is None else failed
    names = list(timeds)
    est: dict[str, float] = {}

    def sample(name: str, n: int) -> float:
        t = timeds[name]
        t0 = time.perf_counter()
        for _ in range(n):
            t.run()
        t.sync()
        return (time.perf_counter() - t0) / n

    def one_round(r: int, calls: dict[str, int] | None, out: dict[str, list[float]]):
        for name in _rotated(names, r):
            if name in failed:
                continue
            try:
                dt = sample(name, calls[name] if calls else 1)
            except Exception as e:
                failed[name] = _one_line(e)
                continue
            out.setdefault(name, []).append(dt)

    warm: dict[str, list[float]] = {}
    for r in range(max(1, warmup)):
        one_round(r, None, warm)
    for name, ts in warm.items():
        est[name] = min(ts)
    calls = {name: max(1, min(MAX_CALLS, math.ceil(min_time / max(t, 1e-9)))) for name, t in est.items()}
    times: dict[str, list[float]] = {}
    for r in range(repeat):
        one_round(r, calls, times)
    return {n: ts for n, ts in times.items() if n not in failed}, calls


# ----------------------------------------------------------------------------- the whole run


@dataclass
class Settings:
    """What ``dsfs bench`` runs: the op, the ``candidate`` target (or None), ``impls`` to time, ``device``,
    ``dtype``, ``modes``, ``shape`` (a name substring or an index, None: all), the rounds and sample time."""

    op: str
    candidate: str | None = None
    impls: tuple[str, ...] = IMPLS
    device: str | None = None
    dtype: str | None = None
    modes: tuple[str, ...] = ("forward",)
    shape: str | None = None
    warmup: int = 2
    repeat: int = 10
    min_time: float = 0.002
    threads: int | None = None
    progress: Callable[[str], None] | None = field(default=None, repr=False)


def _select(samples: list, shape: str | None) -> list[tuple[int, object]]:
    indexed = list(enumerate(samples))
    if shape is None:
        return indexed
    if shape.lstrip("#").isdigit():
        i = int(shape.lstrip("#"))
        chosen = [(j, s) for j, s in indexed if j == i]
    else:
        chosen = [(j, s) for j, s in indexed if shape.lower() in s.name.lower()]
    if not chosen:
        names = "; ".join(f"#{j} {s.name}" for j, s in indexed)
        raise KernelError(f"--shape {shape!r} matches no bench shape (by name substring or #index): {names}")
    return chosen


def _versions() -> dict:
    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("triton", "mlx"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def _work(spec, sample, dtype, mode: str) -> tuple[float | None, float | None]:
    """(FLOPs, bytes) of one call: the spec's forward counts, times 3 for forward+backward."""
    scale = 3.0 if mode == "backward" else 1.0
    flops = spec.flops(sample, dtype) * scale if spec.flops is not None else None
    nbytes = spec.bytes(sample, dtype) * scale if spec.bytes is not None else None
    return flops, nbytes


def _peak_flops(peak: Peak | None, sample, dtype) -> float | None:
    """The peak TFLOP/s that applies: FP8 where an input is FP8 (and the device has FP8 units), fp32 for float32,
    else bf16/fp16."""
    import torch

    if peak is None:
        return None
    if peak.fp8 is not None and any(isinstance(a, torch.Tensor) and a.dtype == torch.float8_e4m3fn
                                    for a in sample.args):
        return peak.fp8
    return peak.fp32 if dtype == torch.float32 else peak.half


def run(settings: Settings) -> dict:
    """Run ``dsfs bench`` and return its result document (what ``--json`` prints): ``op``, ``signature``,
    ``device``, ``device_name``, ``dtype``, ``modes``, ``versions``, ``peak`` (the `Peak` used, or None),
    ``settings``, ``rows``. Each row: ``shape`` (name), ``shape_index``, ``shape_desc``, ``mode``, ``impl``,
    ``target``, ``where``, ``status`` (``ok``, ``skipped``, ``failed``), ``note``, ``median_ms``, ``min_ms``,
    ``times_ms`` (one per timed round), ``calls_per_sample``, ``vs_reference`` and ``vs_candidate`` (ratios of the
    medians; below 1 is faster), ``gflop``, ``gbyte`` (work of one call), ``gb_per_s``, ``tflop_per_s``,
    ``pct_peak_bandwidth``, ``pct_peak_flops``. Raises `KernelError` for bad input."""
    import torch

    from reference.testing import ImplError, get_spec, load_impl

    s = settings
    try:
        spec = get_spec(s.op)
    except KeyError as e:
        raise KernelError(e.args[0]) from None
    device = s.device or default_device()
    why = unavailable(device)
    if why:
        raise KernelError(why)
    if s.dtype is not None and s.dtype not in DTYPES:
        raise KernelError(f"--dtype {s.dtype}: expected one of {', '.join(DTYPES)}")
    if s.dtype is not None and getattr(torch, s.dtype) not in spec.dtypes:
        ok = ", ".join(_dtype_name(d) for d in spec.dtypes)
        raise KernelError(f"--dtype {s.dtype}: {spec.name} is specified for {ok}")
    for m in s.modes:
        if m not in MODES:
            raise KernelError(f"--mode {m}: expected forward, backward or both")
    modes = [m for m in s.modes if m == "forward" or spec.differentiable]
    if not modes:
        raise KernelError(f"--mode backward: {spec.name} is forward only (no gradients); use --mode forward")
    bad = [i for i in s.impls if i not in IMPLS]
    if bad:
        raise KernelError(f"--impls {','.join(bad)}: expected a comma-separated subset of {','.join(IMPLS)}")
    for opt, v in (("--warmup", s.warmup), ("--repeat", s.repeat)):
        if v < 1:
            raise KernelError(f"{opt} {v}: expected an integer >= 1")
    if not (s.min_time >= 0 and math.isfinite(s.min_time)):
        raise KernelError(f"--min-time {s.min_time}: expected a finite number of seconds >= 0")
    if s.threads is not None:
        if s.threads < 1:
            raise KernelError(f"--threads {s.threads}: expected an integer >= 1")
        torch.set_num_threads(s.threads)
    candidate = None
    if s.candidate is not None and not s.candidate.strip():
        raise KernelError("--impl is empty: expected module:function (for example kernels.triton.rms_norm:rms_norm)")
    if not [i for i in s.impls if i != "candidate" or s.candidate is not None]:
        raise KernelError(f"--impls {','.join(s.impls) or '(none)'}: nothing to time (candidate needs --impl)")
    if s.candidate is not None:
        try:
            candidate = load_impl(s.candidate)
        except ImplError as e:
            raise KernelError(str(e)) from None
        if os.environ.get("TRITON_INTERPRET") == "1" and _uses_triton(candidate):
            raise KernelError(f"--impl {s.candidate} uses Triton and TRITON_INTERPRET=1 is set: interpreted Triton "
                             "is never timed (unset it and run on --device cuda)")
    impls = [i for i in s.impls if i != "candidate" or candidate is not None]
    chosen = _select(bench_samples(spec), s.shape)
    dtype, chosen, other_dtype = _pick_dtype(spec, chosen, device, s.dtype)
    name = device_name(device)
    peak = find_peak(name)
    say = s.progress or (lambda msg: None)

    rows = []
    for k, (index, sample) in enumerate(chosen):
        cache: dict = {}
        if k == 0 and candidate is not None:
            check_candidate(spec, candidate, s.candidate, sample, dtype, device, cache)
        for mode in modes:
            say(f"{spec.name} #{index} {sample.name}, {mode}: building")
            timeds, notes, status = {}, {}, {}
            for impl in impls:
                try:
                    timeds[impl] = build(spec, impl, sample, dtype, device, mode, candidate=candidate, cache=cache)
                except NotImplementedError as e:
                    status[impl], notes[impl] = "skipped", str(e)
                except Exception as e:
                    status[impl], notes[impl] = "failed", _one_line(e)
            say(f"{spec.name} #{index} {sample.name}, {mode}: timing {', '.join(timeds)}")
            failed: dict[str, str] = {}
            times, calls = measure(timeds, s.warmup, s.repeat, s.min_time, failed)
            for impl, why in failed.items():
                status[impl], notes[impl] = "failed", why
            flops, nbytes = _work(spec, sample, dtype, mode)
            tf_peak = _peak_flops(peak, sample, dtype)
            med = {i: statistics.median(ts) for i, ts in times.items()}
            for impl in impls:
                row = dict(shape=sample.name, shape_index=index, shape_desc=sample.shape_str(), mode=mode, impl=impl,
                           target=timeds[impl].target if impl in timeds else None,
                           where=timeds[impl].where if impl in timeds else None,
                           status=status.get(impl, "ok"), note=notes.get(impl, ""), median_ms=None, min_ms=None,
                           times_ms=[], calls_per_sample=None, vs_reference=None, vs_candidate=None,
                           gflop=None if flops is None else flops / 1e9,
                           gbyte=None if nbytes is None else nbytes / 1e9, gb_per_s=None, tflop_per_s=None,
                           pct_peak_bandwidth=None, pct_peak_flops=None)
                if impl in med:
                    t = med[impl]
                    row.update(median_ms=t * 1e3, min_ms=min(times[impl]) * 1e3,
                               times_ms=[x * 1e3 for x in times[impl]], calls_per_sample=calls[impl])
                    if "reference" in med:
                        row["vs_reference"] = t / med["reference"]
                    if "candidate" in med:
                        row["vs_candidate"] = t / med["candidate"]
                    if nbytes is not None and t > 0:
                        row["gb_per_s"] = nbytes / t / 1e9
                        if peak is not None and row["where"] == device:
                            row["pct_peak_bandwidth"] = 100 * row["gb_per_s"] / (peak.mem * 1e3)
                    if flops is not None and t > 0:
                        row["tflop_per_s"] = flops / t / 1e12
                        if tf_peak is not None and row["where"] == device:
                            row["pct_peak_flops"] = 100 * row["tflop_per_s"] / tf_peak
                rows.append(row)
            del timeds
        del cache
    return dict(op=spec.name, signature=spec.signature, device=device, device_name=name, dtype=_dtype_name(dtype),
                modes=modes, versions=_versions(),
                peak=None if peak is None else dict(name=peak.name, half_tflop_per_s=peak.half,
                                                    fp32_tflop_per_s=peak.fp32, fp8_tflop_per_s=peak.fp8,
                                                    memory_tb_per_s=peak.mem),
                settings=dict(candidate=s.candidate, impls=impls, shape=s.shape, warmup=max(1, s.warmup),
                              repeat=s.repeat, min_time_s=s.min_time, threads=torch.get_num_threads()),
                other_dtype_shapes=other_dtype, rows=rows)


def _dtypes_of(spec, sample) -> list:
    return [d for d in spec.dtypes if sample.dtypes is None or d in sample.dtypes]


def _pick_dtype(spec, chosen: list, device: str, name: str | None):
    """``(dtype, shapes, others)``: ``--dtype`` (or the device's default, else the first of the op's dtypes that a
    chosen shape is specified for), the chosen shapes specified for it, and the names of those that are not."""
    import torch

    if name is not None:
        dtype = getattr(torch, name)
    else:
        want = default_dtype(device)
        order = [want] + [d for d in spec.dtypes if d != want]
        dtype = next((d for d in order if any(d in _dtypes_of(spec, smp) for _, smp in chosen)), want)
    fits = [(i, smp) for i, smp in chosen if dtype in _dtypes_of(spec, smp)]
    if not fits:
        have = "; ".join(f"#{i} {smp.name}: {', '.join(map(_dtype_name, _dtypes_of(spec, smp)))}" for i, smp in chosen)
        raise KernelError(f"--dtype {_dtype_name(dtype)}: no chosen bench shape of {spec.name} is specified for it "
                         f"({have})")
    kept = {i for i, _ in fits}
    return dtype, fits, [f"#{i} {smp.name}" for i, smp in chosen if i not in kept]


def _uses_triton(fn) -> bool:
    """Whether ``fn``'s module imports Triton (a module or a ``@triton.jit`` function among its globals)."""
    mod = sys.modules.get(getattr(fn, "__module__", "") or "")
    for v in vars(mod).values() if mod is not None else ():
        owner = v.__name__ if isinstance(v, type(sys)) else type(v).__module__
        if (owner or "").split(".")[0] == "triton":
            return True
    return False


# ----------------------------------------------------------------------------- output


def _num(v, fmt: str = "{:.4g}") -> str:
    return "-" if v is None else fmt.format(v)


def format_table(doc: dict) -> str:
    """The result document as a fixed-width table, one row per (shape, mode, implementation); implementations
    skipped on every shape for one reason are listed once below it."""
    rows = doc["rows"]
    per_impl: dict[str, set] = {}
    for r in rows:
        per_impl.setdefault(r["impl"], set()).add((r["status"], r["note"]))
    always_skipped = {i for i, v in per_impl.items() if len(v) == 1 and next(iter(v))[0] == "skipped"}
    both = len(doc["modes"]) > 1
    head = ["shape", *(["mode"] if both else []), "impl", "median ms", "min ms", "x ref", "x cand", "GB/s",
            "TFLOP/s", "% peak BW", "% peak FLOP", "note"]
    body = []
    for r in rows:
        if r["impl"] in always_skipped:
            continue
        note = r["note"] if r["status"] == "ok" else f"{r['status']}: {r['note']}"
        if r["status"] == "ok" and r["where"] not in (doc["device"], None):
            note = f"on {r['where']}"
        body.append([f"#{r['shape_index']} {r['shape']}", *([r["mode"]] if both else []), r["impl"],
                     _num(r["median_ms"]), _num(r["min_ms"]), _num(r["vs_reference"], "{:.3g}"),
                     _num(r["vs_candidate"], "{:.3g}"), _num(r["gb_per_s"], "{:.3g}"), _num(r["tflop_per_s"], "{:.3g}"),
                     _num(r["pct_peak_bandwidth"], "{:.1f}"), _num(r["pct_peak_flops"], "{:.1f}"), note])
    widths = [max([len(h)] + [len(b[i]) for b in body]) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths[:-1]) + "  {}"
    peak = doc["peak"]
    s = doc["settings"]
    lines = [f"{doc['signature']} on {doc['device']} ({doc['device_name']}), {doc['dtype']}, "
             f"{' and '.join('forward+backward' if m == 'backward' else m for m in doc['modes'])}; "
             f"torch {doc['versions']['torch']}"
             + "".join(f", {k} {v}" for k, v in doc["versions"].items() if k in ("triton", "mlx") and v),
             f"{s['warmup']} warm-up + {s['repeat']} timed rounds, interleaved, {s['threads']} torch CPU thread(s); "
             "times per call (median, min); "
             "x ref / x cand: median / the reference's / the candidate's (below 1 is faster); "
             + (f"peak: {peak['name']} (vendor datasheet, dense)" if peak else "peak: unknown device, no %"),
             "", fmt.format(*head).rstrip(), fmt.format(*("-" * w for w in widths)).rstrip()]
    lines += [fmt.format(*b).rstrip() for b in body]
    for impl in [i for i in per_impl if i in always_skipped]:
        lines.append(f"{impl}: skipped ({next(iter(per_impl[impl]))[1]})")
    if doc["other_dtype_shapes"]:
        lines.append(f"not specified for {doc['dtype']} (see --dtype): {'; '.join(doc['other_dtype_shapes'])}")
    return "\n".join(lines)


def list_ops() -> str:
    """Every op with its signature, gradients, our kernels, built-ins and bench shapes (index, name, shape, GFLOP
    and MB of one float32 forward call)."""
    from reference.testing import all_specs

    lines = []
    for spec in all_specs().values():
        grads = "forward+backward" if spec.differentiable else "forward only"
        ours = ", ".join(f"{k} {v}" for k, v in spec.ours.items()) or "-"
        builtin = ", ".join(spec.builtin) or "-"
        lines.append(f"{spec.signature}: {grads}; ours: {ours}; builtin: {builtin}")
        try:
            shapes = describe(spec)
        except Exception as e:  # one broken spec does not hide the others
            lines.append(f"    (no bench shapes: {_one_line(e)})")
            continue
        for d in shapes:
            work = ([f"{d['flops'] / 1e9:.3g} GFLOP"] if d["flops"] is not None else []) + (
                [f"{d['bytes'] / 1e6:.3g} MB"] if d["bytes"] is not None else [])
            lines.append(f"    #{d['index']} {d['name']}: {d['shape']}" + (f" ({', '.join(work)} in float32)"
                                                                            if work else ""))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the CLI verb


def add_bench(sub) -> None:
    """Register ``dsfs bench``."""
    p = sub.add_parser(
        "bench",
        help="time a kernel beside the reference, our kernel, torch.compile and the built-in on the op's shapes",
        description="Time the candidate (--impl), the reference, torch.compile of the reference, our Triton or "
        "MLX kernel and the library's built-in on the op's realistic shapes, in one process, interleaved. Prints "
        "per shape and implementation the median and minimum time per call (ms), the ratios to the reference and "
        "to the candidate, GB/s and TFLOP/s from the op spec's byte and FLOP counts, and the percentage of the "
        "device's peak where the device is known.",
    )
    p.add_argument("op", nargs="?", metavar="OP", help="the op (see --list)")
    p.add_argument("--impl", metavar="MODULE:FUNCTION",
                   help="the candidate: package.module:function or path/to/file.py:function (optional)")
    p.add_argument("--device", choices=DEVICES, help="torch tensors on cpu/cuda/mps, mx arrays on mlx (default: cuda "
                                                     "when available, else cpu)")
    p.add_argument("--dtype", choices=DTYPES, help="float dtype of the inputs (default: float32 on cpu, bfloat16 "
                                                   "on cuda, mps and mlx)")
    p.add_argument("--mode", choices=["forward", "backward", "both"], default="forward",
                   help="forward, forward+backward (differentiable ops), or both (default: %(default)s)")
    p.add_argument("--shape", metavar="NAME", help="only bench shapes whose name contains NAME, or #N / N: the "
                                                   "shape of that index (see --list)")
    p.add_argument("--impls", metavar="LIST", default=",".join(IMPLS),
                   help="comma-separated implementations to time (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=2, metavar="N", help="untimed rounds first (default: %(default)s)")
    p.add_argument("--repeat", type=int, default=10, metavar="N", help="timed rounds (default: %(default)s)")
    p.add_argument("--min-time", type=float, default=0.002, metavar="S",
                   help="seconds a timed sample lasts at least: fast calls repeat back to back (default: "
                        "%(default)s)")
    p.add_argument("--threads", type=int, metavar="N", help="torch's CPU threads (torch.set_num_threads; default: "
                   "torch's). On a machine with other work running, 1 avoids threads waiting on each other")
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout and nothing else")
    p.add_argument("--list", action="store_true", help="print the ops and their bench shapes")
    p.set_defaults(func=run_bench)


def run_bench(args) -> int:
    """The ``dsfs bench`` verb: parse the namespace into `Settings`, `run`, print the table or the JSON."""
    if args.list:
        print(list_ops())
        return 0
    if args.op is None:
        raise KernelError("expected an op: dsfs bench OP [--impl module:function] (see dsfs bench --list)")
    modes = ("forward", "backward") if args.mode == "both" else (args.mode,)
    impls = tuple(i.strip() for i in args.impls.split(",") if i.strip())
    progress = None
    if not args.json and sys.stderr.isatty():
        def progress(msg):
            print(f"dsfs bench: {msg}", file=sys.stderr, flush=True)
    settings = Settings(op=args.op, candidate=args.impl, impls=impls, device=args.device, dtype=args.dtype,
                        modes=modes, shape=args.shape, warmup=args.warmup, repeat=args.repeat,
                        min_time=args.min_time, threads=args.threads, progress=progress)
    if args.json:
        with contextlib.redirect_stdout(sys.stderr):  # stray prints of the implementations stay off stdout
            doc = run(settings)
        print(json.dumps(doc, indent=1))
    else:
        doc = run(settings)
        print(format_table(doc))
    # exit 1 when the candidate failed on some shape: a broken kernel must not read as a timed one
    return 1 if any(r["impl"] == "candidate" and r["status"] == "failed" for r in doc["rows"]) else 0
