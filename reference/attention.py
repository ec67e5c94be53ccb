"""Causal scaled-dot-product attention and the MHA / MQA / GQA layer (one module, through num_key_value_heads).

MHA: ``num_key_value_heads == num_attention_heads``; MQA (Shazeer 2019): one key/value head; GQA (Ainslie
et al. 2023): ``num_attention_heads`` a multiple of ``num_key_value_heads``. Parameter names follow
Llama's (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``); these variants are ours, not DeepSeek-V3's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .rope import apply_rope


def causal_mask(q_len: int, kv_len: int, offset: int, device=None) -> torch.Tensor:
    """Boolean (q_len, kv_len) mask, True where key ``j`` is visible to query ``i``: ``j <= offset + i``."""
    i = torch.arange(q_len, device=device)[:, None] + offset
    j = torch.arange(kv_len, device=device)[None, :]
    return j <= i


def padding_mask(attention_mask: torch.Tensor, q_len: int, offset: int) -> torch.Tensor:
    """The attention mask of a padded batch: boolean (B, 1, T, S), True where key ``j`` is visible to query ``i``
    of row ``b``: causal (``j <= offset + i``, as `causal_mask`) and the key a real token or the query itself
    (``j == offset + i``).

    ``attention_mask`` (B, S) bool or integer, 1/True = a real token, 0/False = padding, over the cached and the
    new tokens (S = offset + q_len: transformers' ``attention_mask`` with a cache); ``q_len`` = T new tokens at
    positions ``offset ..``. Positions are not shifted by the padding: RoPE is relative, so a real query scores
    the real keys as in the unpadded sequence (up to the rounding of the rotation angles). A real query's own key
    is real, so it sees exactly the real keys before it; a padding query sees only itself (a finite, meaningless
    output instead of the NaN of an empty softmax).
    """
    i = torch.arange(q_len, device=attention_mask.device)[:, None] + offset
    j = torch.arange(attention_mask.shape[1], device=attention_mask.device)[None, :]
    return (j <= i) & (attention_mask.bool()[:, None, None, :] | (j == i))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """``softmax(q k^T * scale + mask) v`` with grouped key/value heads.

    Shapes: ``q`` (B, H, T, Dk), ``k`` (B, Hk, S, Dk), ``v`` (B, Hk, S, Dv) with ``H % Hk == 0`` (query head
    ``h`` reads key head ``h // (H / Hk)``); ``mask`` boolean, broadcastable to (B, H, T, S), True = attend, or
    None for the plain causal mask with ``T == S`` (no cache). Returns (B, H, T, Dv) in ``q.dtype``. Every
    query must see at least one key.
    """
    gqa = k.shape[1] != q.shape[1]
    dv = v.shape[-1]
    if dv < q.shape[-1]:  # zero-pad v to the qk width: same result, and PyTorch's fused CPU kernel then applies
        v = F.pad(v, (0, q.shape[-1] - dv))
    if mask is None:
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    else:
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return o[..., :dv]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool = True) -> torch.Tensor:
    """The attention op (the signature of `kernels.triton.attention.attention`): `attend` with the causal mask
    aligned to the end of the keys, or with none.

    ``q`` (B, H, T, Dk), ``k`` (B, Hk, S, Dk), ``v`` (B, Hk, S, Dv) float, ``H % Hk == 0`` (MHA, MQA, GQA: query
    head ``h`` reads key head ``h // (H / Hk)``), ``Dk`` may differ from ``Dv`` (MLA prefill: 192 and 128).
    ``causal``: the T queries are the last T positions of the S keys, so query ``t`` sees key ``j`` iff
    ``j <= t + S - T`` (`causal_mask` with offset ``S - T``: a prefill continuing a cache, or one decode step);
    needs ``S >= T``. ``causal=False`` attends to every key. Returns (B, H, T, Dv) in ``q.dtype``; differentiable
    in ``q``, ``k`` and ``v``. Raises ``ValueError`` for causal with ``S < T`` (a query would see no key).
    Source: Vaswani et al. 2017 section 3.2.1; GQA: Ainslie et al. 2023; MQA: Shazeer 2019.
    """
    t, s = q.shape[-2], k.shape[-2]
    if not causal:
        mask = torch.ones(t, s, dtype=torch.bool, device=q.device)
    elif s < t:
        raise ValueError(f"attention: causal needs at least as many keys as queries, got S={s} < T={t}")
    else:
        mask = None if t == s else causal_mask(t, s, s - t, q.device)
    return attend(q, k, v, mask, scale)


class AttentionOps:
    """The two hot ops of an attention layer, as methods, so that a runtime (`runtime_cuda`) swaps in its
    kernels by overriding them. Needs ``self.interleaved`` (RoPE pairing) and ``self.scale`` (softmax scale)."""

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """RoPE with this layer's pairing: `reference.rope.apply_rope`."""
        return apply_rope(x, cos, sin, self.interleaved)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Softmax attention with this layer's scale: `attend` (``mask`` None = plain causal, T == S)."""
        return attend(q, k, v, mask, self.scale)


class Attention(AttentionOps, nn.Module):
    """MHA / MQA / GQA with RoPE over the whole head (pairing from ``config.rope_interleave``).

    Input (B, T, hidden_size) -> output (B, T, hidden_size). The KV cache holds ``k`` and ``v`` of shape
    (B, num_key_value_heads, S, head_dim) per layer.
    """

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        c = config
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.interleaved = c.rope_interleave
        self.scale = c.softmax_scale(c.head_dim)
        self.q_proj = nn.Linear(c.hidden_size, self.n_heads * self.head_dim, bias=c.attention_bias)
        self.k_proj = nn.Linear(c.hidden_size, self.n_kv * self.head_dim, bias=c.attention_bias)
        self.v_proj = nn.Linear(c.hidden_size, self.n_kv * self.head_dim, bias=c.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, c.hidden_size, bias=c.attention_bias)

    def forward(self, x, cos, sin, cache=None, offset: int = 0, mask=None):
        """``x`` (B, T, hidden); ``cos``/``sin`` (T, head_dim/2) for positions offset..offset+T-1;
        ``cache`` a `reference.cache.LayerCache` or None; ``mask`` None (no padding: causal) or a padded batch's
        (B, 1, T, S) boolean mask (`padding_mask`)."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = self.rotate(q, cos, sin), self.rotate(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k=k, v=v)
        if mask is None:
            mask = None if k.shape[2] == t else causal_mask(t, k.shape[2], offset, x.device)
        o = self.attend(q, k, v, mask)
        return self.o_proj(o.transpose(1, 2).reshape(b, t, -1))
