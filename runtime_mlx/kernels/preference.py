"""Preference optimization in MLX: the DPO family (TRL ``DPOTrainer``'s ``loss_type`` ``sigmoid``, ``hinge``,
``ipo``) fused with the LM head and chunked over tokens.

`sequence_logps` sums the per-token log-probabilities of the completion tokens; it is
`runtime_mlx.kernels.cross_entropy.linear_cross_entropy` with ``reduction="none"`` (``logp = -CE``), so the
(B, T, V) logits never exist at once and the chunked VJP (with the fused Metal cross-entropy kernels on Apple
Silicon) gives the gradients of ``hidden`` and ``weight``; no kernel of its own. `preference_loss` is the
per-pair loss on sequence log-probabilities (a few elementwise ops on (B,) arrays), and `preference` puts the two
together on a batch of chosen and rejected sequences.

Reference: `reference.preference` (the definition of correct); sources: Rafailov et al. 2023 (DPO, eq. 7),
Azar et al. 2023 (IPO, eq. 17), Zhao et al. 2023 (SLiC, the hinge loss), Mitchell 2023 (cDPO,
``label_smoothing``), and TRL's ``DPOTrainer.dpo_loss`` (names, and ``label_smoothing`` as TRL applies it).
"""

from __future__ import annotations

import math

import mlx.core as mx

from .cross_entropy import linear_cross_entropy
from .launch import check_float, check_shape, f32

LOSS_TYPES = ("sigmoid", "hinge", "ipo")


def _check_head(hidden, weight) -> None:
    check_float("hidden", hidden)
    check_float("weight", weight)
    if hidden.ndim != 3 or weight.ndim != 2 or hidden.shape[2] != weight.shape[1]:
        raise ValueError(f"expected hidden (B, T, H) and weight (V, H); got {tuple(hidden.shape)}, "
                         f"{tuple(weight.shape)}")
    if hidden.shape[0] == 0 or hidden.shape[1] == 0:
        raise ValueError(f"hidden: expected at least one sequence and one position, got {tuple(hidden.shape)}")


def _check_targets_2d(targets, shape: tuple) -> None:
    if not isinstance(targets, mx.array) or targets.dtype not in (mx.int32, mx.int64):
        raise TypeError(f"targets: expected an int32/int64 mx.array, got {getattr(targets, 'dtype', None)}")
    check_shape("targets", targets, shape)


def _check_chunk_size(chunk_size) -> None:
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")


def sequence_logps(hidden: mx.array, weight: mx.array, targets: mx.array, ignore_index: int = -100,
                   average: bool = False, chunk_size: int | None = None) -> mx.array:
    """Log-probability of each sequence's completion tokens under the LM head, fused and chunked over tokens.

    ``hidden`` (B, T, H) and ``weight`` (V, H) float (float32, float16 or bfloat16; two dtypes run in the
    promoted one, and the logits of a chunk are in it, the softmax in float32); ``targets`` (B, T) int32/int64,
    already aligned: ``targets[b, t]`` is the token predicted from ``hidden[b, t]``, or
    ``ignore_index`` where position t is not a completion token. Returns (B,) float32:
    ``sum_t log_softmax(hidden[b, t] @ weight.T)[targets[b, t]]`` over the non-ignored t; with ``average`` that
    sum divided by the row's count of non-ignored tokens (0, not NaN, for a row with none). TRL's
    ``DPOTrainer.get_batch_logps`` / ``concatenated_forward`` (``average_log_prob``).

    The B*T tokens run through `linear_cross_entropy` (``reduction="none"``, ``chunk_size`` tokens per chunk,
    default `cross_entropy.default_chunk_size`), so only one chunk's (chunk, V) logits exist at a time, in forward
    and backward. Differentiable in ``hidden`` and ``weight``. Raises TypeError on non-float inputs or non-integer
    targets, ValueError on mismatched shapes, an empty batch, or a non-positive ``chunk_size``.
    """
    _check_head(hidden, weight)
    b, t, h = hidden.shape
    _check_targets_2d(targets, (b, t))
    _check_chunk_size(chunk_size)
    if hidden.dtype != weight.dtype:  # as the reference: the head runs in the promoted dtype
        dtype = mx.result_type(hidden, weight)
        hidden, weight = hidden.astype(dtype), weight.astype(dtype)
    flat = targets.reshape(-1)
    losses = linear_cross_entropy(hidden.reshape(b * t, h), weight, flat, ignore_index, reduction="none",
                                  chunk_size=chunk_size)
    logps = -losses.reshape(b, t).sum(axis=-1)
    if not average:
        return logps
    count = (targets != ignore_index).sum(axis=-1).astype(mx.float32)
    return logps / mx.maximum(count, 1.0)  # a row without completion tokens: 0 / 1 = 0


def _log_sigmoid(x: mx.array) -> mx.array:
    """``log(sigmoid(x)) = -log(1 + exp(-x))``, finite for every finite x (no overflow of exp)."""
    return -mx.logaddexp(mx.zeros_like(x), -x)


def _check_loss_args(beta, loss_type, label_smoothing) -> None:
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if isinstance(beta, bool) or not isinstance(beta, int | float) or not 0 < beta < math.inf:
        raise ValueError(f"beta must be a positive finite number, got {beta!r}")
    if (isinstance(label_smoothing, bool) or not isinstance(label_smoothing, int | float)
            or not 0.0 <= label_smoothing <= 0.5):
        raise ValueError(f"label_smoothing must lie in [0, 0.5], got {label_smoothing!r}")


def preference_loss(chosen_logps: mx.array, rejected_logps: mx.array, ref_chosen_logps: mx.array,
                    ref_rejected_logps: mx.array, beta: float = 0.1, loss_type: str = "sigmoid",
                    label_smoothing: float = 0.0) -> mx.array:
    """Per-pair DPO-family losses (B,) float32 from sequence log-probabilities, as TRL's ``DPOTrainer.dpo_loss``.

    All four inputs (B,) float (any float dtype; computed in float32). With
    ``logits = (chosen_logps - rejected_logps) - (ref_chosen_logps - ref_rejected_logps)``:

    - ``"sigmoid"`` (DPO; cDPO with ``label_smoothing``):
      ``-logsigmoid(beta * logits) * (1 - label_smoothing) - logsigmoid(-beta * logits) * label_smoothing``;
    - ``"hinge"`` (SLiC): ``relu(1 - beta * logits)``;
    - ``"ipo"``: ``(logits - 1 / (2 * beta)) ** 2`` (the caller passes length-averaged log-probabilities, as
      `preference` does).

    Differentiable in ``chosen_logps`` and ``rejected_logps``; the reference model's log-probabilities are held
    constant (``mx.stop_gradient``: no gradient reaches them, as the reference detaches them). Raises ValueError
    on an unknown ``loss_type``, a ``beta`` that is not positive and finite, a ``label_smoothing`` outside
    [0, 0.5] (TRL's cDPO range), or inputs that are not one (B,) shape; TypeError on non-float inputs.
    """
    _check_loss_args(beta, loss_type, label_smoothing)
    names = ("chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps")
    arrays = (chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    for name, a in zip(names, arrays, strict=True):
        check_float(name, a)
        if a.ndim != 1:
            raise ValueError(f"{name}: expected shape (B,), got {tuple(a.shape)}")
        check_shape(name, a, chosen_logps.shape)
    pc, pr = f32(chosen_logps), f32(rejected_logps)
    rc, rr = (mx.stop_gradient(f32(a)) for a in (ref_chosen_logps, ref_rejected_logps))
    logits = (pc - pr) - (rc - rr)
    if loss_type == "sigmoid":
        losses = -_log_sigmoid(beta * logits) * (1.0 - label_smoothing)
        return losses - _log_sigmoid(-beta * logits) * label_smoothing if label_smoothing else losses
    if loss_type == "hinge":
        return mx.maximum(1.0 - beta * logits, 0.0)
    return (logits - 1.0 / (2.0 * beta)) ** 2


def preference(hidden: mx.array, weight: mx.array, targets: mx.array, ref_chosen_logps: mx.array,
               ref_rejected_logps: mx.array, beta: float = 0.1, loss_type: str = "sigmoid",
               label_smoothing: float = 0.0, ignore_index: int = -100,
               chunk_size: int | None = None) -> tuple[mx.array, mx.array, mx.array]:
    """The DPO-family loss of a batch of preference pairs, fused with the LM head and chunked over tokens.

    ``hidden`` (2B, T, H) and ``weight`` (V, H) float: rows [0, B) are the chosen sequences and rows
    [B, 2B) the rejected ones (TRL's concatenated forward); ``targets`` (2B, T) int32/int64, aligned as in
    `sequence_logps` (``ignore_index`` off the completion); ``ref_chosen_logps`` / ``ref_rejected_logps`` (B,)
    float, the reference model's sequence log-probabilities (held constant: no gradient flows to them).

    Returns ``(loss, chosen_logps, rejected_logps)``, float32: ``chosen_logps`` / ``rejected_logps`` (B,) are
    `sequence_logps` of the two halves (length-averaged for ``loss_type="ipo"``, summed otherwise) and ``loss``
    the scalar mean over pairs of `preference_loss`. The gradients of all three outputs reach ``hidden`` and
    ``weight`` (one chunked pass over the 2B*T tokens). TRL's metrics follow from the outputs:
    ``rewards/chosen = beta * (chosen_logps - ref_chosen_logps)``, and so on.

    Raises ValueError on an odd or empty batch of sequences, ``ref_*`` that are not (B,), an unknown
    ``loss_type``, ``beta`` not positive and finite, ``label_smoothing`` outside [0, 0.5], or the errors of
    `sequence_logps`; TypeError on non-float or non-integer inputs.
    """
    _check_loss_args(beta, loss_type, label_smoothing)
    _check_head(hidden, weight)
    if hidden.shape[0] % 2:
        raise ValueError(f"hidden: expected 2B rows (B chosen, then B rejected), got {hidden.shape[0]}")
    b = hidden.shape[0] // 2
    for name, a in (("ref_chosen_logps", ref_chosen_logps), ("ref_rejected_logps", ref_rejected_logps)):
        check_float(name, a)
        check_shape(name, a, (b,))
    _check_targets_2d(targets, hidden.shape[:2])
    logps = sequence_logps(hidden, weight, targets, ignore_index, average=loss_type == "ipo", chunk_size=chunk_size)
    chosen, rejected = logps[:b], logps[b:]
    losses = preference_loss(chosen, rejected, ref_chosen_logps, ref_rejected_logps, beta, loss_type,
                             label_smoothing)
    return losses.mean(), chosen, rejected


__all__ = ["LOSS_TYPES", "preference", "preference_loss", "sequence_logps"]
