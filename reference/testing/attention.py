"""The `attention` op spec: ``softmax(q k^T * scale [+ causal mask]) v`` with grouped key/value heads (MHA, GQA,
MQA), qk head dim != v head dim, the causal mask aligned to the end of the keys (T <= S), forward and the
gradients of ``q``, ``k`` and ``v``.

Sizes are never multiples of 16 (the Triton kernel's interpreter blocks) nor, mostly, powers of two; head dims
192 and 128 are DeepSeek-V3's MLA prefill (``qk_head_dim = qk_nope_head_dim + qk_rope_head_dim``,
``v_head_dim``).
"""

from __future__ import annotations

import torch

from reference.attention import attention

from .shapes import V2_LITE, V3
from .spec import OpSpec, Output, Sample, randn


def _sample(rng, name, b, h, hk, t, s, dk, dv, causal=True, tags=()):
    q, k, v = randn(rng, b, h, t, dk), randn(rng, b, hk, s, dk), randn(rng, b, hk, s, dv)
    return Sample(name, (q, k, v, dk**-0.5, causal), shape=f"q {b}x{h}x{t}x{dk}, v {b}x{hk}x{s}x{dv}", tags=tags)


def samples(rng: torch.Generator) -> list[Sample]:
    """The battery's samples of `attention`, seeded by ``rng`` (`OpSpec.samples`)."""
    out = [_sample(rng, f"{kind} causal, T=21 < S=35 (prefill over a cache), Dk 48 Dv 24", b, h, hk, 21, 35, 48, 24,
                   tags=("ragged",))
           for kind, b, h, hk in [("MHA", 1, 2, 2), ("GQA 4/2", 1, 4, 2), ("MQA 3/1, batch 2", 2, 3, 1)]]
    out += [
        _sample(rng, "GQA 2/1 causal, T=S=33, Dv 40 > Dk 24", 1, 2, 1, 33, 33, 24, 40, tags=("ragged",)),
        _sample(rng, "GQA 4/2 non-causal, T=19 < S=29", 1, 4, 2, 19, 29, 20, 12, causal=False, tags=("ragged",)),
        _sample(rng, "MHA non-causal, T=23 > S=10", 1, 2, 2, 23, 10, 16, 16, causal=False, tags=("ragged", "edge")),
        _sample(rng, "GQA 4/2 decode, T=1 over S=37", 1, 4, 2, 1, 37, 48, 24, tags=("decode",)),
        _sample(rng, "MQA 4/1 one key, T=S=1", 1, 4, 1, 1, 1, 8, 8, tags=("edge",)),
    ]
    dk = V3["qk_nope_head_dim"] + V3["qk_rope_head_dim"]
    dv = V3["v_head_dim"]
    out.append(_sample(rng, f"{V3['name']} / {V2_LITE['name']} MLA prefill, Dk {dk} Dv {dv}, 2 of "
                            f"{V3['num_attention_heads']} heads, 18 tokens", 1, 2, 2, 18, 18, dk, dv, tags=("model",)))
    out.append(_sample(rng, f"{V3['name']} MLA prefill after a 7-token cache, Dk {dk} Dv {dv}, 2 heads, T=11 < S=18",
                       1, 2, 2, 11, 18, dk, dv, tags=("model",)))
    return out


def bench_samples(rng: torch.Generator) -> list[Sample]:
    """The shapes ``dsfs bench`` times for `attention` (`OpSpec.bench_samples`)."""
    dk, dv, n = V3["qk_nope_head_dim"] + V3["qk_rope_head_dim"], V3["v_head_dim"], 4096
    return [
        _sample(rng, f"{V3['name']} MLA prefill, {V3['num_attention_heads']} heads, {n} tokens", 1,
                V3["num_attention_heads"], V3["num_attention_heads"], n, n, dk, dv, tags=("model",)),
        _sample(rng, f"{V2_LITE['name']} MLA prefill, {V2_LITE['num_attention_heads']} heads, {n} tokens", 1,
                V2_LITE["num_attention_heads"], V2_LITE["num_attention_heads"], n, n, dk, dv, tags=("model",)),
        _sample(rng, f"GQA 32/8 head dim 128, {n} tokens", 1, 32, 8, n, n, 128, 128, tags=("model",)),
    ]


def _pairs(t: int, s: int, causal: bool) -> int:
    """Visible (query, key) pairs: query i sees keys 0 .. i + S - T when causal."""
    return t * (s - t + 1) + t * (t - 1) // 2 if causal else t * s


def _flops(sample: Sample, dtype: torch.dtype) -> float:
    q, k, v, _, causal = sample.args
    b, h, t, dk = q.shape
    return 2.0 * b * h * _pairs(t, k.shape[2], causal) * (dk + v.shape[3])


def _bytes(sample: Sample, dtype: torch.dtype) -> float:
    q, k, v = sample.args[:3]
    o = q.numel() // q.shape[3] * v.shape[3]
    return (q.numel() + k.numel() + v.numel() + o) * dtype.itemsize


def _torch_attention():
    """``F.scaled_dot_product_attention`` in the op's signature: ``is_causal`` only for T == S (PyTorch aligns its
    causal mask to the start of the keys), an explicit mask aligned to their end otherwise; ``enable_gqa`` for
    grouped heads."""
    import torch.nn.functional as F

    def f(q, k, v, scale, causal=True):
        t, s = q.shape[2], k.shape[2]
        mask = None
        if causal and t != s:
            mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(s - t)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and t == s, scale=scale,
                                              enable_gqa=k.shape[1] != q.shape[1])

    return f


def _mlx_attention():
    """``mx.fast.scaled_dot_product_attention`` in the op's signature (its "causal" mask is aligned to the end of
    the keys; grouped heads natively)."""
    import mlx.core as mx

    def f(q, k, v, scale, causal=True):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal" if causal else None)

    return f


SPEC = OpSpec(
    name="attention", reference=attention, outputs=(Output("o", grad=True),), grads=("q", "k", "v"),
    samples=samples, bench_samples=bench_samples, flops=_flops, bytes=_bytes,
    ours={"cuda": "kernels.triton.attention:attention", "mlx": "runtime_mlx.attention:attention"},
    builtin={"torch": _torch_attention, "mlx": _mlx_attention},
    source="Vaswani et al. 2017 section 3.2.1; FlashAttention-2 (Dao 2023); GQA (Ainslie et al. 2023); "
           "DeepSeek-V3 report section 2.1.1 (MLA prefill head dims)",
)
