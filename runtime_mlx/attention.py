"""The attention op (`attention`: causal or not), `attend` (under a boolean mask), both through
``mx.fast.scaled_dot_product_attention``, and the MHA / MQA / GQA layer (mirrors `reference.attention`)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from reference.config import ModelConfig

from .rope import RoPE


def causal_mask(q_len: int, kv_len: int, offset: int) -> mx.array:
    """Boolean (q_len, kv_len), True where key ``j`` is visible to query ``i``: ``j <= offset + i``."""
    return mx.arange(kv_len)[None, :] <= (mx.arange(q_len)[:, None] + offset)


def padding_mask(attention_mask: mx.array, q_len: int, offset: int) -> mx.array:
    """The attention mask of a padded batch, as `reference.attention.padding_mask`: boolean (B, 1, T, S), True
    where key ``j`` is visible to query ``i`` of row ``b``: causal (``j <= offset + i``) and the key a real token
    or the query itself (``j == offset + i``).

    ``attention_mask`` (B, S) bool or integer, 1/True = a real token, 0/False = padding, over the cached and the
    new tokens (S = offset + q_len); ``q_len`` = T new tokens at positions ``offset ..`` (not shifted by the
    padding: RoPE is relative). A padding query sees only itself (a finite, meaningless output, not the NaN of
    an empty softmax); a real query sees exactly the real keys before it.
    """
    i = mx.arange(q_len)[:, None] + offset
    j = mx.arange(attention_mask.shape[1])[None, :]
    return (j <= i) & (attention_mask.astype(mx.bool_)[:, None, None, :] | (j == i))


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, causal: bool = True) -> mx.array:
    """The attention op, as `reference.attention.attention` (and `kernels.triton.attention.attention`):
    ``softmax(q k^T * scale [+ causal mask]) v`` through ``mx.fast.scaled_dot_product_attention``.

    ``q`` (B, H, T, Dk), ``k`` (B, Hk, S, Dk), ``v`` (B, Hk, S, Dv) float, ``H % Hk == 0`` (MHA, MQA, GQA: query
    head ``h`` reads key head ``h // (H / Hk)``, natively), ``Dk`` may differ from ``Dv`` (MLA prefill: 192 and
    128; MLX then takes its unfused path). ``causal``: the T queries are the last T positions of the S keys, so
    query ``t`` sees key ``j`` iff ``j <= t + S - T`` (MLX's "causal" mask is aligned to the end of the keys);
    needs ``S >= T``. ``causal=False`` attends to every key. Returns (B, H, T, Dv) in ``q.dtype`` (MLX's precise
    softmax); differentiable in ``q``, ``k`` and ``v``. Raises ``ValueError`` for causal with ``S < T`` (a query
    would see no key).
    """
    t, s = q.shape[-2], k.shape[-2]
    if causal and s < t:
        raise ValueError(f"attention: causal needs at least as many keys as queries, got S={s} < T={t}")
    mask = "causal" if causal and t > 1 else None  # one query at the end of the keys sees them all
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)


def attend(q: mx.array, k: mx.array, v: mx.array, mask: mx.array | None, scale: float) -> mx.array:
    """``softmax(q k^T * scale + mask) v`` with grouped key/value heads.

    ``q`` (B, H, T, Dk), ``k`` (B, Hk, S, Dk), ``v`` (B, Hk, S, Dv), ``H % Hk == 0``; ``mask`` boolean,
    broadcastable to (B, H, T, S), True = attend, or None: causal with the last query at the last key
    (`attention` with ``causal=True``, which equals `causal_mask` with offset ``S - T``).
    Returns (B, H, T, Dv) in ``q.dtype``.
    """
    if mask is None:
        return attention(q, k, v, scale, causal=True)
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)


class Attention(nn.Module):
    """MHA / MQA / GQA with RoPE over the whole head; (B, T, hidden) -> (B, T, hidden). The cache holds ``k``,
    ``v`` (B, num_key_value_heads, S, head_dim) per layer. Parameters named as `reference.attention.Attention`."""

    def __init__(self, config: ModelConfig, layer_idx: int, rope: RoPE):
        super().__init__()
        c = config
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.interleaved = c.rope_interleave
        self.scale = c.softmax_scale(c.head_dim)
        self.rope = rope
        self.q_proj = nn.Linear(c.hidden_size, self.n_heads * self.head_dim, bias=c.attention_bias)
        self.k_proj = nn.Linear(c.hidden_size, self.n_kv * self.head_dim, bias=c.attention_bias)
        self.v_proj = nn.Linear(c.hidden_size, self.n_kv * self.head_dim, bias=c.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, c.hidden_size, bias=c.attention_bias)

    def __call__(self, x: mx.array, cache=None, offset: int = 0, mask: mx.array | None = None) -> mx.array:
        """``x`` (B, T, hidden) at positions ``offset ..``; ``cache`` a `runtime_mlx.cache.LayerCache` or None;
        ``mask`` None (no padding: causal) or a padded batch's (B, 1, T, S) boolean mask (`padding_mask`)."""
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.n_heads, self.head_dim).transpose(0, 2, 1, 3)
        k = self.k_proj(x).reshape(b, t, self.n_kv, self.head_dim).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(b, t, self.n_kv, self.head_dim).transpose(0, 2, 1, 3)
        q, k = self.rope(q, offset, self.interleaved), self.rope(k, offset, self.interleaved)
        if cache is not None:
            k, v = cache.update(k=k, v=v)
        o = attend(q, k, v, mask, self.scale)
        return self.o_proj(o.transpose(0, 2, 1, 3).reshape(b, t, -1))
