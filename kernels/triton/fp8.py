"""Fine-grained FP8 (e4m3) quantization and FP8 training's block-scaled GEMMs in Triton; reference: `reference.fp8`.

Source: DeepSeek-V3 technical report (arXiv 2412.19437) section 3.3 and the official ``inference/kernel.py``
(``act_quant``, ``weight_dequant``, ``fp8_gemm``), with the reference's semantics: scales ``s = max(amax, 1e-4)
/ 448`` in float32 (``scale_fmt="ue8m0"``: rounded up to a power of two, exactly, by integer bit operations),
values ``clamp(x / s, -448, 448)`` rounded to e4m3, and partial tiles/blocks at the edges (their amax over the valid
elements only). A NaN reaches its tile's scale and so every value of that tile, as in the reference. Unlike the
reference, ``block_size`` must be a power of two >= 16 (it is a kernel tile).

Entry points (the ``ops`` of `reference.fp8_training`: ``act_quant``, ``fp8_gemm``, ``fp8_grouped_gemm``,
``fp8_grouped_wgrad``):
- `act_quant`: 1 x bs tiles along the last dim, or with ``transpose=True`` the quantization of x^T fused with the
  transpose (one kernel reads x (M, K) and writes y (K, M), the re-tiling Wgrad needs, report section 3.3).
- `fp8_gemm`: c = a @ b^T, the FP8 GEMM of Fprop (b a weight, 128 x 128 block scales), Dgrad (b = W^T with the
  transposed block scales) and Wgrad (b from `act_quant`: per-row 1 x 128 scales); per K block one ``tl.dot`` scaled
  and added to the float32 accumulator (the report's promotion to CUDA cores every 128 elements).
- `fp8_grouped_gemm`: the same per expert over expert-sorted rows, one launch (routed experts' Fprop and Dgrad).
- `fp8_grouped_wgrad`: the routed experts' Wgrad, dW[e] = dy[seg]^T x[seg] per expert segment, in two launches (the
  per-segment transposed quantization, then a grouped GEMM over each expert's 128-token tiles), no host sync.
- `weight_dequant`.

The float32 -> e4m3 rounding has two paths (``round_in_fp32``):
- False: Triton's cast (the GPU's ``cvt.rn.satfinite``), the fast path on a GPU;
- True: `_round_to_e4m3` rounds to the nearest e4m3 value (ties to even) in float32 arithmetic, so the cast that
  follows is exact. Triton's interpreter (triton 3.9) casts wrongly where rounding carries into the next power of
  two (DESIGN.md), so ``None`` picks True under the interpreter and False on a GPU.
The interpreter also decodes the e4m3 NaN patterns (0x7f, 0xff) as +-480 in ``tl.dot``; finite values decode exactly
(a NaN tile still reaches the GEMM's output through its NaN scale).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton.utils import cast, check, empty, expert_tile, interpreted, pow2
from reference.fp8 import AMAX_MIN, FP8_DTYPE, FP8_MAX, SCALE_FMTS

FLOATS = (torch.float32, torch.bfloat16, torch.float16)
OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
INDEX = (torch.int32, torch.int64)


@triton.jit
def _round_to_e4m3(v):
    """Nearest float8 e4m3 value (ties to even) of float32 ``v``, |v| <= 448, as float32; exact arithmetic.

    The spacing of e4m3 values around |v| is 2^(e - 3) for the binade 2^e, e >= -6, and 2^-9 for subnormals; |v|
    divided by it (an exact power-of-two scaling) is rounded with the float32 add-and-subtract of 1.5 * 2^23.
    The sign bit is copied back, so a negative value that rounds to zero gives -0 (as torch's cast does). NaN stays
    NaN.
    """
    bits = v.to(tl.int32, bitcast=True)
    e = tl.maximum(((bits >> 23) & 0xFF) - 127, -6) - 3
    step = ((e + 127) << 23).to(tl.float32, bitcast=True)
    inv_step = ((127 - e) << 23).to(tl.float32, bitcast=True)
    q = tl.abs(v) * inv_step
    r = ((q + 12582912.0) - 12582912.0) * step
    return (r.to(tl.int32, bitcast=True) | ((bits >> 31) << 31)).to(tl.float32, bitcast=True)


@triton.jit
def _pow2_ceil(s):
    """The smallest power of two >= float32 ``s`` > 0, exactly (ue8m0 scales): ``s`` itself when its mantissa bits
    are 0, else 2^(exponent + 1); NaN and inf stay."""
    bits = s.to(tl.int32, bitcast=True)
    up = (((bits >> 23) + 1) << 23).to(tl.float32, bitcast=True)
    return tl.where(((bits & 0x7FFFFF) == 0) | (s != s), s, up)


@triton.jit
def _quant_rows(x, FP8: tl.constexpr, AMAX_MIN: tl.constexpr, FP8_MAX: tl.constexpr, UE8M0: tl.constexpr,
                ROUND_FP32: tl.constexpr):
    """One tile per row of the float32 tile x (R, C) (zeros outside the valid elements): returns ``(y, s)``, y (R, C)
    e4m3 (dtype ``FP8``) = clamp(x / s, +-448), s (R,) float32 = max(amax, AMAX_MIN) / 448 (rounded up to a power
    of two with UE8M0). NaN propagates through the amax, the clamp and the rounding to y (0x7f). ROUND_FP32: v is
    rounded on the e4m3 grid in float32 so the cast is exact, and NaN is written as 0x7f by hand (the interpreter
    casts it to 0x7c, 384)."""
    amax = tl.max(tl.abs(x), axis=1)  # drops NaN (a GPU's max.f32, the interpreter alike): put it back
    amax = tl.where(tl.max((x != x).to(tl.int32), axis=1) > 0, float("nan"), amax)
    s = tl.math.div_rn(tl.maximum(amax, AMAX_MIN, propagate_nan=tl.PropagateNan.ALL), FP8_MAX)
    if UE8M0:
        s = _pow2_ceil(s)
    v = tl.clamp(tl.math.div_rn(x, s[:, None]), -FP8_MAX, FP8_MAX, propagate_nan=tl.PropagateNan.ALL)
    if ROUND_FP32:
        y = _round_to_e4m3(v).to(FP8)
        y = tl.where(v != v, tl.full(v.shape, 0x7F, tl.uint8).to(FP8, bitcast=True), y)
    else:
        y = v.to(FP8)
    return y, s


@triton.jit
def _act_quant_kernel(x_ptr, y_ptr, s_ptr, M, K, KB, stride_xm, stride_xk, AMAX_MIN: tl.constexpr,
                      FP8_MAX: tl.constexpr, UE8M0: tl.constexpr, ROUND_FP32: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK: tl.constexpr):
    """Program (i, kb): rows [i*BLOCK_M, (i+1)*BLOCK_M) and columns [kb*BLOCK, (kb+1)*BLOCK) of x (M, K) (any
    strides), y (M, K) contiguous; one scale per row and tile into s (M, KB) contiguous, KB = cdiv(K, BLOCK)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    kb = tl.program_id(1)
    cols = kb * BLOCK + tl.arange(0, BLOCK)
    mask = (rows < M)[:, None] & (cols < K)[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk, mask=mask, other=0.0)
    y, s = _quant_rows(x.to(tl.float32), y_ptr.dtype.element_ty, AMAX_MIN, FP8_MAX, UE8M0, ROUND_FP32)
    tl.store(y_ptr + rows[:, None] * K + cols[None, :], y, mask=mask)
    tl.store(s_ptr + rows * KB + kb, s, mask=rows < M)


@triton.jit
def _weight_dequant_kernel(w_ptr, s_ptr, y_ptr, N, K, KB, BLOCK: tl.constexpr):
    """Program (nb, kb): the BLOCK x BLOCK block (nb, kb) of w, y (N, K), times its scale s[nb, kb]; s (NB, KB)."""
    nb, kb = tl.program_id(0), tl.program_id(1)
    rows = nb.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    cols = kb * BLOCK + tl.arange(0, BLOCK)
    mask = (rows < N)[:, None] & (cols < K)[None, :]
    off = rows[:, None] * K + cols[None, :]
    s = tl.load(s_ptr + nb * KB + kb)
    w = tl.load(w_ptr + off, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + off, cast(w * s, y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _fp8_gemm_kernel(a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr, offsets_ptr, M, N, K, KB, stride_am, stride_be, stride_bn,
                     stride_asm, stride_ask, stride_bse, stride_bsn, stride_bsk, E: tl.constexpr,
                     GROUPED: tl.constexpr, B_ROWS: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program (t, j): a BLOCK_M x BLOCK_N tile of c (M, N) = a (M, K) @ b[e] (N, K)^T, e the rows' expert.

    For each K block kb (BLOCK_K = block_size): acc += dot(a_kb, b_kb^T) * a_s[m, kb] * scale_b(n, kb), acc float32;
    scale_b(n, kb) = b_s[e, n, kb] (B_ROWS, per-row scales) or b_s[e, n // BLOCK_K, kb] (block scales). GROUPED: t
    indexes the row tiles of the expert segments (`expert_tile`; programs past the last tile return, an empty
    expert's weights are never read); else e = 0 and t the t-th BLOCK_M rows. a and b[e] are K-contiguous (row
    strides given), the scales strided, c contiguous.
    """
    if GROUPED:
        e, start, end = expert_tile(offsets_ptr, tl.program_id(0), M, E, BLOCK_M, BLOCK_E)
        if e >= E:
            return
        b_ptr += e.to(tl.int64) * stride_be
        bs_ptr += e.to(tl.int64) * stride_bse
    else:
        start = tl.program_id(0) * BLOCK_M
        end = M
    rm = start + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mmask, nmask = rm < end, rn < N
    a_rows = a_ptr + rm.to(tl.int64)[:, None] * stride_am
    b_rows = b_ptr + rn.to(tl.int64)[None, :] * stride_bn
    as_rows = as_ptr + rm.to(tl.int64) * stride_asm
    bs_rows = bs_ptr + (rn if B_ROWS else rn // BLOCK_K).to(tl.int64) * stride_bsn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, KB):
        k = kb * BLOCK_K + rk
        kmask = k < K
        a = tl.load(a_rows + k[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(b_rows + k[:, None], mask=nmask[None, :] & kmask[:, None], other=0.0)
        a_s = tl.load(as_rows + kb * stride_ask, mask=mmask, other=0.0)
        b_s = tl.load(bs_rows + kb * stride_bsk, mask=nmask, other=0.0)
        acc += tl.dot(a, b) * a_s[:, None] * b_s[None, :]
    mask = mmask[:, None] & nmask[None, :]
    tl.store(c_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :], cast(acc, c_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _segment_quant_t_kernel(x_ptr, y_ptr, s_ptr, offsets_ptr, M, C, T_MAX, stride_xm, stride_xc, E: tl.constexpr,
                            AMAX_MIN: tl.constexpr, FP8_MAX: tl.constexpr, UE8M0: tl.constexpr,
                            ROUND_FP32: tl.constexpr, BLOCK: tl.constexpr, BLOCK_C: tl.constexpr,
                            BLOCK_E: tl.constexpr):
    """Per-segment quantization of x^T fused with the transpose (Wgrad's operands: of the routed experts, and with one
    segment of all M rows those of `act_quant(..., transpose=True)`). Program
    (t, j): row tile t of the expert segments (`expert_tile`: rows [start, min(start + BLOCK, end)) of one expert)
    and columns [j*BLOCK_C, (j+1)*BLOCK_C) of x (M, C) (any strides); one amax per column over the tile's rows, the
    e4m3 values stored transposed into y (C, M) and the scales into column t of s (C, T_MAX); y and s contiguous.
    Programs past the last tile return (their columns of s stay unwritten and are never read)."""
    t = tl.program_id(0)
    e, start, end = expert_tile(offsets_ptr, t, M, E, BLOCK, BLOCK_E)
    if e >= E:
        return
    rows = start.to(tl.int64) + tl.arange(0, BLOCK)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows < end)[:, None] & (cols < C)[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xc, mask=mask, other=0.0)
    y, s = _quant_rows(tl.trans(x.to(tl.float32)), y_ptr.dtype.element_ty, AMAX_MIN, FP8_MAX, UE8M0,
                       ROUND_FP32)  # (BLOCK_C, BLOCK)
    tl.store(y_ptr + cols[:, None] * M + rows[None, :], y, mask=tl.trans(mask))
    tl.store(s_ptr + cols * T_MAX + t, s, mask=cols < C)


@triton.jit
def _grouped_wgrad_kernel(a_ptr, b_ptr, as_ptr, bs_ptr, c_ptr, offsets_ptr, M, N, K, T_MAX, E: tl.constexpr,
                          BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr):
    """Program (e, i, j): the BLOCK_N x BLOCK_K tile (i, j) of c[e] (N, K) = dy[seg]^T x[seg] from the quantized
    transposes a = dy^T (N, M) and b = x^T (K, M) (e4m3, contiguous) with their tile scales as (N, T_MAX) and
    (K, T_MAX) (column t: row tile t of `expert_tile`'s schedule). Expert e's tiles are the cdiv(count_e, BLOCK)
    after those of experts 0..e-1 (computed here from the offsets); per tile: acc += dot(a_t, b_t^T) * a_s[n, t] *
    b_s[k, t] in float32. An empty expert stores zeros. c (E, N, K) contiguous."""
    e = tl.program_id(0)
    ex = tl.arange(0, BLOCK_E)
    emask = ex < E
    seg0 = tl.load(offsets_ptr + ex, mask=emask, other=0).to(tl.int32)
    seg1 = tl.load(offsets_ptr + ex + 1, mask=emask, other=0).to(tl.int32)
    tiles = (seg1 - seg0 + BLOCK - 1) // BLOCK
    first = tl.sum(tl.where(ex < e, tiles, 0), axis=0)
    r0 = tl.sum(tl.where(ex == e, seg0, 0), axis=0)
    r1 = tl.minimum(tl.sum(tl.where(ex == e, seg1, 0), axis=0), M)
    count = tl.sum(tl.where(ex == e, tiles, 0), axis=0)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.program_id(2) * BLOCK_K + tl.arange(0, BLOCK_K)
    nmask, kmask = rn < N, rk < K
    a_rows = a_ptr + rn.to(tl.int64)[:, None] * M
    b_rows = b_ptr + rk.to(tl.int64)[None, :] * M
    as_rows = as_ptr + rn.to(tl.int64) * T_MAX
    bs_rows = bs_ptr + rk.to(tl.int64) * T_MAX
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for i in range(0, count):
        m = r0 + i * BLOCK + tl.arange(0, BLOCK)
        mmask = m < r1
        a = tl.load(a_rows + m[None, :], mask=nmask[:, None] & mmask[None, :], other=0.0)
        b = tl.load(b_rows + m[:, None], mask=kmask[None, :] & mmask[:, None], other=0.0)
        a_s = tl.load(as_rows + first + i, mask=nmask, other=0.0)
        b_s = tl.load(bs_rows + first + i, mask=kmask, other=0.0)
        acc += tl.dot(a, b) * a_s[:, None] * b_s[None, :]
    c_off = e.to(tl.int64) * N * K + rn.to(tl.int64)[:, None] * K + rk[None, :]
    tl.store(c_ptr + c_off, acc, mask=nmask[:, None] & kmask[None, :])


def _check_block(block_size) -> None:
    if not isinstance(block_size, int) or block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size!r}")


def _out_dtype(out_dtype):
    out_dtype = torch.get_default_dtype() if out_dtype is None else out_dtype
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"out_dtype: expected one of {[str(d) for d in OUT_DTYPES]}, got {out_dtype}")
    return out_dtype


def _k_major(t: torch.Tensor) -> torch.Tensor:
    """``t`` with a unit stride along its last dim (an FP8 GEMM operand: Hopper's FP8 tensor cores take K-major
    operands), copied only when it has another one (e.g. the ``W.T`` view of Dgrad)."""
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def act_quant(x: torch.Tensor, block_size: int = 128, scale_fmt: str | None = None, transpose: bool = False,
              round_in_fp32: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize activations to e4m3 per 1 x ``block_size`` tile of the last dimension (of x^T with ``transpose``).

    x: (..., K) float32/bfloat16/float16, any strides, K >= 1 (the last tile may be partial). Returns ``(y, s)``:
    y (..., K) ``torch.float8_e4m3fn``, s (..., cdiv(K, block_size)) float32, both contiguous, as
    `reference.fp8.act_quant`. ``transpose=True``: x (M, K) 2-D with M >= 1; returns the quantization of
    ``x.T``: y (K, M), s (K, cdiv(M, block_size)) (block_size x 1 tiles of x, the operands of Wgrad), in one kernel
    that reads x once (tiles of block_size x 64 columns, 32 on a GPU). ``scale_fmt``: None (s = max(amax, 1e-4) /
    448) or ``"ue8m0"`` (s rounded up to a power of two; the same s quantizes and dequantizes).
    ``round_in_fp32``: see the module docstring (None: True under the interpreter). Tiles of 16 rows x
    ``block_size`` per program without ``transpose``. Raises TypeError on a wrong dtype, ValueError on a wrong
    shape, device, scale_fmt or block_size. Source: arXiv 2412.19437 section 3.3.
    """
    _check_block(block_size)
    if scale_fmt not in SCALE_FMTS:
        raise ValueError(f"scale_fmt: expected None or 'ue8m0', got {scale_fmt!r}")
    check("x", x, dtypes=FLOATS, contiguous=False)
    rnd = interpreted() if round_in_fp32 is None else bool(round_in_fp32)
    consts = dict(AMAX_MIN=AMAX_MIN, FP8_MAX=FP8_MAX, UE8M0=scale_fmt == "ue8m0", ROUND_FP32=rnd)
    if transpose:
        if x.dim() != 2 or x.shape[0] == 0:
            raise ValueError(f"x: transpose=True needs a 2-D (M, K) tensor with M >= 1, got {tuple(x.shape)}")
        M, K = x.shape
        MB = triton.cdiv(M, block_size)
        if not K:
            return empty(0, M, dtype=FP8_DTYPE, device=x.device), empty(0, MB, dtype=torch.float32, device=x.device)
        one_segment = torch.tensor([0, M], dtype=torch.int32, device=x.device)  # the grouped Wgrad's kernel, E = 1
        return _segment_quant_t(x, one_segment, MB, block_size, consts)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x: expected shape (..., K) with K >= 1, got {tuple(x.shape)}")
    K = x.shape[-1]
    KB = triton.cdiv(K, block_size)
    y = empty(x.shape, dtype=FP8_DTYPE, device=x.device)
    s = empty(*x.shape[:-1], KB, dtype=torch.float32, device=x.device)
    x2 = x.reshape(-1, K)  # a view when the leading dims allow it
    M = x2.shape[0]
    if M:
        BLOCK_M = min(16, triton.next_power_of_2(M))
        _act_quant_kernel[(triton.cdiv(M, BLOCK_M), KB)](x2, y, s, M, K, KB, x2.stride(0), x2.stride(1),
                                                          BLOCK_M=BLOCK_M, BLOCK=block_size, **consts)
    return y, s


def weight_dequant(w_fp8: torch.Tensor, scale_inv: torch.Tensor, block_size: int = 128,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dequantize block-scaled weights: ``w[n, k] = w_fp8[n, k] * scale_inv[n // bs, k // bs]``.

    w_fp8: (N, K) ``torch.float8_e4m3fn``, contiguous; scale_inv: (cdiv(N, bs), cdiv(K, bs)) float32, contiguous
    (edge blocks may be partial). Returns (N, K) in ``dtype`` (float32/bfloat16/float16/float64), computed in
    float32; one ``block_size`` x ``block_size`` block per program. Raises TypeError on a wrong dtype, ValueError
    on a wrong shape, layout, device or block_size.
    """
    _check_block(block_size)
    check("w_fp8", w_fp8, ndim=2, dtypes=FP8_DTYPE)
    N, K = w_fp8.shape
    grid = (triton.cdiv(N, block_size), triton.cdiv(K, block_size))
    check("scale_inv", scale_inv, dtypes=torch.float32, shape=grid, device=w_fp8.device)
    if dtype not in OUT_DTYPES:
        raise TypeError(f"dtype: expected one of {[str(d) for d in OUT_DTYPES]}, got {dtype}")
    y = empty(N, K, dtype=dtype, device=w_fp8.device)
    if N and K:
        _weight_dequant_kernel[grid](w_fp8, scale_inv, y, N, K, grid[1], BLOCK=block_size)
    return y


def _b_scales(b_s: torch.Tensor, lead: tuple, N: int, KB: int, block_size: int, device) -> bool:
    """Check b_s against b's (..., N, K): block scales (..., cdiv(N, bs), KB) or per-row scales (..., N, KB); returns
    whether they are per-row (N > 1 and the shape says so; for N == 1 both readings are one scale)."""
    check("b_s", b_s, dtypes=torch.float32, device=device, contiguous=False)
    blocks, rows = (*lead, triton.cdiv(N, block_size), KB), (*lead, N, KB)
    if tuple(b_s.shape) not in (blocks, rows):
        raise ValueError(f"b_s: expected shape {blocks} (block scales) or {rows} (per-row scales), "
                         f"got {tuple(b_s.shape)}")
    return N > 1 and tuple(b_s.shape) == rows


def _launch(a, a_s, b, b_s, per_row, c, offsets, block_size):
    """c (M, N) = a (M, K) @ b[e] (N, K)^T with the scales, per expert segment when ``offsets`` is given (b (E, N, K),
    b_s (E, ., KB)), else b (1, N, K); a and b K-major, c contiguous; M, N, K >= 1."""
    (M, K), (E, N, _) = a.shape, b.shape
    grouped = offsets is not None
    if interpreted():  # small tiles: the interpreter's time grows with the masked-off work
        BLOCK_M, BLOCK_N, warps = min(32 if grouped else 64, max(16, triton.next_power_of_2(M))), 64, 4
    else:
        BLOCK_M, BLOCK_N = min(64 if grouped else 128, max(16, triton.next_power_of_2(M))), 128
        warps = 8 if BLOCK_M >= 64 else 4
    rows = triton.cdiv(M, BLOCK_M) + (min(E, M) if grouped else 0)  # bound on sum_e cdiv(count_e, BLOCK_M)
    _fp8_gemm_kernel[(rows, triton.cdiv(N, BLOCK_N))](
        a, b, c, a_s, b_s, offsets if grouped else a_s, M, N, K, triton.cdiv(K, block_size), a.stride(0),
        b.stride(0), b.stride(1), a_s.stride(0), a_s.stride(1), b_s.stride(0), b_s.stride(1), b_s.stride(2), E=E,
        GROUPED=grouped, B_ROWS=per_row, BLOCK_E=triton.next_power_of_2(E), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
        BLOCK_K=block_size, num_warps=warps, num_stages=3)


def fp8_gemm(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor, block_size: int = 128,
             out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Block-scaled FP8 matmul ``c = dequant(a) @ dequant(b).T`` with a float32 accumulator.

    a: (..., K) ``torch.float8_e4m3fn`` with a_s (..., cdiv(K, bs)) float32 (from `act_quant`); b: (N, K)
    ``torch.float8_e4m3fn`` with b_s either (cdiv(N, bs), cdiv(K, bs)) float32 block scales (a weight's
    ``weight_scale_inv``: Fprop, and Dgrad with b = W^T and b_s = the transposed block scales) or (N, cdiv(K, bs))
    per-row scales (an `act_quant` output: Wgrad); the shape decides. Any strides: an operand that is not
    K-contiguous (a ``W.T`` view) is copied once, scales are read in place. Per K block, the fp8 tile product is
    scaled by the two scales and added to the float32 accumulator (the report's promotion to CUDA cores every 128
    elements). Returns (..., N) contiguous in ``out_dtype`` (default ``torch.get_default_dtype()``). Tiles: up to
    128 rows x 128 columns x ``block_size`` on a GPU (64 x 64 interpreted). Raises TypeError on a wrong dtype,
    ValueError on a wrong shape, device or block_size. Source: arXiv 2412.19437 section 3.3.
    """
    _check_block(block_size)
    check("a", a, dtypes=FP8_DTYPE, contiguous=False)
    if a.dim() < 1:
        raise ValueError(f"a: expected shape (..., K), got {tuple(a.shape)}")
    K = a.shape[-1]
    KB = triton.cdiv(K, block_size)
    check("b", b, ndim=2, dtypes=FP8_DTYPE, shape=(None, K), device=a.device, contiguous=False)
    N = b.shape[0]
    check("a_s", a_s, dtypes=torch.float32, shape=(*a.shape[:-1], KB), device=a.device, contiguous=False)
    per_row = _b_scales(b_s, (), N, KB, block_size, a.device)
    c = empty(*a.shape[:-1], N, dtype=_out_dtype(out_dtype), device=a.device)
    if K == 0:
        return c.zero_()
    a2, a_s2 = _k_major(a.reshape(-1, K)), a_s.reshape(-1, KB)
    if a2.shape[0] and N:
        _launch(a2, a_s2, _k_major(b)[None], b_s[None], per_row, c, None, block_size)
    return c


def fp8_grouped_gemm(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor, offsets: torch.Tensor,
                     block_size: int = 128, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """FP8 grouped GEMM over expert-sorted rows: ``c[r] = fp8_gemm(a[r], a_s[r], b[e], b_s[e])`` for each row r of
    expert e's segment [offsets[e], offsets[e+1]), in one launch (the routed experts' Fprop and Dgrad).

    a: (M, K) ``torch.float8_e4m3fn`` rows sorted by expert, a_s (M, cdiv(K, bs)) float32; b: (E, N, K)
    ``torch.float8_e4m3fn``, b_s (E, cdiv(N, bs), cdiv(K, bs)) float32 block scales (or (E, N, cdiv(K, bs)) per-row
    scales); offsets (E+1,) int32/int64, 0 = offsets[0] <= ... <= offsets[E] = M (not checked: that would need a
    device sync). Any strides (operands copied to K-major when needed, as in `fp8_gemm`). Returns (M, N) contiguous
    in ``out_dtype`` (default ``torch.get_default_dtype()``), float32 accumulation promoted per K block.

    Schedule (that of `kernels.triton.grouped_gemm`, computed in the kernel from the offsets: no host sync): program
    (t, j) takes row tile t of the nonempty segments in expert order (expert e owns cdiv(count_e, BLOCK_M) tiles, so
    a tile never mixes two experts' rows) and output columns j; the grid ``(cdiv(M, BLOCK_M) + min(E, M),
    cdiv(N, BLOCK_N))`` bounds the tile count, programs past the last tile return at once, and an empty expert's
    weights are never read. Tiles 64 x 128 x ``block_size`` on a GPU (32 x 64 interpreted). Raises TypeError on a
    wrong dtype, ValueError on a wrong shape, device or block_size. Source: arXiv 2412.19437 sections 2.1.2, 3.3.
    """
    _check_block(block_size)
    check("a", a, ndim=2, dtypes=FP8_DTYPE, contiguous=False)
    M, K = a.shape
    KB = triton.cdiv(K, block_size)
    check("b", b, ndim=3, dtypes=FP8_DTYPE, shape=(None, None, K), device=a.device, contiguous=False)
    E, N, _ = b.shape
    check("a_s", a_s, dtypes=torch.float32, shape=(M, KB), device=a.device, contiguous=False)
    per_row = _b_scales(b_s, (E,), N, KB, block_size, a.device)
    check("offsets", offsets, dtypes=INDEX, shape=(E + 1,), device=a.device, contiguous=False)
    c = empty(M, N, dtype=_out_dtype(out_dtype), device=a.device)
    if K == 0:
        return c.zero_()
    if M and N and E:
        _launch(_k_major(a), a_s, _k_major(b), b_s, per_row, c, offsets.contiguous(), block_size)
    return c


def _segment_quant_t(x, offsets, t_max, block_size, consts):
    """(y (C, M) e4m3, s (C, t_max) float32): x (M, C) quantized per bs x 1 tile of each expert segment, transposed
    (`_segment_quant_t_kernel`); M, C >= 1."""
    M, C = x.shape
    E = offsets.shape[0] - 1
    y = empty(C, M, dtype=FP8_DTYPE, device=x.device)
    s = empty(C, t_max, dtype=torch.float32, device=x.device)
    BLOCK_C = min(64 if interpreted() else 32, max(16, triton.next_power_of_2(C)))
    _segment_quant_t_kernel[(t_max, triton.cdiv(C, BLOCK_C))](
        x, y, s, offsets, M, C, t_max, x.stride(0), x.stride(1), E=E, BLOCK=block_size, BLOCK_C=BLOCK_C,
        BLOCK_E=triton.next_power_of_2(E), **consts)
    return y, s


def fp8_grouped_wgrad(dy: torch.Tensor, x: torch.Tensor, offsets: torch.Tensor, block_size: int = 128,
                      scale_fmt: str | None = None, round_in_fp32: bool | None = None) -> torch.Tensor:
    """The routed experts' Wgrad in FP8, as `reference.fp8.fp8_grouped_wgrad`: ``dW[e] = fp8_gemm(*act_quant(dy[seg],
    transpose=True), *act_quant(x[seg], transpose=True))`` for each expert segment seg = [offsets[e], offsets[e+1])
    (block_size x 1 tiles of dy and x starting at each segment's first row), in two launches and no host sync.

    dy: (M, N), x: (M, K) float32/bfloat16/float16 (any strides), rows sorted by expert; offsets (E+1,) int32/int64,
    0 = offsets[0] <= ... <= offsets[E] = M (not checked: that would need a device sync). Returns (E, N, K) float32
    contiguous; an empty expert gets zeros. ``scale_fmt``: None or ``"ue8m0"``; ``round_in_fp32``: as `act_quant`.

    Launch 1 (`_segment_quant_t_kernel`, once for dy and once for x: the same kernel): the row tiles of the segments
    in expert order (`expert_tile`'s schedule, a tile never mixing two experts), each quantized per column and
    stored transposed, y (C, M) and the scales at column t of s (C, T_max), T_max = cdiv(M, bs) + min(E, M) bounding
    the tile count. Launch 2 (`_grouped_wgrad_kernel`): program (e, n tile, k tile) loops over expert e's tiles and
    accumulates each tile's fp8 product scaled by its two per-row scales in float32 (the report's promotion every
    128 tokens). Tiles 128 x 128 x block_size on a GPU (64 x 64 interpreted). Raises TypeError on a wrong dtype,
    ValueError on a wrong shape, device, scale_fmt or block_size. Source: arXiv 2412.19437 sections 3.3 (Wgrad
    re-tiling) and 2.1.2 (routed experts).
    """
    _check_block(block_size)
    if scale_fmt not in SCALE_FMTS:
        raise ValueError(f"scale_fmt: expected None or 'ue8m0', got {scale_fmt!r}")
    check("dy", dy, ndim=2, dtypes=FLOATS, contiguous=False)
    M, N = dy.shape
    check("x", x, ndim=2, dtypes=FLOATS, shape=(M, None), device=dy.device, contiguous=False)
    K = x.shape[1]
    check("offsets", offsets, ndim=1, dtypes=INDEX, device=dy.device, contiguous=False)
    if offsets.shape[0] == 0:
        raise ValueError("offsets: expected shape (E + 1,) with E >= 0, got (0,)")
    E = offsets.shape[0] - 1
    c = empty(E, N, K, dtype=torch.float32, device=dy.device)
    if M == 0 or c.numel() == 0:
        return c.zero_()
    rnd = interpreted() if round_in_fp32 is None else bool(round_in_fp32)
    consts = dict(AMAX_MIN=AMAX_MIN, FP8_MAX=FP8_MAX, UE8M0=scale_fmt == "ue8m0", ROUND_FP32=rnd)
    offsets = offsets.contiguous()
    t_max = triton.cdiv(M, block_size) + min(E, M)
    a, a_s = _segment_quant_t(dy, offsets, t_max, block_size, consts)
    b, b_s = _segment_quant_t(x, offsets, t_max, block_size, consts)
    if interpreted():
        BLOCK_N, BLOCK_K, warps = min(64, pow2(N)), min(64, pow2(K)), 4
    else:
        BLOCK_N, BLOCK_K, warps = 128, 128, 8
    _grouped_wgrad_kernel[(E, triton.cdiv(N, BLOCK_N), triton.cdiv(K, BLOCK_K))](
        a, b, a_s, b_s, c, offsets, M, N, K, t_max, E=E, BLOCK=block_size, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
        BLOCK_E=triton.next_power_of_2(E), num_warps=warps, num_stages=3)
    return c


__all__ = ["act_quant", "weight_dequant", "fp8_gemm", "fp8_grouped_gemm", "fp8_grouped_wgrad"]
