"""DeepSeek-V4's attention core (V4 report section 2.3): shared-KV multi-query attention with a learned sink per head,
over a per-query set of entries given as indices: the sliding window of the last ``sliding_window`` tokens, plus, on
compressed layers, compressed entries (CSA: the lightning indexer's top-k; HCA: every entry the query may see).

One key-value head serves every query head and is both key and value (``K = V``, MQA with head_dim 512 in V4-Flash).
A sink is a logit with no value (Xiao et al. 2023, "attention sinks"; gpt-oss): ``softmax([logits, sink])`` with the
sink's share dropped, so a head can attend to nothing. The selection is a set of indices into the concatenated
``kv`` = [window rows; compressed entries], as DeepSeek-V4's inference code (``sparse_attn`` over ``topk_idxs``) and
DSA's `reference.dsa.sparse_attention` take it; -1 marks an empty slot.
"""

from __future__ import annotations

import torch


def sink_attention(q: torch.Tensor, kv: torch.Tensor, sinks: torch.Tensor, indices: torch.Tensor,
                   scale: float) -> torch.Tensor:
    """Attention with sinks over selected shared key-value rows (the op of `kernels.triton.sink_attention`).

    ``q`` (B, S, H, D) float; ``kv`` (B, L, D), same dtype, one row per entry (key and value at once); ``sinks``
    (H,) float32, one logit per head; ``indices`` (B, S, K) integer: the rows query ``s`` attends to, distinct within
    a query, in any order, -1 (or any value outside [0, L)) an empty slot; ``scale`` the softmax scale
    (``head_dim ** -0.5`` in V4).

    ``out[b, s, h] = sum_k p_k kv[b, indices[b, s, k]]`` with ``p = softmax([scale q . kv_k for valid k; sinks[h]])``
    without the sink's entry: the weights sum to less than 1. A query with no valid index gets zeros. Logits and the
    softmax in at least float32; returns (B, S, H, D) in ``q.dtype``. Differentiable in ``q``, ``kv`` and ``sinks``.
    Raises ``ValueError`` for mismatched shapes.
    """
    probs, rows = sink_attention_probs(q, kv, sinks, indices, scale)
    return torch.einsum("bshk,bskd->bshd", probs, rows).to(q.dtype)


def sink_attention_probs(q: torch.Tensor, kv: torch.Tensor, sinks: torch.Tensor, indices: torch.Tensor,
                         scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention weights of `sink_attention`, (B, S, H, K) in at least float32 (0 at empty slots; each row sums
    to 1 minus the sink's share), and the gathered rows (B, S, K, D). Same arguments and errors."""
    b, s, h, d = q.shape
    if kv.dim() != 3 or kv.shape[0] != b or kv.shape[2] != d:
        raise ValueError(f"sink_attention: kv must be (B, L, D) = ({b}, L, {d}), got {tuple(kv.shape)}")
    if indices.dim() != 3 or tuple(indices.shape[:2]) != (b, s):
        raise ValueError(f"sink_attention: indices must be (B, S, K) = ({b}, {s}, K), got {tuple(indices.shape)}")
    if sinks.shape != (h,):
        raise ValueError(f"sink_attention: sinks must be ({h},), got {tuple(sinks.shape)}")
    wide = torch.promote_types(q.dtype, torch.float32)
    valid = (indices >= 0) & (indices < kv.shape[1])
    safe = torch.where(valid, indices, 0).long()
    rows = torch.gather(kv.to(wide), 1, safe.reshape(b, -1, 1).expand(-1, -1, d)).view(b, s, -1, d)  # (B, S, K, D)
    logits = torch.einsum("bshd,bskd->bshk", q.to(wide), rows) * scale
    logits = logits.masked_fill(~valid[:, :, None, :], float("-inf"))
    sink = sinks.to(wide).view(1, 1, h, 1).expand(b, s, h, 1)
    return torch.softmax(torch.cat((logits, sink), dim=-1), dim=-1)[..., :-1], rows


def window_indices(seq_len: int, offset: int, cached: int, window: int, device=None) -> torch.Tensor:
    """Indices (S, W) int64 of the sliding window of each of ``seq_len`` new queries into the rows [``cached`` window
    rows from the cache; the ``seq_len`` new rows]: query ``i`` (absolute position ``offset + i``) sees the positions
    ``p`` with ``offset + i - window < p <= offset + i``; the cached rows hold positions ``offset - cached ..
    offset - 1``. Slots before position 0 or outside the cached rows are -1. ``W = window``."""
    pos = offset + torch.arange(seq_len, device=device)  # absolute query positions
    keys = pos[:, None] - torch.arange(window - 1, -1, -1, device=device)[None, :]  # (S, W) absolute, oldest first
    rows = keys - (offset - cached)
    return torch.where((keys >= 0) & (rows >= 0), rows, -1)
