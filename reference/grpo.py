"""GRPO's policy loss fused with the LM head, chunked over tokens, in plain PyTorch.

GRPO (Shao et al. 2024, "DeepSeekMath", section 4.1) samples a group of completions per prompt, scores them, and
takes each completion's advantage ``A`` from the group's rewards (the trainer's work; here ``advantages`` is an input,
one value per completion). Its objective, eq. (3), with the KL penalty of eq. (4), gives per completion token::

    log_ratio = logp - old_logp                                  (old_logps None: logp.detach(), on-policy)
    coef_1 = exp(log_ratio),  coef_2 = clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
    per_token = -min(coef_1 * A, coef_2 * A) + beta * kl,   kl = exp(ref_logp - logp) - (ref_logp - logp) - 1

``logp = log_softmax(hidden @ weight.T / temperature)[target]``, the policy's log-probability of the completion
token at the sampling temperature, unfiltered (TRL divides the logits by the temperature, top-k/top-p play no part);
``kl`` is Schulman's k3 estimate of KL(pi_theta || pi_ref) (eq. 4), counted only when ``beta > 0``. DAPO (Yu et al.
2025, arXiv 2503.14476) decouples the clip range: ``epsilon_high > epsilon_low`` ("clip-higher"). The per-token losses
of the completion tokens (``completion_mask`` nonzero) are aggregated by ``loss_type``:

    grpo     mean over each sequence's tokens, then mean over the N sequences             (eq. 3's 1/|o_i|)
    bnpo     sum over all tokens / number of completion tokens in the batch
    dapo     the same on one process (DAPO's token-level loss; TRL divides by the tokens of the whole accumulated
             generation batch over all processes, which a single call sees as its own count)
    dr_grpo  sum over all tokens / (N * max_completion_length)                          (Dr. GRPO, arXiv 2503.20783)

The counts are clamped to at least 1, so a batch without completion tokens gives a loss of 0 and zero gradients.

Clamps (ours): both log-ratios, ``logp - old_logp`` and ``ref_logp - logp``, are clamped to
[-`LOG_RATIO_BOUND`, `LOG_RATIO_BOUND`] = [-20, 20] (the bound TRL and Liger clamp the log-ratios of their VESPO loss
to) before the exponential, so every loss, metric and gradient is finite for any log-probs, -inf included: e^20 is
4.9e8, while float32's exp overflows past 88.7. Within the bound this is exactly TRL's and Liger's loss (neither
clamps these); past it a term is constant in the log-prob and its gradient 0, as ``torch.clamp``'s. The gradients
this drops: a ratio past e^20 with ``A < 0`` (the side the clip range leaves open, PPO's; TRL's ``delta`` caps it),
whose gradient would be ``A e^20`` or more, and the KL term's past 20 nats (``1 - e^d``: at most 1 in size below
-20).

Metrics (TRL's names, `METRICS`), means over the completion tokens of the batch, no gradient: ``kl`` (the k3 term;
0 without ``ref_logps``), ``clip_ratio/low_mean`` (tokens with ``coef_1 < 1 - epsilon_low`` and ``A < 0``: the
clipped lower side), ``clip_ratio/high_mean`` (``coef_1 > 1 + epsilon_high`` and ``A > 0``), their union
``clip_ratio/region_mean``, and ``entropy``, the entropy of the policy's token distribution at the temperature.

The fused part is `token_logps`: each chunk of tokens forms its (chunk, V) logits, keeps the log-sum-exp, the target's
log-prob and the entropy, and the backward recomputes the chunk's logits to form ``d logp / d logits = (onehot -
softmax) / temperature`` scaled by the incoming per-token gradient, multiplied into the gradients of ``hidden`` and
``weight`` chunk by chunk: the (N, T, V) logits never exist. The loss on the (N, T) log-probs is `grpo_loss`, plain
torch: TRL's own lines. Per row, the largest logit's own term of the softmax sum (exactly 1) is kept apart, ``lse = m +
log1p(sum of the others)``, so the entropy and the log-prob of the likeliest token keep their relative precision
however peaked the distribution.

tests/test_grpo.py checks this against TRL's ``GRPOTrainer._compute_loss`` and Liger-Kernel's
``LigerFusedLinearGRPOLoss``; `kernels.triton.grpo` and `runtime_mlx.kernels.grpo` are tested against this.
"""

from __future__ import annotations

import torch

from reference.distill import _number
from reference.preference import _check_chunk, _compute_dtype, _default_chunk

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
METRICS = ("kl", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "entropy")
LOG_RATIO_BOUND = 20.0
_IGNORE = -100  # the target `grpo` gives the head at positions outside the completion mask


def _check_head(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> tuple[int, int]:
    """(N, T) of the targets after the checks of hidden (N, T, H) or (N*T, H), weight (V, H), targets (N, T)."""
    if targets.ndim != 2 or weight.ndim != 2 or hidden.shape[-1:] != weight.shape[1:] or not (
            (hidden.ndim == 3 and hidden.shape[:2] == targets.shape)
            or (hidden.ndim == 2 and hidden.shape[0] == targets.numel())):
        raise ValueError(f"expected hidden (N, T, H) or (N*T, H), weight (V, H), targets (N, T); got "
                         f"{tuple(hidden.shape)}, {tuple(weight.shape)}, {tuple(targets.shape)}")
    if not hidden.dtype.is_floating_point or not weight.dtype.is_floating_point:
        raise ValueError(f"hidden and weight must be floating point, got {hidden.dtype} and {weight.dtype}")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise ValueError(f"targets must be an integer tensor (int64), got {targets.dtype}")
    n, t = targets.shape
    if n == 0 or t == 0:
        raise ValueError(f"targets: expected at least one sequence and one position, got shape {(n, t)}")
    return n, t


def _check_loss_args(beta, epsilon_low, epsilon_high, loss_type, max_completion_length) -> None:
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    _number("beta", beta, 0.0, float("inf"))
    _number("epsilon_low", epsilon_low, 0.0, 1.0)
    _number("epsilon_high", epsilon_high, 0.0, float("inf"))
    m = max_completion_length
    if loss_type == "dr_grpo" and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
        raise ValueError(f"loss_type 'dr_grpo' needs max_completion_length, a positive int, got {m!r}")


def _check_tokens(name: str, x, shape: tuple, dtype_kind: str = "float") -> None:
    """``x`` is a tensor of ``shape``: float (``dtype_kind`` "float") or anything but complex ("mask")."""
    ok = isinstance(x, torch.Tensor) and tuple(x.shape) == shape and (
        x.dtype.is_floating_point if dtype_kind == "float" else not x.dtype.is_complex)
    if not ok:
        got = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
        kind = "a float tensor" if dtype_kind == "float" else "a tensor (bool, integer or float)"
        raise ValueError(f"{name} must be {kind} of shape {shape}, got {got}")


def _check_loss_inputs(n: int, t: int, completion_mask, advantages, old_logps, ref_logps, beta) -> None:
    """The checks of `grpo_loss`'s tensors for N sequences of T positions (after `_check_loss_args`)."""
    _check_tokens("completion_mask", completion_mask, (n, t), "mask")
    _check_tokens("advantages", advantages, (n,))
    for name, x in (("old_logps", old_logps), ("ref_logps", ref_logps)):
        if x is not None:
            _check_tokens(name, x, (n, t))
    if beta > 0 and ref_logps is None:
        raise ValueError("beta > 0 needs ref_logps (the reference model's per-token log-probs)")


def _masked_mean(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over the positions where ``valid`` (0 when there are none), without gradient."""
    with torch.no_grad():
        return torch.where(valid, x, 0.0).sum() / valid.sum().clamp(min=1)


def grpo_loss(logps: torch.Tensor, completion_mask: torch.Tensor, advantages: torch.Tensor,
              old_logps: torch.Tensor | None = None, ref_logps: torch.Tensor | None = None, beta: float = 0.0,
              epsilon_low: float = 0.2, epsilon_high: float = 0.2, loss_type: str = "dapo",
              max_completion_length: int | None = None):
    """GRPO's loss and metrics from the policy's per-token log-probs (the module docstring's formulas and clamps).

    logps (N, T) float, with gradients (`token_logps`); completion_mask (N, T) (nonzero: a completion token whose
    loss counts); advantages (N,) float, one per sequence; old_logps, ref_logps (N, T) float or None, the sampling
    policy's and the reference model's log-probs at the same temperature (never given a gradient). Values at masked
    positions are never read into a result (any value, NaN included, is replaced by 0 first). Returns ``(loss, kl,
    clip_ratio/low_mean, clip_ratio/high_mean, clip_ratio/region_mean)``, scalars in ``logps``' dtype; only ``loss``
    carries a gradient. This is TRL's ``GRPOTrainer._compute_loss`` after its log-probs (token-level importance
    sampling, no ``delta``, no entropy mask, no vLLM correction) on one process, with the log-ratios clamped.

    Raises ValueError for an unknown ``loss_type``, a ``beta`` that is negative or not finite, ``epsilon_low``
    outside [0, 1], a negative ``epsilon_high``, ``dr_grpo`` without a positive ``max_completion_length``,
    ``beta > 0`` without ``ref_logps``, or tensors of other shapes.
    """
    _check_loss_args(beta, epsilon_low, epsilon_high, loss_type, max_completion_length)
    if logps.ndim != 2 or not logps.dtype.is_floating_point:
        raise ValueError(f"logps must be a float tensor (N, T), got {tuple(logps.shape)} {logps.dtype}")
    n, t = logps.shape
    _check_loss_inputs(n, t, completion_mask, advantages, old_logps, ref_logps, beta)
    valid = completion_mask != 0
    lp = torch.where(valid, logps, 0.0)
    old = lp.detach() if old_logps is None else torch.where(valid, old_logps.detach().to(lp.dtype), 0.0)
    adv = advantages.detach().to(lp.dtype)[:, None]
    coef_1 = (lp - old).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND).exp()
    coef_2 = coef_1.clamp(1 - epsilon_low, 1 + epsilon_high)
    per_token = -torch.minimum(coef_1 * adv, coef_2 * adv)
    kl = None
    if ref_logps is not None:
        d = (torch.where(valid, ref_logps.detach().to(lp.dtype), 0.0) - lp).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)
        kl = d.expm1() - d  # exp(d) - d - 1, without float32's cancellation against 1 near d = 0
        if beta > 0:
            per_token = per_token + beta * kl
    per_token = torch.where(valid, per_token, 0.0)
    count = valid.sum(-1)
    if loss_type == "grpo":
        loss = (per_token.sum(-1) / count.clamp(min=1)).mean()
    elif loss_type == "dr_grpo":
        loss = per_token.sum() / (n * max_completion_length)
    else:  # bnpo, dapo
        loss = per_token.sum() / count.sum().clamp(min=1)
    low = (coef_1 < 1 - epsilon_low) & (adv < 0)
    high = (coef_1 > 1 + epsilon_high) & (adv > 0)
    metrics = [lp.new_zeros(()) if kl is None else _masked_mean(kl, valid)]
    metrics += [_masked_mean(x.to(lp.dtype), valid) for x in (low, high, low | high)]
    return loss, *metrics


def _chunk_stats(x: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(lse, logp, entropy)`` (n,) of the rows of ``x`` (n, V), logits already divided by the temperature, for
    ``targets`` (n,) in [0, V). With ``m`` the row's largest logit (at k) and ``t = sum_{j != k} exp(x_j - m)``:
    ``lse = m + log1p(t)``, ``logp = x[target] - lse``, ``entropy = log1p(t) - sum_{j != k} e_j (x_j - m) / (1 +
    t)``. -inf logits count 0 (never 0 * inf). Overwrites ``x``."""
    m, k = x.max(-1, keepdim=True)
    d = x.sub_(m)  # x - m <= 0, in x's memory
    picked = d.gather(1, targets[:, None])[:, 0]
    e = d.exp().scatter_(1, k, 0.0)  # the largest logit's term (exactly 1) apart
    rest = e.sum(-1)
    log_s = rest.log1p()
    a = torch.where(e > 0, e * d, 0.0).sum(-1)
    return m[:, 0] + log_s, picked - log_s, log_s - a / (1 + rest)


def token_stats(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                ignore_index: int = -100, chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`token_logps` and the entropy of each token's distribution: ``(logps, entropy)``, both (N, T); the entropy
    (nats, of ``softmax(logits / temperature)``, 0 at ignored positions) carries no gradient. Same arguments and
    errors as `token_logps`."""
    n, t = _check_head(hidden, weight, targets)
    _number("temperature", temperature, 0.0, low_open=True)
    _check_chunk(chunk_size)
    if chunk_size is None:
        chunk_size = _default_chunk(weight.shape[0])
    logps, entropy = _TokenLogps.apply(hidden.reshape(n * t, hidden.shape[-1]), weight, targets.reshape(-1),
                                       float(temperature), ignore_index, chunk_size)
    return logps.view(n, t), entropy.view(n, t)


def token_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                ignore_index: int = -100, chunk_size: int | None = None) -> torch.Tensor:
    """Per-token log-probability of the targets at a temperature, ``log_softmax(hidden @ weight.T / temperature)
    [targets]``, fused with the head and chunked over tokens: the old and reference log-probs of `grpo`.

    hidden (N, T, H) or (N*T, H) float, weight (V, H) float, targets (N, T) integer in [0, V) or ``ignore_index``
    (0 there, and no gradient), aligned with hidden (no shift inside). Returns (N, T) in at least float32 (float64
    for float64 inputs; autocast is off inside). ``chunk_size``: tokens per chunk (default: about 8 MiB of float32
    logits). Differentiable in hidden and weight (the backward recomputes each chunk's logits; once), though the
    trainer calls it under ``no_grad``. TRL's ``_get_per_token_logps_and_entropies`` (its fused head divides the
    logits by the temperature) and Liger's ``chunk_forward``. Raises ValueError for mismatched shapes, non-float
    hidden/weight, non-integer targets, a ``temperature`` that is not positive and finite, or a bad ``chunk_size``.
    """
    return token_stats(hidden, weight, targets, temperature, ignore_index, chunk_size)[0]


class _TokenLogps(torch.autograd.Function):
    """`token_stats` on flattened tokens: forward keeps each token's log-sum-exp; backward recomputes the chunks'
    logits. The entropy is an output without gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, ignore_index, chunk_size):
        dtype = _compute_dtype(hidden, weight)
        with torch.autocast(hidden.device.type, enabled=False):
            h, w = hidden.to(dtype), weight.to(dtype)
            valid = targets != ignore_index
            safe = targets.where(valid, 0).long()
            lse, logps, entropy = h.new_empty(h.shape[0]), h.new_empty(h.shape[0]), h.new_empty(h.shape[0])
            for s in range(0, h.shape[0], chunk_size):
                rows = slice(s, s + chunk_size)
                x = (h[rows] @ w.T).div_(temperature)
                lse[rows], logps[rows], entropy[rows] = _chunk_stats(x, safe[rows])
            logps, entropy = torch.where(valid, logps, 0.0), torch.where(valid, entropy, 0.0)
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.meta = temperature, ignore_index, chunk_size, dtype
        ctx.mark_non_differentiable(entropy)
        return logps, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable  # recomputed from saved inputs with in-place ops: once
    def backward(ctx, grad_logps, grad_entropy):
        hidden, weight, targets, lse = ctx.saved_tensors
        temperature, ignore_index, chunk_size, dtype = ctx.meta
        need_h, need_w = ctx.needs_input_grad[:2]
        if not (need_h or need_w) or grad_logps is None:
            return None, None, None, None, None, None
        with torch.autocast(hidden.device.type, enabled=False):
            h, w = hidden.to(dtype), weight.to(dtype)
            valid = targets != ignore_index
            safe = targets.where(valid, 0).long()[:, None]
            # d logp / d logits = (onehot - softmax) / temperature per token, 0 at ignored tokens: their log-sum-exp
            # set to +inf makes their softmax exactly 0 (never inf * 0, whatever their logits).
            c = torch.where(valid, grad_logps.to(dtype) / temperature, 0.0)[:, None]
            lse = torch.where(valid, lse, float("inf"))[:, None]
            grad_h = h.new_empty(h.shape) if need_h else None
            grad_w = torch.zeros_like(w) if need_w else None
            for s in range(0, h.shape[0], chunk_size):
                rows = slice(s, s + chunk_size)
                g = (h[rows] @ w.T).div_(temperature).sub_(lse[rows]).exp_()  # softmax
                g.mul_(-c[rows]).scatter_add_(1, safe[rows], c[rows])  # c * (onehot(target) - softmax)
                if grad_h is not None:
                    torch.mm(g, w, out=grad_h[rows])
                if grad_w is not None:
                    grad_w.addmm_(g.T, h[rows])
        dh = None if grad_h is None else grad_h.to(hidden.dtype)
        dw = None if grad_w is None else grad_w.to(weight.dtype)
        return dh, dw, None, None, None, None


def grpo(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, completion_mask: torch.Tensor,
         advantages: torch.Tensor, old_logps: torch.Tensor | None = None, ref_logps: torch.Tensor | None = None,
         beta: float = 0.0, epsilon_low: float = 0.2, epsilon_high: float = 0.2, temperature: float = 1.0,
         loss_type: str = "dapo", max_completion_length: int | None = None, chunk_size: int | None = None):
    """GRPO's loss of N completions, fused with the LM head: ``(loss, kl, clip_ratio/low_mean,
    clip_ratio/high_mean, clip_ratio/region_mean, entropy)`` (the names of `METRICS` after the loss).

    hidden (N, T, H) or (N*T, H) float, the policy's final hidden states at the completion positions; weight (V, H)
    float, its LM head; targets (N, T) integer, the completion token predicted from each hidden state (aligned, no
    shift inside; any value outside the completion mask); completion_mask (N, T) bool/int/float, nonzero where the
    token's loss counts (completion tokens, tool responses excluded); advantages (N,) float; old_logps, ref_logps (N,
    T) float or None (`token_logps` of the sampling policy and of the reference model at ``temperature``; no gradient
    reaches them). ``beta`` >= 0 weighs the k3 KL (``ref_logps`` needed when > 0), ``epsilon_low`` /
    ``epsilon_high`` the clip range (TRL's ``epsilon`` / ``epsilon_high``), ``temperature`` > 0 divides the logits,
    ``loss_type`` one of `LOSS_TYPES` (TRL's default "dapo"), ``max_completion_length`` (``dr_grpo`` only) its
    normalizer. Returns six scalars in at least float32 (float64 for float64 inputs): the loss, with gradients to
    hidden and weight (in their dtypes), and the metrics, without. ``chunk_size``: tokens per chunk (default about 8
    MiB of float32 logits). See the module docstring for the formulas, the clamps and the aggregation.

    Sources: Shao et al. 2024 (DeepSeekMath, section 4.1, eq. 3 and 4), Yu et al. 2025 (DAPO, clip-higher and the
    token-level loss), Liu et al. 2025 (Dr. GRPO); TRL ``GRPOTrainer._compute_loss`` (names, metrics), Liger-Kernel
    ``LigerFusedLinearGRPOLoss`` (fused layout). Raises ValueError for bad shapes or dtypes and the errors of
    `grpo_loss` and `token_logps`.
    """
    n, t = _check_head(hidden, weight, targets)
    _check_loss_args(beta, epsilon_low, epsilon_high, loss_type, max_completion_length)
    _check_loss_inputs(n, t, completion_mask, advantages, old_logps, ref_logps, beta)  # before the head's pass
    valid = completion_mask != 0
    logps, entropy = token_stats(hidden, weight, targets.where(valid, _IGNORE), temperature, _IGNORE, chunk_size)
    out = grpo_loss(logps, completion_mask, advantages, old_logps, ref_logps, beta, epsilon_low, epsilon_high,
                    loss_type, max_completion_length)
    return *out, _masked_mean(entropy, valid)
