"""`reference.muon`: Newton-Schulz orthogonalization keeps the singular vectors (per matrix, batched, ragged
shapes); a Muon group steps as ``torch.optim.Muon(adjust_lr_fn="match_rms_adamw")`` (PyTorch's own, the oracle)
and a stack of expert matrices as the same matrices one by one; an AdamW group steps as ``torch.optim.AdamW``;
the state_dict round-trips and a resumed optimizer continues identically; bad input is refused."""

from __future__ import annotations

import copy

import pytest
import torch

from reference.muon import Muon, zeropower_via_newtonschulz5
from reference.testing import assert_close


@pytest.mark.parametrize("shape", [(7, 5), (5, 7), (16, 16), (3, 6, 9), (2, 9, 4), (2, 3, 5, 4)])
def test_newton_schulz_keeps_singular_vectors(shape):
    """NS5 applies an odd polynomial to the singular values: ``U^T O V`` is diagonal with entries in about
    [0.7, 1.2] (Jordan's quintic), and a stack is orthogonalized matrix by matrix."""
    g = torch.randn(shape, dtype=torch.float64)
    o = zeropower_via_newtonschulz5(g)
    assert o.shape == g.shape and o.dtype == torch.float32
    u, s, vh = torch.linalg.svd(g, full_matrices=False)
    d = u.mT @ o.double() @ vh.mT
    diag = torch.diagonal(d, dim1=-2, dim2=-1)
    assert_close(d, torch.diag_embed(diag), what="U^T O V off-diagonal")
    assert ((diag > 0.6) & (diag < 1.25)).all(), diag
    if g.ndim >= 3:
        for i in range(g.shape[0]):
            assert_close(o[i], zeropower_via_newtonschulz5(g[i]), what=f"matrix {i} of the stack")


def test_newton_schulz_zero_and_bad_input():
    assert torch.equal(zeropower_via_newtonschulz5(torch.zeros(3, 4)), torch.zeros(3, 4))
    with pytest.raises(ValueError, match=r"needs a matrix \(\.\.\., A, B\), got shape \(5,\)"):
        zeropower_via_newtonschulz5(torch.ones(5))
    with pytest.raises(ValueError, match="steps=0"):
        zeropower_via_newtonschulz5(torch.ones(2, 2), steps=0)


def _grads(params, seed):
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)


def _clone(params):
    return [p.detach().clone().requires_grad_() for p in params]


@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_group_matches_torch_muon(nesterov):
    """On 2-D parameters, three steps equal ``torch.optim.Muon`` with Moonlight's RMS matching (which runs its
    Newton-Schulz in bfloat16: bf16 bound)."""
    ours = [torch.randn(12, 20, requires_grad=True), torch.randn(33, 8, requires_grad=True)]
    theirs = _clone(ours)
    a = Muon(ours, lr=0.02, weight_decay=0.1, momentum=0.9, nesterov=nesterov)
    b = torch.optim.Muon(theirs, lr=0.02, weight_decay=0.1, momentum=0.9, nesterov=nesterov,
                         adjust_lr_fn="match_rms_adamw")
    start = [p.detach().clone() for p in ours]
    for step in range(3):
        _grads(ours, step)
        _grads(theirs, step)
        a.step()
        b.step()
    for p, q, p0 in zip(ours, theirs, start, strict=True):
        assert_close(p - p0, q - p0, torch.bfloat16, what="Muon update vs torch.optim.Muon")
        assert_close(a.state[p]["momentum_buffer"], b.state[q]["momentum_buffer"], what="momentum buffer")


def test_stacked_experts_step_as_separate_matrices():
    """A (E, A, B) expert stack takes the step its E matrices would each take as separate parameters (the
    update scale is sqrt(max(A, B)) of one expert, not of the stack)."""
    stack = torch.randn(4, 6, 10, requires_grad=True)
    single = [stack.detach()[i].clone().requires_grad_() for i in range(4)]
    a, b = Muon([stack], lr=0.01), Muon(single, lr=0.01)
    for step in range(2):
        g = torch.randn(4, 6, 10, generator=torch.Generator().manual_seed(step))
        stack.grad = g
        for i, p in enumerate(single):
            p.grad = g[i].clone()
        a.step()
        b.step()
    assert_close(stack, torch.stack(single), what="stacked vs per-expert Muon")


@pytest.mark.parametrize("fused", [None, True])
def test_adamw_groups_match_torch_adamw(fused):
    """``use_muon=False`` groups (with and without decay) are stepped by PyTorch's AdamW: same weights and
    moments as ``torch.optim.AdamW`` with the same groups."""
    ours = [torch.randn(50, 8, requires_grad=True), torch.randn(8, requires_grad=True)]
    theirs = _clone(ours)

    def groups(ps):
        return [{"params": [ps[0]], "weight_decay": 0.1, "use_muon": False},
                {"params": [ps[1]], "weight_decay": 0.0, "use_muon": False}]

    a = Muon(groups(ours), lr=3e-3, betas=(0.9, 0.95), fused=fused)
    b = torch.optim.AdamW([{k: v for k, v in g.items() if k != "use_muon"} for g in groups(theirs)], lr=3e-3,
                          betas=(0.9, 0.95), fused=fused)
    for step in range(3):
        _grads(ours, step)
        _grads(theirs, step)
        a.step()
        b.step()
    for p, q in zip(ours, theirs, strict=True):
        assert_close(p, q, what="AdamW group")
        assert_close(a.state[p]["exp_avg_sq"], b.state[q]["exp_avg_sq"], what="second moment")
        assert float(a.state[p]["step"]) == 3.0


def test_state_dict_resume_continues_identically():
    """Two steps, save, load into a fresh optimizer over copies, one more step: equal to three uninterrupted."""

    def make(ps):
        return Muon([{"params": [ps[0]]}, {"params": [ps[1]], "use_muon": False}], lr=0.01, weight_decay=0.1)

    ps = [torch.randn(8, 6, requires_grad=True), torch.randn(6, requires_grad=True)]
    start = ps[0].detach().clone()
    opt = make(ps)
    for step in range(2):
        _grads(ps, step)
        opt.step()
    resumed_params = _clone(ps)
    resumed = make(resumed_params)
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))  # as from disk: no tensor shared with opt
    _grads(ps, 2)
    _grads(resumed_params, 2)
    opt.step()
    resumed.step()
    for p, q in zip(ps, resumed_params, strict=True):
        assert torch.equal(p, q)
    assert not torch.equal(ps[0], start)


def test_muon_refuses_bad_input():
    with pytest.raises(ValueError, match=r"shape \(4,\): Muon updates matrices"):
        Muon([torch.zeros(4, requires_grad=True)])
    with pytest.raises(ValueError, match="momentum=1.0"):
        Muon([torch.zeros(2, 2, requires_grad=True)], momentum=1.0)
    with pytest.raises(ValueError, match="lr=0"):
        Muon([torch.zeros(2, 2, requires_grad=True)], lr=0)
    with pytest.raises(ValueError, match="momentum=1.5"):  # a group's own value is checked too
        Muon([{"params": [torch.zeros(2, 2, requires_grad=True)], "momentum": 1.5}])
    with pytest.raises(ValueError, match="complex"):
        Muon([torch.zeros(2, 2, dtype=torch.complex64, requires_grad=True)])
