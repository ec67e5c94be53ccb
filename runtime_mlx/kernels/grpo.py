"""GRPO in MLX: the clipped policy loss with the k3 KL penalty (TRL ``GRPOTrainer``'s ``loss_type`` ``grpo``,
``bnpo``, ``dr_grpo``, ``dapo``), fused with the LM head and chunked over tokens.

`token_stats` gives each completion token's log-probability and entropy at the sampling temperature as one
``mx.custom_function`` over chunks of tokens, so the (N*T, V) logits never exist at once: the forward forms a chunk's
float32 logits and reduces them in pure MLX (the row's largest logit's own softmax term kept apart, ``lse = m +
log1p(rest)``, as `reference.grpo`); the VJP forms them again and takes ``d logp / d logits`` from the VJP of
`runtime_mlx.kernels.cross_entropy.cross_entropy` (its fused Metal backward kernel on Apple Silicon), so GRPO has
no kernel of its own. `grpo_loss` is the loss on the (N, T) log-probs (elementwise ops and sums), and `grpo` puts
the two together.

Reference: `reference.grpo` (the definition of correct: formulas, the clamp of both log-ratios to +-20 before the
exponential, the aggregation, the metrics); sources: Shao et al. 2024 (DeepSeekMath section 4.1, eq. 3 and 4), Yu
et al. 2025 (DAPO), Liu et al. 2025 (Dr. GRPO), TRL's ``GRPOTrainer._compute_loss`` (names, metrics).
"""

from __future__ import annotations

from functools import cache

import mlx.core as mx

from reference.distill import _number
from reference.grpo import LOG_RATIO_BOUND, LOSS_TYPES, METRICS, _check_loss_args

from .cross_entropy import cross_entropy, default_chunk_size
from .launch import check_float, check_shape, f32

_IGNORE = -100  # the target `grpo` gives the head at positions outside the completion mask


def _stats(x: mx.array, targets: mx.array):
    """``(logp, entropy)`` (n,) float32 of the rows of ``x`` (n, V), float32 logits already divided by the
    temperature, for ``targets`` (n,) in [0, V): with ``m`` the row's largest logit (at k) and ``rest = sum_{j != k}
    exp(x_j - m)``, ``logp = (x[target] - m) - log1p(rest)`` and ``entropy = log1p(rest) - sum_{j != k} e_j (x_j - m)
    / (1 + rest)``; -inf logits count 0 (no 0 * inf is formed)."""
    m = x.max(axis=-1, keepdims=True)
    d = x - m
    k = mx.argmax(x, axis=-1, keepdims=True)
    e = mx.where(mx.arange(x.shape[-1]) == k, 0.0, mx.exp(d))  # the largest logit's term (exactly 1) apart
    rest = e.sum(axis=-1)
    log_s = mx.log1p(rest)
    a = (e * mx.where(e > 0, d, 0.0)).sum(axis=-1)
    picked = mx.take_along_axis(d, targets[:, None], axis=-1)[:, 0]
    return picked - log_s, log_s - a / (1.0 + rest)


@cache
def _chunked(temperature: float, chunk: int):
    """``(logps, entropy)`` (N,) float32 of ``log_softmax(hidden @ weight.T / temperature)`` at the targets as one
    custom function of (hidden (N, H), weight float32 (V, H), targets int32 with -100 at ignored tokens).

    Forward: per chunk of ``chunk`` tokens, the float32 logits (the hidden chunk upcast) and `_stats`; ignored tokens
    give 0. VJP (the log-probs' cotangent ``g``; the entropy's is ignored: a metric): per chunk, the logits again,
    ``dx`` from the VJP of `cross_entropy` with cotangent ``-g`` (``g * (onehot - softmax)``, 0 at ignored tokens; the
    fused Metal kernel on the Metal path), ``dz = dx / temperature``, ``d_hidden = dz @ weight`` (cast to the hidden's
    dtype) and ``d_weight += dz.T @ hidden_chunk`` in float32. Each chunk starts only after the previous one is
    consumed (``mx.depends``), so evaluation holds one chunk's logits at a time however MLX orders the graph."""

    @mx.custom_function
    def f(hidden, weight, targets):
        logps, entropies, prev = [], [], []
        for s in range(0, hidden.shape[0], chunk):
            h = mx.depends(hidden[s:s + chunk], prev) if prev else hidden[s:s + chunk]
            t = targets[s:s + chunk]
            valid = t != _IGNORE
            logp, entropy = _stats((f32(h) @ weight.T) / temperature, mx.where(valid, t, 0))
            logps.append(mx.where(valid, logp, 0.0))
            entropies.append(mx.where(valid, entropy, 0.0))
            prev = [logps[-1], entropies[-1]]
        return mx.concatenate(logps), mx.concatenate(entropies)

    @f.vjp
    def f_vjp(primals, cotangents, outputs):
        hidden, weight, targets = primals
        g_all = cotangents[0]
        dw = mx.zeros(weight.shape, mx.float32)
        dhs = []
        for s in range(0, hidden.shape[0], chunk):
            h = mx.depends(hidden[s:s + chunk], [dw, dhs[-1]]) if dhs else hidden[s:s + chunk]
            t, h = targets[s:s + chunk], f32(h)
            _, (dx,) = mx.vjp(lambda x, t=t: cross_entropy(x, t, _IGNORE), [(h @ weight.T) / temperature],
                              [-f32(g_all[s:s + chunk])])
            dz = f32(dx) / temperature
            dhs.append((dz @ weight).astype(hidden.dtype))
            dw = dw + dz.T @ h
        return mx.concatenate(dhs), dw, mx.zeros_like(targets)

    del f_vjp
    return f


def _check_head(hidden, weight, targets) -> tuple[int, int]:
    """(N, T) after the checks of hidden (N, T, H) or (N*T, H), weight (V, H), targets (N, T) int32/int64."""
    check_float("hidden", hidden)
    check_float("weight", weight)
    if not isinstance(targets, mx.array) or targets.dtype not in (mx.int32, mx.int64):
        raise TypeError(f"targets: expected an int32/int64 mx.array, got {getattr(targets, 'dtype', None)}")
    ok = targets.ndim == 2 and weight.ndim == 2 and hidden.shape[-1] == weight.shape[1] and (
        (hidden.ndim == 3 and tuple(hidden.shape[:2]) == tuple(targets.shape))
        or (hidden.ndim == 2 and hidden.shape[0] == targets.size))
    if not ok:
        raise ValueError(f"expected hidden (N, T, H) or (N*T, H), weight (V, H), targets (N, T); got "
                         f"{tuple(hidden.shape)}, {tuple(weight.shape)}, {tuple(targets.shape)}")
    n, t = targets.shape
    if n == 0 or t == 0 or weight.shape[0] == 0:
        raise ValueError(f"expected at least one sequence, one position and one vocabulary entry, got targets "
                         f"{tuple(targets.shape)} and weight {tuple(weight.shape)}")
    return n, t


def _check_chunk_size(chunk_size) -> None:
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")


def token_stats(hidden: mx.array, weight: mx.array, targets: mx.array, temperature: float = 1.0,
                ignore_index: int = -100, chunk_size: int | None = None) -> tuple[mx.array, mx.array]:
    """`token_logps` and each token's entropy (nats, of ``softmax(logits / temperature)``, 0 at ignored tokens, held
    constant: no gradient): ``(logps, entropy)``, (N, T) float32 each. Same arguments and errors as `token_logps`."""
    n, t = _check_head(hidden, weight, targets)
    _number("temperature", temperature, 0.0, low_open=True)
    _check_chunk_size(chunk_size)
    flat = targets.reshape(-1)
    flat = mx.where(flat == ignore_index, _IGNORE, flat).astype(mx.int32)
    chunk = default_chunk_size(weight.shape[0]) if chunk_size is None else chunk_size
    # float32 logits (one float32 copy of a half-precision head, shared by forward and VJP; its gradient flows back
    # through the cast): bfloat16 logits would round the log-probs by more than the bound at low temperatures.
    logps, entropy = _chunked(float(temperature), chunk)(hidden.reshape(n * t, hidden.shape[-1]), f32(weight), flat)
    return logps.reshape(n, t), mx.stop_gradient(entropy).reshape(n, t)


def token_logps(hidden: mx.array, weight: mx.array, targets: mx.array, temperature: float = 1.0,
                ignore_index: int = -100, chunk_size: int | None = None) -> mx.array:
    """Per-token log-probability of the targets at a temperature, ``log_softmax(hidden @ weight.T / temperature)
    [targets]``, fused with the head and chunked over tokens: the old and reference log-probs of `grpo`.

    ``hidden`` (N, T, H) or (N*T, H) and ``weight`` (V, H) float (float32, float16 or bfloat16, each its own; the
    logits are float32); ``targets`` (N, T) int32/int64 in [0, V) or ``ignore_index`` (0 there, no gradient),
    aligned with hidden. ``chunk_size``: tokens per chunk (default `cross_entropy.default_chunk_size`, about 8 MiB of
    float32 logits). Returns (N, T) float32, differentiable in ``hidden`` and ``weight`` (gradients in their dtypes;
    the VJP recomputes each chunk's logits), though the trainer calls it outside any gradient. Raises TypeError on
    non-float inputs or non-integer targets, ValueError on mismatched shapes, an empty batch, a ``temperature`` that
    is not positive and finite, or a non-positive ``chunk_size``.
    """
    return token_stats(hidden, weight, targets, temperature, ignore_index, chunk_size)[0]


def _clamp(x: mx.array) -> mx.array:
    """``x`` clamped to [-LOG_RATIO_BOUND, LOG_RATIO_BOUND], its gradient passed on the closed interval (as
    ``torch.clamp``'s; ``mx.clip``'s is 0 at the bounds)."""
    return mx.where(mx.abs(x) <= LOG_RATIO_BOUND, x, mx.clip(x, -LOG_RATIO_BOUND, LOG_RATIO_BOUND))


def _masked_mean(x: mx.array, valid: mx.array, count: mx.array) -> mx.array:
    return mx.stop_gradient(mx.where(valid, x, 0.0).sum() / count)


def grpo_loss(logps: mx.array, completion_mask: mx.array, advantages: mx.array, old_logps: mx.array | None = None,
              ref_logps: mx.array | None = None, beta: float = 0.0, epsilon_low: float = 0.2,
              epsilon_high: float = 0.2, loss_type: str = "dapo", max_completion_length: int | None = None):
    """GRPO's loss and metrics from the policy's per-token log-probs, as `reference.grpo.grpo_loss` (same
    arguments, mx arrays): ``(loss, kl, clip_ratio/low_mean, clip_ratio/high_mean, clip_ratio/region_mean)``,
    float32 scalars; only ``loss`` is differentiable (in ``logps``; the old and reference log-probs and the
    advantages are held constant). The clipped minimum is written as a selection with ``torch.minimum``'s total
    gradient (a tie, ``coef_1`` inside the clip range, counts as unclipped). Raises the reference's ValueErrors;
    TypeError on non-float log-probs or advantages."""
    _check_loss_args(beta, epsilon_low, epsilon_high, loss_type, max_completion_length)
    check_float("logps", logps)
    if logps.ndim != 2:
        raise ValueError(f"logps: expected shape (N, T), got {tuple(logps.shape)}")
    n, t = logps.shape
    if not isinstance(completion_mask, mx.array):
        raise TypeError(f"completion_mask: expected an mx.array, got {type(completion_mask).__name__}")
    check_shape("completion_mask", completion_mask, (n, t))
    check_float("advantages", advantages)
    check_shape("advantages", advantages, (n,))
    for name, x in (("old_logps", old_logps), ("ref_logps", ref_logps)):
        if x is not None:
            check_float(name, x)
            check_shape(name, x, (n, t))
    if beta > 0 and ref_logps is None:
        raise ValueError("beta > 0 needs ref_logps (the reference model's per-token log-probs)")
    valid = completion_mask != 0
    lp = mx.where(valid, f32(logps), 0.0)
    old = mx.stop_gradient(lp) if old_logps is None else mx.where(valid, mx.stop_gradient(f32(old_logps)), 0.0)
    adv = mx.stop_gradient(f32(advantages))[:, None]
    coef_1 = mx.exp(_clamp(lp - old))
    low = (coef_1 < 1 - epsilon_low) & (adv < 0)
    high = (coef_1 > 1 + epsilon_high) & (adv > 0)
    clipped = mx.stop_gradient(mx.clip(coef_1, 1 - epsilon_low, 1 + epsilon_high))
    per_token = -mx.where(low | high, clipped, coef_1) * adv  # -min(coef_1 A, clip(coef_1) A)
    kl = None
    if ref_logps is not None:
        d = _clamp(mx.where(valid, mx.stop_gradient(f32(ref_logps)), 0.0) - lp)
        kl = mx.expm1(d) - d  # exp(d) - d - 1
        if beta > 0:
            per_token = per_token + beta * kl
    per_token = mx.where(valid, per_token, 0.0)
    count = valid.sum(axis=-1).astype(mx.float32)
    total = mx.maximum(count.sum(), 1.0)
    if loss_type == "grpo":
        loss = (per_token.sum(axis=-1) / mx.maximum(count, 1.0)).mean()
    elif loss_type == "dr_grpo":
        loss = per_token.sum() / (n * max_completion_length)
    else:  # bnpo, dapo
        loss = per_token.sum() / total
    metrics = [mx.array(0.0) if kl is None else _masked_mean(kl, valid, total)]
    metrics += [_masked_mean(x.astype(mx.float32), valid, total) for x in (low, high, low | high)]
    return loss, *metrics


def grpo(hidden: mx.array, weight: mx.array, targets: mx.array, completion_mask: mx.array, advantages: mx.array,
         old_logps: mx.array | None = None, ref_logps: mx.array | None = None, beta: float = 0.0,
         epsilon_low: float = 0.2, epsilon_high: float = 0.2, temperature: float = 1.0, loss_type: str = "dapo",
         max_completion_length: int | None = None, chunk_size: int | None = None):
    """GRPO's loss of N completions, fused with the LM head and chunked over tokens: ``(loss, kl,
    clip_ratio/low_mean, clip_ratio/high_mean, clip_ratio/region_mean, entropy)`` (the names of `METRICS` after the
    loss), float32 scalars.

    ``hidden`` (N, T, H) or (N*T, H) and ``weight`` (V, H) float; ``targets`` (N, T) int32/int64 (any value outside
    the mask); ``completion_mask`` (N, T) (nonzero: the token's loss counts); ``advantages`` (N,) float;
    ``old_logps``, ``ref_logps`` (N, T) float or None. The arguments, formulas, clamps and metrics are
    `reference.grpo.grpo`'s. The loss is differentiable in ``hidden`` and ``weight`` (gradients in their dtypes);
    the metrics are held constant. Raises TypeError/ValueError as `grpo_loss` and `token_logps`.
    """
    _check_loss_args(beta, epsilon_low, epsilon_high, loss_type, max_completion_length)  # before the head's pass
    n, t = _check_head(hidden, weight, targets)
    if not isinstance(completion_mask, mx.array):
        raise TypeError(f"completion_mask: expected an mx.array, got {type(completion_mask).__name__}")
    check_shape("completion_mask", completion_mask, (n, t))
    valid = completion_mask != 0
    logps, entropy = token_stats(hidden, weight, mx.where(valid, targets, _IGNORE), temperature, _IGNORE, chunk_size)
    out = grpo_loss(logps, completion_mask, advantages, old_logps, ref_logps, beta, epsilon_low, epsilon_high,
                    loss_type, max_completion_length)
    total = mx.maximum(valid.sum().astype(mx.float32), 1.0)
    return *out, _masked_mean(entropy, valid, total)


__all__ = ["LOSS_TYPES", "METRICS", "grpo", "grpo_loss", "token_logps", "token_stats"]
