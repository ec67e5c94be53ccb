"""The `swiglu` op spec: ``y = silu(gate) * up`` elementwise, forward and the gradients of ``gate`` and ``up``."""

from __future__ import annotations

import torch

from reference.swiglu import swiglu

from .shapes import V2_LITE, V3
from .spec import OpSpec, Output, Sample, randn


def _gate(rng, *shape):
    """Gates spanning about +-9, so sigmoid's flat tails are hit."""
    return randn(rng, *shape, scale=3.0)


def samples(rng: torch.Generator) -> list[Sample]:
    # 630, 3000 = 2 * 1024 + 952 and 333 elements: never a multiple of a 1024- or 256-element block.
    """The battery's samples of `swiglu`, seeded by ``rng`` (`OpSpec.samples`)."""
    out = [Sample(f"ragged {shape}", (_gate(rng, *shape), randn(rng, *shape)), tags=("ragged",))
           for shape in [(3, 7, 30), (2, 1500), (1, 333)]]
    big = torch.linspace(-30.0, 30.0, 7 * 130).reshape(7, 130)
    big[0, :4] = torch.tensor([-100.0, 100.0, -89.0, 89.0])  # exp(89) overflows float32
    out += [
        Sample("gates up to +-30 (and +-100): exp overflow", (big[:, torch.randperm(130, generator=rng)].contiguous(),
                                                               randn(rng, 7, 130)), tags=("edge",)),
        Sample("one token (1, 1, 2048)", (_gate(rng, 1, 1, 2048), randn(rng, 1, 1, 2048)), tags=("decode",)),
        Sample("no tokens (0, 64)", (_gate(rng, 0, 64), randn(rng, 0, 64)), tags=("edge",)),
    ]
    for m, width, what, n in [(V3, V3["moe_intermediate_size"], "expert", 4), (V3, V3["intermediate_size"], "dense", 2),
                              (V2_LITE, V2_LITE["moe_intermediate_size"], "expert", 4)]:
        out.append(Sample(f"{m['name']} {what} FFN width {width}, {n} tokens",
                          (_gate(rng, n, width), randn(rng, n, width)), tags=("model",)))
    return out


def bench_samples(rng: torch.Generator) -> list[Sample]:
    """The shapes ``dsfs bench`` times for `swiglu` (`OpSpec.bench_samples`)."""
    n = 4096
    return [Sample(f"{m['name']} {what} FFN, {n} tokens", (_gate(rng, n, width), randn(rng, n, width)), tags=("model",))
            for m, width, what in [(V3, V3["moe_intermediate_size"], "expert"), (V3, V3["intermediate_size"], "dense"),
                                   (V2_LITE, V2_LITE["moe_intermediate_size"], "expert")]]


def _torch_swiglu():
    """Eager PyTorch (no fused SwiGLU op exists): ``F.silu(gate) * up``."""
    return lambda gate, up: torch.nn.functional.silu(gate) * up


def _mlx_swiglu():
    """Eager MLX (no fused SwiGLU op exists): ``nn.silu(gate) * up``."""
    import mlx.nn as nn

    return lambda gate, up: nn.silu(gate) * up


SPEC = OpSpec(
    name="swiglu", reference=swiglu, outputs=(Output("y", grad=True),), grads=("gate", "up"),
    samples=samples, bench_samples=bench_samples,
    flops=lambda s, dtype: 5.0 * s.args[0].numel(),  # exp, add, divide (sigmoid), two multiplies
    bytes=lambda s, dtype: 3.0 * s.args[0].numel() * dtype.itemsize,
    ours={"cuda": "kernels.triton.swiglu:swiglu", "mlx": "runtime_mlx.kernels.swiglu:swiglu"},
    builtin={"torch": _torch_swiglu, "mlx": _mlx_swiglu},
    source="Shazeer 2020, GLU Variants Improve Transformer (equation 6); DeepSeek-V3 report section 2.1.2 (FFN)",
)
