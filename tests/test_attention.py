"""reference/attention.py: MHA / MQA / GQA against a naive form, grouped heads, the causal mask, cached decode,
gradients. RoPE is in test_rope.py."""

from __future__ import annotations

import math

import pytest
import torch

from reference.attention import Attention, attend, causal_mask
from reference.cache import LayerCache
from reference.rope import RotaryEmbedding
from reference.testing import assert_close, rel_err
from tests.reference_utils import (
    gradcheck_module,
    make_config,
    randomize_,
    rope_interleaved,
    rope_neox,
)

# ----------------------------------------------------------------------------- attention


def naive_attention(layer: Attention, x, cos, sin, interleaved: bool):
    """Per-head causal softmax attention; query head h reads key/value head h // (H / Hk)."""
    b, t, _ = x.shape
    h, hk, d = layer.n_heads, layer.n_kv, layer.head_dim
    rope = rope_interleaved if interleaved else rope_neox
    q = rope((x @ layer.q_proj.weight.T).view(b, t, h, d).transpose(1, 2), cos, sin)
    k = rope((x @ layer.k_proj.weight.T).view(b, t, hk, d).transpose(1, 2), cos, sin)
    v = (x @ layer.v_proj.weight.T).view(b, t, hk, d).transpose(1, 2)
    out = torch.empty(b, h, t, d, dtype=x.dtype)
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    for head in range(h):
        kv = head // (h // hk)
        s = (q[:, head] @ k[:, kv].transpose(-1, -2)) / math.sqrt(d)
        out[:, head] = torch.softmax(s.masked_fill(~causal, float("-inf")), -1) @ v[:, kv]
    return out.transpose(1, 2).reshape(b, t, h * d) @ layer.o_proj.weight.T


def _layer(attention_type, dtype=torch.float64, **kw):
    c = make_config(attention_type, **kw)
    layer = randomize_(Attention(c, 0)).to(dtype)
    rot = RotaryEmbedding(c.head_dim, c.rope_theta)
    return c, layer, rot


@pytest.mark.parametrize("attention_type", ["mha", "mqa", "gqa"])
@pytest.mark.parametrize("interleaved", [True, False])
def test_attention_equals_naive(attention_type, interleaved):
    c, layer, rot = _layer(attention_type, rope_interleave=interleaved)
    x = torch.randn(3, 7, c.hidden_size, dtype=torch.float64)
    cos, sin = rot(7, 0, dtype=torch.float64)
    out = layer(x, cos, sin)
    ref = naive_attention(layer, x, cos, sin, interleaved)
    assert out.std() > 0.1
    assert_close(out, ref, torch.float64)
    # the other pairing gives a different answer (the test sees the pairing)
    assert rel_err(out, naive_attention(layer, x, cos, sin, not interleaved)) > 1e-3


def test_attend_grouped_heads_equals_repeat():
    q = torch.randn(3, 6, 5, 4, dtype=torch.float64)
    k = torch.randn(3, 2, 5, 4, dtype=torch.float64)
    v = torch.randn(3, 2, 5, 3, dtype=torch.float64)  # v width != qk width
    mask = causal_mask(5, 5, 0)
    out = attend(q, k, v, mask, 0.7)
    kr, vr = k.repeat_interleave(3, dim=1), v.repeat_interleave(3, dim=1)
    p = torch.softmax((q @ kr.transpose(-1, -2) * 0.7).masked_fill(~mask, float("-inf")), -1)
    assert_close(out, p @ vr, torch.float64)


def test_attention_op_aligns_the_causal_mask_to_the_end():
    """`reference.attention.attention` (the op's signature, `reference.testing.attention`): causal queries are the
    last T of the S keys, non-causal sees every key, and causal with S < T raises."""
    from reference.attention import attention

    q, k, v = (torch.randn(1, 4, 3, 8, dtype=torch.float64), torch.randn(1, 2, 7, 8, dtype=torch.float64),
               torch.randn(1, 2, 7, 5, dtype=torch.float64))
    assert_close(attention(q, k, v, 0.5), attend(q, k, v, causal_mask(3, 7, 4), 0.5), torch.float64)
    assert_close(attention(q, k, v, 0.5, False), attend(q, k, v, torch.ones(3, 7, dtype=torch.bool), 0.5),
                 torch.float64)
    assert_close(attention(q, k[:, :, :3], v[:, :, :3], 0.5), attend(q, k[:, :, :3], v[:, :, :3], None, 0.5),
                 torch.float64)
    with pytest.raises(ValueError, match="S=3 < T=7"):
        attention(k.repeat(1, 2, 1, 1), q[:, :2], q[:, :2], 0.5)


def test_causal_mask_offset():
    m = causal_mask(2, 5, 3)
    assert m.tolist() == [[True, True, True, True, False], [True, True, True, True, True]]


@pytest.mark.parametrize("attention_type", ["mha", "mqa", "gqa"])
def test_attention_layer_cache_decode_equals_full(attention_type):
    c, layer, rot = _layer(attention_type, dtype=torch.float32)
    b, t, pre = 3, 9, 4
    x = torch.randn(b, t, c.hidden_size)
    full = layer(x, *rot(t, 0))
    cache = LayerCache()
    outs = [layer(x[:, :pre], *rot(pre, 0), cache=cache, offset=0)]
    for i in range(pre, t):
        outs.append(layer(x[:, i : i + 1], *rot(1, i), cache=cache, offset=i))
    err = assert_close(torch.cat(outs, 1), full, torch.float32, what="decode vs full")
    print(f"{attention_type} layer decode vs full: {err:.2e}")
    k, v = cache.tensors["k"], cache.tensors["v"]
    assert set(cache.tensors) == {"k", "v"}
    assert k.shape == v.shape == (b, c.num_key_value_heads, t, c.head_dim)
    assert cache.nbytes_per_token() == 2 * c.num_key_value_heads * c.head_dim * 4


def test_gradcheck_attention_gqa():
    c, layer, rot = _layer("gqa", hidden_size=16, num_attention_heads=4, num_key_value_heads=2)
    x = torch.randn(2, 3, 16, dtype=torch.float64, requires_grad=True)
    cos, sin = rot(3, 2, dtype=torch.float64)
    assert gradcheck_module(layer, lambda m, x: m(x, cos, sin, offset=2), (x,),
                            names=("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight"), fast_mode=True)


# ----------------------------------------------------------------------------- RoPE


