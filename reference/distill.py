"""Knowledge distillation fused with the LM heads, chunked over tokens, in plain PyTorch.

Hinton et al. 2015 ("Distilling the Knowledge in a Neural Network") train a student on a teacher's softened
distribution; GKD (Agarwal et al. 2024, "On-Policy Distillation of Language Models", eq. 1) measures the gap by
the generalized Jensen-Shannon divergence. Per token, with ``p_s = softmax(student_logits / temperature)`` and
``p_t = softmax(teacher_logits / temperature)``::

    beta == 0:  KL(p_t || p_s)                                         forward KL
    beta == 1:  KL(p_s || p_t)                                         reverse KL
    else:       beta * KL(p_t || M) + (1 - beta) * KL(p_s || M),   M = beta * p_t + (1 - beta) * p_s

(the two ends are special cases: the generalized JSD itself vanishes at beta 0 and 1). ``soft_loss`` is that
term's mean over the non-ignored tokens, ``hard_loss`` the mean cross-entropy of the unscaled student logits
against the targets over the same tokens, and ``loss = weight_hard_loss * hard_loss + weight_soft_loss *
soft_loss``; with every target ignored all three are 0. This is exactly Liger-Kernel's ``LigerFusedLinearJSDLoss``
(``return_soft_hard_loss=True``) and TRL's ``GKDTrainer.generalized_jsd_loss`` (``reduction="batchmean"`` with
labels): both divide the logits by ``temperature`` with no ``temperature**2`` factor, sum each token's divergence
over the vocabulary and divide by the count of non-ignored tokens (clamped to at least 1). Unlike Liger (which pads
the student's logits with zeros when the teacher's vocabulary is larger) the two vocabularies must be equal.

The head is fused: each chunk of tokens forms the student's logits, the teacher's (without gradients: the teacher
never gets one), both divergences' values and the gradient of the chunk's soft and hard terms with respect to the
student's logits, multiplied at once into the gradients of ``student_hidden`` and ``student_weight`` (the losses
are scalars, so backward only scales the saved gradients: differentiable once). With ``d = log p_s - log M``
(``M = p_t`` at beta 1) the soft gradient is ``(1 - beta) * p_s * (d - sum(p_s * d)) / temperature`` (``p_s -
p_t`` over temperature at beta 0); terms where a probability is exactly 0 (a logit of -inf in both models) count
0, not NaN. tests/test_distill.py checks this against Liger and TRL; `kernels.triton.distill` and
`runtime_mlx.kernels.distill` are tested against this.
"""

from __future__ import annotations

import math

import torch

from reference.preference import _check_chunk, _compute_dtype, _default_chunk


def _number(name: str, value, low: float | None = None, high: float | None = None, low_open: bool = False) -> None:
    ok = not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        where = "" if low is None else (f" > {low}" if low_open else f" in [{low}, {high}]")
        raise ValueError(f"{name} must be a finite number{where}, got {value!r}")


def distill(student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher_hidden: torch.Tensor,
            teacher_weight: torch.Tensor, targets: torch.Tensor, beta: float = 0.5, temperature: float = 1.0,
            weight_hard_loss: float = 0.5, weight_soft_loss: float = 0.5, ignore_index: int = -100,
            chunk_size: int | None = None):
    """The distillation loss of N tokens, fused with both LM heads: ``(loss, soft_loss, hard_loss)``.

    student_hidden (N, Hs), student_weight (V, Hs), teacher_hidden (N, Ht), teacher_weight (V, Ht) float (the
    two vocabularies of one size V); targets (N,) integer in [0, V) or ``ignore_index`` (masks a token out of both
    losses). ``beta`` in [0, 1] (0: forward KL(p_t || p_s), 1: reverse KL(p_s || p_t), between: the generalized
    JSD; see the module docstring), ``temperature`` > 0 divides both models' logits of the soft term (the hard
    cross-entropy uses the unscaled student logits). Returns three scalars in at least float32 (float64 for float64
    inputs; autocast is off inside): ``loss = weight_hard_loss * hard_loss + weight_soft_loss * soft_loss``, each
    term a mean over the non-ignored tokens (0 when all are ignored). Gradients of the three flow to
    ``student_hidden`` and ``student_weight`` only; the teacher's logits are computed without gradients.
    ``chunk_size``: tokens per chunk (default: about 8 MiB of float32 logits).

    Sources: Hinton et al. 2015, Agarwal et al. 2024 (GKD); Liger-Kernel ``LigerFusedLinearJSDLoss``, TRL
    ``GKDTrainer.generalized_jsd_loss``. Raises ValueError for mismatched shapes or vocabularies, non-float
    inputs, non-integer targets, ``beta`` outside [0, 1], ``temperature <= 0``, non-finite loss weights or a
    non-positive ``chunk_size``.
    """
    sh, sw, th, tw = student_hidden, student_weight, teacher_hidden, teacher_weight
    if (sh.ndim != 2 or sw.ndim != 2 or th.ndim != 2 or tw.ndim != 2 or sh.shape[1] != sw.shape[1]
            or th.shape[1] != tw.shape[1] or th.shape[0] != sh.shape[0] or tuple(targets.shape) != (sh.shape[0],)):
        raise ValueError(f"expected student_hidden (N, Hs), student_weight (V, Hs), teacher_hidden (N, Ht), "
                         f"teacher_weight (V, Ht), targets (N,); got {tuple(sh.shape)}, {tuple(sw.shape)}, "
                         f"{tuple(th.shape)}, {tuple(tw.shape)}, {tuple(targets.shape)}")
    if sw.shape[0] != tw.shape[0]:
        raise ValueError(f"the student's and the teacher's vocabularies differ: student_weight has {sw.shape[0]} "
                         f"rows, teacher_weight {tw.shape[0]}")
    if not all(x.dtype.is_floating_point for x in (sh, sw, th, tw)):
        raise ValueError(f"hidden states and weights must be floating point, got {sh.dtype}, {sw.dtype}, {th.dtype}, "
                         f"{tw.dtype}")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise ValueError(f"targets must be an integer tensor (int64), got {targets.dtype}")
    _number("beta", beta, 0.0, 1.0)
    _number("temperature", temperature, 0.0, low_open=True)
    _number("weight_hard_loss", weight_hard_loss)
    _number("weight_soft_loss", weight_soft_loss)
    _check_chunk(chunk_size)
    if chunk_size is None:
        chunk_size = _default_chunk(sw.shape[0])
    return _FusedDistill.apply(sh, sw, th.detach(), tw.detach(), targets, float(beta), float(temperature),
                               float(weight_hard_loss), float(weight_soft_loss), ignore_index, chunk_size,
                               torch.is_grad_enabled())


def _xlogy_diff(p: torch.Tensor, logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """Per row ``sum p * (logp - logq)``, with a term 0 where ``p == 0`` (so -inf - -inf never makes NaN)."""
    return torch.where(p > 0, p * (logp - logq), 0.0).sum(-1)


def soft_terms(s: torch.Tensor, t: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token generalized JSD of temperature-scaled logits ``s`` (student) and ``t`` (teacher), both (n, V),
    and its gradient with respect to ``s``: ``(values (n,), grad (n, V))`` (see the module docstring)."""
    logp_s, logp_t = s.log_softmax(-1), t.log_softmax(-1)
    p_s, p_t = logp_s.exp(), logp_t.exp()
    if beta == 0.0:
        return _xlogy_diff(p_t, logp_t, logp_s), p_s - p_t
    if beta == 1.0:
        logm, scale, teacher = logp_t, 1.0, None
    else:
        logm = torch.logaddexp(logp_s + math.log1p(-beta), logp_t + math.log(beta))
        scale, teacher = 1.0 - beta, _xlogy_diff(p_t, logp_t, logm)
    d = torch.where(p_s > 0, logp_s - logm, 0.0)
    kl_s = (p_s * d).sum(-1)
    grad = (d - kl_s[:, None]).mul_(p_s).mul_(scale)
    value = kl_s if teacher is None else beta * teacher + (1.0 - beta) * kl_s
    return value, grad


class _FusedDistill(torch.autograd.Function):
    """`distill`, fused and chunked; the gradients of the soft and hard terms are formed in forward."""

    @staticmethod
    def forward(ctx, sh, sw, th, tw, targets, beta, temperature, w_hard, w_soft, ignore_index, chunk_size,
                grad_enabled):
        need_h, need_w = (grad_enabled and n for n in ctx.needs_input_grad[:2])
        dtype = _compute_dtype(sh, sw, th, tw)
        with torch.autocast(sh.device.type, enabled=False):
            h, w, ht, wt = sh.to(dtype), sw.to(dtype), th.to(dtype), tw.to(dtype)
            valid = targets != ignore_index
            safe = targets.where(valid, 0).long()[:, None]
            denom = valid.sum().clamp(min=1).to(dtype)
            scale = valid.to(dtype) / denom  # d mean / d per-token term
            soft_total, hard_total = h.new_zeros(()), h.new_zeros(())
            grads = {}
            for kind in ("soft", "hard"):
                grads[kind] = (h.new_empty(h.shape) if need_h else None, torch.zeros_like(w) if need_w else None)
            for s in range(0, h.shape[0], chunk_size):
                rows = slice(s, s + chunk_size)
                hc, ok = h[rows], valid[rows, None]
                z = hc @ w.T
                with torch.no_grad():
                    zt = ht[rows] @ wt.T
                soft, g_soft = soft_terms(z / temperature, zt / temperature, beta)
                soft_total = soft_total + torch.where(ok[:, 0], soft, 0.0).sum()
                lse = z.logsumexp(-1, keepdim=True)
                hard_total = hard_total + torch.where(ok, lse - z.gather(1, safe[rows]), 0.0).sum()
                if not (need_h or need_w):
                    continue
                g_soft = torch.where(ok, g_soft.mul_(scale[rows, None] / temperature), 0.0)
                g_hard = torch.where(ok, z.sub_(lse).exp_(), 0.0).mul_(scale[rows, None])  # softmax
                g_hard.scatter_add_(1, safe[rows], -scale[rows, None])  # - onehot(target)
                for kind, g in (("soft", g_soft), ("hard", g_hard)):
                    gh, gw = grads[kind]
                    if gh is not None:
                        torch.mm(g, w, out=gh[rows])
                    if gw is not None:
                        gw.addmm_(g.T, hc)
            soft_loss, hard_loss = soft_total / denom, hard_total / denom
            loss = w_hard * hard_loss + w_soft * soft_loss
        ctx.save_for_backward(*grads["soft"], *grads["hard"])
        ctx.meta = w_hard, w_soft, sh.dtype, sw.dtype
        return loss, soft_loss, hard_loss

    @staticmethod
    @torch.autograd.function.once_differentiable  # the saved gradients are constants: no double backward
    def backward(ctx, g_loss, g_soft, g_hard):
        gh_soft, gw_soft, gh_hard, gw_hard = ctx.saved_tensors
        w_hard, w_soft, h_dtype, w_dtype = ctx.meta
        a = g_loss * w_soft + g_soft  # d / d soft_loss
        b = g_loss * w_hard + g_hard  # d / d hard_loss
        # soft * a + hard * b with one new tensor, not three (the weight's gradient is V x Hs: at V 32k, Hs 1024
        # two temporaries were 250 MiB more at the peak than the saved gradients and the result)
        dh = None if gh_soft is None else (gh_soft * a).addcmul_(gh_hard, b).to(h_dtype)
        dw = None if gw_soft is None else (gw_soft * a).addcmul_(gw_hard, b).to(w_dtype)
        return dh, dw, *([None] * 10)
