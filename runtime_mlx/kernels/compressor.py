"""DeepSeek-V4's KV compressors in MLX. `gated_pool`: the Metal kernels of ``kernels/metal/compressor.metal`` (forward,
and a backward kernel as the custom VJP) or the pure-MLX formula. `compressed_topk` (CSA's indexer top-k): the hidden
scores as -inf, then DSA's top-k (`runtime_mlx.kernels.dsa`: its Metal kernel or ``mx.argsort``) over every entry.
Reference: `reference.compressor.gated_pool`, `reference.compressor.compressed_topk`."""

from __future__ import annotations

from functools import cache, partial

import mlx.core as mx

from .dsa import _indexer_topk_metal, indexer_topk_mlx
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
    spec,
    tg_size,
    use_metal,
)

FWD = spec("gated_pool_fwd", "compressor", "kv gate bias prior_kv prior_gate", "out")
BWD = spec("gated_pool_bwd", "compressor", "kv gate bias prior_kv prior_gate dy",
           "dkv dgate dprior_kv dprior_gate")


def gated_pool_mlx(kv: mx.array, gate: mx.array, position_bias: mx.array, overlap: bool,
                   prior_kv: mx.array | None = None, prior_gate: mx.array | None = None) -> mx.array:
    """Pure MLX, the reference's formula: gates plus bias in float32, the softmax over the slots in float32, the
    weighted sum in float32, rounded once to ``kv.dtype``."""
    b, t, c = kv.shape
    m = position_bias.shape[0]
    n = t // m
    kv4 = kv.reshape(b, n, m, c)
    g = f32(gate).reshape(b, n, m, c) + f32(position_bias)
    if overlap:
        d = c // 2
        if prior_kv is None:
            first_kv, first_g = mx.zeros((b, 1, m, d), kv.dtype), mx.full((b, 1, m, d), -mx.inf, mx.float32)
        else:
            first_kv, first_g = prior_kv.astype(kv.dtype)[:, None], f32(prior_gate)[:, None]
        kv4 = mx.concatenate([mx.concatenate([first_kv, kv4[:, :-1, :, :d]], axis=1), kv4[..., d:]], axis=2)
        g = mx.concatenate([mx.concatenate([first_g, g[:, :-1, :, :d]], axis=1), g[..., d:]], axis=2)
    weights = mx.softmax(g, axis=2, precise=True)
    return (f32(kv4) * weights).sum(axis=2).astype(kv.dtype)


def _template(kv, m, overlap, has_prior) -> list:
    b, t, c = kv.shape
    return [("T", kv.dtype), ("BATCH", b), ("N", t // m), ("L", t), ("M", m), ("D", c // 2 if overlap else c),
            ("C", c), ("S", 2 * m if overlap else m), ("OVERLAP", bool(overlap)), ("HAS_PRIOR", has_prior)]


def _grid(total: int) -> tuple[tuple, tuple]:
    tg = tg_size(total)
    return (tg * cdiv(total, tg), 1, 1), (tg, 1, 1)


def _priors(kv, prior_kv, prior_gate) -> list:
    """The prior rows as the kernels take them (kv's dtype; a 1-element dummy each without them)."""
    if prior_kv is None:
        return [mx.zeros((1,), kv.dtype), mx.zeros((1,), mx.float32)]
    return [prior_kv.astype(kv.dtype), prior_gate]


def gated_pool_launch(kv, gate, bias, overlap, prior_kv=None, prior_gate=None) -> Launch:
    """Forward launch: one thread per output element (B, n, D), grid (B n D rounded up to the threadgroup of
    32..256, 1, 1); output (B, n, D) in kv's dtype."""
    b, t, c = kv.shape
    m = bias.shape[0]
    d = c // 2 if overlap else c
    grid, tg = _grid(b * (t // m) * d)
    return Launch(FWD, [kv, gate, bias, *_priors(kv, prior_kv, prior_gate)],
                  _template(kv, m, overlap, prior_kv is not None), grid, tg, [(b, t // m, d)], [kv.dtype])


def gated_pool_bwd_launch(kv, gate, bias, overlap, dy, prior_kv=None, prior_gate=None) -> Launch:
    """Backward launch, the forward's threads: dkv (B, T, C) in kv's dtype, dgate (B, T, C) float32, dprior_kv
    (B, m, D) in kv's dtype and dprior_gate (B, m, D) float32 (1-element and unwritten without prior rows)."""
    b, t, c = kv.shape
    m = bias.shape[0]
    d = c // 2 if overlap else c
    grid, tg = _grid(b * (t // m) * d)
    prior = (b, m, d) if prior_kv is not None else (1,)
    return Launch(BWD, [kv, gate, bias, *_priors(kv, prior_kv, prior_gate), dy],
                  _template(kv, m, overlap, prior_kv is not None), grid, tg, [(b, t, c), (b, t, c), prior, prior],
                  [kv.dtype, mx.float32, kv.dtype, mx.float32])


def _gated_pool_metal(kv, gate, position_bias, overlap, prior_kv=None, prior_gate=None, runner=None):
    """The Metal path of `gated_pool`, forward only. ``runner`` runs a `Launch`."""
    (out,) = run(runner, gated_pool_launch(kv, gate, position_bias, overlap, prior_kv, prior_gate))
    return out


def _gated_pool_metal_bwd(kv, gate, position_bias, overlap, dy, prior_kv=None, prior_gate=None, runner=None):
    """The Metal VJP of `gated_pool`: ``(dkv, dgate, dposition_bias, dprior_kv, dprior_gate)`` in their inputs'
    dtypes (the last two None without prior rows); dposition_bias sums the float32 dgate over batch and windows."""
    b, t, c = kv.shape
    m = position_bias.shape[0]
    dkv, dgate, dpkv, dpgate = run(runner, gated_pool_bwd_launch(kv, gate, position_bias, overlap, dy, prior_kv,
                                                                 prior_gate))
    dbias = dgate.reshape(b, t // m, m, c).sum(axis=(0, 1)).astype(position_bias.dtype)
    if prior_kv is None:
        return dkv, dgate.astype(gate.dtype), dbias, None, None
    return dkv, dgate.astype(gate.dtype), dbias, dpkv.astype(prior_kv.dtype), dpgate.astype(prior_gate.dtype)


@cache
def _gated_pool_custom(overlap: bool, has_prior: bool):
    @mx.custom_function
    def f(kv, gate, position_bias, *prior):
        return _gated_pool_metal(kv, gate, position_bias, overlap, *prior)

    @f.vjp
    def f_vjp(primals, cotangent, output):
        kv, gate, position_bias, *prior = primals
        grads = _gated_pool_metal_bwd(kv, gate, position_bias, overlap, cotangent, *prior)
        return grads if has_prior else grads[:3]

    del f_vjp
    return f


def _self_check(dtype, bias_dtype, m: int, d: int, overlap: bool, has_prior: bool) -> None:
    """Metal forward and backward against the pure-MLX path on 2 sequences of 3 windows (raises on a mismatch)."""
    c = 2 * d if overlap else d
    args = [sample((2, 3 * m, c), 1, dtype), sample((2, 3 * m, c), 2, dtype), sample((m, c), 3, bias_dtype)]
    if has_prior:
        args += [sample((2, m, d), 4, dtype), sample((2, m, d), 5)]
    g = sample((2, 3, d), 6, dtype)
    out = _gated_pool_metal(args[0], args[1], args[2], overlap, *args[3:])
    grads = _gated_pool_metal_bwd(args[0], args[1], args[2], overlap, g, *args[3:])
    want, want_grads = mx.vjp(lambda *a: gated_pool_mlx(a[0], a[1], a[2], overlap, *a[3:]), args, [g])
    check_close("gated_pool", out, want[0], dtype)
    for name, got, ref in zip(("dkv", "dgate", "dposition_bias", "dprior_kv", "dprior_gate"), grads, want_grads,
                              strict=False):
        check_close(f"gated_pool {name}", got, ref, dtype)


def gated_pool(kv: mx.array, gate: mx.array, position_bias: mx.array, overlap: bool,
               prior_kv: mx.array | None = None, prior_gate: mx.array | None = None) -> mx.array:
    """DeepSeek-V4's compressor pooling, as `reference.compressor.gated_pool`: (B, T / m, D) in ``kv.dtype``.

    ``kv``, ``gate`` (B, T, C) float, T a multiple of m; ``position_bias`` (m, C) float (float32 in V4);
    ``overlap``: CSA (C = 2 D; entry w pools window w - 1's first halves and window w's second halves, 2 m slots)
    or HCA (C = D, m slots); ``prior_kv``, ``prior_gate`` (B, m, D): the previous call's last window for CSA's
    window 0 (ignored for HCA, as by the reference). The softmax over the slots and the weighted sum run in float32.
    Differentiable in kv, gate, position_bias and the prior rows on both paths (Metal: a backward kernel as the
    custom VJP, dposition_bias summed from its float32 dgate). Raises TypeError on non-float inputs, ValueError on
    mismatched shapes, T not a multiple of m, an odd C with ``overlap``, or only one of the prior rows. Inputs of
    2**31 elements or more take the pure-MLX path (the kernels index with 32-bit integers). Source: DeepSeek-V4
    report section 2.3.1 eqs. 9-12, 2.3.2 eqs. 20-23.
    """
    for name, a in (("kv", kv), ("gate", gate), ("position_bias", position_bias)):
        check_float(name, a)
    if kv.ndim != 3:
        raise ValueError(f"kv: expected shape (B, T, C), got {tuple(kv.shape)}")
    b, t, c = kv.shape
    check_shape("gate", gate, (b, t, c))
    check_shape("position_bias", position_bias, (None, c))
    m = position_bias.shape[0]
    if m == 0 or t % m:
        raise ValueError(f"gated_pool: T={t} must be a multiple of m={m} (position_bias rows)")
    if overlap and c % 2:
        raise ValueError(f"gated_pool: overlap needs an even width C = 2 D, got C={c}")
    prior = []
    if overlap and (prior_kv is not None or prior_gate is not None):
        if prior_kv is None or prior_gate is None:
            raise ValueError("gated_pool: prior_kv and prior_gate go together (both or neither)")
        for name, a in (("prior_kv", prior_kv), ("prior_gate", prior_gate)):
            check_float(name, a)
            check_shape(name, a, (b, m, c // 2))
        prior = [prior_kv, prior_gate]
    key = (kv.dtype, position_bias.dtype, m, c // 2 if overlap else c, bool(overlap), bool(prior))
    if 0 < b * t * c < 2**31 and use_metal("gated_pool", key, lambda: _self_check(*key)):  # 32-bit indices
        return _gated_pool_custom(bool(overlap), bool(prior))(kv, gate.astype(kv.dtype), position_bias, *prior)
    return gated_pool_mlx(kv, gate, position_bias, overlap, *prior)


def _masked_topk(topk_rows, scores: mx.array, visible: mx.array, topk: int) -> mx.array:
    """`compressed_topk` through a DSA top-k ``topk_rows(scores (N, 1, C), topk)``: one query per row sees all C
    entries, the hidden ones scored -inf; a selected hidden entry (a tie at -inf) becomes -1, as in the reference."""
    b, s, c = scores.shape
    if b * s * c == 0:
        return mx.full((b, s, min(topk, c)), -1, mx.int32)
    rows = mx.where(visible, f32(scores), -mx.inf).reshape(b * s, 1, c)
    idx = topk_rows(rows, topk).reshape(b, s, -1)
    return mx.where(mx.take_along_axis(mx.broadcast_to(visible, scores.shape), idx, axis=-1), idx, -1)


def compressed_topk_mlx(scores: mx.array, visible: mx.array, topk: int) -> mx.array:
    """Pure MLX `compressed_topk` (same contract): `runtime_mlx.kernels.dsa.indexer_topk_mlx`'s stable
    ``mx.argsort`` over the masked scores."""
    return _masked_topk(indexer_topk_mlx, scores, visible, topk)


def _compressed_topk_metal(scores: mx.array, visible: mx.array, topk: int, runner=None) -> mx.array:
    """The Metal path of `compressed_topk`: DSA's ``indexer_topk`` kernel over the masked scores, one threadgroup per
    query, O(C^2 / 128) comparisons per thread."""
    return _masked_topk(partial(_indexer_topk_metal, runner=runner), scores, visible, topk)


def _check_topk() -> None:
    """The Metal path against the pure-MLX path: 3 queries over 150 entries (two tiles), scores on a 0.5 grid (exact
    ties), a random mask, some visible -inf; K = 20 and K = 150 (-1 slots)."""
    scores = mx.round(sample((1, 3, 150), 1) * 2) / 2
    scores = mx.where(sample((1, 3, 150), 2) > 1.5, -mx.inf, scores)
    visible = sample((1, 3, 150), 3) > -0.5
    for kk in (20, 150):
        check_equal(f"compressed_topk (topk={kk})", _compressed_topk_metal(scores, visible, kk),
                    compressed_topk_mlx(scores, visible, kk))


def compressed_topk(scores: mx.array, visible: mx.array, topk: int) -> mx.array:
    """CSA's top-k of the indexer scores, as `reference.compressor.compressed_topk` (and
    `kernels.triton.compressor.compressed_topk`): int32 (B, S, k) entry indices (MLX's index dtype; the reference
    and Triton return int64), ``k = min(topk, C)``, best first, -1 for slots a query cannot fill.

    ``scores`` (B, S, C) float (ranked in float32); ``visible`` (S, C) or (B, S, C) bool
    (`runtime_mlx.v4_model.visible_entries`): hidden entries never take a slot. Exact ties go to the lower index
    (-0.0 equals 0.0), a NaN ranks first (here NaN and +inf tie); a visible -inf ties with the hidden entries, the
    lower index first, as the reference's stable sort. Empty inputs (C = 0 before the first window closes) give an
    empty result. Raises TypeError on non-float scores or a non-bool mask, ValueError on a bad shape or topk < 1.
    The Metal path is DSA's top-k kernel (O(C^2) comparisons per query, fine for short contexts). Source:
    DeepSeek-V4 report section 2.3.1 eq. 17.
    """
    check_float("scores", scores)
    if scores.ndim != 3:
        raise ValueError(f"scores: expected (B, S, C), got {tuple(scores.shape)}")
    b, s, c = scores.shape
    if not isinstance(visible, mx.array) or visible.dtype != mx.bool_:
        raise TypeError(f"visible: expected a bool mx.array, got {getattr(visible, 'dtype', type(visible).__name__)}")
    check_shape("visible", visible, (s, c) if visible.ndim == 2 else (b, s, c))
    if not isinstance(topk, int) or topk < 1:
        raise ValueError(f"topk must be an int >= 1, got {topk!r}")
    if b * s * c and use_metal("compressed_topk", (), _check_topk):
        return _compressed_topk_metal(scores, visible, topk)
    return compressed_topk_mlx(scores, visible, topk)
