"""reference/rms_norm.py: RMSNorm against its formula and float64 gradients."""

from __future__ import annotations

import torch

from reference.rms_norm import rms_norm
from reference.testing import assert_close
from tests.reference_utils import (
    naive_rms,
)


def test_rms_norm_equals_formula():
    x = torch.randn(3, 5, 16) * 3
    w = 1 + 0.1 * torch.randn(16)
    assert_close(rms_norm(x, w, 1e-6), naive_rms(x.double(), w.double(), 1e-6), torch.float32)
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    assert_close(rms_norm(x64, w64, 1e-6), naive_rms(x64, w64, 1e-6), torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: rms_norm(a, b, 1e-6), (x64[:2, :2], w64))


def test_gradcheck_rms_norm_float64():
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    w = (1 + 0.1 * torch.randn(8, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: rms_norm(a, b, 1e-6), (x, w))
