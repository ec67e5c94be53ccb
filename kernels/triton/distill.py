"""Knowledge distillation fused with both LM heads, over chunks of tokens, in Triton: the generalized
Jensen-Shannon divergence of GKD (Agarwal et al. 2024, "On-Policy Distillation of Language Models", eq. 1) plus the
hard cross-entropy, in the convention of TRL's ``GKDTrainer.generalized_jsd_loss`` and Liger-Kernel's
``LigerFusedLinearJSDLoss`` (``chunked_loss/jsd_loss.py``; its Triton JSD, ``ops/jsd.py``): logits divided by the
temperature, no ``temperature**2`` factor, each token's divergence summed over the vocabulary, means over the
non-ignored tokens; reference: `reference.distill.distill`.

For each chunk of tokens: student logits ``z = h_s @ W_s.T`` and teacher logits ``u = h_t @ W_t.T`` (under
``no_grad``) as float32 (torch matmuls; half inputs multiply in their dtype with a float32 result on CUDA, so the
logits are not rounded to bfloat16: a reverse KL at temperature 0.5 on bfloat16-rounded logits is 2e-2 off in its
gradient, over the bound); then one Triton program per token (per several tokens when V <= 1024, up to 16 when
V <= 128) reads both rows in float32 in three passes over blocks of ``BLOCK_V`` <= 2048 columns:

1. online max and sums: ``lse(z)`` (the hard loss), ``lse(z / T)`` (one running max serves both, T > 0) and
   ``lse(u / T)``; and the student's most likely token k;
2. with ``s = log p_s = z / T - lse(z / T)``, ``t = log p_t = u / T - lse(u / T)``: the per-token soft loss
   ``beta == 0``: ``sum p_t (t - s)`` = KL(p_t || p_s); ``beta == 1``: ``sum p_s (s - t)`` = KL(p_s || p_t); else,
   with ``log m = logaddexp(log beta + t, log(1 - beta) + s)``: ``sum beta p_t (t - log m) + (1 - beta) p_s
   (s - log m)``; and ``c = sum_j a_j`` of ``a = p_s (g - g_k)`` with ``g = dL/dp_s`` up to a constant (``s - t``;
   ``(1 - beta) (s - log m)``; at beta 0, ``a = -p_t``). Taking g relative to its value at k keeps ``a_k = 0`` exact:
   with near one-hot p_s and ``|s - t|`` in the hundreds (logits of std 200), ``p_s (g - sum p_s g)`` would lose the
   gradient's largest element to float32 cancellation. A term whose probability is 0 (a -inf logit, a padded column)
   is 0: operands are selected before the arithmetic, so no -inf - -inf or 0 * inf is formed (a truly infinite
   divergence, a -inf student logit where the teacher's is finite at beta 0, stays inf). The hard loss ``lse(z) -
   z[target]``;
3. (when gradients are asked for) it writes ``d/dz = soft_scale * (a - p_s c) / T + hard_scale * (softmax(z) -
   onehot(target))``, 0 at ignored tokens, over the float32 student logits (float32 inputs) or into a
   (chunk, V) buffer of the student's dtype, reused across chunks (half inputs: the tensor cores' operand).

Then ``d_hidden_chunk = grad @ W_s`` and ``d_weight += grad.T @ h_s`` (float32 across chunks). ``soft_scale`` and
``hard_scale`` are device scalars (no host sync): ``weight_soft_loss / n`` and ``weight_hard_loss / n`` with n the
number of non-ignored tokens (at least 1).

Gradients of the three scalar outputs: the forward computes the gradients of ``loss`` and the backward scales them
by the incoming scalar when ``loss`` is the only output that gets one (the usual case: soft_loss and hard_loss are
logged); when ``soft_loss`` or ``hard_loss`` gets a cotangent too, the backward runs the chunked pass again with
``soft_scale = (g_loss * weight_soft_loss + g_soft) / n`` and ``hard_scale = (g_loss * weight_hard_loss + g_hard) / n``
folded in, instead of holding a second pair of (N, Hs) + (V, Hs) gradients (and twice the gradient matmuls) in every
step. So the autograd function keeps its inputs (teacher_hidden included) until the backward.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels.triton.cross_entropy import FLOATS, default_chunk_size
from kernels.triton.utils import cast, check, empty
from reference.distill import _number  # the reference's checks of beta, temperature and the loss weights

MAX_BLOCK_V = 2048
"""Widest block of the vocabulary a program reads at once (BLOCK_N * BLOCK_V <= 2048 elements): two float32 tiles
(student and teacher) and their temporaries live at once, twice the cross-entropy kernel's, so half its width.
Compiled for sm_90 with triton 3.9 (4 warps, `bench.triton_compile`'s stand-in driver, ptxas -v): 56-126 registers,
no spills, for every beta mode, float32 and bfloat16, V = 300 and 129,280."""


@triton.jit
def _online(m, d, x):
    """One step of an online logsumexp over the last axis: (max, sum of exp(x - max)) with block ``x`` added.
    A row whose values so far are all -inf keeps m = -inf and d = 0 (its shift is taken as 0, never -inf - -inf)."""
    m_new = tl.maximum(m, tl.max(x, axis=1))
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    return m_new, d * tl.exp(m - shift) + tl.sum(tl.exp(x - shift[:, None]), axis=1)


@triton.jit
def _grad_q(s, t, q, p, log_beta, log_1m_beta, beta, MODE: tl.constexpr):
    """``(g, log m)`` for student log-probs s and teacher log-probs t (q = exp(s), p = exp(t)): g is ``dL/dp_s`` up to
    a constant where q > 0 (MODE 1: ``s - t``; MODE 2: ``(1 - beta) (s - log m)``; MODE 0 needs none) and 0 where
    q == 0; ``log m`` (MODE 2; t otherwise) where p > 0, 0 elsewhere. Operands are selected before the arithmetic,
    so no -inf - -inf or 0 * inf is ever formed (no NaN, not even in a discarded lane)."""
    on_q = q > 0
    s_q = tl.where(on_q, s, 0.0)
    if MODE == 2:
        bt = log_beta + t
        bs = log_1m_beta + s
        hi = tl.maximum(bt, bs)
        none = hi == float("-inf")  # p == q == 0 (a padded column, -inf in both models)
        hi = tl.where(none, 0.0, hi)
        log_m = hi + tl.log(tl.where(none, 1.0, tl.exp(bt - hi) + tl.exp(bs - hi)))
        g = (1.0 - beta) * (s_q - tl.where(on_q, log_m, 0.0))
        return g, tl.where(p > 0, log_m, 0.0)
    elif MODE == 1:
        return s_q - tl.where(on_q, t, 0.0), t
    else:
        return tl.zeros_like(s), t


@triton.jit
def _jsd_terms(s, t, r, log_beta, log_1m_beta, beta, MODE: tl.constexpr):
    """Per column: (the generalized JSD's term, ``a = p_s (dL/dp_s - r)``) for student log-probs s and teacher
    log-probs t, and r (per row) the value of ``dL/dp_s`` at the student's most likely token, so that ``a`` and
    ``c = sum(a)`` stay small where p_s is near one-hot (MODE 0 takes ``a = -p_t``). A term whose probability is
    0 is 0 (a truly infinite divergence stays inf). MODE 0: beta == 0 (forward KL), 1: beta == 1 (reverse KL),
    2: 0 < beta < 1."""
    q = tl.exp(s)
    p = tl.exp(t)
    on_p = p > 0
    if MODE == 0:
        loss = p * (tl.where(on_p, t, 0.0) - tl.where(on_p, s, 0.0))
        a = -p
    else:
        g, log_m = _grad_q(s, t, q, p, log_beta, log_1m_beta, beta, MODE)
        a = q * (g - r[:, None])
        loss = q * g  # MODE 1: p_s (s - t); MODE 2: (1 - beta) p_s (s - log m)
        if MODE == 2:
            loss += beta * p * (tl.where(on_p, t, 0.0) - log_m)
    return loss, a


@triton.jit
def _distill_kernel(z_ptr, u_ptr, grad_ptr, targets_ptr, scales_ptr, soft_ptr, hard_ptr, n, V, ignore_index,
                    inv_temp, beta, log_beta, log_1m_beta, MODE: tl.constexpr, WRITE_GRAD: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    """BLOCK_N tokens per program. z (n, V) student logits and u (n, V) teacher logits, row-major, float32 (or the
    inputs' dtype); grad (n, V) row-major, d(loss)/dz when WRITE_GRAD (may be z itself: each element is read before
    its own program overwrites it); targets (n,) int64; scales (2,) float32: the soft and the hard loss's factor of
    the gradient; soft, hard (n,) float32 per-token losses, 0 at ignored tokens. Rows past n repeat row n - 1 (loads
    only; their stores are masked off)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    live = rows < n
    rows = tl.minimum(rows, n - 1)
    zp = z_ptr + rows[:, None] * V
    up = u_ptr + rows[:, None] * V
    cols = tl.arange(0, BLOCK_V)[None, :]
    m_z = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    d_z = tl.zeros((BLOCK_N,), tl.float32)
    d_x = tl.zeros((BLOCK_N,), tl.float32)
    m_y = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    d_y = tl.zeros((BLOCK_N,), tl.float32)
    k = tl.zeros((BLOCK_N,), tl.int32)  # the student's most likely token
    for start in range(0, V, BLOCK_V):  # pass 1: lse(z), lse(z / T), lse(u / T), argmax(z)
        mask = start + cols < V
        z = tl.load(zp + start + cols, mask=mask, other=float("-inf")).to(tl.float32)
        y = tl.load(up + start + cols, mask=mask, other=float("-inf")).to(tl.float32) * inv_temp
        z_max = tl.max(z, axis=1)
        k = tl.where(z_max > m_z, start + tl.argmax(z, axis=1), k)
        m_new = tl.maximum(m_z, z_max)
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        d_z = d_z * tl.exp(m_z - shift) + tl.sum(tl.exp(z - shift[:, None]), axis=1)
        d_x = d_x * tl.exp((m_z - shift) * inv_temp) + tl.sum(tl.exp((z - shift[:, None]) * inv_temp), axis=1)
        m_z = m_new
        m_y, d_y = _online(m_y, d_y, y)
    lse_z = m_z + tl.log(d_z)
    lse_x = m_z * inv_temp + tl.log(d_x)
    lse_y = m_y + tl.log(d_y)
    s_k = m_z * inv_temp - lse_x
    t_k = tl.load(u_ptr + rows * V + k).to(tl.float32) * inv_temp - lse_y
    r = _grad_q(s_k, t_k, tl.exp(s_k), tl.exp(t_k), log_beta, log_1m_beta, beta, MODE)[0]
    soft = tl.zeros((BLOCK_N,), tl.float32)
    c = tl.zeros((BLOCK_N,), tl.float32)
    for start in range(0, V, BLOCK_V):  # pass 2: the soft loss and c = sum(a)
        mask = start + cols < V
        z = tl.load(zp + start + cols, mask=mask, other=float("-inf")).to(tl.float32)
        y = tl.load(up + start + cols, mask=mask, other=float("-inf")).to(tl.float32)
        loss, a = _jsd_terms(z * inv_temp - lse_x[:, None], y * inv_temp - lse_y[:, None], r, log_beta,
                             log_1m_beta, beta, MODE)
        soft += tl.sum(loss, axis=1)
        c += tl.sum(a, axis=1)
    target = tl.load(targets_ptr + rows)
    valid = target != ignore_index
    z_t = tl.load(z_ptr + rows * V + tl.where(valid, target, 0)).to(tl.float32)
    tl.store(soft_ptr + rows, tl.where(valid, soft, 0.0), mask=live)
    tl.store(hard_ptr + rows, tl.where(valid, lse_z - z_t, 0.0), mask=live)
    if WRITE_GRAD:
        soft_scale = tl.load(scales_ptr) * inv_temp
        hard_scale = tl.load(scales_ptr + 1)
        gp = grad_ptr + rows[:, None] * V
        for start in range(0, V, BLOCK_V):  # pass 3: d(loss)/dz = soft_scale (a - p_s c) + hard_scale (softmax - 1)
            mask = start + cols < V
            z = tl.load(zp + start + cols, mask=mask, other=float("-inf")).to(tl.float32)
            y = tl.load(up + start + cols, mask=mask, other=float("-inf")).to(tl.float32)
            s = z * inv_temp - lse_x[:, None]
            a = _jsd_terms(s, y * inv_temp - lse_y[:, None], r, log_beta, log_1m_beta, beta, MODE)[1]
            g = (a - tl.exp(s) * c[:, None]) * soft_scale
            g += (tl.exp(z - lse_z[:, None]) - tl.where(start + cols == target[:, None], 1.0, 0.0)) * hard_scale
            g = tl.where(valid[:, None], g, 0.0)
            tl.store(gp + start + cols, cast(g, grad_ptr.dtype.element_ty), mask=live[:, None] & mask)


_MM_OUT_DTYPE = True
"""Whether ``torch.mm(..., out_dtype=torch.float32)`` works on CUDA here (it has no CPU kernel); set to False at the
first failure."""


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` as float32. Half inputs multiply in their dtype with a float32 result on CUDA (``out_dtype``: the
    tensor cores' float32 accumulator, not rounded to half), else are upcast first (CPU, older torch)."""
    global _MM_OUT_DTYPE
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        return a @ b
    if a.is_cuda and _MM_OUT_DTYPE and a.dtype == b.dtype:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):
            _MM_OUT_DTYPE = False
    return a.float() @ b.float()


def _beta_mode(beta: float) -> int:
    return 0 if beta == 0 else 1 if beta == 1 else 2


def _check_inputs(student_hidden, student_weight, teacher_hidden, teacher_weight, targets, beta, temperature):
    check("student_hidden", student_hidden, ndim=2, dtypes=FLOATS)
    N, device = student_hidden.shape[0], student_hidden.device
    check("student_weight", student_weight, ndim=2, dtypes=student_hidden.dtype,
          shape=(None, student_hidden.shape[1]), device=device)
    V = student_weight.shape[0]
    check("teacher_hidden", teacher_hidden, ndim=2, dtypes=FLOATS, shape=(N, None), device=device)
    check("teacher_weight", teacher_weight, ndim=2, dtypes=teacher_hidden.dtype,
          shape=(V, teacher_hidden.shape[1]), device=device)
    check("targets", targets, dtypes=torch.int64, shape=(N,), device=device)
    if V == 0:
        raise ValueError("student_weight: expected V >= 1 rows (the vocabulary)")
    _number("beta", beta, 0.0, 1.0)
    _number("temperature", temperature, 0.0, low_open=True)


def _launch(z, u, grad, targets, scales, soft, hard, beta, temperature, ignore_index, write_grad):
    """One launch of `_distill_kernel` over the rows of z (float tensors checked by the caller)."""
    n, V = z.shape
    block_v = min(triton.next_power_of_2(V), MAX_BLOCK_V)
    block_n = max(1, min(16, MAX_BLOCK_V // block_v))  # several tokens per program when V is small
    beta = float(beta)
    log_beta = math.log(beta) if beta > 0 else 0.0  # used only when 0 < beta < 1
    log_1m_beta = math.log1p(-beta) if beta < 1 else 0.0
    _distill_kernel[(triton.cdiv(n, block_n),)](z, u, grad, targets, scales, soft, hard, n, V, ignore_index,
                                                1.0 / temperature, beta, log_beta, log_1m_beta, MODE=_beta_mode(beta),
                                                WRITE_GRAD=write_grad, BLOCK_N=block_n, BLOCK_V=block_v)


def distill_logits(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                   scales: torch.Tensor, beta: float = 0.5, temperature: float = 1.0, ignore_index: int = -100,
                   grad: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The kernel on logits already formed (no head): per-token losses and the gradient of
    ``sum(scales[0] * soft + scales[1] * hard)`` with respect to the student's logits.

    student_logits, teacher_logits (n, V) float, contiguous (any of float32/bf16/fp16 each; -inf allowed);
    targets (n,) int64 in [0, V) or ``ignore_index``; scales (2,) float32. Returns ``(soft, hard, grad)``: soft,
    hard (n,) float32 (0 at ignored tokens), grad (n, V) float32 or None. Raises TypeError / ValueError on bad
    inputs (not on out-of-range targets: `chunked_distill` checks those).
    """
    check("student_logits", student_logits, ndim=2, dtypes=FLOATS)
    n, V = student_logits.shape
    device = student_logits.device
    check("teacher_logits", teacher_logits, dtypes=FLOATS, shape=(n, V), device=device)
    check("targets", targets, dtypes=torch.int64, shape=(n,), device=device)
    check("scales", scales, dtypes=torch.float32, shape=(2,), device=device)
    _number("beta", beta, 0.0, 1.0)
    _number("temperature", temperature, 0.0, low_open=True)
    soft = empty(n, dtype=torch.float32, device=device)
    hard = empty(n, dtype=torch.float32, device=device)
    g = empty(n, V, dtype=torch.float32, device=device) if grad else student_logits
    if n:
        _launch(student_logits, teacher_logits, g, targets, scales, soft, hard, beta, temperature, ignore_index, grad)
    return soft, hard, (g if grad else None)


def chunked_distill(student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher_hidden: torch.Tensor,
                    teacher_weight: torch.Tensor, targets: torch.Tensor, scales: torch.Tensor, beta: float = 0.5,
                    temperature: float = 1.0, ignore_index: int = -100, chunk_size: int | None = None,
                    grad_hidden: bool = True, grad_weight: bool = True):
    """The chunked pass: per-token soft and hard losses and, if asked, the gradients of
    ``sum(scales[0] * soft + scales[1] * hard)`` with respect to the student's hidden states and head.

    student_hidden (N, Hs), student_weight (V, Hs): one float dtype; teacher_hidden (N, Ht), teacher_weight (V, Ht):
    one float dtype (may differ from the student's); all contiguous. targets (N,) int64 in [0, V) or
    ``ignore_index``; scales (2,) float32 on the same device; beta in [0, 1]; temperature > 0. Returns ``(soft,
    hard, d_hidden, d_weight)``: soft, hard (N,) float32 (0 at ignored tokens), d_hidden (N, Hs) in the student's
    dtype, d_weight (V, Hs) float32, each gradient None when not asked for. Raises TypeError on a wrong dtype,
    ValueError on a wrong shape, device, layout, beta, temperature, chunk_size or an out-of-range target (that
    check reads the targets on the host).
    """
    _check_inputs(student_hidden, student_weight, teacher_hidden, teacher_weight, targets, beta, temperature)
    (N, H), V, device = student_hidden.shape, student_weight.shape[0], student_hidden.device
    check("scales", scales, dtypes=torch.float32, shape=(2,), device=device)
    chunk = default_chunk_size(N, V, H) if chunk_size is None else chunk_size
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= V))
    if bad.any():
        raise ValueError(f"targets: expected values in [0, {V}) or ignore_index={ignore_index}, "
                         f"got {targets[bad][0].item()}")
    soft = empty(N, dtype=torch.float32, device=device)
    hard = empty(N, dtype=torch.float32, device=device)
    d_hidden = empty(N, H, dtype=student_hidden.dtype, device=device) if grad_hidden else None
    d_weight = torch.zeros(V, H, dtype=torch.float32, device=device) if grad_weight else None
    grad_buf = None
    if (grad_hidden or grad_weight) and student_hidden.dtype != torch.float32:
        grad_buf = torch.empty(min(chunk, N), V, dtype=student_hidden.dtype, device=device)
    with torch.autocast(device.type, enabled=False):
        for s in range(0, N, chunk):
            e = min(s + chunk, N)
            h = student_hidden[s:e]
            z = _mm_fp32(h, student_weight.T)  # fresh (e - s, V) float32 buffers
            with torch.no_grad():
                u = _mm_fp32(teacher_hidden[s:e], teacher_weight.T)
            g = z if grad_buf is None else grad_buf[:e - s]  # float32 inputs: the gradient overwrites the logits
            _launch(z, u, g, targets[s:e], scales, soft[s:e], hard[s:e], beta, temperature, ignore_index,
                    grad_hidden or grad_weight)
            if grad_hidden:
                d_hidden[s:e] = g @ student_weight
            if grad_weight:
                d_weight += _mm_fp32(g.T, h)
    return soft, hard, d_hidden, d_weight


def _scales(g_loss, g_soft, g_hard, weight_soft_loss, weight_hard_loss, denom):
    """(2,) float32 on denom's device: d(sum of cotangent * output)/d(sum of per-token soft losses) and the same for
    the hard losses, for the three outputs' cotangents (None counts as 0)."""
    zero = torch.zeros((), dtype=torch.float32, device=denom.device)
    g_loss, g_soft, g_hard = (zero if g is None else g.float() for g in (g_loss, g_soft, g_hard))
    return (torch.stack([g_loss * weight_soft_loss + g_soft, g_loss * weight_hard_loss + g_hard]) / denom).contiguous()


class DistillFunction(torch.autograd.Function):
    """Autograd wrapper; see the module docstring for which gradients are computed in the forward and when the
    backward recomputes."""

    @staticmethod
    def forward(ctx, student_hidden, student_weight, teacher_hidden, teacher_weight, targets, beta, temperature,
                weight_hard_loss, weight_soft_loss, ignore_index, chunk_size, grad_enabled):
        ctx.set_materialize_grads(False)
        _check_inputs(student_hidden, student_weight, teacher_hidden, teacher_weight, targets, beta, temperature)
        _number("weight_hard_loss", weight_hard_loss)
        _number("weight_soft_loss", weight_soft_loss)
        need_h, need_w = grad_enabled and ctx.needs_input_grad[0], grad_enabled and ctx.needs_input_grad[1]
        denom = (targets != ignore_index).sum().clamp(min=1).float()
        scales = _scales(torch.ones((), device=denom.device), None, None, weight_soft_loss, weight_hard_loss, denom)
        soft, hard, dh, dw = chunked_distill(student_hidden, student_weight, teacher_hidden, teacher_weight, targets,
                                             scales, beta, temperature, ignore_index, chunk_size, need_h, need_w)
        soft_loss, hard_loss = soft.sum() / denom, hard.sum() / denom
        loss = weight_hard_loss * hard_loss + weight_soft_loss * soft_loss
        ctx.args = (beta, temperature, weight_hard_loss, weight_soft_loss, ignore_index, chunk_size)
        ctx.dtypes = (student_hidden.dtype, student_weight.dtype)
        if need_h or need_w:
            ctx.save_for_backward(dh, dw, student_hidden, student_weight, teacher_hidden, teacher_weight, targets,
                                  denom)
        return loss, soft_loss, hard_loss

    @staticmethod
    @torch.autograd.function.once_differentiable  # the saved gradients are constants: no double backward
    def backward(ctx, g_loss, g_soft, g_hard):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        none = (None,) * 10
        if not (need_h or need_w) or (g_loss is None and g_soft is None and g_hard is None):
            return None, None, *none
        dh, dw, sh, sw, th, tw, targets, denom = ctx.saved_tensors
        beta, temperature, weight_hard_loss, weight_soft_loss, ignore_index, chunk_size = ctx.args
        if g_soft is None and g_hard is None:  # only the loss: scale the gradients of the forward
            g = g_loss.float()
            dh = None if dh is None else dh * g  # out of place: the saved gradients stay as they are
            dw = None if dw is None else dw * g
        else:  # soft_loss or hard_loss has a cotangent: run the pass again with all three folded in
            scales = _scales(g_loss, g_soft, g_hard, weight_soft_loss, weight_hard_loss, denom)
            _, _, dh, dw = chunked_distill(sh, sw, th, tw, targets, scales, beta, temperature, ignore_index,
                                           chunk_size, need_h, need_w)
        dh = None if dh is None or not need_h else dh.to(ctx.dtypes[0])
        dw = None if dw is None or not need_w else dw.to(ctx.dtypes[1])
        return dh, dw, *none


def distill(student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher_hidden: torch.Tensor,
            teacher_weight: torch.Tensor, targets: torch.Tensor, beta: float = 0.5, temperature: float = 1.0,
            weight_hard_loss: float = 0.5, weight_soft_loss: float = 0.5, ignore_index: int = -100,
            chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Differentiable distillation loss of a student against a teacher, both LM heads fused and chunked.

    student_hidden (N, Hs) float32/bf16/fp16 and student_weight (V, Hs) of its dtype; teacher_hidden (N, Ht) and
    teacher_weight (V, Ht) float, one dtype; all contiguous; targets (N,) int64 in [0, V) or ``ignore_index``.
    ``beta`` in [0, 1] (0: KL(p_t || p_s), 1: KL(p_s || p_t), else the generalized JSD), ``temperature`` > 0
    divides both heads' logits for the soft loss; the hard loss is the cross-entropy of the unscaled student logits.
    Returns ``(loss, soft_loss, hard_loss)``, float32 scalars: the soft and hard losses are means over the
    non-ignored tokens (0 when there are none) and ``loss = weight_hard_loss * hard_loss + weight_soft_loss *
    soft_loss``. Gradients of all three flow to student_hidden and student_weight (in their dtypes), none to the
    teacher. Raises TypeError / ValueError on bad inputs (see `chunked_distill`).
    """
    return DistillFunction.apply(student_hidden, student_weight, teacher_hidden, teacher_weight, targets, beta,
                                 temperature, weight_hard_loss, weight_soft_loss, ignore_index, chunk_size,
                                 torch.is_grad_enabled())


__all__ = ["distill", "chunked_distill", "distill_logits", "DistillFunction", "MAX_BLOCK_V"]
