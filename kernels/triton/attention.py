"""Flash attention, forward and backward (FlashAttention-2: Dao 2023, arXiv 2307.08691, algorithms 1 and 2).

``attention(q, k, v, scale, causal=True)`` computes `reference.attention.attend`: ``softmax(q k^T * scale) v``
with grouped key/value heads, without materializing the (T, S) score matrix. Shapes: ``q`` (B, H, T, Dk),
``k`` (B, Hk, S, Dk), ``v`` (B, Hk, S, Dv), ``H % Hk == 0`` (MHA, MQA, GQA: query head ``h`` reads key head
``h // (H // Hk)``); ``Dk`` may differ from ``Dv`` (MLA prefill: 192 and 128) and neither needs to be a power of
two (tiles are padded to the next power of two, at least 16, and masked). Causal: the T queries are the last T
positions of the S keys, so query ``t`` sees key ``j`` iff ``j <= t + S - T`` (a chunked prefill over a cache);
this needs ``S >= T``. Returns (B, H, T, Dv) in ``q.dtype``; softmax statistics and accumulators are float32.
Inputs: float32, float16 or bfloat16, all of one dtype, contiguous, on one CUDA device (CPU under the
interpreter). Float32 dots run in IEEE float32 (``input_precision="ieee"``), not TF32, so that float32 meets the
1e-5 bound; on a GPU that is the FMA path, not tensor cores: bfloat16 is the fast path.

Kernels (the grids name one program each):
- `_attn_fwd`: grid (cdiv(T, BLOCK_M), B*H); online softmax over key blocks of BLOCK_N in base 2 (scale folded
  with log2(e)); stores O and the row log-sum-exp (base 2) for the backward pass.
- `_attn_bwd_delta`: grid (cdiv(T, BLOCK_M), B*H); ``delta = rowsum(dO * O)``.
- `_attn_bwd_dkdv`: grid (cdiv(S, BLOCK_N), B*Hk); one key block, looping over the query heads of its group and
  their query blocks, so dk and dv are summed over the group without atomics.
- `_attn_bwd_dq`: grid (cdiv(T, BLOCK_M), B*H); one query block, looping over key blocks.

Block sizes: 16 under the interpreter (so small test shapes span several blocks); on a GPU, for 16-bit inputs
64 x 64 with 4 warps for padded head dims up to 64, 8 warps up to 128, 32 x 32 above; for float32 16 x 32 (16 x 16
above 128) with 4 warps. Untuned and not yet run on a GPU, but every kernel was compiled here for sm_90 with
Triton's ptxas (a handful of spilled registers at most with these sizes; more in the float32 backward).

Tiles go through `kernels.triton.utils`' `tile_dot`, `cast` and `store_tile`, which carry the one policy for
half precision under Triton's interpreter (bfloat16 dot operands upcast to float32, bfloat16 results
rounded to nearest by hand; measured there).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .utils import cast, check, empty, interpreted, load_tile, pow2, store_tile, tile_dot

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LOG2E = math.log2(math.e)


def _blocks(block_d: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) for a padded head dim ``block_d`` and input ``dtype``. Float32 dots take
    the FMA path (no tensor cores), whose registers limit the tiles to 16 x 32 (16 x 16 above 128)."""
    if interpreted():
        return 16, 16, 1
    if dtype == torch.float32:
        return (16, 32, 4) if block_d <= 128 else (16, 16, 4)
    if block_d <= 64:
        return 64, 64, 4
    if block_d <= 128:
        return 64, 64, 8
    return 32, 32, 8


@triton.jit
def _attn_fwd(Q, K, V, O, LSE, T, S, H, HK, DK, DV, qk_scale, offset, CAUSAL: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    bhk = bh // H * HK + bh % H // (H // HK)
    K, V = K + bhk * S * DK, V + bhk * S * DV
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dk, offs_dv = tl.arange(0, BLOCK_DK), tl.arange(0, BLOCK_DV)
    q = load_tile(Q + bh * T * DK, offs_m, offs_dk, T, DK)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), tl.float32)
    hi = S
    if CAUSAL:
        hi = tl.minimum(S, (pid_m + 1) * BLOCK_M + offset)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = load_tile(K, offs_n, offs_dk, S, DK)
        v = load_tile(V, offs_n, offs_dv, S, DV)
        s = tile_dot(q, tl.trans(k)) * qk_scale
        ok = offs_n[None, :] < S
        if CAUSAL:
            ok = ok & (offs_n[None, :] <= offs_m[:, None] + offset)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tile_dot(cast(p, v.dtype), v)
        m_i = m_new
    store_tile(O + bh * T * DV, acc / l_i[:, None], offs_m, offs_dv, T, DV)
    tl.store(LSE + bh * T + offs_m, m_i + tl.log2(l_i), mask=offs_m < T)


@triton.jit
def _attn_bwd_delta(O, DO, DELTA, T, DV, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    o = load_tile(O + bh * T * DV, offs_m, offs_dv, T, DV).to(tl.float32)
    do = load_tile(DO + bh * T * DV, offs_m, offs_dv, T, DV).to(tl.float32)
    tl.store(DELTA + bh * T + offs_m, tl.sum(o * do, 1), mask=offs_m < T)


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK_, DV_, T, S, H, HK, DK, DV, scale, qk_scale, offset,
                   CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr,
                   BLOCK_DV: tl.constexpr):
    pid_n = tl.program_id(0)
    bhk = tl.program_id(1).to(tl.int64)
    group = H // HK
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_dk, offs_dv = tl.arange(0, BLOCK_DK), tl.arange(0, BLOCK_DV)
    k = load_tile(K + bhk * S * DK, offs_n, offs_dk, S, DK)
    v = load_tile(V + bhk * S * DV, offs_n, offs_dv, S, DV)
    dk = tl.zeros((BLOCK_N, BLOCK_DK), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_DV), tl.float32)
    lo = 0
    if CAUSAL:  # first query block that sees a key of this block
        lo = tl.maximum(pid_n * BLOCK_N - offset, 0) // BLOCK_M * BLOCK_M
    for g in range(group):
        bh = bhk // HK * H + bhk % HK * group + g
        for start_m in range(lo, T, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            q = load_tile(Q + bh * T * DK, offs_m, offs_dk, T, DK)
            do = load_tile(DO + bh * T * DV, offs_m, offs_dv, T, DV)
            lse = tl.load(LSE + bh * T + offs_m, mask=offs_m < T, other=0.0)
            delta = tl.load(DELTA + bh * T + offs_m, mask=offs_m < T, other=0.0)
            ok = (offs_n[:, None] < S) & (offs_m[None, :] < T)
            if CAUSAL:
                ok = ok & (offs_n[:, None] <= offs_m[None, :] + offset)
            pt = tl.where(ok, tl.exp2(tile_dot(k, tl.trans(q)) * qk_scale - lse[None, :]), 0.0)
            dv += tile_dot(cast(pt, do.dtype), do)
            dst = pt * (tile_dot(v, tl.trans(do)) - delta[None, :])
            dk += tile_dot(cast(dst, q.dtype), q)
    store_tile(DK_ + bhk * S * DK, dk * scale, offs_n, offs_dk, S, DK)
    store_tile(DV_ + bhk * S * DV, dv, offs_n, offs_dv, S, DV)


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, T, S, H, HK, DK, DV, scale, qk_scale, offset, CAUSAL: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    bhk = bh // H * HK + bh % H // (H // HK)
    K, V = K + bhk * S * DK, V + bhk * S * DV
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dk, offs_dv = tl.arange(0, BLOCK_DK), tl.arange(0, BLOCK_DV)
    q = load_tile(Q + bh * T * DK, offs_m, offs_dk, T, DK)
    do = load_tile(DO + bh * T * DV, offs_m, offs_dv, T, DV)
    lse = tl.load(LSE + bh * T + offs_m, mask=offs_m < T, other=0.0)
    delta = tl.load(DELTA + bh * T + offs_m, mask=offs_m < T, other=0.0)
    dq = tl.zeros((BLOCK_M, BLOCK_DK), tl.float32)
    hi = S
    if CAUSAL:
        hi = tl.minimum(S, (pid_m + 1) * BLOCK_M + offset)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = load_tile(K, offs_n, offs_dk, S, DK)
        v = load_tile(V, offs_n, offs_dv, S, DV)
        ok = (offs_m[:, None] < T) & (offs_n[None, :] < S)
        if CAUSAL:
            ok = ok & (offs_n[None, :] <= offs_m[:, None] + offset)
        p = tl.where(ok, tl.exp2(tile_dot(q, tl.trans(k)) * qk_scale - lse[:, None]), 0.0)
        ds = p * (tile_dot(do, tl.trans(v)) - delta[:, None])
        dq += tile_dot(cast(ds, k.dtype), k)
    store_tile(DQ + bh * T * DK, dq * scale, offs_m, offs_dk, T, DK)


def check_qkv(q, k, v, causal):
    """Check attention inputs q (B, H, T, Dk), k (B, Hk, S, Dk), v (B, Hk, S, Dv) as `attention_fwd` documents;
    returns (B, H, T, Dk, Hk, S, Dv)."""
    check("q", q, ndim=4, dtypes=DTYPES)
    b, h, t, dk = q.shape
    check("k", k, ndim=4, dtypes=q.dtype, shape=(b, None, None, dk), device=q.device)
    hk, s = k.shape[1], k.shape[2]
    check("v", v, ndim=4, dtypes=q.dtype, shape=(b, hk, s, None), device=q.device)
    if min(q.shape) == 0 or min(v.shape) == 0:
        raise ValueError(f"attention: empty input, q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if h % hk:
        raise ValueError(f"attention: query heads ({h}) must be a multiple of key/value heads ({hk})")
    if causal and s < t:
        raise ValueError(f"attention: causal needs at least as many keys as queries, got S={s} < T={t}")
    return b, h, t, dk, hk, s, v.shape[3]


def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                  causal: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward launcher: returns ``o`` (B, H, T, Dv) in ``q.dtype`` and ``lse`` (B, H, T) float32, the base-2
    log-sum-exp of each row's scaled scores (for `attention_bwd`).

    Raises ``TypeError`` for a non-tensor or a dtype other than float32/float16/bfloat16 (or mixed dtypes),
    ``ValueError`` for wrong ranks or shapes, ``H % Hk != 0``, causal with ``S < T``, empty inputs, a device
    mismatch, a CPU tensor outside the interpreter, or a non-contiguous input.
    """
    b, h, t, dk, hk, s, dv = check_qkv(q, k, v, causal)
    o = empty(b, h, t, dv, dtype=q.dtype, device=q.device)
    lse = empty(b, h, t, dtype=torch.float32, device=q.device)
    bdk, bdv = pow2(dk), pow2(dv)
    bm, bn, warps = _blocks(max(bdk, bdv), q.dtype)
    _attn_fwd[(triton.cdiv(t, bm), b * h)](
        q, k, v, o, lse, t, s, h, hk, dk, dv, scale * LOG2E, s - t, CAUSAL=causal, BLOCK_M=bm, BLOCK_N=bn,
        BLOCK_DK=bdk, BLOCK_DV=bdv, num_warps=warps)
    return o, lse


def attention_bwd(q, k, v, o, lse, do, scale: float, causal: bool = True):
    """Backward launcher: ``o``, ``lse`` from `attention_fwd`, ``do`` (B, H, T, Dv) the output's gradient.
    Returns ``dq`` (B, H, T, Dk), ``dk`` (B, Hk, S, Dk), ``dv`` (B, Hk, S, Dv) in the inputs' dtype, dk and dv
    summed over the query heads that share a key head. Raises as `attention_fwd`."""
    b, h, t, dk, hk, s, dv = check_qkv(q, k, v, causal)
    check("o", o, dtypes=q.dtype, shape=(b, h, t, dv), device=q.device)
    check("do", do, dtypes=q.dtype, shape=(b, h, t, dv), device=q.device)
    check("lse", lse, dtypes=torch.float32, shape=(b, h, t), device=q.device)
    bdk, bdv = pow2(dk), pow2(dv)
    bm, bn, warps = _blocks(max(bdk, bdv), q.dtype)
    delta = empty(b, h, t, dtype=torch.float32, device=q.device)
    _attn_bwd_delta[(triton.cdiv(t, bm), b * h)](o, do, delta, t, dv, BLOCK_M=bm, BLOCK_DV=bdv)
    dq = empty(b, h, t, dk, dtype=q.dtype, device=q.device)
    dk_ = empty(b, hk, s, dk, dtype=q.dtype, device=q.device)
    dv_ = empty(b, hk, s, dv, dtype=q.dtype, device=q.device)
    _attn_bwd_dkdv[(triton.cdiv(s, bn), b * hk)](
        q, k, v, do, lse, delta, dk_, dv_, t, s, h, hk, dk, dv, scale, scale * LOG2E, s - t, CAUSAL=causal,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_DK=bdk, BLOCK_DV=bdv, num_warps=warps)
    _attn_bwd_dq[(triton.cdiv(t, bm), b * h)](
        q, k, v, do, lse, delta, dq, t, s, h, hk, dk, dv, scale, scale * LOG2E, s - t, CAUSAL=causal,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_DK=bdk, BLOCK_DV=bdv, num_warps=warps)
    return dq, dk_, dv_


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, causal):
        o, lse = attention_fwd(q, k, v, scale, causal)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.scale, ctx.causal = scale, causal
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = attention_bwd(q, k, v, o, lse, do.contiguous(), ctx.scale, ctx.causal)
        return dq, dk, dv, None, None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool = True) -> torch.Tensor:
    """Differentiable flash attention: ``softmax(q k^T * scale [+ causal mask]) v``, (B, H, T, Dv) in ``q.dtype``.

    Same result as ``reference.attention.attend(q, k, v, causal_mask(T, S, S - T), scale)`` (``mask=None`` when
    ``T == S``); ``causal=False`` attends to every key. Shapes, dtypes and errors: see the module docstring and
    `attention_fwd`. Gradients flow to ``q``, ``k`` and ``v``.
    """
    return _Attention.apply(q, k, v, float(scale), bool(causal))
