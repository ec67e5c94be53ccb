"""Fine-grained FP8 (e4m3) quantization and the block-scaled GEMM, in plain PyTorch.

Source: DeepSeek-V3 technical report (arXiv 2412.19437), section 3.3 "FP8 training", fine-grained
quantization: activations are scaled per 1x128 tile, weights per 128x128 block, and partial products are
promoted to an fp32 accumulator with the scales applied per K-block. The semantics follow the official
``inference/kernel.py`` (``act_quant``, ``weight_dequant``, ``fp8_gemm``):

- values are ``torch.float8_e4m3fn`` (largest finite value 448); scales are fp32 ``s = amax / 448`` and
  dequantization is ``x = y * s`` (the checkpoints call the weight scale ``weight_scale_inv``);
- amax is clamped to at least ``AMAX_MIN = 1e-4`` (as in the later official kernel), so an all-zero tile
  gets ``s = 1e-4 / 448`` and quantizes to zeros instead of 0/0 = NaN. A tile whose amax is below 1e-4 is
  therefore scaled less than all the way up to 448 and keeps fewer significant bits;
- ``x / s`` is clamped to +-448 before the cast (torch's cast saturates on CPU; not every backend does);
- unlike the official kernels, sizes need not be multiples of the block: the last tile/block may be
  partial, and its amax is taken over its valid elements only. NaN inputs propagate to the outputs;
- ``scale_fmt="ue8m0"`` (DeepSeek-V3.1 and later): each scale is rounded up to a power of two (an 8-bit exponent,
  no mantissa) before use, and that rounded scale both quantizes and dequantizes.

Training on these ops (Fprop, Dgrad and Wgrad of every linear layer in e4m3) is `reference.fp8_training`.
`limited_accumulation_gemm` emulates the tensor cores' limited accumulation precision, to show what the promotion
every ``N_C = 128`` elements of K buys (report section 3.3.2).
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
AMAX_MIN = 1e-4

SCALE_FMTS = (None, "ue8m0")

__all__ = ["FP8_DTYPE", "FP8_MAX", "AMAX_MIN", "SCALE_FMTS", "round_scale_ue8m0", "act_quant", "act_dequant",
           "weight_quant", "weight_dequant", "fp8_gemm", "fp8_grouped_gemm", "fp8_grouped_wgrad",
           "limited_accumulation_gemm"]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _check_block(block_size) -> None:
    if not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")


def _check_float(name: str, t, allow_fp8: bool = False) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype == FP8_DTYPE and not allow_fp8:
        raise TypeError(f"{name} must be a floating tensor to quantize, got an already-quantized {t.dtype}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


def _check_dtype(name: str, t, dtype: torch.dtype) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {t.dtype}")


def _check_shape(name: str, t: torch.Tensor, shape: tuple) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def _check_scale_fmt(scale_fmt) -> None:
    if scale_fmt not in SCALE_FMTS:
        raise ValueError(f"scale_fmt must be None (float32 scales) or 'ue8m0' (powers of two), got {scale_fmt!r}")


def round_scale_ue8m0(s: torch.Tensor) -> torch.Tensor:
    """The smallest power of two >= each positive float32 scale ``s`` (exactly: ``s`` itself when its mantissa
    bits are zero, else ``2^(exponent + 1)``); NaN stays NaN. The UE8M0 scale format of DeepSeek-V3.1's
    checkpoints and kernels (``scale_fmt: "ue8m0"``)."""
    bits = s.view(torch.int32)
    up = ((bits + 0x7FFFFF) & 0x7F800000).view(torch.float32)
    return torch.where(torch.isnan(s), s, up)


def _quant_tiles(t: torch.Tensor, scale_fmt=None) -> tuple[torch.Tensor, torch.Tensor]:
    """t (..., T, B) fp32 tiles, zero-padded -> (fp8 values, fp32 scales (..., T))."""
    amax = t.abs().amax(dim=-1).clamp(min=AMAX_MIN)
    s = amax / FP8_MAX
    if scale_fmt == "ue8m0":
        s = round_scale_ue8m0(s)
    y = (t / s.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return y, s


def act_quant(x: torch.Tensor, block_size: int = 128, scale_fmt: str | None = None,
              transpose: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize activations to FP8 e4m3 per 1 x ``block_size`` tile along the last dimension.

    x: (..., K) floating (any float dtype; computed in fp32), rank >= 1, K >= 1 (K need not be a multiple
    of ``block_size``). Returns ``(y, s)``: y (..., K) ``torch.float8_e4m3fn`` with y = clamp(x / s, +-448);
    s (..., ceil(K / block_size)) float32, s = max(amax_tile, 1e-4) / 448, in units of x per fp8 unit
    (``scale_fmt="ue8m0"``: rounded up to a power of two, `round_scale_ue8m0`).
    ``transpose``: x must be 2-D (M, K) and the result is that of ``act_quant(x.T)``: y (K, M), s (K, ceil(M / bs)),
    tiles of 1 x bs along M of x^T (bs x 1 tiles of x), the re-tiling the Wgrad GEMM needs (report sec. 3.3,
    Fig. 7: its operands are grouped along the token axis, the axis it contracts).
    Raises TypeError if x is not a floating tensor (or is already fp8), ValueError on rank 0, K = 0, a
    bad block_size or scale_fmt, or ``transpose`` with x not 2-D. Source: arXiv 2412.19437 sec. 3.3; official
    inference/kernel.py ``act_quant``.
    """
    _check_float("x", x)
    _check_block(block_size)
    _check_scale_fmt(scale_fmt)
    if transpose:
        if x.dim() != 2 or x.shape[0] == 0:
            raise ValueError(f"act_quant(transpose=True): x must be 2-D (M, K) with M >= 1, got {tuple(x.shape)}")
        x = x.T
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must have shape (..., K) with K >= 1, got {tuple(x.shape)}")
    K = x.shape[-1]
    kb = _cdiv(K, block_size)
    xp = torch.nn.functional.pad(x.float(), (0, kb * block_size - K))
    y, s = _quant_tiles(xp.reshape(*x.shape[:-1], kb, block_size), scale_fmt)
    return y.reshape(xp.shape)[..., :K].contiguous(), s


def act_dequant(y: torch.Tensor, s: torch.Tensor, block_size: int = 128,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of ``act_quant``: x = y * s per 1 x ``block_size`` tile.

    y: (..., K) ``torch.float8_e4m3fn``; s: (..., ceil(K / block_size)) float32. Returns (..., K) in
    ``dtype`` (computed in fp32). Raises TypeError on wrong dtypes, ValueError on mismatched shapes.
    Source: arXiv 2412.19437 sec. 3.3; official inference/kernel.py (the scales of ``act_quant``).
    """
    _check_dtype("y", y, FP8_DTYPE)
    _check_dtype("s", s, torch.float32)
    _check_block(block_size)
    if y.dim() < 1:
        raise ValueError(f"y must have shape (..., K), got {tuple(y.shape)}")
    _check_shape("s", s, (*y.shape[:-1], _cdiv(y.shape[-1], block_size)))
    idx = torch.arange(y.shape[-1], device=y.device) // block_size
    return (y.float() * s[..., idx]).to(dtype)


def weight_quant(w: torch.Tensor, block_size: int = 128,
                 scale_fmt: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a weight matrix to FP8 e4m3 per ``block_size`` x ``block_size`` block.

    w: (N, K) floating (computed in fp32); edge blocks may be partial. Returns ``(w_fp8, scale_inv)``:
    w_fp8 (N, K) ``torch.float8_e4m3fn``; scale_inv (ceil(N / bs), ceil(K / bs)) float32 =
    max(amax_block, 1e-4) / 448, the ``weight_scale_inv`` of DeepSeek-V3 checkpoints (``scale_fmt="ue8m0"``:
    rounded up to a power of two, as DeepSeek-V3.1's). Raises TypeError if w is not a floating tensor, ValueError if
    it is not 2-D and non-empty or on a bad scale_fmt.
    Source: arXiv 2412.19437 sec. 3.3; the inverse of official inference/kernel.py ``weight_dequant``.
    """
    _check_float("w", w)
    _check_block(block_size)
    _check_scale_fmt(scale_fmt)
    if w.dim() != 2 or w.numel() == 0:
        raise ValueError(f"w must be a non-empty 2-D (N, K) tensor, got shape {tuple(w.shape)}")
    y, s = stacked_weight_quant(w[None], block_size, scale_fmt)
    return y[0], s[0]


def stacked_weight_quant(w: torch.Tensor, block_size: int = 128,
                         scale_fmt: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`weight_quant` of each matrix of a stack: w (E, N, K) floating -> (E, N, K) e4m3 and (E, ceil(N / bs),
    ceil(K / bs)) float32 block scales, blocks never crossing matrices (the routed experts' weights). Raises as
    `weight_quant`."""
    _check_float("w", w)
    _check_block(block_size)
    _check_scale_fmt(scale_fmt)
    if w.dim() != 3 or w.numel() == 0:
        raise ValueError(f"w must be a non-empty (E, N, K) stack, got shape {tuple(w.shape)}")
    E, N, K = w.shape
    nb, kb = _cdiv(N, block_size), _cdiv(K, block_size)
    wp = torch.nn.functional.pad(w.float(), (0, kb * block_size - K, 0, nb * block_size - N))
    tiles = wp.reshape(E, nb, block_size, kb, block_size).transpose(2, 3).reshape(E, nb, kb, -1)
    y, s = _quant_tiles(tiles, scale_fmt)
    y = y.reshape(E, nb, kb, block_size, block_size).transpose(2, 3).reshape(wp.shape)
    return y[:, :N, :K].contiguous(), s


def weight_dequant(w_fp8: torch.Tensor, scale_inv: torch.Tensor, block_size: int = 128,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dequantize block-scaled FP8 weights: w[n, k] = w_fp8[n, k] * scale_inv[n // bs, k // bs].

    w_fp8: (N, K) ``torch.float8_e4m3fn``; scale_inv: (ceil(N / bs), ceil(K / bs)) float32 (edge blocks
    may be partial, as in DeepSeek-V3 Hugging Face checkpoints and mlx_lm's deepseek_v3 ``sanitize``).
    Returns (N, K) in ``dtype`` (computed in fp32). Raises TypeError on wrong dtypes, ValueError on a
    wrong rank or a scale_inv shape that does not match. Source: official inference/kernel.py
    ``weight_dequant``; arXiv 2412.19437 sec. 3.3.
    """
    _check_dtype("w_fp8", w_fp8, FP8_DTYPE)
    _check_dtype("scale_inv", scale_inv, torch.float32)
    _check_block(block_size)
    if w_fp8.dim() != 2:
        raise ValueError(f"w_fp8 must be 2-D (N, K), got shape {tuple(w_fp8.shape)}")
    N, K = w_fp8.shape
    _check_shape("scale_inv", scale_inv, (_cdiv(N, block_size), _cdiv(K, block_size)))
    s = scale_inv.repeat_interleave(block_size, 0)[:N].repeat_interleave(block_size, 1)[:, :K]
    return (w_fp8.float() * s).to(dtype)


def _row_scales(b_s: torch.Tensor, N: int, kb: int, block_size: int) -> torch.Tensor:
    """fp8_gemm's ``b_s`` as (N, KB) per-row scales: as given when it is (N, KB) (1 x bs tiles, an operand from
    `act_quant`), expanded from (ceil(N / bs), KB) 128 x 128 block scales otherwise (one reading when N = 1)."""
    if tuple(b_s.shape) == (N, kb):
        return b_s
    if tuple(b_s.shape) != (_cdiv(N, block_size), kb):
        raise ValueError(f"b_s must have shape ({_cdiv(N, block_size)}, {kb}) (block scales) or ({N}, {kb}) "
                         f"(per-row tile scales), got {tuple(b_s.shape)}")
    return b_s.repeat_interleave(block_size, 0)[:N]


def _fresh(v: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """A new row-major copy of the 1-D ``v`` viewed as ``shape`` (``torch._scaled_mm`` checks the strides of its
    scales, and ``contiguous()`` keeps the odd strides of size-1 dimensions)."""
    return v.new_empty(v.shape).copy_(v).view(shape)


def _scaled_mm_applies(a: torch.Tensor) -> bool:
    """Whether ``torch._scaled_mm`` runs e4m3 operands with per-row and per-column float32 scales here: on CPU in
    torch >= 2.8 (DESIGN.md, platform facts); CUDA runs the Triton kernels instead, other devices the emulation."""
    return a.device.type == "cpu" and hasattr(torch, "_scaled_mm")


def fp8_gemm(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor, block_size: int = 128,
             out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Block-scaled FP8 matmul ``c = dequant(a) @ dequant(b).T`` with an fp32 accumulator promoted per K-block.

    a: (..., K) ``torch.float8_e4m3fn`` with a_s (..., ceil(K / bs)) float32 per-tile scales (from
    ``act_quant``); b: (N, K) ``torch.float8_e4m3fn`` with b_s either (ceil(N / bs), ceil(K / bs)) float32 128 x 128
    block scales (a weight, from ``weight_quant``: Fprop and Dgrad) or (N, ceil(K / bs)) per-row tile scales (an
    operand from ``act_quant``: Wgrad, whose two operands are activations and gradients); the shape decides, and
    when N = 1 both readings give the same scale. For each K-block kb:
    ``acc += (a_kb @ b_kb.T) * a_s[:, kb, None] * scale_b[None, n, kb]`` in fp32, the report's promotion of the
    partial sums to fp32 every N_C = 128 elements. On CPU each block's product is one ``torch._scaled_mm`` call
    (e4m3 operands, per-row and per-column scales, fp32 out); elsewhere the exact fp8 values are multiplied in
    fp32 (an exact emulation: each product of two e4m3 values is exact in fp32). The two differ by fp32 rounding
    only. Returns (..., N) in ``out_dtype`` (default ``torch.get_default_dtype()``). Raises TypeError on wrong
    dtypes, ValueError on mismatched shapes. Source: official inference/kernel.py ``fp8_gemm``; arXiv 2412.19437
    sec. 3.3.
    """
    for name, t in (("a", a), ("b", b)):
        _check_dtype(name, t, FP8_DTYPE)
    for name, t in (("a_s", a_s), ("b_s", b_s)):
        _check_dtype(name, t, torch.float32)
    _check_block(block_size)
    if a.dim() < 1 or b.dim() != 2:
        raise ValueError(f"a must be (..., K) and b (N, K); got shapes {tuple(a.shape)} and {tuple(b.shape)}")
    K, N = a.shape[-1], b.shape[0]
    if b.shape[1] != K:
        raise ValueError(f"b must have shape (N, K) with K = a.shape[-1] = {K}, got {tuple(b.shape)}")
    kb = _cdiv(K, block_size)
    _check_shape("a_s", a_s, (*a.shape[:-1], kb))
    b_s_n = _row_scales(b_s, N, kb, block_size)  # (N, kb)
    a2, a_s2 = a.reshape(-1, K), a_s.reshape(-1, kb)
    acc = torch.zeros(a2.shape[0], N, dtype=torch.float32, device=a.device)
    scaled_mm = _scaled_mm_applies(a) and a2.shape[0] > 0 and N > 0
    with torch.autocast(a.device.type, enabled=False):  # the emulation's fp32 matmul must stay fp32
        for i in range(kb):
            k0, k1 = i * block_size, min((i + 1) * block_size, K)
            if scaled_mm:
                acc += torch._scaled_mm(a2[:, k0:k1], b[:, k0:k1].T, scale_a=_fresh(a_s2[:, i], (-1, 1)),
                                        scale_b=_fresh(b_s_n[:, i], (1, -1)), out_dtype=torch.float32)
            else:
                acc += (a2[:, k0:k1].float() @ b[:, k0:k1].float().T) * a_s2[:, i, None] * b_s_n[None, :, i]
    out_dtype = torch.get_default_dtype() if out_dtype is None else out_dtype
    return acc.to(out_dtype).reshape(*a.shape[:-1], N)


def fp8_grouped_gemm(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor, offsets: torch.Tensor,
                     block_size: int = 128, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Grouped block-scaled FP8 GEMM over expert-sorted rows (the routed experts' Fprop and Dgrad, report sections
    2.1.2 and 3.3): rows ``[offsets[e], offsets[e+1])`` of the result are `fp8_gemm` of those rows of ``a`` against
    expert ``e``'s ``b[e]``.

    a: (M, K) ``torch.float8_e4m3fn`` rows sorted by expert, a_s (M, ceil(K / bs)) float32 (`act_quant`); b: (E, N, K)
    ``torch.float8_e4m3fn`` with b_s (E, ceil(N / bs), ceil(K / bs)) float32 block scales (`stacked_weight_quant`);
    offsets: (E + 1,) int32/int64, rising from 0 to M. Returns (M, N) in ``out_dtype`` (default
    ``torch.get_default_dtype()``); an expert without rows contributes nothing. Raises TypeError on wrong dtypes,
    ValueError on mismatched shapes or offsets that do not split the M rows.
    """
    for name, t in (("a", a), ("b", b)):
        _check_dtype(name, t, FP8_DTYPE)
    for name, t in (("a_s", a_s), ("b_s", b_s)):
        _check_dtype(name, t, torch.float32)
    _check_block(block_size)
    if a.dim() != 2 or b.dim() != 3 or b.shape[2] != a.shape[1]:
        raise ValueError(f"a must be (M, K) and b (E, N, K); got shapes {tuple(a.shape)} and {tuple(b.shape)}")
    E, N, K = b.shape
    kb = _cdiv(K, block_size)
    _check_shape("a_s", a_s, (a.shape[0], kb))
    _check_shape("b_s", b_s, (E, _cdiv(N, block_size), kb))
    if offsets.dtype not in (torch.int32, torch.int64) or tuple(offsets.shape) != (E + 1,):
        raise ValueError(f"offsets must be an int32/int64 tensor of shape ({E + 1},), got {offsets.dtype} "
                         f"{tuple(offsets.shape)}")
    bounds = offsets.tolist()
    if bounds[0] != 0 or bounds[-1] != a.shape[0] or any(x > y for x, y in zip(bounds[:-1], bounds[1:], strict=False)):
        raise ValueError(f"offsets must rise from 0 to M={a.shape[0]}, got {bounds}")
    out_dtype = torch.get_default_dtype() if out_dtype is None else out_dtype
    out = torch.zeros(a.shape[0], N, dtype=out_dtype, device=a.device)
    for e in range(E):
        r0, r1 = bounds[e], bounds[e + 1]
        if r1 > r0:
            out[r0:r1] = fp8_gemm(a[r0:r1], a_s[r0:r1], b[e], b_s[e], block_size, out_dtype)
    return out


def fp8_grouped_wgrad(dy: torch.Tensor, x: torch.Tensor, offsets: torch.Tensor, block_size: int = 128,
                      scale_fmt: str | None = None) -> torch.Tensor:
    """The routed experts' Wgrad in FP8 (report sections 3.3 and 2.1.2): ``dW[e] = dy[seg]^T x[seg]`` for each expert
    segment ``seg = [offsets[e], offsets[e+1])`` of expert-sorted rows, both operands re-tiled along the token axis
    (the axis this GEMM contracts, report section 3.3, Fig. 7): per expert, ``fp8_gemm(*act_quant(dy[seg], bs,
    scale_fmt, transpose=True), *act_quant(x[seg], bs, scale_fmt, transpose=True), bs, float32)``, i.e. bs x 1 tiles
    of dy and x starting at each segment's first row (the last tile of a segment may be partial; a tile never mixes
    two experts' rows), per-row scales on both operands, float32 accumulation promoted per tile of bs tokens.

    dy: (M, N) floating, x: (M, K) floating (any float dtypes, computed in float32), rows sorted by expert; offsets:
    (E + 1,) int32/int64, rising from 0 to M. Returns (E, N, K) float32; an expert without rows gets zeros. Raises
    TypeError if dy or x is not a floating tensor (or is already fp8), ValueError on mismatched shapes, offsets that
    do not split the M rows, a bad block_size or scale_fmt. Source: arXiv 2412.19437 sec. 3.3 (Wgrad re-tiling, the
    1 x 128 tiles of the backward converted to 128 x 1) and sec. 2.1.2 (routed experts).
    """
    _check_float("dy", dy)
    _check_float("x", x)
    _check_block(block_size)
    _check_scale_fmt(scale_fmt)
    if dy.dim() != 2 or x.dim() != 2 or dy.shape[0] != x.shape[0]:
        raise ValueError(f"dy must be (M, N) and x (M, K) with the same M; got shapes {tuple(dy.shape)} and "
                         f"{tuple(x.shape)}")
    if not isinstance(offsets, torch.Tensor) or offsets.dtype not in (torch.int32, torch.int64) \
            or offsets.dim() != 1 or offsets.numel() == 0:
        raise ValueError(f"offsets must be a 1-D int32/int64 tensor of shape (E + 1,), got "
                         f"{getattr(offsets, 'dtype', type(offsets).__name__)} {tuple(getattr(offsets, 'shape', ()))}")
    (M, N), K = dy.shape, x.shape[1]
    bounds = offsets.tolist()
    if bounds[0] != 0 or bounds[-1] != M or any(a > b for a, b in zip(bounds[:-1], bounds[1:], strict=False)):
        raise ValueError(f"offsets must rise from 0 to M={M}, got {bounds}")
    E = len(bounds) - 1
    out = torch.zeros(E, N, K, dtype=torch.float32, device=dy.device)
    for e in range(E):
        r0, r1 = bounds[e], bounds[e + 1]
        if r1 > r0 and N and K:
            out[e] = fp8_gemm(*act_quant(dy[r0:r1], block_size, scale_fmt, transpose=True),
                              *act_quant(x[r0:r1], block_size, scale_fmt, transpose=True), block_size, torch.float32)
    return out


def _truncate(x: torch.Tensor, bits: int) -> torch.Tensor:
    """``x`` (float64) truncated toward zero to ``bits`` significant bits."""
    m, e = torch.frexp(x)
    return torch.ldexp(torch.trunc(m * 2.0**bits) / 2.0**bits, e)


def limited_accumulation_gemm(a: torch.Tensor, b: torch.Tensor, accum_bits: int = 14,
                              promotion_interval: int | None = 128) -> torch.Tensor:
    """An emulation of a tensor-core GEMM whose accumulator keeps only ``accum_bits`` significant bits, with or
    without promotion to fp32 (report section 3.3.2, "Increasing accumulation precision": on H800 the FP8 GEMM
    accumulation keeps about 14 bits, a relative error near 2% at K = 4096; DeepSeek-V3 copies the partial sums to
    fp32 registers every N_C = 128 elements).

    a: (M, K), b: (N, K) floating (e.g. dequantized e4m3 values; computed in float64). Each product ``a[:, k] *
    b[:, k]`` (exact) is added to a running partial sum that is truncated toward zero to ``accum_bits`` bits after
    every addition; every ``promotion_interval`` elements of K the partial sum is added to a float32 accumulator
    and restarted (None: never, the whole K accumulates at limited precision). Returns (M, N) float64. Raises
    ValueError for mismatched shapes, ``accum_bits < 1`` or ``promotion_interval < 1``.
    """
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"a must be (M, K) and b (N, K); got shapes {tuple(a.shape)} and {tuple(b.shape)}")
    if accum_bits < 1 or (promotion_interval is not None and promotion_interval < 1):
        raise ValueError(f"accum_bits={accum_bits}, promotion_interval={promotion_interval}: expected >= 1")
    K = a.shape[1]
    a64, b64 = a.double(), b.double()
    interval = K if promotion_interval is None else promotion_interval
    acc = torch.zeros(a.shape[0], b.shape[0], dtype=torch.float32, device=a.device)
    for k0 in range(0, K, interval):
        part = torch.zeros(a.shape[0], b.shape[0], dtype=torch.float64, device=a.device)
        for k in range(k0, min(k0 + interval, K)):
            part = _truncate(part + a64[:, k, None] * b64[None, :, k], accum_bits)
        acc += part.float()
    return acc.double()
