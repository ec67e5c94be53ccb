"""DeepSeekMoE's routing and routed experts on Triton kernels (`kernels.triton.moe`)."""

from __future__ import annotations

import torch

from kernels.triton.moe import experts_forward, route
from reference import moe as ref_moe


class Router(ref_moe.Router):
    """`reference.moe.Router`: the router GEMM stays a torch matmul (float32); `reference.moe.route` (sigmoid
    scores, group-limited top-k with the correction bias, the weights) is one kernel, `kernels.triton.moe.route`,
    with the same arguments and results."""

    def forward(self, x: torch.Tensor):
        return route(self.logits(x).contiguous(), self.e_score_correction_bias, self.top_k, self.n_group,
                     self.topk_group, self.norm_topk_prob, self.routed_scaling_factor)


class Experts(ref_moe.Experts):
    """`reference.moe.Experts`: permutation by expert, grouped GEMMs and SwiGLU as kernels
    (`kernels.triton.moe.experts_forward`). Expert ids come from the router, always in range, so the id
    check (a host sync) is skipped."""

    def forward(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor) -> torch.Tensor:
        w = [p if p.dtype == x.dtype else p.to(x.dtype) for p in (self.gate_proj, self.up_proj, self.down_proj)]
        return experts_forward(x.contiguous(), *w, topk_idx.contiguous(), topk_weight, check_ids=False)
