"""The `rms_norm` op spec: ``y = x * rsqrt(mean(x**2) + eps) * weight`` over the last dim, forward and backward."""

from __future__ import annotations

import torch

from reference.rms_norm import rms_norm

from .shapes import V2_LITE, V3
from .spec import OpSpec, Output, Sample, randn, spread


def _gain(rng, h):
    return 1.0 + 0.5 * randn(rng, h)


def samples(rng: torch.Generator) -> list[Sample]:
    """The battery's samples of `rms_norm`, seeded by ``rng`` (`OpSpec.samples`)."""
    out = [
        Sample(f"ragged {shape}", (randn(rng, *shape), _gain(rng, shape[-1]), 1e-6), tags=("ragged",))
        for shape in [(2, 5, 100), (1, 33), (9, 3)]
    ]
    out += [
        Sample("rows spanning 1e-3..1e2", (spread(rng, 6, 260), _gain(rng, 260), 1e-5), tags=("edge",)),
        Sample("one decode token", (randn(rng, 1, 1, 96), _gain(rng, 96), 1e-6), tags=("decode",)),
        Sample("no rows", (randn(rng, 0, 64), _gain(rng, 64), 1e-6), tags=("edge",)),
    ]
    for m, width, what in [(V3, V3["hidden_size"], "hidden"), (V3, V3["q_lora_rank"], "q_a_layernorm"),
                           (V3, V3["kv_lora_rank"], "kv_a_layernorm"), (V2_LITE, V2_LITE["hidden_size"], "hidden")]:
        out.append(Sample(f"{m['name']} {what}", (randn(rng, 4, width), _gain(rng, width), 1e-6), tags=("model",)))
    return out


def bench_samples(rng: torch.Generator) -> list[Sample]:
    """The shapes ``dsfs bench`` times for `rms_norm` (`OpSpec.bench_samples`)."""
    return [Sample(f"{m['name']} hidden, {n} tokens", (randn(rng, n, m["hidden_size"]), _gain(rng, m["hidden_size"]),
                                                        1e-6), tags=("model",))
            for m in (V3, V2_LITE) for n in (1, 4096)]


def _bytes(s: Sample, dtype: torch.dtype) -> float:
    x, w = s.args[0], s.args[1]
    return (2 * x.numel() + w.numel()) * dtype.itemsize


def _torch_rms_norm(x, weight, eps=1e-6):
    """``torch.nn.functional.rms_norm`` in the op's signature."""
    return torch.nn.functional.rms_norm(x, (x.shape[-1],), weight, eps)


def _mlx_rms_norm():
    import mlx.core as mx

    return lambda x, weight, eps=1e-6: mx.fast.rms_norm(x, weight, eps)


SPEC = OpSpec(
    name="rms_norm", reference=rms_norm, outputs=(Output("y", grad=True),), grads=("x", "weight"),
    samples=samples, bench_samples=bench_samples,
    flops=lambda s, dtype: 4.0 * s.args[0].numel(), bytes=_bytes,
    ours={"cuda": "kernels.triton.rms_norm:rms_norm", "mlx": "runtime_mlx.kernels.rms_norm:rms_norm"},
    builtin={"torch": lambda: _torch_rms_norm, "mlx": _mlx_rms_norm},
    source="Zhang & Sennrich 2019; DeepSeek-V3 report section 2.1 (the norms of MLA and the blocks)",
)
