"""DPO-family preference losses fused with the LM head, over chunks of tokens; reference:
`reference.preference.preference` and `reference.preference.sequence_logps`.

The heavy part is the log-probability of each completion token under the head, ``log_softmax(h @ W.T)[target]``,
summed over the completion of each sequence. That is minus the per-token cross-entropy, so it runs on
`kernels.triton.cross_entropy.linear_cross_entropy` with ``reduction="none"``: chunks of tokens, the (chunk, V)
logits formed by a torch matmul and reduced in float32 by its Triton kernel (online logsumexp over blocks of
``BLOCK_V`` <= 4096 columns, up to 16 tokens per program when V <= 2048), the (B*T, V) logits never stored. Its
backward takes the per-token cotangent (here the sequence log-prob's cotangent, divided by the row's token count
when averaging) and runs the same chunked pass again with it folded into the gradient's scale:
``d_hidden_chunk = grad @ weight``, ``d_weight += grad.T @ hidden_chunk`` (float32). The DPO formulas on the (B,)
log-probs are a few torch operations: `reference.preference.preference_loss` itself.

Names and definitions are TRL's ``DPOTrainer``'s (``beta``, ``loss_type`` "sigmoid" / "hinge" / "ipo",
``label_smoothing``; Rafailov et al. 2023, DPO; Azar et al. 2023, IPO; Liger-Kernel's ``chunked_loss``).
"""

from __future__ import annotations

import torch

from kernels.triton.cross_entropy import FLOATS, linear_cross_entropy
from kernels.triton.utils import check
from reference.preference import LOSS_TYPES, _check_loss_args, preference_loss


def _check_sequences(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> None:
    check("hidden", hidden, ndim=3, dtypes=FLOATS, contiguous=False)
    check("weight", weight, ndim=2, dtypes=hidden.dtype, shape=(None, hidden.shape[2]), device=hidden.device)
    check("targets", targets, dtypes=torch.int64, shape=tuple(hidden.shape[:2]), device=hidden.device,
          contiguous=False)


def sequence_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                   average: bool = False, chunk_size: int | None = None) -> torch.Tensor:
    """Log-probability of each sequence's completion under the LM head, ``sum_t log_softmax(h[b, t] @ W.T)[y[b, t]]``.

    hidden (B, T, H) float32/bf16/fp16; weight (V, H) of the same dtype, contiguous; targets (B, T) int64, already
    aligned (``targets[b, t]`` is the token predicted from ``hidden[b, t]``), in [0, V) or ``ignore_index`` where
    the position is not a completion token. ``average``: divide by the row's number of non-ignored tokens (a row
    with none gives 0). ``chunk_size``: tokens per chunk of the fused head (default
    `kernels.triton.cross_entropy.default_chunk_size`). Returns (B,) float32; gradients flow to hidden and weight
    (in their dtypes). Raises TypeError on a wrong dtype, ValueError on a wrong shape, device or layout, a bad
    ``chunk_size`` or an out-of-range target.
    """
    _check_sequences(hidden, weight, targets)
    B, T, H = hidden.shape
    ce = linear_cross_entropy(hidden.reshape(B * T, H), weight, targets.reshape(B * T), ignore_index, "none",
                              chunk_size=chunk_size)  # (B*T,) float32, 0 at ignored tokens
    logps = -ce.view(B, T).sum(1)
    if average:
        logps = logps / (targets != ignore_index).sum(1).clamp(min=1)
    return logps


def preference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ref_chosen_logps: torch.Tensor,
               ref_rejected_logps: torch.Tensor, beta: float = 0.1, loss_type: str = "sigmoid",
               label_smoothing: float = 0.0, ignore_index: int = -100,
               chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO-family loss of a batch of preference pairs, the head fused and chunked (TRL ``DPOTrainer``).

    hidden (2B, T, H) float32/bf16/fp16: rows [0, B) the chosen completions, rows [B, 2B) the rejected ones (one
    pass over all 2B rows); weight (V, H) of hidden's dtype; targets (2B, T) int64 aligned as in `sequence_logps`;
    ref_chosen_logps, ref_rejected_logps (B,) float, the reference model's (no gradient). The policy's log-probs
    are length-averaged for ``loss_type="ipo"``, summed otherwise. Returns ``(loss, chosen_logps,
    rejected_logps)``: the mean over pairs of `reference.preference.preference_loss` (scalar float32) and the two
    (B,) float32 log-probs; the gradients of all three flow to hidden and weight. Raises ValueError for an odd
    or zero number of rows, an unknown ``loss_type``, ``beta <= 0``, ``label_smoothing`` outside [0, 0.5] (the
    reference's checks) and the errors of `sequence_logps`; TypeError for a wrong dtype.
    """
    _check_loss_args(beta, loss_type, label_smoothing)  # the reference's checks, before the pass over the head
    _check_sequences(hidden, weight, targets)
    if hidden.shape[0] == 0 or hidden.shape[0] % 2:
        raise ValueError(f"hidden: expected 2B rows (B >= 1 chosen, then B rejected), got {hidden.shape[0]}")
    B = hidden.shape[0] // 2
    for name, t in (("ref_chosen_logps", ref_chosen_logps), ("ref_rejected_logps", ref_rejected_logps)):
        check(name, t, dtypes=(*FLOATS, torch.float64), shape=(B,), device=hidden.device, contiguous=False)
    logps = sequence_logps(hidden, weight, targets, ignore_index, loss_type == "ipo", chunk_size)
    chosen, rejected = logps[:B], logps[B:]
    losses = preference_loss(chosen, rejected, ref_chosen_logps.detach().float(), ref_rejected_logps.detach().float(),
                             beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)
    return losses.float().mean(), chosen, rejected


__all__ = ["preference", "sequence_logps", "LOSS_TYPES"]
