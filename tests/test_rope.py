"""reference/rope.py: interleaved and NeoX RoPE against independent forms, offsets, YaRN frequencies and
amplitude, gradients."""

from __future__ import annotations

import math

import pytest
import torch

from reference.rope import RotaryEmbedding, apply_rope, rope_inv_freq
from reference.testing import assert_close, rel_err
from tests.reference_utils import (
    rope_interleaved,
    rope_neox,
)


def _angles(positions, dim, theta=10000.0, dtype=torch.float64):
    inv = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=dtype) / dim)
    ang = torch.as_tensor(positions, dtype=dtype)[:, None] * inv
    return ang.cos(), ang.sin()


@pytest.mark.parametrize("interleaved", [True, False])
def test_apply_rope_matches_independent_forms(interleaved):
    x = torch.randn(3, 2, 7, 8, dtype=torch.float64)
    cos, sin = _angles(range(5, 12), 8)
    ref = rope_interleaved(x, cos, sin) if interleaved else rope_neox(x, cos, sin)
    assert_close(apply_rope(x, cos, sin, interleaved), ref, torch.float64)


def test_interleaved_and_neox_relate_by_permutation():
    d = 8
    x = torch.randn(3, 7, d, dtype=torch.float64)
    cos, sin = _angles(range(7), d)
    perm = torch.cat((torch.arange(0, d, 2), torch.arange(1, d, 2)))  # (2i, 2i+1) -> (i, i + d/2)
    inter = apply_rope(x, cos, sin, interleaved=True)
    neox = apply_rope(x[..., perm], cos, sin, interleaved=False)
    assert_close(inter[..., perm], neox, torch.float64)
    # and the two pairings are not the same map
    assert rel_err(inter, apply_rope(x, cos, sin, interleaved=False)) > 1e-2


def test_rotary_offset_equals_slice_of_longer():
    rot = RotaryEmbedding(8, 10000.0)
    x = torch.randn(3, 4, 11, 8, dtype=torch.float64)
    cos_l, sin_l = rot(11 + 5, 0, dtype=torch.float64)
    cos_o, sin_o = rot(11, 5, dtype=torch.float64)
    assert torch.equal(cos_o, cos_l[5:]) and torch.equal(sin_o, sin_l[5:])
    for inter in (True, False):
        long = apply_rope(torch.cat((torch.randn(3, 4, 5, 8, dtype=torch.float64), x), 2), cos_l, sin_l, inter)
        assert_close(apply_rope(x, cos_o, sin_o, inter), long[:, :, 5:], torch.float64)


@pytest.mark.parametrize("interleaved", [True, False])
def test_rope_preserves_norms(interleaved):
    rot = RotaryEmbedding(16, 10000.0)
    x = torch.randn(3, 9, 16, dtype=torch.float64)
    y = apply_rope(x, *rot(9, 3, dtype=torch.float64), interleaved)
    assert_close(y.norm(dim=-1), x.norm(dim=-1), torch.float64, bound=1e-7)  # cos/sin are float32-exact
    assert rel_err(y, x) > 1e-2


@pytest.mark.parametrize("interleaved", [True, False])
def test_rope_relative_position(interleaved):
    d = 16
    q, k = torch.randn(d, dtype=torch.float64), torch.randn(d, dtype=torch.float64)

    def dot(m, n):
        cq, sq = _angles([m], d)
        ck, sk = _angles([n], d)
        return (apply_rope(q[None], cq, sq, interleaved) * apply_rope(k[None], ck, sk, interleaved)).sum()

    for m, n, s in [(7, 3, 11), (2, 9, 40), (0, 0, 123)]:
        a, b = dot(m, n), dot(m + s, n + s)
        assert abs(a - b) <= 1e-12 * (1 + abs(a)), (m, n, s, a.item(), b.item())
    assert abs(dot(7, 3) - dot(7, 4)) > 1e-3  # but it does depend on the difference


def test_yarn_inv_freq():
    dim, theta, factor, orig = 64, 10000.0, 40.0, 4096
    rs = {"type": "yarn", "factor": factor, "original_max_position_embeddings": orig,
          "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
    base, amp0 = rope_inv_freq(dim, theta, None)
    yarn, amp = rope_inv_freq(dim, theta, rs)
    assert amp0 == 1.0 and amp == pytest.approx(1.0)

    def corr(rot):
        return dim * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(theta))

    low, high = math.floor(corr(32)), math.ceil(corr(1))
    assert 0 < low < high < dim // 2  # both regimes exist at this size
    i = torch.arange(dim // 2)
    hi_freq, lo_freq = i <= low, i >= high  # the ramp is 0 up to low, 1 from high
    assert torch.equal(yarn[hi_freq], base[hi_freq])  # high-frequency dims extrapolate (unchanged)
    assert_close(yarn[lo_freq], base[lo_freq] / factor, torch.float32)  # low-frequency dims interpolate
    mid = ~(hi_freq | lo_freq)
    assert ((yarn[mid] < base[mid]) & (yarn[mid] > base[mid] / factor)).all()
    assert (yarn[1:] < yarn[:-1]).all()  # still monotone


def test_yarn_amplitude_without_mscale_all_dim():
    rs = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    _, amp = rope_inv_freq(8, 10000.0, rs)
    assert amp == pytest.approx(0.1 * math.log(4.0) + 1.0)
    cos, sin = RotaryEmbedding(8, 10000.0, rs)(5, 0, dtype=torch.float64)
    assert_close(cos**2 + sin**2, torch.full_like(cos, amp * amp), torch.float32)


def test_rope_odd_dim_raises():
    with pytest.raises(ValueError, match="even"):
        rope_inv_freq(7, 10000.0, None)


@pytest.mark.parametrize("interleaved", [True, False])
def test_gradcheck_apply_rope(interleaved):
    x = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    cos, sin = _angles(range(3, 8), 6)
    cos.requires_grad_(True)
    sin.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, c, s: apply_rope(a, c, s, interleaved), (x, cos, sin))


@pytest.mark.parametrize("scaling", [
    {"rope_type": "linear", "factor": 3.0},
    {"type": "linear", "factor": 0.5},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
], ids=["linear", "linear-legacy-type", "llama3"])
def test_static_scaled_inv_freq_equals_transformers(scaling):
    """'linear' and 'llama3' frequencies equal transformers' ``ROPE_INIT_FUNCTIONS`` on a DeepseekV3Config (dim
    16, so llama3's three wavelength bands all occur)."""
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    kind = scaling.get("rope_type", scaling.get("type"))
    params = {**{k: v for k, v in scaling.items() if k != "type"}, "rope_type": kind, "rope_theta": 10000.0}
    cfg = transformers.DeepseekV3Config(hidden_size=64, num_attention_heads=4, qk_rope_head_dim=16,
                                        rope_parameters=params)
    expected, amp_expected = ROPE_INIT_FUNCTIONS[kind](cfg)
    got, amp = rope_inv_freq(16, 10000.0, scaling)
    assert amp == amp_expected == 1.0
    assert_close(got, expected, torch.float32)
    plain, _ = rope_inv_freq(16, 10000.0, None)
    if kind == "linear":
        assert torch.equal(got, plain / scaling["factor"])
    else:
        assert got[0] == plain[0] and got[-1] == plain[-1] / 8.0 and plain[-1] / 8.0 < got[2] < plain[2]


def test_rope_op_slices_the_table_and_checks_its_arguments():
    """`reference.rope.rope` (the op's signature, `reference.testing.rope`) is `apply_rope` on rows offset..offset+T-1
    of the tables, in x's dtype; it rejects an odd D, a table of the wrong width and an offset past the table."""
    from reference.rope import rope

    cos, sin = RotaryEmbedding(8, 10000.0)(12)
    x = torch.randn(2, 3, 5, 8)
    assert torch.equal(rope(x, cos, sin, True, 7), apply_rope(x, cos[7:], sin[7:], True))
    assert rope(x.bfloat16(), cos, sin, False, 2).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="D even"):
        rope(x[..., :7], cos, sin, True)
    with pytest.raises(ValueError, match="cos, sin"):
        rope(x, cos[:, :3], sin[:, :3], True)
    with pytest.raises(ValueError, match="offset"):
        rope(x, cos, sin, True, 8)
