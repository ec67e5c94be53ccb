"""The `mla_decode` op spec: absorbed MLA attention over the latent cache (between ``W_UK`` and ``W_UV``), forward
only, causal with the T new queries aligned to the end of the S cached positions.

Samples: one decode step (T = 1) at ragged cache lengths, a few new tokens (T = 3: MTP / speculative
verification), a prefill through the absorbed form (S = T), a single cached key, query rows spanning many binades,
latent and RoPE widths that are not powers of two, and DeepSeek-V3 / V2-Lite's absorbed dims with all their
heads (r = 512, dr = 64; 128 and 16 heads) over short caches.
"""

from __future__ import annotations

import torch

from reference.attention import causal_mask
from reference.mla import latent_qkv, mla_decode

from .shapes import V2_LITE, V3
from .spec import OpSpec, Output, Sample, randn, spread


def _inputs(rng, b, h, t, s, r, dr, q=randn) -> tuple:
    """``(q_latent, q_pe, c_kv, k_pe, scale)`` with the scale of a head of ``r + dr`` features."""
    return (q(rng, b, h, t, r), q(rng, b, h, t, dr), randn(rng, b, s, r), randn(rng, b, s, dr), (r + dr) ** -0.5)


def _model(rng, m: dict, heads: int, t: int, s: int) -> tuple:
    """Absorbed MLA of model ``m``: r = kv_lora_rank, dr = qk_rope_head_dim, scale qk_head_dim**-0.5 (the
    softmax scale without YaRN's mscale)."""
    r, dr = m["kv_lora_rank"], m["qk_rope_head_dim"]
    *x, _ = _inputs(rng, 1, heads, t, s, r, dr)
    return (*x, (m["qk_nope_head_dim"] + dr) ** -0.5)


def _shape(b, h, t, s, r, dr) -> str:
    return f"B{b} H{h} T{t} S{s} r{r} dr{dr}"


def samples(rng: torch.Generator) -> list[Sample]:
    """The battery's samples of `mla_decode`, seeded by ``rng`` (`OpSpec.samples`)."""
    out = []
    for name, (b, h, t, s, r, dr), tags in [
        ("one decode step, S=45", (2, 5, 1, 45, 40, 12), ("decode", "ragged")),
        ("one decode step, S=33", (1, 3, 1, 33, 24, 8), ("decode", "ragged")),
        ("one decode step, one cached key", (1, 4, 1, 1, 20, 6), ("decode", "edge")),
        ("3 new tokens (MTP / speculative), S=45", (2, 5, 3, 45, 40, 12), ("decode", "ragged")),
        ("3 new tokens, S=33", (1, 3, 3, 33, 24, 8), ("ragged",)),
        ("prefill through the absorbed form, S=T=19", (1, 3, 19, 19, 40, 12), ("edge", "ragged")),
    ]:
        out.append(Sample(name, _inputs(rng, b, h, t, s, r, dr), shape=_shape(b, h, t, s, r, dr), tags=tags))
    out.append(Sample("query rows spanning 1e-3..1e2, T=2, S=37", _inputs(rng, 2, 4, 2, 37, 40, 12, q=spread),
                      shape=_shape(2, 4, 2, 37, 40, 12), tags=("edge",)))
    for m, heads, t, s in [(V3, V3["num_attention_heads"], 1, 130), (V3, V3["num_attention_heads"], 2, 141),
                           (V2_LITE, V2_LITE["num_attention_heads"], 1, 117)]:
        of = f"{heads} of {m['num_attention_heads']} heads" if heads < m["num_attention_heads"] else f"{heads} heads"
        out.append(Sample(f"{m['name']} absorbed, {of}, T={t} S={s}", _model(rng, m, heads, t, s),
                          shape=_shape(1, heads, t, s, m["kv_lora_rank"], m["qk_rope_head_dim"]),
                          tags=("model", "decode")))
    return out


def bench_samples(rng: torch.Generator) -> list[Sample]:
    """The shapes ``dsfs bench`` times for `mla_decode` (`OpSpec.bench_samples`)."""
    out = []
    for m, b, t, s in [(V3, 1, 1, 4096), (V3, 16, 1, 4096), (V3, 16, 2, 4096), (V2_LITE, 16, 1, 4096)]:
        h = m["num_attention_heads"]
        r, dr = m["kv_lora_rank"], m["qk_rope_head_dim"]
        *x, _ = _inputs(rng, b, h, t, s, r, dr)
        out.append(Sample(f"{m['name']} absorbed decode, batch {b}, {t} new token(s), {s} cached",
                          (*x, (m["qk_nope_head_dim"] + dr) ** -0.5), shape=_shape(b, h, t, s, r, dr),
                          tags=("model", "decode")))
    return out


def _visible_pairs(s: Sample) -> int:
    """(query, key) pairs the causal mask lets through, over batch and heads."""
    b, h, t, _ = s.args[0].shape
    n = s.args[2].shape[1]
    return b * h * sum(n - t + i + 1 for i in range(t))


def _flops(s: Sample, dtype: torch.dtype) -> float:
    r, dr = s.args[0].shape[-1], s.args[1].shape[-1]
    return 2.0 * _visible_pairs(s) * (2 * r + dr)  # scores over r + dr, then P @ c_kv over r


def _bytes(s: Sample, dtype: torch.dtype) -> float:
    q_latent = s.args[0]
    return (sum(a.numel() for a in s.args[:4]) + q_latent.numel()) * dtype.itemsize


def _torch_sdpa():
    """``torch.nn.functional.scaled_dot_product_attention`` over the latent: one key/value head (GQA)."""
    import torch.nn.functional as F

    def mla_decode_sdpa(q_latent, q_pe, c_kv, k_pe, scale):
        t, s = q_latent.shape[2], c_kv.shape[1]
        q, k, v = latent_qkv(q_latent, q_pe, c_kv, k_pe)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(t, s, s - t, q.device), scale=scale,
                                              enable_gqa=True)

    return mla_decode_sdpa


def _mlx_sdpa():
    """``mx.fast.scaled_dot_product_attention`` over the latent (its ``"causal"`` mask is aligned to the end)."""
    import mlx.core as mx

    def mla_decode_sdpa(q_latent, q_pe, c_kv, k_pe, scale):
        q = mx.concatenate([q_latent, q_pe], axis=-1)
        k = mx.concatenate([c_kv, k_pe], axis=-1)[:, None]
        return mx.fast.scaled_dot_product_attention(q, k, c_kv[:, None], scale=scale, mask="causal")

    return mla_decode_sdpa


SPEC = OpSpec(
    name="mla_decode", reference=mla_decode, outputs=(Output("o"),),
    samples=samples, bench_samples=bench_samples, flops=_flops, bytes=_bytes,
    ours={"cuda": "kernels.triton.mla:mla_decode", "mlx": "runtime_mlx.kernels.mla:mla_decode"},
    builtin={"torch": _torch_sdpa, "mlx": _mlx_sdpa},
    source="DeepSeek-V2 section 2.1; DeepSeek-V3 report section 2.1.1 (eq. 1-11), 'absorb' in DeepSeek's inference "
           "code",
)
