"""DeepSeek Sparse Attention (DeepSeek-V3.2) in MLX: the lightning indexer's scores and its causal top-k, each a
Metal kernel of ``kernels/metal/dsa.metal`` or a pure-MLX path, and attention over the selected keys
(`sparse_attention`, pure MLX). Reference: `reference.dsa.indexer_scores`, `reference.dsa.indexer_topk` and
`reference.dsa.sparse_attention`; Triton: `kernels.triton.dsa`."""

from __future__ import annotations

import mlx.core as mx

from .launch import (
    Launch,
    cdiv,
    check_close,
    check_equal,
    check_float,
    check_shape,
    f32,
    run,
    sample,
    scalar,
    spec,
    use_metal,
)

SCORES = spec("indexer_scores", "dsa", "q k w scale", "scores")
TOPK = spec("indexer_topk", "dsa", "scores", "topk_idx")
_TG = 128


def indexer_scores_mlx(q, k, w, scale):
    """Pure MLX `indexer_scores` (same contract)."""
    logits = mx.maximum(f32(q).swapaxes(1, 2) @ f32(k)[:, None].swapaxes(-1, -2) * scale, 0.0)  # (B, H, T, S)
    return (logits * f32(w).transpose(0, 2, 1)[..., None]).sum(1)


def _visible(t: int, s: int) -> mx.array:
    """(T, S) causal mask aligned to the end: key s visible to query t iff s <= S - T + t."""
    return mx.arange(s)[None, :] <= (mx.arange(t)[:, None] + (s - t))


def indexer_topk_mlx(scores, topk):
    """Pure MLX `indexer_topk` (same contract). Ties go to the earlier key because ``mx.argsort`` is stable (CPU:
    ties broken by index; Metal: a merge sort that moves an element only past a strictly smaller one)."""
    _, t, s = scores.shape
    kk = min(topk, s)
    scores = f32(scores)
    scores = mx.where(mx.isnan(scores), mx.inf, scores)  # a NaN ranks first, as in torch.sort
    masked = mx.where(_visible(t, s), scores, -mx.inf)
    idx = mx.argsort(-masked, axis=-1)[..., :kk].astype(mx.int32)
    n_visible = mx.clip(mx.arange(t) + (s - t) + 1, 0, s)
    return mx.where(mx.arange(kk)[None, :] < n_visible[:, None], idx, -1)


def indexer_scores_launch(q, k, w, scale) -> Launch:
    """One thread per score (b, t, s): grid (B*T*S rounded up to 128, 1, 1), threadgroup (128, 1, 1); each thread
    reduces H heads of D features. Output (B, T, S) float32."""
    b, t, h, d = q.shape
    s = k.shape[1]
    n = b * t * s
    return Launch(SCORES, [q, k, w, scalar(scale)],
                  [("T", q.dtype), ("KT", k.dtype), ("WT", w.dtype), ("H", h), ("TQ", t), ("S", s), ("D", d),
                   ("B", b)],
                  (_TG * cdiv(n, _TG), 1, 1), (_TG, 1, 1), [(b, t, s)], [mx.float32])


def indexer_topk_launch(scores, topk) -> Launch:
    """One threadgroup of 128 threads per query row (b, t): grid (B*T*128, 1, 1). Each thread ranks its keys
    against all visible keys, streamed through a 128-float threadgroup tile; a key of rank < K writes its id
    to slot rank: O(S^2) comparisons per query, S^2 / 128 per thread. Fine for short contexts; not for long
    ones, decode included: a decode step has only B*T threadgroups, so at S = 32K each thread makes about 8M
    comparisons while the rest of the GPU idles. ``scores`` float32. Output (B, T, min(topk, S)) int32."""
    b, t, s = scores.shape
    kk = min(topk, s)
    return Launch(TOPK, [scores], [("TQ", t), ("S", s), ("K", kk), ("TILE", _TG)],
                  (b * t * _TG, 1, 1), (_TG, 1, 1), [(b, t, kk)], [mx.int32])


def _indexer_scores_metal(q, k, w, scale, runner=None):
    (out,) = run(runner, indexer_scores_launch(q, k, w, scale))
    return out


def _indexer_topk_metal(scores, topk, runner=None):
    (idx,) = run(runner, indexer_topk_launch(scores, topk))
    return idx


def _check_scores(q_dtype, k_dtype, w_dtype, h, d) -> None:
    """The scores kernel against the pure-MLX path: 2 queries over 9 keys, ``h`` heads of ``d`` features."""
    args = (sample((1, 2, h, d), 1, q_dtype), sample((1, 9, d), 2, k_dtype), sample((1, 2, h), 3, w_dtype), d**-0.5)
    check_close("indexer_scores", _indexer_scores_metal(*args), indexer_scores_mlx(*args), q_dtype)


def _check_topk() -> None:
    """The top-k kernel against the pure-MLX path on 3 queries over 150 keys (two tiles) whose scores are
    multiples of 0.5, so exact ties decide many slots; K = 20 and K = 150 (-1 padding)."""
    scores = mx.round(sample((1, 3, 150), 1) * 2) / 2
    for kk in (20, 150):
        check_equal(f"indexer_topk (topk={kk})", _indexer_topk_metal(scores, kk), indexer_topk_mlx(scores, kk))


def indexer_scores(q: mx.array, k: mx.array, w: mx.array, scale: float) -> mx.array:
    """Lightning-indexer scores, as `reference.dsa.indexer_scores`.

    ``q`` (B, T, H, D) (rotated queries), ``k`` (B, S, D) (one shared key head), ``w`` (B, T, H) (head weights,
    ``weights_proj(x) * H**-0.5``). Returns ``I[b, t, s] = sum_h w[b,t,h] relu(scale * q[b,t,h] . k[b,s])``
    (B, T, S) float32, unmasked. Forward only (the indexer's top-k is not differentiable).
    Raises TypeError on non-float inputs, ValueError on mismatched shapes. Source: DeepSeek-V3.2-Exp report eq. 1.
    """
    for name, a in (("q", q), ("k", k), ("w", w)):
        check_float(name, a)
    if q.ndim != 4:
        raise ValueError(f"q: expected (B, T, H, D), got {tuple(q.shape)}")
    b, t, h, d = q.shape
    check_shape("k", k, (b, None, d))
    check_shape("w", w, (b, t, h))
    key = (q.dtype, k.dtype, w.dtype, h, d)
    if use_metal("indexer_scores", key, lambda: _check_scores(*key)):
        return _indexer_scores_metal(q, k, w, scale)
    return indexer_scores_mlx(q, k, w, scale)


def indexer_topk(scores: mx.array, topk: int) -> mx.array:
    """Each query's causal top-k keys, as `reference.dsa.indexer_topk` (and `kernels.triton.dsa.indexer_topk`).

    ``scores`` (B, T, S) float (from `indexer_scores`; ranked in float32), the T queries being the last T of the
    S keys: query t sees keys ``s <= S - T + t``. Returns ``idx`` (B, T, K) int32 (MLX's index dtype; the
    reference and Triton return int64), K = min(topk, S): the visible keys of largest score, best first, exact
    ties to the earlier key (DESIGN.md), a NaN score first (as ``torch.sort`` puts it; here NaN and +inf tie); a
    query with fewer than K visible keys keeps all of them and pads with -1. `indices_to_mask` turns it into the
    boolean (B, T, S) selection. Raises TypeError on non-float scores, ValueError on a bad shape or topk < 1.
    Source: DeepSeek-V3.2-Exp report sec. 2.1.
    """
    check_float("scores", scores)
    if scores.ndim != 3:
        raise ValueError(f"scores: expected (B, T, S), got {tuple(scores.shape)}")
    if not isinstance(topk, int) or topk < 1:
        raise ValueError(f"topk must be an int >= 1, got {topk!r}")
    if scores.shape[1] > scores.shape[2]:
        raise ValueError(f"scores: the T={scores.shape[1]} queries must be among the S={scores.shape[2]} keys")
    if use_metal("indexer_topk", (), _check_topk):
        return _indexer_topk_metal(f32(scores), topk)
    return indexer_topk_mlx(scores, topk)


def indices_to_mask(indices: mx.array, num_keys: int) -> mx.array:
    """Boolean (B, T, S) selection, ``S = num_keys``, True at the keys listed in ``indices`` (B, T, k) integer, as
    `reference.dsa.indices_to_mask`; entries outside [0, S) (-1: an unfilled slot of `indexer_topk`) select
    nothing."""
    b, t, _ = indices.shape
    ok = (indices >= 0) & (indices < num_keys)
    slot = mx.where(ok, indices, num_keys)  # to a spare column, dropped below
    sel = mx.put_along_axis(mx.zeros((b, t, num_keys + 1), mx.bool_), slot, mx.array(True), axis=-1)
    return sel[..., :num_keys]


def sparse_attention(q: mx.array, k: mx.array, v: mx.array, indices: mx.array, scale: float) -> mx.array:
    """Attention of every query head over the keys its query selected, as `reference.dsa.sparse_attention` (and
    `kernels.triton.dsa.sparse_attention`): ``mx.fast.scaled_dot_product_attention`` under the mask
    `indices_to_mask` makes of ``indices``, differentiable in ``q``, ``k`` and ``v`` through MLX autodiff.

    ``q`` (B, H, T, Dk), ``k`` (B, Hk, S, Dk), ``v`` (B, Hk, S, Dv) float with ``H % Hk == 0`` (query head ``h``
    reads key head ``h // (H / Hk)``): the naive MLA form (Hk = H) or the absorbed one (Hk = 1, ``k = [c_kv,
    k_pe]``, ``v = c_kv``). ``indices`` (B, T, NK) integer (int32 from `indexer_topk`, or int64): the keys query
    ``t`` attends to, shared by all heads, distinct within a query, in any order; entries outside [0, S) (-1: an
    unfilled slot) select nothing, and a query that selects nothing gets a zero output and no gradient. Returns
    (B, H, T, Dv) in ``q.dtype`` (MLX's precise softmax). The mask is dense (B, T, S): the cost is that of attention
    over all S keys, not NK. Raises TypeError on non-float q, k, v or non-integer indices, ValueError on
    mismatched shapes. Source: DeepSeek-V3.2-Exp report section 2.1.
    """
    for name, a in (("q", q), ("k", k), ("v", v)):
        check_float(name, a)
    if q.ndim != 4:
        raise ValueError(f"q: expected (B, H, T, Dk), got {tuple(q.shape)}")
    b, h, t, dk = q.shape
    check_shape("k", k, (b, None, None, dk))
    hk, s = k.shape[1], k.shape[2]
    check_shape("v", v, (b, hk, s, None))
    if hk == 0 or h % hk:
        raise ValueError(f"sparse_attention: query heads ({h}) must be a multiple of key/value heads ({hk})")
    if not isinstance(indices, mx.array) or not mx.issubdtype(indices.dtype, mx.integer):
        raise TypeError(f"indices: expected an integer mx.array, got {getattr(indices, 'dtype', type(indices))}")
    check_shape("indices", indices, (b, t, None))
    sel = indices_to_mask(indices, s)
    empty = ~sel.any(axis=-1, keepdims=True)  # (B, T, 1): a query that selected nothing
    sel = sel | (empty & (mx.arange(s) == 0))  # sees key 0, its output zeroed below
    o = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=sel[:, None])
    return mx.where(empty[:, None], mx.array(0, o.dtype), o)
