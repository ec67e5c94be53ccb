"""Knowledge distillation in MLX: the generalized Jensen-Shannon divergence of GKD between a student and a teacher,
plus the student's cross-entropy, per token over given logits (`distill_logits`: the Metal kernels of
``kernels/metal/distill.metal``, forward and a fused backward as a custom VJP, or pure MLX), and fused with both
LM heads over chunks of tokens (`distill`, which calls `distill_logits` per chunk).

Reference: `reference.distill.distill` (the definition of correct). Sources: Agarwal et al. 2024 (GKD, "On-Policy
Distillation of Language Models", the generalized JSD_beta), TRL's ``GKDTrainer.generalized_jsd_loss`` and
Liger-Kernel's ``LigerFusedLinearJSDLoss`` (beta == 0 is the forward KL(p_t || p_s), beta == 1 the reverse
KL(p_s || p_t), the hard/soft weighting and the temperature on both distributions).
"""

from __future__ import annotations

import math
from functools import cache

import mlx.core as mx

from .cross_entropy import _check_targets
from .launch import Launch, check_close, check_float, check_shape, f32, run, sample, scalar, spec, tg_size, use_metal

FWD = spec("distill_fwd", "distill", "z u targets ignore_index beta inv_temp", "soft hard")
BWD = spec("distill_bwd", "distill", "z u targets gs gh ignore_index beta inv_temp", "dz")
_TG = 256


def _mode(beta: float) -> int:
    """The kernels' MODE: 0 for beta == 0 (forward KL), 1 for beta == 1 (reverse KL), 2 in between (JSD_beta)."""
    return 0 if beta == 0 else 1 if beta == 1 else 2


# ---------------------------------------------------------------------------------------------------------------
# Pure MLX
# ---------------------------------------------------------------------------------------------------------------


def _prepare(z, u, targets, temperature, ignore_index):
    """The validity mask, float32 student logits, and the log-probabilities of ``z / temperature`` and
    ``u / temperature``. Ignored rows are computed like the others (a masked row gives NaN there) and the callers
    select them away with ``mx.where``, never multiply: no graph is differentiated through these, so the NaN stays
    out of every result."""
    zf = f32(z)
    s, t = (zf, f32(u)) if temperature == 1.0 else (zf / temperature, f32(u) / temperature)
    return targets != ignore_index, zf, _log_softmax(s), _log_softmax(t)


def _log_softmax(x):
    """``(x - max) - log(sum(exp(x - max)))``: near the maximum, more accurate than ``x - logsumexp(x)`` (whose
    rounding grows with the logits' magnitude)."""
    shifted = x - mx.stop_gradient(x.max(axis=-1, keepdims=True))
    return shifted - mx.log(mx.exp(shifted).sum(axis=-1, keepdims=True))


def _log_mix(lps, lpt, beta):
    """``log(beta * p_t + (1 - beta) * p_s)`` from the log-probabilities (0 < beta < 1)."""
    return mx.logaddexp(lpt + math.log(beta), lps + math.log(1.0 - beta))


def _xlogy_diff(p, a, b):
    """``p * (a - b)`` with 0 where ``p == 0`` (so ``0 * (-inf)`` is 0, not NaN)."""
    return mx.where(p > 0, p * (a - b), 0.0)


def distill_logits_mlx(z, u, targets, beta=0.5, temperature=1.0, ignore_index=-100):
    """Pure MLX `distill_logits` (same contract, forward only): returns ``(soft (N,), hard (N,))`` float32."""
    valid, zf, lps, lpt = _prepare(z, u, targets, temperature, ignore_index)
    ps, pt = mx.exp(lps), mx.exp(lpt)
    if beta == 0:
        terms = _xlogy_diff(pt, lpt, lps)
    elif beta == 1:
        terms = _xlogy_diff(ps, lps, lpt)
    else:
        lm = _log_mix(lps, lpt, beta)
        terms = beta * _xlogy_diff(pt, lpt, lm) + (1.0 - beta) * _xlogy_diff(ps, lps, lm)
    picked = mx.take_along_axis(zf, mx.where(valid, targets, 0)[:, None].astype(mx.int32), axis=-1)[:, 0]
    soft = mx.where(valid, terms.sum(axis=-1), 0.0)
    zmax = zf.max(axis=-1)
    hard = mx.where(valid, (zmax - picked) + mx.log(mx.exp(zf - zmax[:, None]).sum(axis=-1)), 0.0)
    return soft, hard


def distill_logits_mlx_bwd(z, u, targets, gs, gh, beta=0.5, temperature=1.0, ignore_index=-100):
    """Pure MLX VJP of `distill_logits` with respect to the student logits: ``dz`` (N, V) in ``z``'s dtype for the
    cotangents ``gs`` (N,) of soft and ``gh`` (N,) of hard (the formulas of the Metal backward kernel)."""
    valid, zf, lps, lpt = _prepare(z, u, targets, temperature, ignore_index)
    ps = mx.exp(lps)
    if beta == 0:
        ds = ps - mx.exp(lpt)
    else:
        other = lpt if beta == 1 else _log_mix(lps, lpt, beta)
        kl = _xlogy_diff(ps, lps, other).sum(axis=-1, keepdims=True)
        ds = mx.where(ps > 0, ps * (lps - other - kl), 0.0) * (1.0 if beta == 1 else 1.0 - beta)
    q = mx.softmax(zf, axis=-1)
    onehot = mx.arange(z.shape[-1])[None, :] == targets[:, None]
    dz = f32(gh)[:, None] * (q - onehot) + (f32(gs) / temperature)[:, None] * ds
    return mx.where(valid[:, None], dz, 0.0).astype(z.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Metal
# ---------------------------------------------------------------------------------------------------------------


def distill_launch(z, u, targets, beta, temperature, ignore_index) -> Launch:
    """Forward: one threadgroup of TG (32..256) threads per token, grid (N*TG, 1, 1); strided online logsumexps of
    ``z / tau``, ``u / tau`` and ``z``, then the divergence, each merged by simd and threadgroup reductions.
    Outputs ``soft`` (N,) and ``hard`` (N,) float32."""
    n, v = z.shape
    tg = tg_size(v, _TG)
    return Launch(FWD, [z, u, targets, mx.array(int(ignore_index), dtype=mx.int32), scalar(beta),
                        scalar(1.0 / temperature)],
                  [("T", z.dtype), ("U", u.dtype), ("V", v), ("TG", tg), ("MODE", _mode(beta))],
                  (n * tg, 1, 1), (tg, 1, 1), [(n,), (n,)], [mx.float32, mx.float32])


def distill_bwd_launch(z, u, targets, gs, gh, beta, temperature, ignore_index) -> Launch:
    """Backward: ``dz`` (N, V) in ``z``'s dtype, the logsumexps (and for beta > 0 the constant KL term) recomputed
    in the kernel; one threadgroup of TG (32..256) threads per token, grid (N*TG, 1, 1)."""
    n, v = z.shape
    tg = tg_size(v, _TG)
    return Launch(BWD, [z, u, targets, gs, gh, mx.array(int(ignore_index), dtype=mx.int32), scalar(beta),
                        scalar(1.0 / temperature)],
                  [("T", z.dtype), ("U", u.dtype), ("G", gs.dtype), ("V", v), ("TG", tg), ("MODE", _mode(beta))],
                  (n * tg, 1, 1), (tg, 1, 1), [(n, v)], [z.dtype])


def _distill_logits_metal(z, u, targets, beta=0.5, temperature=1.0, ignore_index=-100, runner=None):
    """Returns (soft (N,), hard (N,)) float32. ``targets`` int32."""
    return tuple(run(runner, distill_launch(z, u, targets, beta, temperature, ignore_index)))


def _distill_logits_metal_bwd(z, u, targets, gs, gh, beta=0.5, temperature=1.0, ignore_index=-100, runner=None):
    """Returns dz (N, V) in ``z``'s dtype. ``targets`` int32, ``gs``/``gh`` (N,) float32."""
    (dz,) = run(runner, distill_bwd_launch(z, u, targets, f32(gs), f32(gh), beta, temperature, ignore_index))
    return dz


@cache
def _distill_custom(beta: float, temperature: float, ignore_index: int, metal: bool):
    """`distill_logits` as a custom function of (student logits, teacher logits, targets int32): the forward and
    the VJP (student logits only) on the Metal kernels or in pure MLX. Both paths give the gradient by its closed
    form, so a -inf logit or a masked row never meets ``0 * inf`` in an autodiff chain."""

    @mx.custom_function
    def f(z, u, targets):
        if metal:
            return _distill_logits_metal(z, u, targets, beta, temperature, ignore_index)
        return distill_logits_mlx(z, u, targets, beta, temperature, ignore_index)

    @f.vjp
    def f_vjp(primals, cotangents, outputs):
        z, u, targets = primals
        gs, gh = cotangents
        bwd = _distill_logits_metal_bwd if metal else distill_logits_mlx_bwd
        return bwd(z, u, targets, gs, gh, beta, temperature, ignore_index), mx.zeros_like(u), mx.zeros_like(targets)

    del f_vjp
    return f


def _self_check(zdtype, udtype, v: int, mode: int) -> None:
    """Metal forward and backward against the pure-MLX path on 3 tokens of ``v`` logits, one ignored, at the
    ``mode``'s beta (0, 1 or 0.3) and temperature 1.5."""
    beta = (0.0, 1.0, 0.3)[mode]
    z, u = (sample((3, v), 1) * 3).astype(zdtype), (sample((3, v), 2) * 3).astype(udtype)
    gs, gh = sample((3,), 3), sample((3,), 4)
    targets = mx.array([v - 1, -100, v // 2], dtype=mx.int32)
    soft, hard = distill_logits_mlx(z, u, targets, beta, 1.5)
    dz = distill_logits_mlx_bwd(z, u, targets, gs, gh, beta, 1.5)
    got_soft, got_hard = _distill_logits_metal(z, u, targets, beta, 1.5)
    check_close("distill soft", got_soft, soft, zdtype)
    check_close("distill hard", got_hard, hard, zdtype)
    check_close("distill dz", _distill_logits_metal_bwd(z, u, targets, gs, gh, beta, 1.5), dz, zdtype)


def _check_beta_temperature(beta, temperature) -> None:
    if isinstance(beta, bool) or not isinstance(beta, int | float) or not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be a number in [0, 1], got {beta!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, int | float) or not 0.0 < temperature < math.inf:
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")


def distill_logits(student_logits: mx.array, teacher_logits: mx.array, targets: mx.array, beta: float = 0.5,
                   temperature: float = 1.0, ignore_index: int = -100) -> tuple[mx.array, mx.array]:
    """Per-token distillation losses over a chunk of logits (fused logsumexps + divergence; the VJP kernel gives
    d/d(student logits)).

    ``student_logits`` (N, V) and ``teacher_logits`` (N, V) float (float32, float16 or bfloat16; the two may
    differ), ``targets`` (N,) int32/int64 class ids or ``ignore_index``. With ``p_s = softmax(student / tau)``,
    ``p_t = softmax(teacher / tau)`` (tau = ``temperature``), returns ``(soft, hard)``, (N,) float32 each:

    - ``soft``: the generalized JSD_beta of GKD: ``KL(p_t || p_s)`` for beta == 0, ``KL(p_s || p_t)`` for
      beta == 1, else ``beta * KL(p_t || M) + (1 - beta) * KL(p_s || M)`` with ``M = beta * p_t + (1 - beta) * p_s``
      (terms with a zero probability count 0, so -inf logits stay finite);
    - ``hard``: the cross-entropy of the unscaled student logits, ``logsumexp(student) - student[target]``;

    both 0 where ``targets == ignore_index`` (whatever that row holds, -inf or NaN included). Differentiable in
    ``student_logits`` only (the teacher's cotangent is 0). Raises TypeError/ValueError on bad dtypes or shapes,
    ``beta`` outside [0, 1] or a ``temperature`` that is not positive.
    """
    check_float("student_logits", student_logits)
    check_float("teacher_logits", teacher_logits)
    if student_logits.ndim != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError(f"expected student_logits and teacher_logits of one (N, V) shape; got "
                         f"{tuple(student_logits.shape)}, {tuple(teacher_logits.shape)}")
    _check_targets(targets, student_logits.shape[0])
    _check_beta_temperature(beta, temperature)
    return _distill_tokens(student_logits, mx.stop_gradient(teacher_logits), targets.astype(mx.int32), float(beta),
                           float(temperature), int(ignore_index))


def _distill_tokens(z, u, targets, beta: float, temperature: float, ignore_index: int):
    """`distill_logits` after its checks (``targets`` int32): picks the path, records it as ``"distill"``."""
    key = (z.dtype, u.dtype, z.shape[1], _mode(beta))
    metal = use_metal("distill", key, lambda: _self_check(*key))
    return _distill_custom(beta, temperature, ignore_index, metal)(z, u, targets)


# ---------------------------------------------------------------------------------------------------------------
# Fused with the two LM heads, chunked over tokens
# ---------------------------------------------------------------------------------------------------------------


def default_chunk_size(v: int) -> int:
    """Tokens per chunk of `distill`: about 4 MiB of float32 logits per model (two models, so about 8 MiB, as
    `cross_entropy.default_chunk_size`), at least 16."""
    return max(16, (1 << 20) // max(1, v))


@cache
def _chunked(beta: float, temperature: float, ignore_index: int, chunk: int):
    """The per-token ``(soft, hard)`` of ``distill_logits(sh @ sw.T, th @ tw.T, targets)`` (N,) float32 each, as
    one custom function of (student_hidden, student_weight float32, teacher_hidden, teacher_weight, targets int32).

    Forward: per chunk of ``chunk`` tokens, the student's logits in float32 (the hidden chunk upcast), the
    teacher's in its dtype, and their losses. VJP (cotangents ``gs``, ``gh`` (N,)): per chunk, both logits again,
    ``dz`` (float32) from the VJP of `distill_logits` (the fused Metal kernel on the Metal path),
    ``d_hidden = dz @ sw`` (cast to the hidden's dtype) and ``d_weight += dz.T @ h`` in float32; the teacher gets
    zeros. Each chunk starts only after the previous one is consumed (``mx.depends`` on both hidden
    slices), so evaluation holds one chunk's logits at a time however MLX orders the graph.
    """

    @mx.custom_function
    def f(sh, sw, th, tw, targets):
        softs, hards, prev = [], [], []
        for s in range(0, sh.shape[0], chunk):
            hs, ht = sh[s:s + chunk], th[s:s + chunk]
            if prev:
                hs, ht = mx.depends(hs, prev), mx.depends(ht, prev)
            soft, hard = _distill_tokens(f32(hs) @ sw.T, ht @ tw.T, targets[s:s + chunk], beta, temperature,
                                         ignore_index)
            softs.append(soft)
            hards.append(hard)
            prev = [soft, hard]
        return mx.concatenate(softs), mx.concatenate(hards)

    @f.vjp
    def f_vjp(primals, cotangents, outputs):
        sh, sw, th, tw, targets = primals
        gs_all, gh_all = cotangents
        dw = mx.zeros(sw.shape, mx.float32)
        dhs = []
        for s in range(0, sh.shape[0], chunk):
            hs, ht = sh[s:s + chunk], th[s:s + chunk]
            if dhs:
                hs, ht = mx.depends(hs, [dw, dhs[-1]]), mx.depends(ht, [dw, dhs[-1]])
            t, u, hs = targets[s:s + chunk], ht @ tw.T, f32(hs)
            _, (dz,) = mx.vjp(lambda z, t=t, u=u: _distill_tokens(z, u, t, beta, temperature, ignore_index),
                              [hs @ sw.T], [gs_all[s:s + chunk], gh_all[s:s + chunk]])
            dhs.append((dz @ sw).astype(sh.dtype))
            dw = dw + dz.T @ hs
        return mx.concatenate(dhs), dw, mx.zeros_like(th), mx.zeros_like(tw), mx.zeros_like(targets)

    del f_vjp
    return f


def _head_pair(prefix: str, hidden, weight) -> tuple[mx.array, mx.array]:
    """One model's (hidden, weight) checked, in their promoted dtype when the two differ (as the reference)."""
    check_float(f"{prefix}_hidden", hidden)
    check_float(f"{prefix}_weight", weight)
    if hidden.ndim != 2 or weight.ndim != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"expected {prefix}_hidden (N, H) and {prefix}_weight (V, H); got {tuple(hidden.shape)}, "
                         f"{tuple(weight.shape)}")
    if hidden.dtype != weight.dtype:
        dtype = mx.result_type(hidden, weight)
        hidden, weight = hidden.astype(dtype), weight.astype(dtype)
    return hidden, weight


def distill(student_hidden: mx.array, student_weight: mx.array, teacher_hidden: mx.array, teacher_weight: mx.array,
            targets: mx.array, beta: float = 0.5, temperature: float = 1.0, weight_hard_loss: float = 0.5,
            weight_soft_loss: float = 0.5, ignore_index: int = -100,
            chunk_size: int | None = None) -> tuple[mx.array, mx.array, mx.array]:
    """Distillation loss of a student against a teacher (GKD's generalized JSD plus the student's cross-entropy),
    fused with both LM heads and chunked over tokens: the (N, V) logits of either model never exist at once.

    ``student_hidden`` (N, Hs) and ``student_weight`` (V, Hs) float; ``teacher_hidden`` (N, Ht) and
    ``teacher_weight`` (V, Ht) float (float32, float16 or bfloat16; the teacher's dtype may differ from the
    student's, the two of a pair run in their promoted dtype, the softmaxes in float32); ``targets`` (N,) int32/int64
    in [0, V) or ``ignore_index``. Per token, `distill_logits` of ``student_hidden @ student_weight.T`` and
    ``teacher_hidden @ teacher_weight.T`` (``beta``: 0 forward KL(p_t || p_s), 1 reverse KL(p_s || p_t), else
    JSD_beta; ``temperature`` divides both models' logits in the divergence, not in the cross-entropy).

    Returns ``(loss, soft_loss, hard_loss)``, float32 scalars: ``soft_loss`` and ``hard_loss`` are the means of the
    per-token divergence and cross-entropy over the non-ignored tokens (0 when every token is ignored, not NaN),
    ``loss = weight_hard_loss * hard_loss + weight_soft_loss * soft_loss`` (TRL ``GKDTrainer`` / Liger
    ``LigerFusedLinearJSDLoss`` names). ``chunk_size``: tokens per chunk (default `default_chunk_size`).
    Differentiable in ``student_hidden`` and ``student_weight`` (gradients in their dtypes); the teacher is held
    constant (its gradients are 0). The VJP recomputes each chunk's logits (see `_chunked`). Precision: the
    student's logits are float32 whatever its dtype (a half-precision ``student_weight`` is upcast once per call,
    an extra V x Hs float32 array, as the Triton op computes them in float32), the teacher's are in the teacher's
    dtype.

    Raises TypeError on non-float hidden states or weights or non-integer targets; ValueError on mismatched
    shapes or vocabularies, no token, ``beta`` outside [0, 1], a ``temperature`` that is not positive and finite,
    loss weights that are not finite numbers, or a non-positive ``chunk_size``.
    """
    student_hidden, student_weight = _head_pair("student", student_hidden, student_weight)
    teacher_hidden, teacher_weight = _head_pair("teacher", teacher_hidden, teacher_weight)
    n, v = student_hidden.shape[0], student_weight.shape[0]
    if teacher_weight.shape[0] != v:
        raise ValueError(f"student_weight and teacher_weight: expected one vocabulary, got {v} and "
                         f"{teacher_weight.shape[0]}")
    check_shape("teacher_hidden", teacher_hidden, (n, None))
    _check_targets(targets, n)
    if n == 0:
        raise ValueError("student_hidden: expected at least one token (N >= 1)")
    _check_beta_temperature(beta, temperature)
    for name, w in (("weight_hard_loss", weight_hard_loss), ("weight_soft_loss", weight_soft_loss)):
        if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w):
            raise ValueError(f"{name} must be a finite number, got {w!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    chunk = default_chunk_size(v) if chunk_size is None else chunk_size
    # The student's logits in float32 (one float32 copy of a half-precision head, shared by forward and VJP; its
    # gradient flows back through the cast): bf16 logits, rounded to 8 bits, move the soft gradient by more than
    # the bf16 bound at low temperatures (measured 1.9e-2 at temperature 0.5, beta 1; 6e-3 with float32 logits).
    soft, hard = _chunked(float(beta), float(temperature), int(ignore_index), chunk)(
        student_hidden, f32(student_weight), mx.stop_gradient(teacher_hidden), mx.stop_gradient(teacher_weight),
        targets.astype(mx.int32))
    count = mx.maximum((targets != ignore_index).sum().astype(mx.float32), 1.0)  # all ignored: 0 / 1 = 0
    soft_loss, hard_loss = soft.sum() / count, hard.sum() / count
    return weight_hard_loss * hard_loss + weight_soft_loss * soft_loss, soft_loss, hard_loss


__all__ = ["default_chunk_size", "distill", "distill_logits", "distill_logits_mlx"]
