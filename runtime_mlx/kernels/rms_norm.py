"""RMSNorm in MLX: the Metal kernels of ``kernels/metal/rms_norm.metal`` (forward, and a backward of two launches
as a custom VJP) or the pure-MLX formula. Reference: `reference.rms_norm.rms_norm`."""

from __future__ import annotations

from functools import cache

import mlx.core as mx

from .launch import (
    Launch,
    cdiv,
    check_close,
    check_float,
    check_shape,
    f32,
    run,
    sample,
    scalar,
    spec,
    tg_size,
    use_metal,
)

FWD = spec("rms_norm_fwd", "rms_norm", "x w eps", "out rstd")
BWD_DX = spec("rms_norm_bwd_dx", "rms_norm", "x w g eps", "dx rstd")
BWD_DW = spec("rms_norm_bwd_dw", "rms_norm", "x g rstd", "dw")


def rms_norm_mlx(x: mx.array, weight: mx.array, eps: float) -> mx.array:
    """Pure MLX: ``weight * (x * rsqrt(mean(x**2, -1) + eps)).astype(x.dtype)``, computed in float32."""
    xf = f32(x)
    y = xf * mx.rsqrt(mx.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight * y.astype(x.dtype)


def rms_norm_launch(x2: mx.array, weight: mx.array, eps: float) -> Launch:
    """Forward launch over rows ``x2`` (N, D): one threadgroup of ``TG`` threads (32..256) per row, grid
    (N * TG, 1, 1); outputs ``out`` (N, D) in ``promote(x, weight)`` and ``rstd`` (N,) float32 (saved for the
    backward)."""
    n, d = x2.shape
    tg = tg_size(d)
    out_dtype = mx.result_type(x2, weight)
    return Launch(FWD, [x2, weight, scalar(eps)],
                  [("T", x2.dtype), ("W", weight.dtype), ("O", out_dtype), ("D", d), ("TG", tg)],
                  (n * tg, 1, 1), (tg, 1, 1), [(n, d), (n,)], [out_dtype, mx.float32])


def rms_norm_bwd_dx_launch(x2, weight, g2, eps) -> Launch:
    """Backward, first launch: ``dx`` (N, D) in x's dtype and ``rstd`` (N,) float32 (recomputed in the same pass),
    one threadgroup per row as the forward."""
    n, d = x2.shape
    tg = tg_size(d)
    return Launch(BWD_DX, [x2, weight, g2, scalar(eps)],
                  [("T", x2.dtype), ("W", weight.dtype), ("G", g2.dtype), ("D", d), ("TG", tg)],
                  (n * tg, 1, 1), (tg, 1, 1), [(n, d), (n,)], [x2.dtype, mx.float32])


def rms_norm_bwd_dw_launch(x2, g2, rstd) -> Launch:
    """Backward, second launch: ``dw`` (D,) float32, one thread per column summing over the N rows, grid (D rounded
    up to the threadgroup, 1, 1), threadgroup (32..256, 1, 1)."""
    n, d = x2.shape
    tw = min(256, 32 * cdiv(d, 32))
    return Launch(BWD_DW, [x2, g2, rstd], [("T", x2.dtype), ("G", g2.dtype), ("N", n), ("D", d)],
                  (tw * cdiv(d, tw), 1, 1), (tw, 1, 1), [(d,)], [mx.float32])


def _rms_norm_metal(x, weight, eps, runner=None):
    """The Metal path of `rms_norm`, forward only: returns (out, rstd). ``runner`` runs a `Launch`."""
    d = x.shape[-1]
    out, rstd = run(runner, rms_norm_launch(x.reshape(-1, d), weight, eps))
    return out.reshape(x.shape), rstd


def _rms_norm_metal_bwd(x, weight, g, eps, runner=None):
    """The Metal VJP of `rms_norm`: returns (dx in x's shape and dtype, dw (D,) in weight's dtype)."""
    d = x.shape[-1]
    x2, g2 = x.reshape(-1, d), g.reshape(-1, d)
    dx, rstd = run(runner, rms_norm_bwd_dx_launch(x2, weight, g2, eps))
    (dw,) = run(runner, rms_norm_bwd_dw_launch(x2, g2, rstd))
    return dx.reshape(x.shape), dw.astype(weight.dtype)


@cache
def _rms_norm_custom(eps: float):
    @mx.custom_function
    def f(x, weight):
        return _rms_norm_metal(x, weight, eps)[0]

    @f.vjp
    def f_vjp(primals, cotangent, output):
        x, weight = primals
        return _rms_norm_metal_bwd(x, weight, cotangent, eps)

    del f_vjp
    return f


def _self_check(x_dtype, w_dtype, d: int) -> None:
    """Metal forward and backward against the pure-MLX path on 3 rows of length ``d`` (raises on a mismatch)."""
    x, w, g = sample((3, d), 1, x_dtype), sample((d,), 2, w_dtype), sample((3, d), 3, x_dtype)
    out = _rms_norm_metal(x, w, 1e-6)[0]
    dx, dw = _rms_norm_metal_bwd(x, w, g, 1e-6)
    want, (want_dx, want_dw) = mx.vjp(lambda a, b: rms_norm_mlx(a, b, 1e-6), [x, w], [g])
    check_close("rms_norm", out, want[0], x_dtype)
    check_close("rms_norm dx", dx, want_dx, x_dtype)
    check_close("rms_norm dw", dw, want_dw, x_dtype)


def rms_norm(x: mx.array, weight: mx.array, eps: float = 1e-6) -> mx.array:
    """RMSNorm over the last dimension, as `reference.rms_norm.rms_norm`.

    ``x`` (..., D) float32/float16/bfloat16, ``weight`` (D,) float; returns (..., D) in
    ``promote(x.dtype, weight.dtype)``: ``weight * (x * rsqrt(mean(x**2) + eps)).astype(x.dtype)`` with the
    reduction in float32. Differentiable in ``x`` and ``weight`` on both paths (Metal: a custom VJP with its own
    kernels). Raises TypeError on non-float inputs, ValueError if ``weight`` is not (D,).
    Source: Zhang & Sennrich 2019; DeepSeek-V3 uses it before attention, MoE and on the latents.
    """
    check_float("x", x)
    check_float("weight", weight)
    check_shape("weight", weight, (x.shape[-1],))
    key = (x.dtype, weight.dtype, x.shape[-1])
    if use_metal("rms_norm", key, lambda: _self_check(*key)):
        return _rms_norm_custom(float(eps))(x, weight)
    return rms_norm_mlx(x, weight, eps)
