"""Flash attention (kernels/triton/attention.py) against `reference.attention.attend` in float64.

Sizes are ragged (T, S, Dk, Dv not multiples of the 16-wide interpreter blocks nor powers of two), outputs and
gradients start as NaN (tests/cuda/conftest.py), and gradients of q, k, v are compared for a random ``dO``.
"""

import pytest
import torch

from kernels.triton.attention import attention, attention_fwd
from reference.attention import attend, causal_mask
from tests.cuda.conftest import DEVICE
from reference.testing import assert_close


def _inputs(b, h, hk, t, s, dk, dv, dtype):
    q = torch.randn(b, h, t, dk, device=DEVICE, dtype=dtype)
    k = torch.randn(b, hk, s, dk, device=DEVICE, dtype=dtype)
    v = torch.randn(b, hk, s, dv, device=DEVICE, dtype=dtype)
    return q, k, v


def _check(q, k, v, causal, dtype):
    """Kernel forward and q/k/v gradients against the float64 reference on the same inputs."""
    t, s, scale = q.shape[2], k.shape[2], q.shape[-1] ** -0.5
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out = attention(q, k, v, scale, causal)
    do = torch.randn_like(out)
    out.backward(do)
    ref_in = [x.detach().double().requires_grad_() for x in (q, k, v)]
    if causal:
        mask = None if t == s else causal_mask(t, s, s - t, DEVICE)
    else:
        mask = torch.ones(t, s, dtype=torch.bool, device=DEVICE)
    ref = attend(*ref_in, mask, scale)
    ref.backward(do.double())
    assert out.dtype == dtype and out.shape == ref.shape
    assert_close(out, ref, dtype, what="out")
    for name, x, r in zip("qkv", (q, k, v), ref_in, strict=True):
        assert_close(x.grad, r.grad, dtype, what=f"d{name}")


@pytest.mark.parametrize("h,hk", [(4, 4), (4, 2), (3, 1)], ids=["mha", "gqa", "mqa"])
def test_causal_cache_fp32(h, hk):
    """T < S (chunked prefill over a cache), Dk != Dv, neither a power of two."""
    _check(*_inputs(2, h, hk, 21, 35, 48, 24, torch.float32), causal=True, dtype=torch.float32)


def test_causal_square_fp32():
    """T == S (no cache), Dv > Dk."""
    _check(*_inputs(1, 2, 1, 33, 33, 24, 40, torch.float32), causal=True, dtype=torch.float32)


def test_non_causal_fp32():
    _check(*_inputs(1, 4, 2, 19, 29, 20, 12, torch.float32), causal=False, dtype=torch.float32)


def test_single_query_decode_fp32():
    """T = 1 against a longer cache: the query sees every key."""
    _check(*_inputs(2, 4, 2, 1, 37, 48, 24, torch.float32), causal=True, dtype=torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_causal_cache_half(dtype):
    """bfloat16 runs under the interpreter with dot operands upcast (the interpreter's bf16 tl.dot is broken)."""
    _check(*_inputs(1, 4, 2, 21, 35, 48, 24, dtype), causal=True, dtype=dtype)


def test_mla_prefill_dims_fp32():
    """MLA's naive prefill shape: qk head dim nope + rope, v head dim smaller (scaled down 192/128)."""
    _check(*_inputs(1, 2, 2, 18, 18, 72, 32, torch.float32), causal=True, dtype=torch.float32)


def test_bad_inputs(monkeypatch):
    q, k, v = _inputs(1, 4, 2, 5, 7, 16, 8, torch.float32)
    with pytest.raises(TypeError, match="q: expected a torch.Tensor"):
        attention_fwd(q.tolist(), k, v, 1.0)
    with pytest.raises(TypeError, match="q: expected dtype"):
        attention_fwd(q.double(), k.double(), v.double(), 1.0)
    with pytest.raises(TypeError, match="k: expected dtype"):
        attention_fwd(q, k.half(), v, 1.0)
    with pytest.raises(ValueError, match="q: expected 4 dims"):
        attention_fwd(q[0], k, v, 1.0)
    with pytest.raises(ValueError, match="k: expected shape"):
        attention_fwd(q, k[..., :8], v, 1.0)
    with pytest.raises(ValueError, match="v: expected shape"):
        attention_fwd(q, k, v[:, :, :5], 1.0)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        attention_fwd(q[:, :3].contiguous(), k, v, 1.0)
    with pytest.raises(ValueError, match="S=3 < T=5"):
        attention_fwd(q, k[:, :, :3].contiguous(), v[:, :, :3].contiguous(), 1.0)
    with pytest.raises(ValueError, match="contiguous"):
        attention_fwd(q.transpose(2, 3).contiguous().transpose(2, 3), k, v, 1.0)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="need a CUDA tensor"):
        attention_fwd(q.cpu(), k.cpu(), v.cpu(), 1.0)
