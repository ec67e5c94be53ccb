"""Cross-entropy in MLX: per-token over given logits (`cross_entropy`: the Metal kernels of
``kernels/metal/cross_entropy.metal``, forward and a fused backward as a custom VJP, or pure MLX), and fused with
the LM head over chunks of tokens (`linear_cross_entropy`, which calls `cross_entropy` per chunk).
Reference: `reference.cross_entropy.linear_cross_entropy`; Triton: `kernels.triton.cross_entropy`."""

from __future__ import annotations

from functools import cache

import mlx.core as mx

from .launch import Launch, check_close, check_float, check_shape, f32, run, sample, spec, tg_size, use_metal

FWD = spec("cross_entropy_fwd", "cross_entropy", "logits targets ignore_index", "loss lse")
BWD = spec("cross_entropy_bwd", "cross_entropy", "logits targets g ignore_index", "dlogits")
REDUCTIONS = ("mean", "sum", "none")
_TG = 256


def cross_entropy_mlx(logits, targets, ignore_index=-100):
    """Pure MLX `cross_entropy` (same contract)."""
    lf = f32(logits)
    lse = mx.logsumexp(lf, axis=-1)
    valid = targets != ignore_index
    picked = mx.take_along_axis(lf, mx.where(valid, targets, 0)[:, None].astype(mx.int32), axis=-1)[:, 0]
    return mx.where(valid, lse - picked, 0.0)


def cross_entropy_launch(logits, targets, ignore_index) -> Launch:
    """Forward: one threadgroup of TG (32..256) threads per row, grid (N*TG, 1, 1); a strided online logsumexp,
    merged by simd and threadgroup reductions. Outputs ``loss`` (N,) and ``lse`` (N,) float32."""
    n, v = logits.shape
    tg = tg_size(v, _TG)
    return Launch(FWD, [logits, targets, mx.array(int(ignore_index), dtype=mx.int32)],
                  [("T", logits.dtype), ("V", v), ("TG", tg)],
                  (n * tg, 1, 1), (tg, 1, 1), [(n,), (n,)], [mx.float32, mx.float32])


def cross_entropy_bwd_launch(logits, targets, g, ignore_index) -> Launch:
    """Backward: ``dlogits[n, v] = g[n] * (exp(logits[n, v] - lse[n]) - [v == target[n]])``, 0 on ignored rows,
    with each row's logsumexp recomputed in the kernel (fused: one read for lse, one read + write for dlogits).
    One threadgroup of TG (32..256) threads per row, grid (N*TG, 1, 1). Output (N, V) in logits' dtype."""
    n, v = logits.shape
    tg = tg_size(v, _TG)
    return Launch(BWD, [logits, targets, g, mx.array(int(ignore_index), dtype=mx.int32)],
                  [("T", logits.dtype), ("G", g.dtype), ("V", v), ("TG", tg)],
                  (n * tg, 1, 1), (tg, 1, 1), [(n, v)], [logits.dtype])


def _cross_entropy_metal(logits, targets, ignore_index=-100, runner=None):
    """Returns (loss (N,), lse (N,))."""
    return tuple(run(runner, cross_entropy_launch(logits, targets, ignore_index)))


def _cross_entropy_metal_bwd(logits, targets, g, ignore_index=-100, runner=None):
    (dlogits,) = run(runner, cross_entropy_bwd_launch(logits, targets, g, ignore_index))
    return dlogits


@cache
def _cross_entropy_custom(ignore_index: int):
    @mx.custom_function
    def f(logits, targets):
        return _cross_entropy_metal(logits, targets, ignore_index)[0]

    @f.vjp
    def f_vjp(primals, cotangent, output):
        logits, targets = primals
        return _cross_entropy_metal_bwd(logits, targets, cotangent, ignore_index), mx.zeros_like(targets)

    del f_vjp
    return f


def _self_check(dtype, v: int) -> None:
    """Metal forward and backward against the pure-MLX path on 3 rows of ``v`` logits, one row ignored."""
    logits, g = sample((3, v), 1, dtype) * 3, sample((3,), 2)
    targets = mx.array([v - 1, -100, v // 2], dtype=mx.int32)
    want, (want_d,) = mx.vjp(lambda z: cross_entropy_mlx(z, targets), [logits], [g])
    check_close("cross_entropy", _cross_entropy_metal(logits, targets)[0], want[0], dtype)
    check_close("cross_entropy dlogits", _cross_entropy_metal_bwd(logits, targets, g), want_d, dtype)


def _check_targets(targets, n: int) -> None:
    if not isinstance(targets, mx.array) or targets.dtype not in (mx.int32, mx.int64):
        raise TypeError(f"targets: expected an int32/int64 mx.array, got {getattr(targets, 'dtype', None)}")
    check_shape("targets", targets, (n,))


def cross_entropy(logits: mx.array, targets: mx.array, ignore_index: int = -100) -> mx.array:
    """Per-token cross-entropy over a chunk of logits (fused logsumexp + loss; the VJP kernel gives dlogits).

    ``logits`` (N, V) float, ``targets`` (N,) int32/int64 class ids or ``ignore_index``. Returns per-token losses
    (N,) float32, ``logsumexp(logits[n]) - logits[n, targets[n]]``, and 0 where ``targets == ignore_index``: the
    caller sums and divides by its own count of valid tokens (as MTP needs, DESIGN.md). Equal to
    ``torch.nn.functional.cross_entropy(..., reduction="none", ignore_index=ignore_index)``. Differentiable in
    ``logits``. Raises TypeError/ValueError on bad dtypes or shapes.
    """
    check_float("logits", logits)
    if logits.ndim != 2:
        raise ValueError(f"logits: expected (N, V), got {tuple(logits.shape)}")
    _check_targets(targets, logits.shape[0])
    key = (logits.dtype, logits.shape[1])
    if use_metal("cross_entropy", key, lambda: _self_check(*key)):
        return _cross_entropy_custom(int(ignore_index))(logits, targets.astype(mx.int32))
    return cross_entropy_mlx(logits, targets, ignore_index)


# ---------------------------------------------------------------------------------------------------------------
# Fused with the LM head, chunked over tokens
# ---------------------------------------------------------------------------------------------------------------


def default_chunk_size(v: int) -> int:
    """Rows per chunk of `linear_cross_entropy`: about 8 MiB of float32 logits (as the reference), at least 16."""
    return max(16, (1 << 21) // max(1, v))


@cache
def _chunked(ignore_index: int, chunk: int):
    """The per-token losses ``cross_entropy(hidden @ weight.T, targets)`` (N,) float32 as one custom function.

    Forward: per chunk of ``chunk`` rows, its logits and their losses. VJP (cotangent ``g`` (N,)): per chunk, the
    logits again, ``dlogits = g * (softmax - onehot)`` (the VJP of `cross_entropy`: the fused Metal kernel on the
    Metal path), ``d_hidden = dlogits @ weight`` and ``d_weight += dlogits.T @ hidden_chunk`` in float32. Each
    chunk starts only after the previous one is consumed (``mx.depends``), so evaluation holds one chunk's
    (chunk, V) logits at a time however MLX orders the graph.
    """

    @mx.custom_function
    def f(hidden, weight, targets):
        losses, prev = [], []
        for s in range(0, hidden.shape[0], chunk):
            h = mx.depends(hidden[s:s + chunk], prev) if prev else hidden[s:s + chunk]
            losses.append(cross_entropy(h @ weight.T, targets[s:s + chunk], ignore_index))
            prev = [losses[-1]]
        return mx.concatenate(losses)

    @f.vjp
    def f_vjp(primals, cotangent, output):
        hidden, weight, targets = primals
        dw = mx.zeros(weight.shape, mx.float32)
        dhs = []
        for s in range(0, hidden.shape[0], chunk):
            h = mx.depends(hidden[s:s + chunk], [dw, dhs[-1]]) if dhs else hidden[s:s + chunk]
            t, g = targets[s:s + chunk], cotangent[s:s + chunk]
            _, (dlogits,) = mx.vjp(lambda z, t=t: cross_entropy(z, t, ignore_index), [h @ weight.T], [g])
            dhs.append((dlogits @ weight).astype(hidden.dtype))
            dw = dw + f32(dlogits.T @ h)
        return mx.concatenate(dhs), dw.astype(weight.dtype), mx.zeros_like(targets)

    del f_vjp
    return f


def linear_cross_entropy(hidden: mx.array, weight: mx.array, targets: mx.array, ignore_index: int = -100,
                         reduction: str = "mean", token_weights: mx.array | None = None,
                         chunk_size: int | None = None) -> mx.array:
    """Cross-entropy of ``logits = hidden @ weight.T``, fused with the head and chunked over tokens, as
    `reference.cross_entropy.linear_cross_entropy` (same arguments): the (N, V) logits never exist at once.

    ``hidden`` (N, H), ``weight`` (V, H) float (one dtype; the logits of a chunk are in it, the softmax in
    float32); ``targets`` (N,) int32/int64 in [0, V) or ``ignore_index``; ``token_weights`` (N,) float or None.
    Returns float32: (N,) for "none" (0 at ignored tokens), else a scalar: the weighted sum, or for "mean" that
    sum / the sum of the non-ignored tokens' weights (their count without weights; NaN when every token is
    ignored, as ``F.cross_entropy``). ``chunk_size``: rows per chunk (default `default_chunk_size`, about 8 MiB
    of float32 logits). Differentiable in ``hidden`` and ``weight`` (not ``token_weights``): the VJP recomputes
    each chunk's logits rather than forming gradients in the forward as the reference does, so a loss computed
    without a gradient costs one matmul per chunk, not three, and "none" takes a per-token cotangent with the
    same code (one matmul more per chunk in training). Raises TypeError/ValueError on bad dtypes, shapes, an
    unknown reduction or a non-positive ``chunk_size``.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    check_float("hidden", hidden)
    check_float("weight", weight)
    if hidden.ndim != 2 or weight.ndim != 2 or hidden.shape[1] != weight.shape[1] or hidden.dtype != weight.dtype:
        raise ValueError(f"expected hidden (N, H) and weight (V, H) of one dtype; got {tuple(hidden.shape)} "
                         f"{hidden.dtype}, {tuple(weight.shape)} {weight.dtype}")
    _check_targets(targets, hidden.shape[0])
    if hidden.shape[0] == 0:
        raise ValueError("hidden: expected at least one token (N >= 1)")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if token_weights is not None:
        check_float("token_weights", token_weights)
        check_shape("token_weights", token_weights, targets.shape)
    chunk = default_chunk_size(weight.shape[0]) if chunk_size is None else chunk_size
    losses = _chunked(int(ignore_index), chunk)(hidden, weight, targets)
    valid = targets != ignore_index
    w = valid.astype(mx.float32) if token_weights is None else mx.where(valid, f32(mx.stop_gradient(token_weights)), 0)
    losses = losses * w if token_weights is not None else losses
    if reduction == "none":
        return losses
    total = losses.sum()
    return total / w.sum() if reduction == "mean" else total
