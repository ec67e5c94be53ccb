"""The `rope` op spec: rotate ``x`` (..., T, D) by rows ``offset .. offset+T-1`` of given ``cos``/``sin`` tables,
interleaved pairs (DeepSeek-V3 MLA) or NeoX pairs (the V3.2 indexer), forward and the gradient of ``x``.

Every shape is sampled with both pairings, so a candidate that pairs the wrong elements fails. The tables are
float32 whatever ``x``'s dtype (``keep``): the kernel reads them in any float dtype and computes in float32.
"""

from __future__ import annotations

import torch

from reference.rope import RotaryEmbedding, rope

from .shapes import V3, V32
from .spec import OpSpec, Output, Sample, randn

THETA = 10000.0
# DeepSeek-V3's rope_scaling (config.json): amplitude mscale(40, 1) / mscale(40, 1) = 1.
V3_YARN = {"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1,
           "mscale": 1.0, "mscale_all_dim": 1.0}
# A small YaRN table whose amplitude is not 1 (mscale_all_dim != mscale), so a candidate that renormalizes cos/sin
# or rebuilds them from frequencies fails.
SMALL_YARN = {"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1,
              "mscale": 1.0, "mscale_all_dim": 0.707}
PAIRINGS = ((True, "interleaved"), (False, "neox"))


def _table(dim: int, rows: int, scaling: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 cos, sin (rows, dim/2) for positions 0 .. rows-1."""
    return RotaryEmbedding(dim, THETA, scaling)(rows)


def _both(name: str, x: torch.Tensor, table, offset: int, tags: tuple[str, ...]) -> list[Sample]:
    cos, sin = table
    return [Sample(f"{name} {pairing}", (x, cos, sin, interleaved, offset), keep=("cos", "sin"), tags=tags)
            for interleaved, pairing in PAIRINGS]


def samples(rng: torch.Generator) -> list[Sample]:
    """The battery's samples of `rope`, seeded by ``rng`` (`OpSpec.samples`)."""
    out = []
    # D/2 of 10, 64 and 3 (not all powers of two); 39 rows of D = 128 leave the Triton kernel's 32-row block partial.
    for shape in [(2, 3, 7, 20), (3, 13, 128), (5, 3, 6)]:
        out += _both(f"ragged {shape}", randn(rng, *shape), _table(shape[-1], shape[-2]), 0, ("ragged",))
    out += _both("decode at 37, last table row (2, 4, 1, 64)", randn(rng, 2, 4, 1, 64), _table(64, 38), 37,
                 ("decode",))
    yarn = _table(12, 50, SMALL_YARN)
    out += _both("YaRN amplitude 1.09, offset 31 (2, 4, 18, 12)", randn(rng, 2, 4, 18, 12), yarn, 31, ("edge",))
    out += _both("YaRN amplitude 1.09, decode at 49 (2, 4, 1, 12)", randn(rng, 2, 4, 1, 12), yarn, 49,
                 ("edge", "decode"))
    out += _both("no heads (2, 0, 5, 8)", randn(rng, 2, 0, 5, 8), _table(8, 5), 0, ("edge",))
    r = V3["qk_rope_head_dim"]
    v3 = _table(r, 8, V3_YARN)
    out += _both(f"{V3['name']} MLA q_pe, {V3['num_attention_heads']} heads, 3 tokens at 5",
                 randn(rng, 1, V3["num_attention_heads"], 3, r), v3, 5, ("model",))
    out += _both(f"{V3['name']} MLA k_pe, 1 shared head, 3 tokens at 5", randn(rng, 1, 1, 3, r), v3, 5, ("model",))
    out += _both(f"{V32['name']} indexer q rope dims ({r} of {V32['index_head_dim']}), "
                 f"{V32['index_n_heads']} heads, 3 tokens", randn(rng, 1, V32["index_n_heads"], 3, r), v3, 0,
                 ("model",))
    return out


def bench_samples(rng: torch.Generator) -> list[Sample]:
    """The shapes ``dsfs bench`` times for `rope` (`OpSpec.bench_samples`)."""
    r, n = V3["qk_rope_head_dim"], 4096
    table = _table(r, n, V3_YARN)
    out = [Sample(f"{V3['name']} MLA q_pe, {n} tokens", (randn(rng, 1, V3["num_attention_heads"], n, r), *table, True,
                                                        0), keep=("cos", "sin"), tags=("model",)),
           Sample(f"{V3['name']} MLA k_pe, {n} tokens", (randn(rng, 1, 1, n, r), *table, True, 0), keep=("cos", "sin"),
                  tags=("model",)),
           Sample(f"{V32['name']} indexer q (NeoX), {n} tokens", (randn(rng, 1, V32["index_n_heads"], n, r), *table,
                                                                   False, 0), keep=("cos", "sin"), tags=("model",)),
           Sample(f"{V3['name']} MLA q_pe, decode at {n - 1}", (randn(rng, 1, V3["num_attention_heads"], 1, r), *table,
                                                               True, n - 1), keep=("cos", "sin"), tags=("decode",))]
    return out


def _bytes(s: Sample, dtype: torch.dtype) -> float:
    x, cos = s.args[0], s.args[1]
    rows = x.shape[-2]
    return 2 * x.numel() * dtype.itemsize + 2 * rows * cos.shape[1] * cos.dtype.itemsize


SPEC = OpSpec(
    name="rope", reference=rope, outputs=(Output("y", grad=True),), grads=("x",),
    samples=samples, bench_samples=bench_samples,
    flops=lambda s, dtype: 3.0 * s.args[0].numel(),  # per pair: 4 multiplies, 2 adds
    bytes=_bytes,
    ours={"cuda": "kernels.triton.rope:rope"},
    # No builtin: torch has no RoPE op, and mx.fast.rope builds its angles from frequencies and positions
    # (base or freqs, offset), so it cannot apply arbitrary given cos/sin tables (nor fold in an amplitude).
    source="Su et al. 2021 (RoFormer) section 3.4; DeepSeek-V3 report section 2.1.1 (decoupled RoPE, YaRN)",
)
