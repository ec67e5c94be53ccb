"""reference/cross_entropy.py against F.cross_entropy on the full logits: values and gradients.

Per-token weights are checked against F.cross_entropy's class weights (token weight = weight of its class),
which is where F.cross_entropy defines the weighted "mean": divided by the summed weights of non-ignored tokens.
"""

import pytest
import torch
import torch.nn.functional as F

from reference.cross_entropy import linear_cross_entropy
from tests.tolerance import assert_close


def _inputs(N=23, H=16, V=40):
    hidden = torch.randn(N, H, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, H, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, V, (N,))
    targets[::4] = -100
    return hidden, weight, targets


def _grads(loss, inputs):
    g = torch.randn_like(loss)
    return (loss, *torch.autograd.grad(loss, inputs, g)), g


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "weighted"])
def test_matches_f_cross_entropy(reduction, weighted):
    hidden, weight, targets = _inputs()
    class_w = torch.rand(weight.shape[0], dtype=torch.float64) + 0.5 if weighted else None
    token_w = class_w[targets.clamp(min=0)] if weighted else None
    out = linear_cross_entropy(hidden, weight, targets, reduction=reduction, token_weights=token_w)
    (out, dh, dw), g = _grads(out, (hidden, weight))
    ref = F.cross_entropy(hidden @ weight.T, targets, weight=class_w, ignore_index=-100, reduction=reduction)
    dh_ref, dw_ref = torch.autograd.grad(ref, (hidden, weight), g)
    assert_close(out, ref, torch.float64)
    assert_close(dh, dh_ref, torch.float64, what="d_hidden")
    assert_close(dw, dw_ref, torch.float64, what="d_weight")


def test_other_ignore_index_all_ignored_and_bad_reduction():
    hidden, weight, targets = _inputs()
    targets[targets == -100] = 7
    for red in ("mean", "sum"):
        ref = F.cross_entropy(hidden @ weight.T, targets, ignore_index=7, reduction=red)
        assert_close(linear_cross_entropy(hidden, weight, targets, ignore_index=7, reduction=red), ref, torch.float64)
    none = torch.full_like(targets, -100)
    assert linear_cross_entropy(hidden, weight, none).isnan()  # 0 / 0, as F.cross_entropy
    assert F.cross_entropy(hidden @ weight.T, none).isnan()
    assert linear_cross_entropy(hidden, weight, none, reduction="sum") == 0
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(hidden, weight, targets, reduction="avg")


def test_low_precision_loss_is_float32():
    hidden, weight, targets = _inputs()
    out = linear_cross_entropy(hidden.detach().bfloat16(), weight.detach().bfloat16(), targets)
    assert out.dtype == torch.float32
    assert_close(out, linear_cross_entropy(hidden, weight, targets), torch.bfloat16)
