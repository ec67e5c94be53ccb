"""reference/cross_entropy.py against F.cross_entropy on the full logits: values and gradients.

Per-token weights are checked against F.cross_entropy's class weights (token weight = weight of its class),
which is where F.cross_entropy defines the weighted "mean": divided by the summed weights of non-ignored tokens.
"""

import pytest
import torch
import torch.nn.functional as F

from reference.cross_entropy import linear_cross_entropy
from reference.testing import assert_close


def _inputs(N=23, H=16, V=40):
    hidden = torch.randn(N, H, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, H, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, V, (N,))
    targets[::4] = -100
    return hidden, weight, targets


def _assert_matches(out, ref, hidden, weight, dtype):
    """``out`` and its gradients to ``hidden``/``weight`` (under one random incoming gradient) equal ``ref``'s."""
    g = torch.randn_like(out)
    for name, a, b in zip(("loss", "d_hidden", "d_weight"),
                          (out, *torch.autograd.grad(out, (hidden, weight), g)),
                          (ref, *torch.autograd.grad(ref, (hidden, weight), g)), strict=True):
        assert_close(a, b, dtype, what=name)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "weighted"])
def test_matches_f_cross_entropy(reduction, weighted):
    hidden, weight, targets = _inputs()
    class_w = torch.rand(weight.shape[0], dtype=torch.float64) + 0.5 if weighted else None
    token_w = class_w[targets.clamp(min=0)] if weighted else None
    out = linear_cross_entropy(hidden, weight, targets, reduction=reduction, token_weights=token_w)
    ref = F.cross_entropy(hidden @ weight.T, targets, weight=class_w, ignore_index=-100, reduction=reduction)
    _assert_matches(out, ref, hidden, weight, torch.float64)


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


@pytest.mark.parametrize("chunk_size", [1, 5, 22, 64])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fused_chunks_are_ragged_and_exact(chunk_size, reduction):
    """The fused path (scalar reductions): any chunking, float32 on fresh inputs, gradients formed in forward
    and scaled by the incoming gradient."""
    torch.manual_seed(chunk_size)
    hidden = torch.randn(23, 24, requires_grad=True)
    weight = torch.randn(37, 24, requires_grad=True)
    targets = torch.randint(0, 37, (23,))
    targets[3::5] = -100
    out = linear_cross_entropy(hidden, weight, targets, reduction=reduction, chunk_size=chunk_size)
    ref = F.cross_entropy(hidden @ weight.T, targets, reduction=reduction)
    _assert_matches(out, ref, hidden, weight, torch.float32)


def test_fused_partial_gradients_no_grad_and_bad_shapes():
    hidden, weight, targets = _inputs()
    frozen = weight.detach()
    dh, = torch.autograd.grad(linear_cross_entropy(hidden, frozen, targets), hidden)
    dh_ref, = torch.autograd.grad(F.cross_entropy(hidden @ frozen.T, targets), hidden)
    assert_close(dh, dh_ref, torch.float64, what="d_hidden, weight frozen")
    with torch.no_grad():
        out = linear_cross_entropy(hidden, weight, targets)
    assert not out.requires_grad
    assert_close(out, F.cross_entropy(hidden @ weight.T, targets), torch.float64)
    with pytest.raises(ValueError, match=r"hidden \(N, H\)"):
        linear_cross_entropy(hidden, weight[:, :-1], targets)
    with pytest.raises(ValueError, match="targets"):
        linear_cross_entropy(hidden, weight, targets[:-1])
    with pytest.raises(ValueError, match="token_weights"):
        linear_cross_entropy(hidden, weight, targets, token_weights=torch.ones(1, dtype=torch.float64))
    with pytest.raises(ValueError, match="chunk_size"):
        linear_cross_entropy(hidden, weight, targets, chunk_size=0)
    dh, = torch.autograd.grad(linear_cross_entropy(hidden, weight, targets), hidden, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|double backward|does not require grad"):
        dh.sum().backward()  # gradients formed in forward: differentiable once, and it says so


def test_fused_under_autocast_stays_float32():
    """autocast is off inside: the head and softmax run in float32 of the given operands."""
    hidden, weight, targets = (t.float() if t.is_floating_point() else t for t in _inputs())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear_cross_entropy(hidden, weight, targets)
    assert_close(out, F.cross_entropy(hidden @ weight.T, targets), torch.float32)
