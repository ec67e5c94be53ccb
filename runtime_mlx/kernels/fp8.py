"""Fine-grained FP8 (e4m3) in MLX (DeepSeek-V3 report section 3.3): activation quantization per 1 x 128 tile
(`act_quant`, optionally of the transpose and with power-of-two "ue8m0" scales), weight quantization per 128 x 128
block (`weight_quant`, pure MLX) and dequantization (`weight_dequant`), the block-scaled GEMM `fp8_gemm` (weights'
block scales or an activation's per-row scales on the right) and the grouped GEMM `fp8_grouped_gemm` over
expert-sorted rows (pure MLX). `act_quant`, `weight_dequant` and `fp8_gemm` are Metal kernels of
``kernels/metal/fp8.metal`` or pure MLX. Reference: `reference.fp8`, whose ``FP8_MAX`` (448) and ``AMAX_MIN`` (1e-4)
both paths use (the Metal kernel gets them as arguments). e4m3 values travel as their uint8 bit patterns
(``mx.to_fp8`` / ``torch.float8_e4m3fn.view(uint8)``)."""

from __future__ import annotations

import math

import mlx.core as mx

from reference.fp8 import AMAX_MIN, FP8_MAX, SCALE_FMTS

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
FP8_GEMM = spec("fp8_gemm", "fp8", "a a_s b b_s", "c")


def check_scale_fmt(scale_fmt) -> None:
    """Raise ValueError unless ``scale_fmt`` is None or ``"ue8m0"``."""
    if scale_fmt not in SCALE_FMTS:
        raise ValueError(f"scale_fmt must be None (float32 scales) or 'ue8m0' (powers of two), got {scale_fmt!r}")


def ue8m0_ceil(s: mx.array) -> mx.array:
    """The smallest power of two >= each float32 ``s`` > 0, exactly (the "ue8m0" scale format): ``s`` itself when its
    mantissa bits are 0, else 2^(exponent + 1); NaN stays NaN, inf stays inf."""
    bits = s.view(mx.uint32)
    up = ((bits & 0x7F800000) + 0x00800000).view(mx.float32)
    return mx.where(((bits & 0x007FFFFF) == 0) | mx.isnan(s), s, up)


def scales(amax: mx.array, scale_fmt=None) -> mx.array:
    """float32 scales ``max(amax, AMAX_MIN) / FP8_MAX`` (NaN where amax is NaN), rounded up to a power of two for
    ``scale_fmt="ue8m0"``."""
    s = mx.where(mx.isnan(amax), amax, mx.maximum(amax, AMAX_MIN) / FP8_MAX)
    return ue8m0_ceil(s) if scale_fmt == "ue8m0" else s


def to_e4m3(v: mx.array) -> mx.array:
    """float32 values (already divided by their scale) -> uint8 e4m3fn bits of ``clamp(v, +-FP8_MAX)``, round to
    nearest even; NaN -> 0x7F (``mx.to_fp8`` alone would give 448)."""
    return mx.where(mx.isnan(v), mx.array(0x7F, mx.uint8), mx.to_fp8(mx.clip(v, -FP8_MAX, FP8_MAX)))


def act_quant_mlx(x, block_size=128, scale_fmt=None, transpose=False):
    """Pure MLX `act_quant` (same contract)."""
    if transpose:
        x = x.T
    k = x.shape[-1]
    kb = cdiv(k, block_size)
    lead = x.shape[:-1]
    xp = mx.pad(f32(x), [(0, 0)] * (x.ndim - 1) + [(0, kb * block_size - k)]).reshape(*lead, kb, block_size)
    s = scales(mx.abs(xp).max(axis=-1), scale_fmt)
    y = to_e4m3(xp / s[..., None]).reshape(*lead, kb * block_size)
    return y[..., :k], s


def weight_quant_mlx(w, block_size=128, scale_fmt=None):
    """Pure MLX `weight_quant` (same contract), also for a stack of matrices (..., N, K): one scale grid per
    matrix, (..., ceil(N / bs), ceil(K / bs))."""
    *lead, n, k = w.shape
    nb, kb = cdiv(n, block_size), cdiv(k, block_size)
    pad = [(0, 0)] * len(lead) + [(0, nb * block_size - n), (0, kb * block_size - k)]
    wp = mx.pad(f32(w), pad).reshape(*lead, nb, block_size, kb, block_size)
    s = scales(mx.abs(wp).max(axis=(-3, -1)), scale_fmt)
    y = to_e4m3(wp / s[..., :, None, :, None]).reshape(*lead, nb * block_size, kb * block_size)
    return y[..., :n, :k], s


def act_dequant(y: mx.array, s: mx.array, block_size: int = 128, dtype=mx.float32) -> mx.array:
    """Inverse of `act_quant`, as `reference.fp8.act_dequant`: ``x = e4m3(y) * s`` per 1 x ``block_size`` tile.

    ``y`` (..., K) uint8 e4m3fn bits, ``s`` (..., ceil(K / block_size)) float32. Returns (..., K) in ``dtype``
    (computed in float32). Pure MLX; no checks (an internal step of the FP8 backward, `runtime_mlx.fp8`)."""
    k = y.shape[-1]
    return (mx.from_fp8(y, dtype=mx.float32) * mx.repeat(s, block_size, axis=-1)[..., :k]).astype(dtype)


def weight_dequant_mlx(w, scale_inv, block_size=128, dtype=mx.float32):
    """Pure MLX `weight_dequant` (same contract)."""
    n, k = w.shape
    s = mx.repeat(mx.repeat(scale_inv, block_size, axis=0)[:n], block_size, axis=1)[:, :k]
    return (mx.from_fp8(w, dtype=mx.float32) * s).astype(dtype)


def act_quant_launch(x2, block_size, scale_fmt=None) -> Launch:
    """One simdgroup (32 lanes) per 1 x block_size tile, 8 tiles per threadgroup: grid (32 * N * KB rounded up to
    256, 1, 1), threadgroup (256, 1, 1). Outputs ``y`` (N, K) uint8 e4m3 bits, ``s`` (N, KB) float32."""
    n, k = x2.shape
    kb = cdiv(k, block_size)
    threads = 32 * n * kb
    return Launch(ACT_QUANT, [x2, scalar(FP8_MAX), scalar(AMAX_MIN)],
                  [("T", x2.dtype), ("K", k), ("BS", block_size), ("NT", n * kb), ("UE8M0", scale_fmt == "ue8m0")],
                  (256 * cdiv(threads, 256), 1, 1), (256, 1, 1), [(n, k), (n, kb)], [mx.uint8, mx.float32])


def weight_dequant_launch(w, scale_inv, block_size, dtype) -> Launch:
    """One thread per element: grid (K rounded up to 32, N, 1), threadgroup (32, 8, 1). Output (N, K) ``dtype``."""
    n, k = w.shape
    return Launch(WEIGHT_DEQUANT, [w, scale_inv], [("O", dtype), ("N", n), ("K", k), ("BS", block_size)],
                  (32 * cdiv(k, 32), n, 1), (32, 8, 1), [(n, k)], [dtype])


def fp8_gemm_launch(a2, a_s2, b, b_s, block_size, out_dtype) -> Launch:
    """One threadgroup of 16 x 16 threads per 64 x 64 tile of c: grid (16 * ceil(N / 64), 16 * ceil(M / 64), 1),
    threadgroup (16, 16, 1). ``b_s`` (N, KB) per-row scales (template SB = 1) or (ceil(N / bs), KB) block scales
    (SB = bs). Output ``c`` (M, N) ``out_dtype``. M is not a template argument (the kernel reads ``a_shape``), so a
    new number of tokens does not compile a new kernel."""
    m, k = a2.shape
    n = b.shape[0]
    sb = 1 if b_s.shape[0] == n else block_size
    return Launch(FP8_GEMM, [a2, a_s2, b, b_s],
                  [("O", out_dtype), ("N", n), ("K", k), ("BS", block_size), ("SB", sb)],
                  (16 * cdiv(n, 64), 16 * cdiv(m, 64), 1), (16, 16, 1), [(m, n)], [out_dtype])


def _act_quant_metal(x, block_size=128, runner=None, scale_fmt=None):
    k = x.shape[-1]
    y, s = run(runner, act_quant_launch(x.reshape(-1, k), block_size, scale_fmt))
    return y.reshape(x.shape), s.reshape(*x.shape[:-1], s.shape[-1])


def _fp8_gemm_metal(a, a_s, b, b_s, block_size=128, out_dtype=mx.float32, runner=None):
    """The Metal path of `fp8_gemm` (a (..., K), b (N, K); any M, N, K >= 1)."""
    k, n = a.shape[-1], b.shape[0]
    lead = a.shape[:-1]
    (c,) = run(runner, fp8_gemm_launch(a.reshape(-1, k), a_s.reshape(-1, a_s.shape[-1]), b, b_s, block_size,
                                       out_dtype))
    return c.reshape(*lead, n)


def _weight_dequant_metal(w, scale_inv, block_size=128, dtype=mx.float32, runner=None):
    (out,) = run(runner, weight_dequant_launch(w, scale_inv, block_size, dtype))
    return out


def _check_act_quant(dtype, block_size, scale_fmt=None) -> None:
    """The kernel against the pure-MLX path on 2 rows of 1.5 blocks: the same e4m3 bits and scales."""
    x = sample((2, block_size + block_size // 2), 1, dtype) * 10
    y, s = _act_quant_metal(x, block_size, scale_fmt=scale_fmt)
    want_y, want_s = act_quant_mlx(x, block_size, scale_fmt)
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


def _check_block(block_size) -> None:
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size <= 0:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")


def act_quant(x: mx.array, block_size: int = 128, scale_fmt: str | None = None, transpose: bool = False):
    """Quantize activations to FP8 e4m3 per 1 x ``block_size`` tile of the last dimension, as
    `reference.fp8.act_quant`.

    ``x`` (..., K) float (computed in float32; K need not be a multiple of the block). Returns ``(y, s)``:
    ``y`` (..., K) uint8, the e4m3fn bit patterns of ``clamp(x / s, +-FP8_MAX)`` rounded to nearest even;
    ``s`` (..., ceil(K / block_size)) float32 = max(amax_tile, AMAX_MIN) / FP8_MAX. ``scale_fmt="ue8m0"``: ``s``
    rounded up to a power of two (exactly: kept when its mantissa bits are 0, else 2^(exponent + 1)), the same
    rounded ``s`` quantizing and returned. ``transpose=True``: ``x`` must be 2-D (M, K); the result is that of
    ``act_quant(x.T)``: ``y`` (K, M), ``s`` (K, ceil(M / block_size)), i.e. block_size x 1 tiles of ``x`` (the
    operands of Wgrad, report section 3.3). A NaN makes its tile's scale and values NaN (e4m3 NaN is 0x7F), as the
    reference. Raises TypeError on a non-float x, ValueError on rank 0, K = 0, a bad block_size or scale_fmt, or
    ``transpose`` with x not 2-D. Source: DeepSeek-V3 report section 3.3.
    """
    check_float("x", x)
    _check_block(block_size)
    check_scale_fmt(scale_fmt)
    if transpose:
        if x.ndim != 2 or x.shape[0] == 0:
            raise ValueError(f"transpose=True needs a 2-D x (M, K) with M >= 1, got {tuple(x.shape)}")
        x = x.T
    if x.ndim < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must have shape (..., K) with K >= 1, got {tuple(x.shape)}")
    key = (x.dtype, block_size, scale_fmt)
    if use_metal("act_quant", key, lambda: _check_act_quant(*key)):
        return _act_quant_metal(x, block_size, scale_fmt=scale_fmt)
    return act_quant_mlx(x, block_size, scale_fmt)


def weight_quant(w: mx.array, block_size: int = 128, scale_fmt: str | None = None):
    """Quantize a weight matrix to FP8 e4m3 per ``block_size`` x ``block_size`` block, as
    `reference.fp8.weight_quant` (pure MLX on every device).

    ``w`` (N, K) float (computed in float32; edge blocks may be partial). Returns ``(w_fp8, scale_inv)``: ``w_fp8``
    (N, K) uint8 e4m3fn bits, ``scale_inv`` (ceil(N / bs), ceil(K / bs)) float32 = max(amax_block, AMAX_MIN) /
    FP8_MAX (rounded up to a power of two for ``scale_fmt="ue8m0"``), DeepSeek-V3's ``weight_scale_inv``. Raises
    TypeError on a non-float w, ValueError if it is not 2-D and non-empty, or on a bad block_size or scale_fmt.
    Source: DeepSeek-V3 report section 3.3 (128 x 128 weight blocks).
    """
    check_float("w", w)
    _check_block(block_size)
    check_scale_fmt(scale_fmt)
    if w.ndim != 2 or w.size == 0:
        raise ValueError(f"w must be a non-empty 2-D (N, K) array, got shape {tuple(w.shape)}")
    return weight_quant_mlx(w, block_size, scale_fmt)


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


def _b_scale_rows(b_s, n, block_size):
    """(..., NS, KB) scales of b -> (..., N, KB), the scale of each row of b: per-row scales (NS = N) as they are,
    block scales (NS = ceil(N / bs)) repeated over their block's rows."""
    return b_s if b_s.shape[-2] == n else mx.repeat(b_s, block_size, axis=-2)[..., :n, :]


def fp8_gemm_mlx(a, a_s, b, b_s, block_size=128, out_dtype=mx.float32):
    """Pure MLX `fp8_gemm` (same contract): the reference's loop over K blocks, each block's product of exact e4m3
    values (float32 matmul) scaled by ``a_s[:, kb] * scale_b(n, kb)`` and added to a float32 accumulator."""
    k, n = a.shape[-1], b.shape[0]
    kb = cdiv(k, block_size)
    m = math.prod(a.shape[:-1])
    a2, a_s2 = a.reshape(m, k), a_s.reshape(m, kb)
    b_s_n = _b_scale_rows(b_s, n, block_size)  # (N, KB): the scale of row n
    acc = mx.zeros((m, n), mx.float32)
    for i in range(kb):
        k0, k1 = i * block_size, min((i + 1) * block_size, k)
        part = mx.from_fp8(a2[:, k0:k1], dtype=mx.float32) @ mx.from_fp8(b[:, k0:k1], dtype=mx.float32).T
        acc = acc + part * a_s2[:, i, None] * b_s_n[None, :, i]
    return acc.astype(out_dtype).reshape(*a.shape[:-1], n)


def _check_fp8_gemm(block_size, out_dtype, per_row) -> None:
    """The kernel against the pure-MLX path: 70 rows x 1.5 K blocks against 1.5 N blocks of weights (block scales)
    or 70 rows of an activation (per-row scales), within ``out_dtype``'s bound."""
    k = block_size + block_size // 2
    a, a_s = act_quant_mlx(sample((70, k), 1) * 10, block_size)
    w = sample((70 if per_row else block_size + block_size // 2, k), 2)
    b, b_s = act_quant_mlx(w, block_size) if per_row else weight_quant_mlx(w, block_size)
    want = fp8_gemm_mlx(a, a_s, b, b_s, block_size, out_dtype)
    check_close("fp8_gemm", _fp8_gemm_metal(a, a_s, b, b_s, block_size, out_dtype), want, out_dtype)


def _check_fp8_operands(a, a_s, b, b_s, block_size) -> None:
    for name, t, dtype, what in (("a", a, mx.uint8, "uint8 e4m3 bits"), ("b", b, mx.uint8, "uint8 e4m3 bits"),
                                 ("a_s", a_s, mx.float32, "float32"), ("b_s", b_s, mx.float32, "float32")):
        if not isinstance(t, mx.array) or t.dtype != dtype:
            raise TypeError(f"{name}: expected a {what} mx.array, got {getattr(t, 'dtype', type(t).__name__)}")
    _check_block(block_size)


def _out_dtype(out_dtype):
    out_dtype = mx.float32 if out_dtype is None else out_dtype
    if not isinstance(out_dtype, mx.Dtype):
        raise TypeError(f"out_dtype: expected an mx.Dtype, got {out_dtype!r}")
    return out_dtype


def fp8_gemm(a: mx.array, a_s: mx.array, b: mx.array, b_s: mx.array, block_size: int = 128,
             out_dtype=None) -> mx.array:
    """Block-scaled FP8 matmul ``c = dequant(a) @ dequant(b).T`` with a float32 accumulator, as
    `reference.fp8.fp8_gemm` (and `kernels.triton.fp8.fp8_gemm`).

    ``a`` (..., K) uint8 e4m3fn bits with ``a_s`` (..., ceil(K / bs)) float32 per-tile scales (`act_quant`);
    ``b`` (N, K) uint8 e4m3fn bits with ``b_s`` either (ceil(N / bs), ceil(K / bs)) float32 block scales
    (``weight_scale_inv``, edge blocks may be partial: Fprop, Dgrad), ``scale_b(n, kb) = b_s[n // bs, kb]``, or
    (N, ceil(K / bs)) per-row 1 x bs tile scales (an `act_quant` operand: Wgrad), ``scale_b(n, kb) = b_s[n, kb]``;
    the shape decides (for N = 1 both readings agree). For each K block ``kb``: ``acc += (a_kb @ b_kb.T) *
    a_s[..., kb] * scale_b(n, kb)`` in float32 (the report's promotion to float32 every 128 elements of K).
    Returns (..., N) in ``out_dtype`` (an ``mx.Dtype``; None: float32, the reference's default
    ``torch.get_default_dtype()`` unless a program changes it). The Metal kernel (64 x 64 tiles through
    threadgroup memory) or pure MLX. Raises TypeError on wrong dtypes, ValueError on mismatched shapes or a bad
    block_size. Source: DeepSeek-V3 report section 3.3; official inference/kernel.py ``fp8_gemm``.
    """
    out_dtype = _out_dtype(out_dtype)
    _check_fp8_operands(a, a_s, b, b_s, block_size)
    if a.ndim < 1 or b.ndim != 2:
        raise ValueError(f"a must be (..., K) and b (N, K); got shapes {tuple(a.shape)} and {tuple(b.shape)}")
    k, n = a.shape[-1], b.shape[0]
    check_shape("b", b, (n, k))
    kb = cdiv(k, block_size)
    check_shape("a_s", a_s, (*a.shape[:-1], kb))
    if b_s.ndim != 2 or b_s.shape[0] not in (n, cdiv(n, block_size)):
        raise ValueError(f"b_s: expected shape ({cdiv(n, block_size)}, {kb}) (block scales) or ({n}, {kb}) "
                         f"(per-row scales), got {tuple(b_s.shape)}")
    check_shape("b_s", b_s, (b_s.shape[0], kb))
    if a.size and n and k:
        key = (block_size, out_dtype, b_s.shape[0] == n)
        if use_metal("fp8_gemm", key, lambda: _check_fp8_gemm(*key)):
            return _fp8_gemm_metal(a, a_s, b, b_s, block_size, out_dtype)
    return fp8_gemm_mlx(a, a_s, b, b_s, block_size, out_dtype)


def expert_of_rows(offsets: mx.array, m: int) -> mx.array:
    """(M,) uint32 expert of each row of expert-sorted rows: ``e`` for ``offsets[e] <= r < offsets[e + 1]``."""
    return (mx.arange(m)[:, None] >= offsets[None, 1:]).sum(axis=1).astype(mx.uint32)


def fp8_grouped_gemm_mlx(a, a_s, b, b_s, eid, block_size=128, out_dtype=mx.float32):
    """Pure MLX `fp8_grouped_gemm` by each row's expert ``eid`` (M,) uint32, sorted (traces under ``mx.compile``:
    no evaluation): per K block, ``mx.gather_mm`` of the exact e4m3 values (float32), scaled by ``a_s[r, kb] *
    b_s[e, n // bs, kb]`` and added to a float32 accumulator."""
    m, k = a.shape
    n = b.shape[1]
    kb = cdiv(k, block_size)
    b_s_n = _b_scale_rows(b_s, n, block_size)  # (E, N, KB)
    acc = mx.zeros((m, n), mx.float32)
    for i in range(kb):
        k0, k1 = i * block_size, min((i + 1) * block_size, k)
        av = mx.from_fp8(a[:, k0:k1], dtype=mx.float32)[:, None]  # (M, 1, bk)
        bv = mx.from_fp8(b[..., k0:k1], dtype=mx.float32).swapaxes(-1, -2)  # (E, bk, N)
        part = mx.gather_mm(av, bv, rhs_indices=eid, sorted_indices=True)[:, 0]
        acc = acc + part * a_s[:, i, None] * mx.take(b_s_n[..., i], eid, axis=0)
    return acc.astype(out_dtype)


def fp8_grouped_gemm(a: mx.array, a_s: mx.array, b: mx.array, b_s: mx.array, offsets: mx.array,
                     block_size: int = 128, out_dtype=None) -> mx.array:
    """Grouped block-scaled FP8 matmul over expert-sorted rows, as `reference.fp8.fp8_grouped_gemm`: row ``r`` in
    ``[offsets[e], offsets[e + 1])`` of the result is ``fp8_gemm(a[r], a_s[r], b[e], b_s[e])``.

    ``a`` (M, K) uint8 e4m3fn bits, rows sorted by expert, with ``a_s`` (M, ceil(K / bs)) float32 (`act_quant`);
    ``b`` (E, N, K) uint8 e4m3fn bits with ``b_s`` (E, ceil(N / bs), ceil(K / bs)) float32 block scales (each
    expert's `weight_quant`); ``offsets`` (E + 1,) integer, 0 = offsets[0] <= ... <= offsets[E] = M (an expert may
    have no rows). Returns (M, N) in ``out_dtype`` (None: float32). The routed experts' Fprop and Dgrad (report
    section 3.3); pure MLX on every device (``mx.gather_mm`` per K block, float32 accumulation). Raises TypeError on
    wrong dtypes, ValueError on mismatched shapes, a bad block_size or offsets that are not 0 .. M nondecreasing
    (checking them evaluates ``offsets``). Source: DeepSeek-V3 report section 3.3.
    """
    out_dtype = _out_dtype(out_dtype)
    _check_fp8_operands(a, a_s, b, b_s, block_size)
    if not isinstance(offsets, mx.array) or not mx.issubdtype(offsets.dtype, mx.integer):
        raise TypeError(f"offsets: expected an integer mx.array, got {getattr(offsets, 'dtype', type(offsets))}")
    if a.ndim != 2 or b.ndim != 3:
        raise ValueError(f"a must be (M, K) and b (E, N, K); got shapes {tuple(a.shape)} and {tuple(b.shape)}")
    (m, k), (e, n) = a.shape, b.shape[:2]
    kb = cdiv(k, block_size)
    check_shape("b", b, (e, n, k))
    check_shape("a_s", a_s, (m, kb))
    check_shape("b_s", b_s, (e, cdiv(n, block_size), kb))
    check_shape("offsets", offsets, (e + 1,))
    o = offsets.astype(mx.int64)
    if o[0].item() != 0 or o[-1].item() != m or (e and (o[1:] < o[:-1]).any().item()):
        raise ValueError(f"offsets must run nondecreasing from 0 to M = {m}, got {offsets.tolist()}")
    return fp8_grouped_gemm_mlx(a, a_s, b, b_s, expert_of_rows(o, m), block_size, out_dtype)


def _segment_dequant(v: mx.array, eid: mx.array, offsets: mx.array, bs: int, fmt) -> mx.array:
    """``v`` (M, C) rows sorted by expert -> float32 (M, C): v quantized to e4m3 in bs x 1 tiles that start at each
    expert's first row (``act_quant(v[segment], transpose=True)`` per segment) and dequantized."""
    m, c = v.shape
    e = offsets.shape[0] - 1
    counts = offsets[1:] - offsets[:-1]
    tiles = (counts + bs - 1) // bs
    base = mx.concatenate([mx.zeros((1,), tiles.dtype), mx.cumsum(tiles)[:-1]])
    eid = eid.astype(mx.int32)
    tid = base[eid] + (mx.arange(m, dtype=offsets.dtype) - offsets[eid]) // bs  # (M,) tile of each row
    n_tiles = -(-m // bs) + e  # >= sum_e ceil(count_e / bs)
    v = v.astype(mx.float32)
    amax = mx.zeros((n_tiles, c), mx.float32).at[tid].maximum(mx.abs(v))
    nans = mx.zeros((n_tiles, c), mx.float32).at[tid].add(mx.isnan(v).astype(mx.float32))
    s = scales(mx.where(nans > 0, mx.nan, amax), fmt)[tid]  # (M, C)
    return mx.from_fp8(to_e4m3(v / s), dtype=mx.float32) * s


def fp8_grouped_wgrad_mlx(dy, x, offsets, eid, block_size=128, scale_fmt=None):
    """Pure MLX `fp8_grouped_wgrad` by each row's expert ``eid`` (M,) (traces under ``mx.compile``: the offsets are
    not evaluated): both operands quantized in block_size x 1 tiles starting at each segment (`_segment_dequant`),
    their dequantized values multiplied per segment by ``mx.segmented_mm`` in float32 (the scales multiply the
    operands before the sum instead of each tile's partial sum after it: equal to float32 rounding, exactly with
    ``"ue8m0"`` scales). Returns (E, N, K) float32."""
    d = _segment_dequant(dy, eid, offsets, block_size, scale_fmt)
    a = _segment_dequant(x, eid, offsets, block_size, scale_fmt)
    segments = mx.stack([offsets[:-1], offsets[1:]], axis=1).astype(mx.uint32)
    return mx.segmented_mm(d.T, a, segments)


def fp8_grouped_wgrad(dy: mx.array, x: mx.array, offsets: mx.array, block_size: int = 128,
                      scale_fmt: str | None = None) -> mx.array:
    """The routed experts' Wgrad in FP8, as `reference.fp8.fp8_grouped_wgrad`: ``dW[e] = fp8_gemm(*act_quant(dy[seg],
    transpose=True), *act_quant(x[seg], transpose=True))`` per expert segment seg = [offsets[e], offsets[e + 1]) of
    expert-sorted rows (block_size x 1 tiles starting at each segment's first row, per-row scales on both operands,
    float32 accumulation per tile of block_size tokens).

    ``dy`` (M, N), ``x`` (M, K) float32/float16/bfloat16; ``offsets`` (E + 1,) integer, 0 = offsets[0] <= ... <=
    offsets[E] = M. Returns (E, N, K) float32; an expert without rows gets zeros. `fp8_grouped_wgrad_mlx` with
    checked ``offsets`` (evaluated here: under ``mx.compile`` call `fp8_grouped_wgrad_mlx`, as `runtime_mlx.fp8`'s
    training layers do). Raises TypeError on wrong dtypes, ValueError on
    mismatched shapes, a bad block_size or scale_fmt, or offsets that are not 0 .. M nondecreasing. Source:
    DeepSeek-V3 report sections 3.3 (Wgrad re-tiling) and 2.1.2 (routed experts).
    """
    check_float("dy", dy)
    check_float("x", x)
    _check_block(block_size)
    check_scale_fmt(scale_fmt)
    if not isinstance(offsets, mx.array) or not mx.issubdtype(offsets.dtype, mx.integer):
        raise TypeError(f"offsets: expected an integer mx.array, got {getattr(offsets, 'dtype', type(offsets))}")
    if offsets.ndim != 1 or offsets.size == 0:
        raise ValueError(f"offsets: expected shape (E + 1,), got {tuple(offsets.shape)}")
    if dy.ndim != 2 or x.ndim != 2 or dy.shape[0] != x.shape[0]:
        raise ValueError(f"dy must be (M, N) and x (M, K) with the same M; got shapes {tuple(dy.shape)} and "
                         f"{tuple(x.shape)}")
    (m, n), k = dy.shape, x.shape[1]
    o = offsets.astype(mx.int64).tolist()
    if o[0] != 0 or o[-1] != m or any(a > b for a, b in zip(o[:-1], o[1:], strict=False)):
        raise ValueError(f"offsets must run nondecreasing from 0 to M = {m}, got {o}")
    if m == 0 or n == 0 or k == 0:
        return mx.zeros((len(o) - 1, n, k), mx.float32)
    return fp8_grouped_wgrad_mlx(dy, x, offsets, expert_of_rows(offsets, m), block_size, scale_fmt)
