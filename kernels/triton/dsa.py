"""DeepSeek Sparse Attention (DSA, DeepSeek-V3.2-Exp report section 2.1): the lightning indexer's scores, the
causal top-k selection, and attention over the selected keys only.

1. `indexer_scores(q, k, w, scale)`: ``I[b, t, s] = sum_h w[b, t, h] * relu(scale * q[b, t, h] . k[b, s])``
   (report eq. 1), float32 (B, T, S), unmasked, as `reference.dsa.Indexer.scores`. ``w`` is the full head
   weight: the caller passes ``weights_proj(x) * index_n_heads**-0.5`` and ``scale = index_head_dim**-0.5``.
2. `indexer_topk(scores, topk)`: the causal top-``k`` keys of each query, ``k = min(topk, S)``, as
   `reference.dsa.indexer_topk`: query ``t`` sees keys ``j <= t + S - T``; higher score first, exact ties to
   the earlier key; a query with fewer than ``k`` visible keys keeps all of them and pads with -1.
3. `sparse_attention(q, k, v, indices, scale)`: softmax attention of every query head over the keys its query
   selected (one index set per query, shared by all heads), differentiable in q, k and v. The shapes are
   `kernels.triton.attention.attention`'s, so one kernel serves both forms of MLA:
   - naive (training, prefill): ``q`` (B, H, T, dn+dr), ``k`` (B, H, S, dn+dr), ``v`` (B, H, S, dv), Hk = H;
   - absorbed (MQA over the latent): ``q = [q_latent, q_pe]`` (B, H, T, r+dr), ``k = [c_kv, k_pe]``
     (B, 1, S, r+dr), ``v = c_kv`` (B, 1, S, r); the caller applies W_UV. Correct, but for decoding
     `kernels.triton.mla.mla_decode` with ``indices`` is the kernel to call: it reads ``c_kv`` and ``k_pe``
     from the cache as they are (no concatenation, no padding of r+dr = 576 to 1024) and splits long lists.
   Grouped heads (1 < Hk < H) work as well. `runtime_cuda` calls it on the naive form, the form the reference
   DSA layer trains and prefills with; forward and backward.

Kernels:
- `_indexer_scores`: grid (cdiv(S, BLOCK_N), cdiv(T, BLOCK_T), B). The BLOCK_T*BLOCK_HI (query, head) rows
  of a query block are one matrix, so one ``tl.dot`` against a (BLOCK_N, D) key block gives every head's dot
  product; ReLU, weights and the sum over heads follow in registers. BLOCK_HI = next power of two of Hi,
  BLOCK_T*BLOCK_HI >= 16 (64 on a GPU), BLOCK_N = 16 (64 on a GPU).
- `_indexer_topk`: grid (T, B). Each score becomes one int64 sort key, ``order(score) << 32 | (2**31-1 - j)``
  (``order`` maps float32 bits to integers of the same order, -0.0 taken as 0.0), so a descending sort of the
  keys is the reference's stable descending sort. The visible keys are read in chunks of CHUNK; ``tl.topk``
  keeps a chunk's best K_P = max(2, next_pow2(k)), and the elementwise max of the running best (descending)
  and the chunk's best (flipped to ascending) is a bitonic sequence holding the best K_P of both, which
  ``tl.bitonic_merge`` sorts. Work is O(visible * log^2 K_P) per query; CHUNK = max(K_P, 16) under the
  interpreter, max(K_P, 1024) on a GPU. A NaN score of either sign ranks above every number, as torch.sort
  puts it. A full Triton top-k, so no ``torch.topk``.
- `_sparse_fwd` / `_sparse_bwd`: grid (T, B*Hk, cdiv(H/Hk, BLOCK_H)): the heads of a key group for one
  query share the index set, so every gathered (BLOCK_N, D) key/value block serves BLOCK_H heads
  (BLOCK_H = next power of two of H/Hk, at least 16, at most 64; 16 for float32 or padded head dims over 256).
  Online softmax as in `kernels.triton.attention`; the backward pass recomputes the probabilities from the
  saved log-sum-exp and scatters dk, dv with float32 ``tl.atomic_add`` (so their summation order, hence the
  last bits, may vary between runs on a GPU), then casts them to the input dtype. Index entries outside [0, S)
  (-1: unused slot) are skipped; a query with no valid entry gets a zero output. Indices must be distinct
  within a query.

Tiles go through `kernels.triton.utils` (`tile_dot`: IEEE float32 dots for float32; its policy for half
precision under the interpreter). Block sizes on a GPU are untuned and not yet run there; every kernel was compiled
here for sm_90 with Triton's ptxas (the absorbed shapes, 576 padded to 1024, spill about 2 KB in the backward).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention import DTYPES, LOG2E, check_qkv
from .utils import cast, check, empty, interpreted, load_tile, pow2, store_tile, tile_dot


@triton.jit
def _indexer_scores(Q, K, W, OUT, T, S, HI, D, scale, BLOCK_T: tl.constexpr, BLOCK_HI: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_n, pid_t = tl.program_id(0), tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    r = tl.arange(0, BLOCK_T * BLOCK_HI)
    t, h = pid_t * BLOCK_T + r // BLOCK_HI, r % BLOCK_HI
    row_ok = (t < T) & (h < HI)
    rows = (b * T + t) * HI + h
    offs_d = tl.arange(0, BLOCK_D)
    q = tl.load(Q + rows[:, None] * D + offs_d[None, :], mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    w = tl.load(W + rows, mask=row_ok, other=0.0).to(tl.float32)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k = load_tile(K + b * S * D, offs_n, offs_d, S, D)
    s = tl.maximum(tile_dot(q, tl.trans(k)) * scale, 0.0) * w[:, None]
    out = tl.sum(tl.reshape(s, (BLOCK_T, BLOCK_HI, BLOCK_N)), 1)
    store_tile(OUT + b * T * S, out, pid_t * BLOCK_T + tl.arange(0, BLOCK_T), offs_n, T, S)


@triton.jit
def _indexer_topk(SCORES, OUT, T, S, NK, offset, K_P: tl.constexpr, CHUNK: tl.constexpr):
    t = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64) * T + t
    SCORES += row * S
    visible = tl.minimum(t + offset + 1, S)
    none = tl.full((CHUNK,), -(2**63), tl.int64)  # below every key: a slot with no key
    best = tl.full((K_P,), -(2**63), tl.int64)  # sorted descending
    for start in range(0, visible, CHUNK):
        j = start + tl.arange(0, CHUNK)
        x = tl.load(SCORES + j, mask=j < visible, other=0.0)
        x = tl.where(x == 0.0, 0.0, x)  # -0.0 ties with 0.0, as in torch.sort
        bits = tl.where(x != x, 0x7FC00000, x.to(tl.int32, bitcast=True))  # any NaN: above +inf, as torch.sort
        order = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # float order as signed integers
        key = tl.where(j < visible, (order.to(tl.int64) << 32) + (2**31 - 1 - j), none)
        top = tl.topk(key, K_P)
        best = tl.bitonic_merge(tl.maximum(best, tl.flip(top, 0)), descending=True)
    idx = 2**31 - 1 - (best - ((best >> 32) << 32))
    idx = tl.where(best == -(2**63), -1, idx)
    offs = tl.arange(0, K_P)
    tl.store(OUT + row * NK + offs, idx, mask=offs < NK)


@triton.jit
def _gather(ptr, idx, ok, cols, n_cols):
    """Rows ``idx`` (where ``ok``) of a row-major (*, n_cols) matrix, columns ``cols``; zero elsewhere."""
    mask = ok[:, None] & (cols[None, :] < n_cols)
    return tl.load(ptr + tl.where(ok, idx, 0)[:, None] * n_cols + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _gather_kv(IDX, K, V, start, S, DK, DV, NK, BLOCK_N: tl.constexpr, offs_dk, offs_dv):
    """Index entries ``start .. start+BLOCK_N`` of one query, which of them are valid keys, and their key and
    value rows (zero where not valid)."""
    offs_n = start + tl.arange(0, BLOCK_N)
    idx = tl.load(IDX + offs_n, mask=offs_n < NK, other=-1)
    ok = (idx >= 0) & (idx < S)
    return idx, ok, _gather(K, idx, ok, offs_dk, DK), _gather(V, idx, ok, offs_dv, DV)


@triton.jit
def _sparse_fwd(Q, K, V, IDX, O, LSE, T, S, H, HK, DK, DV, NK, qk_scale, BLOCK_H: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr):
    t = tl.program_id(0)
    bhk = tl.program_id(1).to(tl.int64)
    group = H // HK
    g = tl.program_id(2) * BLOCK_H + tl.arange(0, BLOCK_H)
    row_ok = g < group
    rows = ((bhk // HK * H + bhk % HK * group + g) * T + t).to(tl.int64)  # rows of q, o in (B*H*T, D)
    offs_dk, offs_dv = tl.arange(0, BLOCK_DK), tl.arange(0, BLOCK_DV)
    q = _gather(Q, rows, row_ok, offs_dk, DK)
    K, V, IDX = K + bhk * S * DK, V + bhk * S * DV, IDX + (bhk // HK * T + t) * NK
    m_i = tl.full((BLOCK_H,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_H,), tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_DV), tl.float32)
    for start in range(0, NK, BLOCK_N):
        idx, ok, k, v = _gather_kv(IDX, K, V, start, S, DK, DV, NK, BLOCK_N, offs_dk, offs_dv)
        s = tl.where(ok[None, :], tile_dot(q, tl.trans(k)) * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no valid key yet
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tile_dot(cast(p, v.dtype), v)
        m_i = m_new
    l_i = tl.where(l_i == 0.0, 1.0, l_i)  # no valid key at all: o = 0, lse = -inf
    acc = acc / l_i[:, None]
    tl.store(O + rows[:, None] * DV + offs_dv[None, :], cast(acc, O.dtype.element_ty),
             mask=row_ok[:, None] & (offs_dv[None, :] < DV))
    tl.store(LSE + rows, m_i + tl.log2(l_i), mask=row_ok)


@triton.jit
def _sparse_bwd(Q, K, V, IDX, O, DO, LSE, DQ, DKA, DVA, T, S, H, HK, DK, DV, NK, scale, qk_scale,
                BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr):
    t = tl.program_id(0)
    bhk = tl.program_id(1).to(tl.int64)
    group = H // HK
    g = tl.program_id(2) * BLOCK_H + tl.arange(0, BLOCK_H)
    row_ok = g < group
    rows = ((bhk // HK * H + bhk % HK * group + g) * T + t).to(tl.int64)
    offs_dk, offs_dv = tl.arange(0, BLOCK_DK), tl.arange(0, BLOCK_DV)
    q = _gather(Q, rows, row_ok, offs_dk, DK)
    do = _gather(DO, rows, row_ok, offs_dv, DV)
    delta = tl.sum(_gather(O, rows, row_ok, offs_dv, DV).to(tl.float32) * do.to(tl.float32), 1)
    lse = tl.load(LSE + rows, mask=row_ok, other=0.0)
    K, V, IDX = K + bhk * S * DK, V + bhk * S * DV, IDX + (bhk // HK * T + t) * NK
    DKA, DVA = DKA + bhk * S * DK, DVA + bhk * S * DV
    dq = tl.zeros((BLOCK_H, BLOCK_DK), tl.float32)
    for start in range(0, NK, BLOCK_N):
        idx, ok, k, v = _gather_kv(IDX, K, V, start, S, DK, DV, NK, BLOCK_N, offs_dk, offs_dv)
        live = row_ok[:, None] & ok[None, :]
        p = tl.where(live, tl.exp2(tile_dot(q, tl.trans(k)) * qk_scale - lse[:, None]), 0.0)
        ds = p * (tile_dot(do, tl.trans(v)) - delta[:, None])
        dq += tile_dot(cast(ds, k.dtype), k)
        dk = tile_dot(cast(tl.trans(ds), q.dtype), q) * scale
        dv = tile_dot(cast(tl.trans(p), do.dtype), do)
        at = tl.where(ok, idx, 0)[:, None]
        tl.atomic_add(DKA + at * DK + offs_dk[None, :], dk, mask=ok[:, None] & (offs_dk[None, :] < DK))
        tl.atomic_add(DVA + at * DV + offs_dv[None, :], dv, mask=ok[:, None] & (offs_dv[None, :] < DV))
    dq = dq * scale
    tl.store(DQ + rows[:, None] * DK + offs_dk[None, :], cast(dq, DQ.dtype.element_ty),
             mask=row_ok[:, None] & (offs_dk[None, :] < DK))


def indexer_scores(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, scale: float) -> torch.Tensor:
    """Lightning-indexer scores (B, T, S) float32: ``sum_h w[b,t,h] * relu(scale * q[b,t,h] . k[b,s])``.

    ``q`` (B, T, Hi, D) (RoPE applied), ``k`` (B, S, D) (the one shared key head, RoPE applied), both of one
    float dtype; ``w`` (B, T, Hi) any float dtype, already including the ``Hi**-0.5`` factor. Unmasked (the
    causal selection is `indexer_topk`'s). Raises ``TypeError`` for a non-tensor or a wrong dtype,
    ``ValueError`` for wrong ranks or shapes, empty inputs, a device mismatch, a CPU tensor outside the
    interpreter or a non-contiguous input.
    """
    check("q", q, ndim=4, dtypes=DTYPES)
    b, t, hi, d = q.shape
    check("k", k, dtypes=q.dtype, shape=(b, None, d), device=q.device)
    check("w", w, dtypes=DTYPES, shape=(b, t, hi), device=q.device)
    s = k.shape[1]
    if min(q.shape) == 0 or s == 0:
        raise ValueError(f"indexer_scores: empty input, q {tuple(q.shape)}, k {tuple(k.shape)}")
    out = empty(b, t, s, dtype=torch.float32, device=q.device)
    block_hi = triton.next_power_of_2(hi)
    rows, block_n, warps = (16, 16, 1) if interpreted() else (64, 16 if q.dtype == torch.float32 else 64, 4)
    block_t = max(1, rows // block_hi)
    _indexer_scores[(triton.cdiv(s, block_n), triton.cdiv(t, block_t), b)](
        q, k, w, out, t, s, hi, d, scale, BLOCK_T=block_t, BLOCK_HI=block_hi, BLOCK_N=block_n, BLOCK_D=pow2(d),
        num_warps=warps)
    return out


def indexer_topk(scores: torch.Tensor, topk: int) -> torch.Tensor:
    """Causal top-k selection: int64 (B, T, k) key indices, ``k = min(topk, S)``, best first, -1 for slots a
    query cannot fill.

    ``scores`` (B, T, S) float32 (from `indexer_scores`); the T queries are the last T of the S keys, so query
    ``t`` picks among keys ``j <= t + S - T``; ties go to the earlier key and a NaN ranks first (the same indices, in
    the same order, as `reference.dsa.indexer_topk`). Raises ``TypeError`` for a
    non-tensor or a dtype other than float32, ``ValueError`` for a wrong rank, ``S < T``, ``topk < 1``, an
    empty input, a CPU tensor outside the interpreter or a non-contiguous input.
    """
    check("scores", scores, ndim=3, dtypes=torch.float32)
    b, t, s = scores.shape
    if min(scores.shape) == 0:
        raise ValueError(f"indexer_topk: empty scores {tuple(scores.shape)}")
    if s < t:
        raise ValueError(f"indexer_topk: causal needs at least as many keys as queries, got S={s} < T={t}")
    if topk < 1:
        raise ValueError(f"indexer_topk: topk must be at least 1, got {topk}")
    nk = min(topk, s)
    out = empty(b, t, nk, dtype=torch.int64, device=scores.device)
    k_p = max(2, triton.next_power_of_2(nk))  # tl.flip needs at least 2 elements
    chunk, warps = (max(k_p, 16), 1) if interpreted() else (max(k_p, 1024), 8)
    _indexer_topk[(t, b)](scores, out, t, s, nk, s - t, K_P=k_p, CHUNK=chunk, num_warps=warps)
    return out


def _check_sparse(q, k, v, indices):
    """Check `sparse_attention`'s inputs; returns (B, H, T, Dk, Hk, S, Dv, NK)."""
    b, h, t, dk, hk, s, dv = check_qkv(q, k, v, causal=False)
    check("indices", indices, ndim=3, dtypes=torch.int64, shape=(b, t, None), device=q.device)
    if indices.shape[2] == 0:
        raise ValueError(f"sparse_attention: empty indices {tuple(indices.shape)}")
    return b, h, t, dk, hk, s, dv, indices.shape[2]


def _sparse_blocks(group: int, block_d: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(BLOCK_H, BLOCK_N, num_warps) for ``group`` query heads per key head, padded head dim ``block_d``."""
    block_h = min(64, pow2(group))
    if interpreted():
        return block_h, 16, 1
    if dtype == torch.float32 or block_d > 256:  # FMA dots, or r + dr = 576 padded to 1024
        return 16, 16, 4
    return block_h, 32, 4 if block_h <= 16 else 8


def sparse_attention_fwd(q, k, v, indices, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward launcher: ``o`` (B, H, T, Dv) in ``q.dtype`` and ``lse`` (B, H, T) float32 (base 2).

    ``q`` (B, H, T, Dk), ``k`` (B, Hk, S, Dk), ``v`` (B, Hk, S, Dv) of one float dtype, ``H % Hk == 0``;
    ``indices`` (B, T, NK) int64, the keys each query attends to (-1: unused slot), shared by all heads.
    Raises ``TypeError`` for a non-tensor or a wrong dtype, ``ValueError`` for wrong ranks or shapes,
    ``H % Hk != 0``, empty inputs, a device mismatch, a CPU tensor outside the interpreter or a
    non-contiguous input.
    """
    b, h, t, dk, hk, s, dv, nk = _check_sparse(q, k, v, indices)
    o = empty(b, h, t, dv, dtype=q.dtype, device=q.device)
    lse = empty(b, h, t, dtype=torch.float32, device=q.device)
    block_h, block_n, warps = _sparse_blocks(h // hk, max(pow2(dk), pow2(dv)), q.dtype)
    _sparse_fwd[(t, b * hk, triton.cdiv(h // hk, block_h))](
        q, k, v, indices, o, lse, t, s, h, hk, dk, dv, nk, scale * LOG2E, BLOCK_H=block_h, BLOCK_N=block_n,
        BLOCK_DK=pow2(dk), BLOCK_DV=pow2(dv), num_warps=warps)
    return o, lse


def sparse_attention_bwd(q, k, v, indices, o, lse, do, scale: float):
    """Backward launcher: ``dq``, ``dk``, ``dv`` in the inputs' dtype (dk, dv summed over every query and head
    that selected the key; zero for keys nobody selected). Raises as `sparse_attention_fwd`."""
    b, h, t, dk, hk, s, dv, nk = _check_sparse(q, k, v, indices)
    check("o", o, dtypes=q.dtype, shape=(b, h, t, dv), device=q.device)
    check("do", do, dtypes=q.dtype, shape=(b, h, t, dv), device=q.device)
    check("lse", lse, dtypes=torch.float32, shape=(b, h, t), device=q.device)
    dq = empty(b, h, t, dk, dtype=q.dtype, device=q.device)
    dk_acc = torch.zeros(b, hk, s, dk, dtype=torch.float32, device=q.device)  # atomic_add targets
    dv_acc = torch.zeros(b, hk, s, dv, dtype=torch.float32, device=q.device)
    block_h, block_n, warps = _sparse_blocks(h // hk, max(pow2(dk), pow2(dv)), q.dtype)
    _sparse_bwd[(t, b * hk, triton.cdiv(h // hk, block_h))](
        q, k, v, indices, o, do, lse, dq, dk_acc, dv_acc, t, s, h, hk, dk, dv, nk, scale, scale * LOG2E,
        BLOCK_H=block_h, BLOCK_N=block_n, BLOCK_DK=pow2(dk), BLOCK_DV=pow2(dv), num_warps=warps)
    return dq, dk_acc.to(q.dtype), dv_acc.to(q.dtype)


class _SparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, indices, scale):
        o, lse = sparse_attention_fwd(q, k, v, indices, scale)
        ctx.save_for_backward(q, k, v, indices, o, lse)
        ctx.scale = scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, indices, o, lse = ctx.saved_tensors
        dq, dk, dv = sparse_attention_bwd(q, k, v, indices, o, lse, do.contiguous(), ctx.scale)
        return dq, dk, dv, None, None


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, indices: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """Differentiable attention over the selected keys: (B, H, T, Dv) in ``q.dtype``.

    Equals ``reference.attention.attend(q, k, v, mask, scale)`` with ``mask[b, 0, t, j]`` true iff ``j`` is in
    ``indices[b, t]``. Shapes and errors: `sparse_attention_fwd`; gradients flow to ``q``, ``k`` and ``v``
    (not to ``indices``).
    """
    return _SparseAttention.apply(q, k, v, indices, float(scale))
