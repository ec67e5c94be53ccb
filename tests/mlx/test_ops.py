"""runtime_mlx ops (pure-MLX path on this machine) against their reference ops, outputs and gradients, float32:
RMSNorm, RoPE (interleaved, NeoX, YaRN, offset), SwiGLU MLP, attention (causal, GQA, qk width != v width,
boolean mask), MLA naive and absorbed, the DSA indexer selection, the router, the gather_mm experts and both
MoE layers (balance losses, loads, bias rule). Bound: relative error 1e-5 (DESIGN.md)."""

from __future__ import annotations

import mlx.nn as nn
import pytest
import torch
from mlx.utils import tree_flatten

from reference.attention import attend as ref_attend
from reference.attention import causal_mask as ref_causal_mask
from reference.cache import LayerCache as RefLayerCache
from reference.dsa import DSA as RefDSA
from reference.mla import MLA as RefMLA
from reference.moe import DeepSeekMoE as RefDeepSeekMoE
from reference.moe import Experts as RefExperts
from reference.moe import MoE as RefMoE
from reference.rms_norm import RMSNorm as RefRMSNorm
from reference.rope import RotaryEmbedding, apply_rope
from reference.swiglu import MLP as RefMLP
from runtime_mlx import kernels
from runtime_mlx.attention import attend
from runtime_mlx.cache import LayerCache
from runtime_mlx.dsa import DSA
from runtime_mlx.mla import MLA
from runtime_mlx.moe import DeepSeekMoE, Experts, MoE
from runtime_mlx.rms_norm import RMSNorm
from runtime_mlx.rope import RoPE
from runtime_mlx.swiglu import MLP
from tests.mlx.utils import copy_weights, mx, to_mx, to_torch
from tests.reference_utils import make_config, randomize_
from tests.tolerance import assert_close

YARN = {"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 16, "beta_fast": 32, "beta_slow": 1,
        "mscale": 1.0, "mscale_all_dim": 0.5}


def grads_of(module, fn):
    """Parameter gradients (flat name -> array) of the scalar ``fn()`` with respect to an MLX module."""
    return dict(tree_flatten(nn.value_and_grad(module, fn)()[1]))


def test_kernel_path_reported():
    assert kernels.backend() in ("metal", "mlx")
    if not kernels.metal_available():
        kernels.rms_norm(mx.ones((2, 4)), mx.ones((4,)))
        assert kernels.kernel_path("rms_norm") == "mlx"


def test_rms_norm_and_grads():
    ref = randomize_(RefRMSNorm(24, 1e-5))
    x = torch.randn(3, 5, 24, requires_grad=True)
    ref(x).pow(2).sum().backward()
    norm = RMSNorm(24, 1e-5)
    copy_weights(norm, ref)
    xm = to_mx(x)
    assert_close(to_torch(norm(xm)), ref(x), what="rms_norm")
    g = grads_of(norm, lambda: (norm(xm) ** 2).sum())
    assert_close(to_torch(g["weight"]), ref.weight.grad, what="rms_norm dweight")
    dx = mx.grad(lambda a: (norm(a) ** 2).sum())(xm)
    assert_close(to_torch(dx), x.grad, what="rms_norm dx")


@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "neox"])
@pytest.mark.parametrize("scaling", [None, YARN], ids=["plain", "yarn"])
@pytest.mark.parametrize("offset", [0, 37])
def test_rope(interleaved, scaling, offset):
    """``mx.fast.rope`` (traditional = interleaved pairs, freqs = 1 / inv_freq, YaRN amplitude) equals
    `reference.rope.apply_rope`, and so does its gradient; a wider input keeps its tail (the indexer)."""
    dim, t = 16, 7
    rot = RotaryEmbedding(dim, 10000.0, scaling)
    cos, sin = rot(t, offset)
    x = torch.randn(2, 3, t, dim + 8, requires_grad=True)
    ref = torch.cat((apply_rope(x[..., :dim], cos, sin, interleaved), x[..., dim:]), -1)
    (ref * torch.linspace(-1, 1, dim + 8)).sum().backward()
    rope = RoPE(dim, 10000.0, scaling)
    out = rope(to_mx(x), offset, traditional=interleaved)
    assert_close(to_torch(out), ref, what="rope")
    w = mx.linspace(-1, 1, dim + 8)
    dx = mx.grad(lambda a: (rope(a, offset, traditional=interleaved) * w).sum())(to_mx(x))
    assert_close(to_torch(dx), x.grad, what="rope dx")


def test_mlp_swiglu_and_grads():
    ref = randomize_(RefMLP(16, 24))
    x = torch.randn(4, 16)
    ref(x).pow(2).sum().backward()
    mlp = MLP(16, 24)
    copy_weights(mlp, ref)
    xm = to_mx(x)
    assert_close(to_torch(mlp(xm)), ref(x), what="mlp")
    g = grads_of(mlp, lambda: (mlp(xm) ** 2).sum())
    for n, p in ref.named_parameters():
        assert_close(to_torch(g[n]), p.grad, what=f"mlp d{n}")


@pytest.mark.parametrize("heads,kv_heads,dk,dv", [(4, 4, 8, 8), (4, 2, 8, 8), (4, 1, 12, 8)])
@pytest.mark.parametrize("cached", [False, True])
def test_attend_causal(heads, kv_heads, dk, dv, cached):
    """Causal attention (also T < S: the queries are the last T positions) with grouped heads and dv != dk."""
    t, s = (3, 9) if cached else (9, 9)
    q, k, v = torch.randn(2, heads, t, dk), torch.randn(2, kv_heads, s, dk), torch.randn(2, kv_heads, s, dv)
    mask = None if t == s else ref_causal_mask(t, s, s - t)
    ref = ref_attend(q, k, v, mask, 0.3)
    assert_close(to_torch(attend(to_mx(q), to_mx(k), to_mx(v), None, 0.3)), ref, what="attend")


def test_attend_boolean_mask():
    q, k, v = torch.randn(2, 4, 6, 8), torch.randn(2, 1, 6, 8), torch.randn(2, 1, 6, 5)
    mask = (torch.rand(2, 1, 6, 6) < 0.6) | torch.eye(6, dtype=torch.bool)
    ref = ref_attend(q, k, v, mask, 0.4)
    assert_close(to_torch(attend(to_mx(q), to_mx(k), to_mx(v), to_mx(mask), 0.4)), ref, what="masked attend")


def _layer_pair(ref_cls, cls, config):
    ref = randomize_(ref_cls(config, 0)).eval()
    layer = cls(config, 0, RoPE(config.rope_dim, config.rope_theta, config.rope_scaling))
    copy_weights(layer, ref)
    return ref, layer


def _run_ref(layer, x, rot, prefill):
    t = x.shape[1]
    if prefill is None:
        return layer(x, *rot(t, 0))
    cache = RefLayerCache()
    outs = [layer(x[:, :prefill], *rot(prefill, 0), cache=cache)]
    outs += [layer(x[:, i : i + 1], *rot(1, i), cache=cache, offset=i) for i in range(prefill, t)]
    return torch.cat(outs, 1)


def _run_mlx(layer, x, prefill):
    t = x.shape[1]
    if prefill is None:
        return layer(x)
    cache = LayerCache()
    outs = [layer(x[:, :prefill], cache, 0)] + [layer(x[:, i : i + 1], cache, i) for i in range(prefill, t)]
    return mx.concatenate(outs, axis=1)


@pytest.mark.parametrize("kind", ["mla", "mla_q_lora_yarn", "dsa"])
@pytest.mark.parametrize("absorb", [False, True], ids=["naive", "absorbed"])
@pytest.mark.parametrize("prefill", [None, 5], ids=["full", "cache"])
def test_mla_and_dsa_layers(kind, absorb, prefill):
    """MLA / DSA layer outputs equal the reference's in both forms, without and with the latent cache (the
    absorbed decode goes through `kernels.mla_decode`); DSA's index_topk 4 < seq 11 makes attention sparse."""
    kw = {"mla": {}, "mla_q_lora_yarn": dict(q_lora_rank=12, rope_scaling=YARN), "dsa": {}}[kind]
    c = make_config("dsa" if kind == "dsa" else "mla", **kw)
    ref, layer = _layer_pair(RefDSA if kind == "dsa" else RefMLA, DSA if kind == "dsa" else MLA, c)
    ref.absorb = layer.absorb = absorb
    x = torch.randn(2, 11, c.hidden_size)
    rot = RotaryEmbedding(c.rope_dim, c.rope_theta, c.rope_scaling)
    with torch.no_grad():
        expected = _run_ref(ref, x, rot, prefill)
    assert_close(to_torch(_run_mlx(layer, to_mx(x), prefill)), expected, what=f"{kind} absorb={absorb}")


def test_mla_grads():
    c = make_config("mla", q_lora_rank=12)
    ref, layer = _layer_pair(RefMLA, MLA, c)
    x = torch.randn(2, 9, c.hidden_size)
    rot = RotaryEmbedding(c.rope_dim)
    ref(x, *rot(9)).pow(2).sum().backward()
    xm = to_mx(x)
    g = grads_of(layer, lambda: (layer(xm) ** 2).sum())
    for n, p in ref.named_parameters():
        assert_close(to_torch(g[n]), p.grad, what=f"mla d{n}")


def test_dsa_selection_equals_reference():
    c = make_config("dsa", index_topk=3)
    ref, layer = _layer_pair(RefDSA, DSA, c)
    x, q_lat = torch.randn(2, 10, c.hidden_size), torch.randn(2, 10, c.q_lora_rank)
    rot = RotaryEmbedding(c.rope_dim)
    cos, sin = rot(10)
    with torch.no_grad():
        expected = ref.indexer.select(ref.indexer.scores(x, q_lat, cos, sin), ref_causal_mask(10, 10, 0))
    got = layer.indexer.select(to_mx(x), to_mx(q_lat))
    assert (torch.from_numpy(__import__("numpy").array(got)) == expected).all()
    assert "indexer" not in dict(tree_flatten(layer.trainable_parameters())).get("", {})
    assert not any(n.startswith("indexer.") for n, _ in tree_flatten(layer.trainable_parameters()))


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
