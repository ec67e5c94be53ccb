"""kernels/triton/rms_norm.py: the op's battery (`reference.testing`), the Triton-only dtype rule, bad inputs.

Outputs are poisoned (tests/cuda/conftest.py); widths are never powers of two, so the kernel's masked tail is
hit.
"""

import pytest
import torch

from kernels.triton.rms_norm import rms_norm, rms_norm_bwd, rms_norm_fwd
from reference.rms_norm import rms_norm as rms_norm_ref
from reference.testing import assert_close
from reference.testing.pytest_plugin import cases, check_case
from tests.cuda.conftest import DEVICE


@pytest.mark.parametrize("case", cases("rms_norm"))
def test_battery(case):
    """The op's whole battery (`reference.testing.rms_norm`): ragged rows, a decode token, rows spanning many
    binades, no rows, DeepSeek-V3 and V2-Lite widths; float32, bfloat16, float16; y, dx, dweight."""
    check_case(case, rms_norm, DEVICE.type)


def test_fp32_weight_with_bf16_input_keeps_input_dtype():
    """A Triton-specific choice beyond the op spec (whose inputs share one dtype): the output keeps x's dtype."""
    x = torch.randn(4, 70, device=DEVICE).bfloat16().requires_grad_()
    w = torch.randn(70, device=DEVICE).requires_grad_()
    y = rms_norm(x, w)
    assert y.dtype == torch.bfloat16
    dx, dw = torch.autograd.grad(y.float().square().sum(), (x, w))
    assert dx.dtype == torch.bfloat16 and dw.dtype == torch.float32
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = rms_norm_ref(x64, w64)
    dx64, dw64 = torch.autograd.grad(ref.square().sum(), (x64, w64))
    assert_close(y, ref, torch.bfloat16)
    assert_close(dx, dx64, torch.bfloat16, what="dx")
    assert_close(dw, dw64, torch.bfloat16, what="dw")


def test_rstd_and_empty_input():
    x = torch.randn(3, 50, device=DEVICE)
    y, rstd = rms_norm_fwd(x, torch.ones(50, device=DEVICE), 1e-5)
    assert_close(rstd, x.double().pow(2).mean(-1).add(1e-5).rsqrt())
    y0, r0 = rms_norm_fwd(x[:0], torch.ones(50, device=DEVICE))
    assert y0.shape == (0, 50) and r0.shape == (0,)
    dx0, dw0 = rms_norm_bwd(y0, x[:0], torch.ones(50, device=DEVICE), r0)
    assert dx0.shape == (0, 50) and torch.equal(dw0, torch.zeros(50, device=DEVICE))


BAD = [
    ("int-x", lambda x, w: rms_norm(x.long(), w), TypeError, "x: expected dtype"),
    ("fp64-x", lambda x, w: rms_norm(x.double(), w), TypeError, "x: expected dtype"),
    ("w-shape", lambda x, w: rms_norm(x, w[:-1]), ValueError, r"weight: expected shape \(40,\)"),
    ("w-device", lambda x, w: rms_norm(x, w.to("meta")), ValueError, "weight: expected device"),
    ("strided", lambda x, w: rms_norm(x.t(), w[:6]), ValueError, "contiguous"),
    ("scalar", lambda x, w: rms_norm(x[0, 0], w), ValueError, r"\(\.\.\., H\)"),
    ("list", lambda x, w: rms_norm([1.0], w), TypeError, "torch.Tensor"),
]


@pytest.mark.parametrize("call,exc,match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_inputs_raise(call, exc, match):
    x, w = torch.randn(6, 40, device=DEVICE), torch.randn(40, device=DEVICE)
    with pytest.raises(exc, match=match):
        call(x, w)
