"""DeepSeekMoE in Triton: sigmoid group-limited routing, token permutation by expert, gather and combine, experts.

Source: DeepSeek-V3 technical report (arXiv 2412.19437) section 2.1.2; the definition of correct is
`reference.moe` (`reference.moe.route`, ``Experts.forward``).

Entry points (differentiable unless said otherwise):

- ``route(logits, bias, top_k, n_group, topk_group, norm_topk_prob, routed_scaling_factor)``
  -> ``topk_idx`` (N, K) int64, ``topk_weight`` (N, K) fp32, ``scores`` (N, E) fp32; gradients flow to
  ``logits`` through ``topk_weight`` and ``scores``.
- ``permute(topk_idx, num_experts)`` -> ``order``, ``slot``, ``counts``, ``offsets`` (not differentiable).
- ``permute_rows(x, order, slot)`` -> (M, H) and ``combine(ys, slot, topk_weight)`` -> (N, H).
- ``experts_forward(x, gate_proj, up_proj, down_proj, topk_idx, topk_weight)`` -> (N, H), through the grouped
  GEMMs of `kernels.triton.grouped_gemm` (``grouped_gate_up``, ``grouped_gemm``).

The raw launchers ``route_forward``, ``route_backward``, ``combine_forward`` and ``combine_backward`` run one
kernel pass each, without autograd. Results are cast through `kernels.triton.utils.cast` (bfloat16 rounded to
nearest under Triton's interpreter too).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from reference.moe import check_route_args

from .grouped_gemm import FLOATS, INDEX, grouped_gate_up, grouped_gemm
from .swiglu import swiglu
from .utils import cast, check, empty, interpreted

# ============================================================================= routing


@triton.jit
def _route_fwd_kernel(logits_ptr, bias_ptr, idx_ptr, w_ptr, scores_ptr, N, scale,
                      E: tl.constexpr, K: tl.constexpr, N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr,
                      NORM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_G: tl.constexpr,
                      BLOCK_K: tl.constexpr):
    """One program routes BLOCK_N tokens: sigmoid, group mask, top-K, weights (see `route_forward`)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_E)
    rmask = rows < N
    cmask = cols < E
    m2 = rmask[:, None] & cmask[None, :]
    offs = rows[:, None].to(tl.int64) * E + cols[None, :]
    s = tl.sigmoid(tl.load(logits_ptr + offs, mask=m2, other=0.0))
    tl.store(scores_ptr + offs, s, mask=m2)
    bias = tl.load(bias_ptr + cols, mask=cmask, other=0.0)
    choice = tl.where(cmask[None, :], s + bias[None, :], float("-inf"))
    choice = tl.where(choice != choice, float("inf"), choice)  # NaN ranks first, as in torch.topk: ids in range
    if N_GROUP > 1:
        # group score = sum of the group's two largest biased scores; keep the TOPK_GROUP best groups
        gsize: tl.constexpr = E // N_GROUP
        g = tl.arange(0, BLOCK_G)
        member = ((cols[None, :] // gsize) == g[:, None]) & cmask[None, :]  # (BLOCK_G, BLOCK_E)
        c3 = tl.where(member[None, :, :], choice[:, None, :], float("-inf"))  # (BLOCK_N, BLOCK_G, BLOCK_E)
        top1 = tl.max(c3, axis=2)
        first = tl.min(tl.where(c3 == top1[:, :, None], cols[None, None, :], BLOCK_E), axis=2)
        top2 = tl.max(tl.where(cols[None, None, :] == first[:, :, None], float("-inf"), c3), axis=2)
        gscore = top1 + top2  # (BLOCK_N, BLOCK_G); -inf for padding groups
        # rank of group g = number of groups ahead of it (higher score, or equal score and lower index)
        ahead = (gscore[:, None, :] > gscore[:, :, None]) | (
            (gscore[:, None, :] == gscore[:, :, None]) & (g[None, None, :] < g[None, :, None]))
        rank = tl.sum(ahead.to(tl.int32), axis=2)
        keep = (rank < TOPK_GROUP) & (g[None, :] < N_GROUP)
        keep_e = tl.max(tl.where(member[None, :, :] & keep[:, :, None], 1, 0), axis=1) > 0
        choice = tl.where(keep_e, choice, float("-inf"))
    # top-K by repeated arg-max; among equal values the lowest expert index wins
    kk = tl.arange(0, BLOCK_K)
    top_idx = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.int32)
    top_w = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k in tl.static_range(K):
        best = tl.max(choice, axis=1)
        pick = tl.min(tl.where(choice == best[:, None], cols[None, :], BLOCK_E), axis=1)
        hit = cols[None, :] == pick[:, None]
        wk = tl.sum(tl.where(hit, s, 0.0), axis=1)
        choice = tl.where(hit, float("-inf"), choice)
        top_idx = tl.where(kk[None, :] == k, pick[:, None], top_idx)
        top_w = tl.where(kk[None, :] == k, wk[:, None], top_w)
    if NORM:
        top_w = top_w / (tl.sum(top_w, axis=1)[:, None] + 1e-20)
    top_w = top_w * scale
    km = rmask[:, None] & (kk[None, :] < K)
    koffs = rows[:, None].to(tl.int64) * K + kk[None, :]
    tl.store(idx_ptr + koffs, top_idx.to(tl.int64), mask=km)
    tl.store(w_ptr + koffs, top_w, mask=km)


@triton.jit
def _route_bwd_kernel(gw_ptr, gs_ptr, idx_ptr, s_ptr, dlogits_ptr, N, scale,
                      E: tl.constexpr, K: tl.constexpr, NORM: tl.constexpr, HAS_GS: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    """One program: d logits for BLOCK_N tokens from d topk_weight (and d scores) (see `route_backward`)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_E)
    kk = tl.arange(0, BLOCK_K)
    rmask = rows < N
    m2 = rmask[:, None] & (cols[None, :] < E)
    km = rmask[:, None] & (kk[None, :] < K)
    offs = rows[:, None].to(tl.int64) * E + cols[None, :]
    koffs = rows[:, None].to(tl.int64) * K + kk[None, :]
    s = tl.load(s_ptr + offs, mask=m2, other=0.0)
    idx = tl.load(idx_ptr + koffs, mask=km, other=-1).to(tl.int32)
    gw = tl.load(gw_ptr + koffs, mask=km, other=0.0)
    hit = idx[:, :, None] == cols[None, None, :]  # (BLOCK_N, BLOCK_K, BLOCK_E)
    sk = tl.sum(tl.where(hit, s[:, None, :], 0.0), axis=2)  # the chosen experts' scores
    if NORM:
        d = tl.sum(sk, axis=1) + 1e-20
        gdot = tl.sum(gw * sk, axis=1)
        dsk = scale * (gw / d[:, None] - (gdot / (d * d))[:, None])
    else:
        dsk = scale * gw
    ds = tl.sum(tl.where(hit, dsk[:, :, None], 0.0), axis=1)  # (BLOCK_N, BLOCK_E)
    if HAS_GS:
        ds += tl.load(gs_ptr + offs, mask=m2, other=0.0)
    tl.store(dlogits_ptr + offs, ds * s * (1.0 - s), mask=m2)


def _route_blocks(e: int, k: int, n_group: int):
    block_e = triton.next_power_of_2(e)
    block_g = triton.next_power_of_2(max(n_group, 2))
    block_k = triton.next_power_of_2(max(k, 2))
    per_token = block_e * max(block_g if n_group > 1 else 1, block_k)
    budget = 16384 if interpreted() else 4096  # elements of the largest 3-D temporary per program
    block_n = max(1, min(64, triton.next_power_of_2(max(1, budget // per_token))))
    return block_n, block_e, block_g, block_k


def route_forward(logits: torch.Tensor, bias: torch.Tensor, top_k: int, n_group: int = 1, topk_group: int = 1,
                  norm_topk_prob: bool = True, routed_scaling_factor: float = 1.0):
    """DeepSeek-V3 ``noaux_tc`` routing after the router GEMM (report eq. 12-16; `reference.moe.route`).

    ``logits`` (N, E) float32 contiguous (``x W^T``); ``bias`` (E,) float32, the correction bias, used only to
    pick experts. Returns ``topk_idx`` (N, K) int64, ``topk_weight`` (N, K) float32 and ``scores`` (N, E) float32
    (``sigmoid(logits)``). Selection ranks ``scores + bias``: with ``n_group > 1`` a group's score is the sum of
    its two largest biased scores and only the ``topk_group`` best groups stay; then the K best experts are
    taken, in decreasing order. Weights are the unbiased scores of those experts, divided by their sum
    (+1e-20) when ``norm_topk_prob``, times ``routed_scaling_factor``.

    Ties: among equal biased scores (or equal group scores) the lower expert (group) index wins, as in
    `reference.moe.route` (DESIGN.md, "Ties in any top-k").
    A NaN biased score ranks above every number, as in ``torch.topk``: its expert is picked (NaN experts in
    index order) and its NaN weight reaches the output; every id is in [0, E) whatever the logits.

    One program routes BLOCK_N tokens, BLOCK_N * next_pow2(E) * max(next_pow2(n_group), next_pow2(K)) <= 4096
    (16384 interpreted; BLOCK_N <= 64), with all E experts of a token in registers, so E is limited by register
    space (256 is fine).
    Raises ``TypeError``/``ValueError`` (see `utils.check`) for bad tensors and ``ValueError`` for
    inconsistent ``top_k``/``n_group``/``topk_group``.
    """
    check("logits", logits, ndim=2, dtypes=torch.float32)
    n, e = logits.shape
    check("bias", bias, dtypes=torch.float32, shape=(e,), device=logits.device)
    check_route_args(e, top_k, n_group, topk_group)
    idx = empty(n, top_k, dtype=torch.int64, device=logits.device)
    w = empty(n, top_k, dtype=torch.float32, device=logits.device)
    scores = empty(n, e, dtype=torch.float32, device=logits.device)
    if n == 0:
        return idx, w, scores
    block_n, block_e, block_g, block_k = _route_blocks(e, top_k, n_group)
    _route_fwd_kernel[(triton.cdiv(n, block_n),)](
        logits, bias, idx, w, scores, n, float(routed_scaling_factor), E=e, K=top_k, N_GROUP=n_group,
        TOPK_GROUP=topk_group, NORM=bool(norm_topk_prob), BLOCK_N=block_n, BLOCK_E=block_e, BLOCK_G=block_g,
        BLOCK_K=block_k)
    return idx, w, scores


def route_backward(grad_weight: torch.Tensor, grad_scores: torch.Tensor | None, topk_idx: torch.Tensor,
                   scores: torch.Tensor, norm_topk_prob: bool = True, routed_scaling_factor: float = 1.0):
    """Gradient of `route_forward` w.r.t. ``logits``: one kernel over blocks of tokens.

    ``grad_weight`` (N, K) float32, ``grad_scores`` (N, E) float32 or None, ``topk_idx`` (N, K) int64 and
    ``scores`` (N, E) float32 from the forward. Returns ``d logits`` (N, E) float32:
    ``(grad_scores + scatter_k(d w / d s_k)) * s * (1 - s)`` with, when normalized,
    ``dL/ds_k = rsf * (g_k / D - sum_j g_j s_j / D^2)``, ``D = sum_j s_j + 1e-20``.
    """
    check("scores", scores, ndim=2, dtypes=torch.float32)
    n, e = scores.shape
    check("topk_idx", topk_idx, ndim=2, dtypes=torch.int64, shape=(n, None), device=scores.device)
    k = topk_idx.shape[1]
    check("grad_weight", grad_weight, dtypes=torch.float32, shape=(n, k), device=scores.device)
    if grad_scores is not None:
        check("grad_scores", grad_scores, dtypes=torch.float32, shape=(n, e), device=scores.device)
    dlogits = empty(n, e, dtype=torch.float32, device=scores.device)
    if n == 0:
        return dlogits
    block_n, block_e, _, block_k = _route_blocks(e, k, 1)
    _route_bwd_kernel[(triton.cdiv(n, block_n),)](
        grad_weight, grad_scores if grad_scores is not None else scores, topk_idx, scores, dlogits, n,
        float(routed_scaling_factor), E=e, K=k, NORM=bool(norm_topk_prob), HAS_GS=grad_scores is not None,
        BLOCK_N=block_n, BLOCK_E=block_e, BLOCK_K=block_k)
    return dlogits


class _Route(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, bias, top_k, n_group, topk_group, norm_topk_prob, routed_scaling_factor):
        idx, w, scores = route_forward(logits, bias, top_k, n_group, topk_group, norm_topk_prob,
                                       routed_scaling_factor)
        ctx.mark_non_differentiable(idx)
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None: no zero tensors to read
        ctx.save_for_backward(idx, scores)
        ctx.norm, ctx.scale = norm_topk_prob, routed_scaling_factor
        return idx, w, scores

    @staticmethod
    def backward(ctx, _gidx, gw, gs):
        idx, scores = ctx.saved_tensors
        gw = torch.zeros_like(idx, dtype=torch.float32) if gw is None else gw.float().contiguous()
        gs = None if gs is None else gs.float().contiguous()
        return route_backward(gw, gs, idx, scores, ctx.norm, ctx.scale), None, None, None, None, None, None


def route(logits: torch.Tensor, bias: torch.Tensor, top_k: int, n_group: int = 1, topk_group: int = 1,
          norm_topk_prob: bool = True, routed_scaling_factor: float = 1.0):
    """Differentiable `route_forward`: ``(topk_idx, topk_weight, scores)``; the backward is the
    `route_backward` kernel (gradient to ``logits`` only; ``bias`` gets none, as in the reference)."""
    return _Route.apply(logits, bias, top_k, n_group, topk_group, norm_topk_prob, routed_scaling_factor)


# ============================================================================= permutation


@triton.jit
def _hist_kernel(ids_ptr, block_counts_ptr, M, E: tl.constexpr, BLOCK: tl.constexpr, BLOCK_E: tl.constexpr):
    """Program b counts the expert ids of flat entries [b*BLOCK, (b+1)*BLOCK): block_counts[b, e]."""
    b = tl.program_id(0)
    i = b * BLOCK + tl.arange(0, BLOCK)
    ids = tl.load(ids_ptr + i, mask=i < M, other=-1).to(tl.int32)
    cols = tl.arange(0, BLOCK_E)
    cnt = tl.sum((ids[:, None] == cols[None, :]).to(tl.int32), axis=0)
    tl.store(block_counts_ptr + b.to(tl.int64) * E + cols, cnt, mask=cols < E)


@triton.jit
def _scan_kernel(block_counts_ptr, base_ptr, counts_ptr, offsets_ptr, NB,
                 E: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_E: tl.constexpr):
    """One program: base[b, e] = sum_{b' < b} block_counts[b', e] (BLOCK_B blocks per step, cumsum over
    blocks), counts[e] = the column totals, offsets = [0, cumsum(counts)]."""
    cols = tl.arange(0, BLOCK_E)
    cmask = cols < E
    run = tl.zeros((BLOCK_E,), dtype=tl.int32)
    for b0 in range(0, NB, BLOCK_B):
        bs = b0 + tl.arange(0, BLOCK_B)
        m = (bs[:, None] < NB) & cmask[None, :]
        offs = bs[:, None].to(tl.int64) * E + cols[None, :]
        c = tl.load(block_counts_ptr + offs, mask=m, other=0)
        tl.store(base_ptr + offs, tl.cumsum(c, axis=0) - c + run[None, :], mask=m)
        run += tl.sum(c, axis=0)
    tl.store(counts_ptr + cols, run.to(tl.int64), mask=cmask)
    tl.store(offsets_ptr + 1 + cols, tl.cumsum(run, axis=0).to(tl.int64), mask=cmask)
    tl.store(offsets_ptr + cols, tl.zeros((BLOCK_E,), dtype=tl.int64), mask=cols == 0)


@triton.jit
def _scatter_kernel(ids_ptr, base_ptr, offsets_ptr, order_ptr, slot_ptr, M,
                    E: tl.constexpr, BLOCK: tl.constexpr):
    """Program b places its flat entries: slot[i] = offsets[e_i] + base[b, e_i] + #{j < i in the block:
    e_j = e_i}; order[slot[i]] = i. Stable: entries of one expert keep their flat order."""
    b = tl.program_id(0)
    r = tl.arange(0, BLOCK)
    i = b * BLOCK + r
    ids = tl.load(ids_ptr + i, mask=i < M, other=-1).to(tl.int32)
    valid = (i < M) & (ids >= 0) & (ids < E)  # an out-of-range id is dropped, never used as an address
    before = (ids[None, :] == ids[:, None]) & (r[None, :] < r[:, None])
    rank = tl.sum(before.to(tl.int32), axis=1)
    base = tl.load(base_ptr + b.to(tl.int64) * E + ids, mask=valid, other=0)
    start = tl.load(offsets_ptr + ids, mask=valid, other=0)
    slot = start + base + rank
    tl.store(slot_ptr + i, slot, mask=valid)
    tl.store(order_ptr + slot, i.to(tl.int64), mask=valid)


def permute(topk_idx: torch.Tensor, num_experts: int, check_ids: bool = True):
    """Sort the N*K token-expert pairs by expert, stably (histogram + scan + scatter kernels).

    ``topk_idx`` (N, K) int64 (or int32) contiguous, ids in [0, num_experts). Returns

    - ``order`` (M,) int64, M = N*K: flat pair indices sorted by expert, equal to
      ``torch.argsort(topk_idx.reshape(-1), stable=True)``; the token of sorted row r is ``order[r] // K``;
    - ``slot`` (M,) int64: the inverse, ``order[slot[i]] = i`` (where flat pair i sits in sorted order);
    - ``counts`` (E,) int64: rows per expert; ``offsets`` (E+1,) int64: ``[0, cumsum(counts)]``.

    Blocks: 64 pairs per histogram/scatter program (a 64 x next_pow2(E) compare for the histogram, 64 x 64 for
    the in-block rank), one scan program that walks the (M/64, E) block counts 32 blocks at a time.
    ``check_ids`` tests the id range on the host (one device sync) and raises ``ValueError``; without it an
    out-of-range id is dropped by the kernels (never used as an address) and leaves rows of ``order`` unwritten.
    """
    check("topk_idx", topk_idx, ndim=2, dtypes=INDEX)
    if num_experts < 1:
        raise ValueError(f"permute: num_experts={num_experts} must be >= 1")
    dev = topk_idx.device
    m = topk_idx.numel()
    if m >= 2**31:
        raise ValueError(f"permute: {m} token-expert pairs exceed the int32 range the kernels index with")
    if check_ids and m and (int(topk_idx.min()) < 0 or int(topk_idx.max()) >= num_experts):
        raise ValueError(f"permute: topk_idx holds ids outside [0, {num_experts})")
    block, block_e, block_b = 64, triton.next_power_of_2(num_experts), 32
    nb = max(1, triton.cdiv(m, block))
    block_counts = torch.empty(nb, num_experts, dtype=torch.int32, device=dev)
    base = torch.empty(nb, num_experts, dtype=torch.int32, device=dev)
    order = empty(m, dtype=torch.int64, device=dev)
    slot = empty(m, dtype=torch.int64, device=dev)
    counts = empty(num_experts, dtype=torch.int64, device=dev)
    offsets = empty(num_experts + 1, dtype=torch.int64, device=dev)
    _hist_kernel[(nb,)](topk_idx, block_counts, m, E=num_experts, BLOCK=block, BLOCK_E=block_e)
    _scan_kernel[(1,)](block_counts, base, counts, offsets, nb, E=num_experts, BLOCK_B=block_b, BLOCK_E=block_e)
    if m:
        _scatter_kernel[(nb,)](topk_idx, base, offsets, order, slot, m, E=num_experts, BLOCK=block)
    return order, slot, counts, offsets


# ============================================================================= gather and combine


@triton.jit
def _combine_kernel(ys_ptr, slot_ptr, w_ptr, y_ptr, N, H, K: tl.constexpr, HAS_W: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr):
    """y[n, h] = sum_k w[n, k] * ys[slot[n, k], h] (w = 1 without HAS_W), float32 sums in a fixed order.
    Program (i, j): BLOCK_N tokens x BLOCK_H columns."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    rmask = rows < N
    m2 = rmask[:, None] & (cols[None, :] < H)
    acc = tl.zeros((BLOCK_N, BLOCK_H), dtype=tl.float32)
    for k in tl.static_range(K):
        r = tl.load(slot_ptr + rows.to(tl.int64) * K + k, mask=rmask, other=0)
        v = tl.load(ys_ptr + r[:, None] * H + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        if HAS_W:
            v *= tl.load(w_ptr + rows.to(tl.int64) * K + k, mask=rmask, other=0.0).to(tl.float32)[:, None]
        acc += v
    tl.store(y_ptr + rows[:, None].to(tl.int64) * H + cols[None, :], cast(acc, y_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _combine_bwd_kernel(dy_ptr, ys_ptr, slot_ptr, w_ptr, dys_ptr, dw_ptr, N, H, K: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr):
    """For BLOCK_N tokens: dys[slot[n, k]] = w[n, k] * dy[n] and dw[n, k] = dy[n] . ys[slot[n, k]] (float32),
    walking H in BLOCK_H chunks. slot is a bijection onto the rows of ys, so no two programs write one row."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    for k in tl.static_range(K):
        r = tl.load(slot_ptr + rows.to(tl.int64) * K + k, mask=rmask, other=0)
        wk = tl.load(w_ptr + rows.to(tl.int64) * K + k, mask=rmask, other=0.0).to(tl.float32)
        dwk = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            cols = h0 + tl.arange(0, BLOCK_H)
            m2 = rmask[:, None] & (cols[None, :] < H)
            dy = tl.load(dy_ptr + rows[:, None].to(tl.int64) * H + cols[None, :], mask=m2, other=0.0).to(tl.float32)
            v = tl.load(ys_ptr + r[:, None] * H + cols[None, :], mask=m2, other=0.0).to(tl.float32)
            dwk += tl.sum(dy * v, axis=1)
            tl.store(dys_ptr + r[:, None] * H + cols[None, :], cast(dy * wk[:, None], dys_ptr.dtype.element_ty),
                     mask=m2)
        tl.store(dw_ptr + rows.to(tl.int64) * K + k, dwk, mask=rmask)


def _combine_blocks():
    """(BLOCK_N, BLOCK_H) of the combine kernels."""
    return (16, 64) if interpreted() else (16, 128)


def _check_combine(ys: torch.Tensor, slot: torch.Tensor, topk_weight: torch.Tensor | None):
    check("ys", ys, ndim=2, dtypes=FLOATS)
    check("slot", slot, ndim=2, dtypes=torch.int64, device=ys.device)
    if slot.numel() != ys.shape[0]:
        raise ValueError(f"combine: slot {tuple(slot.shape)} must index all {ys.shape[0]} rows of ys once")
    if topk_weight is not None:
        check("topk_weight", topk_weight, dtypes=FLOATS, shape=tuple(slot.shape), device=ys.device)


def combine_forward(ys: torch.Tensor, slot: torch.Tensor, topk_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Un-permute and weigh expert outputs: ``y[n] = sum_k topk_weight[n, k] * ys[slot[n, k]]`` (weights 1
    when ``topk_weight`` is None: that sum is the gradient of `permute_rows`).

    ``ys`` (M, H) float, rows in expert-sorted order, contiguous; ``slot`` (N, K) int64 contiguous (`permute`'s
    ``slot`` viewed as (N, K)), a bijection onto [0, M) (not checked); ``topk_weight`` (N, K) float contiguous.
    Returns (N, H) in ys's dtype, summed in float32 in the order k = 0..K-1 (deterministic, no atomics).
    Blocks 16 tokens x 128 columns (64 interpreted). Raises ``TypeError``/``ValueError`` on bad inputs.
    """
    _check_combine(ys, slot, topk_weight)
    (n, k), h = slot.shape, ys.shape[1]
    y = empty(n, h, dtype=ys.dtype, device=ys.device)
    if y.numel():
        bn, bh = _combine_blocks()
        _combine_kernel[(triton.cdiv(n, bn), triton.cdiv(h, bh))](
            ys, slot, ys if topk_weight is None else topk_weight, y, n, h, K=k, HAS_W=topk_weight is not None,
            BLOCK_N=bn, BLOCK_H=bh)
    return y


def combine_backward(grad_y: torch.Tensor, ys: torch.Tensor, slot: torch.Tensor, topk_weight: torch.Tensor):
    """Gradients of `combine_forward` with weights: ``(d ys (M, H) in ys's dtype, d topk_weight (N, K)
    float32)``; ``grad_y`` (N, H) in ys's dtype, contiguous. One kernel; blocks of 16 tokens walk H."""
    _check_combine(ys, slot, topk_weight)
    check("grad_y", grad_y, dtypes=ys.dtype, shape=(slot.shape[0], ys.shape[1]), device=ys.device)
    (n, k), h = slot.shape, ys.shape[1]
    dys = empty(*ys.shape, dtype=ys.dtype, device=ys.device)
    dw = empty(n, k, dtype=torch.float32, device=ys.device)
    if n and k:
        if h == 0:
            dw.zero_()
        bn, bh = _combine_blocks()
        _combine_bwd_kernel[(triton.cdiv(n, bn),)](
            grad_y, ys, slot, topk_weight, dys, dw, n, h, K=k, BLOCK_N=bn, BLOCK_H=bh)
    return dys, dw


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ys, slot, topk_weight):
        ctx.save_for_backward(ys, slot, topk_weight)
        return combine_forward(ys, slot, topk_weight)

    @staticmethod
    def backward(ctx, grad_y):
        ys, slot, topk_weight = ctx.saved_tensors
        dys, dw = combine_backward(grad_y.contiguous(), ys, slot, topk_weight)
        return dys, None, dw.to(topk_weight.dtype)


def combine(ys: torch.Tensor, slot: torch.Tensor, topk_weight: torch.Tensor) -> torch.Tensor:
    """Differentiable `combine_forward` (gradients for ``ys`` and ``topk_weight``, by `combine_backward`)."""
    return _Combine.apply(ys, slot, topk_weight)


class _PermuteRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, order, slot):
        ctx.save_for_backward(slot)
        return x.index_select(0, order // slot.shape[1])

    @staticmethod
    def backward(ctx, grad_xs):
        (slot,) = ctx.saved_tensors
        return combine_forward(grad_xs.contiguous(), slot), None, None


def permute_rows(x: torch.Tensor, order: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """Differentiable gather of token rows into expert-sorted order: ``x[order // K]`` (M, H) for ``x`` (N, H),
    ``order`` (M,) and ``slot`` (N, K) from `permute`. Forward: torch ``index_select``; backward:
    ``dx[n] = sum_k dxs[slot[n, k]]`` by the `combine_forward` kernel (float32, deterministic), not an
    ``index_add``."""
    return _PermuteRows.apply(x, order, slot)


# ============================================================================= experts


def experts_forward(x: torch.Tensor, gate_proj: torch.Tensor, up_proj: torch.Tensor, down_proj: torch.Tensor,
                    topk_idx: torch.Tensor, topk_weight: torch.Tensor, check_ids: bool = True) -> torch.Tensor:
    """Routed SwiGLU experts, `reference.moe.Experts.forward` with Triton kernels; differentiable w.r.t. ``x``,
    the three weights and ``topk_weight``.

    ``x`` (N, H) float32/bfloat16/float16; ``gate_proj``/``up_proj`` (E, I, H) and ``down_proj`` (E, H, I) in
    x's dtype, contiguous; ``topk_idx`` (N, K) int64 in [0, E); ``topk_weight`` (N, K) float (any layout).
    Returns ``y[n] = sum_k topk_weight[n, k] * down_e(silu(gate_e x_n) * up_e x_n)`` with
    ``e = topk_idx[n, k]``, (N, H) in x's dtype.

    Steps: `permute` (kernels; one host sync for the id-range check unless ``check_ids=False``, safe for ids
    from `route`); `permute_rows` (torch ``index_select``
    forward, combine kernel backward); `grouped_gate_up` (one kernel for gate and up); ``silu(g) * u`` by
    `kernels.triton.swiglu.swiglu`; `grouped_gemm` with ``down_proj``; `combine`
    ``y[n] = sum_k w[n, k] * ys[slot[n, k]]`` (kernel, float32 sums, deterministic, where the reference uses
    ``index_add``). Every backward is a kernel. Raises ``TypeError``/``ValueError`` on bad inputs.
    """
    check("x", x, ndim=2, dtypes=FLOATS)
    n, h = x.shape
    check("gate_proj", gate_proj, ndim=3, dtypes=x.dtype, shape=(None, None, h), device=x.device)
    e, i, _ = gate_proj.shape
    check("up_proj", up_proj, dtypes=x.dtype, shape=(e, i, h), device=x.device)
    check("down_proj", down_proj, dtypes=x.dtype, shape=(e, h, i), device=x.device)
    check("topk_idx", topk_idx, dtypes=torch.int64, shape=(n, None), device=x.device)
    k = topk_idx.shape[1]
    check("topk_weight", topk_weight, dtypes=FLOATS, shape=(n, k), device=x.device, contiguous=False)
    order, slot, _, offsets = permute(topk_idx, e, check_ids)
    slot = slot.view(n, k)
    g, u = grouped_gate_up(permute_rows(x, order, slot), gate_proj, up_proj, offsets)
    ys = grouped_gemm(swiglu(g, u), down_proj, offsets)
    return combine(ys, slot, topk_weight.contiguous())
