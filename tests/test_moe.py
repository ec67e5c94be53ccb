"""reference/moe.py: route, grouped_gemm, experts, DeepSeekMoE routing and balancing, standard softmax MoE; the route
and grouped_gemm specs (`reference.testing.moe`): their samples and the torch builtin."""

from __future__ import annotations

import pytest
import torch

from reference.moe import DeepSeekMoE, Experts, MoE, _grouped_mm_applies, grouped_gemm, route, topk_indices
from reference.swiglu import swiglu
from reference.testing import assert_close, get_spec
from reference.testing import moe as moe_spec
from reference.testing.pytest_plugin import cases, check_case
from tests.reference_utils import (
    expert_ffn,
    gradcheck_module,
    make_config,
    make_model,
    naive_experts,
    rand_ids,
    randomize_,
)

GROUPED = dict(n_routed_experts=256, n_group=8, topk_group=4, num_experts_per_tok=8, hidden_size=32,
               moe_intermediate_size=16, routed_scaling_factor=2.5)


def naive_route(scores, bias, n_group, topk_group, k, norm, rsf):
    """DeepSeek-V3 noaux_tc routing, token by token: group score = sum of the group's top-2 biased scores, keep
    the top ``topk_group`` groups, take the top ``k`` biased scores there, best first; weights from the unbiased
    scores. Python's stable ``sorted`` puts equal scores (equal group scores) in index order. Group scores are
    summed in the scores' dtype, so they tie where the vectorized routing's do. No NaN inputs."""
    n_tok, e = scores.shape
    gsz = e // n_group
    idx, w = [], []

    def top2_sum(values):
        a, b = sorted(values, reverse=True)[:2]
        return float(torch.tensor(a, dtype=scores.dtype) + torch.tensor(b, dtype=scores.dtype))

    for n in range(n_tok):
        choice = (scores[n] + bias).tolist()
        gscore = [top2_sum(choice[g * gsz : (g + 1) * gsz]) for g in range(n_group)]
        groups = sorted(range(n_group), key=lambda g: -gscore[g])[:topk_group]
        allowed = sorted(x for g in groups for x in range(g * gsz, (g + 1) * gsz))
        top = sorted(allowed, key=lambda x: -choice[x])[:k]
        wt = scores[n, top]
        if norm:
            wt = wt / wt.sum()
        idx.append(torch.tensor(top))
        w.append(wt * rsf)
    return torch.stack(idx), torch.stack(w)


def _moe(dtype=torch.float32, router_bias=0.0, **kw):
    c = make_config(**kw)
    moe = randomize_(DeepSeekMoE(c), router_bias=router_bias).to(dtype)
    return c, moe


# ----------------------------------------------------------------------------- routing


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_group_limited_routing_equals_naive(norm_topk_prob):
    c, moe = _moe(router_bias=0.05, norm_topk_prob=norm_topk_prob, **GROUPED)
    x = torch.randn(15, c.hidden_size)
    idx, w, scores = moe.gate(x)
    assert idx.shape == w.shape == (15, 8) and scores.shape == (15, 256)
    bias = moe.gate.e_score_correction_bias
    ref_idx, ref_w = naive_route(scores, bias, 8, 4, 8, norm_topk_prob, 2.5)
    assert torch.equal(idx, ref_idx)  # the same experts, best first
    assert_close(w, ref_w, torch.float32)
    if norm_topk_prob:
        assert_close(w.sum(-1), torch.full((15,), 2.5), torch.float32)
    # every expert lies in one of the token's topk_group groups ...
    gsz = 32
    grouped = (scores + bias).view(15, 8, gsz)
    best_groups = grouped.topk(2, -1).values.sum(-1).topk(4, -1).indices
    assert all(set((idx[n] // gsz).tolist()) <= set(best_groups[n].tolist()) for n in range(15))
    # ... and the group limit matters here: plain top-8 would leave the groups for some token
    plain = (scores + bias).topk(8, -1).indices
    assert any(not set((plain[n] // gsz).tolist()) <= set(best_groups[n].tolist()) for n in range(15))


def _route_before_issue_21(logits, bias, top_k, n_group, topk_group, norm_topk_prob, routed_scaling_factor):
    """`reference.moe.Router.forward`'s statements before `route` existed (``torch.topk``), kept to pin that
    `route` gives the same bits wherever no two scores tie."""
    scores = torch.sigmoid(logits)
    choice = scores.detach() + bias
    if n_group > 1:
        n, e = choice.shape
        grouped = choice.view(n, n_group, e // n_group)
        group_scores = grouped.topk(2, dim=-1).values.sum(-1)
        keep = torch.zeros_like(group_scores, dtype=torch.bool)
        keep.scatter_(1, group_scores.topk(topk_group, dim=-1).indices, True)
        choice = grouped.masked_fill(~keep[..., None], float("-inf")).view(n, e)
    topk_idx = choice.topk(top_k, dim=-1).indices
    w = scores.gather(1, topk_idx)
    if norm_topk_prob:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return topk_idx, w * routed_scaling_factor, scores


ROUTES = [  # (n_experts, n_group, topk_group, top_k, norm_topk_prob, routed_scaling_factor)
    (8, 1, 1, 2, True, 1.0),
    (16, 4, 2, 3, False, 2.5),
    (12, 3, 2, 4, True, 2.5),
    (256, 8, 4, 8, True, 2.5),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("e,g,tg,k,norm,rsf", ROUTES)
def test_route_equals_router_statements_bit_for_bit(e, g, tg, k, norm, rsf, dtype):
    """Untied random inputs: the same indices in the same order, the same weight and score bits as before."""
    torch.manual_seed(e + k)
    logits = torch.randn(301, e, dtype=dtype)
    bias = torch.randn(e, dtype=dtype) * 0.1
    got = route(logits, bias, k, g, tg, norm, rsf)
    expected = _route_before_issue_21(logits, bias, k, g, tg, norm, rsf)
    for name, a, b in zip(("topk_idx", "topk_weight", "scores"), got, expected, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b), name


def test_router_forward_is_route_of_its_logits():
    c, moe = _moe(router_bias=0.1, **GROUPED)
    x = torch.randn(9, c.hidden_size)
    gate = moe.gate
    expected = route(gate.logits(x), gate.e_score_correction_bias, 8, 8, 4, True, 2.5)
    assert all(torch.equal(a, b) for a, b in zip(gate(x), expected, strict=True))


@pytest.mark.parametrize("e,g,tg,k,norm,rsf", ROUTES)
def test_route_ties_rank_lower_index_first(e, g, tg, k, norm, rsf):
    """Logits from five values: many equal expert scores and equal group scores; the order (not only the set)
    equals the naive stable routing, in which the lower expert (group) index wins a tie."""
    torch.manual_seed(e)
    logits = torch.randint(-2, 3, (64, e)).float() * 0.5
    for bias in (torch.zeros(e), torch.tensor([0.0, 0.25]).repeat(e // 2)):
        idx, w, scores = route(logits, bias, k, g, tg, norm, rsf)
        ref_idx, ref_w = naive_route(scores, bias, g, tg, k, norm, rsf)
        assert torch.equal(idx, ref_idx)
        assert_close(w, ref_w, torch.float32)
        assert torch.equal(route(logits.double(), bias.double(), k, g, tg, norm, rsf)[0], idx)  # the sort path
    assert torch.equal(route(torch.zeros(2, e), torch.zeros(e), k, g, tg)[0], torch.arange(k).expand(2, k))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_topk_indices_order(dtype):
    """A stable descending sort's order: NaNs of either sign first (in index order), -0.0 ties with 0.0."""
    nan = float("nan")
    x = torch.tensor([0.0, -0.0, 1.0, nan, 1.0, -nan, 0.0, float("inf"), -1.0, -1.0, -float("inf"), 1e-45, -1e-45],
                     dtype=dtype)
    assert x[5].isnan() and x[5].signbit()
    assert topk_indices(x, 13).tolist() == [3, 5, 7, 2, 4, 11, 0, 1, 6, 12, 8, 9, 10]
    assert topk_indices(x[None], 4).tolist() == [[3, 5, 7, 2]]
    y = torch.randint(-3, 4, (50, 33)).to(dtype) / 4
    assert torch.equal(topk_indices(y, 9), y.sort(dim=-1, descending=True, stable=True).indices[:, :9])


@pytest.mark.parametrize("g,tg", [(1, 1), (4, 2)], ids=["flat", "groups"])
def test_route_nan_logit_ranks_first_and_propagates(g, tg):
    """A NaN logit ranks first (as ``torch.topk`` ranks it): its expert is picked and its NaN weight reaches the
    output, so a diverged router shows as a NaN loss; NaN experts (and NaN groups) in index order."""
    e, k = 16, 3
    logits = torch.randn(3, e)
    logits[1, 5] = float("nan")
    logits[2] = float("nan")
    idx, w, _ = route(logits, torch.randn(e) * 0.1, k, g, tg, True, 2.5)
    assert idx[1, 0] == 5 and w[1].isnan().all() and not w[0].isnan().any()
    assert idx[2].tolist() == [0, 1, 2] and w[2].isnan().all()


def test_route_gradient_to_logits_only():
    torch.manual_seed(0)
    logits = torch.randn(7, 16, dtype=torch.float64, requires_grad=True)
    bias = (torch.randn(16, dtype=torch.float64) * 0.1).requires_grad_()
    for norm in (True, False):
        assert torch.autograd.gradcheck(lambda x, norm=norm: route(x, bias, 3, 4, 2, norm, 2.5)[1:], (logits,))
    _, w, s = route(logits, bias, 3, 4, 2)
    (w.sum() + s.sum()).backward()
    assert bias.grad is None and logits.grad.abs().sum() > 0


def test_route_bad_arguments_raise():
    logits, bias = torch.randn(4, 8), torch.zeros(8)
    with pytest.raises(ValueError, match=r"logits must be \(N, E\)"):
        route(logits[0], bias, 2)
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\)"):
        route(logits, torch.zeros(7), 2)
    with pytest.raises(ValueError, match="n_group=3"):
        route(logits, bias, 2, n_group=3)
    with pytest.raises(ValueError, match="groups of 1 expert"):
        route(logits, bias, 2, n_group=8)
    with pytest.raises(ValueError, match="topk_group=3"):
        route(logits, bias, 2, n_group=2, topk_group=3)
    with pytest.raises(ValueError, match="top_k=5 must be in 1..4"):
        route(logits, bias, 5, n_group=4, topk_group=2)


def test_group_limited_moe_forward_backward():
    c, moe = _moe(router_bias=0.05, **GROUPED)
    moe.train()
    x = torch.randn(3, 5, c.hidden_size, requires_grad=True)
    y = moe(x)
    assert y.shape == x.shape and torch.isfinite(y).all() and y.std() > 0.1
    # equals a per-token loop over the naive routing, plus the shared expert
    flat = x.detach().reshape(-1, c.hidden_size)
    scores = torch.sigmoid(flat @ moe.gate.weight.detach().T)
    idx, w = naive_route(scores, moe.gate.e_score_correction_bias, 8, 4, 8, True, 2.5)
    with torch.no_grad():
        ref = naive_experts(moe.experts, flat, idx, w) + moe.shared_experts(flat)
    assert_close(y.reshape(-1, c.hidden_size), ref, torch.float32)
    y.square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    g = moe.gate.weight.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
    used = torch.zeros(256, dtype=torch.bool)
    used[idx.reshape(-1)] = True
    gp = moe.experts.gate_proj.grad
    assert (gp[used].flatten(1).abs().sum(-1) > 0).all() and (gp[~used] == 0).all()
    assert int(moe.expert_load.sum()) == 15 * 8


def test_bias_changes_selection_not_weight_formula():
    c, moe = _moe(n_routed_experts=16, num_experts_per_tok=4, routed_scaling_factor=2.5)
    x = torch.randn(13, c.hidden_size)
    idx0, w0, s0 = moe.gate(x)
    with torch.no_grad():
        moe.gate.e_score_correction_bias.copy_(torch.randn(16) * 0.5)
    idx1, w1, s1 = moe.gate(x)
    assert torch.equal(s0, s1), "the bias must not enter the scores"
    assert not torch.equal(idx0.sort(-1).values, idx1.sort(-1).values), "the bias did not change the selection"
    for idx, w in ((idx0, w0), (idx1, w1)):
        picked = s1.gather(1, idx)  # unbiased sigmoid scores of the chosen experts
        assert_close(w, picked / picked.sum(-1, keepdim=True) * 2.5, torch.float32)
    biased = (s1 + moe.gate.e_score_correction_bias).topk(4, -1).indices
    assert torch.equal(idx1.sort(-1).values, biased.sort(-1).values)


def test_bias_gets_no_gradient():
    c, moe = _moe(router_bias=0.1)
    moe.train()
    bias = moe.gate.e_score_correction_bias
    assert "gate.e_score_correction_bias" not in dict(moe.named_parameters())
    assert "gate.e_score_correction_bias" in moe.state_dict()  # saved with the checkpoint
    bias.requires_grad_(True)  # even as a leaf that asks for one, no gradient reaches it
    x = torch.randn(3, 5, c.hidden_size)
    moe(x).square().sum().backward()
    assert bias.grad is None
    assert moe.gate.weight.grad is not None and moe.gate.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- bias update


def test_update_bias_sign_rule():
    c, moe = _moe(router_bias=0.1)
    b0 = moe.gate.e_score_correction_bias.clone()
    load = torch.tensor([5.0, 0.0, 3.0, 3.0, 1.0, 4.0, 3.0, 5.0])  # mean 3
    moe.expert_load.copy_(load)
    moe.update_bias(0.01)
    expected = b0 + 0.01 * torch.tensor([-1.0, 1.0, 0.0, 0.0, 1.0, -1.0, 0.0, -1.0])
    assert_close(moe.gate.e_score_correction_bias, expected, torch.float32)
    assert torch.equal(moe.expert_load, torch.zeros(8))


def test_load_counted_only_in_training():
    c, moe = _moe(router_bias=0.1)
    x = torch.randn(3, 5, c.hidden_size)
    moe.eval()
    moe(x)
    assert torch.equal(moe.expert_load, torch.zeros(8)), "eval forward counted loads"
    b0 = moe.gate.e_score_correction_bias.clone()
    moe.update_bias(0.01)  # nothing counted: loads equal their mean, the bias does not move
    assert torch.equal(moe.gate.e_score_correction_bias, b0)
    moe.train()
    moe(x)
    moe(x)
    idx, _, _ = moe.gate(x.reshape(-1, c.hidden_size))
    load = 2 * torch.bincount(idx.reshape(-1), minlength=8).float()
    assert torch.equal(moe.expert_load, load)
    moe.update_bias(0.01)
    assert_close(moe.gate.e_score_correction_bias, b0 + 0.01 * torch.sign(load.mean() - load), torch.float32)


def test_model_update_moe_bias_uses_config_gamma():
    cfg = make_config(bias_update_speed=0.02, num_nextn_predict_layers=1)
    model = make_model(cfg).train()
    ids = rand_ids(cfg, 3, 7)
    model.loss(ids, ids)
    layers = model.moe_layers()
    assert len(layers) == 2  # layer 1 and the MTP layer
    before = [(m.gate.e_score_correction_bias.clone(), m.expert_load.clone()) for m in layers]
    assert all(int(load.sum()) == 3 * 7 * 2 for _, load in before)
    model.update_moe_bias()
    for m, (b0, load) in zip(layers, before, strict=True):
        assert_close(m.gate.e_score_correction_bias, b0 + 0.02 * torch.sign(load.mean() - load), torch.float32)
        assert torch.equal(m.expert_load, torch.zeros_like(load))


# ----------------------------------------------------------------------------- experts


def test_unrouted_expert_adds_finite_zero_and_gets_zero_gradient():
    c, moe = _moe()
    moe.train()
    with torch.no_grad():
        moe.gate.e_score_correction_bias[3] = -1e4  # expert 3 is never picked
        for p in (moe.experts.gate_proj, moe.experts.up_proj, moe.experts.down_proj):
            p[3] = float("nan")  # so any arithmetic with it would show
    x = torch.randn(3, 5, c.hidden_size, requires_grad=True)
    y = moe(x)
    assert torch.isfinite(y).all()
    y.square().sum().backward()
    assert moe.expert_load[3] == 0 and (moe.expert_load > 0).sum() >= 2
    for p in (moe.experts.gate_proj, moe.experts.up_proj, moe.experts.down_proj):
        assert p.grad is not None and torch.equal(p.grad[3], torch.zeros_like(p.grad[3]))
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("n_tok, k", [(13, 3), (1, 1), (7, 5)])
def test_experts_equal_naive_loop_float64(n_tok, k):
    experts = randomize_(Experts(5, 12, 7)).double()
    x = torch.randn(n_tok, 12, dtype=torch.float64, requires_grad=True)
    idx = torch.stack([torch.randperm(5)[:k] for _ in range(n_tok)])
    w = torch.rand(n_tok, k, dtype=torch.float64, requires_grad=True)
    y = experts(x, idx, w)
    ref = naive_experts(experts, x, idx, w)
    assert_close(y, ref, torch.float64)
    g = torch.randn_like(y)
    params = [x, w, experts.gate_proj, experts.up_proj, experts.down_proj]
    got = torch.autograd.grad(y, params, g)
    exp = torch.autograd.grad(ref, params, g)
    for name, a, b in zip(["x", "w", "gate", "up", "down"], got, exp, strict=True):
        assert_close(a, b, torch.float64, what=f"grad {name}")


@pytest.mark.parametrize("hidden, inter, applies", [(16, 12, True), (12, 20, True), (10, 6, False)])
def test_grouped_mm_path_equals_float64_loop(hidden, inter, applies):
    """float32 experts take `F.grouped_mm` when every row is 16-byte aligned (else the per-expert loop): both
    equal the float64 loop on fresh inputs, with one expert left empty (its gradient exactly 0)."""
    torch.manual_seed(hidden + inter)
    experts = randomize_(Experts(5, hidden, inter))
    x = torch.randn(11, hidden, requires_grad=True)
    idx = torch.stack([torch.randperm(4)[:2] for _ in range(11)])  # expert 4 gets no token
    w = torch.rand(11, 2, requires_grad=True)
    assert _grouped_mm_applies(x, experts.gate_proj) == applies
    y = experts(x, idx, w)
    ref_experts = Experts(5, hidden, inter).double()
    ref_experts.load_state_dict(experts.state_dict())
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = naive_experts(ref_experts, x64, idx, w64)
    assert_close(y, ref, torch.float32)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, w, experts.gate_proj, experts.up_proj, experts.down_proj], g)
    exp = torch.autograd.grad(ref, [x64, w64, ref_experts.gate_proj, ref_experts.up_proj, ref_experts.down_proj],
                              g.double())
    for name, a, b in zip(["x", "w", "gate", "up", "down"], got, exp, strict=True):
        assert_close(a, b, torch.float32, what=f"grad {name}")
    assert all(torch.equal(p[4], torch.zeros_like(p[4])) for p in got[2:])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not _grouped_mm_applies(x, experts.gate_proj)  # autocast casts the loop's matmuls, not grouped_mm


def test_gradcheck_experts():
    experts = randomize_(Experts(4, 6, 5)).double()
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    idx = torch.stack([torch.randperm(4)[:2] for _ in range(5)])
    w = torch.rand(5, 2, dtype=torch.float64, requires_grad=True)
    assert gradcheck_module(experts, lambda m, x, w: m(x, idx, w), (x, w),
                            ("gate_proj", "up_proj", "down_proj"), fast_mode=True)
    assert gradcheck_module(experts, lambda m, x, w: m(x, idx, w), (x, w))


def test_gradcheck_deepseek_moe_router_gets_gradient_through_weights():
    c, moe = _moe(torch.float64, router_bias=0.1, hidden_size=8, moe_intermediate_size=4, n_routed_experts=6,
                  n_group=2, topk_group=1, num_experts_per_tok=2, aux_loss_alpha=0.0)
    x = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    names = ("gate.weight", "experts.gate_proj", "experts.down_proj", "shared_experts.up_proj.weight")
    assert gradcheck_module(moe, lambda m, x: m(x), (x,), names, fast_mode=True)
    assert gradcheck_module(moe, lambda m, x: m(x), (x,), ("gate.weight",))
    moe(x).sum().backward()
    assert moe.gate.weight.grad.abs().sum() > 0  # no aux loss: the gradient comes through the weights


# ----------------------------------------------------------------------------- balance losses


def test_deepseek_sequence_balance_loss_equals_eq_17_20():
    c, moe = _moe(router_bias=0.2, aux_loss_alpha=0.01, n_routed_experts=8, n_group=2, topk_group=1,
                  num_experts_per_tok=3)
    moe.train()
    b, t, e, k = 3, 5, 8, 3
    x = torch.randn(b, t, c.hidden_size)
    moe(x)
    aux = moe.aux_loss
    idx, _, s = moe.gate(x.reshape(-1, c.hidden_size))
    idx, s = idx.view(b, t, k), s.view(b, t, e)
    total = 0.0
    for bb in range(b):
        seq = 0.0
        for i in range(e):
            f_i = e / (k * t) * sum(int(i in idx[bb, tt].tolist()) for tt in range(t))
            p_i = sum(s[bb, tt, i] / s[bb, tt].sum() for tt in range(t)) / t
            seq += f_i * p_i
        total += seq
    ref = 0.01 * total / b
    assert_close(aux, ref, torch.float32)
    assert aux > 0
    aux.backward()
    assert moe.gate.weight.grad.abs().sum() > 0  # P_i carries the gradient
    moe.eval()
    moe(x)
    assert moe.aux_loss is None


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_standard_moe_equals_naive_and_switch_loss(norm_topk_prob):
    c = make_config(moe_type="standard", aux_loss_alpha=0.01, num_experts_per_tok=3,
                    norm_topk_prob=norm_topk_prob)
    moe = randomize_(MoE(c)).train()
    x = torch.randn(3, 5, c.hidden_size)
    y = moe(x)
    flat = x.reshape(-1, c.hidden_size)
    probs = torch.softmax(flat @ moe.gate.weight.detach().T, -1)
    rows, counts = [], torch.zeros(8)
    for n in range(15):
        top = probs[n].argsort(descending=True)[:3]
        w = probs[n, top] / (probs[n, top].sum() if norm_topk_prob else 1.0)
        rows.append(sum(w[j] * expert_ffn(moe.experts, int(top[j]), flat[n]) for j in range(3)))
        counts[top] += 1
    with torch.no_grad():
        assert_close(y.reshape(-1, c.hidden_size), torch.stack(rows), torch.float32)
    f = counts / (15 * 3)
    p = probs.mean(0)
    assert_close(moe.aux_loss, 0.01 * 8 * (f * p).sum(), torch.float32)
    moe.aux_loss.backward()
    assert moe.gate.weight.grad.abs().sum() > 0


def test_model_loss_adds_aux_losses():
    cfg = make_config(aux_loss_alpha=0.05, num_nextn_predict_layers=1)
    model = make_model(cfg).train()
    ids = rand_ids(cfg, 3, 7)
    out = model.loss(ids, ids)
    auxes = [m.aux_loss for m in model.moe_layers()]
    assert len(auxes) == 2 and all(a is not None and a > 0 for a in auxes)
    assert_close(out.aux_loss, auxes[0] + auxes[1], torch.float32)
    assert_close(out.loss, out.lm_loss + out.aux_loss + 0.3 * out.mtp_losses[0], torch.float32)


# ----------------------------------------------------------------------------- grouped_gemm


def test_grouped_gemm_is_the_experts_products():
    """Three grouped GEMMs with SwiGLU between them give `Experts`' per-expert loop (to float32 rounding: the loop
    applies SiLU per segment), an empty expert contributing nothing."""
    torch.manual_seed(0)
    experts = randomize_(Experts(5, 12, 7))
    counts = torch.tensor([3, 0, 6, 1, 0])
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    xs = torch.randn(10, 12)
    h = swiglu(grouped_gemm(xs, experts.gate_proj, offsets), grouped_gemm(xs, experts.up_proj, offsets))
    assert_close(grouped_gemm(h, experts.down_proj, offsets), experts.grouped_swiglu(xs, counts), torch.float32)


def test_grouped_gemm_bad_inputs_raise():
    x, w, off = torch.randn(6, 5), torch.randn(2, 3, 5), torch.tensor([0, 2, 6])
    with pytest.raises(TypeError, match="one float dtype"):
        grouped_gemm(x, w.double(), off)
    with pytest.raises(TypeError, match="offsets must be int32 or int64"):
        grouped_gemm(x, w, off.float())
    with pytest.raises(ValueError, match=r"expected x_sorted \(M, K\) and w \(E, N, K\)"):
        grouped_gemm(x[:, :4], w, off)
    with pytest.raises(ValueError, match=r"offsets must have shape \(3,\)"):
        grouped_gemm(x, w, off[:2])
    for bad in ([1, 2, 6], [0, 2, 5], [0, 4, 2]):
        with pytest.raises(ValueError, match="offsets must rise from 0 to M=6"):
            grouped_gemm(x, w, torch.tensor(bad))


# ----------------------------------------------------------------------------- the specs


@pytest.mark.parametrize("case", cases("route") + cases("grouped_gemm"))
def test_reference_passes_its_battery(case):
    """The reference in the dtype under test against itself in float64: route's float32 top-k (integer keys)
    decides every sample's cuts as its float64 path (a stable sort) does."""
    spec = case[0]
    check_case(case, spec.reference, "cpu")


@pytest.mark.parametrize("case", cases("grouped_gemm"))
def test_torch_grouped_mm_builtin_passes_the_battery(case):
    """The grouped_gemm spec's torch builtin (``F.grouped_mm``, K and N padded to its 16-byte strides)."""
    check_case(case, get_spec("grouped_gemm").builtin["torch"](), "cpu")


def test_route_samples_are_what_their_names_say():
    """Every token's cuts are decided (margins, or exact ties); the samples named for it leave each token's best
    expert out of its groups, change every pick with the bias, or tie at the cut they name."""
    spec = get_spec("route")
    samples = spec.samples(spec.rng())
    assert len({s.name for s in samples}) == len(samples)
    for s in samples:
        logits, bias, k, g, tg = s.args[:5]
        assert moe_spec.decided(logits, bias, k, g, tg).all(), s.name
        checks = {"excluded group": moe_spec._best_excluded, "changes every pick": moe_spec._bias_changes_pick,
                  "ties at the top-3 cut": moe_spec._tie_at_expert_cut, "ties at the group cut":
                  moe_spec._tie_at_group_cut}
        for words, holds in checks.items():
            if words in s.name:
                assert holds(logits, bias, k, g, tg).all(), s.name
    assert sum("excluded group" in s.name for s in samples) >= 3
