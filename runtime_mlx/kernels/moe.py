"""DeepSeekMoE ops in MLX.

- `route`: DeepSeek-V3 routing (``noaux_tc``), the Metal kernel of ``kernels/metal/moe.metal`` (one thread per
  token, a custom VJP in MLX) or the pure-MLX path. Reference: `reference.moe.route`; Triton:
  `kernels.triton.moe.route`.
- `grouped_gemm`: the routed experts' products over expert-sorted rows through ``mx.gather_mm`` (what
  `runtime_mlx.moe.Experts` runs). Reference: `reference.moe.grouped_gemm`; Triton:
  `kernels.triton.grouped_gemm.grouped_gemm`.
"""

from __future__ import annotations

from functools import cache

import mlx.core as mx

from reference.moe import check_route_args

from .launch import Launch, cdiv, check_close, check_equal, check_float, check_shape, f32, run, sample, spec, use_metal

ROUTE = spec("moe_route", "moe", "logits bias", "topk_idx topk_weight scores")


def _route_weights(scores, topk_idx, norm_topk_prob, routed_scaling_factor):
    w = mx.take_along_axis(scores, topk_idx, axis=-1)
    if norm_topk_prob:
        w = w / (w.sum(-1, keepdims=True) + 1e-20)
    return w * routed_scaling_factor


def route_mlx(logits, bias, top_k, n_group=1, topk_group=1, norm_topk_prob=True, routed_scaling_factor=1.0):
    """Pure MLX `route` (same contract). Ties go to the lower id because ``mx.argsort`` is stable (CPU: ties
    broken by index; Metal: a merge sort that moves an element only past a strictly smaller one)."""
    scores = mx.sigmoid(f32(logits))
    choice = mx.stop_gradient(scores) + f32(bias)
    choice = mx.where(mx.isnan(choice), mx.inf, choice)  # a NaN ranks first, as in torch.topk
    n, e = choice.shape
    if n_group > 1:
        grouped = choice.reshape(n, n_group, e // n_group)
        group_scores = mx.sort(grouped, axis=-1)[..., -2:].sum(-1)
        gidx = mx.argsort(-group_scores, axis=-1)[:, :topk_group]
        keep = mx.put_along_axis(mx.zeros(group_scores.shape, mx.bool_), gidx, mx.array(True), axis=-1)
        choice = mx.where(keep[..., None], grouped, -mx.inf).reshape(n, e)
    topk_idx = mx.argsort(-choice, axis=-1)[:, :top_k].astype(mx.int32)
    return topk_idx, _route_weights(scores, topk_idx, norm_topk_prob, routed_scaling_factor), scores


def route_launch(logits, bias, top_k, n_group, topk_group, norm_topk_prob) -> Launch:
    """One thread per token (N tokens, E experts held in registers), grid (N rounded up to 64, 1, 1),
    threadgroup (64, 1, 1). Outputs ``topk_idx`` (N, K) int32, ``topk_weight`` (N, K) float32 (before
    ``routed_scaling_factor``), ``scores`` (N, E) float32."""
    n, e = logits.shape
    return Launch(ROUTE, [logits, f32(bias)],
                  [("T", logits.dtype), ("E", e), ("K", top_k), ("G", n_group), ("KG", topk_group),
                   ("NORM", bool(norm_topk_prob)), ("N", n)],
                  (64 * cdiv(n, 64), 1, 1), (64, 1, 1), [(n, top_k), (n, top_k), (n, e)],
                  [mx.int32, mx.float32, mx.float32])


def _route_metal(logits, bias, top_k, n_group, topk_group, norm_topk_prob, routed_scaling_factor, runner=None):
    idx, w, scores = run(runner, route_launch(logits, bias, top_k, n_group, topk_group, norm_topk_prob))
    return idx, w * routed_scaling_factor, scores


@cache
def _route_custom(top_k, n_group, topk_group, norm_topk_prob, routed_scaling_factor):
    args = (top_k, n_group, topk_group, norm_topk_prob, routed_scaling_factor)

    @mx.custom_function
    def f(logits, bias):
        return _route_metal(logits, bias, *args)

    @f.vjp
    def f_vjp(primals, cotangents, outputs):
        logits, bias = primals
        idx = outputs[0]

        def weights_and_scores(lg):
            s = mx.sigmoid(f32(lg))
            return _route_weights(s, idx, norm_topk_prob, routed_scaling_factor), s

        _, (dlogits,) = mx.vjp(weights_and_scores, [logits], [cotangents[1], cotangents[2]])
        return dlogits, mx.zeros_like(bias)

    del f_vjp
    return f


def _self_check(dtype, e, *args) -> None:
    """The Metal kernel against the pure-MLX path on 5 tokens (indices exactly, weights and scores within the
    float32 bound: both are float32 whatever the logits' dtype)."""
    logits, bias = sample((5, e), 1, dtype), sample((e,), 2) * 0.3
    got, want = _route_metal(logits, bias, *args), route_mlx(logits, bias, *args)
    check_equal("route topk_idx", got[0], want[0])
    check_close("route topk_weight", got[1], want[1], mx.float32)
    check_close("route scores", got[2], want[2], mx.float32)


def route(logits: mx.array, bias: mx.array, top_k: int, n_group: int = 1, topk_group: int = 1,
          norm_topk_prob: bool = True, routed_scaling_factor: float = 1.0):
    """DeepSeek-V3 router (``noaux_tc``) after the router GEMM, as `reference.moe.route`.

    ``logits`` (N, E) float (``x @ W^T``), ``bias`` (E,) float32 (``e_score_correction_bias``). Returns
    ``(topk_idx, topk_weight, scores)``: ``topk_idx`` (N, K) int32 (MLX's index dtype; the reference and Triton
    return int64), sorted by descending biased score, exact ties to the lower expert id (DESIGN.md); a NaN score
    ranks above every number, as in ``torch.topk``, so a NaN logit's expert is picked and its NaN weight shows;
    ``topk_weight`` (N, K) float32; ``scores`` (N, E) float32 = sigmoid(logits).
    Selection ranks ``scores + bias``: a group's score is the sum of its top-2 biased scores; groups outside
    the top ``topk_group`` are excluded; then the top-K experts. Weights are the unbiased scores of those
    experts, divided by their sum (+1e-20) when ``norm_topk_prob``, times ``routed_scaling_factor``. Gradients
    flow from ``topk_weight`` and ``scores`` into ``logits``; ``bias`` gets none (it is updated outside
    autograd). Raises ValueError as the reference: logits not (N, E), bias not (E,), ``n_group`` that does not
    divide E (or leaves groups of one expert), ``topk_group`` outside 1..n_group, ``top_k`` outside 1..(experts
    in the kept groups).
    Source: DeepSeek-V3 report section 2.1.2 (eq. 12-16).
    """
    check_float("logits", logits)
    if logits.ndim != 2:
        raise ValueError(f"logits: expected (N, E), got {tuple(logits.shape)}")
    e = logits.shape[1]
    check_shape("bias", bias, (e,))
    check_route_args(e, top_k, n_group, topk_group)
    topk_group = topk_group if n_group > 1 else 1  # no effect without groups: one kernel configuration
    args = (top_k, n_group, topk_group, bool(norm_topk_prob), float(routed_scaling_factor))
    key = (logits.dtype, e, *args[:4])
    if use_metal("route", key, lambda: _self_check(logits.dtype, e, *args)):
        return _route_custom(*args)(logits, bias)
    return route_mlx(logits, bias, *args)


def grouped_gemm(x_sorted: mx.array, w: mx.array, offsets: mx.array) -> mx.array:
    """Grouped GEMM over expert-sorted rows, as `reference.moe.grouped_gemm`: ``y[s:t] = x_sorted[s:t] @ w[e]^T``
    for each expert ``e``'s segment ``[s, t) = [offsets[e], offsets[e+1])``.

    ``x_sorted`` (M, K) float; ``w`` (E, N, K) of the same dtype; ``offsets`` (E+1,) integer, rising from 0 to M
    (not checked: that would need the values). Returns (M, N) in x's dtype. One ``mx.gather_mm`` with each row's
    expert id as ``rhs_indices`` (sorted): an expert with no rows is never read. On MLX's CPU back end, whose
    ``gather_mm`` takes float32 only (MLX 0.32), half inputs are multiplied in float32 and the result rounded.
    Differentiable w.r.t. ``x_sorted`` and ``w``. Raises TypeError on a non-float x or a w of another dtype,
    ValueError on wrong shapes.
    Source: DeepSeek-V3 report section 2.1.2.
    """
    check_float("x_sorted", x_sorted)
    if w.dtype != x_sorted.dtype:
        raise TypeError(f"w: expected {x_sorted.dtype} like x_sorted, got {w.dtype}")
    if x_sorted.ndim != 2:
        raise ValueError(f"x_sorted: expected (M, K), got {tuple(x_sorted.shape)}")
    m, k = x_sorted.shape
    check_shape("w", w, (None, None, k))
    e, n, _ = w.shape
    check_shape("offsets", offsets, (e + 1,))
    if m == 0:
        return mx.zeros((0, n), x_sorted.dtype)
    # row r's expert = the number of segment ends offsets[1:E] at or before r (a cumsum of marks at the ends)
    ends = mx.minimum(offsets[1:e].astype(mx.int32), m)
    marks = mx.zeros((m + 1,), mx.int32).at[ends].add(mx.array(1, mx.int32))
    expert = mx.stop_gradient(mx.cumsum(marks[:m]).astype(mx.uint32))
    a, b = x_sorted, w
    if a.dtype != mx.float32 and mx.default_device().type == mx.cpu:  # MLX's CPU gather_mm takes float32 only
        a, b = a.astype(mx.float32), b.astype(mx.float32)
    y = mx.gather_mm(a[:, None, :], b.swapaxes(-1, -2), rhs_indices=expert, sorted_indices=True)
    return y[:, 0].astype(x_sorted.dtype)
