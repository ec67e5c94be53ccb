"""Flash attention (kernels/triton/attention.py): the op's battery (`reference.testing.attention`) and bad inputs.

Outputs and gradients start as NaN (tests/cuda/conftest.py).
"""

import pytest
import torch

from kernels.triton.attention import attention, attention_fwd
from reference.testing.pytest_plugin import cases, check_case
from tests.cuda.conftest import DEVICE


@pytest.mark.parametrize("case", cases("attention"))
def test_battery(case):
    """The op's whole battery: MHA, GQA, MQA (batch 2); causal with T < S (a prefill over a cache) and T == S,
    non-causal with T < S and T > S, one decode query, one key; T, S, Dk, Dv not multiples of the interpreter's
    16-wide blocks, Dv < Dk and Dv > Dk, DeepSeek-V3's MLA prefill head dims 192 / 128; float32, bfloat16 (dot
    operands upcast under the interpreter), float16; o, dq, dk, dv."""
    check_case(case, attention, DEVICE.type)


def _inputs(b, h, hk, t, s, dk, dv, dtype):
    q = torch.randn(b, h, t, dk, device=DEVICE, dtype=dtype)
    k = torch.randn(b, hk, s, dk, device=DEVICE, dtype=dtype)
    v = torch.randn(b, hk, s, dv, device=DEVICE, dtype=dtype)
    return q, k, v


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
