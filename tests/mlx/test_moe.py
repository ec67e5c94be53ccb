"""runtime_mlx MoE: the batteries of route (every path) and grouped_gemm (`reference.testing.moe`), route beyond
the spec (NaN logits, the order of exact ties), the gather_mm experts, DeepSeekMoE and the standard softmax MoE
with gradients and loads."""

from __future__ import annotations

import mlx.core as mx
import pytest
import torch

from reference.moe import DeepSeekMoE as RefDeepSeekMoE
from reference.moe import Experts as RefExperts
from reference.moe import MoE as RefMoE
from reference.moe import route as ref_route
from reference.testing import assert_close
from reference.testing.pytest_plugin import cases, check_case
from runtime_mlx import kernels as K
from runtime_mlx.kernels.moe import grouped_gemm
from runtime_mlx.moe import DeepSeekMoE, Experts, MoE
from tests.mlx.utils import PATHS, copy_weights, grads_of, to_mx, to_torch
from tests.reference_utils import make_config, randomize_


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", cases("route"))
def test_route_battery(path, case):
    """The route op's battery on `runtime_mlx.kernels.route`, on the path ``path`` (pure MLX, or Metal)."""
    check_case(case, K.route, "mlx")
    assert K.kernel_path("route") == path


@pytest.mark.parametrize("case", cases("grouped_gemm"))
def test_grouped_gemm_battery(case):
    """The grouped_gemm op's battery on `runtime_mlx.kernels.moe.grouped_gemm` (``mx.gather_mm``, every path)."""
    check_case(case, grouped_gemm, "mlx")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("cfg", [(10, 3, 1, 1), (16, 3, 4, 2)], ids=["flat", "groups"])
def test_route_nan_logit(path, cfg):
    """A NaN logit ranks first, as in torch.topk (the reference): its expert is picked and the NaN weight shows
    (a diverged router must give a NaN loss, not a finite one)."""
    e, top_k, n_group, topk_group = cfg
    logits, bias = torch.randn(4, e, dtype=torch.float64), torch.randn(e, dtype=torch.float64) * 0.1
    logits[1, 5] = float("nan")
    logits[2] = float("nan")
    idx, w, _ = ref_route(logits, bias, top_k, n_group, topk_group, True, 2.5)
    midx, mw, _ = K.route(to_mx(logits.float()), to_mx(bias.float()), top_k, n_group, topk_group, True, 2.5)
    midx = to_torch(midx).long()
    assert ((midx >= 0) & (midx < e)).all()
    assert torch.equal(midx[[0, 1, 3]], idx[[0, 1, 3]])
    assert torch.equal(to_torch(mw).isnan(), w.isnan())


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("cfg", [(16, 4, 1, 1), (24, 3, 4, 2)], ids=["flat", "groups"])
def test_route_exact_ties(path, cfg):
    """Equal biased scores (and equal group scores) rank the lower expert (group) index first (DESIGN.md), as the
    reference: logits drawn from 4 levels, so most rows tie at the top-k cut. The battery compares each token's set
    of experts; this pins the order of the K slots as well."""
    e, top_k, n_group, topk_group = cfg
    levels = torch.randn(4)
    logits = levels[torch.randint(0, 4, (40, e))]
    bias = torch.zeros(e)
    idx, w, _ = ref_route(logits, bias, top_k, n_group, topk_group, True, 1.0)
    midx, mw, _ = K.route(to_mx(logits), to_mx(bias), top_k, n_group, topk_group, True, 1.0)
    picked = logits.gather(1, idx)
    assert (picked[:, :-1] == picked[:, 1:]).any(), "no tie among the picked experts: the test tests nothing"
    assert torch.equal(to_torch(midx).long(), idx)
    assert_close(to_torch(mw), w, what="topk_weight")


def test_experts_gather_mm_and_grads():
    """The gather_mm grouped matmul over expert-sorted copies equals the reference's segment loop; one expert
    gets no token (zero gradient)."""
    ref = randomize_(RefExperts(5, 16, 12))
    x = torch.randn(7, 16, requires_grad=True)
    idx = torch.tensor([[0, 1], [1, 2], [2, 0], [3, 1], [0, 3], [1, 2], [3, 0]])
    w = torch.rand(7, 2)
    ref(x, idx, w).pow(2).sum().backward()
    ex = Experts(5, 16, 12)
    copy_weights(ex, ref)
    xm, im, wm = to_mx(x), to_mx(idx).astype(mx.int32), to_mx(w)
    assert_close(to_torch(ex(xm, im, wm)), ref(x, idx, w), what="experts")
    g = grads_of(ex, lambda: (ex(xm, im, wm) ** 2).sum())
    for n, p in ref.named_parameters():
        assert_close(to_torch(g[n]), p.grad, what=f"experts d{n}")
    assert float(mx.abs(g["gate_proj"][4]).max()) == 0.0
    dx = mx.grad(lambda a: (ex(a, im, wm) ** 2).sum())(xm)
    assert_close(to_torch(dx), x.grad, what="experts dx")


@pytest.mark.parametrize("groups", [(1, 1), (4, 2)])
@pytest.mark.parametrize("alpha", [0.0, 0.01])
def test_deepseek_moe_forward_grads_loads(groups, alpha):
    """DeepSeekMoE (sigmoid group-limited routing with bias, shared expert): output, parameter gradients,
    expert loads and the sequence balance loss equal the reference's; the bias gets no gradient."""
    c = make_config(n_routed_experts=16, num_experts_per_tok=3, n_group=groups[0], topk_group=groups[1],
                    aux_loss_alpha=alpha, routed_scaling_factor=2.0)
    ref = randomize_(RefDeepSeekMoE(c), router_bias=0.1).train()
    moe = DeepSeekMoE(c)
    copy_weights(moe, ref)
    x = torch.randn(2, 6, c.hidden_size)
    y = ref(x)
    (y.pow(2).sum() + (ref.aux_loss if alpha else 0)).backward()
    xm = to_mx(x)
    stats = {"loads": [], "aux": []}
    assert_close(to_torch(moe(xm, stats)), y, what="deepseek moe")
    assert (to_torch(stats["loads"][0]) == ref.expert_load.double()).all()
    if alpha:
        assert_close(to_torch(stats["aux"][0]), ref.aux_loss, what="sequence balance loss")

    def loss():
        s = {"loads": [], "aux": []}
        return (moe(xm, s) ** 2).sum() + sum(s["aux"], mx.array(0.0))

    g = grads_of(moe, loss)
    assert "gate.e_score_correction_bias" not in g
    for n, p in ref.named_parameters():
        assert_close(to_torch(g[n]), p.grad, what=f"deepseek moe d{n}")
    before = ref.gate.e_score_correction_bias.clone()
    ref.update_bias(0.01)
    moe.update_bias(stats["loads"][0], 0.01)
    assert_close(to_torch(moe.gate.e_score_correction_bias), ref.gate.e_score_correction_bias, what="bias update")
    assert not torch.equal(before, ref.gate.e_score_correction_bias)


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_standard_moe_and_switch_loss(norm_topk_prob):
    c = make_config(moe_type="standard", aux_loss_alpha=0.02, norm_topk_prob=norm_topk_prob)
    ref = randomize_(RefMoE(c)).train()
    moe = MoE(c)
    copy_weights(moe, ref)
    x = torch.randn(2, 6, c.hidden_size)
    y = ref(x)
    (y.pow(2).sum() + ref.aux_loss).backward()
    xm = to_mx(x)
    stats = {"loads": [], "aux": []}
    assert_close(to_torch(moe(xm, stats)), y, what="softmax moe")
    assert_close(to_torch(stats["aux"][0]), ref.aux_loss, what="switch loss")

    def loss():
        s = {"loads": [], "aux": []}
        return (moe(xm, s) ** 2).sum() + s["aux"][0]

    g = grads_of(moe, loss)
    for n, p in ref.named_parameters():
        assert_close(to_torch(g[n]), p.grad, what=f"softmax moe d{n}")
