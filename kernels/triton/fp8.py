"""Fine-grained FP8 (e4m3) quantization and the block-scaled GEMM in Triton; reference: `reference.fp8`.

Source: DeepSeek-V3 technical report (arXiv 2412.19437) section 3.3 and the official ``inference/kernel.py``
(``act_quant``, ``weight_dequant``, ``fp8_gemm``), with the reference's semantics: scales ``s = max(amax, 1e-4)
/ 448`` in float32, values ``clamp(x / s, -448, 448)`` rounded to e4m3, and partial tiles/blocks at the edges
(their amax over the valid elements only). Unlike the reference, ``block_size`` must be a power of two >= 16
(it is a kernel tile), and a NaN input is not guaranteed to reach its scale.

The float32 -> e4m3 rounding has two paths (``round_in_fp32``):
- False: Triton's cast (the GPU's ``cvt.rn.satfinite``), the fast path on a GPU;
- True: `_round_to_e4m3` rounds to the nearest e4m3 value (ties to even) in float32 arithmetic, so the cast that
  follows is exact. Triton's interpreter (triton 3.9) casts wrongly where rounding carries into the next power of
  two (DESIGN.md), so ``None`` picks True under the interpreter and False on a GPU.
The interpreter also decodes the e4m3 NaN patterns (0x7f, 0xff) as +-480; finite values decode exactly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton.utils import cast, check, empty, interpreted
from reference.fp8 import AMAX_MIN, FP8_DTYPE, FP8_MAX

FLOATS = (torch.float32, torch.bfloat16, torch.float16)
OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@triton.jit
def _round_to_e4m3(v):
    """Nearest float8 e4m3 value (ties to even) of float32 ``v``, |v| <= 448, as float32; exact arithmetic.

    The spacing of e4m3 values around |v| is 2^(e - 3) for the binade 2^e, e >= -6, and 2^-9 for subnormals; |v|
    divided by it (an exact power-of-two scaling) is rounded with the float32 add-and-subtract of 1.5 * 2^23.
    The sign bit is copied back, so a negative value that rounds to zero gives -0 (as torch's cast does).
    """
    bits = v.to(tl.int32, bitcast=True)
    e = tl.maximum(((bits >> 23) & 0xFF) - 127, -6) - 3
    step = ((e + 127) << 23).to(tl.float32, bitcast=True)
    inv_step = ((127 - e) << 23).to(tl.float32, bitcast=True)
    q = tl.abs(v) * inv_step
    r = ((q + 12582912.0) - 12582912.0) * step
    return (r.to(tl.int32, bitcast=True) | ((bits >> 31) << 31)).to(tl.float32, bitcast=True)


@triton.jit
def _act_quant_kernel(x_ptr, y_ptr, s_ptr, M, K, KB, AMAX_MIN: tl.constexpr, FP8_MAX: tl.constexpr,
                      ROUND_FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK: tl.constexpr):
    """Program (i, kb): rows [i*BLOCK_M, (i+1)*BLOCK_M) and columns [kb*BLOCK, (kb+1)*BLOCK) of x, y (M, K);
    one scale per row and tile into s (M, KB), KB = cdiv(K, BLOCK)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    kb = tl.program_id(1)
    cols = kb * BLOCK + tl.arange(0, BLOCK)
    mask = (rows < M)[:, None] & (cols < K)[None, :]
    off = rows[:, None] * K + cols[None, :]
    x = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
    s = tl.math.div_rn(tl.maximum(tl.max(tl.abs(x), axis=1), AMAX_MIN), FP8_MAX)
    v = tl.math.div_rn(x, s[:, None])
    v = tl.minimum(tl.maximum(v, -FP8_MAX), FP8_MAX)
    if ROUND_FP32:
        v = _round_to_e4m3(v)
    tl.store(y_ptr + off, cast(v, y_ptr.dtype.element_ty), mask=mask)
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
def _fp8_gemm_kernel(a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr, M, N, K, KB, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program (i, j): c[i-th BLOCK_M rows, j-th BLOCK_N columns] of c (M, N) = a (M, K) @ b (N, K)^T.

    For each K-block kb (BLOCK_K = block_size): acc += dot(a_kb, b_kb^T) * a_s[m, kb] * b_s[n // BLOCK_K, kb],
    acc float32; a_s (M, KB), b_s (cdiv(N, BLOCK_K), KB) float32.
    """
    rm = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, KB):
        k = kb * BLOCK_K + rk
        a = tl.load(a_ptr + rm[:, None] * K + k[None, :], mask=(rm < M)[:, None] & (k < K)[None, :], other=0.0)
        b = tl.load(b_ptr + rn[None, :] * K + k[:, None], mask=(rn < N)[None, :] & (k < K)[:, None], other=0.0)
        a_s = tl.load(as_ptr + rm * KB + kb, mask=rm < M, other=0.0)
        b_s = tl.load(bs_ptr + (rn // BLOCK_K) * KB + kb, mask=rn < N, other=0.0)
        acc += tl.dot(a, b) * a_s[:, None] * b_s[None, :]
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    tl.store(c_ptr + rm[:, None] * N + rn[None, :], cast(acc, c_ptr.dtype.element_ty), mask=mask)


def _check_block(block_size) -> None:
    if not isinstance(block_size, int) or block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size!r}")


def act_quant(x: torch.Tensor, block_size: int = 128,
              round_in_fp32: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize activations to e4m3 per 1 x ``block_size`` tile of the last dimension.

    x: (..., K) float32/bfloat16/float16, contiguous, K >= 1 (the last tile may be partial). Returns ``(y, s)``:
    y (..., K) ``torch.float8_e4m3fn``, s (..., cdiv(K, block_size)) float32, as `reference.fp8.act_quant`.
    ``round_in_fp32``: see the module docstring (None: True under the interpreter). Tiles of 16 rows x
    ``block_size`` per program. Raises TypeError on a wrong dtype, ValueError on a wrong shape, layout, device
    or block_size.
    """
    _check_block(block_size)
    check("x", x, dtypes=FLOATS)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x: expected shape (..., K) with K >= 1, got {tuple(x.shape)}")
    K = x.shape[-1]
    M, KB = x.numel() // K, triton.cdiv(K, block_size)
    y = empty(x.shape, dtype=FP8_DTYPE, device=x.device)
    s = empty(*x.shape[:-1], KB, dtype=torch.float32, device=x.device)
    if M:
        rnd = interpreted() if round_in_fp32 is None else bool(round_in_fp32)
        BLOCK_M = min(16, triton.next_power_of_2(M))
        _act_quant_kernel[(triton.cdiv(M, BLOCK_M), KB)](x, y, s, M, K, KB, AMAX_MIN=AMAX_MIN, FP8_MAX=FP8_MAX,
                                                          ROUND_FP32=rnd, BLOCK_M=BLOCK_M, BLOCK=block_size)
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


def fp8_gemm(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor, block_size: int = 128,
             out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Block-scaled FP8 matmul ``c = dequant(a) @ dequant(b).T`` with a float32 accumulator.

    a: (..., K) ``torch.float8_e4m3fn`` with a_s (..., cdiv(K, bs)) float32 (from `act_quant`); b: (N, K)
    ``torch.float8_e4m3fn`` with b_s (cdiv(N, bs), cdiv(K, bs)) float32 (``weight_scale_inv``); all contiguous.
    Per K-block, the fp8 tile product is scaled by the two scales and added to the float32 accumulator (the
    report's promotion to CUDA cores every 128 elements). Returns (..., N) in ``out_dtype`` (default
    ``torch.get_default_dtype()``). Tiles: up to 64 rows x 64 columns x ``block_size``. Raises TypeError on a
    wrong dtype, ValueError on a wrong shape, layout, device or block_size.
    """
    _check_block(block_size)
    check("a", a, dtypes=FP8_DTYPE)
    if a.dim() < 1:
        raise ValueError(f"a: expected shape (..., K), got {tuple(a.shape)}")
    K = a.shape[-1]
    KB = triton.cdiv(K, block_size)
    check("b", b, ndim=2, dtypes=FP8_DTYPE, shape=(None, K), device=a.device)
    N = b.shape[0]
    check("a_s", a_s, dtypes=torch.float32, shape=(*a.shape[:-1], KB), device=a.device)
    check("b_s", b_s, dtypes=torch.float32, shape=(triton.cdiv(N, block_size), KB), device=a.device)
    out_dtype = torch.get_default_dtype() if out_dtype is None else out_dtype
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"out_dtype: expected one of {[str(d) for d in OUT_DTYPES]}, got {out_dtype}")
    M = a.numel() // K if K else 0
    c = empty(*a.shape[:-1], N, dtype=out_dtype, device=a.device)
    if K == 0:
        return c.zero_()
    if M and N:
        BLOCK_M, BLOCK_N = min(64, max(16, triton.next_power_of_2(M))), 64
        grid = (triton.cdiv(M, BLOCK_M), triton.cdiv(N, BLOCK_N))
        _fp8_gemm_kernel[grid](a, b, c, a_s, b_s, M, N, K, KB, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=block_size)
    return c


__all__ = ["act_quant", "weight_dequant", "fp8_gemm"]
