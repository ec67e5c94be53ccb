"""Op specs: what a kernel must compute, on which inputs, in which dtypes, within which bounds.

After PyTorch's OpInfo: one `OpSpec` per op of DESIGN.md's kernel inventory holds the reference function (the
definition of correct), the signature a candidate must have (our kernels' signature, the same in every
backend), seeded sample inputs (ragged sizes, edge cases, one decode step, slices of real models' shapes), the
dtypes it must support, the outputs and which of them carry gradients to which inputs, and the FLOP and byte
counts `dsfs bench` turns into TFLOP/s and GB/s. `reference.testing.battery` runs a spec against a candidate;
the project's own tests and ``dsfs check`` / ``dsfs bench`` all read the same specs.
"""

from __future__ import annotations

import inspect
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

FLOATS = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Output:
    """One output of an op.

    ``dtype``: ``"input"`` (the float dtype under test), ``"int"`` (any integer dtype: the reference and Triton
    return int64, MLX int32), or a torch dtype (``torch.float32`` for scores computed in float32 whatever the
    input). ``compare``: ``"close"`` (`tolerance.rel_err` against the float64 reference, within the dtype's
    bound or ``bound``) or ``"equal"`` (exactly equal: indices, FP8 bits). ``grad``: a cotangent is drawn for
    this output in the backward check.
    """

    name: str
    dtype: str | torch.dtype = "input"
    compare: str = "close"
    grad: bool = False
    bound: float | dict | None = None

    def bound_for(self, dtype: torch.dtype) -> float | None:
        """This output's bound at ``dtype``: ``bound`` (a number, or a dict by dtype), else None (the
        dtype's default)."""
        if isinstance(self.bound, dict):
            return self.bound.get(dtype)
        return self.bound


@dataclass
class Sample:
    """One set of inputs: ``args`` in the order of the op's parameters (CPU tensors and Python values).

    Float32 tensors are cast to the dtype under test, except those named in ``keep`` (an fp32 gain beside bf16
    activations, FP8 scales); integer, boolean and FP8 tensors are passed as they are. ``dtypes`` restricts the
    sample to some of the spec's dtypes (None: all). ``shape`` is the table's shape column (default: the first
    tensor argument's shape); ``tags`` name what the sample exercises (``ragged``, ``edge``, ``decode``,
    ``model``) and ``--cases`` filters on them.
    """

    name: str
    args: tuple
    keep: tuple[str, ...] = ()
    dtypes: tuple[torch.dtype, ...] | None = None
    shape: str | None = None
    tags: tuple[str, ...] = ()

    def shape_str(self) -> str:
        if self.shape is not None:
            return self.shape
        for a in self.args:
            if isinstance(a, torch.Tensor):
                return "x".join(str(d) for d in a.shape) or "scalar"
        return "-"


@dataclass
class OpSpec:
    """Everything needed to test and time one op (see the module docstring).

    ``reference``: the plain-PyTorch function, called with float64 inputs (``reference_float64``) or the inputs as
    the candidate gets them. ``params``: the parameter names of the signature, in order (the reference's own, so the
    table and ``--list`` print it). ``grads``: the parameters that get a gradient (empty: forward only); outputs
    with ``grad=True`` get a random cotangent. ``samples(rng)``: the battery's inputs; ``bench_samples(rng)``: the
    realistic shapes ``dsfs bench`` times. ``flops(sample, dtype)`` / ``bytes(sample, dtype)``: work and memory
    traffic of one forward call (bytes read and written once, the roofline minimum). ``ours``: backend (``cuda``,
    ``mlx``) -> ``module:function`` of our implementation; ``builtin``: backend (``torch``, ``mlx``) -> a function
    returning a library's own op wrapped to the op's signature (imported when called), timed by ``dsfs bench``.
    ``source``: the paper section or code it follows.
    """

    name: str
    reference: Callable
    outputs: tuple[Output, ...]
    samples: Callable[[torch.Generator], list[Sample]]
    dtypes: tuple[torch.dtype, ...] = FLOATS
    grads: tuple[str, ...] = ()
    params: tuple[str, ...] | None = None
    bench_samples: Callable[[torch.Generator], list[Sample]] | None = None
    reference_float64: bool = True
    flops: Callable[[Sample, torch.dtype], float] | None = None
    bytes: Callable[[Sample, torch.dtype], float] | None = None
    ours: dict[str, str] = field(default_factory=dict)
    builtin: dict[str, Callable[[], Callable]] = field(default_factory=dict)
    source: str = ""

    def __post_init__(self):
        if self.params is None:
            self.params = tuple(inspect.signature(self.reference).parameters)

    @property
    def signature(self) -> str:
        """``name(p1, p2, p3=default)``: the reference's parameters with their defaults."""
        sig = inspect.signature(self.reference)
        parts = []
        for p in list(sig.parameters.values())[: len(self.params)]:
            parts.append(p.name if p.default is inspect.Parameter.empty else f"{p.name}={p.default!r}")
        return f"{self.name}({', '.join(parts)})"

    @property
    def differentiable(self) -> bool:
        return bool(self.grads)

    def rng(self, salt: str = "") -> torch.Generator:
        """A generator seeded from the op's name (and ``salt``): the same inputs on every run and machine."""
        return torch.Generator().manual_seed(zlib.crc32(f"{self.name}/{salt}".encode()))

    def cases(self, dtypes: Sequence[torch.dtype] | None = None,
              bench: bool = False) -> list[tuple[Sample, torch.dtype]]:
        """``(sample, dtype)`` pairs of the battery (or of the bench shapes), restricted to ``dtypes``."""
        make = self.bench_samples if bench and self.bench_samples is not None else self.samples
        out = []
        for s in make(self.rng("bench" if bench else "")):
            for d in self.dtypes:
                if (dtypes is None or d in dtypes) and (s.dtypes is None or d in s.dtypes):
                    out.append((s, d))
        return out


def randn(rng: torch.Generator, *shape, scale: float = 1.0) -> torch.Tensor:
    """float32 N(0, scale**2) of ``shape`` from ``rng`` (on the CPU)."""
    return torch.randn(*shape, generator=rng) * scale


def randint(rng: torch.Generator, low: int, high: int, *shape) -> torch.Tensor:
    """int64 uniform in [low, high) of ``shape`` from ``rng``."""
    return torch.randint(low, high, shape, generator=rng)


def spread(rng: torch.Generator, *shape) -> torch.Tensor:
    """N(0, 1) scaled by a different power of ten (1e-3 .. 1e2) per row, so tiles span many binades."""
    x = torch.randn(*shape, generator=rng)
    return x * 10.0 ** torch.randint(-3, 3, (*shape[:-1], 1), generator=rng).float()
