"""GRPO's policy loss fused with the LM head, over chunks of tokens, in Triton; reference: `reference.grpo.grpo` and
`reference.grpo.token_logps` (the formulas, clamps and metrics: `reference.grpo`'s module docstring).

The heavy part is each completion token's log-probability and entropy under the head at the sampling temperature,
``x = h @ W.T / temperature``, ``logp = log_softmax(x)[target]``, ``entropy = -sum softmax(x) log_softmax(x)``. For
each chunk of tokens the (chunk, V) logits ``z = h @ W.T`` are formed in float32 by a torch matmul (half inputs
multiply in their dtype with a float32 result on CUDA: `kernels.triton.distill._mm_fp32`), then one Triton program
per token (per up to 16 tokens when V <= 128) reads its row in float32 in two passes over blocks of ``BLOCK_V`` <=
2048 columns (`_logp_entropy_kernel`):

1. the row's largest ``x`` (``m``) and its column ``k`` (the first on ties);
2. ``rest = sum_{j != k} exp(x_j - m)`` and ``a = sum_{j != k} exp(x_j - m) (x_j - m)``, terms of probability 0
   (a -inf logit, a padded column) counting 0; then ``lse = m + log1p(rest)``, ``logp = (x_t - m) - log1p(rest)``
   and ``entropy = log1p(rest) - a / (1 + rest)``: the largest logit's own term (exactly 1) kept apart, so a peaked
   row keeps its entropy and the likeliest token's log-prob to float32's relative precision (``log1p`` as
   Goldberg's ``log(u) * rest / (u - 1)`` with ``u = 1 + rest``).

The (N*T, V) logits are never stored: a token keeps ``lse``. The backward gets the per-token cotangent ``g`` of the
log-probs (the entropy gets none: a metric) and runs the chunked pass again: ``z`` recomputed, `_logp_grad_kernel`
writes ``d/dz = g / temperature * (onehot(target) - exp(x - lse))``, 0 at ignored tokens, over the float32 logits
(float32 inputs) or into a (chunk, V) buffer of the inputs' dtype reused across chunks (half inputs: the tensor
cores' operand); then ``d_hidden_chunk = grad @ W`` and ``d_weight += grad.T @ h_chunk`` (float32 across chunks).
The loss on the (N, T) log-probs is `reference.grpo.grpo_loss` itself (a few elementwise torch operations and sums),
so its gradient reaches the log-probs through autograd, exactly as the reference's.

Names and definitions are TRL's ``GRPOTrainer``'s (``beta``, ``epsilon_low`` / ``epsilon_high``, ``loss_type``
grpo / bnpo / dr_grpo / dapo, its metrics), Liger-Kernel's ``LigerFusedLinearGRPOLoss`` is the fused peer; Shao et
al. 2024 (DeepSeekMath, GRPO), Yu et al. 2025 (DAPO), Liu et al. 2025 (Dr. GRPO).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton.cross_entropy import FLOATS, default_chunk_size
from kernels.triton.distill import _mm_fp32
from kernels.triton.utils import cast, check, empty
from reference.distill import _number
from reference.grpo import LOSS_TYPES, METRICS, _check_loss_args, _check_loss_inputs, _masked_mean, grpo_loss

MAX_BLOCK_V = 2048
"""Widest block of the vocabulary a program reads at once (BLOCK_N * BLOCK_V <= 2048 elements): the logits, their
shifted exponentials and the entropy's products live at once, so half the cross-entropy kernel's width (as
`kernels.triton.distill.MAX_BLOCK_V`)."""
_IGNORE = -100  # the target `grpo` gives the head at positions outside the completion mask


@triton.jit
def _log1p(t):
    """``log(1 + t)`` for ``t >= 0``, accurate for small t: ``log(u) * t / (u - 1)`` with ``u = 1 + t`` rounded
    (Goldberg 1991), ``t`` itself where ``u`` rounds to 1."""
    u = 1.0 + t
    return tl.where(u == 1.0, t, tl.log(u) * (t / tl.where(u == 1.0, 1.0, u - 1.0)))


@triton.jit
def _logp_entropy_kernel(z_ptr, targets_ptr, lse_ptr, logp_ptr, entropy_ptr, n, V, ignore_index, inv_temp,
                         BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    """BLOCK_N tokens per program. z (n, V) row-major logits (float32, before the temperature); targets (n,) int64;
    lse, logp, entropy (n,) float32 outputs (logp and entropy 0 at ignored tokens; lse of every row). Rows past n
    repeat row n - 1 (loads only; their stores are masked off)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    live = rows < n
    rows = tl.minimum(rows, n - 1)
    zp = z_ptr + rows[:, None] * V
    cols = tl.arange(0, BLOCK_V)[None, :]
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    k = tl.zeros((BLOCK_N,), tl.int64)
    for start in range(0, V, BLOCK_V):  # pass 1: the largest logit and its column
        x = tl.load(zp + start + cols, mask=start + cols < V, other=float("-inf")).to(tl.float32) * inv_temp
        x_max = tl.max(x, axis=1)
        k = tl.where(x_max > m, start + tl.argmax(x, axis=1).to(tl.int64), k)
        m = tl.maximum(m, x_max)
    rest = tl.zeros((BLOCK_N,), tl.float32)
    a = tl.zeros((BLOCK_N,), tl.float32)
    for start in range(0, V, BLOCK_V):  # pass 2: the other terms of the softmax sum and of the entropy
        idx = start + cols
        d = tl.load(zp + idx, mask=idx < V, other=float("-inf")).to(tl.float32) * inv_temp - m[:, None]
        e = tl.where(idx == k[:, None], 0.0, tl.exp(d))
        rest += tl.sum(e, axis=1)
        a += tl.sum(e * tl.where(e > 0, d, 0.0), axis=1)  # d selected first: no 0 * -inf, even in a discarded lane
    log_s = _log1p(rest)
    target = tl.load(targets_ptr + rows)
    valid = target != ignore_index
    x_t = tl.load(z_ptr + rows * V + tl.where(valid, target, 0)).to(tl.float32) * inv_temp
    tl.store(lse_ptr + rows, m + log_s, mask=live)
    tl.store(logp_ptr + rows, tl.where(valid, (x_t - m) - log_s, 0.0), mask=live)
    tl.store(entropy_ptr + rows, tl.where(valid, log_s - a / (1.0 + rest), 0.0), mask=live)


@triton.jit
def _logp_grad_kernel(z_ptr, grad_ptr, targets_ptr, lse_ptr, c_ptr, n, V, ignore_index, inv_temp,
                      BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    """BLOCK_N tokens per program. z (n, V) row-major logits (float32, before the temperature); grad (n, V)
    row-major, ``c * (onehot(target) - exp(z * inv_temp - lse))``, 0 at ignored tokens (may be z itself: each
    element is read before its own program overwrites it); targets (n,) int64; lse (n,) float32; c (n,) float32,
    the log-prob's cotangent divided by the temperature. Rows past n repeat row n - 1 (stores masked off)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    live = rows < n
    rows = tl.minimum(rows, n - 1)
    target = tl.load(targets_ptr + rows)
    c = tl.where(target != ignore_index, tl.load(c_ptr + rows), 0.0)[:, None]
    lse = tl.load(lse_ptr + rows)[:, None]
    cols = tl.arange(0, BLOCK_V)[None, :]
    for start in range(0, V, BLOCK_V):
        idx = start + cols
        mask = idx < V
        x = tl.load(z_ptr + rows[:, None] * V + idx, mask=mask, other=0.0).to(tl.float32) * inv_temp
        g = c * (tl.where(idx == target[:, None], 1.0, 0.0) - tl.exp(x - lse))
        tl.store(grad_ptr + rows[:, None] * V + idx, cast(g, grad_ptr.dtype.element_ty), mask=live[:, None] & mask)


def _blocks(V: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_V): several tokens per program when V is small."""
    block_v = min(triton.next_power_of_2(V), MAX_BLOCK_V)
    return max(1, min(16, MAX_BLOCK_V // block_v)), block_v


def _check_head(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> tuple[int, int]:
    """(N, T) after the checks of hidden (N, T, H) or (N*T, H), weight (V, H), targets (N, T) int64."""
    check("targets", targets, ndim=2, dtypes=torch.int64, contiguous=False)
    n, t = targets.shape
    device = targets.device
    if hidden.dim() == 3:
        check("hidden", hidden, dtypes=FLOATS, shape=(n, t, None), device=device, contiguous=False)
    else:
        check("hidden", hidden, dtypes=FLOATS, shape=(n * t, None), device=device, contiguous=False)
    check("weight", weight, ndim=2, dtypes=FLOATS, shape=(None, hidden.shape[-1]), device=device, contiguous=False)
    if n == 0 or t == 0 or weight.shape[0] == 0:
        raise ValueError(f"expected at least one sequence, one position and one vocabulary entry, got targets "
                         f"{tuple(targets.shape)} and weight {tuple(weight.shape)}")
    return n, t


def _chunk(chunk_size, n: int, v: int, h: int) -> int:
    chunk = default_chunk_size(n, v, h) if chunk_size is None else chunk_size
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    return chunk


def chunked_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                  ignore_index: int = -100, chunk_size: int | None = None):
    """The forward pass: ``(logps, entropy, lse)`` (N,) float32 of flattened tokens (module docstring).

    hidden (N, H) float32/bf16/fp16, weight (V, H) float (either dtype: the logits are float32), targets (N,) int64
    in [0, V) or ``ignore_index`` (logp and entropy 0 there). Raises TypeError on a wrong dtype, ValueError on a wrong
    shape, device, ``temperature``, ``chunk_size`` or an out-of-range target (that check reads the targets on the
    host)."""
    check("hidden", hidden, ndim=2, dtypes=FLOATS, contiguous=False)
    (N, H), device = hidden.shape, hidden.device
    check("weight", weight, ndim=2, dtypes=FLOATS, shape=(None, H), device=device, contiguous=False)
    check("targets", targets, dtypes=torch.int64, shape=(N,), device=device, contiguous=False)
    _number("temperature", temperature, 0.0, low_open=True)
    V = weight.shape[0]
    chunk = _chunk(chunk_size, N, V, H)
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= V))
    if bad.any():
        raise ValueError(f"targets: expected values in [0, {V}) or ignore_index={ignore_index}, "
                         f"got {targets[bad][0].item()}")
    targets = targets.contiguous()
    logps, entropy, lse = (empty(N, dtype=torch.float32, device=device) for _ in range(3))
    block_n, block_v = _blocks(V)
    with torch.autocast(device.type, enabled=False):
        for s in range(0, N, chunk):
            e = min(s + chunk, N)
            z = _mm_fp32(hidden[s:e], weight.T)  # fresh (e - s, V) float32 buffer
            _logp_entropy_kernel[(triton.cdiv(e - s, block_n),)](
                z, targets[s:e], lse[s:e], logps[s:e], entropy[s:e], e - s, V, ignore_index, 1.0 / temperature,
                BLOCK_N=block_n, BLOCK_V=block_v)
    return logps, entropy, lse


def chunked_logps_backward(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
                           grad_logps: torch.Tensor, temperature: float = 1.0, ignore_index: int = -100,
                           chunk_size: int | None = None, grad_hidden: bool = True, grad_weight: bool = True):
    """The backward pass: the gradients of ``sum(grad_logps * logps)`` with respect to hidden and weight, ``(d_hidden
    in hidden's dtype, d_weight float32)``, each None when not asked for. hidden, weight, targets as `chunked_logps`
    (already checked by it), lse (N,) float32 its output, grad_logps (N,) float."""
    (N, H), V, device = hidden.shape, weight.shape[0], hidden.device
    chunk = _chunk(chunk_size, N, V, H)
    c = (grad_logps.float() / temperature).contiguous()
    targets = targets.contiguous()
    d_hidden = empty(N, H, dtype=hidden.dtype, device=device) if grad_hidden else None
    d_weight = torch.zeros(V, H, dtype=torch.float32, device=device) if grad_weight else None
    half = hidden.dtype == weight.dtype and hidden.dtype != torch.float32
    grad_buf = torch.empty(min(chunk, N), V, dtype=hidden.dtype, device=device) if half else None
    block_n, block_v = _blocks(V)
    with torch.autocast(device.type, enabled=False):
        for s in range(0, N, chunk):
            e = min(s + chunk, N)
            h = hidden[s:e]
            z = _mm_fp32(h, weight.T)
            g = z if grad_buf is None else grad_buf[:e - s]  # float32: the gradient overwrites the logits
            _logp_grad_kernel[(triton.cdiv(e - s, block_n),)](
                z, g, targets[s:e], lse[s:e], c[s:e], e - s, V, ignore_index, 1.0 / temperature,
                BLOCK_N=block_n, BLOCK_V=block_v)
            if grad_hidden:
                d_hidden[s:e] = _mm_fp32(g, weight)
            if grad_weight:
                d_weight += _mm_fp32(g.T, h)
    return d_hidden, d_weight


class TokenLogpsFunction(torch.autograd.Function):
    """Autograd wrapper of `chunked_logps` on flattened tokens: ``(logps, entropy)``; the backward runs
    `chunked_logps_backward` with the log-probs' cotangent (the entropy is not differentiable)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, ignore_index, chunk_size):
        logps, entropy, lse = chunked_logps(hidden, weight, targets, temperature, ignore_index, chunk_size)
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.args = (temperature, ignore_index, chunk_size)
        ctx.mark_non_differentiable(entropy)
        return logps, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logps, grad_entropy):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_h or need_w):
            return None, None, None, None, None, None
        hidden, weight, targets, lse = ctx.saved_tensors
        dh, dw = chunked_logps_backward(hidden, weight, targets, lse, grad_logps, *ctx.args, grad_hidden=need_h,
                                        grad_weight=need_w)
        return dh, None if dw is None else dw.to(weight.dtype), None, None, None, None


def token_stats(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                ignore_index: int = -100, chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`token_logps` and each token's entropy (nats, at the temperature; 0 at ignored tokens, no gradient):
    ``(logps, entropy)``, (N, T) float32 each. Same arguments and errors as `token_logps`."""
    n, t = _check_head(hidden, weight, targets)
    logps, entropy = TokenLogpsFunction.apply(hidden.reshape(n * t, hidden.shape[-1]), weight, targets.reshape(-1),
                                              temperature, ignore_index, chunk_size)
    return logps.view(n, t), entropy.view(n, t)


def token_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                ignore_index: int = -100, chunk_size: int | None = None) -> torch.Tensor:
    """Per-token log-probability of the targets at a temperature, ``log_softmax(hidden @ weight.T / temperature)
    [targets]``, the head fused and chunked: the old and reference log-probs of `grpo`.

    hidden (N, T, H) or (N*T, H) float32/bf16/fp16; weight (V, H) float (its own dtype; the logits are float32);
    targets (N, T) int64 in [0, V) or ``ignore_index`` (0 there, no gradient), aligned with hidden. ``chunk_size``:
    tokens per chunk (default `kernels.triton.cross_entropy.default_chunk_size`). Returns (N, T) float32;
    differentiable in hidden and weight (gradients in their dtypes), though the trainer calls it under ``no_grad``.
    Raises TypeError on a wrong dtype, ValueError on a wrong shape or device, a ``temperature`` that is not positive
    and finite, a bad ``chunk_size`` or an out-of-range target.
    """
    return token_stats(hidden, weight, targets, temperature, ignore_index, chunk_size)[0]


def grpo(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, completion_mask: torch.Tensor,
         advantages: torch.Tensor, old_logps: torch.Tensor | None = None, ref_logps: torch.Tensor | None = None,
         beta: float = 0.0, epsilon_low: float = 0.2, epsilon_high: float = 0.2, temperature: float = 1.0,
         loss_type: str = "dapo", max_completion_length: int | None = None, chunk_size: int | None = None):
    """GRPO's loss of N completions, the head fused and chunked (TRL ``GRPOTrainer``): ``(loss, kl,
    clip_ratio/low_mean, clip_ratio/high_mean, clip_ratio/region_mean, entropy)``.

    hidden (N, T, H) or (N*T, H) float32/bf16/fp16; weight (V, H) float; targets (N, T) int64 (any value outside the
    mask); completion_mask (N, T) (nonzero: the token's loss counts); advantages (N,) float; old_logps, ref_logps
    (N, T) float or None (no gradient). The arguments, formulas and metrics are `reference.grpo.grpo`'s. Returns six
    float32 scalars; the loss's gradient flows to hidden and weight (in their dtypes), the metrics have none. Raises
    ValueError for the reference's bad arguments and the errors of `token_logps`; TypeError for a wrong dtype.
    """
    _check_loss_args(beta, epsilon_low, epsilon_high, loss_type, max_completion_length)  # before the head's pass
    n, t = _check_head(hidden, weight, targets)
    _check_loss_inputs(n, t, completion_mask, advantages, old_logps, ref_logps, beta)
    valid = completion_mask != 0
    logps, entropy = token_stats(hidden, weight, targets.where(valid, _IGNORE), temperature, _IGNORE, chunk_size)
    out = grpo_loss(logps, completion_mask, advantages, old_logps, ref_logps, beta, epsilon_low, epsilon_high,
                    loss_type, max_completion_length)
    return *out, _masked_mean(entropy, valid)


__all__ = ["grpo", "token_logps", "token_stats", "chunked_logps", "chunked_logps_backward", "TokenLogpsFunction",
           "LOSS_TYPES", "METRICS", "MAX_BLOCK_V"]
