"""Preference losses of the DPO family, fused with the LM head and chunked over tokens, in plain PyTorch.

DPO (Rafailov et al. 2023, "Direct Preference Optimization") trains a policy on pairs of completions, one
chosen and one rejected, against a frozen reference model. With ``*_logps`` the log-probability the policy (or,
``ref_*``, the reference) gives a completion, the sum of its completion tokens' log-probs, and ``beta`` the
strength of the implicit KL penalty::

    logits = (chosen_logps - rejected_logps) - (ref_chosen_logps - ref_rejected_logps)
    sigmoid: -logsigmoid(beta * logits) * (1 - label_smoothing) - logsigmoid(-beta * logits) * label_smoothing
    hinge:   relu(1 - beta * logits)                                  (SLiC, Zhao et al. 2023)
    ipo:     (logits - 1 / (2 * beta)) ** 2                           (IPO, Azar et al. 2023, eq. 17)

``label_smoothing`` is the conservative DPO of Mitchell 2023 (cDPO): the probability that a label is flipped.
Names and definitions are Hugging Face TRL's ``DPOTrainer`` (``beta``, ``loss_type``, ``label_smoothing``, metrics
``rewards/chosen = beta * (chosen_logps - ref_chosen_logps)``, ...), which the trainer computes from the outputs
here. IPO takes length-averaged log-probs (TRL divides the summed log-ratios by the completion length; the
averages of the policy and of the reference over the same tokens give the same difference), so `preference`
averages when ``loss_type == "ipo"`` and the caller passes averaged reference log-probs.

Where the libraries differ (trl 1.16, liger-kernel 0.8.5): both their "sigmoid" ignore ``label_smoothing`` (TRL
moved it to "robust", ``(clean - flipped) / (1 - 2 * ls)``, and "aot"); ours keeps TRL's earlier cDPO "sigmoid",
which equals TRL's "aot" on one pair at a time and both libraries' "sigmoid" at ``label_smoothing == 0``. Liger
has no "ipo", and its ``average_log_prob`` divides by the count unclamped (NaN for a row without completion
tokens; ours gives 0, as TRL's ``clamp(min=1)``).

`sequence_logps` is the fused part: the (B, T, V) logits are never held whole. Its forward forms each chunk of
rows' logits, keeps only their log-sum-exp and the target's logit, and its backward recomputes the chunk's logits
to form ``d logp / d logits = onehot(target) - softmax`` scaled by the incoming per-sequence gradient (unknown in
forward: the three outputs of `preference` all carry gradients), multiplied into the gradients of ``hidden`` and
``weight`` chunk by chunk. The layout of the pairs is Liger-Kernel's (``LigerFusedLinearDPOLoss``): rows
``[0, B)`` are the chosen sequences, rows ``[B, 2B)`` the rejected ones, and the targets are already aligned with
the hidden states (no shift inside). tests/test_preference.py checks this against Liger's
``LigerFusedLinearDPOLoss`` and TRL's ``DPOTrainer._compute_loss``; `kernels.triton.preference` and
`runtime_mlx.kernels.preference` are tested against this.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "hinge", "ipo")


def _default_chunk(vocab: int) -> int:
    """Rows per chunk: about 8 MiB of float32 logits (as `reference.cross_entropy.linear_cross_entropy`)."""
    return max(16, (1 << 21) // max(1, vocab))


def _check_chunk(chunk_size) -> None:
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")


def _check_loss_args(beta, loss_type, label_smoothing) -> None:
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if isinstance(beta, bool) or not isinstance(beta, int | float) or not beta > 0 or beta == float("inf"):
        raise ValueError(f"beta must be a positive finite number, got {beta!r}")
    if (isinstance(label_smoothing, bool) or not isinstance(label_smoothing, int | float)
            or not 0.0 <= label_smoothing <= 0.5):
        raise ValueError(f"label_smoothing must lie in [0, 0.5], got {label_smoothing!r}")


def _check_head(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> None:
    if (hidden.ndim != 3 or weight.ndim != 2 or hidden.shape[2] != weight.shape[1]
            or tuple(targets.shape) != tuple(hidden.shape[:2])):
        raise ValueError(f"expected hidden (B, T, H), weight (V, H), targets (B, T); got {tuple(hidden.shape)}, "
                         f"{tuple(weight.shape)}, {tuple(targets.shape)}")
    if not hidden.dtype.is_floating_point or not weight.dtype.is_floating_point:
        raise ValueError(f"hidden and weight must be floating point, got {hidden.dtype} and {weight.dtype}")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise ValueError(f"targets must be an integer tensor (int64), got {targets.dtype}")


def sequence_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                   average: bool = False, chunk_size: int | None = None) -> torch.Tensor:
    """Per-sequence log-probability of the targets under ``logits = hidden @ weight.T``, fused and chunked.

    hidden (B, T, H) float, weight (V, H) float, targets (B, T) integer, aligned: ``targets[b, t]`` is the token
    predicted from ``hidden[b, t]`` (no shift inside), ``ignore_index`` where the position is not a completion
    token. Returns (B,) ``sum_t log_softmax(hidden[b, t] @ weight.T)[targets[b, t]]`` over the non-ignored ``t``,
    in at least float32 (float64 for float64 inputs; autocast is off inside); with ``average`` that sum divided by
    the row's count of non-ignored tokens (a row with none gives 0, not NaN). ``chunk_size``: rows of the
    flattened (B*T) tokens per chunk (default: about 8 MiB of float32 logits). Gradients flow to ``hidden`` and
    ``weight`` (in their dtypes); backward recomputes each chunk's logits, and is differentiable once.

    This is TRL's per-sequence ``logps`` of ``DPOTrainer`` (``per_token_logps.sum(1)``) and Liger's
    ``chunk_forward`` log-probs (``average_log_prob``), on targets already shifted. Raises ValueError for
    mismatched shapes, non-float hidden/weight, non-integer targets or a non-positive ``chunk_size``.
    """
    _check_head(hidden, weight, targets)
    _check_chunk(chunk_size)
    if chunk_size is None:
        chunk_size = _default_chunk(weight.shape[0])
    return _SequenceLogps.apply(hidden, weight, targets, ignore_index, bool(average), chunk_size)


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The at-least-float32 dtype the head runs in (`reference.rms_norm.at_least_fp32` of every input, promoted to one
    dtype): float64 if any input is, else float32."""
    out = torch.float32
    for t in tensors:
        out = torch.promote_types(out, t.dtype)
    return out


class _SequenceLogps(torch.autograd.Function):
    """`sequence_logps`: forward keeps each token's log-sum-exp; backward recomputes the chunks' logits."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, average, chunk_size):
        b, t, hdim = hidden.shape
        dtype = _compute_dtype(hidden, weight)
        with torch.autocast(hidden.device.type, enabled=False):
            h, w = hidden.reshape(b * t, hdim).to(dtype), weight.to(dtype)
            flat = targets.reshape(-1)
            valid = flat != ignore_index
            safe = flat.where(valid, 0).long()[:, None]
            lse = h.new_empty(b * t)
            picked = h.new_empty(b * t)
            for s in range(0, b * t, chunk_size):
                logits = h[s:s + chunk_size] @ w.T
                picked[s:s + chunk_size] = logits.gather(1, safe[s:s + chunk_size])[:, 0]
                lse[s:s + chunk_size] = logits.logsumexp(-1)
            per_token = torch.where(valid, picked - lse, 0.0).view(b, t)
            count = valid.view(b, t).sum(1)
            out = per_token.sum(1)
            if average:
                out = out / count.clamp(min=1).to(dtype)
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.meta = ignore_index, average, chunk_size, dtype
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable  # recomputed from saved inputs with in-place ops: once
    def backward(ctx, grad_out):
        hidden, weight, targets, lse = ctx.saved_tensors
        ignore_index, average, chunk_size, dtype = ctx.meta
        need_h, need_w = ctx.needs_input_grad[:2]
        if not (need_h or need_w):
            return None, None, None, None, None, None
        b, t, hdim = hidden.shape
        with torch.autocast(hidden.device.type, enabled=False):
            h, w = hidden.reshape(b * t, hdim).to(dtype), weight.to(dtype)
            flat = targets.reshape(-1)
            valid = flat != ignore_index
            safe = flat.where(valid, 0).long()[:, None]
            coef = grad_out.to(dtype)
            if average:
                coef = coef / valid.view(b, t).sum(1).clamp(min=1).to(dtype)
            # d out[b] / d logp[b, t] per token: 0 at ignored tokens; their log-sum-exp set to +inf makes their
            # softmax exactly 0 (never inf * 0, whatever their logits).
            c = torch.where(valid.view(b, t), coef[:, None], 0.0).reshape(-1, 1)
            lse = torch.where(valid, lse, float("inf"))[:, None]
            grad_h = h.new_empty(h.shape) if need_h else None
            grad_w = torch.zeros_like(w) if need_w else None
            for s in range(0, b * t, chunk_size):
                rows = slice(s, s + chunk_size)
                g = (h[rows] @ w.T).sub_(lse[rows]).exp_()  # softmax
                g.mul_(-c[rows]).scatter_add_(1, safe[rows], c[rows])  # c * (onehot(target) - softmax)
                if grad_h is not None:
                    torch.mm(g, w, out=grad_h[rows])
                if grad_w is not None:
                    grad_w.addmm_(g.T, h[rows])
        dh = None if grad_h is None else grad_h.view(b, t, hdim).to(hidden.dtype)
        dw = None if grad_w is None else grad_w.to(weight.dtype)
        return dh, dw, None, None, None, None


def preference_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
                    ref_rejected_logps: torch.Tensor, beta: float = 0.1, loss_type: str = "sigmoid",
                    label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-pair DPO-family losses from sequence log-probs (see the module docstring for the formulas).

    The four log-prob tensors are (B,) float (the reference's are detached: no gradient reaches them). Returns (B,)
    in the dtype of ``chosen_logps - rejected_logps``. ``loss_type``: ``"sigmoid"`` (DPO; with ``label_smoothing``
    > 0 the conservative cDPO), ``"hinge"`` (SLiC) or ``"ipo"`` (pass length-averaged log-probs). Raises
    ValueError for an unknown ``loss_type``, ``beta <= 0``, ``label_smoothing`` outside [0, 0.5] or log-probs that
    are not four 1-D tensors of one length.
    """
    _check_loss_args(beta, loss_type, label_smoothing)
    shapes = [tuple(x.shape) for x in (chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)]
    if len(set(shapes)) != 1 or len(shapes[0]) != 1:
        raise ValueError(f"expected chosen, rejected, ref_chosen and ref_rejected log-probs of one shape (B,), got "
                         f"{', '.join(map(str, shapes))}")
    policy = chosen_logps - rejected_logps
    ref = (ref_chosen_logps.detach() - ref_rejected_logps.detach()).to(policy.dtype)
    logits = policy - ref
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * logits) * (1 - label_smoothing)
        if label_smoothing:
            losses = losses - F.logsigmoid(-beta * logits) * label_smoothing
        return losses
    if loss_type == "hinge":
        return torch.relu(1 - beta * logits)
    return (logits - 1 / (2 * beta)) ** 2


def preference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ref_chosen_logps: torch.Tensor,
               ref_rejected_logps: torch.Tensor, beta: float = 0.1, loss_type: str = "sigmoid",
               label_smoothing: float = 0.0, ignore_index: int = -100, chunk_size: int | None = None):
    """The DPO-family loss of a batch of pairs, fused with the LM head: ``(loss, chosen_logps, rejected_logps)``.

    hidden (2B, T, H) float: rows ``[0, B)`` the chosen sequences, rows ``[B, 2B)`` the rejected ones (Liger's
    layout); weight (V, H) float; targets (2B, T) integer, aligned with hidden (``ignore_index`` off the
    completions); ref_chosen_logps / ref_rejected_logps (B,) float, the frozen reference model's `sequence_logps`
    (averaged iff ``loss_type == "ipo"``), never given a gradient. ``chosen_logps`` / ``rejected_logps`` (B,) are
    `sequence_logps` of the two halves (averaged iff ``loss_type == "ipo"``) and ``loss`` the mean over pairs of
    `preference_loss` (a scalar), all in at least float32 (float64 for float64 inputs). Gradients of all three
    outputs flow to ``hidden`` and ``weight``. ``chunk_size``: tokens per chunk of the head (default about 8 MiB of
    float32 logits).

    Sources: Rafailov et al. 2023 (DPO), Azar et al. 2023 (IPO), Mitchell 2023 (cDPO), Zhao et al. 2023 (SLiC);
    TRL ``DPOTrainer`` (names, metrics), Liger-Kernel ``LigerFusedLinearDPOLoss`` (fused layout). Raises ValueError
    for bad shapes or dtypes, an odd or zero number of rows, an unknown ``loss_type``, ``beta <= 0`` or
    ``label_smoothing`` outside [0, 0.5].
    """
    _check_loss_args(beta, loss_type, label_smoothing)
    _check_head(hidden, weight, targets)
    _check_chunk(chunk_size)
    rows = hidden.shape[0]
    if rows == 0 or rows % 2:
        raise ValueError(f"hidden must hold 2B rows (B >= 1 chosen, then B rejected), got {rows} rows")
    pairs = rows // 2
    for name, ref in (("ref_chosen_logps", ref_chosen_logps), ("ref_rejected_logps", ref_rejected_logps)):
        if not isinstance(ref, torch.Tensor) or tuple(ref.shape) != (pairs,) or not ref.dtype.is_floating_point:
            got = f"{tuple(ref.shape)} {ref.dtype}" if isinstance(ref, torch.Tensor) else type(ref).__name__
            raise ValueError(f"{name} must be a float tensor of shape ({pairs},) (one per pair), got {got}")
    logps = sequence_logps(hidden, weight, targets, ignore_index, average=loss_type == "ipo", chunk_size=chunk_size)
    chosen, rejected = logps[:pairs], logps[pairs:]
    losses = preference_loss(chosen, rejected, ref_chosen_logps, ref_rejected_logps, beta, loss_type,
                             label_smoothing)
    return losses.mean(), chosen, rejected
