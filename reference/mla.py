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

from .attention import AttentionOps, causal_mask
from .config import ModelConfig
from .rms_norm import RMSNorm


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
        if self.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q_latent = self.q_a_layernorm(self.q_a_proj(x))
            q = self.q_b_proj(q_latent)
        q = q.view(b, t, self.n_heads, self.dn + self.dr).transpose(1, 2)
        q_nope, q_pe = q.split([self.dn, self.dr], dim=-1)
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.r, self.dr], dim=-1)
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
        w = self.kv_b_proj.weight.view(self.n_heads, self.dn + self.dv, self.r)
        w_uk, w_uv = w[:, : self.dn], w[:, self.dn :]
        q_lat = torch.einsum("bhtd,hdr->bhtr", q_nope, w_uk)
        o_lat = self.attend_latent(q_lat, q_pe, c_kv, k_pe, mask)
        return torch.einsum("bhtr,hvr->bhtv", o_lat, w_uv)

    def attend_latent(self, q_lat, q_pe, c_kv, k_pe, mask):
        """The absorbed form's attention: ``q_lat`` (B, H, T, r) against ``c_kv`` (B, S, r) plus ``q_pe``
        (B, H, T, dr) against ``k_pe`` (B, S, dr), one key head shared by all heads (MQA over the latent), values
        ``c_kv``. Returns the output latent (B, H, T, r)."""
        q = torch.cat((q_lat, q_pe), dim=-1)
        k = torch.cat((c_kv, k_pe), dim=-1)[:, None]
        return self.attend(q, k, c_kv[:, None], mask)

    def select_mask(self, x, q_latent, cos, sin, mask, cache):
        """Hook for sparse attention (DSA); MLA attends to every causal key. ``mask``: (T, S) boolean or None
        (plain causal, T == S)."""
        return mask

    def forward(self, x, cos, sin, cache=None, offset: int = 0):
        """``x`` (B, T, hidden); ``cos``/``sin`` (T, dr/2) for positions offset..offset+T-1; ``cache`` a
        `reference.cache.LayerCache` holding ``c_kv`` and ``k_pe``, or None."""
        b, t, _ = x.shape
        q_nope, q_pe, c_kv, k_pe, q_latent = self.project(x, cos, sin)
        if cache is not None:
            c_kv, k_pe = cache.update(c_kv=c_kv, k_pe=k_pe)
        mask = None if c_kv.shape[1] == t else causal_mask(t, c_kv.shape[1], offset, x.device)
        mask = self.select_mask(x, q_latent, cos, sin, mask, cache)
        absorb = self.absorb if self.absorb is not None else (cache is not None and t == 1)
        fn = self.attend_absorbed if absorb else self.attend_naive
        o = fn(q_nope, q_pe, c_kv, k_pe, mask)
        return self.o_proj(o.transpose(1, 2).reshape(b, t, self.n_heads * self.dv))
