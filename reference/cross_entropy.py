"""Cross-entropy of the LM head, ``CE(hidden @ weight.T, targets)``, in plain PyTorch.

Semantics are `F.cross_entropy`'s (its ``ignore_index`` and ``reduction``), with optional per-token weights that
act like its class weights: "mean" divides by the sum of the weights of the non-ignored tokens (by their count
without weights), so all-ignored targets give NaN, as `F.cross_entropy` does.

For the scalar reductions ("mean", "sum") the head is fused with the loss and processed in row chunks, the
way Liger-Kernel's fused linear cross-entropy works: each chunk's logits are formed, reduced to the loss, and
turned in place into their gradient ``softmax - onehot``, which is multiplied into the gradients of ``hidden``
and ``weight`` at once (the loss is the last op of the graph, so backward only scales them by the incoming
scalar). The (N, V) logits and their (N, V) softmax never exist whole, and backward needs no second pass over
them (so it is differentiable once: no double backward). "none" (a per-token gradient) takes the direct
formula through autograd. Both are checked against
`F.cross_entropy` on the full logits (tests/test_cross_entropy.py); `kernels.triton.cross_entropy` is tested
against this.
"""

from __future__ import annotations

import torch

from reference.rms_norm import at_least_fp32

REDUCTIONS = ("mean", "sum", "none")


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                         reduction: str = "mean", token_weights: torch.Tensor | None = None,
                         chunk_size: int | None = None) -> torch.Tensor:
    """Cross-entropy of ``logits = hidden @ weight.T``, computed in at least float32 (autocast is off inside).

    hidden (N, H), weight (V, H) float; targets (N,) int64 in [0, V) or ``ignore_index``; token_weights (N,)
    float or None. Returns the loss in at least float32: (N,) for "none" (0 at ignored tokens), else a scalar:
    the weighted sum, or for "mean" that sum / sum of the non-ignored tokens' weights. ``chunk_size``: rows per
    chunk of the fused path (default: about 8 MiB of float32 logits per chunk). Gradients flow to ``hidden``
    and ``weight`` (not to ``token_weights``); under ``no_grad`` none are formed. Raises ValueError for an unknown
    reduction, a non-positive ``chunk_size`` or mismatched shapes.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if hidden.ndim != 2 or weight.ndim != 2 or hidden.shape[1] != weight.shape[1] or targets.shape != hidden.shape[:1]:
        raise ValueError(f"expected hidden (N, H), weight (V, H), targets (N,); got {tuple(hidden.shape)}, "
                         f"{tuple(weight.shape)}, {tuple(targets.shape)}")
    if token_weights is not None:
        if token_weights.shape != targets.shape:
            raise ValueError(f"token_weights: expected shape {tuple(targets.shape)} like targets, "
                             f"got {tuple(token_weights.shape)}")
        token_weights = token_weights.detach()
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if reduction == "none":
        with torch.autocast(hidden.device.type, enabled=False):
            logits = at_least_fp32(hidden) @ at_least_fp32(weight).T
            valid = targets != ignore_index
            picked = logits.gather(1, targets.where(valid, 0)[:, None])[:, 0]
            w = _weights(valid, token_weights, logits.dtype)
            return torch.where(valid, logits.logsumexp(-1) - picked, 0.0) * w
    if chunk_size is None:
        chunk_size = max(16, (1 << 21) // max(1, weight.shape[0]))
    return _FusedLinearCrossEntropy.apply(hidden, weight, targets, token_weights, ignore_index,
                                          reduction == "mean", chunk_size, torch.is_grad_enabled())


def _weights(valid: torch.Tensor, token_weights: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Per-token weight: ``token_weights`` (or 1) where the target is valid, else 0."""
    if token_weights is None:
        return valid.to(dtype)
    return torch.where(valid, token_weights.to(dtype), 0.0)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """The scalar reductions, fused and chunked; gradients are formed in forward (see the module docstring)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, token_weights, ignore_index, mean, chunk_size, grad_enabled):
        need = [grad_enabled and n for n in ctx.needs_input_grad[:2]]  # needs_input_grad ignores no_grad
        with torch.autocast(hidden.device.type, enabled=False):
            h, w = at_least_fp32(hidden), at_least_fp32(weight)
            valid = targets != ignore_index
            tok_w = _weights(valid, token_weights, h.dtype)
            scale = tok_w / tok_w.sum() if mean else tok_w  # d loss / d (per-token CE)
            safe = targets.where(valid, 0)[:, None]
            total = h.new_zeros(())
            grad_h = h.new_empty(h.shape) if need[0] else None
            grad_w = torch.zeros_like(w) if need[1] else None
            for s in range(0, h.shape[0], chunk_size):
                hc, rows = h[s:s + chunk_size], slice(s, s + chunk_size)
                logits = hc @ w.T
                top = logits.amax(-1, keepdim=True)
                picked = logits.gather(1, safe[rows])
                probs = logits.sub_(top).exp_()  # exp(logits - max), in the logits' memory
                total_exp = probs.sum(-1, keepdim=True)
                total = total + ((total_exp.log() + top - picked)[:, 0] * tok_w[rows]).sum()
                if grad_h is None and grad_w is None:
                    continue
                probs.mul_(scale[rows, None] / total_exp)  # softmax, times d loss / d CE
                probs.scatter_add_(1, safe[rows], -scale[rows, None])  # - onehot(target)
                if grad_h is not None:
                    torch.mm(probs, w, out=grad_h[rows])
                if grad_w is not None:
                    grad_w.addmm_(probs.T, hc)
            loss = total / tok_w.sum() if mean else total
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = hidden.dtype, weight.dtype
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable  # the saved gradients are constants: no double backward
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        dh = None if grad_h is None else (grad_h * grad_out).to(ctx.dtypes[0])
        dw = None if grad_w is None else (grad_w * grad_out).to(ctx.dtypes[1])
        return dh, dw, None, None, None, None, None, None
