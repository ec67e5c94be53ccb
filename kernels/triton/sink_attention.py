"""DeepSeek-V4's attention core (V4 report section 2.3): shared-KV multi-query attention with a learned sink logit per
head, over the rows each query selects by index (its sliding window, plus compressed entries on CSA/HCA layers), as
`reference.sink_attention.sink_attention`:

``o[b, s, h] = sum_k p_k kv[b, idx[b, s, k]]``, ``p = softmax([scale q[b, s, h] . kv_k for valid k; sinks[h]])``
without the sink's share (Xiao et al. 2023, "attention sinks"). One row of ``kv`` is both key and value.

Kernels, grid (S, B, cdiv(H, BLOCK_H)); one program takes one query (b, s) and BLOCK_H of its heads. MQA: every head
of a query reads the same rows, so each gathered (BLOCK_N, D) block of ``kv`` serves BLOCK_H heads through one
``tl.dot`` for the logits and one for the output (BLOCK_H = next power of two of H, at least 16, at most 64; 16 for
float32 or D over 256, as `kernels.triton.dsa`'s sparse attention, whose gather helper this reuses).

- `_sink_fwd`: online softmax over the selected rows in blocks of BLOCK_N; the sink joins at the end (it raises the
  normalizer, it adds no value), then ``o`` is stored with the log-sum-exp over [logits; sink] (base 2, float32,
  (B, S, H)) for the backward. A query with no valid index gets ``o = 0`` and ``lse = sink``.
- `_sink_bwd`: recomputes the probabilities from the saved log-sum-exp; with ``delta = o . do``,
  ``ds_k = p_k (do . kv_k - delta)``, ``dq = scale sum_k ds_k kv_k``, and every selected row gets
  ``sum_h p_hk do_h + scale ds_hk q_h`` (key and value at once) by float32 ``tl.atomic_add`` (so on a GPU the
  summation order of a row shared by several queries, hence its last bits, may vary between runs), cast to kv's
  dtype after the launch. The sink's gradient ``-sum p_sink delta`` is stored per (b, s, h) and summed over (b, s)
  by torch after the launch (deterministic).

Index entries outside [0, L) (-1: an empty slot) are skipped; indices must be distinct within a query (a repeated
row would count twice, as it does in the reference's softmax too). Tiles go through `kernels.triton.utils`
(``tile_dot``, ``cast``). Block sizes on a GPU are untuned and not yet run there; both kernels compile for sm_90 (Triton
3.9, ``bench.triton_compile``'s stand-in driver) within shared memory, without register spills in half precision;
float32 at D = 512 (8 warps) spills about 2 KB in the backward.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention import DTYPES, LOG2E
from .dsa import _gather, _sparse_blocks
from .utils import cast, check, empty, interpreted, pow2, tile_dot

INDEX_DTYPES = (torch.int32, torch.int64)
_LOG2E: tl.constexpr = tl.constexpr(LOG2E)  # the sink to base 2, inside the kernels


@triton.jit
def _rows_of(IDX, start, K, L, BLOCK_N: tl.constexpr):
    """Index entries ``start .. start+BLOCK_N`` of one query and which of them are rows of ``kv``."""
    offs_n = start + tl.arange(0, BLOCK_N)
    idx = tl.load(IDX + offs_n, mask=offs_n < K, other=-1)
    return idx, (idx >= 0) & (idx < L)


@triton.jit
def _sink_fwd(Q, KV, SINKS, IDX, O, LSE, S, H, L, D, K, qk_scale, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_D: tl.constexpr):
    s = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    h = tl.program_id(2) * BLOCK_H + tl.arange(0, BLOCK_H)
    row_ok = h < H
    rows = (b * S + s) * H + h  # rows of q and o as (B*S*H, D), of lse as (B*S*H,)
    offs_d = tl.arange(0, BLOCK_D)
    q = _gather(Q, rows, row_ok, offs_d, D)
    KV, IDX = KV + b * L * D, IDX + (b * S + s) * K
    m_i = tl.full((BLOCK_H,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_H,), tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_D), tl.float32)
    for start in range(0, K, BLOCK_N):
        idx, ok = _rows_of(IDX, start, K, L, BLOCK_N)
        kv = _gather(KV, idx, ok, offs_d, D)
        z = tl.where(ok[None, :], tile_dot(q, tl.trans(kv)) * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(z, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no valid row yet
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(z - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tile_dot(cast(p, kv.dtype), kv)
        m_i = m_new
    sink = tl.load(SINKS + h, mask=row_ok, other=0.0).to(tl.float32) * _LOG2E  # base 2
    m = tl.maximum(m_i, sink)
    m = tl.where(m == float("-inf"), 0.0, m)  # only with a sink of -inf and no valid row
    alpha = tl.exp2(m_i - m)
    total = l_i * alpha + tl.exp2(sink - m)
    total = tl.where(total == 0.0, 1.0, total)
    acc = acc * (alpha / total)[:, None]
    tl.store(O + rows[:, None] * D + offs_d[None, :], cast(acc, O.dtype.element_ty),
             mask=row_ok[:, None] & (offs_d[None, :] < D))
    tl.store(LSE + rows, m + tl.log2(total), mask=row_ok)


@triton.jit
def _sink_bwd(Q, KV, SINKS, IDX, O, DO, LSE, DQ, DKV, DSINK, S, H, L, D, K, scale, qk_scale, BLOCK_H: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    s = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    h = tl.program_id(2) * BLOCK_H + tl.arange(0, BLOCK_H)
    row_ok = h < H
    rows = (b * S + s) * H + h
    offs_d = tl.arange(0, BLOCK_D)
    q = _gather(Q, rows, row_ok, offs_d, D)
    do = _gather(DO, rows, row_ok, offs_d, D)
    delta = tl.sum(_gather(O, rows, row_ok, offs_d, D).to(tl.float32) * do.to(tl.float32), 1)
    lse = tl.load(LSE + rows, mask=row_ok, other=0.0)
    sink = tl.load(SINKS + h, mask=row_ok, other=0.0).to(tl.float32) * _LOG2E
    tl.store(DSINK + rows, -tl.exp2(sink - lse) * delta, mask=row_ok)  # summed over (b, s) by the launcher
    KV, DKV, IDX = KV + b * L * D, DKV + b * L * D, IDX + (b * S + s) * K
    dq = tl.zeros((BLOCK_H, BLOCK_D), tl.float32)
    for start in range(0, K, BLOCK_N):
        idx, ok = _rows_of(IDX, start, K, L, BLOCK_N)
        kv = _gather(KV, idx, ok, offs_d, D)
        live = row_ok[:, None] & ok[None, :]
        p = tl.where(live, tl.exp2(tile_dot(q, tl.trans(kv)) * qk_scale - lse[:, None]), 0.0)
        ds = p * (tile_dot(do, tl.trans(kv)) - delta[:, None])
        dq += tile_dot(cast(ds, kv.dtype), kv)
        dkv = tile_dot(cast(tl.trans(p), do.dtype), do) + tile_dot(cast(tl.trans(ds), q.dtype), q) * scale
        at = tl.where(ok, idx, 0)[:, None]
        tl.atomic_add(DKV + at * D + offs_d[None, :], dkv, mask=ok[:, None] & (offs_d[None, :] < D))
    tl.store(DQ + rows[:, None] * D + offs_d[None, :], cast(dq * scale, DQ.dtype.element_ty),
             mask=row_ok[:, None] & (offs_d[None, :] < D))


def _check(q, kv, sinks, indices) -> tuple[int, int, int, int, int, int]:
    """Check the op's inputs; returns (B, S, H, D, L, K)."""
    check("q", q, ndim=4, dtypes=DTYPES)
    b, s, h, d = q.shape
    check("kv", kv, ndim=3, dtypes=q.dtype, shape=(b, None, d), device=q.device)
    check("sinks", sinks, dtypes=DTYPES, shape=(h,), device=q.device)
    check("indices", indices, ndim=3, dtypes=INDEX_DTYPES, shape=(b, s, None), device=q.device)
    if q.numel() == 0 or kv.numel() == 0 or indices.shape[2] == 0:
        raise ValueError(f"sink_attention: empty input, q {tuple(q.shape)}, kv {tuple(kv.shape)}, indices "
                         f"{tuple(indices.shape)}")
    return b, s, h, d, kv.shape[1], indices.shape[2]


def _launch(kernel, h: int, d: int, b: int, s: int, dtype: torch.dtype, *args):
    block_h, block_n, warps = _sparse_blocks(h, pow2(d), dtype)
    warps = 8 if d > 256 and not interpreted() else warps  # V4's D = 512: (16, 512) float32 tiles spill at 4 warps
    kernel[(s, b, triton.cdiv(h, block_h))](*args, BLOCK_H=block_h, BLOCK_N=block_n, BLOCK_D=pow2(d),
                                            num_warps=warps)


def sink_attention_fwd(q, kv, sinks, indices, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward launcher: ``o`` (B, S, H, D) in ``q.dtype`` and ``lse`` (B, S, H) float32, the base-2 log-sum-exp of
    [logits; sink] (``log2 e`` times the natural one).

    ``q`` (B, S, H, D) and ``kv`` (B, L, D) of one float dtype, ``sinks`` (H,) float (float32 in V4), ``indices``
    (B, S, K) int32 or int64 (-1 or any value outside [0, L): an empty slot; distinct within a query). Raises
    ``TypeError`` for a non-tensor or a wrong dtype, ``ValueError`` for wrong ranks or shapes, an empty input, a
    device mismatch, a CPU tensor outside the interpreter or a non-contiguous input.
    """
    b, s, h, d, n_rows, k = _check(q, kv, sinks, indices)
    o = empty(b, s, h, d, dtype=q.dtype, device=q.device)
    lse = empty(b, s, h, dtype=torch.float32, device=q.device)
    _launch(_sink_fwd, h, d, b, s, q.dtype, q, kv, sinks, indices, o, lse, s, h, n_rows, d, k, scale * LOG2E)
    return o, lse


def sink_attention_bwd(q, kv, sinks, indices, o, lse, do, scale: float):
    """Backward launcher: ``dq`` in q's dtype, ``dkv`` in kv's (summed over every query and head that selected the
    row; zero for rows nobody selected), ``dsinks`` in sinks' dtype. ``o``, ``lse`` from `sink_attention_fwd`,
    ``do`` the cotangent of ``o``. Raises as `sink_attention_fwd`."""
    b, s, h, d, n_rows, k = _check(q, kv, sinks, indices)
    check("o", o, dtypes=q.dtype, shape=(b, s, h, d), device=q.device)
    check("do", do, dtypes=q.dtype, shape=(b, s, h, d), device=q.device)
    check("lse", lse, dtypes=torch.float32, shape=(b, s, h), device=q.device)
    dq = empty(b, s, h, d, dtype=q.dtype, device=q.device)
    dkv = torch.zeros(b, n_rows, d, dtype=torch.float32, device=q.device)  # atomic_add target
    dsink = empty(b, s, h, dtype=torch.float32, device=q.device)
    _launch(_sink_bwd, h, d, b, s, q.dtype, q, kv, sinks, indices, o, do, lse, dq, dkv, dsink, s, h, n_rows, d, k,
            scale, scale * LOG2E)
    return dq, dkv.to(kv.dtype), dsink.sum((0, 1)).to(sinks.dtype)


class _SinkAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, kv, sinks, indices, scale):
        o, lse = sink_attention_fwd(q, kv, sinks, indices, scale)
        ctx.save_for_backward(q, kv, sinks, indices, o, lse)
        ctx.scale = scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, kv, sinks, indices, o, lse = ctx.saved_tensors
        dq, dkv, dsinks = sink_attention_bwd(q, kv, sinks, indices, o, lse, do.contiguous(), ctx.scale)
        return dq, dkv, dsinks, None, None


def sink_attention(q: torch.Tensor, kv: torch.Tensor, sinks: torch.Tensor, indices: torch.Tensor,
                   scale: float) -> torch.Tensor:
    """Attention with a sink per head over the selected shared key-value rows: (B, S, H, D) in ``q.dtype``, as
    `reference.sink_attention.sink_attention`.

    ``q`` (B, S, H, D), ``kv`` (B, L, D) (each row key and value at once), ``sinks`` (H,) float32 (one logit per
    head, no value), ``indices`` (B, S, K) int32/int64 (the rows query s attends to; -1 or out of range: empty),
    ``scale`` (``D**-0.5`` in V4). A query with no valid index gets zeros. Differentiable in ``q``, ``kv`` and
    ``sinks`` (not ``indices``). Shapes and errors: `sink_attention_fwd`. Source: DeepSeek-V4 report section 2.3;
    Xiao et al. 2023.
    """
    return _SinkAttention.apply(q, kv, sinks, indices, float(scale))
