"""Fine-grained FP8 (e4m3) in MLX: activation quantization per 1 x 128 tile and weight dequantization per 128 x 128
block, each a Metal kernel of ``kernels/metal/fp8.metal`` or a pure-MLX path, and the block-scaled GEMM
`fp8_gemm` (pure MLX). Reference: `reference.fp8`, whose ``FP8_MAX`` (448) and ``AMAX_MIN`` (1e-4) both paths use
(the Metal kernel gets them as arguments). e4m3 values travel as their uint8 bit patterns (``mx.to_fp8`` /
``torch.float8_e4m3fn.view(uint8)``)."""

from __future__ import annotations

import math

import mlx.core as mx

from reference.fp8 import AMAX_MIN, FP8_MAX

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

ACT_QUANT = spec("act_quant", "fp8", "x fp8_max amax_min", "y s")
WEIGHT_DEQUANT = spec("weight_dequant", "fp8", "w scale_inv", "out")


def act_quant_mlx(x, block_size=128):
    """Pure MLX `act_quant` (same contract)."""
    k = x.shape[-1]
    kb = cdiv(k, block_size)
    lead = x.shape[:-1]
    xp = mx.pad(f32(x), [(0, 0)] * (x.ndim - 1) + [(0, kb * block_size - k)]).reshape(*lead, kb, block_size)
    s = mx.maximum(mx.abs(xp).max(axis=-1), AMAX_MIN) / FP8_MAX
    v = xp / s[..., None]
    y = mx.where(mx.isnan(v), mx.array(0x7F, mx.uint8), mx.to_fp8(mx.clip(v, -FP8_MAX, FP8_MAX)))  # to_fp8(NaN) = 448
    y = y.reshape(*lead, kb * block_size)
    return y[..., :k], s


def weight_dequant_mlx(w, scale_inv, block_size=128, dtype=mx.float32):
    """Pure MLX `weight_dequant` (same contract)."""
    n, k = w.shape
    s = mx.repeat(mx.repeat(scale_inv, block_size, axis=0)[:n], block_size, axis=1)[:, :k]
    return (mx.from_fp8(w, dtype=mx.float32) * s).astype(dtype)


def act_quant_launch(x2, block_size) -> Launch:
    """One simdgroup (32 lanes) per 1 x block_size tile, 8 tiles per threadgroup: grid (32 * N * KB rounded up to
    256, 1, 1), threadgroup (256, 1, 1). Outputs ``y`` (N, K) uint8 e4m3 bits, ``s`` (N, KB) float32."""
    n, k = x2.shape
    kb = cdiv(k, block_size)
    threads = 32 * n * kb
    return Launch(ACT_QUANT, [x2, scalar(FP8_MAX), scalar(AMAX_MIN)],
                  [("T", x2.dtype), ("K", k), ("BS", block_size), ("NT", n * kb)],
                  (256 * cdiv(threads, 256), 1, 1), (256, 1, 1), [(n, k), (n, kb)], [mx.uint8, mx.float32])


def weight_dequant_launch(w, scale_inv, block_size, dtype) -> Launch:
    """One thread per element: grid (K rounded up to 32, N, 1), threadgroup (32, 8, 1). Output (N, K) ``dtype``."""
    n, k = w.shape
    return Launch(WEIGHT_DEQUANT, [w, scale_inv], [("O", dtype), ("N", n), ("K", k), ("BS", block_size)],
                  (32 * cdiv(k, 32), n, 1), (32, 8, 1), [(n, k)], [dtype])


def _act_quant_metal(x, block_size=128, runner=None):
    k = x.shape[-1]
    y, s = run(runner, act_quant_launch(x.reshape(-1, k), block_size))
    return y.reshape(x.shape), s.reshape(*x.shape[:-1], s.shape[-1])


def _weight_dequant_metal(w, scale_inv, block_size=128, dtype=mx.float32, runner=None):
    (out,) = run(runner, weight_dequant_launch(w, scale_inv, block_size, dtype))
    return out


def _check_act_quant(dtype, block_size) -> None:
    """The kernel against the pure-MLX path on 2 rows of 1.5 blocks: the same e4m3 bits and scales."""
    x = sample((2, block_size + block_size // 2), 1, dtype) * 10
    (y, s), (want_y, want_s) = _act_quant_metal(x, block_size), act_quant_mlx(x, block_size)
    check_equal("act_quant y", y, want_y)
    check_equal("act_quant s", s, want_s)


def _check_weight_dequant(block_size, dtype) -> None:
    """The kernel against the pure-MLX path on every e4m3 bit pattern but NaN, over 2 x 2 partial blocks."""
    bits = mx.arange(256, dtype=mx.uint32).astype(mx.uint8)
    bits = mx.where((bits & 0x7F) == 0x7F, mx.array(0, mx.uint8), bits)  # no NaN: an exact comparison
    n, k = block_size + 1, block_size + 3
    w = mx.tile(bits, (n * k) // 256 + 1)[: n * k].reshape(n, k)
    scale_inv = mx.abs(sample((2, 2), 2)) + 0.5
    want = weight_dequant_mlx(w, scale_inv, block_size, dtype)
    check_close("weight_dequant", _weight_dequant_metal(w, scale_inv, block_size, dtype), want, dtype)


def act_quant(x: mx.array, block_size: int = 128):
    """Quantize activations to FP8 e4m3 per 1 x ``block_size`` tile of the last dimension, as
    `reference.fp8.act_quant`.

    ``x`` (..., K) float (computed in float32; K need not be a multiple of the block). Returns ``(y, s)``:
    ``y`` (..., K) uint8, the e4m3fn bit patterns of ``clamp(x / s, +-FP8_MAX)`` rounded to nearest even;
    ``s`` (..., ceil(K / block_size)) float32 = max(amax_tile, AMAX_MIN) / FP8_MAX. A NaN makes its tile's scale
    and values NaN (e4m3 NaN is 0x7F), as the reference. Raises TypeError on a non-float x,
    ValueError on rank 0, K = 0 or a bad block_size. Source: DeepSeek-V3 report section 3.3.
    """
    check_float("x", x)
    if not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if x.ndim < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must have shape (..., K) with K >= 1, got {tuple(x.shape)}")
    if use_metal("act_quant", (x.dtype, block_size), lambda: _check_act_quant(x.dtype, block_size)):
        return _act_quant_metal(x, block_size)
    return act_quant_mlx(x, block_size)


def weight_dequant(w: mx.array, scale_inv: mx.array, block_size: int = 128, dtype=mx.float32) -> mx.array:
    """Dequantize block-scaled FP8 weights, as `reference.fp8.weight_dequant`:
    ``out[n, k] = e4m3(w[n, k]) * scale_inv[n // bs, k // bs]``.

    ``w`` (N, K) uint8 e4m3fn bits; ``scale_inv`` (ceil(N / bs), ceil(K / bs)) float32 (edge blocks may be
    partial). Returns (N, K) in ``dtype`` (an ``mx.Dtype``, computed in float32). Raises TypeError on wrong dtypes,
    ValueError on a wrong rank or scale_inv shape. Source: DeepSeek-V3 inference/kernel.py ``weight_dequant``;
    report sec. 3.3.
    """
    if not isinstance(dtype, mx.Dtype):
        raise TypeError(f"dtype: expected an mx.Dtype, got {dtype!r}")
    if not isinstance(w, mx.array) or w.dtype != mx.uint8:
        raise TypeError(f"w: expected a uint8 mx.array of e4m3 bits, got {getattr(w, 'dtype', type(w).__name__)}")
    if not isinstance(scale_inv, mx.array) or scale_inv.dtype != mx.float32:
        raise TypeError(f"scale_inv: expected a float32 mx.array, got {getattr(scale_inv, 'dtype', None)}")
    if not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if w.ndim != 2:
        raise ValueError(f"w: expected (N, K), got {tuple(w.shape)}")
    n, k = w.shape
    check_shape("scale_inv", scale_inv, (cdiv(n, block_size), cdiv(k, block_size)))
    if use_metal("weight_dequant", (block_size, dtype), lambda: _check_weight_dequant(block_size, dtype)):
        return _weight_dequant_metal(w, scale_inv, block_size, dtype)
    return weight_dequant_mlx(w, scale_inv, block_size, dtype)


def fp8_gemm_mlx(a, a_s, b, b_s, block_size=128, out_dtype=mx.float32):
    """Pure MLX `fp8_gemm` (same contract): the reference's loop over K blocks, each block's product of exact e4m3
    values (float32 matmul) scaled by ``a_s[:, kb] * b_s[n // bs, kb]`` and added to a float32 accumulator."""
    k, n = a.shape[-1], b.shape[0]
    kb = cdiv(k, block_size)
    m = math.prod(a.shape[:-1])
    a2, a_s2 = a.reshape(m, k), a_s.reshape(m, kb)
    b_s_n = mx.repeat(b_s, block_size, axis=0)[:n]  # (N, KB): the scale of row n's block
    acc = mx.zeros((m, n), mx.float32)
    for i in range(kb):
        k0, k1 = i * block_size, min((i + 1) * block_size, k)
        part = mx.from_fp8(a2[:, k0:k1], dtype=mx.float32) @ mx.from_fp8(b[:, k0:k1], dtype=mx.float32).T
        acc = acc + part * a_s2[:, i, None] * b_s_n[None, :, i]
    return acc.astype(out_dtype).reshape(*a.shape[:-1], n)


def fp8_gemm(a: mx.array, a_s: mx.array, b: mx.array, b_s: mx.array, block_size: int = 128,
             out_dtype=None) -> mx.array:
    """Block-scaled FP8 matmul ``c = dequant(a) @ dequant(b).T`` with a float32 accumulator, as
    `reference.fp8.fp8_gemm` (and `kernels.triton.fp8.fp8_gemm`).

    ``a`` (..., K) uint8 e4m3fn bits with ``a_s`` (..., ceil(K / bs)) float32 per-tile scales (`act_quant`);
    ``b`` (N, K) uint8 e4m3fn bits with ``b_s`` (ceil(N / bs), ceil(K / bs)) float32 block scales
    (``weight_scale_inv``; edge blocks may be partial). For each K block ``kb``: ``acc += (a_kb @ b_kb.T) *
    a_s[..., kb] * b_s[n // bs, kb]`` in float32 (the report's promotion to float32 every 128 elements of K).
    Returns (..., N) in ``out_dtype`` (an ``mx.Dtype``; None: float32, the reference's default
    ``torch.get_default_dtype()`` unless a program changes it). Pure MLX on every device. Raises TypeError on
    wrong dtypes, ValueError on mismatched shapes or a bad block_size. Source: DeepSeek-V3 report section 3.3;
    official inference/kernel.py ``fp8_gemm``.
    """
    out_dtype = mx.float32 if out_dtype is None else out_dtype
    if not isinstance(out_dtype, mx.Dtype):
        raise TypeError(f"out_dtype: expected an mx.Dtype, got {out_dtype!r}")
    for name, t, dtype, what in (("a", a, mx.uint8, "uint8 e4m3 bits"), ("b", b, mx.uint8, "uint8 e4m3 bits"),
                                 ("a_s", a_s, mx.float32, "float32"), ("b_s", b_s, mx.float32, "float32")):
        if not isinstance(t, mx.array) or t.dtype != dtype:
            raise TypeError(f"{name}: expected a {what} mx.array, got {getattr(t, 'dtype', type(t).__name__)}")
    if not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if a.ndim < 1 or b.ndim != 2:
        raise ValueError(f"a must be (..., K) and b (N, K); got shapes {tuple(a.shape)} and {tuple(b.shape)}")
    k, n = a.shape[-1], b.shape[0]
    check_shape("b", b, (n, k))
    kb = cdiv(k, block_size)
    check_shape("a_s", a_s, (*a.shape[:-1], kb))
    check_shape("b_s", b_s, (cdiv(n, block_size), kb))
    return fp8_gemm_mlx(a, a_s, b, b_s, block_size, out_dtype)
