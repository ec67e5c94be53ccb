"""kernels/triton/moe.py against reference/moe.py: the route op's battery (`reference.testing`), routing beyond the
spec (the order of the K slots, NaN logits, the backward without a scores gradient), permutation, experts; fwd and
grads.

The grouped GEMM has its own tests (tests/cuda/test_grouped_gemm.py). Under the interpreter (no CUDA) every
kernel runs on CPU tensors, with the tile helpers' policy for bfloat16 there (kernels/triton/utils.py: dot
tiles upcast to float32, results rounded to nearest by hand); on a GPU the bf16 cases check the tensor-core
path and the hardware cast.
"""

from __future__ import annotations

import pytest
import torch

from kernels.triton import moe
from reference import moe as ref_moe
from reference.moe import DeepSeekMoE, Experts
from reference.testing import assert_close
from reference.testing.pytest_plugin import cases, check_case
from tests.cuda.conftest import DEVICE
from tests.reference_utils import make_config, randomize_

# (n_experts, n_group, topk_group, top_k, norm_topk_prob, routed_scaling_factor, tokens)
ROUTES = [
    (8, 1, 1, 2, True, 1.0, 37),
    (16, 4, 2, 3, False, 2.5, 37),
    (12, 3, 2, 4, True, 2.5, 29),  # groups of 3 experts: nothing a power of two
    (256, 8, 4, 8, True, 2.5, 5),  # DeepSeek-V3's shape
]


# ----------------------------------------------------------------------------- routing


@pytest.mark.parametrize("case", cases("route"))
def test_route_battery(case):
    """The op's battery (`reference.testing.moe`): the configurations above and V2-Lite's sizes, group-limited
    routing that must leave out a token's best expert, a bias that changes every pick, exact ties at the expert
    and group cuts, one token, no tokens; the set of experts, weights, scores and d logits."""
    check_case(case, moe.route, DEVICE.type)


def test_route_grad_through_weights_only():
    """No gradient reaches ``scores`` (it stays None, not zeros): the backward kernel's HAS_GS=False path."""
    logits = torch.randn(19, 16, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(16, dtype=torch.float64) * 0.1
    lk = logits.detach().float().to(DEVICE).requires_grad_()
    idx, w, _ = moe.route(lk, bias.float().to(DEVICE), 4, 4, 3, True, 2.5)
    ref_idx, ref_w, _ = ref_moe.route(logits, bias, 4, 4, 3, True, 2.5)
    assert torch.equal(idx.cpu(), ref_idx)
    gw = torch.randn(19, 4, dtype=torch.float64)
    (ref_g,) = torch.autograd.grad((ref_w * gw).sum(), logits)
    (g,) = torch.autograd.grad((w * gw.float().to(DEVICE)).sum(), lk)
    assert_close(g, ref_g, what="d logits")


def test_route_ties_pick_lower_index():
    """Equal biased scores: the lower expert (and group) index wins."""
    logits = torch.zeros(3, 8, device=DEVICE)
    logits[1, 5] = logits[1, 6] = 1.0  # a tie for first place
    bias = torch.zeros(8, device=DEVICE)
    idx, w, _ = moe.route_forward(logits, bias, 3, 1, 1, False, 1.0)
    assert idx.tolist() == [[0, 1, 2], [5, 6, 0], [0, 1, 2]]
    idx, _, _ = moe.route_forward(logits, bias, 2, 4, 1, False, 1.0)  # groups {0,1} {2,3} {4,5} {6,7}
    assert idx.tolist() == [[0, 1], [5, 4], [0, 1]]  # groups {4,5} and {6,7} tie: {4,5} wins


@pytest.mark.parametrize("e,g,tg,k,norm,rsf,n", ROUTES)
def test_route_ties_equal_reference_exactly(e, g, tg, k, norm, rsf, n):
    """Logits from five values (many equal expert and group scores), bias zero or two-valued: the kernel's
    expert ids, in order, are the reference's (`reference.moe.route`: equal scores rank the lower index first).
    The battery compares each token's set of experts; this pins the order of the K slots as well."""
    torch.manual_seed(e + n)
    logits = torch.randint(-2, 3, (max(n, 16), e)).float() * 0.5
    for bias in (torch.zeros(e), torch.tensor([0.0, 0.25]).repeat(e // 2)):
        idx, w, s = moe.route_forward(logits.to(DEVICE), bias.to(DEVICE), k, g, tg, norm, rsf)
        ref_idx, ref_w, ref_s = ref_moe.route(logits, bias, k, g, tg, norm, rsf)
        assert torch.equal(idx.cpu(), ref_idx), "tied experts ranked differently from reference.moe.route"
        assert_close(w, ref_w, what="topk_weight")
        assert_close(s, ref_s, what="scores")


@pytest.mark.parametrize("g,tg", [(1, 1), (4, 2)], ids=["flat", "groups"])
def test_route_nan_logits_pick_in_range_and_propagate(g, tg):
    """A NaN logit ranks first, as in `reference.moe.route` (and ``torch.topk``): its expert is picked and its
    NaN weight reaches the output, so a diverged router shows as a NaN loss; NaN experts (groups) in index order.
    Every id stays in [0, E) whatever the logits: runtime_cuda's experts skip the id check, and an out-of-range
    id would become a wild address there."""
    e, k = 10 if g == 1 else 16, 3
    logits = torch.randn(4, e, dtype=torch.float64)
    logits[1, 5] = float("nan")
    logits[2] = float("nan")
    bias = torch.randn(e, dtype=torch.float64) * 0.1
    for norm in (True, False):
        idx, w, _ = moe.route_forward(logits.float().to(DEVICE), bias.float().to(DEVICE), k, g, tg, norm, 2.5)
        ref_idx, ref_w, _ = ref_moe.route(logits, bias, k, g, tg, norm, 2.5)
        idx, w = idx.cpu(), w.cpu()
        assert ((idx >= 0) & (idx < e)).all(), f"ids out of range: {idx.tolist()}"
        assert torch.equal(idx, ref_idx), "a NaN logit must rank first (NaNs in index order), as in the reference"
        assert torch.equal(w.isnan(), ref_w.isnan()), "NaN weights must propagate as in the reference"


# ----------------------------------------------------------------------------- permutation


@pytest.mark.parametrize("n,k,e", [(53, 3, 10), (550, 4, 7), (1, 1, 1)])
def test_permute_matches_stable_argsort(n, k, e):
    idx = torch.randint(0, e, (n, k))
    if e > 3:
        idx[idx == 3] = 0  # expert 3 stays empty
    order, slot, counts, offsets = moe.permute(idx.to(DEVICE), e)
    flat = idx.reshape(-1)
    ref_counts = torch.bincount(flat, minlength=e)
    assert torch.equal(order.cpu(), torch.argsort(flat, stable=True))
    assert torch.equal(slot.cpu()[order.cpu()], torch.arange(n * k))
    assert torch.equal(counts.cpu(), ref_counts)
    assert torch.equal(offsets.cpu(), torch.cat([torch.zeros(1, dtype=torch.int64), ref_counts.cumsum(0)]))


def test_permute_unchecked_bad_id_is_dropped():
    """With ``check_ids=False`` an out-of-range id is never used as an address; the valid pairs still sort."""
    order, _, counts, offsets = moe.permute(torch.tensor([[0, 9], [1, 0]], device=DEVICE), 4, check_ids=False)
    assert counts.tolist() == [2, 1, 0, 0] and offsets.tolist() == [0, 2, 3, 3, 3]
    assert order[:3].tolist() == [0, 3, 2]


# ----------------------------------------------------------------------------- experts


def _routing(n, k, e, skip=()):
    """Distinct experts per token, none from ``skip``; positive weights."""
    allowed = torch.tensor([i for i in range(e) if i not in skip])
    idx = torch.stack([allowed[torch.randperm(len(allowed))[:k]] for _ in range(n)])
    return idx, torch.rand(n, k) + 0.1


@pytest.mark.parametrize("dtype,n,h,i,e,k", [
    (torch.float32, 23, 24, 20, 6, 2),
    (torch.bfloat16, 23, 24, 20, 6, 2),
    (torch.float32, 9, 16, 12, 16, 4),  # more experts than tokens: many empty segments
])
def test_experts_forward_matches_reference(dtype, n, h, i, e, k):
    ex = Experts(e, h, i)
    with torch.no_grad():
        for p in ex.parameters():
            p.normal_(0.0, p.shape[-1] ** -0.5)
            p.copy_(p.to(dtype))  # the reference sees the values the kernel sees
            p[1] = float("nan")  # expert 1 gets no token: its weights must never be read
    idx, tw = _routing(n, k, e, skip=(1,))
    x = torch.randn(n, h).to(dtype).double()

    ref_ex = ex.double()
    xr, twr = x.clone().requires_grad_(), tw.double().requires_grad_()
    ref = ref_ex(xr, idx, twr)
    gy = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, (xr, ref_ex.gate_proj, ref_ex.up_proj, ref_ex.down_proj, twr), gy)

    args = [t.detach().to(DEVICE, dtype).requires_grad_() for t in (x, ex.gate_proj, ex.up_proj, ex.down_proj)]
    twk = tw.to(DEVICE).requires_grad_()
    y = moe.experts_forward(*args, idx.to(DEVICE), twk)
    assert y.dtype == dtype
    assert_close(y, ref, dtype, what="y")
    grads = torch.autograd.grad(y, (*args, twk), gy.to(DEVICE, dtype))
    for name, g, r in zip(["x", "gate_proj", "up_proj", "down_proj", "topk_weight"], grads, ref_grads, strict=True):
        assert_close(g, r, dtype, what=f"d {name}")
    assert torch.equal(grads[1][1], torch.zeros_like(grads[1][1])), "expert 1 got no token: zero gradient"


def test_deepseek_moe_routed_path_matches_reference():
    """route + experts_forward against DeepSeekMoE (no shared expert) in training mode with the sequence-wise
    balance loss: output, loss and the gradients of x, the router weight and the experts."""
    c = make_config(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=3, n_shared_experts=0,
                    norm_topk_prob=True, routed_scaling_factor=2.5, aux_loss_alpha=0.01)
    ref_moe = randomize_(DeepSeekMoE(c), router_bias=0.1).double().train()
    x = torch.randn(2, 11, c.hidden_size, dtype=torch.float64, requires_grad=True)
    ref = ref_moe(x)
    gy = torch.randn_like(ref)
    params = (ref_moe.gate.weight, ref_moe.experts.gate_proj, ref_moe.experts.up_proj, ref_moe.experts.down_proj)
    ref_grads = torch.autograd.grad((ref * gy).sum() + ref_moe.aux_loss, (x, *params))

    xk, *pk = [t.detach().float().to(DEVICE).requires_grad_() for t in (x, *params)]
    flat = xk.view(-1, c.hidden_size)
    bias = ref_moe.gate.e_score_correction_bias.float().to(DEVICE)
    idx, w, scores = moe.route(flat @ pk[0].t(), bias, 3, 4, 2, True, 2.5)
    y = moe.experts_forward(flat, *pk[1:], idx, w).view_as(xk)
    aux = ref_moe.sequence_balance_loss(scores.view(2, 11, -1), idx.view(2, 11, -1))
    assert_close(y, ref, what="y")
    assert_close(aux, ref_moe.aux_loss, what="balance loss")
    grads = torch.autograd.grad((y * gy.float().to(DEVICE)).sum() + aux, (xk, *pk))
    for name, g, r in zip(["x", "router", "gate_proj", "up_proj", "down_proj"], grads, ref_grads, strict=True):
        assert_close(g, r, what=f"d {name}")


# ----------------------------------------------------------------------------- bad inputs


def test_bad_inputs_raise():
    logits, bias = torch.randn(4, 8, device=DEVICE), torch.zeros(8, device=DEVICE)
    with pytest.raises(TypeError, match="logits"):
        moe.route_forward(logits.double(), bias, 2)
    with pytest.raises(ValueError, match="bias"):
        moe.route_forward(logits, torch.zeros(7, device=DEVICE), 2)
    with pytest.raises(ValueError, match="contiguous"):
        moe.route_forward(torch.randn(8, 4, device=DEVICE).t(), bias, 2)
    with pytest.raises(ValueError, match="n_group"):
        moe.route_forward(logits, bias, 2, n_group=3)
    with pytest.raises(ValueError, match="top_k"):
        moe.route_forward(logits, bias, 5, n_group=4, topk_group=2)
    with pytest.raises(ValueError, match="outside"):
        moe.permute(torch.tensor([[0, 8]], device=DEVICE), 8)
    x, w = torch.randn(6, 5, device=DEVICE), torch.randn(2, 3, 5, device=DEVICE)
    with pytest.raises(ValueError, match="down_proj"):
        moe.experts_forward(x, w, w, w, torch.zeros(6, 1, dtype=torch.int64, device=DEVICE),
                            torch.ones(6, 1, device=DEVICE))
