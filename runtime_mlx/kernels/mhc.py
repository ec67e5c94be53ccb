"""mHC (DeepSeek-V4's manifold-constrained hyper-connections) in MLX: `mhc_pre` and `mhc_post`, each the Metal
kernels of ``kernels/metal/mhc.metal`` (forward, and a backward as a custom VJP) or a pure-MLX path. Reference:
`reference.mhc.mhc_pre` and `reference.mhc.mhc_post`; Triton: `kernels.triton.mhc`.

Metal path of `mhc_pre`: one threadgroup per token for the forward (RMS, the (2 + N) N mixes, sigmoids, softmax,
Sinkhorn-Knopp, collapse) and one for the backward (the same reductions plus ``<dcollapsed, x_j>``, the N-sized
math backward with Sinkhorn-Knopp recomputed from its start for every iteration pair, nothing stored per iteration,
then dstreams). The gradients that sum over tokens are MLX ops on the kernel's per-token outputs: ``dfn = dmix^T
@ (x * rstd)`` (one matmul), dbase and dscale (sums). ``fn``, ``base`` and ``scale`` (and ``post``/``comb`` of
`mhc_post`) enter the kernels as float32; their gradients come back in their own dtype through MLX's ``astype``.
"""

from __future__ import annotations

from functools import cache

import mlx.core as mx

from .launch import Launch, check_close, check_float, check_shape, f32, run, sample, scalar, spec, tg_size, use_metal

PRE_FWD = spec("mhc_pre_fwd", "mhc", "x fn base scale hc_eps rms_eps", "coll post comb")
PRE_BWD = spec("mhc_pre_bwd", "mhc", "x fn base scale gc gpost gcomb hc_eps rms_eps", "dx dz mixes rstd")
POST_FWD = spec("mhc_post_fwd", "mhc", "bo post comb x", "out")
POST_BWD = spec("mhc_post_bwd", "mhc", "bo post comb x g", "dbo dx dpost dcomb")


# ----------------------------------------------------------------------------- pure MLX


def sinkhorn_knopp_mlx(m: mx.array, iters: int, eps: float) -> mx.array:
    """`reference.mhc.sinkhorn_knopp` in MLX: the columns, then ``iters - 1`` times the rows and the columns."""
    m = m / (m.sum(axis=-2, keepdims=True) + eps)
    for _ in range(iters - 1):
        m = m / (m.sum(axis=-1, keepdims=True) + eps)
        m = m / (m.sum(axis=-2, keepdims=True) + eps)
    return m


def mhc_pre_mlx(streams, fn, base, scale, sinkhorn_iters, hc_eps, rms_norm_eps):
    """Pure MLX `mhc_pre` (same contract), everything but the collapse's inputs in float32."""
    b, s, n, d = streams.shape
    flat = f32(streams).reshape(b, s, n * d)
    mixes = (flat * mx.rsqrt(mx.mean(flat * flat, axis=-1, keepdims=True) + rms_norm_eps)) @ f32(fn).T
    base, scale = f32(base), f32(scale)
    pre = mx.sigmoid(mixes[..., :n] * scale[0] + base[:n]) + hc_eps
    post = 2 * mx.sigmoid(mixes[..., n:2 * n] * scale[1] + base[n:2 * n])
    logits = (mixes[..., 2 * n:] * scale[2] + base[2 * n:]).reshape(b, s, n, n)
    comb = sinkhorn_knopp_mlx(mx.softmax(logits, axis=-1, precise=True) + hc_eps, sinkhorn_iters, hc_eps)
    collapsed = (pre[..., None] * f32(streams)).sum(axis=2).astype(streams.dtype)
    return collapsed, post, comb


def mhc_post_mlx(block_out, post, comb, streams):
    """Pure MLX `mhc_post` (same contract): post and comb cast to the streams' dtype first, as the reference."""
    dt = streams.dtype
    return post.astype(dt)[..., None] * block_out[..., None, :] + comb.astype(dt).swapaxes(-1, -2) @ streams


# ----------------------------------------------------------------------------- launches


def mhc_pre_launch(x, fn, base, scale, iters, hc_eps, rms_eps) -> Launch:
    """Forward over the streams ``x`` (T, N, D): one threadgroup of TG (32..256) threads per token, grid (T * TG,
    1, 1); ``fn``, ``base``, ``scale`` float32. Outputs: coll (T, D) in x's dtype, post (T, N) and comb (T, N, N)
    float32."""
    t, n, d = x.shape
    tg = tg_size(n * d)
    return Launch(PRE_FWD, [x, fn, base, scale, scalar(hc_eps), scalar(rms_eps)],
                  [("X", x.dtype), ("N", n), ("D", d), ("ITERS", iters), ("TG", tg)],
                  (t * tg, 1, 1), (tg, 1, 1), [(t, d), (t, n), (t, n, n)], [x.dtype, mx.float32, mx.float32])


def mhc_pre_bwd_launch(x, fn, base, scale, gc, gpost, gcomb, iters, hc_eps, rms_eps) -> Launch:
    """Backward: one threadgroup per token as the forward, for the cotangents ``gc`` (T, D), ``gpost`` (T, N) and
    ``gcomb`` (T, N, N) float32. Outputs: dx (T, N, D) in x's dtype; dz, mixes (T, M) and rstd (T,) float32."""
    t, n, d = x.shape
    m = fn.shape[0]
    tg = tg_size(n * d)
    return Launch(PRE_BWD, [x, fn, base, scale, gc, gpost, gcomb, scalar(hc_eps), scalar(rms_eps)],
                  [("X", x.dtype), ("G", gc.dtype), ("N", n), ("D", d), ("ITERS", iters), ("TG", tg)],
                  (t * tg, 1, 1), (tg, 1, 1), [(t, n, d), (t, m), (t, m), (t,)],
                  [x.dtype, mx.float32, mx.float32, mx.float32])


def mhc_post_launch(bo, post, comb, x) -> Launch:
    """Forward of `mhc_post` over ``x`` (T, N, D): one thread per output element, grid (D, N, T), threadgroup
    (32..256, 1, 1); ``post``, ``comb`` float32. Output (T, N, D) in x's dtype."""
    t, n, d = x.shape
    return Launch(POST_FWD, [bo, post, comb, x], [("X", x.dtype), ("N", n), ("D", d)],
                  (d, n, t), (tg_size(d), 1, 1), [(t, n, d)], [x.dtype])


def mhc_post_bwd_launch(bo, post, comb, x, g) -> Launch:
    """Backward of `mhc_post`: one threadgroup of TG (32..256) threads per token, grid (T * TG, 1, 1). Outputs dbo
    (T, D), dx (T, N, D) in x's dtype, dpost (T, N) and dcomb (T, N, N) float32."""
    t, n, d = x.shape
    tg = tg_size(d)
    return Launch(POST_BWD, [bo, post, comb, x, g], [("X", x.dtype), ("G", g.dtype), ("N", n), ("D", d), ("TG", tg)],
                  (t * tg, 1, 1), (tg, 1, 1), [(t, d), (t, n, d), (t, n), (t, n, n)],
                  [x.dtype, x.dtype, mx.float32, mx.float32])


# ----------------------------------------------------------------------------- Metal paths


def _mhc_pre_metal(streams, fn, base, scale, sinkhorn_iters, hc_eps, rms_norm_eps, runner=None):
    """The Metal forward of `mhc_pre` on float32 ``fn``/``base``/``scale``: ``(collapsed, post, comb)``."""
    b, s, n, d = streams.shape
    if b * s == 0:
        return mhc_pre_mlx(streams, fn, base, scale, sinkhorn_iters, hc_eps, rms_norm_eps)
    coll, post, comb = run(runner, mhc_pre_launch(streams.reshape(b * s, n, d), fn, base, scale, sinkhorn_iters,
                                                  hc_eps, rms_norm_eps))
    return coll.reshape(b, s, d), post.reshape(b, s, n), comb.reshape(b, s, n, n)


def _mhc_pre_metal_bwd(streams, fn, base, scale, sinkhorn_iters, hc_eps, rms_norm_eps, gc, gpost, gcomb,
                       runner=None):
    """The Metal VJP of `mhc_pre` for the cotangents of (collapsed, post, comb): ``(dstreams, dfn, dbase, dscale)``,
    the last three float32."""
    b, s, n, d = streams.shape
    t = b * s
    if t == 0:
        return mx.zeros_like(streams), mx.zeros_like(fn), mx.zeros_like(base), mx.zeros_like(scale)
    x = streams.reshape(t, n, d)
    dx, dz, mixes, rstd = run(runner, mhc_pre_bwd_launch(x, fn, base, scale, gc.reshape(t, d),
                                                         f32(gpost).reshape(t, n), f32(gcomb).reshape(t, n, n),
                                                         sinkhorn_iters, hc_eps, rms_norm_eps))
    part = mx.array([0] * n + [1] * n + [2] * (n * n))
    dmix = dz * scale[part]
    dfn = dmix.T @ (f32(x).reshape(t, n * d) * rstd[:, None])
    dscale = mx.zeros((3,), mx.float32).at[part].add((dz * mixes).sum(axis=0))
    return dx.reshape(streams.shape), dfn, dz.sum(axis=0), dscale


def _mhc_post_metal(block_out, post, comb, streams, runner=None):
    """The Metal forward of `mhc_post` on float32 ``post``/``comb``."""
    b, s, n, d = streams.shape
    if b * s == 0:
        return mhc_post_mlx(block_out, post, comb, streams)
    t = b * s
    (out,) = run(runner, mhc_post_launch(block_out.reshape(t, d), post.reshape(t, n), comb.reshape(t, n, n),
                                         streams.reshape(t, n, d)))
    return out.reshape(streams.shape)


def _mhc_post_metal_bwd(block_out, post, comb, streams, g, runner=None):
    """The Metal VJP of `mhc_post`: ``(dblock_out, dpost, dcomb, dstreams)``, dpost and dcomb float32."""
    b, s, n, d = streams.shape
    t = b * s
    if t == 0:
        return tuple(mx.zeros_like(a) for a in (block_out, post, comb, streams))
    dbo, dx, dpost, dcomb = run(runner, mhc_post_bwd_launch(block_out.reshape(t, d), post.reshape(t, n),
                                                            comb.reshape(t, n, n), streams.reshape(t, n, d),
                                                            g.reshape(t, n, d)))
    return dbo.reshape(block_out.shape), dpost.reshape(post.shape), dcomb.reshape(comb.shape), dx.reshape(streams.shape)


@cache
def _mhc_pre_custom(sinkhorn_iters: int, hc_eps: float, rms_norm_eps: float):
    @mx.custom_function
    def f(streams, fn, base, scale):
        return _mhc_pre_metal(streams, fn, base, scale, sinkhorn_iters, hc_eps, rms_norm_eps)

    @f.vjp
    def f_vjp(primals, cotangents, outputs):
        return _mhc_pre_metal_bwd(*primals, sinkhorn_iters, hc_eps, rms_norm_eps, *cotangents)

    del f_vjp
    return f


@mx.custom_function
def _mhc_post_custom(block_out, post, comb, streams):
    return _mhc_post_metal(block_out, post, comb, streams)


@_mhc_post_custom.vjp
def _mhc_post_custom_vjp(primals, cotangent, output):
    return _mhc_post_metal_bwd(*primals, cotangent)


# ----------------------------------------------------------------------------- self-checks and the ops


def _pre_args(dtype, n: int, d: int):
    """A self-check input of `mhc_pre`: 3 tokens, weights as the op's spec draws them (O(1) mixes)."""
    m = (2 + n) * n
    return (sample((1, 3, n, d), 1, dtype), sample((m, n * d), 2) * (n * d) ** -0.5, sample((m,), 3),
            1.0 + 0.5 * sample((3,), 4))


def _check_pre(dtype, n: int, d: int, iters: int) -> None:
    """Metal forward and backward of `mhc_pre` against the pure-MLX path (raises on a mismatch)."""
    args = _pre_args(dtype, n, d)
    cots = [sample((1, 3, d), 5, dtype), sample((1, 3, n), 6), sample((1, 3, n, n), 7)]
    got = _mhc_pre_metal(*args, iters, 1e-6, 1e-6)
    grads = _mhc_pre_metal_bwd(*args, iters, 1e-6, 1e-6, *cots)
    want, want_grads = mx.vjp(lambda *a: mhc_pre_mlx(*a, iters, 1e-6, 1e-6), list(args), cots)
    for name, a, w in zip(("collapsed", "post", "comb", "dstreams", "dfn", "dbase", "dscale"), (*got, *grads),
                          (*want, *want_grads), strict=True):
        check_close(f"mhc_pre {name}", a, w, dtype)


def _check_post(dtype, n: int, d: int) -> None:
    """Metal forward and backward of `mhc_post` against the pure-MLX path (raises on a mismatch)."""
    args = (sample((1, 3, d), 1, dtype), 2 * mx.sigmoid(sample((1, 3, n), 2)),
            sinkhorn_knopp_mlx(mx.softmax(sample((1, 3, n, n), 3), axis=-1), 20, 1e-6), sample((1, 3, n, d), 4, dtype))
    g = sample((1, 3, n, d), 5, dtype)
    want, want_grads = mx.vjp(mhc_post_mlx, list(args), [g])
    check_close("mhc_post", _mhc_post_metal(*args), want[0], dtype)
    for name, a, w in zip(("dblock_out", "dpost", "dcomb", "dstreams"), _mhc_post_metal_bwd(*args, g), want_grads,
                          strict=True):
        check_close(f"mhc_post {name}", a, w, dtype)


def mhc_pre(streams: mx.array, fn: mx.array, base: mx.array, scale: mx.array, sinkhorn_iters: int, hc_eps: float,
            rms_norm_eps: float) -> tuple[mx.array, mx.array, mx.array]:
    """The mHC op before a block, as `reference.mhc.mhc_pre` (mHC section 3; DeepSeek-V4's ``hc_pre``).

    ``streams`` (B, S, N, D) float32/float16/bfloat16; ``fn`` ((2 + N) N, N D), ``base`` ((2 + N) N,), ``scale``
    (3,) float (float32 in the model); ``sinkhorn_iters`` >= 1. Returns ``(collapsed, post, comb)``: collapsed
    (B, S, D) in the streams' dtype, post (B, S, N) and comb (B, S, N, N) float32. Differentiable in streams, fn,
    base and scale on both paths (Metal: a custom VJP with its own kernel). Raises TypeError on non-float inputs,
    ValueError on mismatched shapes or ``sinkhorn_iters`` < 1.
    """
    for name, a in (("streams", streams), ("fn", fn), ("base", base), ("scale", scale)):
        check_float(name, a)
    if streams.ndim != 4:
        raise ValueError(f"streams: expected (B, S, N, D), got {tuple(streams.shape)}")
    n, d = streams.shape[2:]
    m = (2 + n) * n
    check_shape("fn", fn, (m, n * d))
    check_shape("base", base, (m,))
    check_shape("scale", scale, (3,))
    if not isinstance(sinkhorn_iters, int) or sinkhorn_iters < 1:
        raise ValueError(f"sinkhorn_iters={sinkhorn_iters!r}: expected an int >= 1")
    key = (streams.dtype, n, d, sinkhorn_iters)
    if use_metal("mhc_pre", key, lambda: _check_pre(*key)):
        f = _mhc_pre_custom(sinkhorn_iters, float(hc_eps), float(rms_norm_eps))
        return f(streams, f32(fn), f32(base), f32(scale))
    return mhc_pre_mlx(streams, fn, base, scale, sinkhorn_iters, hc_eps, rms_norm_eps)


def mhc_post(block_out: mx.array, post: mx.array, comb: mx.array, streams: mx.array) -> mx.array:
    """The mHC op after a block, as `reference.mhc.mhc_post` (DeepSeek-V4's ``hc_post``): ``out[k] = post[k] *
    block_out + sum_j comb[j, k] * streams[j]``.

    ``block_out`` (B, S, D) in the streams' dtype, ``post`` (B, S, N), ``comb`` (B, S, N, N) float (float32 from
    `mhc_pre`, rounded to the streams' dtype before use), ``streams`` (B, S, N, D) float32/float16/bfloat16.
    Returns (B, S, N, D) in the streams' dtype, differentiable in all four on both paths. Raises TypeError on
    non-float inputs or a block_out dtype other than the streams', ValueError on mismatched shapes.
    """
    for name, a in (("block_out", block_out), ("post", post), ("comb", comb), ("streams", streams)):
        check_float(name, a)
    if streams.ndim != 4:
        raise ValueError(f"streams: expected (B, S, N, D), got {tuple(streams.shape)}")
    b, s, n, d = streams.shape
    check_shape("block_out", block_out, (b, s, d))
    check_shape("post", post, (b, s, n))
    check_shape("comb", comb, (b, s, n, n))
    if block_out.dtype != streams.dtype:
        raise TypeError(f"block_out: expected the streams' dtype {streams.dtype}, got {block_out.dtype}")
    key = (streams.dtype, n, d)
    if use_metal("mhc_post", key, lambda: _check_post(*key)):
        return _mhc_post_custom(block_out, f32(post), f32(comb), streams)
    return mhc_post_mlx(block_out, post, comb, streams)
