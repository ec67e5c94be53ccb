"""runtime_mlx rms_norm (the kernel on every path, and the RMSNorm module with its gradients) against the
reference."""

from __future__ import annotations

import mlx.core as mx
import pytest
import torch

from reference.rms_norm import RMSNorm as RefRMSNorm
from reference.rms_norm import rms_norm as ref_rms_norm
from runtime_mlx import kernels as K
from runtime_mlx.rms_norm import RMSNorm
from tests.mlx.utils import PATHS, copy_weights, grads_of, to_mx, to_torch
from tests.reference_utils import randomize_
from reference.testing import assert_close


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm(path, dtype):
    x = torch.randn(3, 5, 300, dtype=dtype)
    w = torch.randn(300)
    g = torch.randn(3, 5, 300)
    xr, wr = x.double().requires_grad_(), w.double().requires_grad_()
    ref = ref_rms_norm(xr, wr, 1e-6)
    ref.backward(g.double())

    def loss(xm, wm):
        return (K.rms_norm(xm, wm, 1e-6).astype(mx.float32) * to_mx(g)).sum()

    out = K.rms_norm(to_mx(x), to_mx(w), 1e-6)
    assert K.kernel_path("rms_norm") == path
    dx, dw = mx.grad(loss, argnums=(0, 1))(to_mx(x), to_mx(w))
    assert_close(to_torch(out), ref, dtype)
    assert_close(to_torch(dx), xr.grad, dtype, what="dx")
    assert_close(to_torch(dw), wr.grad, dtype, what="dw")


def test_rms_norm_and_grads():
    ref = randomize_(RefRMSNorm(24, 1e-5))
    x = torch.randn(3, 5, 24, requires_grad=True)
    ref(x).pow(2).sum().backward()
    norm = RMSNorm(24, 1e-5)
    copy_weights(norm, ref)
    xm = to_mx(x)
    assert_close(to_torch(norm(xm)), ref(x), what="rms_norm")
    g = grads_of(norm, lambda: (norm(xm) ** 2).sum())
    assert_close(to_torch(g["weight"]), ref.weight.grad, what="rms_norm dweight")
    dx = mx.grad(lambda a: (norm(a) ** 2).sum())(xm)
    assert_close(to_torch(dx), x.grad, what="rms_norm dx")
