"""`runtime_mlx.muon` against `reference.muon`: Newton-Schulz per matrix (ragged, stacked), the Muon-group update
step by step (2-D and stacked experts, Nesterov on and off), and bad input."""

from __future__ import annotations

import pytest
import torch

from reference.muon import Muon as ReferenceMuon
from reference.muon import zeropower_via_newtonschulz5 as reference_ns
from reference.testing import assert_close
from runtime_mlx.muon import Muon, zeropower_via_newtonschulz5
from tests.mlx.utils import mx, to_mx, to_torch


@pytest.mark.parametrize("shape", [(7, 5), (5, 7), (16, 16), (3, 6, 9), (2, 9, 4)])
def test_newton_schulz_matches_reference(shape):
    g = torch.randn(shape)
    o = zeropower_via_newtonschulz5(to_mx(g))
    assert o.dtype == mx.float32 and tuple(o.shape) == shape
    assert_close(to_torch(o), reference_ns(g), what="MLX Newton-Schulz")


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("shape", [(12, 20), (4, 6, 10)])
def test_muon_update_matches_reference(shape, nesterov):
    """Three steps at changing learning rates (as the schedule sets them): same weights and momentum."""
    w = torch.randn(shape)
    ref = w.clone().requires_grad_()
    ref_opt = ReferenceMuon([ref], lr=0.01, weight_decay=0.1, momentum=0.9, nesterov=nesterov)
    opt = Muon(learning_rate=0.01, weight_decay=0.1, momentum=0.9, nesterov=nesterov)
    params = {"w": to_mx(w)}
    opt.init(params)
    for step, lr in enumerate((0.01, 0.02, 0.005)):
        g = torch.randn(shape, generator=torch.Generator().manual_seed(step))
        ref.grad = g
        for group in ref_opt.param_groups:
            group["lr"] = lr
        ref_opt.step()
        opt.learning_rate = lr
        params = opt.apply_gradients({"w": to_mx(g)}, params)
    assert_close(to_torch(params["w"]), ref.detach(), what="weights after 3 Muon steps")
    assert_close(to_torch(opt.state["w"]["momentum_buffer"]), ref_opt.state[ref]["momentum_buffer"],
                 what="momentum buffer")


def test_muon_refuses_vectors_and_bad_hyperparameters():
    with pytest.raises(ValueError, match=r"shape \(4,\): it updates matrices"):
        Muon(learning_rate=0.01).init({"b": mx.zeros((4,))})
    with pytest.raises(ValueError, match="momentum=1.5"):
        Muon(learning_rate=0.01, momentum=1.5)
    with pytest.raises(ValueError, match="got shape"):
        zeropower_via_newtonschulz5(mx.zeros((3,)))
