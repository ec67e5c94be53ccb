"""reference/swiglu.py: SwiGLU and the dense MLP, float64 gradients."""

from __future__ import annotations

import torch

from reference.swiglu import MLP, swiglu
from reference.testing import assert_close
from tests.reference_utils import (
    gradcheck_module,
    randomize_,
)


def test_gradcheck_swiglu_and_mlp():
    g = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    u = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(swiglu, (g, u))
    assert_close(swiglu(g, u), g * torch.sigmoid(g) * u, torch.float64)
    mlp = randomize_(MLP(6, 5)).double()
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    assert gradcheck_module(mlp, lambda m, x: m(x), (x,), ("gate_proj.weight", "up_proj.weight", "down_proj.weight"))
