"""reference/mla.py: Multi-head Latent Attention, naive and absorbed forms, latent KV cache."""

from __future__ import annotations

import math

import pytest
import torch

from reference.attention import causal_mask
from reference.cache import LayerCache
from reference.mla import MLA, mla_decode
from reference.rope import RotaryEmbedding
from reference.testing import assert_close, rel_err
from tests.reference_utils import (
    gradcheck_module,
    make_config,
    naive_mla,
    naive_rms,
    randomize_,
    rope_interleaved,
)

YARN = {"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 16, "mscale": 1.0,
        "mscale_all_dim": 1.0}


def _mla(q_lora_rank=None, dtype=torch.float64, **kw):
    c = make_config("mla", q_lora_rank=q_lora_rank, **kw)
    layer = randomize_(MLA(c, 0)).to(dtype)
    return c, layer, RotaryEmbedding(c.qk_rope_head_dim, c.rope_theta, c.rope_scaling)


def _run(layer, x, rot, absorb, prefill=None):
    """Full pass (prefill None) or prefill ``prefill`` tokens then decode one token at a time with a cache."""
    layer.absorb = absorb
    t = x.shape[1]
    if prefill is None:
        return layer(x, *rot(t, 0, dtype=x.dtype)), None
    cache = LayerCache()
    outs = [layer(x[:, :prefill], *rot(prefill, 0, dtype=x.dtype), cache=cache)]
    for i in range(prefill, t):
        outs.append(layer(x[:, i : i + 1], *rot(1, i, dtype=x.dtype), cache=cache, offset=i))
    return torch.cat(outs, 1), cache


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("q_lora_rank", [None, 12])
@pytest.mark.parametrize("prefill", [None, 4], ids=["nocache", "cache"])
def test_absorbed_equals_naive(dtype, q_lora_rank, prefill):
    c, layer, rot = _mla(q_lora_rank, dtype)
    x = torch.randn(3, 9, c.hidden_size, dtype=dtype)
    naive, _ = _run(layer, x, rot, False, prefill)
    absorbed, _ = _run(layer, x, rot, True, prefill)
    assert naive.std() > 0.1
    err = assert_close(absorbed, naive, dtype, what="absorbed vs naive")
    print(f"absorbed vs naive {dtype} q_lora={q_lora_rank} prefill={prefill}: {err:.2e}")
    if prefill is not None:  # and the cached passes equal the full naive pass
        full, _ = _run(layer, x, rot, False)
        assert_close(naive, full, dtype, what="cached naive vs full")
        assert_close(absorbed, full, dtype, what="cached absorbed vs full")


@pytest.mark.parametrize("q_lora_rank", [None, 12])
@pytest.mark.parametrize("rope_scaling", [None, YARN], ids=["rope", "yarn"])
def test_mla_equals_paper_equations_float64(q_lora_rank, rope_scaling):
    c, layer, rot = _mla(q_lora_rank, torch.float64, rope_scaling=rope_scaling)
    m = 1.0 if rope_scaling is None else 0.1 * math.log(8.0) + 1.0
    assert layer.scale == pytest.approx(c.qk_head_dim**-0.5 * m * m, rel=1e-12)
    x = torch.randn(3, 7, c.hidden_size, dtype=torch.float64)
    cos, sin = rot(7, 0, dtype=torch.float64)
    ref = naive_mla(layer, x, cos, sin)
    for absorb in (False, True):
        layer.absorb = absorb
        assert_close(layer(x, cos, sin), ref, torch.float64, what=f"absorb={absorb}")
    # the real float32 path agrees at the float32 bound
    layer32 = layer.float()
    for absorb in (False, True):
        layer32.absorb = absorb
        assert_close(layer32(x.float(), cos.float(), sin.float()), ref, torch.float32)


def test_mla_rope_key_shared_by_heads():
    """Changing one head's query-rope weights changes only that head's scores; the key rope part is one
    head taken from kv_a_proj_with_mqa (its last qk_rope_head_dim rows)."""
    c, layer, rot = _mla(None)
    assert layer.kv_a_proj_with_mqa.weight.shape == (c.kv_lora_rank + c.qk_rope_head_dim, c.hidden_size)
    x = torch.randn(2, 5, c.hidden_size, dtype=torch.float64)
    cos, sin = rot(5, 0, dtype=torch.float64)
    _, _, c_kv, k_pe, _ = layer.project(x, cos, sin)
    kv_a = x @ layer.kv_a_proj_with_mqa.weight.T
    assert_close(k_pe, rope_interleaved(kv_a[..., c.kv_lora_rank:], cos, sin), torch.float64)
    assert_close(c_kv, naive_rms(kv_a[..., : c.kv_lora_rank], layer.kv_a_layernorm.weight, 1e-6),
                 torch.float64, bound=1e-6)  # RMSNorm runs in float32


@pytest.mark.parametrize("q_lora_rank", [None, 12])
def test_mla_cache_holds_only_latent(q_lora_rank):
    c, layer, rot = _mla(q_lora_rank, torch.float32)
    x = torch.randn(3, 7, c.hidden_size)
    out, cache = _run(layer, x, rot, None, prefill=3)
    assert set(cache.tensors) == {"c_kv", "k_pe"}
    assert cache.tensors["c_kv"].shape == (3, 7, c.kv_lora_rank)
    assert cache.tensors["k_pe"].shape == (3, 7, c.qk_rope_head_dim)
    assert cache.nbytes_per_token() == (c.kv_lora_rank + c.qk_rope_head_dim) * 4
    # the cached latent is what a full projection gives
    _, _, c_kv, k_pe, _ = layer.project(x, *rot(7, 0))
    assert_close(cache.tensors["c_kv"], c_kv, torch.float32)
    assert_close(cache.tensors["k_pe"], k_pe, torch.float32)


def test_mla_default_absorbs_only_single_token_decode(monkeypatch):
    c, layer, rot = _mla(None, torch.float32)
    calls = []
    orig_a, orig_n = MLA.attend_absorbed, MLA.attend_naive
    monkeypatch.setattr(MLA, "attend_absorbed", lambda s, *a: calls.append("absorbed") or orig_a(s, *a))
    monkeypatch.setattr(MLA, "attend_naive", lambda s, *a: calls.append("naive") or orig_n(s, *a))
    x = torch.randn(2, 6, c.hidden_size)
    _run(layer, x, rot, None, prefill=4)  # prefill (naive) + 2 single-token steps (absorbed)
    layer(x, *rot(6, 0))  # no cache: naive
    assert calls == ["naive", "absorbed", "absorbed", "naive"]


@pytest.mark.parametrize("absorb", [False, True])
def test_gradcheck_mla(absorb):
    c, layer, rot = _mla(6, torch.float64, hidden_size=16, num_attention_heads=2, kv_lora_rank=6,
                         qk_nope_head_dim=4, qk_rope_head_dim=2, v_head_dim=3)
    layer.absorb = absorb
    x = torch.randn(2, 4, 16, dtype=torch.float64, requires_grad=True)
    cos, sin = rot(4, 1, dtype=torch.float64)
    names = ("q_a_proj.weight", "q_a_layernorm.weight", "q_b_proj.weight", "kv_a_proj_with_mqa.weight",
             "kv_a_layernorm.weight", "kv_b_proj.weight", "o_proj.weight")
    assert gradcheck_module(layer, lambda m, x: m(x, cos, sin, offset=1), (x,), names, fast_mode=True)
    assert gradcheck_module(layer, lambda m, x: m(x, cos, sin, offset=1), (x,))


def test_absorbed_differs_when_weights_differ():
    """Guard: the absorbed form really reads kv_b_proj (a broken W_UK/W_UV split would still run)."""
    c, layer, rot = _mla(None, torch.float64)
    x = torch.randn(2, 5, c.hidden_size, dtype=torch.float64)
    cos, sin = rot(5, 0, dtype=torch.float64)
    layer.absorb = True
    a = layer(x, cos, sin)
    with torch.no_grad():
        layer.kv_b_proj.weight[: c.qk_nope_head_dim] += 0.5  # head 0's W_UK only
    assert rel_err(layer(x, cos, sin), a) > 1e-3


@pytest.mark.parametrize("t,s", [(1, 9), (3, 9), (6, 6)], ids=["decode", "mtp", "prefill"])
def test_mla_decode_op_equals_naive_form(t, s):
    """The op `mla_decode` (the absorbed form between W_UK and W_UV) equals the naive form's attention over
    up-projected keys and values, causal with the queries at the end of the cache; it raises on bad shapes."""
    c, layer, _ = _mla(None, torch.float64)
    b = 2
    q_nope = torch.randn(b, layer.n_heads, t, layer.dn, dtype=torch.float64)
    q_pe = torch.randn(b, layer.n_heads, t, layer.dr, dtype=torch.float64)
    c_kv, k_pe = torch.randn(b, s, layer.r, dtype=torch.float64), torch.randn(b, s, layer.dr, dtype=torch.float64)
    w = layer.kv_b_proj.weight.view(layer.n_heads, layer.dn + layer.dv, layer.r)
    with torch.no_grad():
        o_lat = mla_decode(torch.einsum("bhtd,hdr->bhtr", q_nope, w[:, : layer.dn]), q_pe, c_kv, k_pe, layer.scale)
        naive = layer.attend_naive(q_nope, q_pe, c_kv, k_pe, causal_mask(t, s, s - t))
    assert_close(torch.einsum("bhtr,hvr->bhtv", o_lat, w[:, layer.dn :]), naive, torch.float64)
    with pytest.raises(ValueError, match="S=2 < T=3"):
        mla_decode(*(torch.randn(1, 2, 3, n) for n in (8, 4)), torch.randn(1, 2, 8), torch.randn(1, 2, 4), 1.0)
    with pytest.raises(ValueError, match="mismatched shapes"):
        mla_decode(torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 4), torch.randn(1, 5, 7), torch.randn(1, 5, 4), 1.0)
    with pytest.raises(ValueError, match=r"expected q_latent \(B, H, T, r\)"):
        mla_decode(torch.randn(2, 1, 8), torch.randn(1, 2, 1, 4), torch.randn(1, 5, 8), torch.randn(1, 5, 4), 1.0)
