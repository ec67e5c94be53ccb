"""Cross-entropy of the LM head, from full logits: the definition `kernels.triton.cross_entropy` is tested against.

Semantics are `F.cross_entropy`'s (its ``ignore_index`` and ``reduction``), with optional per-token weights that
act like its class weights: "mean" divides by the sum of the weights of the non-ignored tokens (by their count
without weights), so all-ignored targets give NaN, as `F.cross_entropy` does.
"""

from __future__ import annotations

import torch

from reference.rms_norm import at_least_fp32

REDUCTIONS = ("mean", "sum", "none")


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                         reduction: str = "mean", token_weights: torch.Tensor | None = None,
                         chunk_size: int | None = None) -> torch.Tensor:
    """Cross-entropy of ``logits = hidden @ weight.T``, computed in at least float32.

    hidden (N, H), weight (V, H) float; targets (N,) int64 in [0, V) or ``ignore_index``; token_weights (N,)
    float or None. Returns the loss: (N,) for "none" (0 at ignored tokens), else a scalar: the weighted sum,
    or for "mean" that sum / sum of the non-ignored tokens' weights. ``chunk_size`` is accepted for the fused
    kernel's signature and ignored. Raises ValueError for an unknown reduction.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    logits = at_least_fp32(hidden @ weight.T)
    valid = targets != ignore_index
    picked = logits.gather(1, targets.where(valid, 0)[:, None])[:, 0]
    w = valid.to(logits.dtype) if token_weights is None else torch.where(valid, token_weights.to(logits.dtype), 0.0)
    loss = torch.where(valid, logits.logsumexp(-1) - picked, 0.0) * w
    if reduction == "none":
        return loss
    return loss.sum() if reduction == "sum" else loss.sum() / w.sum()
