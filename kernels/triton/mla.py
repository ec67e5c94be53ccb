"""MLA decode in the absorbed form, over the latent cache (DeepSeek-V2 section 2.1 / DeepSeek-V3 report
section 2.1.1; "absorb" in DeepSeek's inference code). Forward only: decoding needs no gradient.

With ``W_UK`` folded into the query and ``W_UV`` into the output, every query head attends to one shared
"head" of keys ``[c_kv, k_pe]`` and values ``c_kv`` (MQA over the latent):

    scores[b, h, t, s] = (q_latent[b, h, t] . c_kv[b, s] + q_pe[b, h, t] . k_pe[b, s]) * scale
    o[b, h, t] = softmax_s(scores[b, h, t]) @ c_kv[b]            (the caller applies W_UV)

Shapes: ``q_latent`` (B, H, T, r) (``q_nope`` through ``W_UK``), ``q_pe`` (B, H, T, dr) (rotated), ``c_kv``
(B, S, r) (normalized latent cache), ``k_pe`` (B, S, dr) (rotated). Returns ``o`` (B, H, T, r) in
``q_latent.dtype``, float32 softmax and accumulation. Causal (default): the T new queries are the last T of the
S cached positions, query ``t`` sees key ``j`` iff ``j <= t + S - T`` (needs ``S >= T``); T is small (1 to a
few: decode, speculative or MTP tokens). This is `reference.mla.MLA.attend_absorbed`'s latent step. With DSA's
selection (``indices`` (B, T, NK), V3.2) each query attends only to its selected keys, as V3.2 decodes: sparse
attention in MLA's MQA mode over the latent.

Kernels:
- `_mla_decode`: grid (cdiv(H*T, BLOCK_M), B, splits). The H*T query rows of one batch element are one
  (H*T, r) matrix (row ``h*T + t``), so each (BLOCK_N, r) block of ``c_kv`` is loaded once per block of
  BLOCK_M rows and serves both as key (``q_latent @ c_kv^T``) and as value (``P @ c_kv``). Split-KV
  (flash-decoding): split ``i`` covers keys ``[i*L, (i+1)*L)``; with one split the program writes the output
  directly, otherwise a float32 partial output and its base-2 log-sum-exp.
  Sparse (DSA decode, ``indices`` given): grid (cdiv(H, BLOCK_M), B*T, splits); the rows are the heads of one
  query, which share its index set, so each gathered block of ``c_kv`` rows again serves BLOCK_M heads, and
  the splits divide the index list.
- `_mla_combine`: grid (cdiv(H*T, BLOCK_M), B); merges the splits' partials by their log-sum-exp.

Block sizes: BLOCK_M = BLOCK_N = 16 under the interpreter; on a GPU 32 x 32 with 8 warps for 16-bit inputs
(r = 512 makes the (BLOCK_M, r) float32 accumulator the register budget), 16 x 16 with 4 warps for float32 (FMA
dots). Untuned and not yet run on a GPU; compiled here for sm_90 (bfloat16: about 20 bytes of spills). Splits default to
enough programs for two per SM (at least 4*BLOCK_N keys each); 1 under the interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention import DTYPES, LOG2E
from .utils import cast, check, empty, interpreted, load_tile, pow2, store_tile, tile_dot


@triton.jit
def _mla_decode(QL, QP, CKV, KPE, IDX, O, LSE, T, S, H, R, DR, NK, qk_scale, offset, split_len,
                CAUSAL: tl.constexpr, SPARSE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_R: tl.constexpr, BLOCK_DR: tl.constexpr):
    pid_m = tl.program_id(0)
    split, n_splits = tl.program_id(2), tl.num_programs(2)
    if SPARSE:  # one query t of batch element b, a block of heads; its own key list
        b = (tl.program_id(1) // T).to(tl.int64)
        t = tl.program_id(1) % T
        rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) * T + t
        IDX += (b * T + t) * NK
        n_keys = NK
    else:  # a block of the H*T rows of batch element b; every key
        b = tl.program_id(1).to(tl.int64)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        n_keys = S
    offs_r, offs_dr = tl.arange(0, BLOCK_R), tl.arange(0, BLOCK_DR)
    ql = load_tile(QL + b * H * T * R, rows, offs_r, H * T, R)
    qp = load_tile(QP + b * H * T * DR, rows, offs_dr, H * T, DR)
    CKV, KPE = CKV + b * S * R, KPE + b * S * DR
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_R), tl.float32)
    lo = split * split_len
    hi = tl.minimum(lo + split_len, n_keys)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        if SPARSE:
            keys = tl.load(IDX + offs_n, mask=offs_n < hi, other=-1)
            keys = tl.where(keys >= 0, keys, S)  # an unused slot: a row that load_tile masks
            ok = keys[None, :] < S
        else:
            keys = offs_n
            ok = keys[None, :] < hi
            if CAUSAL:
                ok = ok & (keys[None, :] <= rows[:, None] % T + offset)
        ckv = load_tile(CKV, keys, offs_r, S, R)
        kpe = load_tile(KPE, keys, offs_dr, S, DR)
        s = (tile_dot(ql, tl.trans(ckv)) + tile_dot(qp, tl.trans(kpe))) * qk_scale
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that sees no key of this split yet
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tile_dot(cast(p, ckv.dtype), ckv)
        m_i = m_new
    l_i = tl.where(l_i == 0.0, 1.0, l_i)  # a row that sees no key of this split: o = 0, lse = m_i = -inf
    part = b * n_splits + split
    store_tile(O + part * H * T * R, acc / l_i[:, None], rows, offs_r, H * T, R)
    tl.store(LSE + part * H * T + rows, m_i + tl.log2(l_i), mask=rows < H * T)


@triton.jit
def _mla_combine(OP, LSEP, O, HT, R, n_splits, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr):
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    for i in range(n_splits):
        m = tl.maximum(m, tl.load(LSEP + (b * n_splits + i) * HT + rows, mask=rows < HT, other=float("-inf")))
    m = tl.where(m == float("-inf"), 0.0, m)
    acc = tl.zeros((BLOCK_M, BLOCK_R), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    for i in range(n_splits):
        part = b * n_splits + i
        w = tl.exp2(tl.load(LSEP + part * HT + rows, mask=rows < HT, other=float("-inf")) - m)
        acc += w[:, None] * load_tile(OP + part * HT * R, rows, offs_r, HT, R)
        l_i += w
    store_tile(O + b * HT * R, acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None], rows, offs_r, HT, R)


def mla_decode(q_latent: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor, scale: float,
               causal: bool = True, splits: int | None = None, indices: torch.Tensor | None = None) -> torch.Tensor:
    """Absorbed MLA attention over the latent cache (forward only): ``o`` (B, H, T, r) in ``q_latent.dtype``.

    ``q_latent`` (B, H, T, r), ``q_pe`` (B, H, T, dr), ``c_kv`` (B, S, r), ``k_pe`` (B, S, dr); ``scale`` the
    softmax scale (``qk_head_dim**-0.5 * mscale**2``); ``causal``: queries aligned to the end of the cache;
    ``splits``: number of split-KV programs per row block (None: a heuristic, see the module docstring);
    ``indices``: None, or DSA's selection (B, T, NK) int64 from `kernels.triton.dsa.indexer_topk` (-1: unused
    slot), and each query attends to its selected keys only (``causal`` is then ignored: the selection is causal).

    Raises ``TypeError`` for a non-tensor or a dtype other than float32/float16/bfloat16 (or mixed dtypes, or
    non-int64 indices), ``ValueError`` for wrong ranks or shapes, empty inputs, causal with ``S < T``,
    ``splits < 1``, a device mismatch, a CPU tensor outside the interpreter or a non-contiguous input, and
    ``RuntimeError`` when autograd would need a gradient (this kernel is forward only; train through
    `kernels.triton.attention.attention` or `kernels.triton.dsa.sparse_attention` on the naive form).
    """
    check("q_latent", q_latent, ndim=4, dtypes=DTYPES)
    b, h, t, r = q_latent.shape
    check("q_pe", q_pe, dtypes=q_latent.dtype, shape=(b, h, t, None), device=q_latent.device)
    check("c_kv", c_kv, dtypes=q_latent.dtype, shape=(b, None, r), device=q_latent.device)
    s, dr = c_kv.shape[1], q_pe.shape[3]
    check("k_pe", k_pe, dtypes=q_latent.dtype, shape=(b, s, dr), device=q_latent.device)
    sparse = indices is not None
    if sparse:
        check("indices", indices, ndim=3, dtypes=torch.int64, shape=(b, t, None), device=q_latent.device)
    if min(q_latent.shape) == 0 or min(k_pe.shape) == 0 or (sparse and indices.shape[2] == 0):
        raise ValueError(f"mla_decode: empty input, q_latent {tuple(q_latent.shape)}, k_pe {tuple(k_pe.shape)}")
    if causal and not sparse and s < t:
        raise ValueError(f"mla_decode: causal needs at least as many cached positions as queries, got S={s} < T={t}")
    if torch.is_grad_enabled() and any(x.requires_grad for x in (q_latent, q_pe, c_kv, k_pe)):
        raise RuntimeError("mla_decode is forward only: call it under torch.no_grad() / torch.inference_mode()")
    br, bdr = pow2(r), pow2(dr)
    bm, bn, warps = (16, 16, 1) if interpreted() else (16, 16, 4) if q_latent.dtype == torch.float32 else (32, 32, 8)
    n_keys = indices.shape[2] if sparse else s
    grid = (triton.cdiv(h, bm), b * t) if sparse else (triton.cdiv(h * t, bm), b)
    if splits is None:
        splits = 1
        if q_latent.is_cuda:
            sms = torch.cuda.get_device_properties(q_latent.device).multi_processor_count
            splits = max(1, min(triton.cdiv(2 * sms, grid[0] * grid[1]), n_keys // (4 * bn)))
    if splits < 1:
        raise ValueError(f"mla_decode: splits must be at least 1, got {splits}")
    split_len = triton.cdiv(triton.cdiv(n_keys, splits), bn) * bn
    splits = triton.cdiv(n_keys, split_len)
    out = empty(b, h, t, r, dtype=q_latent.dtype, device=q_latent.device)
    part = out if splits == 1 else empty(b, splits, h * t, r, dtype=torch.float32, device=q_latent.device)
    lse = empty(b, splits, h * t, dtype=torch.float32, device=q_latent.device)
    _mla_decode[(*grid, splits)](
        q_latent, q_pe, c_kv, k_pe, indices if sparse else lse, part, lse, t, s, h, r, dr, n_keys, scale * LOG2E,
        s - t, split_len, CAUSAL=causal, SPARSE=sparse, BLOCK_M=bm, BLOCK_N=bn, BLOCK_R=br, BLOCK_DR=bdr,
        num_warps=warps)
    if splits > 1:
        _mla_combine[(triton.cdiv(h * t, bm), b)](part, lse, out, h * t, r, splits, BLOCK_M=bm, BLOCK_R=br,
                                                    num_warps=warps)
    return out
