"""A deliberately broken fused LM head + cross-entropy, to see what `dsfs check` / `reference.testing.run` report.

``linear_cross_entropy(hidden, weight, targets, ignore_index=-100, reduction="mean")`` computes the loss right and
forms the gradients in the forward, as fused kernels do. To save the (N, H) buffer of ``hidden``'s gradient it
stores that gradient into ``hidden`` itself (``hidden.copy_(grad_hidden)``, a classic memory-saving bug) and
hands it out from there in backward. The loss and both gradients are right, but the caller's activations are
overwritten, so anything else that reads ``hidden`` (the MTP module, a second loss, a retried step) sees
gradients instead. Every case of the battery fails its "inputs unchanged" row (``wrote into hidden``):

    dsfs check linear_cross_entropy --impl examples/byok/broken_cross_entropy.py:linear_cross_entropy
"""

from __future__ import annotations

import torch


class _BrokenLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, reduction):
        h, w = hidden.detach().float().clone(), weight.detach().float()
        logits = h @ w.T
        valid = targets != ignore_index
        safe = torch.where(valid, targets, 0)
        losses = torch.where(valid, logits.logsumexp(-1) - logits.gather(1, safe[:, None])[:, 0], 0.0)
        dlogits = logits.softmax(-1)  # d (per-token loss) / d logits = softmax - onehot(target), 0 where ignored
        dlogits[torch.arange(len(targets)), safe] -= 1.0
        dlogits *= valid[:, None]
        with torch.no_grad():
            hidden.copy_(dlogits @ w)  # BUG: the per-token gradient of hidden overwrites hidden, to save a buffer
        ctx.save_for_backward(hidden, dlogits, h, valid)
        ctx.reduction, ctx.dtypes = reduction, (hidden.dtype, weight.dtype)
        if reduction == "none":
            return losses
        return losses.sum() / valid.sum() if reduction == "mean" else losses.sum()

    @staticmethod
    def backward(ctx, grad_out):
        grad_hidden, dlogits, h, valid = ctx.saved_tensors  # grad_hidden is the caller's `hidden`, overwritten
        factor = grad_out.float().expand(valid.shape)  # d loss / d (per-token loss)
        if ctx.reduction == "mean":
            factor = factor / valid.sum()
        dh = grad_hidden.float() * factor[:, None]
        dw = (dlogits * factor[:, None]).T @ h
        return dh.to(ctx.dtypes[0]), dw.to(ctx.dtypes[1]), None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                         reduction: str = "mean") -> torch.Tensor:
    """``F.cross_entropy(hidden @ weight.T, targets, ignore_index=..., reduction=...)`` in float32."""
    return _BrokenLinearCrossEntropy.apply(hidden, weight, targets, ignore_index, reduction)
