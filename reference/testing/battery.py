"""Run an op's battery on a candidate implementation: every sample, every dtype, forward and backward.

For each case (a `spec.Sample` at one dtype) the candidate gets the sample's inputs in that dtype on the
device under test, and the reference gets the same values in float64 on the CPU. Checked, one `Row` each:

- the call itself (an exception fails the case, with its one-line message);
- each output: its type, shape and dtype, then ``rel_err`` within the dtype's bound (``"close"``) or exact
  equality (``"equal"``);
- each gradient, for a random cotangent of every output that has one, through ``torch.autograd.grad`` or
  ``mx.vjp``;
- that no input was written to (a kernel that stores its gradient into its input fails here).

Outputs start poisoned: a candidate taking ``out=`` gets NaN-filled buffers, and ``DSFS_POISON_OUTPUTS=1`` is set
while the battery runs, which our launchers (`kernels.triton.utils.empty`, `runtime_mlx.kernels.launch`) honor by
filling what they allocate with NaN, so an element a kernel never writes fails the comparison.

Devices: ``cpu``, ``cuda``, ``mps`` (torch tensors) and ``mlx`` (``mx.array`` s, MLX's default device). Triton
kernels run on ``cpu`` under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .spec import OpSpec, Output, Sample
from .tolerance import BOUNDS, rel_err

DEVICES = ("cpu", "cuda", "mps", "mlx")
FP8 = torch.float8_e4m3fn


class ImplError(ValueError):
    """The candidate cannot be tested: its module does not import, it names no function, or its signature does
    not take the op's arguments. The message is one line naming what was expected."""


@dataclass
class Row:
    """One line of the report: ``case`` (the sample's name), ``shape``, ``dtype``, ``check`` (an output's or a
    gradient's name, ``call``, ``inputs unchanged``), ``error`` and ``bound`` (None where not a number),
    ``passed``, and a ``note`` saying why a check failed."""

    case: str
    shape: str
    dtype: str
    check: str
    error: float | None
    bound: float | None
    passed: bool
    note: str = ""


# ----------------------------------------------------------------------------- candidates


def load_impl(target: str) -> Callable:
    """The function named by ``target``: ``package.module:function`` (importable from ``sys.path`` and the
    current directory) or ``path/to/file.py:function``. Raises `ImplError` (one line) when the module does not
    import or has no such callable."""
    if not target or not target.strip():
        raise ImplError("--impl is empty: expected module:function (for example kernels.triton.rms_norm:rms_norm)")
    if ":" not in target:
        raise ImplError(f"--impl {target!r}: expected module:function (for example kernels.triton.rms_norm:rms_norm)")
    mod_name, _, fn_name = target.rpartition(":")
    try:
        if mod_name.endswith(".py") or os.sep in mod_name:
            path = Path(mod_name)
            if not path.is_file():
                raise ImplError(f"--impl {target!r}: no such file {mod_name}")
            folder = str(path.resolve().parent)  # its neighbours import, after every installed package
            if folder not in sys.path:
                sys.path.append(folder)
            name = f"_dsfs_candidate_{path.stem}_{abs(hash(str(path.resolve())))}"  # never shadows a package
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path and "" not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(mod_name)
    except (ImplError, KeyboardInterrupt):
        raise
    except BaseException as e:  # the user's module: any error while importing it is theirs (SystemExit too)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ImplError(f"--impl {target!r}: module {mod_name} does not import ({type(e).__name__}: {msg})") from None
    fn = getattr(module, fn_name, None)
    if fn is None or not callable(fn):
        names = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))[:8]
        raise ImplError(f"--impl {target!r}: module {mod_name} has no function {fn_name!r} "
                        f"(it has: {', '.join(names) or 'none'})")
    return fn


def check_signature(spec: OpSpec, fn: Callable) -> bool:
    """Check that ``fn`` takes the op's arguments positionally (``spec.params``, in order); returns whether it
    also takes an ``out=`` buffer. Raises `ImplError` naming the expected signature."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin without a signature: trust it, no out=
        return False
    try:
        sig.bind(*spec.params)
    except TypeError as e:
        bare = sig.replace(parameters=[p.replace(annotation=inspect.Parameter.empty) for p in sig.parameters.values()],
                           return_annotation=inspect.Signature.empty)
        raise ImplError(f"{_name(fn)}{bare} does not take the arguments of {spec.signature} ({e})") from None
    return "out" in sig.parameters


def _name(fn) -> str:
    return f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', repr(fn))}"


# ----------------------------------------------------------------------------- arrays


def to_mx(t: torch.Tensor):
    """A torch tensor as an ``mx.array`` of the same dtype: bfloat16 through float32, float64 as float32 (MLX's
    GPU has none), float8_e4m3fn as its uint8 bit pattern (runtime_mlx's convention)."""
    import mlx.core as mx

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return mx.array(t.float().numpy()).astype(mx.bfloat16)
    if t.dtype == FP8:
        return mx.array(t.view(torch.uint8).numpy())
    a = t.numpy()
    return mx.array(a.astype(np.float32) if a.dtype == np.float64 else a)


def to_torch(a) -> torch.Tensor:
    """An ``mx.array`` as a CPU torch tensor of the same dtype (bfloat16 through float32)."""
    import mlx.core as mx

    if a.dtype == mx.bfloat16:
        return torch.from_numpy(np.array(a.astype(mx.float32))).to(torch.bfloat16)
    return torch.from_numpy(np.array(a))


def is_mx(x) -> bool:
    """Whether ``x`` is an ``mx.array`` (not an ``mx.Dtype`` or another MLX object)."""
    return type(x).__module__.startswith("mlx") and type(x).__name__ == "array"


class _Torch:
    """Inputs on a torch device; gradients by ``torch.autograd.grad``."""

    def __init__(self, device: str):
        self.device = torch.device(device)

    def put(self, t: torch.Tensor, grad: bool):
        t = t.to(self.device, copy=True)
        return t.requires_grad_(True) if grad else t

    def put_value(self, v):
        return v

    def get(self, x) -> torch.Tensor:
        return x.detach().cpu()

    def wrong_device(self, x) -> str:
        """Why an output tensor is not where the inputs are ('' when it is)."""
        if x.device.type != self.device.type:
            return f"on device {x.device}, expected {self.device.type} (the inputs')"
        return ""

    def is_array(self, x) -> bool:
        return isinstance(x, torch.Tensor)

    def call(self, fn, args, kwargs, differentiable: bool):
        with torch.enable_grad() if differentiable else torch.no_grad():
            return fn(*args, **kwargs)

    def grads(self, fn, args, kwargs, grad_pos, outs, cotangents):
        ins = [args[i] for i in grad_pos]
        if kwargs.get("out") is not None or not any(o.requires_grad for o, c in zip(outs, cotangents, strict=True)
                                                     if c is not None and isinstance(o, torch.Tensor)):
            outs = _tuple(fn(*args))  # a forward with autograd (and without out=)
        if not any(o.requires_grad for o, c in zip(outs, cotangents, strict=True) if c is not None):
            raise RuntimeError("no output carries an autograd graph (detached, or computed outside autograd): "
                               "no gradient reaches the inputs")
        pairs = [(o, c) for o, c in zip(outs, cotangents, strict=True) if c is not None and o.requires_grad]
        gs = (torch.autograd.grad([o for o, _ in pairs], ins, [c.to(o.device, o.dtype) for o, c in pairs],
                                  allow_unused=True) if pairs else [None] * len(ins))
        return [torch.zeros_like(i) if g is None else g for g, i in zip(gs, ins, strict=True)]

    def snapshot(self, x):
        return x.detach().clone()

    def unchanged(self, before, x) -> bool:
        x = x.detach()
        if x.dtype.is_floating_point and x.element_size() in (2, 4, 8):
            view = {2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()]
            return torch.equal(before.view(view), x.view(view))  # bitwise: NaN == NaN
        return torch.equal(before, x)

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()


class _MLX:
    """Inputs as ``mx.array`` s; gradients by ``mx.vjp``."""

    def __init__(self):
        import mlx.core as mx

        self.mx = mx

    def put(self, t: torch.Tensor, grad: bool):
        return to_mx(t)

    def put_value(self, v):
        """A non-tensor argument: a torch dtype becomes the mx dtype of the same name."""
        return getattr(self.mx, str(v).removeprefix("torch.")) if isinstance(v, torch.dtype) else v

    def get(self, x) -> torch.Tensor:
        return to_torch(x)

    def wrong_device(self, x) -> str:
        return ""

    def is_array(self, x) -> bool:
        return is_mx(x)

    def call(self, fn, args, kwargs, differentiable: bool):
        out = fn(*args, **kwargs)
        self.mx.eval([o for o in (out if isinstance(out, tuple | list) else (out,)) if is_mx(o)])
        return out

    def grads(self, fn, args, kwargs, grad_pos, outs, cotangents):
        keep = [i for i, c in enumerate(cotangents) if c is not None]

        def f(*primals):
            a = list(args)
            for i, p in zip(grad_pos, primals, strict=True):
                a[i] = p
            out = fn(*a, **kwargs)
            out = tuple(out) if isinstance(out, tuple | list) else (out,)
            return [out[i] for i in keep]

        cots = [to_mx(cotangents[i]).astype(outs[i].dtype) for i in keep]
        _, vjps = self.mx.vjp(f, [args[i] for i in grad_pos], cots)
        self.mx.eval(vjps)
        return vjps

    def snapshot(self, x):
        return np.array(x.astype(self.mx.float32) if x.dtype == self.mx.bfloat16 else x)

    def unchanged(self, before, x) -> bool:
        now = self.snapshot(x)
        return before.shape == now.shape and np.array_equal(before, now, equal_nan=True)

    def sync(self):
        pass


def arrays_for(device: str):
    """The array adapter of ``device`` (one of `DEVICES`); raises ``ValueError`` for an unknown or absent one."""
    if device not in DEVICES:
        raise ValueError(f"--device {device!r}: expected one of {', '.join(DEVICES)}")
    if device == "mlx":
        if importlib.util.find_spec("mlx") is None:
            raise ValueError("--device mlx: the mlx package is not installed")
        return _MLX()
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device here (Triton kernels run on --device cpu under "
                         "TRITON_INTERPRET=1)")
    if device == "mps" and not torch.backends.mps.is_available():
        raise ValueError("--device mps: no MPS device here")
    return _Torch(device)


@contextlib.contextmanager
def poisoned_outputs():
    """Set ``DSFS_POISON_OUTPUTS=1`` for the duration: launchers that honor it fill their outputs with NaN."""
    old = os.environ.get("DSFS_POISON_OUTPUTS")
    os.environ["DSFS_POISON_OUTPUTS"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("DSFS_POISON_OUTPUTS", None)
        else:
            os.environ["DSFS_POISON_OUTPUTS"] = old


# ----------------------------------------------------------------------------- one case


def _dtype_name(d) -> str:
    return str(d).replace("torch.", "")


def cast_args(sample: Sample, params: Sequence[str], dtype: torch.dtype) -> list:
    """The sample's arguments as the candidate gets them: float32 tensors in ``dtype`` (except ``keep``)."""
    out = []
    for name, a in zip(params, sample.args, strict=False):
        if isinstance(a, torch.Tensor) and a.dtype == torch.float32 and name not in sample.keep:
            a = a.to(dtype)
        out.append(a)
    return out


def _ref_arg(a, grad: bool, float64: bool):
    if not isinstance(a, torch.Tensor):
        return a
    a = a.detach().clone()
    if float64 and a.dtype in (torch.float32, torch.bfloat16, torch.float16):
        a = a.double()
    return a.requires_grad_(True) if grad else a


def _tuple(out) -> tuple:
    return tuple(out) if isinstance(out, tuple | list) else (out,)


def reference_outputs(spec: OpSpec, args: list, grad_pos: list[int], rng: torch.Generator):
    """``(outs, grads, cotangents)`` of the reference on ``args`` (float64 where ``spec.reference_float64``).
    ``cotangents[i]`` is a float32 N(0, 1) tensor for outputs with ``grad=True`` (None otherwise)."""
    ref_args = [_ref_arg(a, i in grad_pos, spec.reference_float64) for i, a in enumerate(args)]
    with torch.enable_grad() if grad_pos else torch.no_grad():
        outs = _tuple(spec.reference(*ref_args))
    cots = [torch.randn(o.shape, generator=rng) if (spec.differentiable and out.grad) else None
            for o, out in zip(outs, spec.outputs, strict=True)]
    grads = []
    if grad_pos and any(c is not None for c in cots):
        # an output without autograd history (an empty one, a constant) contributes a zero gradient
        pairs = [(o, c.to(o.dtype)) for o, c in zip(outs, cots, strict=True) if c is not None and o.requires_grad]
        gs = (torch.autograd.grad([o for o, _ in pairs], [ref_args[i] for i in grad_pos], [c for _, c in pairs],
                                  allow_unused=True) if pairs else [None] * len(grad_pos))
        grads = [torch.zeros_like(ref_args[i]) if g is None else g.detach() for g, i in zip(gs, grad_pos, strict=True)]
    return tuple(o.detach() for o in outs), grads, cots


def _expected_dtype(out: Output, dtype: torch.dtype, ref: torch.Tensor) -> torch.dtype | str:
    if out.dtype == "input":
        return dtype if ref.dtype.is_floating_point else ref.dtype
    return out.dtype


def _dtype_ok(got: torch.Tensor, want, mlx: bool) -> bool:
    if want == "int":
        return not got.dtype.is_floating_point and not got.is_complex() and got.dtype != torch.bool
    if want == FP8 and mlx:
        return got.dtype == torch.uint8  # runtime_mlx's FP8 convention: the e4m3 bit patterns
    return got.dtype == want


def _as_comparable(got: torch.Tensor, want) -> torch.Tensor:
    if want == FP8 and got.dtype == torch.uint8:  # MLX's FP8 bit patterns
        return got.view(FP8)
    if want == "int":
        return got.to(torch.int64)
    return got


def _equal_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """The fraction of elements that differ (bitwise for FP8, NaN equal to NaN)."""
    if got.dtype == FP8:
        got, ref = got.view(torch.uint8), ref.view(torch.uint8)
    if got.dtype.is_floating_point:
        same = (got.double() == ref.double()) | (got.isnan() & ref.isnan())
    else:
        same = got.to(torch.int64) == ref.to(torch.int64)
    return float((~same).sum()) / max(1, same.numel())


def _poison_buffer(ref: torch.Tensor, want, arrays):
    dt = torch.int64 if want == "int" else want
    buf = torch.full(ref.shape, float("nan")) if dt.is_floating_point else torch.full(ref.shape, -1)
    return arrays.put(buf.to(dt), False)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    line = f"{type(e).__name__}: {text[0] if text else ''}"
    return line if len(line) <= 240 else line[:240].rsplit(" ", 1)[0] + " ..."


def run_case(spec: OpSpec, fn: Callable, sample: Sample, dtype: torch.dtype, arrays, takes_out: bool = False,
             backward: bool = True) -> list[Row]:
    """Check ``fn`` on one sample at one dtype; returns the case's rows (see the module docstring)."""
    params = list(spec.params)
    shape, dname = sample.shape_str(), _dtype_name(dtype)

    def row(check, error=None, bound=None, passed=True, note=""):
        return Row(sample.name, shape, dname, check, error, bound, passed, note)

    args = cast_args(sample, params, dtype)
    grad_pos = [params.index(g) for g in spec.grads] if (backward and spec.differentiable) else []
    rng = spec.rng(f"{sample.name}/{dname}/cotangent")
    ref_outs, ref_grads, cots = reference_outputs(spec, args, grad_pos, rng)
    if not any(c is not None for c in cots):
        grad_pos = []

    dev_args = [arrays.put(a, i in grad_pos) if isinstance(a, torch.Tensor) else arrays.put_value(a)
                for i, a in enumerate(args)]
    before = [arrays.snapshot(a) if arrays.is_array(a) else None for a in dev_args]
    kwargs = {}
    wants = [_expected_dtype(o, dtype, r) for o, r in zip(spec.outputs, ref_outs, strict=True)]
    if takes_out:
        bufs = tuple(_poison_buffer(r, w, arrays) for r, w in zip(ref_outs, wants, strict=True))
        kwargs["out"] = bufs[0] if len(bufs) == 1 else bufs
    try:
        with poisoned_outputs():
            outs = arrays.call(fn, dev_args, kwargs, bool(grad_pos))
        arrays.sync()
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # SystemExit, asyncio.CancelledError ...: the candidate's, a failed case
        return [row("call", passed=False, note=_one_line(e))]
    if outs is None and takes_out:
        outs = kwargs["out"]
    outs = _tuple(outs)
    rows = []
    if len(outs) != len(spec.outputs):
        names = ", ".join(o.name for o in spec.outputs)
        return [row("outputs", passed=False, note=f"returned {len(outs)} output(s), expected {len(spec.outputs)} "
                                                   f"({names})")]

    got_cpu = []
    for o, spec_out, r, want in zip(outs, spec.outputs, ref_outs, wants, strict=True):
        if not arrays.is_array(o):
            hint = " (an mlx array: run with --device mlx)" if is_mx(o) else (
                " (a torch tensor: run with --device cpu/cuda/mps)" if isinstance(o, torch.Tensor) else "")
            rows.append(row(spec_out.name, passed=False, note=f"returned {type(o).__name__}{hint}, expected an "
                                                               f"array of shape {tuple(r.shape)}"))
            got_cpu.append(None)
            continue
        where = arrays.wrong_device(o)
        if where:
            rows.append(row(spec_out.name, passed=False, note=where))
            got_cpu.append(None)
            continue
        try:
            g = arrays.get(o)
        except Exception as e:
            rows.append(row(spec_out.name, passed=False, note=f"cannot read the output: {_one_line(e)}"))
            got_cpu.append(None)
            continue
        if tuple(g.shape) != tuple(r.shape):
            rows.append(row(spec_out.name, passed=False,
                            note=f"shape {tuple(g.shape)}, expected {tuple(r.shape)}"))
            got_cpu.append(None)
        elif not _dtype_ok(g, want, isinstance(arrays, _MLX)):
            expected = ("an integer dtype" if want == "int" else
                        "uint8 (e4m3 bits)" if want == FP8 and isinstance(arrays, _MLX) else _dtype_name(want))
            rows.append(row(spec_out.name, passed=False, note=f"dtype {_dtype_name(g.dtype)}, expected {expected}"))
            got_cpu.append(None)
        else:
            got_cpu.append(_as_comparable(g, want))
    if any(g is None for g in got_cpu):
        return rows

    for spec_out, g, r in zip(spec.outputs, got_cpu, ref_outs, strict=True):
        rows.append(_compare(row, spec_out.name, spec_out, g, r, dtype))

    if grad_pos:
        try:
            grads = arrays.grads(fn, dev_args, {}, grad_pos, outs, cots)  # no out=: its buffer has no graph
            arrays.sync()
        except KeyboardInterrupt:
            raise
        except BaseException as e:
            rows.append(row("backward", passed=False, note=_one_line(e)))
            grads = None
        if grads is not None:
            for i, g, r in zip(grad_pos, grads, ref_grads, strict=True):
                name = f"d{params[i]}"
                g = arrays.get(g)
                if tuple(g.shape) != tuple(r.shape):
                    rows.append(row(name, passed=False, note=f"shape {tuple(g.shape)}, expected {tuple(r.shape)}"))
                    continue
                want = args[i].dtype
                if g.dtype != want:
                    rows.append(row(name, passed=False, note=f"dtype {_dtype_name(g.dtype)}, expected "
                                                             f"{_dtype_name(want)} (the input's)"))
                    continue
                err, b = rel_err(g, r), BOUNDS[dtype]  # the precision of the computation, not of the input
                rows.append(row(name, err, b, err <= b, "" if err <= b else _why(err)))

    changed = [params[i] for i, (b, a) in enumerate(zip(before, dev_args, strict=True))
               if b is not None and not arrays.unchanged(b, a)]
    rows.append(row("inputs unchanged", passed=not changed,
                    note=f"wrote into {', '.join(changed)}" if changed else ""))
    return rows


def _why(err: float) -> str:
    return "NaN or Inf in the output" if err == float("inf") else "error above the bound"


def _compare(row, name: str, out: Output, got: torch.Tensor, ref: torch.Tensor, dtype) -> Row:
    if out.compare == "equal":
        frac = _equal_error(got, ref)
        n = round(frac * max(1, ref.numel()))
        return row(name, frac, 0.0, frac == 0.0, "" if frac == 0.0 else f"{n} of {ref.numel()} elements differ")
    bound = out.bound_for(dtype)
    if bound is None:
        bound = BOUNDS[dtype] if got.dtype.is_floating_point and dtype in BOUNDS else BOUNDS[got.dtype]
    err = rel_err(got, ref)
    return row(name, err, bound, err <= bound, "" if err <= bound else _why(err))


# ----------------------------------------------------------------------------- the battery


def run(spec: OpSpec, fn: Callable, device: str = "cpu", dtypes: Sequence[torch.dtype] | None = None,
        tags: Sequence[str] | None = None, backward: bool = True,
        progress: Callable[[list[Row]], None] | None = None) -> list[Row]:
    """Run the whole battery of ``spec`` on ``fn``: every sample (with a tag in ``tags``, if given) at every
    dtype of the spec (or of ``dtypes``), forward and, when ``backward`` and the op has gradients, backward.
    Returns the rows of every case; ``progress(rows)`` is called after each case. Raises `ImplError` for a
    candidate whose signature does not fit, ``ValueError`` for an unknown device or dtype."""
    arrays = arrays_for(device)
    takes_out = check_signature(spec, fn)
    if dtypes is not None:
        bad = [d for d in dtypes if d not in spec.dtypes]
        if bad:
            raise ValueError(f"{spec.name} is specified for {', '.join(map(_dtype_name, spec.dtypes))}; "
                             f"got {', '.join(map(_dtype_name, bad))}")
    rows: list[Row] = []
    selected = [(s, d) for s, d in spec.cases(dtypes) if not tags or set(tags) & set(s.tags)]
    if not selected:
        have = sorted({t for s, _ in spec.cases(dtypes) for t in s.tags})
        raise ValueError(f"{spec.name}: no sample has the tag(s) {', '.join(tags or [])} at these dtypes "
                         f"(its tags: {', '.join(have)})")
    for sample, dtype in selected:
        case_rows = run_case(spec, fn, sample, dtype, arrays, takes_out, backward)
        rows.extend(case_rows)
        if progress is not None:
            progress(case_rows)
    return rows


def failures(rows: Sequence[Row]) -> list[Row]:
    """The rows of ``rows`` that failed (an empty list: every check passed)."""
    return [r for r in rows if not r.passed]


def format_rows(rows: Sequence[Row]) -> str:
    """The rows as a fixed-width table: case, shape, dtype, check, error, bound, result (and why it failed)."""
    head = ("case", "shape", "dtype", "check", "error", "bound", "result")
    body = []
    for r in rows:
        err = "-" if r.error is None else ("inf" if r.error == float("inf") else f"{r.error:.2e}")
        bnd = "-" if r.bound is None else f"{r.bound:.1e}"
        res = "pass" if r.passed else f"FAIL {r.note}".rstrip()
        body.append((r.case, r.shape, r.dtype, r.check, err, bnd, res))
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths[:-1]) + "  {}"
    lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths[:-1]), "-" * 6)]
    lines += [fmt.format(*b) for b in body]
    return "\n".join(lines)
