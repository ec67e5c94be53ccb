"""Multi-head Latent Attention (MLA), DeepSeek-V3 report section 2.1.1, in MLX (mirrors `reference.mla`).

The latent ``c_kv = RMSNorm(W_DKV h)`` (kv_lora_rank wide) and one decoupled RoPE key ``k_pe`` shared by all
heads are all a layer caches. Two equal forms:
- naive (prefill, training): up-project the latent with ``kv_b_proj`` into per-head keys and values, then
  ``mx.fast.scaled_dot_product_attention``;
- absorbed (decode): ``W_UK`` folded into the query, ``W_UV`` into the output, attention over the latent itself
  (report eq. 1-11) through `runtime_mlx.kernels.mla_decode`.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from reference.config import ModelConfig

from . import kernels
from .attention import attend
from .checkpoint import linear_weight
from .rms_norm import RMSNorm
from .rope import RoPE


class MLA(nn.Module):
    """MLA layer (B, T, hidden) -> (B, T, hidden) with Hugging Face parameter names (``q_proj`` or
    ``q_a_proj``/``q_a_layernorm``/``q_b_proj``, ``kv_a_proj_with_mqa``, ``kv_a_layernorm``, ``kv_b_proj``,
    ``o_proj``). ``absorb``: None uses the absorbed form when decoding with a cache and one new token, else
    naive; True/False forces a form. Softmax scale ``qk_head_dim**-0.5 * mscale**2`` (YaRN)."""

    def __init__(self, config: ModelConfig, layer_idx: int, rope: RoPE):
        super().__init__()
        c = config
        self.layer_idx = layer_idx
        self.n_heads = c.num_attention_heads
        self.dn, self.dr, self.dv, self.r = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank
        self.interleaved = c.rope_interleave
        self.scale = c.softmax_scale(c.qk_head_dim)
        self.absorb: bool | None = None
        self.rope = rope
        self.q_lora_rank = c.q_lora_rank
        if c.q_lora_rank is None:
            self.q_proj = nn.Linear(c.hidden_size, self.n_heads * c.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(c.hidden_size, c.q_lora_rank, bias=c.attention_bias)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank)
            self.q_b_proj = nn.Linear(c.q_lora_rank, self.n_heads * c.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(c.hidden_size, self.r + self.dr, bias=c.attention_bias)
        self.kv_a_layernorm = RMSNorm(self.r)
        self.kv_b_proj = nn.Linear(self.r, self.n_heads * (self.dn + self.dv), bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.dv, c.hidden_size, bias=c.attention_bias)

    def project(self, x: mx.array, offset: int):
        """Queries and latent of the new tokens: ``q_nope`` (B, H, T, dn), ``q_pe`` (B, H, T, dr) rotated,
        ``c_kv`` (B, T, r) normalized, ``k_pe`` (B, T, dr) rotated, and the query latent (B, T, q_lora_rank)
        or None."""
        b, t, _ = x.shape
        q_latent = None
        if self.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q_latent = self.q_a_layernorm(self.q_a_proj(x))
            q = self.q_b_proj(q_latent)
        q = q.reshape(b, t, self.n_heads, self.dn + self.dr).transpose(0, 2, 1, 3)
        q_nope, q_pe = q[..., : self.dn], q[..., self.dn :]
        kv = self.kv_a_proj_with_mqa(x)
        c_kv = self.kv_a_layernorm(kv[..., : self.r])
        q_pe = self.rope(q_pe, offset, self.interleaved)
        k_pe = self.rope(kv[..., self.r :], offset, self.interleaved)
        return q_nope, q_pe, c_kv, k_pe, q_latent

    def _w_uk_uv(self):
        w = linear_weight(self.kv_b_proj).reshape(self.n_heads, self.dn + self.dv, self.r)  # FP8: dequantized
        return w[:, : self.dn], w[:, self.dn :]  # (H, dn, r), (H, dv, r)

    def attend_naive(self, q_nope, q_pe, c_kv, k_pe, mask):
        """Up-project the latent (B, S, r) into keys (B, H, S, dn+dr) and values (B, H, S, dv), then attend.
        Returns (B, H, T, dv)."""
        b, s, _ = c_kv.shape
        kv = self.kv_b_proj(c_kv).reshape(b, s, self.n_heads, self.dn + self.dv).transpose(0, 2, 1, 3)
        k_pe = mx.broadcast_to(k_pe[:, None], (b, self.n_heads, s, self.dr))
        k = mx.concatenate([kv[..., : self.dn], k_pe], axis=-1)
        q = mx.concatenate([q_nope, q_pe], axis=-1)
        return self.attend(q, k, kv[..., self.dn :], mask)

    def attend_absorbed(self, q_nope, q_pe, c_kv, k_pe, mask):
        """Attend over the latent: ``q_nope W_UK`` against ``c_kv`` plus ``q_pe`` against ``k_pe`` (one shared
        key head), output latent through ``W_UV``. Without a ``mask`` (DSA's selection or a padded batch's mask)
        this is `runtime_mlx.kernels.mla_decode` (forward only: decode), else `attend` over the latent. Returns
        (B, H, T, dv)."""
        w_uk, w_uv = self._w_uk_uv()
        q_lat = q_nope @ w_uk  # (B, H, T, dn) @ (H, dn, r) -> (B, H, T, r)
        if mask is None:  # causal, aligned to the end of the cache
            o_lat = kernels.mla_decode(q_lat, q_pe, c_kv, k_pe, self.scale)
        else:
            q = mx.concatenate([q_lat, q_pe], axis=-1)
            k = mx.concatenate([c_kv, k_pe], axis=-1)[:, None]
            o_lat = self.attend(q, k, c_kv[:, None], mask)
        return o_lat @ w_uv.swapaxes(-1, -2)  # (B, H, T, r) @ (H, r, dv)

    def attend(self, q, k, v, mask):
        """Softmax attention with this layer's scale, ``q`` (B, H, T, Dk), ``k`` (B, Hk, S, Dk), ``v`` (B, Hk, S,
        Dv) -> (B, H, T, Dv): `runtime_mlx.attention.attend` (``mask`` None: causal, aligned to the end of the
        keys). DSA overrides it to attend over its selection."""
        return attend(q, k, v, mask, self.scale)

    def select_mask(self, x, q_latent, cache, offset, mask=None):
        """Hook for sparse attention (DSA): the selection `attend` takes. MLA attends to every visible key: returns
        ``mask``, None (causal) or a padded batch's (B, 1, T, S) boolean mask."""
        return mask

    def __call__(self, x: mx.array, cache=None, offset: int = 0, mask: mx.array | None = None) -> mx.array:
        """``x`` (B, T, hidden) at positions ``offset ..``; ``cache`` a `runtime_mlx.cache.LayerCache` holding
        ``c_kv`` and ``k_pe``, or None; ``mask`` None (no padding: causal) or a padded batch's (B, 1, T, S)
        boolean mask (`runtime_mlx.attention.padding_mask`)."""
        b, t, _ = x.shape
        q_nope, q_pe, c_kv, k_pe, q_latent = self.project(x, offset)
        if cache is not None:
            c_kv, k_pe = cache.update(c_kv=c_kv, k_pe=k_pe)
        mask = self.select_mask(x, q_latent, cache, offset, mask)  # None: causal, aligned to the end of the cache
        absorb = self.absorb if self.absorb is not None else (cache is not None and t == 1)
        fn = self.attend_absorbed if absorb else self.attend_naive
        o = fn(q_nope, q_pe, c_kv, k_pe, mask)
        return self.o_proj(o.transpose(0, 2, 1, 3).reshape(b, t, self.n_heads * self.dv))
