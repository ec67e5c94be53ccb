"""DeepSeek-V4's attention core in MLX: shared-KV MQA with a learned sink per head over the rows each query selects
by index, as `reference.sink_attention.sink_attention` (and `kernels.triton.sink_attention`). Metal path: the kernels
of ``kernels/metal/sink_attention.metal`` (forward, and a backward of two kernels as a custom VJP: dq per query,
dkv per row of ``kv`` over the queries that selected it, deterministic); pure-MLX path: `sink_attention_mlx`."""

from __future__ import annotations

from functools import cache

import mlx.core as mx

from .launch import Launch, cdiv, check_close, check_float, check_shape, f32, run, sample, scalar, spec, use_metal

FWD = spec("sink_attention_fwd", "sink_attention", "q kv sinks indices scale", "o lse")
BWD_DQ = spec("sink_attention_bwd_dq", "sink_attention", "q d_o kv indices lse delta scale", "dq")
BWD_DKV = spec("sink_attention_bwd_dkv", "sink_attention", "q d_o kv lse delta src start scale", "dkv")
_DKV_ROWS = 4  # simdgroups (kv rows) per threadgroup of the dkv kernel


def _clean(indices: mx.array, n_rows: int) -> mx.array:
    """``indices`` as int32 with every entry outside [0, L) set to -1 (what the kernels take)."""
    ok = (indices >= 0) & (indices < n_rows)
    return mx.where(ok, indices, -1).astype(mx.int32)


def sink_attention_mlx(q, kv, sinks, indices, scale):
    """Pure MLX `sink_attention` (same contract): the selected rows gathered to (B, S, K, D), float32 logits and
    softmax over [logits; sink], the sink's column dropped. Differentiable through MLX autodiff."""
    b, s, h, d = q.shape
    ok = (indices >= 0) & (indices < kv.shape[1])
    safe = mx.where(ok, indices, 0).reshape(b, -1)
    rows = f32(kv)[mx.arange(b)[:, None], safe].reshape(b, s, -1, d)  # (B, S, K, D)
    logits = (f32(q) @ rows.swapaxes(-1, -2)) * scale  # (B, S, H, K)
    logits = mx.where(ok[:, :, None, :], logits, -mx.inf)
    sink = mx.broadcast_to(f32(sinks)[:, None], (b, s, h, 1))
    p = mx.softmax(mx.concatenate([logits, sink], axis=-1), axis=-1, precise=True)[..., :-1]
    return (p @ rows).astype(q.dtype)


def _heads(h: int) -> tuple[int, int]:
    """(NSG, HG): simdgroups (heads) per threadgroup and threadgroups per query."""
    nsg = min(h, 8)
    return nsg, cdiv(h, nsg)


def _template(q, kv, idx) -> list:
    """The template of the forward and dq kernels (``TN``: rows staged at a time, at most 16 KB of them)."""
    _, s, h, d = q.shape
    nsg, hg = _heads(h)
    return [("T", q.dtype), ("S", s), ("H", h), ("D", d), ("L", kv.shape[1]), ("K", idx.shape[-1]), ("NSG", nsg),
            ("HG", hg), ("TN", max(1, min(32, 4096 // d)))]


def sink_attention_fwd_launch(q, kv, sinks, idx, scale) -> Launch:
    """Forward: one threadgroup of NSG = min(H, 8) simdgroups per query and group of NSG heads, grid
    (B*S*HG*NSG*32, 1, 1) with HG = cdiv(H, NSG); TN = clamp(4096 / D, 1, 32) rows staged at a time (16 KB of
    threadgroup memory at most). ``idx`` int32 from `_clean`. Outputs ``o`` (B, S, H, D) in q's dtype and ``lse``
    (B, S, H) float32."""
    b, s, h, d = q.shape
    nsg, hg = _heads(h)
    return Launch(FWD, [q, kv, f32(sinks), idx, scalar(scale)], _template(q, kv, idx), (b * s * hg * nsg * 32, 1, 1),
                  (nsg * 32, 1, 1), [(b, s, h, d), (b, s, h)], [q.dtype, mx.float32])


def sink_attention_bwd_dq_launch(q, do, kv, idx, lse, delta, scale) -> Launch:
    """Backward, dq: the forward's grid and staging. Output ``dq`` (B, S, H, D) in q's dtype."""
    b, s, h, d = q.shape
    nsg, hg = _heads(h)
    return Launch(BWD_DQ, [q, do, kv, idx, lse, delta, scalar(scale)], _template(q, kv, idx),
                  (b * s * hg * nsg * 32, 1, 1), (nsg * 32, 1, 1), [(b, s, h, d)], [q.dtype])


def sink_attention_bwd_dkv_launch(q, do, kv, lse, delta, src, start, scale) -> Launch:
    """Backward, dkv: one simdgroup per row of ``kv``, 4 per threadgroup, grid (cdiv(B*L, 4)*128, 1, 1); ``src``
    (B, S*K) and ``start`` (B, L+1) int32 from `_by_row`. Output ``dkv`` (B, L, D) in kv's dtype."""
    b, s, h, d = q.shape
    n_rows = kv.shape[1]
    tmpl = [("T", q.dtype), ("B", b), ("S", s), ("H", h), ("D", d), ("L", n_rows), ("K", src.shape[-1] // s),
            ("NSG", _DKV_ROWS)]
    return Launch(BWD_DKV, [q, do, kv, lse, delta, src, start, scalar(scale)], tmpl,
                  (cdiv(b * n_rows, _DKV_ROWS) * _DKV_ROWS * 32, 1, 1), (_DKV_ROWS * 32, 1, 1), [(b, n_rows, d)],
                  [kv.dtype])


def _by_row(idx: mx.array, n_rows: int) -> tuple[mx.array, mx.array]:
    """The selection inverted (CSR): ``src`` (B, S*K) int32, the queries that selected each row of ``kv``, rows in
    order (queries in order within a row: ``mx.argsort`` is stable; empty slots last), and ``start`` (B, L+1) int32,
    row l's queries being ``src[b, start[b, l]:start[b, l + 1]]``. ``idx`` from `_clean`."""
    b, _, k = idx.shape
    key = mx.where(idx < 0, n_rows, idx).reshape(b, -1)  # empty slots sort last
    src = (mx.argsort(key, axis=-1) // k).astype(mx.int32)
    counts = mx.zeros((b, n_rows + 1), mx.int32).at[mx.arange(b)[:, None], key].add(1)
    start = mx.concatenate([mx.zeros((b, 1), mx.int32), mx.cumsum(counts[:, :n_rows], axis=-1)], axis=-1)
    return src, start.astype(mx.int32)


def _sink_attention_metal(q, kv, sinks, indices, scale, runner=None):
    """The Metal forward: returns (o, lse)."""
    return tuple(run(runner, sink_attention_fwd_launch(q, kv, sinks, _clean(indices, kv.shape[1]), scale)))


def _sink_attention_metal_bwd(q, kv, sinks, indices, o, lse, do, scale, runner=None):
    """The Metal VJP: returns (dq in q's dtype, dkv in kv's, dsinks in sinks')."""
    idx = _clean(indices, kv.shape[1])
    delta = (f32(o) * f32(do)).sum(-1)  # (B, S, H)
    (dq,) = run(runner, sink_attention_bwd_dq_launch(q, do, kv, idx, lse, delta, scale))
    src, start = _by_row(idx, kv.shape[1])
    (dkv,) = run(runner, sink_attention_bwd_dkv_launch(q, do, kv, lse, delta, src, start, scale))
    dsinks = -(mx.exp(f32(sinks) - lse) * delta).sum(axis=(0, 1))  # d/dsink of softmax([z; sink]) without its share
    return dq, dkv, dsinks.astype(sinks.dtype)


@cache
def _sink_attention_custom(scale: float):
    @mx.custom_function
    def f(q, kv, sinks, indices):
        return _sink_attention_metal(q, kv, sinks, indices, scale)

    @f.vjp
    def f_vjp(primals, cotangents, outputs):
        q, kv, sinks, indices = primals
        dq, dkv, dsinks = _sink_attention_metal_bwd(q, kv, sinks, indices, outputs[0], outputs[1], cotangents[0],
                                                    scale)
        return dq, dkv, dsinks, mx.zeros_like(indices)

    del f_vjp
    return f


def _self_check(dtype, h: int, d: int) -> None:
    """Metal forward and backward against the pure-MLX path: 2 queries of ``h`` heads over 9 rows, 5 slots with an
    empty one and a query that selects nothing."""
    q, kv, g = sample((1, 2, h, d), 1, dtype), sample((1, 9, d), 2, dtype), sample((1, 2, h, d), 3, dtype)
    sinks, idx = sample((h,), 4), mx.array([[[3, 0, -1, 8, 5], [-1, -1, -1, -1, -1]]], dtype=mx.int32)
    o, lse = _sink_attention_metal(q, kv, sinks, idx, d**-0.5)
    grads = _sink_attention_metal_bwd(q, kv, sinks, idx, o, lse, g, d**-0.5)
    want, want_grads = mx.vjp(lambda a, c, e: sink_attention_mlx(a, c, e, idx, d**-0.5), [q, kv, sinks], [g])
    check_close("sink_attention", o, want[0], dtype)
    for name, got, ref in zip(("dq", "dkv", "dsinks"), grads, want_grads, strict=True):
        check_close(f"sink_attention {name}", got, ref, dtype)


def sink_attention(q: mx.array, kv: mx.array, sinks: mx.array, indices: mx.array, scale: float) -> mx.array:
    """Attention with a sink per head over selected shared key-value rows, as `reference.sink_attention.sink_attention`.

    ``q`` (B, S, H, D), ``kv`` (B, L, D) of one float dtype (each row key and value at once), ``sinks`` (H,) float
    (float32 in V4: one logit per head, no value), ``indices`` (B, S, K) integer: the rows query s attends to,
    distinct within a query, in any order, -1 or any value outside [0, L) an empty slot. Returns (B, S, H, D) in
    ``q.dtype``: ``sum_k p_k kv[idx_k]`` with ``p = softmax([scale q . kv_k for valid k; sinks[h]])`` without the
    sink's share, in float32; a query with no valid index gets zeros. Differentiable in ``q``, ``kv`` and ``sinks``
    on both paths (Metal: a custom VJP with its own kernels). Raises TypeError on non-float q, kv, sinks or
    non-integer indices, ValueError on mismatched shapes. Source: DeepSeek-V4 report section 2.3; Xiao et al. 2023.
    """
    for name, a in (("q", q), ("kv", kv), ("sinks", sinks)):
        check_float(name, a)
    if q.ndim != 4:
        raise ValueError(f"q: expected (B, S, H, D), got {tuple(q.shape)}")
    b, s, h, d = q.shape
    check_shape("kv", kv, (b, None, d))
    check_shape("sinks", sinks, (h,))
    if not isinstance(indices, mx.array) or not mx.issubdtype(indices.dtype, mx.integer):
        raise TypeError(f"indices: expected an integer mx.array, got {getattr(indices, 'dtype', type(indices))}")
    check_shape("indices", indices, (b, s, None))
    if kv.dtype != q.dtype:
        raise TypeError(f"kv: expected q's dtype {q.dtype}, got {kv.dtype}")
    key = (q.dtype, h, d)
    if use_metal("sink_attention", key, lambda: _self_check(*key)):
        return _sink_attention_custom(float(scale))(q, kv, sinks, indices)[0]
    return sink_attention_mlx(q, kv, sinks, indices, scale)
