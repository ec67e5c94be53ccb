"""runtime_mlx MLA: the absorbed decode kernel's battery (`reference.testing.mla`, every path) and the MLA / DSA
layers (naive and absorbed, full and cached) with gradients, against the reference."""

from __future__ import annotations

import mlx.core as mx
import pytest
import torch

from reference.cache import LayerCache as RefLayerCache
from reference.dsa import DSA as RefDSA
from reference.mla import MLA as RefMLA
from reference.rope import RotaryEmbedding
from reference.testing import assert_close
from reference.testing.pytest_plugin import cases, check_case
from runtime_mlx import kernels as K
from runtime_mlx.cache import LayerCache
from runtime_mlx.dsa import DSA
from runtime_mlx.mla import MLA
from tests.mlx.utils import PATHS, YARN, grads_of, layer_pair, to_mx, to_torch
from tests.reference_utils import make_config


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", cases("mla_decode"))
def test_mla_decode_battery(path, case):
    """The op's battery on `runtime_mlx.kernels.mla_decode`, on the path ``path`` (pure MLX, or Metal)."""
    check_case(case, K.mla_decode, "mlx")
    assert K.kernel_path("mla_decode") == path


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
    ref, layer = layer_pair(RefDSA if kind == "dsa" else RefMLA, DSA if kind == "dsa" else MLA, c)
    ref.absorb = layer.absorb = absorb
    x = torch.randn(2, 11, c.hidden_size)
    rot = RotaryEmbedding(c.rope_dim, c.rope_theta, c.rope_scaling)
    with torch.no_grad():
        expected = _run_ref(ref, x, rot, prefill)
    assert_close(to_torch(_run_mlx(layer, to_mx(x), prefill)), expected, what=f"{kind} absorb={absorb}")


def test_mla_grads():
    c = make_config("mla", q_lora_rank=12)
    ref, layer = layer_pair(RefMLA, MLA, c)
    x = torch.randn(2, 9, c.hidden_size)
    rot = RotaryEmbedding(c.rope_dim)
    ref(x, *rot(9)).pow(2).sum().backward()
    xm = to_mx(x)
    g = grads_of(layer, lambda: (layer(xm) ** 2).sum())
    for n, p in ref.named_parameters():
        assert_close(to_torch(g[n]), p.grad, what=f"mla d{n}")
