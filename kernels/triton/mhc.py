"""mHC, DeepSeek-V4's manifold-constrained hyper-connections (V4 report section 2.2; Xie et al. 2026, arXiv
2512.24880, section 3), forward and backward in Triton; reference: `reference.mhc.mhc_pre` and
`reference.mhc.mhc_post` (the definition of correct, same signatures).

Per token, the N residual streams x (N, D) are flattened to K = N D values; M = (2 + N) N mixes come from
``fn`` (M, K). Every sum, the mixes and the Sinkhorn-Knopp iterations run in float32 whatever the streams' dtype.

`mhc_pre(streams, fn, base, scale, sinkhorn_iters, hc_eps, rms_norm_eps)`, two kernels:

1. `_mixes_fwd`: grid (cdiv(T, BLOCK_T),). One pass over the K columns of BLOCK_T tokens: the sum of squares and
   ``x @ fn^T`` (``tl.dot``, IEEE float32), then ``mixes = rstd * (x @ fn^T)`` (M per token, which equals ``fn @
   RMS(x)``) and ``rstd`` are stored (T, M) and (T,): they are all the backward keeps besides the inputs.
2. `_pre_fwd`: grid (cdiv(T, BLOCK_T),). From the mixes: ``pre = sigmoid(.) + eps``, ``post = 2 sigmoid(.)``, the
   row softmax of the comb logits plus eps, then the 2 iters - 1 column/row normalizations of Sinkhorn-Knopp on
   the (BLOCK_T, NP, NP) tile of N x N matrices (NP = next power of two of N, the padding masked to 0); writes
   post and comb (float32), then a second pass over the streams writes ``collapsed = sum_j pre_j x_j``.

Its backward (`_MhcPre`), three launches and torch sums of small per-program partials:

1. `_pre_bwd_mix`: grid (cdiv(T, BLOCK_T),). ``dpre_j = <dcollapsed, x_j>`` (one pass over the streams), the
   sigmoid derivatives, and the backward of Sinkhorn-Knopp: the normalization ``y = m / (sum_axis m + eps)``
   has the vector-Jacobian product ``dm = (dy - sum_axis(dy * y)) / (sum_axis m + eps)``, which needs the matrix
   before each normalization. Nothing per iteration is stored: for each (rows, columns) pair of iterations, last
   first, the kernel recomputes the matrix before it by running the earlier pairs again from the softmax output,
   in registers (`_sinkhorn_bwd`). That is about (iters - 1)^2 / 2 pairs per token (about 180 for 20 iterations,
   on N x N = 16 values): small next to the token's N D stream values. Then the softmax backward; writes
   ``dmix`` (T, M) (the gradient of the mixes), ``pre`` (T, N), ``coef = <dmix, mixes> / K`` (T,), and per
   program the partial sums of dbase (M) and dscale (3).
2. `_pre_bwd_dx`: grid (cdiv(K, BLOCK_K), SPLIT). Column block of K, token blocks strided by SPLIT: ``dh =
   dmix @ fn`` (``tl.dot``), the RMSNorm backward ``dx = rstd (dh - h coef)`` with ``h = rstd x`` (the usual
   ``mean(dh * h)`` is ``<dmix, mixes> / K``, known from step 1, so one pass suffices), plus ``pre_j
   dcollapsed`` from the collapse; and the partial ``dfn = dmix^T @ h`` over its tokens, (SPLIT, M, K) float32,
   summed by torch.

`mhc_post(block_out, post, comb, streams)`: ``out[k] = post[k] block_out + sum_j comb[j, k] x_j``, with post and
comb rounded to the streams' dtype first (as the reference and DeepSeek's code), then float32 arithmetic and one
rounding. `_post_fwd`: grid (cdiv(T, BLOCK_T), cdiv(D, BLOCK_D)). `_post_bwd`: grid (cdiv(T, BLOCK_T),), one pass
over D per token block: ``dblock_out = sum_k post_k g_k``, ``dx_j = sum_k comb[j, k] g_k``, and the float32 sums
over D of ``dpost_k = <g_k, block_out>`` and ``dcomb[j, k] = <g_k, x_j>``.

Tiles go through `kernels.triton.utils` (`tile_dot`: IEEE float32 dots; `cast`). Block sizes on a GPU (BLOCK_T 16,
64 tokens for `_mixes_fwd`; BLOCK_D = BLOCK_K = 64) are untuned: the kernels have run under the interpreter only, and
compile for sm_90 with Triton's ptxas (N = 1, 2, 3, 4; D up to 7168; at most 49 KiB of shared memory).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import cast, check, empty, interpreted, pow2, tile_dot

FLOATS = (torch.float32, torch.bfloat16, torch.float16)
BLOCK_T = 16
BLOCK_D = 512 if interpreted() else 64
"""Columns of a (tokens, D) tile; under Triton's interpreter, whose cost is per operation, larger tiles."""
BLOCK_K = 1024 if interpreted() else 64
"""Columns of a (tokens, N D) tile, likewise."""


# ----------------------------------------------------------------------------- helpers (inside kernels)


@triton.jit
def _load_mixes(ptr, rows, rmask, N: tl.constexpr, NP: tl.constexpr):
    """The (T, M) rows ``rows`` of a mixes-shaped buffer, split: pre and post parts (BLOCK_T, NP), comb part
    (BLOCK_T, NP, NP); zero outside the N (N x N) valid entries and the valid rows."""
    M: tl.constexpr = (2 + N) * N
    j = tl.arange(0, NP)
    r2 = rows.to(tl.int64)[:, None] * M
    m2 = rmask[:, None] & (j < N)[None, :]
    a = tl.load(ptr + r2 + j[None, :], mask=m2, other=0.0)
    b = tl.load(ptr + r2 + N + j[None, :], mask=m2, other=0.0)
    i3, j3 = j[None, :, None], j[None, None, :]
    m3 = rmask[:, None, None] & (i3 < N) & (j3 < N)
    c = tl.load(ptr + r2[:, :, None] + 2 * N + i3 * N + j3, mask=m3, other=0.0)
    return a, b, c


@triton.jit
def _store_mixes(ptr, rows, rmask, a, b, c, N: tl.constexpr, NP: tl.constexpr):
    """Store the three parts (as `_load_mixes` splits them) into rows ``rows`` of a (T, M) buffer."""
    M: tl.constexpr = (2 + N) * N
    j = tl.arange(0, NP)
    r2 = rows.to(tl.int64)[:, None] * M
    m2 = rmask[:, None] & (j < N)[None, :]
    tl.store(ptr + r2 + j[None, :], a, mask=m2)
    tl.store(ptr + r2 + N + j[None, :], b, mask=m2)
    i3, j3 = j[None, :, None], j[None, None, :]
    tl.store(ptr + r2[:, :, None] + 2 * N + i3 * N + j3, c, mask=rmask[:, None, None] & (i3 < N) & (j3 < N))


@triton.jit
def _weights(m_pre, m_post, m_comb, base_ptr, scale_ptr, hc_eps, N: tl.constexpr, NP: tl.constexpr):
    """``(sig_pre, sig_post, soft, valid)``: the sigmoids of the pre and post mixes (BLOCK_T, NP), the row
    softmax of the comb logits (BLOCK_T, NP, NP) (the padding 0), and the (1, NP, NP) mask of the N x N entries.
    pre = sig_pre + eps, post = 2 sig_post, the matrix Sinkhorn starts from is soft + eps (on valid entries)."""
    j = tl.arange(0, NP)
    jm = j < N
    i3, j3 = j[None, :, None], j[None, None, :]
    valid = (i3 < N) & (j3 < N)
    s0 = tl.load(scale_ptr)
    s1 = tl.load(scale_ptr + 1)
    s2 = tl.load(scale_ptr + 2)
    b_pre = tl.load(base_ptr + j, mask=jm, other=0.0)[None, :]
    b_post = tl.load(base_ptr + N + j, mask=jm, other=0.0)[None, :]
    b_comb = tl.load(base_ptr + 2 * N + i3 * N + j3, mask=valid, other=0.0)
    sig_pre = tl.where(jm[None, :], tl.sigmoid(m_pre * s0 + b_pre), 0.0)
    sig_post = tl.where(jm[None, :], tl.sigmoid(m_post * s1 + b_post), 0.0)
    logits = tl.where(valid, m_comb * s2 + b_comb, -1e30)  # padded rows: a harmless uniform row, masked below
    e = tl.exp(logits - tl.max(logits, axis=2)[:, :, None])
    soft = tl.where(valid, e / tl.sum(e, axis=2)[:, :, None], 0.0)
    return sig_pre, sig_post, soft, valid


@triton.jit
def _rows(m, valid, eps):
    """One Sinkhorn-Knopp step on (BLOCK_T, NP, NP): divide by the row sums plus eps. Returns the result and the
    divisor (1 on the padding)."""
    d = tl.where(valid, tl.sum(m, axis=2)[:, :, None] + eps, 1.0)
    return m / d, d


@triton.jit
def _cols(m, valid, eps):
    """As `_rows`, by the column sums."""
    d = tl.where(valid, tl.sum(m, axis=1)[:, None, :] + eps, 1.0)
    return m / d, d


@triton.jit
def _sinkhorn(p, valid, iters, eps):
    """`reference.mhc.sinkhorn_knopp`: columns, then ``iters - 1`` times rows and columns."""
    m, _ = _cols(p, valid, eps)
    for _ in range(0, iters - 1):
        m, _ = _rows(m, valid, eps)
        m, _ = _cols(m, valid, eps)
    return m


@triton.jit
def _sinkhorn_bwd(p, valid, iters, eps, g):
    """The gradient with respect to ``p`` of `_sinkhorn` for the cotangent ``g``. Each (rows, columns) pair, last
    first, is recomputed from ``p`` (nothing is stored per iteration), then backpropagated through its two
    normalizations ``y = m / d``: ``g = (g - sum(g * y)) / d``, the sum along the normalized axis."""
    for kk in range(0, iters - 1):
        m, _ = _cols(p, valid, eps)
        for _ in range(0, iters - 2 - kk):
            m, _ = _rows(m, valid, eps)
            m, _ = _cols(m, valid, eps)
        a, da = _rows(m, valid, eps)
        b, db = _cols(a, valid, eps)
        g = tl.where(valid, (g - tl.sum(g * b, axis=1)[:, None, :]) / db, 0.0)
        g = tl.where(valid, (g - tl.sum(g * a, axis=2)[:, :, None]) / da, 0.0)
    b, db = _cols(p, valid, eps)
    return tl.where(valid, (g - tl.sum(g * b, axis=1)[:, None, :]) / db, 0.0)


@triton.jit
def _stream_tile(ptr, rows, rmask, d, N: tl.constexpr, NP: tl.constexpr, D):
    """The (BLOCK_T, NP, BLOCK_D) float32 tile ``x[rows, :, d]`` of (T, N, D) streams, zero outside."""
    j = tl.arange(0, NP)[None, :, None]
    off = rows.to(tl.int64)[:, None, None] * (N * D) + j * D + d[None, None, :]
    mask = rmask[:, None, None] & (j < N) & (d < D)[None, None, :]
    return tl.load(ptr + off, mask=mask, other=0.0).to(tl.float32)


# ----------------------------------------------------------------------------- mhc_pre kernels


@triton.jit
def _mixes_fwd(X, FN, MIX, RSTD, T, K, eps, M: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
               BLOCK_M: tl.constexpr):
    """X (T, K) streams, FN (M, K); MIX (T, M) = rstd * X @ FN^T, RSTD (T,) float32."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    rmask = rows < T
    ms = tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_T, BLOCK_M), dtype=tl.float32)
    ss = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < K
        x = tl.load(X + rows.to(tl.int64)[:, None] * K + ks[None, :], mask=rmask[:, None] & kmask[None, :],
                    other=0.0).to(tl.float32)
        w = tl.load(FN + ms[None, :] * K + ks[:, None], mask=(ms < M)[None, :] & kmask[:, None],
                    other=0.0).to(tl.float32)
        ss += tl.sum(x * x, axis=1)
        acc = tile_dot(x, w, acc)
    r = 1.0 / tl.sqrt(ss / K + eps)
    tl.store(RSTD + rows, r, mask=rmask)
    tl.store(MIX + rows.to(tl.int64)[:, None] * M + ms[None, :], acc * r[:, None],
             mask=rmask[:, None] & (ms < M)[None, :])


@triton.jit
def _pre_fwd(X, MIX, BASE, SCALE, COLL, POST, COMB, T, D, iters, hc_eps, N: tl.constexpr, NP: tl.constexpr,
             BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """MIX (T, M) from `_mixes_fwd`; writes POST (T, N), COMB (T, N, N) float32 and COLL (T, D) in X's dtype."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    rmask = rows < T
    m_pre, m_post, m_comb = _load_mixes(MIX, rows, rmask, N, NP)
    sig_pre, sig_post, soft, valid = _weights(m_pre, m_post, m_comb, BASE, SCALE, hc_eps, N, NP)
    comb = _sinkhorn(tl.where(valid, soft + hc_eps, 0.0), valid, iters, hc_eps)
    j = tl.arange(0, NP)
    jm = (j < N)[None, :]
    tl.store(POST + rows.to(tl.int64)[:, None] * N + j[None, :], 2.0 * sig_post, mask=rmask[:, None] & jm)
    i3, j3 = j[None, :, None], j[None, None, :]
    tl.store(COMB + rows.to(tl.int64)[:, None, None] * (N * N) + i3 * N + j3, comb, mask=rmask[:, None, None] & valid)
    pre = tl.where(jm, sig_pre + hc_eps, 0.0)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        x = _stream_tile(X, rows, rmask, d, N, NP, D)
        out = tl.sum(pre[:, :, None] * x, axis=1)
        tl.store(COLL + rows.to(tl.int64)[:, None] * D + d[None, :], cast(out, COLL.dtype.element_ty),
                 mask=rmask[:, None] & (d < D)[None, :])


@triton.jit
def _pre_bwd_mix(X, GCOLL, GPOST, GCOMB, MIX, BASE, SCALE, DMIX, PRE, COEF, DBASE, DSCALE, T, D, iters, hc_eps,
                 N: tl.constexpr, NP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """Gradients of the mixes: DMIX (T, M), with PRE (T, N) and COEF (T,) for `_pre_bwd_dx`; partial sums
    DBASE (programs, M) and DSCALE (programs, 3), all float32."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    rmask = rows < T
    m_pre, m_post, m_comb = _load_mixes(MIX, rows, rmask, N, NP)
    sig_pre, sig_post, soft, valid = _weights(m_pre, m_post, m_comb, BASE, SCALE, hc_eps, N, NP)
    dpre = tl.zeros((BLOCK_T, NP), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        x = _stream_tile(X, rows, rmask, d, N, NP, D)
        g = tl.load(GCOLL + rows.to(tl.int64)[:, None] * D + d[None, :], mask=rmask[:, None] & (d < D)[None, :],
                    other=0.0).to(tl.float32)
        dpre += tl.sum(x * g[:, None, :], axis=2)
    j = tl.arange(0, NP)
    jm = (j < N)[None, :]
    m2 = rmask[:, None] & jm
    gpost = tl.load(GPOST + rows.to(tl.int64)[:, None] * N + j[None, :], mask=m2, other=0.0).to(tl.float32)
    i3, j3 = j[None, :, None], j[None, None, :]
    gcomb = tl.load(GCOMB + rows.to(tl.int64)[:, None, None] * (N * N) + i3 * N + j3,
                    mask=rmask[:, None, None] & valid, other=0.0).to(tl.float32)
    dz_pre = dpre * sig_pre * (1.0 - sig_pre)
    dz_post = 2.0 * gpost * sig_post * (1.0 - sig_post)
    gp = _sinkhorn_bwd(tl.where(valid, soft + hc_eps, 0.0), valid, iters, hc_eps, gcomb)
    dz_comb = soft * (gp - tl.sum(gp * soft, axis=2)[:, :, None])
    s0 = tl.load(SCALE)
    s1 = tl.load(SCALE + 1)
    s2 = tl.load(SCALE + 2)
    _store_mixes(DMIX, rows, rmask, dz_pre * s0, dz_post * s1, dz_comb * s2, N, NP)
    tl.store(PRE + rows.to(tl.int64)[:, None] * N + j[None, :], sig_pre + hc_eps, mask=m2)
    coef = (s0 * tl.sum(dz_pre * m_pre, axis=1) + s1 * tl.sum(dz_post * m_post, axis=1)
            + s2 * tl.sum(tl.sum(dz_comb * m_comb, axis=2), axis=1)) / (N * D)
    tl.store(COEF + rows, coef, mask=rmask)
    # this program's partial sums over its tokens: one row of DBASE (programs, M) and of DSCALE (programs, 3)
    base_row = DBASE + pid * ((2 + N) * N)
    tl.store(base_row + j, tl.sum(dz_pre, axis=0), mask=j < N)
    tl.store(base_row + N + j, tl.sum(dz_post, axis=0), mask=j < N)
    i2, j2 = j[:, None], j[None, :]
    tl.store(base_row + 2 * N + i2 * N + j2, tl.sum(dz_comb, axis=0), mask=(i2 < N) & (j2 < N))
    tl.store(DSCALE + pid * 3, tl.sum(tl.sum(dz_pre * m_pre, axis=1), axis=0))
    tl.store(DSCALE + pid * 3 + 1, tl.sum(tl.sum(dz_post * m_post, axis=1), axis=0))
    tl.store(DSCALE + pid * 3 + 2, tl.sum(tl.sum(tl.sum(dz_comb * m_comb, axis=2), axis=1), axis=0))


@triton.jit
def _pre_bwd_dx(X, GCOLL, FN, DMIX, PRE, COEF, RSTD, DX, DFN, T, D, SPLIT, N: tl.constexpr, BLOCK_T: tl.constexpr,
                BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr):
    """DX (T, K) in X's dtype for the column block ``program_id(0)`` and the token blocks ``program_id(1)``,
    ``+ SPLIT``, ...; the float32 partial DFN (SPLIT, M, K) of those tokens."""
    M: tl.constexpr = (2 + N) * N
    K = N * D
    ks = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = ks < K
    split = tl.program_id(1)
    ms = tl.arange(0, BLOCK_M)
    mmask = ms < M
    w = tl.load(FN + ms[:, None] * K + ks[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
    stream, col = ks // D, ks % D
    dfn = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for tb in range(split, tl.cdiv(T, BLOCK_T), SPLIT):
        rows = tb * BLOCK_T + tl.arange(0, BLOCK_T)
        rmask = rows < T
        r64 = rows.to(tl.int64)[:, None]
        mask = rmask[:, None] & kmask[None, :]
        x = tl.load(X + r64 * K + ks[None, :], mask=mask, other=0.0).to(tl.float32)
        r = tl.load(RSTD + rows, mask=rmask, other=0.0)
        c = tl.load(COEF + rows, mask=rmask, other=0.0)
        dm = tl.load(DMIX + r64 * M + ms[None, :], mask=rmask[:, None] & mmask[None, :], other=0.0)
        g = tl.load(GCOLL + r64 * D + col[None, :], mask=mask, other=0.0).to(tl.float32)
        pre = tl.load(PRE + r64 * N + stream[None, :], mask=mask, other=0.0)
        h = x * r[:, None]
        dh = tile_dot(dm, w)
        dx = r[:, None] * (dh - h * c[:, None]) + pre * g
        tl.store(DX + r64 * K + ks[None, :], cast(dx, DX.dtype.element_ty), mask=mask)
        dfn = tile_dot(tl.trans(dm), h, dfn)
    tl.store(DFN + split.to(tl.int64) * (M * K) + ms[:, None] * K + ks[None, :], dfn,
             mask=mmask[:, None] & kmask[None, :])


# ----------------------------------------------------------------------------- mhc_post kernels


@triton.jit
def _post_fwd(BO, POST, COMB, X, OUT, T, D, N: tl.constexpr, NP: tl.constexpr, BLOCK_T: tl.constexpr,
              BLOCK_D: tl.constexpr):
    """OUT (T, N, D) = POST (T, N) * BO (T, D) + COMB (T, N, N)^T @ X (T, N, D), post and comb rounded to X's
    dtype first."""
    dt = OUT.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    rmask = rows < T
    r64 = rows.to(tl.int64)[:, None]
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = rmask[:, None] & (d < D)[None, :]
    k = tl.arange(0, NP)
    km = rmask[:, None] & (k < N)[None, :]
    post = cast(tl.load(POST + r64 * N + k[None, :], mask=km, other=0.0), dt).to(tl.float32)
    bo = tl.load(BO + r64 * D + d[None, :], mask=dmask, other=0.0).to(tl.float32)
    out = post[:, :, None] * bo[:, None, :]
    for j in tl.static_range(N):
        c = cast(tl.load(COMB + r64 * (N * N) + j * N + k[None, :], mask=km, other=0.0), dt).to(tl.float32)
        x = tl.load(X + r64 * (N * D) + j * D + d[None, :], mask=dmask, other=0.0).to(tl.float32)
        out += c[:, :, None] * x[:, None, :]
    off = r64[:, :, None] * (N * D) + k[None, :, None] * D + d[None, None, :]
    tl.store(OUT + off, cast(out, dt), mask=km[:, :, None] & (d < D)[None, None, :])


@triton.jit
def _post_bwd(G, BO, POST, COMB, X, DBO, DPOST, DCOMB, DX, T, D, N: tl.constexpr, NP: tl.constexpr,
              BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """For the cotangent G (T, N, D): DBO (T, D), DX (T, N, D), and DPOST (T, N), DCOMB (T, N, N) summed over D in
    float32, each in its input's dtype."""
    dt = X.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    rmask = rows < T
    r64 = rows.to(tl.int64)[:, None]
    k = tl.arange(0, NP)
    km = rmask[:, None] & (k < N)[None, :]
    post = cast(tl.load(POST + r64 * N + k[None, :], mask=km, other=0.0), dt).to(tl.float32)
    dpost = tl.zeros((BLOCK_T, NP), dtype=tl.float32)
    dcomb = tl.zeros((BLOCK_T, NP, NP), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        dmask = rmask[:, None] & (d < D)[None, :]
        g = _stream_tile(G, rows, rmask, d, N, NP, D)  # (BLOCK_T, NP over k, BLOCK_D)
        bo = tl.load(BO + r64 * D + d[None, :], mask=dmask, other=0.0).to(tl.float32)
        tl.store(DBO + r64 * D + d[None, :], cast(tl.sum(post[:, :, None] * g, axis=1), DBO.dtype.element_ty),
                 mask=dmask)
        dpost += tl.sum(g * bo[:, None, :], axis=2)
        for j in tl.static_range(N):
            c = cast(tl.load(COMB + r64 * (N * N) + j * N + k[None, :], mask=km, other=0.0), dt).to(tl.float32)
            x = tl.load(X + r64 * (N * D) + j * D + d[None, :], mask=dmask, other=0.0).to(tl.float32)
            dcomb += tl.where(k[None, :, None] == j, tl.sum(g * x[:, None, :], axis=2)[:, None, :], 0.0)
            tl.store(DX + r64 * (N * D) + j * D + d[None, :], cast(tl.sum(c[:, :, None] * g, axis=1), dt),
                     mask=dmask)
    tl.store(DPOST + r64 * N + k[None, :], cast(dpost, DPOST.dtype.element_ty), mask=km)
    i3, k3 = k[None, :, None], k[None, None, :]
    tl.store(DCOMB + r64[:, :, None] * (N * N) + i3 * N + k3, cast(dcomb, DCOMB.dtype.element_ty),
             mask=rmask[:, None, None] & (i3 < N) & (k3 < N))


# ----------------------------------------------------------------------------- launchers


def _check_pre(streams, fn, base, scale, sinkhorn_iters) -> tuple[int, int, int, int]:
    """(T, N, D, M) of valid `mhc_pre` inputs; raises TypeError / ValueError naming the bad one."""
    check("streams", streams, dtypes=FLOATS, ndim=4)
    b, s, n, d = streams.shape
    if n < 1 or d < 1:
        raise ValueError(f"streams: expected (B, S, N, D) with N, D >= 1, got {tuple(streams.shape)}")
    m = (2 + n) * n
    check("fn", fn, dtypes=FLOATS, shape=(m, n * d), device=streams.device)
    check("base", base, dtypes=FLOATS, shape=(m,), device=streams.device)
    check("scale", scale, dtypes=FLOATS, shape=(3,), device=streams.device)
    if not isinstance(sinkhorn_iters, int) or sinkhorn_iters < 1:
        raise ValueError(f"sinkhorn_iters={sinkhorn_iters!r}: expected an int >= 1")
    return b * s, n, d, m


def _programs(device: torch.device, blocks: int, columns: int) -> int:
    """Token splits of `_pre_bwd_dx`: about 4 programs per SM in all (4 under the interpreter), at most one per
    token block."""
    total = 4 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return max(1, min(blocks, triton.cdiv(total, columns)))


def mhc_pre_fwd(streams, fn, base, scale, sinkhorn_iters: int, hc_eps: float, rms_norm_eps: float):
    """Launch the forward kernels of `mhc_pre`. Returns ``(collapsed, post, comb, mixes, rstd)``: the op's outputs
    (see `mhc_pre`) and what the backward keeps, mixes (T, M) and rstd (T,) float32. Errors: `mhc_pre`."""
    t, n, d, m = _check_pre(streams, fn, base, scale, sinkhorn_iters)
    b, s = streams.shape[:2]
    dev = streams.device
    coll = empty(b, s, d, dtype=streams.dtype, device=dev)
    post = empty(b, s, n, dtype=torch.float32, device=dev)
    comb = empty(b, s, n, n, dtype=torch.float32, device=dev)
    mixes = empty(t, m, dtype=torch.float32, device=dev)
    rstd = empty(t, dtype=torch.float32, device=dev)
    if t:
        bt = BLOCK_T if interpreted() else 64
        _mixes_fwd[(triton.cdiv(t, bt),)](streams, fn, mixes, rstd, t, n * d, float(rms_norm_eps), M=m, BLOCK_T=bt,
                                          BLOCK_K=BLOCK_K, BLOCK_M=pow2(m))
        _pre_fwd[(triton.cdiv(t, BLOCK_T),)](streams, mixes, base, scale, coll, post, comb, t, d, sinkhorn_iters,
                                             float(hc_eps), N=n, NP=triton.next_power_of_2(n), BLOCK_T=BLOCK_T,
                                             BLOCK_D=BLOCK_D)
    return coll, post, comb, mixes, rstd


def mhc_pre_bwd(streams, fn, base, scale, sinkhorn_iters: int, hc_eps: float, mixes, rstd, d_collapsed, d_post,
                d_comb):
    """Launch the backward kernels of `mhc_pre` for the cotangents of (collapsed, post, comb) (contiguous, shaped
    as those outputs). Returns ``(dstreams, dfn, dbase, dscale)``, each in its input's dtype."""
    t, n, d, m = _check_pre(streams, fn, base, scale, sinkhorn_iters)
    dev = streams.device
    check("d_collapsed", d_collapsed, dtypes=FLOATS, shape=(*streams.shape[:2], d), device=dev)
    check("d_post", d_post, dtypes=FLOATS, shape=(*streams.shape[:2], n), device=dev)
    check("d_comb", d_comb, dtypes=FLOATS, shape=(*streams.shape[:2], n, n), device=dev)
    dx = empty(streams.shape, dtype=streams.dtype, device=dev)
    if t == 0:
        return dx, torch.zeros_like(fn), torch.zeros_like(base), torch.zeros_like(scale)
    blocks = triton.cdiv(t, BLOCK_T)
    dmix = empty(t, m, dtype=torch.float32, device=dev)
    pre = empty(t, n, dtype=torch.float32, device=dev)
    coef = empty(t, dtype=torch.float32, device=dev)
    dbase = empty(blocks, m, dtype=torch.float32, device=dev)
    dscale = empty(blocks, 3, dtype=torch.float32, device=dev)
    _pre_bwd_mix[(blocks,)](streams, d_collapsed, d_post, d_comb, mixes, base, scale, dmix, pre, coef, dbase, dscale,
                            t, d, sinkhorn_iters, float(hc_eps), N=n, NP=triton.next_power_of_2(n), BLOCK_T=BLOCK_T,
                            BLOCK_D=BLOCK_D)
    columns = triton.cdiv(n * d, BLOCK_K)
    split = _programs(dev, blocks, columns)
    dfn = empty(split, m, n * d, dtype=torch.float32, device=dev)
    _pre_bwd_dx[(columns, split)](streams, d_collapsed, fn, dmix, pre, coef, rstd, dx, dfn, t, d, split, N=n,
                                  BLOCK_T=BLOCK_T, BLOCK_K=BLOCK_K, BLOCK_M=pow2(m))
    return (dx, dfn.sum(0).to(fn.dtype), dbase.sum(0).to(base.dtype), dscale.sum(0).to(scale.dtype))


class _MhcPre(torch.autograd.Function):
    """Saves the inputs, mixes (T, M) and rstd (T,) float32; gradients for streams, fn, base and scale."""

    @staticmethod
    def forward(ctx, streams, fn, base, scale, sinkhorn_iters, hc_eps, rms_norm_eps):
        coll, post, comb, mixes, rstd = mhc_pre_fwd(streams, fn, base, scale, sinkhorn_iters, hc_eps, rms_norm_eps)
        ctx.save_for_backward(streams, fn, base, scale, mixes, rstd)
        ctx.iters, ctx.hc_eps = sinkhorn_iters, hc_eps
        return coll, post, comb

    @staticmethod
    def backward(ctx, d_coll, d_post, d_comb):
        streams, fn, base, scale, mixes, rstd = ctx.saved_tensors
        grads = mhc_pre_bwd(streams, fn, base, scale, ctx.iters, ctx.hc_eps, mixes, rstd, d_coll.contiguous(),
                            d_post.contiguous(), d_comb.contiguous())
        return (*grads, None, None, None)


def mhc_pre(streams: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, sinkhorn_iters: int,
            hc_eps: float, rms_norm_eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The mHC op before a block, as `reference.mhc.mhc_pre` (mHC section 3; DeepSeek-V4's ``hc_pre``).

    ``streams`` (B, S, N, D) float32/bfloat16/float16, contiguous; ``fn`` ((2 + N) N, N D), ``base`` ((2 + N) N,),
    ``scale`` (3,) float (float32 in the model); ``sinkhorn_iters`` >= 1. Returns ``(collapsed, post, comb)``:
    collapsed (B, S, D) in the streams' dtype, post (B, S, N) and comb (B, S, N, N) float32 (comb doubly
    stochastic after enough iterations). Differentiable in streams, fn, base and scale. Raises TypeError on a
    wrong dtype, ValueError on a wrong shape, device or layout or ``sinkhorn_iters`` < 1; CPU tensors only under
    ``TRITON_INTERPRET=1``.
    """
    return _MhcPre.apply(streams, fn, base, scale, sinkhorn_iters, float(hc_eps), float(rms_norm_eps))


def _check_post(block_out, post, comb, streams) -> tuple[int, int, int]:
    check("streams", streams, dtypes=FLOATS, ndim=4)
    b, s, n, d = streams.shape
    check("block_out", block_out, dtypes=streams.dtype, shape=(b, s, d), device=streams.device)
    check("post", post, dtypes=FLOATS, shape=(b, s, n), device=streams.device)
    check("comb", comb, dtypes=FLOATS, shape=(b, s, n, n), device=streams.device)
    return b * s, n, d


def mhc_post_fwd(block_out, post, comb, streams) -> torch.Tensor:
    """Launch the forward kernel of `mhc_post`; returns the new streams (B, S, N, D). Errors: `mhc_post`."""
    t, n, d = _check_post(block_out, post, comb, streams)
    out = empty(streams.shape, dtype=streams.dtype, device=streams.device)
    if t:
        _post_fwd[(triton.cdiv(t, BLOCK_T), triton.cdiv(d, BLOCK_D))](
            block_out, post, comb, streams, out, t, d, N=n, NP=triton.next_power_of_2(n), BLOCK_T=BLOCK_T,
            BLOCK_D=BLOCK_D)
    return out


def mhc_post_bwd(block_out, post, comb, streams, grad) -> tuple:
    """Launch the backward kernel of `mhc_post` for the cotangent ``grad`` (B, S, N, D) contiguous. Returns
    ``(dblock_out, dpost, dcomb, dstreams)``, each in its input's dtype."""
    t, n, d = _check_post(block_out, post, comb, streams)
    check("grad", grad, dtypes=FLOATS, shape=tuple(streams.shape), device=streams.device)
    dev = streams.device
    outs = (empty(block_out.shape, dtype=block_out.dtype, device=dev), empty(post.shape, dtype=post.dtype, device=dev),
            empty(comb.shape, dtype=comb.dtype, device=dev), empty(streams.shape, dtype=streams.dtype, device=dev))
    if t:
        _post_bwd[(triton.cdiv(t, BLOCK_T),)](grad, block_out, post, comb, streams, *outs, t, d, N=n,
                                              NP=triton.next_power_of_2(n), BLOCK_T=BLOCK_T, BLOCK_D=BLOCK_D)
    return outs


class _MhcPost(torch.autograd.Function):
    """Saves the four inputs; gradients for all of them."""

    @staticmethod
    def forward(ctx, block_out, post, comb, streams):
        ctx.save_for_backward(block_out, post, comb, streams)
        return mhc_post_fwd(block_out, post, comb, streams)

    @staticmethod
    def backward(ctx, grad):
        return mhc_post_bwd(*ctx.saved_tensors, grad.contiguous())


def mhc_post(block_out: torch.Tensor, post: torch.Tensor, comb: torch.Tensor, streams: torch.Tensor) -> torch.Tensor:
    """The mHC op after a block, as `reference.mhc.mhc_post` (DeepSeek-V4's ``hc_post``): ``out[k] = post[k] *
    block_out + sum_j comb[j, k] * streams[j]``.

    ``block_out`` (B, S, D) in the streams' dtype, ``post`` (B, S, N) and ``comb`` (B, S, N, N) float (float32 from
    `mhc_pre`; rounded to the streams' dtype before use), ``streams`` (B, S, N, D) float32/bfloat16/float16, all
    contiguous. Returns (B, S, N, D) in the streams' dtype; differentiable in all four. Raises TypeError on a wrong
    dtype, ValueError on a wrong shape, device or layout.
    """
    return _MhcPost.apply(block_out, post, comb, streams)


__all__ = ["mhc_post", "mhc_post_bwd", "mhc_post_fwd", "mhc_pre", "mhc_pre_bwd", "mhc_pre_fwd"]
