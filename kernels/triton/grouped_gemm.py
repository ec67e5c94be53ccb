"""Grouped GEMM over expert-sorted rows, forward and backward: the routed experts' matrix products.

Source: DeepSeek-V3 technical report (arXiv 2412.19437) section 2.1.2 (DeepSeekMoE); the definition of correct is
the per-expert loop of `reference.moe.Experts.forward` (``x[rows of e] @ w[e]^T`` for each expert ``e``).
`kernels.triton.moe` sorts the token-expert pairs by expert (`permute`) and calls these.

Entry points (differentiable unless said otherwise):

- ``grouped_gemm(x_sorted, w, offsets)`` -> (M, N), ``x_seg @ w[e]^T`` per expert segment
  ``[offsets[e], offsets[e+1])``.
- ``grouped_gate_up(x_sorted, gate_proj, up_proj, offsets)`` -> ``(g, u)``, both grouped GEMMs in one pass.
- ``grouped_gemm_forward`` and ``grouped_gemm_backward``: the raw launchers, one kernel pass each, no autograd.

Kernels: `_grouped_mm_kernel` (row tiles of the nonempty segments x output columns; an empty expert costs
nothing and its weights are never read) and `_grouped_dw_kernel` (one weight-gradient tile per program; an
empty expert gets an exact zero). Tiles go through `kernels.triton.utils`: `tile_dot` (float32 accumulation,
IEEE float32 for float32 inputs, so float32 results meet the float32 tolerance; bfloat16 tiles upcast under
the interpreter) and `cast` (bfloat16 results rounded to nearest under the interpreter too).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import cast, check, empty, expert_tile, interpreted, tile_dot

FLOATS = (torch.float32, torch.bfloat16, torch.float16)
INDEX = (torch.int32, torch.int64)


@triton.jit
def _grouped_mm_kernel(a_ptr, b_ptr, c_ptr, a2_ptr, b2_ptr, c2_ptr, offsets_ptr, M, OUT, RED,
                       stride_be, stride_bo, stride_br,
                       E: tl.constexpr, PAIR: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr):
    """c[r, o] = sum_k a[r, k] * b[e(r)][k, o] for rows r of expert e's segment [offsets[e], offsets[e+1]).

    PAIR = 0: that product alone. PAIR = 1 (gate and up): also c2 = a @ b2[e], reusing the loaded a tile.
    PAIR = 2 (their input gradient): c = a @ b[e] + a2 @ b2[e]. b and b2 share one layout: b[e][k, o] lives
    at ``b_ptr + e*stride_be + k*stride_br + o*stride_bo``; a, a2 are (M, RED), c, c2 (M, OUT), contiguous.

    Program (t, j): t indexes the row tiles of the nonempty segments in expert order (tile schedule from the
    offsets: expert e owns cdiv(count_e, BLOCK_M) tiles), j the BLOCK_O output columns. Programs past the
    last tile return at once, so an empty expert costs nothing and its weights are never read.
    """
    e, start, end = expert_tile(offsets_ptr, tl.program_id(0), M, E, BLOCK_M, BLOCK_E)
    if e >= E:
        return
    rows = start + tl.arange(0, BLOCK_M)
    rmask = rows < end
    cols = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    omask = cols < OUT
    a_offs = rows[:, None].to(tl.int64) * RED
    b_offs = e.to(tl.int64) * stride_be + cols[None, :].to(tl.int64) * stride_bo
    acc = tl.zeros((BLOCK_M, BLOCK_O), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_O), dtype=tl.float32)
    for k0 in range(0, RED, BLOCK_R):
        ks = k0 + tl.arange(0, BLOCK_R)
        kmask = ks < RED
        amask = rmask[:, None] & kmask[None, :]
        bmask = kmask[:, None] & omask[None, :]
        bk = b_offs + ks[:, None].to(tl.int64) * stride_br
        a = tl.load(a_ptr + a_offs + ks[None, :], mask=amask, other=0.0)
        acc = tile_dot(a, tl.load(b_ptr + bk, mask=bmask, other=0.0), acc)
        if PAIR == 1:
            acc2 = tile_dot(a, tl.load(b2_ptr + bk, mask=bmask, other=0.0), acc2)
        if PAIR == 2:
            a2 = tl.load(a2_ptr + a_offs + ks[None, :], mask=amask, other=0.0)
            acc = tile_dot(a2, tl.load(b2_ptr + bk, mask=bmask, other=0.0), acc)
    c_offs = rows[:, None].to(tl.int64) * OUT + cols[None, :]
    cmask = rmask[:, None] & omask[None, :]
    tl.store(c_ptr + c_offs, cast(acc, c_ptr.dtype.element_ty), mask=cmask)
    if PAIR == 1:
        tl.store(c2_ptr + c_offs, cast(acc2, c2_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _grouped_dw_kernel(dy_ptr, x_ptr, dw_ptr, dy2_ptr, dw2_ptr, offsets_ptr, M, N, K,
                       PAIR: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,):
    """dw[e][n, k] = sum over rows r of expert e's segment of dy[r, n] * x[r, k]; with PAIR also
    dw2[e] from dy2 and the same x tiles. dy, dy2 (M, N), x (M, K), dw, dw2 (E, N, K), contiguous.

    Program (e, j) computes one BLOCK_N x BLOCK_K tile of dw[e], reducing over the segment BLOCK_M rows at a
    time; for an empty expert the loop runs zero times and the program stores the exact zero tile.
    """
    e = tl.program_id(0)
    tiles_k = tl.cdiv(K, BLOCK_K)
    ns = (tl.program_id(1) // tiles_k) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = (tl.program_id(1) % tiles_k) * BLOCK_K + tl.arange(0, BLOCK_K)
    nmask = ns < N
    kmask = ks < K
    start = tl.load(offsets_ptr + e).to(tl.int32)
    end = tl.minimum(tl.load(offsets_ptr + e + 1).to(tl.int32), M)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        rmask = rows < end
        dy_offs = rows[None, :].to(tl.int64) * N + ns[:, None]  # transposed tile (BLOCK_N, BLOCK_M)
        dy_mask = nmask[:, None] & rmask[None, :]
        xs = tl.load(x_ptr + rows[:, None].to(tl.int64) * K + ks[None, :],
                     mask=rmask[:, None] & kmask[None, :], other=0.0)  # (BLOCK_M, BLOCK_K)
        acc = tile_dot(tl.load(dy_ptr + dy_offs, mask=dy_mask, other=0.0), xs, acc)
        if PAIR:
            acc2 = tile_dot(tl.load(dy2_ptr + dy_offs, mask=dy_mask, other=0.0), xs, acc2)
    out = e.to(tl.int64) * N * K + ns[:, None].to(tl.int64) * K + ks[None, :]
    omask = nmask[:, None] & kmask[None, :]
    tl.store(dw_ptr + out, cast(acc, dw_ptr.dtype.element_ty), mask=omask)
    if PAIR:
        tl.store(dw2_ptr + out, cast(acc2, dw2_ptr.dtype.element_ty), mask=omask)


def _grouped_dw(dy: torch.Tensor, x: torch.Tensor, offsets: torch.Tensor, e: int, dy2: torch.Tensor | None = None):
    """dw (E, N, K) with ``dw[e] = dy_seg^T @ x_seg`` (and dw2 from ``dy2`` when given: returns both)."""
    m, k = x.shape
    n = dy.shape[1]
    dw = empty(e, n, k, dtype=x.dtype, device=x.device)
    dw2 = dw if dy2 is None else empty(e, n, k, dtype=x.dtype, device=x.device)
    if dw.numel():
        bn, bk, bm, warps = _gemm_blocks()
        _grouped_dw_kernel[(e, triton.cdiv(n, bn) * triton.cdiv(k, bk))](
            dy, x, dw, dy if dy2 is None else dy2, dw2, offsets, m, n, k, PAIR=dy2 is not None, BLOCK_N=bn,
            BLOCK_K=bk, BLOCK_M=bm, num_warps=warps)
    return dw if dy2 is None else (dw, dw2)


def _gemm_blocks():
    """(BLOCK_M, BLOCK_O, BLOCK_R, num_warps): larger tiles on a GPU, small ones for the interpreter."""
    return (32, 32, 32, 4) if interpreted() else (64, 64, 32, 4)


def _check_gemm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, x_name: str = "x_sorted"):
    check(x_name, x, ndim=2, dtypes=FLOATS)
    check("w", w, ndim=3, dtypes=x.dtype, device=x.device)
    check("offsets", offsets, dtypes=INDEX, shape=(w.shape[0] + 1,), device=x.device)


def _grouped_mm(a: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, transpose: bool,
                w2: torch.Tensor | None = None, a2: torch.Tensor | None = None):
    """a (M, RED) times w[e] per segment: ``w[e]^T`` (w (E, OUT, RED)) or ``w[e]`` when ``transpose``
    (w (E, RED, OUT)). Returns c (M, OUT) in a's dtype; with ``w2`` (w's shape) alone returns
    ``(a @ w[e]^T, a @ w2[e]^T)`` (PAIR 1); with ``a2`` and ``w2`` returns ``a @ w[e] + a2 @ w2[e]`` (PAIR 2).
    Inputs are checked by the callers."""
    m, red = a.shape
    e, d1, d2 = w.shape
    out = d2 if transpose else d1
    pair = 0 if w2 is None else 1 if a2 is None else 2
    c = empty(m, out, dtype=a.dtype, device=a.device)
    c2 = empty(m, out, dtype=a.dtype, device=a.device) if pair == 1 else c
    if m and out and red == 0:
        c.zero_()
        c2.zero_()
    if m and out and red:
        bm, bo, br, warps = _gemm_blocks()
        stride_bo, stride_br = (1, d2) if transpose else (d2, 1)
        grid = (triton.cdiv(m, bm) + min(e, m), triton.cdiv(out, bo))  # bound on sum_e cdiv(count_e, BLOCK_M)
        _grouped_mm_kernel[grid](a, w, c, a if a2 is None else a2, w if w2 is None else w2, c2, offsets, m, out,
                                 red, d1 * d2, stride_bo, stride_br, E=e, PAIR=pair, BLOCK_M=bm, BLOCK_O=bo,
                                 BLOCK_R=br, BLOCK_E=triton.next_power_of_2(e), num_warps=warps)
    return (c, c2) if pair == 1 else c


def grouped_gemm_forward(x_sorted: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Grouped GEMM over expert-sorted rows: ``y[s:t] = x_sorted[s:t] @ w[e]^T`` for each expert's segment
    ``[offsets[e], offsets[e+1])`` (one kernel, no autograd).

    ``x_sorted`` (M, K) float32/bfloat16/float16, ``w`` (E, N, K) same dtype, ``offsets`` (E+1,) int32/int64 with
    ``offsets[0] = 0``, nondecreasing, ``offsets[E] = M`` (not checked: that would need a device sync; rows
    beyond M are never touched). Returns (M, N) in x's dtype, fp32 accumulation. Tiles 64x64x32 on a GPU
    (32x32x32 interpreted); grid ``(cdiv(M, 64) + min(E, M), cdiv(N, 64))`` bounds the schedule of nonempty segments.
    Raises ``TypeError``/``ValueError`` for bad tensors or a K mismatch.
    """
    _check_gemm(x_sorted, w, offsets)
    if w.shape[2] != x_sorted.shape[1]:
        raise ValueError(f"grouped_gemm: w {tuple(w.shape)} needs x_sorted with {w.shape[2]} columns, "
                         f"got {tuple(x_sorted.shape)}")
    return _grouped_mm(x_sorted, w, offsets, transpose=False)


def grouped_gemm_backward(grad_y: torch.Tensor, x_sorted: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor):
    """Gradients of `grouped_gemm_forward`: ``dx = grad_y_seg @ w[e]`` (the same grouped kernel) and
    ``dw[e] = grad_y_seg^T @ x_seg`` (a per-expert kernel; an expert with no rows gets an exact zero).

    ``grad_y`` (M, N), ``x_sorted`` (M, K), ``w`` (E, N, K), all one float dtype and contiguous; ``offsets``
    (E+1,). Returns ``(dx (M, K), dw (E, N, K))``. dw tiles 64x64 (32x32 interpreted) reduce 32 rows per step;
    grid ``(E, cdiv(N, BLOCK_N) * cdiv(K, BLOCK_K))``.
    """
    _check_gemm(x_sorted, w, offsets)
    m, k = x_sorted.shape
    e, n, _ = w.shape
    check("grad_y", grad_y, dtypes=x_sorted.dtype, shape=(m, n), device=x_sorted.device)
    if w.shape[2] != k:
        raise ValueError(f"grouped_gemm: w {tuple(w.shape)} needs x_sorted with {w.shape[2]} columns, got {k}")
    return _grouped_mm(grad_y, w, offsets, transpose=True), _grouped_dw(grad_y, x_sorted, offsets, e)


class _GroupedGemm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_sorted, w, offsets):
        ctx.save_for_backward(x_sorted, w, offsets)
        return grouped_gemm_forward(x_sorted, w, offsets)

    @staticmethod
    def backward(ctx, grad_y):
        x_sorted, w, offsets = ctx.saved_tensors
        dx, dw = grouped_gemm_backward(grad_y.contiguous(), x_sorted, w, offsets)
        return dx, dw, None


def grouped_gemm(x_sorted: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Differentiable `grouped_gemm_forward`: (M, K), (E, N, K), (E+1,) -> (M, N); backward by
    `grouped_gemm_backward` (gradients for ``x_sorted`` and ``w``)."""
    return _GroupedGemm.apply(x_sorted, w, offsets)


class _GateUp(torch.autograd.Function):
    """``(g, u) = (x_seg @ gate[e]^T, x_seg @ up[e]^T)`` per segment in one kernel (PAIR 1); the backward runs
    ``dx = dg @ gate[e] + du @ up[e]`` in one kernel (PAIR 2) and both weight gradients in one (PAIR)."""

    @staticmethod
    def forward(ctx, xs, gate, up, offsets):
        ctx.save_for_backward(xs, gate, up, offsets)
        return _grouped_mm(xs, gate, offsets, transpose=False, w2=up)

    @staticmethod
    def backward(ctx, dg, du):
        xs, gate, up, offsets = ctx.saved_tensors
        dg, du = dg.contiguous(), du.contiguous()  # autograd materializes an unused output's gradient as 0
        dx = _grouped_mm(dg, gate, offsets, transpose=True, w2=up, a2=du)
        dgate, dup = _grouped_dw(dg, xs, offsets, gate.shape[0], dy2=du)
        return dx, dgate, dup, None


def grouped_gate_up(x_sorted: torch.Tensor, gate_proj: torch.Tensor, up_proj: torch.Tensor,
                    offsets: torch.Tensor):
    """Differentiable pair of grouped GEMMs sharing their input: ``(x_seg @ gate_proj[e]^T,
    x_seg @ up_proj[e]^T)`` for each segment, each (M, I) contiguous, in one kernel pass that loads each x tile
    once (no concatenated weight is built). ``x_sorted`` (M, H); ``gate_proj``, ``up_proj`` (E, I, H) in x's
    dtype; ``offsets`` (E+1,). Raises like `grouped_gemm_forward`."""
    _check_gemm(x_sorted, gate_proj, offsets)
    check("up_proj", up_proj, dtypes=x_sorted.dtype, shape=tuple(gate_proj.shape), device=x_sorted.device)
    if gate_proj.shape[2] != x_sorted.shape[1]:
        raise ValueError(f"grouped_gate_up: weights {tuple(gate_proj.shape)} need x_sorted with "
                         f"{gate_proj.shape[2]} columns, got {tuple(x_sorted.shape)}")
    return _GateUp.apply(x_sorted, gate_proj, up_proj, offsets)
