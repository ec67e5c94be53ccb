"""DeepSeek-V4's KV compressor pooling (V4 report section 2.3.1 eqs. 9-12, CSA; 2.3.2 eqs. 20-23, HCA) in Triton;
reference: `reference.compressor.gated_pool`.

Entry ``w`` of a sequence pools the slots of its window per feature ``d``: ``out[b, w, d] = sum_s p_s kv_s`` with
``p = softmax_s(gate_s + bias_s)`` in float32. HCA (``overlap=False``, C = D): the m tokens of window ``w``. CSA
(``overlap=True``, C = 2 D): 2 m slots, the first halves ``[..., :D]`` of window ``w - 1`` (for ``w = 0`` the cached
``prior_kv`` / ``prior_gate`` rows, bias already in the gate, or no slot at all) then the second halves
``[..., D:]`` of window ``w``.

Kernels (both hold a whole window in registers: m <= 128 in V4, 2 m slots for CSA):
- `_gated_pool_fwd`: grid (B * n, cdiv(D, BLOCK_D)), one program per (batch, window, feature block): loads the
  (BLOCK_M, BLOCK_D) slot tiles of kv and gate (BLOCK_M = next power of two of m), adds the bias, and takes the
  softmax over the slots in one pass (max, exp, sums), in float32.
- `_gated_pool_bwd`: grid (P, cdiv(D, BLOCK_D)), program p takes the (batch, window) pairs p, p + P, ...;
  recomputes the weights and the float32 output, then ``dkv_s = p_s dy`` and ``dgate_s = p_s dy (kv_s - out)``,
  written to the token each slot came from (the last window's first halves feed no entry of this call: zero
  gradient). ``dposition_bias`` is ``dgate`` summed over batch and windows: each program keeps its float32 sum in
  registers and writes it to a (P, m, C) buffer that torch reduces. With the prior rows, their gradients too
  (``dprior_gate`` has no bias term: the bias is already in it).

``kv`` and ``gate`` must share one dtype (float32, bfloat16, float16); ``position_bias`` and ``prior_gate`` may be any
of those (float32 in V4); ``prior_kv`` is cast to ``kv.dtype`` as the reference does. The output is ``kv.dtype``.
Unlike the reference, the weights are not rounded to ``kv.dtype`` before the weighted sum, which is float32.

`compressed_topk(scores, visible, topk)` is CSA's indexer top-k (eq. 17; `reference.compressor.compressed_topk`): the
hidden scores become -inf (torch), then DSA's top-k kernel (`kernels.triton.dsa._indexer_topk`, one program per
query) ranks all C entries of each row, and selected hidden entries become -1 (torch gather).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton.dsa import _indexer_topk
from kernels.triton.utils import cast, check, empty, interpreted

FLOATS = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _current(kv_ptr, gate_ptr, bias_ptr, row, r, d, mask, C, OFF):
    """Window ``row // m``'s slot tiles of the columns ``OFF + d``: ``(offsets, kv, gate + bias)``, float32; the gate
    is -inf outside ``mask``. ``row`` (int64): the flat index ``b * T + w * m`` of the window's first token."""
    off = (row + r[:, None]) * C + OFF + d[None, :]
    kv = tl.load(kv_ptr + off, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + off, mask=mask, other=float("-inf")).to(tl.float32)
    g += tl.load(bias_ptr + r[:, None] * C + OFF + d[None, :], mask=mask, other=0.0).to(tl.float32)
    return off, kv, g


@triton.jit
def _previous(kv_ptr, gate_ptr, bias_ptr, pkv_ptr, pgate_ptr, b, w, row, r, d, mask, C, D, M: tl.constexpr,
              HAS_PRIOR: tl.constexpr):
    """CSA: the first-half slots of window ``w - 1`` (columns ``d``), or for ``w == 0`` the prior rows (or no slot:
    gate -inf). Returns ``(offsets into kv, offsets into the prior, kv, gate)``, float32."""
    off = (row - M + r[:, None]) * C + d[None, :]
    tok = w * M + r[:, None]  # the token's index in its sequence (a tensor compare: the interpreter wants one)
    prev = mask & (tok >= M)
    kv = tl.load(kv_ptr + off, mask=prev, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + off, mask=prev, other=float("-inf")).to(tl.float32)
    g += tl.load(bias_ptr + r[:, None] * C + d[None, :], mask=prev, other=0.0).to(tl.float32)
    poff = (b * M + r[:, None]) * D + d[None, :]
    if HAS_PRIOR:
        first = mask & (tok < M)
        kv = tl.where(first, tl.load(pkv_ptr + poff, mask=first, other=0.0).to(tl.float32), kv)
        g = tl.where(first, tl.load(pgate_ptr + poff, mask=first, other=float("-inf")).to(tl.float32), g)
    return off, poff, kv, g


@triton.jit
def _gated_pool_fwd(kv_ptr, gate_ptr, bias_ptr, pkv_ptr, pgate_ptr, out_ptr, N, T, C, D, M: tl.constexpr,
                    OVERLAP: tl.constexpr, HAS_PRIOR: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """kv, gate (B, T, C); bias (M, C); prior rows (B, M, D) (unread without HAS_PRIOR); out (B, N, D)."""
    i = tl.program_id(0).to(tl.int64)
    b, w = i // N, i % N
    r = tl.arange(0, BLOCK_M)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = d < D
    mask = (r[:, None] < M) & dmask[None, :]
    row = b * T + w * M
    OFF: tl.constexpr = 1 if OVERLAP else 0
    _, kv_b, g_b = _current(kv_ptr, gate_ptr, bias_ptr, row, r, d, mask, C, OFF * D)
    mx = tl.max(g_b, axis=0)
    if OVERLAP:
        _, _, kv_a, g_a = _previous(kv_ptr, gate_ptr, bias_ptr, pkv_ptr, pgate_ptr, b, w, row, r, d, mask, C, D, M,
                                    HAS_PRIOR)
        mx = tl.maximum(mx, tl.max(g_a, axis=0))
    mx = tl.where(dmask, mx, 0.0)  # padded columns: no NaN
    p_b = tl.exp(g_b - mx[None, :])
    s = tl.sum(p_b, axis=0)
    acc = tl.sum(p_b * kv_b, axis=0)
    if OVERLAP:
        p_a = tl.exp(g_a - mx[None, :])
        s += tl.sum(p_a, axis=0)
        acc += tl.sum(p_a * kv_a, axis=0)
    out = acc / tl.where(dmask, s, 1.0)
    tl.store(out_ptr + i * D + d, cast(out, out_ptr.dtype.element_ty), mask=dmask)


@triton.jit
def _gated_pool_bwd(kv_ptr, gate_ptr, bias_ptr, pkv_ptr, pgate_ptr, dy_ptr, dkv_ptr, dgate_ptr, dpkv_ptr, dpgate_ptr,
                    dbias_ptr, N, T, C, D, BN, M: tl.constexpr, OVERLAP: tl.constexpr, HAS_PRIOR: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program p: windows p, p + P, ... of the B * N; dy (B, N, D); dkv, dgate (B, T, C); dprior rows (B, M, D);
    dbias (P, M, C) float32 partial sums."""
    pid = tl.program_id(0)
    r = tl.arange(0, BLOCK_M)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = d < D
    mask = (r[:, None] < M) & dmask[None, :]
    OFF: tl.constexpr = 1 if OVERLAP else 0
    db_b = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    db_a = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for j in range(pid, BN, tl.num_programs(0)):
        i = tl.cast(j, tl.int64)
        b, w = i // N, i % N
        row = b * T + w * M
        off_b, kv_b, g_b = _current(kv_ptr, gate_ptr, bias_ptr, row, r, d, mask, C, OFF * D)
        mx = tl.max(g_b, axis=0)
        if OVERLAP:
            off_a, poff, kv_a, g_a = _previous(kv_ptr, gate_ptr, bias_ptr, pkv_ptr, pgate_ptr, b, w, row, r, d, mask,
                                               C, D, M, HAS_PRIOR)
            mx = tl.maximum(mx, tl.max(g_a, axis=0))
        mx = tl.where(dmask, mx, 0.0)
        p_b = tl.exp(g_b - mx[None, :])
        s = tl.sum(p_b, axis=0)
        acc = tl.sum(p_b * kv_b, axis=0)
        if OVERLAP:
            p_a = tl.exp(g_a - mx[None, :])
            s += tl.sum(p_a, axis=0)
            acc += tl.sum(p_a * kv_a, axis=0)
        s = tl.where(dmask, s, 1.0)
        out = acc / s
        dy = tl.load(dy_ptr + i * D + d, mask=dmask, other=0.0).to(tl.float32) / s  # dy / sum: p_s dy = e_s dy'
        dkv = p_b * dy[None, :]
        dg = dkv * (kv_b - out[None, :])
        tl.store(dkv_ptr + off_b, cast(dkv, dkv_ptr.dtype.element_ty), mask=mask)
        tl.store(dgate_ptr + off_b, cast(dg, dgate_ptr.dtype.element_ty), mask=mask)
        db_b += tl.where(mask, dg, 0.0)
        if OVERLAP:
            dkv = p_a * dy[None, :]
            dg = dkv * (kv_a - out[None, :])
            tok = w * M + r[:, None]
            prev = mask & (tok >= M)
            tl.store(dkv_ptr + off_a, cast(dkv, dkv_ptr.dtype.element_ty), mask=prev)
            tl.store(dgate_ptr + off_a, cast(dg, dgate_ptr.dtype.element_ty), mask=prev)
            db_a += tl.where(prev, dg, 0.0)
            if HAS_PRIOR:
                first = mask & (tok < M)
                tl.store(dpkv_ptr + poff, cast(dkv, dpkv_ptr.dtype.element_ty), mask=first)
                tl.store(dpgate_ptr + poff, cast(dg, dpgate_ptr.dtype.element_ty), mask=first)
            last = mask & (tok >= (N - 1) * M)  # its first halves wait for the next call's first entry
            zero = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
            tl.store(dkv_ptr + off_b - D, cast(zero, dkv_ptr.dtype.element_ty), mask=last)
            tl.store(dgate_ptr + off_b - D, cast(zero, dgate_ptr.dtype.element_ty), mask=last)
    part = dbias_ptr + pid * M * C + r[:, None] * C + d[None, :]
    tl.store(part + OFF * D, db_b, mask=mask)
    if OVERLAP:
        tl.store(part, db_a, mask=mask)


def _check_inputs(kv, gate, position_bias, overlap, prior_kv, prior_gate) -> tuple[int, int, int, int, int, bool]:
    """``(B, T, C, m, D, has_prior)`` after checking every input (module docstring)."""
    check("kv", kv, ndim=3, dtypes=FLOATS)
    b, t, c = kv.shape
    check("gate", gate, dtypes=kv.dtype, shape=(b, t, c), device=kv.device)
    check("position_bias", position_bias, ndim=2, dtypes=FLOATS, shape=(None, c), device=kv.device)
    m = position_bias.shape[0]
    if m == 0 or t % m:
        raise ValueError(f"gated_pool: T={t} must be a multiple of m={m} (position_bias rows)")
    if overlap and c % 2:
        raise ValueError(f"gated_pool: overlap needs an even width C = 2 D, got C={c}")
    d = c // 2 if overlap else c
    has_prior = overlap and (prior_kv is not None or prior_gate is not None)
    if has_prior:
        if prior_kv is None or prior_gate is None:
            raise ValueError("gated_pool: prior_kv and prior_gate go together (both or neither)")
        check("prior_kv", prior_kv, dtypes=FLOATS, shape=(b, m, d), device=kv.device)
        check("prior_gate", prior_gate, dtypes=FLOATS, shape=(b, m, d), device=kv.device)
    return b, t, c, m, d, has_prior


def _blocks(m: int, d: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_D): the window's slots, and features so that a tile holds about 4096 elements."""
    block_m = triton.next_power_of_2(m)
    return block_m, min(triton.next_power_of_2(d), max(16, min(128, 4096 // block_m)))


def gated_pool_fwd(kv: torch.Tensor, gate: torch.Tensor, position_bias: torch.Tensor, overlap: bool,
                   prior_kv: torch.Tensor | None = None, prior_gate: torch.Tensor | None = None) -> torch.Tensor:
    """Launch the forward kernel: the op's arguments (`gated_pool`) -> (B, T / m, D) in ``kv.dtype``.

    Raises TypeError on a wrong dtype, ValueError on a wrong shape, device or layout, T not a multiple of m, an
    odd C with ``overlap``, or only one of the prior rows.
    """
    b, t, c, m, d, has_prior = _check_inputs(kv, gate, position_bias, overlap, prior_kv, prior_gate)
    n = t // m
    out = empty(b, n, d, dtype=kv.dtype, device=kv.device)
    if b * n * d == 0:
        return out
    pkv, pgate = (prior_kv.to(kv.dtype), prior_gate) if has_prior else (kv, gate)
    block_m, block_d = _blocks(m, d)
    _gated_pool_fwd[(b * n, triton.cdiv(d, block_d))](
        kv, gate, position_bias, pkv, pgate, out, n, t, c, d, M=m, OVERLAP=bool(overlap), HAS_PRIOR=has_prior,
        BLOCK_M=block_m, BLOCK_D=block_d)
    return out


def gated_pool_bwd(dy: torch.Tensor, kv: torch.Tensor, gate: torch.Tensor, position_bias: torch.Tensor,
                   overlap: bool, prior_kv: torch.Tensor | None = None, prior_gate: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, ...]:
    """Launch the backward kernel for the cotangent ``dy`` (B, T / m, D) of `gated_pool_fwd`'s output.

    Returns ``(dkv, dgate, dposition_bias, dprior_kv, dprior_gate)`` in the dtypes of their inputs (the last two
    None without prior rows); dposition_bias is summed in float32. Raises like `gated_pool_fwd`.
    """
    b, t, c, m, d, has_prior = _check_inputs(kv, gate, position_bias, overlap, prior_kv, prior_gate)
    n = t // m
    check("dy", dy, dtypes=kv.dtype, shape=(b, n, d), device=kv.device)
    dkv, dgate = empty(b, t, c, dtype=kv.dtype, device=kv.device), empty(b, t, c, dtype=kv.dtype, device=kv.device)
    dpkv = empty(b, m, d, dtype=kv.dtype, device=kv.device) if has_prior else None
    dpgate = empty(b, m, d, dtype=prior_gate.dtype, device=kv.device) if has_prior else None
    if b * n * d == 0:
        return (dkv, dgate, torch.zeros_like(position_bias), None if dpkv is None else dpkv.zero_().to(prior_kv.dtype),
                None if dpgate is None else dpgate.zero_())
    block_m, block_d = _blocks(m, d)
    blocks = triton.cdiv(d, block_d)
    sms = torch.cuda.get_device_properties(kv.device).multi_processor_count if kv.device.type == "cuda" else 1
    programs = max(1, min(b * n, 4 * sms // blocks))
    dbias = empty(programs, m, c, dtype=torch.float32, device=kv.device)
    pkv, pgate = (prior_kv.to(kv.dtype), prior_gate) if has_prior else (kv, gate)
    _gated_pool_bwd[(programs, blocks)](
        kv, gate, position_bias, pkv, pgate, dy, dkv, dgate, dpkv if has_prior else dkv,
        dpgate if has_prior else dgate, dbias, n, t, c, d, b * n, M=m, OVERLAP=bool(overlap), HAS_PRIOR=has_prior,
        BLOCK_M=block_m, BLOCK_D=block_d)
    return (dkv, dgate, dbias.sum(0).to(position_bias.dtype), None if dpkv is None else dpkv.to(prior_kv.dtype),
            dpgate)


class GatedPoolFunction(torch.autograd.Function):
    """Autograd wrapper: saves the inputs (the backward recomputes the weights); gradients for kv, gate,
    position_bias and the prior rows."""

    @staticmethod
    def forward(ctx, kv, gate, position_bias, overlap, prior_kv, prior_gate):
        ctx.overlap = overlap
        ctx.save_for_backward(kv, gate, position_bias, prior_kv, prior_gate)
        return gated_pool_fwd(kv, gate, position_bias, overlap, prior_kv, prior_gate)

    @staticmethod
    def backward(ctx, dy):
        kv, gate, position_bias, prior_kv, prior_gate = ctx.saved_tensors
        grads = gated_pool_bwd(dy.contiguous(), kv, gate, position_bias, ctx.overlap, prior_kv, prior_gate)
        return (*grads[:3], None, *grads[3:])


def gated_pool(kv: torch.Tensor, gate: torch.Tensor, position_bias: torch.Tensor, overlap: bool,
               prior_kv: torch.Tensor | None = None, prior_gate: torch.Tensor | None = None) -> torch.Tensor:
    """Differentiable compressor pooling, as `reference.compressor.gated_pool`: (B, T / m, D) in ``kv.dtype``.

    ``kv``, ``gate`` (B, T, C) contiguous, one dtype (float32/bfloat16/float16); ``position_bias`` (m, C) (float32
    in V4); ``overlap``: CSA (C = 2 D, 2 m slots per entry) or HCA (C = D); ``prior_kv``, ``prior_gate`` (B, m, D):
    the previous call's last window (CSA only, ignored for HCA as by the reference). Gradients flow to kv, gate,
    position_bias and the prior rows. Raises TypeError / ValueError on bad inputs (`gated_pool_fwd`); CPU tensors
    are accepted only under ``TRITON_INTERPRET=1``.
    """
    return GatedPoolFunction.apply(kv, gate, position_bias, bool(overlap), prior_kv, prior_gate)


def compressed_topk(scores: torch.Tensor, visible: torch.Tensor, topk: int) -> torch.Tensor:
    """CSA's top-k of the indexer scores, as `reference.compressor.compressed_topk` (V4 report eq. 17): int64
    (B, S, k) entry indices, ``k = min(topk, C)``, best first, -1 for slots a query cannot fill.

    ``scores`` (B, S, C) float32 (any strides); ``visible`` (S, C) or (B, S, C) bool on the same device
    (`reference.compressor.visible_entries`). The hidden scores become -inf and DSA's top-k kernel ranks every entry
    of each row (ties to the lower index, -0.0 equal to 0.0, NaN above every number: a stable descending sort), then
    a selected hidden entry becomes -1. So the indices equal the reference's, also where a visible -inf score ties
    with hidden entries (the lower index first). Work is O(C log^2 k) per query whatever the mask. Empty inputs
    (C = 0 before the first window closes) give an empty result. Raises ``TypeError`` for a dtype other than
    float32 scores / bool mask, ``ValueError`` for wrong shapes, ``topk < 1``, a device mismatch or a CPU tensor
    outside the interpreter.
    """
    check("scores", scores, ndim=3, dtypes=torch.float32, contiguous=False)
    b, s, c = scores.shape
    check("visible", visible, dtypes=torch.bool, shape=(s, c) if getattr(visible, "ndim", 0) == 2 else (b, s, c),
          device=scores.device, contiguous=False)
    if topk < 1:
        raise ValueError(f"compressed_topk: topk must be at least 1, got {topk}")
    nk = min(topk, c)
    out = empty(b, s, nk, dtype=torch.int64, device=scores.device)
    if out.numel() == 0:
        return out
    masked = scores.masked_fill(~visible, float("-inf")).contiguous()
    k_p = max(2, triton.next_power_of_2(nk))  # as `kernels.triton.dsa.indexer_topk`
    chunk, warps = (max(k_p, 16), 1) if interpreted() else (max(k_p, 1024), 8)
    _indexer_topk[(s, b)](masked, out, s, c, nk, c, K_P=k_p, CHUNK=chunk, num_warps=warps)  # offset C: all visible
    return out.masked_fill_(~torch.gather(visible.expand(b, s, c), -1, out), -1)


__all__ = ["gated_pool", "gated_pool_fwd", "gated_pool_bwd", "GatedPoolFunction", "compressed_topk"]
