"""Mixture-of-Experts FFNs in MLX (mirrors `reference.moe`): DeepSeekMoE and a standard top-k softmax MoE.

Routed experts run as grouped matmuls with ``mx.gather_mm`` over expert-sorted token copies
(``sorted_indices=True``): every (token, slot) pair is sorted by expert id, each copy is multiplied by its
expert's stacked weights, and the results are put back in (token, slot) order and weighed. All shapes are
static (N*K rows), so the layer traces under ``mx.compile``.

DeepSeekMoE routing (report section 2.1.2) is `runtime_mlx.kernels.route`: sigmoid scores, group-limited
top-k on the scores plus ``e_score_correction_bias``, weights from the unbiased scores. The bias is frozen (no
gradient); each forward appends its expert loads to ``stats["loads"]`` so the training loop can apply
``b += gamma * sign(mean_load - load)`` (`DeepSeekMoE.update_bias`) outside the compiled step.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from reference.config import ModelConfig

from . import kernels
from .swiglu import MLP


class Experts(nn.Module):
    """``E`` SwiGLU experts with stacked weights ``gate_proj``/``up_proj`` (E, I, H) and ``down_proj`` (E, H, I)
    (the checkpoint's per-expert matrices stacked at load, as mlx-lm's ``sanitize``)."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.num_experts = num_experts
        self.gate_proj = mx.zeros((num_experts, intermediate_size, hidden_size))
        self.up_proj = mx.zeros((num_experts, intermediate_size, hidden_size))
        self.down_proj = mx.zeros((num_experts, hidden_size, intermediate_size))

    def __call__(self, x: mx.array, topk_idx: mx.array, topk_weight: mx.array) -> mx.array:
        """``x`` (N, H); ``topk_idx`` (N, K) integer expert ids; ``topk_weight`` (N, K). Returns (N, H) in
        ``x.dtype``: ``y[n] = sum_k topk_weight[n, k] * expert_{topk_idx[n, k]}(x[n])``."""
        n, k = topk_idx.shape
        flat = topk_idx.reshape(-1)
        order = mx.argsort(flat)
        idx = mx.stop_gradient(flat[order]).astype(mx.uint32)
        ys = self.grouped_swiglu(x[order // k], idx)  # (N*K, H), from expert-sorted copies
        ys = ys[mx.argsort(order)].reshape(n, k, -1)
        return (ys * topk_weight[..., None].astype(ys.dtype)).sum(axis=1)

    def grouped_swiglu(self, xs: mx.array, idx: mx.array) -> mx.array:
        """Each row's expert SwiGLU: rows ``xs`` (M, H) sorted by expert, ``idx`` (M,) uint32 their expert ids
        (sorted). Returns (M, H). ``mx.gather_mm`` per projection (`runtime_mlx.fp8.FP8Experts` runs FP8 GEMMs); MLX's
        CPU back end has it in float32 only, so there bfloat16/float16 run in float32 and are rounded back."""
        wide = xs.dtype != mx.float32 and mx.default_device().type == mx.DeviceType.cpu

        def mm(a, w):
            if wide:
                return mx.gather_mm(a.astype(mx.float32), w.astype(mx.float32).swapaxes(-1, -2), rhs_indices=idx,
                                    sorted_indices=True).astype(a.dtype)
            return mx.gather_mm(a, w.swapaxes(-1, -2), rhs_indices=idx, sorted_indices=True)

        xs = xs[:, None]  # (M, 1, H)
        h = kernels.swiglu(mm(xs, self.gate_proj), mm(xs, self.up_proj))
        return mm(h, self.down_proj)[:, 0]


def _loads(topk_idx: mx.array, n_experts: int) -> mx.array:
    """Tokens routed to each expert: (..., K) ids -> (E,) float32 counts (no gradient)."""
    onehot = topk_idx.reshape(-1)[:, None] == mx.arange(n_experts)[None]
    return mx.stop_gradient(onehot.astype(mx.float32).sum(axis=0))


class Router(nn.Module):
    """DeepSeek-V3 router (``noaux_tc``): ``weight`` (E, H) float32 and the frozen ``e_score_correction_bias``
    (E,) float32."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.top_k, self.n_group, self.topk_group = c.num_experts_per_tok, c.n_group, c.topk_group
        self.norm_topk_prob, self.routed_scaling_factor = c.norm_topk_prob, c.routed_scaling_factor
        self.weight = mx.zeros((c.n_routed_experts, c.hidden_size), dtype=mx.float32)
        self.e_score_correction_bias = mx.zeros((c.n_routed_experts,), dtype=mx.float32)
        self.freeze(keys=["e_score_correction_bias"], recurse=False)

    def __call__(self, x: mx.array):
        """``x`` (N, H) -> ``topk_idx`` (N, K), ``topk_weight`` (N, K) float32, ``scores`` (N, E) float32."""
        logits = x.astype(mx.float32) @ self.weight.astype(mx.float32).T
        return kernels.route(logits, self.e_score_correction_bias, self.top_k, self.n_group, self.topk_group,
                             self.norm_topk_prob, self.routed_scaling_factor)


class DeepSeekMoE(nn.Module):
    """DeepSeekMoE FFN (B, T, H) -> (B, T, H): ``shared_experts(x) + sum_k g_k routed_k(x)``.

    ``stats``: a dict of lists or None; the forward appends its expert loads (E,) to ``stats["loads"]`` and, in
    training with ``aux_loss_alpha > 0``, the sequence-wise balance loss (report eq. 17-20) to ``stats["aux"]``.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.n_routed, self.top_k, self.alpha = c.n_routed_experts, c.num_experts_per_tok, c.aux_loss_alpha
        self.gate = Router(c)
        self.experts = Experts(c.n_routed_experts, c.hidden_size, c.moe_intermediate_size)
        if c.n_shared_experts > 0:
            self.shared_experts = MLP(c.hidden_size, c.moe_intermediate_size * c.n_shared_experts)

    def __call__(self, x: mx.array, stats: dict | None = None) -> mx.array:
        b, t, h = x.shape
        flat = x.reshape(-1, h)
        topk_idx, topk_w, scores = self.gate(flat)
        y = self.experts(flat, topk_idx, topk_w).reshape(b, t, h)
        if "shared_experts" in self:
            y = y + self.shared_experts(x)
        if stats is not None:
            stats["loads"].append(_loads(topk_idx, self.n_routed))
            if self.training and self.alpha > 0:
                stats["aux"].append(self.sequence_balance_loss(scores.reshape(b, t, -1), topk_idx.reshape(b, t, -1)))
        return y

    def sequence_balance_loss(self, scores: mx.array, topk_idx: mx.array) -> mx.array:
        """``alpha * mean_b sum_i f_i P_i``, ``f_i = E / (K T) * #{t: i in topk_t}``, ``P_i = mean_t s_{t,i} /
        sum_j s_{t,j}`` per sequence. ``scores`` (B, T, E), ``topk_idx`` (B, T, K). Returns a scalar."""
        b, t, e = scores.shape
        onehot = topk_idx.reshape(b, -1)[..., None] == mx.arange(e)
        f = mx.stop_gradient(onehot.astype(mx.float32).sum(axis=1)) * e / (self.top_k * t)
        p = (scores / scores.sum(-1, keepdims=True)).mean(axis=1)
        return self.alpha * (f * p).sum(-1).mean()

    def update_bias(self, load: mx.array, gamma: float) -> None:
        """Auxiliary-loss-free balancing: ``b += gamma * sign(mean(load) - load)`` for the loads (E,) counted
        since the last update. Call after an optimizer step, outside any compiled function."""
        g = self.gate
        g.e_score_correction_bias = g.e_score_correction_bias + gamma * mx.sign(load.mean() - load)


class MoE(nn.Module):
    """Standard top-k softmax MoE (B, T, H) -> (B, T, H) (Shazeer et al. 2017; Switch balance loss
    ``aux_loss_alpha * E * sum_i f_i P_i`` into ``stats["aux"]`` in training when alpha > 0). Parameters
    ``gate.weight`` (E, H) and ``experts``; weights renormalized when ``norm_topk_prob``."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.n_routed, self.top_k, self.norm_topk_prob = c.n_routed_experts, c.num_experts_per_tok, c.norm_topk_prob
        self.alpha = c.aux_loss_alpha
        self.gate = nn.Linear(c.hidden_size, c.n_routed_experts, bias=False)
        self.experts = Experts(c.n_routed_experts, c.hidden_size, c.moe_intermediate_size)

    def __call__(self, x: mx.array, stats: dict | None = None) -> mx.array:
        b, t, h = x.shape
        flat = x.reshape(-1, h)
        probs = mx.softmax(self.gate(flat).astype(mx.float32), axis=-1)
        idx = mx.stop_gradient(mx.argpartition(-probs, self.top_k - 1, axis=-1)[:, : self.top_k])
        w = mx.take_along_axis(probs, idx, axis=-1)
        if self.norm_topk_prob:
            w = w / w.sum(-1, keepdims=True)
        y = self.experts(flat, idx, w).reshape(b, t, h)
        if stats is not None and self.training and self.alpha > 0:
            f = _loads(idx, self.n_routed) / idx.size
            stats["aux"].append(self.alpha * self.n_routed * (f * probs.mean(axis=0)).sum())
        return y
