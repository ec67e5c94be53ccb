"""Absorbed MLA decode (kernels/triton/mla.py): the op's battery (`reference.testing.mla`), the split-KV
(flash-decoding) path on the battery's ragged samples, the non-causal option, the kernel through an MLA layer's
weights, and bad inputs. Outputs start as NaN (tests/cuda/conftest.py).
"""

import functools

import pytest
import torch

from kernels.triton.mla import mla_decode
from reference.attention import attend, causal_mask
from reference.mla import MLA, latent_qkv
from reference.testing import assert_close
from reference.testing.pytest_plugin import cases, check_case
from tests.cuda.conftest import DEVICE
from tests.reference_utils import make_config, randomize_


@pytest.mark.parametrize("case", cases("mla_decode"))
def test_battery(case):
    """The op's whole battery: one decode step at ragged cache lengths and over a single key, 3 new tokens (MTP /
    speculative), a prefill through the absorbed form, query rows spanning many binades, r and dr not powers of
    two, DeepSeek-V3 (128 heads) and V2-Lite absorbed dims; float32, bfloat16, float16; under torch.no_grad."""
    check_case(case, mla_decode, DEVICE.type)


@pytest.mark.parametrize("splits", [2, 3])
@pytest.mark.parametrize("case", cases("mla_decode", tags=("ragged",)))
def test_battery_split_kv(case, splits):
    """The split-KV path (partial outputs merged by their log-sum-exp) on the ragged samples. With 3 splits of
    ``3 new tokens, S=33`` the last split holds key 32 only, which queries 0 and 1 do not see."""
    check_case(case, functools.partial(mla_decode, splits=splits), DEVICE.type)


def _inputs(b, h, t, s, r, dr, dtype=torch.float32):
    shapes = ((b, h, t, r), (b, h, t, dr), (b, s, r), (b, s, dr))
    return [torch.randn(*shape, device=DEVICE, dtype=dtype) for shape in shapes]


def test_non_causal_fp32():
    """``causal=False`` (beyond the op): every query sees every cached key."""
    x = _inputs(1, 3, 2, 21, 24, 8)
    q, k, v = latent_qkv(*(a.double() for a in x))
    ref = attend(q, k, v, torch.ones(2, 21, dtype=torch.bool, device=DEVICE), 0.2)
    assert_close(mla_decode(*x, 0.2, causal=False, splits=2), ref, torch.float32)


def test_attend_absorbed_fp32():
    """Through an MLA layer's weights: W_UK into the query, the kernel, W_UV on the output latent."""
    config = make_config("mla", num_attention_heads=4, kv_lora_rank=24, qk_nope_head_dim=8, qk_rope_head_dim=6)
    mla = randomize_(MLA(config, 0)).to(DEVICE, torch.float64)
    b, t, s = 2, 2, 23
    q_nope = torch.randn(b, mla.n_heads, t, mla.dn, device=DEVICE, dtype=torch.float64)
    q_pe = torch.randn(b, mla.n_heads, t, mla.dr, device=DEVICE, dtype=torch.float64)
    c_kv = torch.randn(b, s, mla.r, device=DEVICE, dtype=torch.float64)
    k_pe = torch.randn(b, s, mla.dr, device=DEVICE, dtype=torch.float64)
    with torch.no_grad():
        ref = mla.attend_absorbed(q_nope, q_pe, c_kv, k_pe, causal_mask(t, s, s - t, DEVICE))
        w = mla.kv_b_proj.weight.view(mla.n_heads, mla.dn + mla.dv, mla.r).float()
        q_latent = torch.einsum("bhtd,hdr->bhtr", q_nope.float(), w[:, : mla.dn]).contiguous()
        o_lat = mla_decode(q_latent, q_pe.float(), c_kv.float(), k_pe.float(), mla.scale)
        out = torch.einsum("bhtr,hvr->bhtv", o_lat, w[:, mla.dn :])
    assert_close(out, ref, torch.float32)


def test_bad_inputs(monkeypatch):
    q_latent, q_pe, c_kv, k_pe = _inputs(1, 2, 3, 7, 16, 8)
    with pytest.raises(TypeError, match="q_latent: expected dtype"):
        mla_decode(q_latent.double(), q_pe, c_kv, k_pe, 1.0)
    with pytest.raises(TypeError, match="c_kv: expected dtype"):
        mla_decode(q_latent, q_pe, c_kv.half(), k_pe, 1.0)
    with pytest.raises(ValueError, match="q_pe: expected shape"):
        mla_decode(q_latent, q_pe[:, :1].contiguous(), c_kv, k_pe, 1.0)
    with pytest.raises(ValueError, match="c_kv: expected shape"):
        mla_decode(q_latent, q_pe, c_kv[..., :8].contiguous(), k_pe, 1.0)
    with pytest.raises(ValueError, match="k_pe: expected shape"):
        mla_decode(q_latent, q_pe, c_kv, k_pe[:, :5].contiguous(), 1.0)
    with pytest.raises(ValueError, match="S=2 < T=3"):
        mla_decode(q_latent, q_pe, c_kv[:, :2].contiguous(), k_pe[:, :2].contiguous(), 1.0)
    with pytest.raises(ValueError, match="splits must be at least 1"):
        mla_decode(q_latent, q_pe, c_kv, k_pe, 1.0, splits=0)
    with pytest.raises(ValueError, match="contiguous"):
        mla_decode(q_latent, q_pe, c_kv, k_pe.transpose(1, 2).contiguous().transpose(1, 2), 1.0)
    with pytest.raises(TypeError, match="indices: expected dtype"):
        mla_decode(q_latent, q_pe, c_kv, k_pe, 1.0, indices=torch.zeros(1, 3, 4, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="indices: expected shape"):
        mla_decode(q_latent, q_pe, c_kv, k_pe, 1.0, indices=torch.zeros(1, 2, 4, dtype=torch.int64, device=DEVICE))
    with pytest.raises(RuntimeError, match="forward only"):
        mla_decode(q_latent.requires_grad_(), q_pe, c_kv, k_pe, 1.0)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="need a CUDA tensor"):
        mla_decode(q_pe.cpu(), q_pe.cpu(), c_kv.cpu()[..., :8].contiguous(), k_pe.cpu(), 1.0)
