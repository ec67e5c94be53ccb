"""Mixture-of-Experts FFNs: a standard top-k softmax MoE and DeepSeekMoE.

- Standard MoE (Shazeer et al. 2017; Switch Transformer, Fedus et al. 2021): softmax router, top-k experts,
  Switch-style load-balancing loss ``alpha * E * sum_i f_i P_i``.
- DeepSeekMoE (DeepSeek-V3 report section 2.1.2): shared experts always on, fine-grained routed experts chosen
  by sigmoid affinities with group-limited routing; the correction bias ``e_score_correction_bias`` only picks
  experts (auxiliary-loss-free balancing, eq. 16) and is updated outside autograd by
  ``b_i += gamma * sign(mean_load - load_i)``; an optional sequence-wise balance loss (eq. 17-20). The routing
  after the router GEMM is the pure function `route` (the same signature as `kernels.triton.moe.route`).

Experts run batched: token-expert pairs are sorted by expert, each expert multiplies its contiguous segment
(a grouped matmul), and results are scattered back with the routing weights. No per-token Python work.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .rms_norm import at_least_fp32
from .swiglu import MLP, swiglu


class Experts(nn.Module):
    """``E`` SwiGLU experts with stacked weights ``gate_proj``/``up_proj`` (E, I, H) and ``down_proj`` (E, H, I).

    The checkpoint stores them per expert (``experts.{e}.gate_proj.weight`` ...); `reference.checkpoint`
    stacks and unstacks them.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.num_experts = num_experts
        self.gate_proj = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))
        self.up_proj = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def forward(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor) -> torch.Tensor:
        """``x`` (N, H); ``topk_idx`` (N, K) int64 expert ids; ``topk_weight`` (N, K). Returns
        ``y[n] = sum_k topk_weight[n, k] * expert_{topk_idx[n, k]}(x[n])``, (N, H) in ``x.dtype``.

        An expert that receives no token multiplies an empty segment: it adds nothing and its weights get a
        zero gradient.
        """
        n, k = topk_idx.shape
        flat = topk_idx.reshape(-1)
        order = torch.argsort(flat, stable=True)
        token = order // k
        counts = expert_counts(flat, self.num_experts)
        ys = self.grouped_swiglu(x.index_select(0, token), counts)
        ys = ys * topk_weight.reshape(-1)[order, None].to(ys.dtype)
        return x.new_zeros(n, x.shape[1]).index_add(0, token, ys.to(x.dtype))  # autocast: ys may be bf16

    def grouped_swiglu(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Grouped matmul: rows ``xs`` (M, H) sorted by expert, ``counts[e]`` (an (E,) int tensor) rows for
        expert ``e``; returns each row's expert output (M, H).

        Through `torch.nn.functional.grouped_mm` where it applies (CPU, float32/bf16/fp16, rows 16-byte
        aligned): one call per projection, shapes independent of the routing, so ``torch.compile`` keeps the
        whole layer in one graph. Elsewhere one matmul per non-empty expert segment.
        """
        if _grouped_mm_applies(xs, self.gate_proj):
            offs = counts.cumsum(0).to(torch.int32)
            gate = F.grouped_mm(xs, self.gate_proj.transpose(1, 2), offs=offs)
            up = F.grouped_mm(xs, self.up_proj.transpose(1, 2), offs=offs)
            return F.grouped_mm(swiglu(gate, up), self.down_proj.transpose(1, 2), offs=offs)
        return self._grouped_swiglu_loop(xs, counts.tolist())

    @torch.compiler.disable  # data-dependent segment sizes: keep torch.compile from specializing on them
    def _grouped_swiglu_loop(self, xs: torch.Tensor, counts: list[int]) -> torch.Tensor:
        outs = []
        # unbind once: indexing the stacked parameter per expert would make each backward allocate and fill a
        # zero gradient of the whole (E, I, H) tensor per expert (3E fills of E*I*H, quadratic in E)
        gate, up, down = self.gate_proj.unbind(0), self.up_proj.unbind(0), self.down_proj.unbind(0)
        for e, seg in enumerate(xs.split(counts)):
            if counts[e]:
                outs.append(swiglu(seg @ gate[e].t(), seg @ up[e].t()) @ down[e].t())
        return torch.cat(outs) if outs else xs.new_zeros(0, xs.shape[1])


def grouped_gemm(x_sorted: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Grouped GEMM over expert-sorted rows, the routed experts' matmuls (DeepSeek-V3 report section 2.1.2):
    ``y[s:t] = x_sorted[s:t] @ w[e]^T`` for each expert ``e``'s segment ``[s, t) = [offsets[e], offsets[e+1])``.

    ``x_sorted`` (M, K) float, rows sorted by expert; ``w`` (E, N, K) of the same dtype (the stacked
    ``gate_proj``/``up_proj``/``down_proj`` of `Experts`); ``offsets`` (E+1,) integer (int32 or int64),
    ``offsets[0] = 0``, nondecreasing, ``offsets[E] = M``. Returns (M, N) in x's dtype. An expert with no rows
    adds nothing and its weights are never read (its gradient is an exact zero). Differentiable w.r.t.
    ``x_sorted`` and ``w``. The signature of `kernels.triton.grouped_gemm.grouped_gemm`; `Experts`' per-expert
    loop runs the same products with SwiGLU applied per segment between them (three calls of this function would
    round SiLU differently in float32: its vectorized body and scalar tail differ in the last bit). Raises
    ``TypeError`` for a non-float x, a w of another dtype or non-integer offsets, ``ValueError`` for wrong ranks or
    shapes, or offsets that do not split the M rows.
    """
    if not x_sorted.is_floating_point() or w.dtype != x_sorted.dtype:
        raise TypeError(f"grouped_gemm: x_sorted and w must share one float dtype, got {x_sorted.dtype} and {w.dtype}")
    if offsets.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"grouped_gemm: offsets must be int32 or int64, got {offsets.dtype}")
    if x_sorted.ndim != 2 or w.ndim != 3 or w.shape[2] != x_sorted.shape[1]:
        raise ValueError(f"grouped_gemm: expected x_sorted (M, K) and w (E, N, K), got {tuple(x_sorted.shape)} and "
                         f"{tuple(w.shape)}")
    if tuple(offsets.shape) != (w.shape[0] + 1,):
        raise ValueError(f"grouped_gemm: offsets must have shape ({w.shape[0] + 1},), got {tuple(offsets.shape)}")
    bounds = offsets.tolist()
    counts = [b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    if bounds[0] != 0 or bounds[-1] != x_sorted.shape[0] or min(counts, default=0) < 0:
        raise ValueError(f"grouped_gemm: offsets must rise from 0 to M={x_sorted.shape[0]}, got {bounds}")
    ws = w.unbind(0)  # once: per-expert indexing would fill a zero gradient of all of w per expert
    outs = [seg @ ws[e].t() for e, seg in enumerate(x_sorted.split(counts)) if counts[e]]
    # no segment at all means M = 0: an empty product that still carries x's gradient (an empty one)
    return torch.cat(outs) if outs else x_sorted @ w.new_zeros(w.shape[2], w.shape[1])


def expert_counts(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Tokens per expert: (E,) int64 counts of the expert ids ``ids`` (any shape, values in [0, E)). A
    scatter-add rather than ``torch.bincount``, whose data-dependent output size breaks ``torch.compile`` graphs."""
    flat = ids.reshape(-1)
    return torch.zeros(num_experts, dtype=torch.long, device=ids.device).scatter_add_(0, flat, torch.ones_like(flat))


def _grouped_mm_applies(xs: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether `F.grouped_mm` (PyTorch >= 2.8) runs ``xs`` against the (E, I, H) stack ``w`` here: on CPU it takes
    float32/bf16/fp16 with every row stride a multiple of 16 bytes (CUDA needs sm90+ and bf16: not used), and
    outside autocast."""
    if not hasattr(F, "grouped_mm") or xs.device.type != "cpu" or xs.dtype != w.dtype:
        return False
    if torch.is_autocast_enabled("cpu"):  # autocast does not cast grouped_mm's operands; the matmuls do
        return False
    if xs.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    return all(d * xs.element_size() % 16 == 0 for d in w.shape[1:])


def topk_indices(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (..., k) int64 of the ``k`` largest entries of ``x`` (float32 or float64) along its last dim,
    largest first.

    Equal values rank the lower index first (-0.0 equals 0.0), and a NaN of either sign ranks above every number
    (NaNs in index order): the order of a stable descending sort (DESIGN.md: "Ties in any top-k"). ``torch.topk``
    gives the same indices for distinct values but promises no order among ties (on CPU it puts some later
    indices first), so float32 runs it on unique int64 keys ``order(x) * 2**32 + (E - 1 - j)``, ``order``
    mapping float32 bits to integers of the same order; under ``torch.compile`` on CPU that costs about what
    ``torch.topk`` on the values does (a stable sort costs 1.5 to 5 times as much) and leaves the fused sigmoid
    before it bit for bit as it was. Other dtypes (float64 tests) take the stable sort.
    """
    if x.dtype != torch.float32:
        return x.sort(dim=-1, descending=True, stable=True).indices[..., :k]
    mag = (x.view(torch.int32) & 0x7FFFFFFF).clamp(max=0x7F800001)  # |x| bits; every NaN one value above inf
    order = torch.where(x < 0, -mag, mag).to(torch.int64)  # float order as integers; -0.0 ties with 0.0
    key = order * 2**32 + torch.arange(x.shape[-1] - 1, -1, -1, device=x.device)  # equal order: lower j larger
    return key.topk(k, dim=-1).indices


def check_route_args(num_experts: int, top_k: int, n_group: int, topk_group: int) -> None:
    """Raise ``ValueError`` naming the argument when `route`'s configuration cannot be routed: ``n_group`` must
    divide ``num_experts`` (E), groups need at least 2 experts (a group's score sums its top-2), ``topk_group``
    must be in 1..n_group, and ``top_k`` in 1..(experts of the kept groups). The one check of every backend's
    ``route`` (reference, Triton, MLX)."""
    e = num_experts
    if n_group < 1 or e % n_group:
        raise ValueError(f"route: n_group={n_group} must be >= 1 and divide the {e} experts")
    if n_group > 1 and e // n_group < 2:
        raise ValueError(f"route: groups of {e // n_group} expert(s); group scores sum a group's top-2, need >= 2")
    if n_group > 1 and not 1 <= topk_group <= n_group:
        raise ValueError(f"route: topk_group={topk_group} must be in 1..n_group={n_group}")
    allowed = e if n_group == 1 else topk_group * (e // n_group)
    if not 1 <= top_k <= allowed:
        raise ValueError(f"route: top_k={top_k} must be in 1..{allowed} (experts in the kept groups)")


def route(logits: torch.Tensor, bias: torch.Tensor, top_k: int, n_group: int = 1, topk_group: int = 1,
          norm_topk_prob: bool = True, routed_scaling_factor: float = 1.0):
    """DeepSeek-V3 ``noaux_tc`` routing after the router GEMM (report section 2.1.2, eq. 12-16).

    ``logits`` (N, E) float32 (float64 in a float64 model), ``x W^T``; ``bias`` (E,) of the same dtype, the
    correction bias ``e_score_correction_bias``, used only to pick experts. Returns ``topk_idx`` (N, K) int64,
    ``topk_weight`` (N, K) and ``scores`` (N, E), both in the logits' dtype.

    ``scores = sigmoid(logits)`` (eq. 15); selection ranks ``scores + bias`` (eq. 16): with ``n_group > 1`` a
    group's score is the sum of its two largest biased scores and the groups outside the ``topk_group`` best
    are excluded (-inf); then the ``top_k`` best experts are taken, best first. Weights are the unbiased scores
    of those experts, divided by their sum (+1e-20) when ``norm_topk_prob`` (eq. 13), times
    ``routed_scaling_factor``. Ties: equal biased scores (equal group scores) rank the lower expert (group) index
    first; a NaN ranks above every number, so its expert is picked and its NaN weight reaches the output.

    Differentiable w.r.t. ``logits`` through ``topk_weight`` and ``scores``; ``bias`` gets no gradient. The
    same arguments and results as `kernels.triton.moe.route` and `runtime_mlx`'s ``route``. Raises
    ``ValueError`` for logits that are not 2-D, a bias that is not (E,), ``n_group`` that does not divide E
    (or leaves groups of one expert), ``topk_group`` outside 1..n_group, or ``top_k`` outside 1..(experts in
    the kept groups).
    """
    if logits.ndim != 2:
        raise ValueError(f"route: logits must be (N, E), got shape {tuple(logits.shape)}")
    e = logits.shape[1]
    if tuple(bias.shape) != (e,):
        raise ValueError(f"route: bias must have shape ({e},) to match the logits, got {tuple(bias.shape)}")
    check_route_args(e, top_k, n_group, topk_group)
    scores = torch.sigmoid(logits)
    choice = scores.detach() + bias.detach()
    if n_group > 1:
        n, e = choice.shape
        grouped = choice.view(n, n_group, e // n_group)
        group_scores = grouped.topk(2, dim=-1).values.sum(-1)
        keep = torch.zeros_like(group_scores, dtype=torch.bool)
        keep.scatter_(1, topk_indices(group_scores, topk_group), True)
        choice = grouped.masked_fill(~keep[..., None], float("-inf")).view(n, e)
    topk_idx = topk_indices(choice, top_k)
    w = scores.gather(1, topk_idx)
    if norm_topk_prob:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return topk_idx, w * routed_scaling_factor, scores


class Router(nn.Module):
    """DeepSeek-V3 router (``noaux_tc``): the router GEMM in float32, then `route`.

    Parameters: ``weight`` (E, H) float32; buffer ``e_score_correction_bias`` (E,) float32.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.top_k, self.n_group, self.topk_group = c.num_experts_per_tok, c.n_group, c.topk_group
        self.norm_topk_prob, self.routed_scaling_factor = c.norm_topk_prob, c.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(c.n_routed_experts, c.hidden_size, dtype=torch.float32))
        self.register_buffer("e_score_correction_bias", torch.zeros(c.n_routed_experts, dtype=torch.float32))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Router logits ``x W^T`` (N, E) in float32, also under bf16 autocast (DeepSeek-V3 routes in fp32)."""
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(at_least_fp32(x), at_least_fp32(self.weight))

    def forward(self, x: torch.Tensor):
        """``x`` (N, H) -> ``topk_idx`` (N, K) int64, ``topk_weight`` (N, K) float32, ``scores`` (N, E) float32:
        `route` of ``logits(x)`` with this layer's bias and config."""
        return route(self.logits(x), self.e_score_correction_bias, self.top_k, self.n_group, self.topk_group,
                     self.norm_topk_prob, self.routed_scaling_factor)


class DeepSeekMoE(nn.Module):
    """DeepSeekMoE FFN (B, T, H) -> (B, T, H): ``shared_experts(x) + sum_k g_k routed_k(x)``.

    In training mode it counts each expert's load for `update_bias` and, when ``aux_loss_alpha > 0``,
    sets ``self.aux_loss`` to the sequence-wise balance loss (report eq. 17-20).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.n_routed, self.top_k = c.n_routed_experts, c.num_experts_per_tok
        self.alpha = c.aux_loss_alpha
        self.gate = Router(c)
        self.experts = Experts(c.n_routed_experts, c.hidden_size, c.moe_intermediate_size)
        self.shared_experts = (
            MLP(c.hidden_size, c.moe_intermediate_size * c.n_shared_experts) if c.n_shared_experts > 0 else None
        )
        self.register_buffer("expert_load", torch.zeros(c.n_routed_experts), persistent=False)
        self.aux_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, h = x.shape
        flat = x.reshape(-1, h)
        topk_idx, topk_w, scores = self.gate(flat)
        y = self.experts(flat, topk_idx, topk_w).view(b, t, h)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        self.aux_loss = None
        if self.training:
            with torch.no_grad():
                self.expert_load += expert_counts(topk_idx.reshape(-1), self.n_routed).to(self.expert_load)
            if self.alpha > 0:
                self.aux_loss = self.sequence_balance_loss(scores.view(b, t, -1), topk_idx.view(b, t, -1))
        return y

    def sequence_balance_loss(self, scores: torch.Tensor, topk_idx: torch.Tensor) -> torch.Tensor:
        """``alpha * mean_b sum_i f_i P_i`` with ``f_i = E / (K T) * #{t: i in topk_t}`` (the experts actually
        routed to, bias and group limit included, as DeepSeek's modeling code counts them) and
        ``P_i = mean_t s_{t,i} / sum_j s_{t,j}`` per sequence (report eq. 17-20). ``scores`` (B, T, E),
        ``topk_idx`` (B, T, K). Returns a scalar."""
        b, t, e = scores.shape
        counts = torch.zeros(b, e, device=scores.device).scatter_add_(
            1, topk_idx.reshape(b, -1), torch.ones(b, t * self.top_k, device=scores.device))
        f = counts * e / (self.top_k * t)
        p = (scores / scores.sum(-1, keepdim=True)).mean(1)
        return self.alpha * (f * p).sum(-1).mean()

    @torch.no_grad()
    def update_bias(self, gamma: float) -> None:
        """Auxiliary-loss-free balancing (report section 2.1.2): ``b += gamma * sign(mean(load) - load)``
        over the loads counted since the last call; then reset the counts. Call after an optimizer step."""
        load = self.expert_load
        self.gate.e_score_correction_bias += gamma * torch.sign(load.mean() - load)
        self.expert_load.zero_()


class MoE(nn.Module):
    """Standard top-k softmax MoE (B, T, H) -> (B, T, H) with a Switch-style balance loss ``self.aux_loss``
    (``aux_loss_alpha * E * sum_i f_i P_i``, Fedus et al. 2021 eq. 4) in training when ``aux_loss_alpha > 0``.
    Parameters: ``gate.weight`` (E, H), ``experts``. Weights are the top-k softmax probabilities (ties: lower
    expert index first, `topk_indices`), renormalized when ``norm_topk_prob``."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.n_routed, self.top_k, self.norm_topk_prob = c.n_routed_experts, c.num_experts_per_tok, c.norm_topk_prob
        self.alpha = c.aux_loss_alpha
        self.gate = nn.Linear(c.hidden_size, c.n_routed_experts, bias=False)
        self.experts = Experts(c.n_routed_experts, c.hidden_size, c.moe_intermediate_size)
        self.aux_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, h = x.shape
        flat = x.reshape(-1, h)
        probs = torch.softmax(at_least_fp32(self.gate(flat)), dim=-1)
        idx = topk_indices(probs, self.top_k)
        w = probs.gather(1, idx)
        if self.norm_topk_prob:
            w = w / w.sum(-1, keepdim=True)
        y = self.experts(flat, idx, w).view(b, t, h)
        self.aux_loss = None
        if self.training and self.alpha > 0:
            f = expert_counts(idx.reshape(-1), self.n_routed).float() / idx.numel()
            self.aux_loss = self.alpha * self.n_routed * (f * probs.mean(0)).sum()
        return y
