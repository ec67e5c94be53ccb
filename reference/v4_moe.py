"""DeepSeek-V4's MoE (V4 report section 2.1): DeepSeekMoE with sqrt-softplus affinity scores, no expert groups,
SwiGLU pre-activations clamped at ``swiglu_limit``, and hash routing in the first layers.

- Router (``moe`` layers): ``s = sqrt(softplus(W h))`` (``scoring_func`` 'sqrtsoftplus'; 'sigmoid' as V3); the
  correction bias (auxiliary-loss-free balancing, DeepSeek-V3 section 2.1.2) picks the top ``num_experts_per_tok``
  experts and never weighs them; weights are the picked scores renormalized, times ``routed_scaling_factor``.
- Hash router (``hash_moe`` layers, "Hash-MoE bootstrap"): a frozen token-id -> experts table ``tid2eid`` (vocab, k)
  picks the experts; the learned scores still weigh them.
- Experts and the one shared expert: ``down(silu(min(gate, L)) * clamp(up, -L, L))``, L = ``swiglu_limit``.

Parameter layout and names as ``transformers``' ``DeepseekV4SparseMoeBlock``: ``gate.weight`` (E, hidden),
``gate.e_score_correction_bias`` (E,) or ``gate.tid2eid`` (vocab, k), ``experts.gate_up_proj`` (E, 2 I, hidden),
``experts.down_proj`` (E, hidden, I), ``shared_experts.{gate,up,down}_proj``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .moe import _grouped_mm_applies, expert_counts
from .v4_config import V4Config


def affinity(logits: torch.Tensor, scoring_func: str) -> torch.Tensor:
    """Router affinity scores from logits (..., E): 'sqrtsoftplus' ``sqrt(softplus(x))`` (V4) or 'sigmoid' (V3)."""
    return torch.sqrt(F.softplus(logits)) if scoring_func == "sqrtsoftplus" else torch.sigmoid(logits)


def clamped_swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float) -> torch.Tensor:
    """``silu(min(gate, limit)) * clamp(up, -limit, limit)`` (V4's SwiGLU clamp, DeepSeek-V4 inference code)."""
    return F.silu(gate.clamp(max=limit)) * up.clamp(min=-limit, max=limit)


class V4Router(nn.Module):
    """Top-k (``hash_layer`` False) or hash (True) router; ``forward(x, input_ids)`` -> ``(indices, weights, scores)``:
    indices (T, k) int64, weights (T, k) in float32 (renormalized, times ``routed_scaling_factor``), scores (T, E)
    float32. Ties in the top-k go to the lower expert index (a stable sort)."""

    def __init__(self, config: V4Config, hash_layer: bool):
        super().__init__()
        self.hash_layer = hash_layer
        self.top_k, self.scoring_func = config.num_experts_per_tok, config.scoring_func
        self.routed_scaling_factor = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))
        if hash_layer:
            self.register_buffer("tid2eid", torch.zeros(config.vocab_size, self.top_k, dtype=torch.long))
        else:
            self.register_buffer("e_score_correction_bias", torch.zeros(config.n_routed_experts))

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor | None):
        scores = affinity(F.linear(x.float(), self.weight.float()), self.scoring_func)
        if self.hash_layer:
            if input_ids is None:
                raise ValueError("V4Router: a hash_moe layer needs the input_ids (tid2eid[input_ids] picks experts)")
            idx = self.tid2eid[input_ids.reshape(-1)].long()
        else:
            biased = scores + self.e_score_correction_bias.float()
            idx = biased.sort(dim=-1, descending=True, stable=True).indices[:, : self.top_k]
        w = scores.gather(1, idx)
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
        return idx, w * self.routed_scaling_factor, scores


class V4Experts(nn.Module):
    """Routed experts stacked: ``gate_up_proj`` (E, 2 I, hidden), ``down_proj`` (E, hidden, I)."""

    def __init__(self, config: V4Config):
        super().__init__()
        e, i, h = config.n_routed_experts, config.moe_intermediate_size, config.hidden_size
        self.limit = config.swiglu_limit
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, h))
        self.down_proj = nn.Parameter(torch.empty(e, h, i))

    def forward(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``x`` (T, hidden), ``idx``/``w`` (T, k) -> (T, hidden): ``sum_k w_k expert_{idx_k}(x)``. Rows sorted by
        expert, then one grouped matmul per projection (as `reference.moe.Experts`: ``F.grouped_mm`` on CPU, shapes
        independent of the routing, so ``torch.compile`` keeps one graph; elsewhere a loop over the segments)."""
        flat = idx.reshape(-1)
        order = torch.argsort(flat, stable=True)
        token = order // idx.shape[1]
        counts = expert_counts(flat, self.gate_up_proj.shape[0])
        xs = x.index_select(0, token)
        if _grouped_mm_applies(xs, self.gate_up_proj) and _grouped_mm_applies(xs, self.down_proj):
            offs = counts.cumsum(0).to(torch.int32)
            gate, up = F.grouped_mm(xs, self.gate_up_proj.transpose(1, 2), offs=offs).chunk(2, dim=-1)
            ys = F.grouped_mm(clamped_swiglu(gate, up, self.limit), self.down_proj.transpose(1, 2), offs=offs)
        else:
            ys = self._loop(xs, counts.tolist())
        ys = ys * w.reshape(-1)[order, None].to(ys.dtype)
        return x.new_zeros(x.shape).index_add(0, token, ys.to(x.dtype))

    @torch.compiler.disable  # data-dependent segment sizes: keep torch.compile from specializing on them
    def _loop(self, xs: torch.Tensor, counts: list[int]) -> torch.Tensor:
        gate_up, down = self.gate_up_proj.unbind(0), self.down_proj.unbind(0)  # once (see reference.moe.Experts)
        outs = []
        for e, seg in enumerate(xs.split(counts)):
            if counts[e]:
                gate, up = (seg @ gate_up[e].t()).chunk(2, dim=-1)
                outs.append(clamped_swiglu(gate, up, self.limit) @ down[e].t())
        return torch.cat(outs) if outs else xs.new_zeros(0, xs.shape[1])


class V4MLP(nn.Module):
    """The shared expert: a clamped SwiGLU FFN of width ``moe_intermediate_size``."""

    def __init__(self, config: V4Config):
        super().__init__()
        h, i = config.hidden_size, config.moe_intermediate_size
        self.limit = config.swiglu_limit
        self.gate_proj = nn.Linear(h, i, bias=False)
        self.up_proj = nn.Linear(h, i, bias=False)
        self.down_proj = nn.Linear(i, h, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(clamped_swiglu(self.gate_proj(x), self.up_proj(x), self.limit))


class V4MoE(nn.Module):
    """One V4 FFN: routed experts (hash or top-k routed) plus the shared expert. ``forward(x, input_ids)``: x (B, S,
    hidden), input_ids (B, S) (read by hash layers) -> (B, S, hidden). In training, top-k layers count the expert
    loads of the step in ``expert_load`` for `update_bias` (``b += gamma * sign(mean_load - load)``, DeepSeek-V3
    section 2.1.2)."""

    def __init__(self, config: V4Config, hash_layer: bool):
        super().__init__()
        self.gate = V4Router(config, hash_layer)
        self.experts = V4Experts(config)
        self.shared_experts = V4MLP(config)
        self.aux_loss = None
        self.register_buffer("expert_load", torch.zeros(config.n_routed_experts), persistent=False)

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor | None = None) -> torch.Tensor:
        b, s, h = x.shape
        flat = x.reshape(-1, h)
        idx, w, _ = self.gate(flat, input_ids)
        if self.training and not self.gate.hash_layer:
            self.expert_load += expert_counts(idx, self.gate.weight.shape[0]).float()
        return (self.experts(flat, idx, w) + self.shared_experts(flat)).view(b, s, h)

    @torch.no_grad()
    def update_bias(self, gamma: float) -> None:
        """The auxiliary-loss-free update of ``e_score_correction_bias`` from the loads recorded since the last call
        (no-op for a hash layer or without recorded loads)."""
        if not self.gate.hash_layer and bool(self.expert_load.any()):
            load = self.expert_load
            self.gate.e_score_correction_bias += gamma * torch.sign(load.mean() - load)
        self.expert_load.zero_()
