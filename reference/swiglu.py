"""SwiGLU feed-forward (Shazeer 2020, "GLU Variants Improve Transformer"): ``down(silu(gate(x)) * up(x))``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``, elementwise; ``gate``/``up`` of equal shape (..., I); returns (..., I)."""
    return F.silu(gate) * up


class MLP(nn.Module):
    """Dense SwiGLU FFN (B, T, hidden_size) -> (B, T, hidden_size); parameters ``gate_proj``, ``up_proj``
    (hidden -> intermediate) and ``down_proj`` (intermediate -> hidden), bias-free."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))
