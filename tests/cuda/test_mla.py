"""Absorbed MLA decode (kernels/triton/mla.py) against `reference.mla.MLA.attend_absorbed` and its latent step.

r and dr are not powers of two, S is not a multiple of the block, T > 1 checks the causal offset between the new
tokens, and both the single-pass and the split-KV (flash-decoding) paths run. Outputs start as NaN.
"""

import pytest
import torch

from kernels.triton.mla import mla_decode
from reference.attention import attend, causal_mask
from reference.mla import MLA
from tests.cuda.conftest import DEVICE
from tests.reference_utils import make_config, randomize_
from reference.testing import assert_close


def _inputs(b, h, t, s, r, dr, dtype):
    q_latent = torch.randn(b, h, t, r, device=DEVICE, dtype=dtype)
    q_pe = torch.randn(b, h, t, dr, device=DEVICE, dtype=dtype)
    c_kv = torch.randn(b, s, r, device=DEVICE, dtype=dtype)
    k_pe = torch.randn(b, s, dr, device=DEVICE, dtype=dtype)
    return q_latent, q_pe, c_kv, k_pe


def _latent_ref(q_latent, q_pe, c_kv, k_pe, scale, causal):
    """The latent step of `MLA.attend_absorbed` in float64: MQA over ``[c_kv, k_pe]`` with values ``c_kv``."""
    q_latent, q_pe, c_kv, k_pe = (x.double() for x in (q_latent, q_pe, c_kv, k_pe))
    t, s = q_latent.shape[2], c_kv.shape[1]
    mask = causal_mask(t, s, s - t, DEVICE) if causal else torch.ones(t, s, dtype=torch.bool, device=DEVICE)
    q = torch.cat((q_latent, q_pe), dim=-1)
    k = torch.cat((c_kv, k_pe), dim=-1)[:, None]
    return attend(q, k, c_kv[:, None], mask, scale)


@pytest.mark.parametrize("t,s,splits", [(1, 45, 1), (3, 45, 1), (1, 45, 3), (3, 33, 4)])
def test_latent_step_fp32(t, s, splits):
    """(3, 33, 4): the last split holds key 32 only, which queries 0 and 1 do not see."""
    x = _inputs(2, 5, t, s, 40, 12, torch.float32)
    out = mla_decode(*x, 0.3, splits=splits)
    assert out.shape == (2, 5, t, 40) and out.dtype == torch.float32
    assert_close(out, _latent_ref(*x, 0.3, True), torch.float32)


def test_non_causal_fp32():
    x = _inputs(1, 3, 2, 21, 24, 8, torch.float32)
    assert_close(mla_decode(*x, 0.2, causal=False, splits=2), _latent_ref(*x, 0.2, False), torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_latent_step_half(dtype):
    """bfloat16 runs under the interpreter with dot operands upcast (the interpreter's bf16 tl.dot is broken)."""
    x = _inputs(2, 4, 2, 37, 40, 12, dtype)
    out = mla_decode(*x, 0.3, splits=2)
    assert out.dtype == dtype
    assert_close(out, _latent_ref(*x, 0.3, True), dtype)


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
    q_latent, q_pe, c_kv, k_pe = _inputs(1, 2, 3, 7, 16, 8, torch.float32)
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
