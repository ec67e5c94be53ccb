"""Multi-head Latent Attention (MLA), DeepSeek-V2 section 2.1 / DeepSeek-V3 report section 2.1.1.

Keys and values are compressed into a latent ``c_kv = RMSNorm(W_DKV h)`` of width ``kv_lora_rank``; one
decoupled RoPE key ``k_pe`` (width ``qk_rope_head_dim``) is shared by all heads. Queries come from
``q_proj`` (``q_lora_rank`` null) or from the low-rank path ``q_b_proj(RMSNorm(q_a_proj(h)))``.

Two equal forms (tested equal):
- naive: up-project the latent with ``kv_b_proj`` into per-head keys (nope part) and values, then attend;
- absorbed: fold ``W_UK`` into the query and ``W_UV`` into the output, and attend over the latent itself, so
  the cache holds only ``c_kv`` and ``k_pe`` per token (report eq. 1-11, "absorb" in DeepSeek's inference code).
"""

from __future__ import annotations

import torch
from torch import nn

from .attention import AttentionOps, attend, causal_mask
from .config import ModelConfig
from .fp8_checkpoint import linear_weight
from .fp8_training import shared_input_linears
from .rms_norm import RMSNorm


def latent_qkv(q_latent: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor):
    """The absorbed form's attention operands: queries ``[q_latent, q_pe]`` (B, H, T, r+dr), one key head
    ``[c_kv, k_pe]`` (B, 1, S, r+dr) shared by all query heads (MQA over the latent) and one value head ``c_kv``
    (B, 1, S, r)."""
    q = torch.cat((q_latent, q_pe), dim=-1)
    k = torch.cat((c_kv, k_pe), dim=-1)[:, None]
    return q, k, c_kv[:, None]


def mla_decode(q_latent: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor,
               scale: float) -> torch.Tensor:
    """Absorbed MLA attention over the latent cache, the op of `kernels.triton.mla.mla_decode` and
    `runtime_mlx.kernels.mla.mla_decode`: `MLA.attend_absorbed` between ``W_UK`` and ``W_UV``.

    ``o[b, h, t] = softmax_s((q_latent[b, h, t] . c_kv[b, s] + q_pe[b, h, t] . k_pe[b, s]) * scale) @ c_kv[b]``,
    causal with the T queries aligned to the end of the S cached positions: query ``t`` sees keys
    ``s <= t + S - T`` (T = 1: one decode step, every key; T = S: a prefill through the absorbed form).

    ``q_latent`` (B, H, T, r) (``q_nope W_UK``), ``q_pe`` (B, H, T, dr) (rotated), ``c_kv`` (B, S, r)
    (normalized latent cache, also the values), ``k_pe`` (B, S, dr) (rotated, one head shared by all); one float
    dtype. Returns (B, H, T, r) in that dtype. Raises ``ValueError`` for wrong ranks, mismatched shapes or
    ``S < T``. Source: DeepSeek-V2 section 2.1, DeepSeek-V3 report section 2.1.1 (eq. 1-11), "absorb" in
    DeepSeek's inference code.
    """
    if q_latent.ndim != 4 or q_pe.ndim != 4 or c_kv.ndim != 3 or k_pe.ndim != 3:
        raise ValueError(f"mla_decode: expected q_latent (B, H, T, r), q_pe (B, H, T, dr), c_kv (B, S, r), k_pe "
                         f"(B, S, dr), got {tuple(q_latent.shape)}, {tuple(q_pe.shape)}, {tuple(c_kv.shape)}, "
                         f"{tuple(k_pe.shape)}")
    b, h, t, r = q_latent.shape
    s = c_kv.shape[1]
    if q_pe.shape[:3] != (b, h, t) or c_kv.shape != (b, s, r) or k_pe.shape != (b, s, q_pe.shape[3]):
        raise ValueError(f"mla_decode: mismatched shapes q_latent {tuple(q_latent.shape)}, q_pe "
                         f"{tuple(q_pe.shape)}, c_kv {tuple(c_kv.shape)}, k_pe {tuple(k_pe.shape)}")
    if s < t:
        raise ValueError(f"mla_decode: causal needs at least as many cached positions as queries, got S={s} < T={t}")
    return attend(*latent_qkv(q_latent, q_pe, c_kv, k_pe), causal_mask(t, s, s - t, q_latent.device), scale)


class MLA(AttentionOps, nn.Module):
    """MLA layer: (B, T, hidden_size) -> (B, T, hidden_size).

    ``absorb``: None (default) uses the absorbed form when decoding with a cache and at most 1 new token,
    else naive; True/False forces a form. Parameter names are Hugging Face's (``q_a_proj``,
    ``kv_a_proj_with_mqa``, ``kv_b_proj``, ...). Softmax scale: ``qk_head_dim**-0.5 * mscale**2`` under YaRN.
    """

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        c = config
        self.layer_idx = layer_idx
        self.n_heads = c.num_attention_heads
        self.dn, self.dr, self.dv, self.r = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank
        self.interleaved = c.rope_interleave
        self.scale = c.softmax_scale(c.qk_head_dim)
        self.absorb: bool | None = None
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

    def project(self, x, cos, sin):
        """Queries and the latent of the new tokens.

        Returns ``q_nope`` (B, H, T, dn), ``q_pe`` (B, H, T, dr) (rotated), ``c_kv`` (B, T, r) (normalized),
        ``k_pe`` (B, T, dr) (rotated) and the query latent (B, T, q_lora_rank) or None.
        """
        b, t, _ = x.shape
        q_latent = None
        q_in = self.q_proj if self.q_lora_rank is None else self.q_a_proj
        q, kv = shared_input_linears(x, q_in, self.kv_a_proj_with_mqa)  # FP8 training: x quantized once
        if self.q_lora_rank is not None:
            q_latent = self.q_a_layernorm(q)
            q = self.q_b_proj(q_latent)
        q = q.view(b, t, self.n_heads, self.dn + self.dr).transpose(1, 2)
        q_nope, q_pe = q.split([self.dn, self.dr], dim=-1)
        c_kv, k_pe = kv.split([self.r, self.dr], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)
        q_pe, k_pe = self.rotate(q_pe, cos, sin), self.rotate(k_pe, cos, sin)
        return q_nope, q_pe, c_kv, k_pe, q_latent

    def attend_naive(self, q_nope, q_pe, c_kv, k_pe, mask):
        """Up-project the latent (B, S, r) into keys (B, H, S, dn+dr) and values (B, H, S, dv), then attend.
        Returns (B, H, T, dv)."""
        b, s, _ = c_kv.shape
        kv = self.kv_b_proj(c_kv).view(b, s, self.n_heads, self.dn + self.dv).transpose(1, 2)
        k_nope, v = kv.split([self.dn, self.dv], dim=-1)
        k = torch.cat((k_nope, k_pe[:, None].expand(b, self.n_heads, s, self.dr)), dim=-1)
        q = torch.cat((q_nope, q_pe), dim=-1)
        return self.attend(q, k, v, mask)

    def attend_absorbed(self, q_nope, q_pe, c_kv, k_pe, mask):
        """Attend over the latent: ``q_nope W_UK`` against ``c_kv``, plus ``q_pe`` against ``k_pe``; the
        output latent goes through ``W_UV``. Returns (B, H, T, dv)."""
        w = linear_weight(self.kv_b_proj, q_nope.dtype).view(self.n_heads, self.dn + self.dv, self.r)  # FP8: dequant
        w_uk, w_uv = w[:, : self.dn], w[:, self.dn :]
        q_lat = torch.einsum("bhtd,hdr->bhtr", q_nope, w_uk)
        o_lat = self.attend_latent(q_lat, q_pe, c_kv, k_pe, mask)
        return torch.einsum("bhtr,hvr->bhtv", o_lat, w_uv)

    def attend_latent(self, q_lat, q_pe, c_kv, k_pe, mask):
        """The absorbed form's attention: ``q_lat`` (B, H, T, r) against ``c_kv`` (B, S, r) plus ``q_pe``
        (B, H, T, dr) against ``k_pe`` (B, S, dr), one key head shared by all heads (MQA over the latent), values
        ``c_kv`` (`latent_qkv`), under ``mask`` (with the causal mask of a cached step: the op `mla_decode`).
        Returns the output latent (B, H, T, r)."""
        return self.attend(*latent_qkv(q_lat, q_pe, c_kv, k_pe), mask)

    def select_mask(self, x, q_latent, cos, sin, mask, cache):
        """Hook for sparse attention (DSA); MLA attends to every causal key. ``mask``: (T, S) boolean (causal, a
        cached step), a padded batch's (B, 1, T, S) boolean (`reference.attention.padding_mask`) or None (plain
        causal, T == S)."""
        return mask

    def observe_attention(self, q_nope, q_pe, c_kv, k_pe, mask) -> None:
        """Hook for the indexer's training target (DSA); MLA has none."""

    def forward(self, x, cos, sin, cache=None, offset: int = 0, mask=None):
        """``x`` (B, T, hidden); ``cos``/``sin`` (T, dr/2) for positions offset..offset+T-1; ``cache`` a
        `reference.cache.LayerCache` holding ``c_kv`` and ``k_pe``, or None; ``mask`` None (no padding: causal)
        or a padded batch's (B, 1, T, S) boolean mask (`reference.attention.padding_mask`)."""
        b, t, _ = x.shape
        q_nope, q_pe, c_kv, k_pe, q_latent = self.project(x, cos, sin)
        if cache is not None:
            c_kv, k_pe = cache.update(c_kv=c_kv, k_pe=k_pe)
        if mask is None:
            mask = None if c_kv.shape[1] == t else causal_mask(t, c_kv.shape[1], offset, x.device)
        mask = self.select_mask(x, q_latent, cos, sin, mask, cache)
        self.observe_attention(q_nope, q_pe, c_kv, k_pe, mask)
        absorb = self.absorb if self.absorb is not None else (cache is not None and t == 1)
        fn = self.attend_absorbed if absorb else self.attend_naive
        o = fn(q_nope, q_pe, c_kv, k_pe, mask)
        return self.o_proj(o.transpose(1, 2).reshape(b, t, self.n_heads * self.dv))
