"""SwiGLU feed-forward (Shazeer 2020): ``down(silu(gate(x)) * up(x))``; the activation is
`runtime_mlx.kernels.swiglu`."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from . import kernels


class MLP(nn.Module):
    """Dense SwiGLU FFN (..., hidden) -> (..., hidden); bias-free ``gate_proj``/``up_proj`` (hidden ->
    intermediate) and ``down_proj`` (intermediate -> hidden), as `reference.swiglu.MLP`."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(kernels.swiglu(self.gate_proj(x), self.up_proj(x)))
