"""runtime_mlx swiglu (the kernel on every path, and the MLP with its gradients) against the reference."""

from __future__ import annotations

import mlx.core as mx
import pytest
import torch

from reference.swiglu import MLP as RefMLP
from reference.swiglu import swiglu as ref_swiglu
from runtime_mlx import kernels as K
from runtime_mlx.swiglu import MLP
from tests.mlx.utils import PATHS, copy_weights, grads_of, to_mx, to_torch
from tests.reference_utils import randomize_
from reference.testing import assert_close


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu(path, dtype):
    gate, up, g = torch.randn(7, 333, dtype=dtype), torch.randn(7, 333, dtype=dtype), torch.randn(7, 333)
    gr, ur = gate.double().requires_grad_(), up.double().requires_grad_()
    ref = ref_swiglu(gr, ur)
    ref.backward(g.double())
    out = K.swiglu(to_mx(gate), to_mx(up))
    dg, du = mx.grad(lambda a, b: (K.swiglu(a, b).astype(mx.float32) * to_mx(g)).sum(), argnums=(0, 1))(
        to_mx(gate), to_mx(up))
    assert_close(to_torch(out), ref, dtype)
    assert_close(to_torch(dg), gr.grad, dtype, what="dgate")
    assert_close(to_torch(du), ur.grad, dtype, what="dup")


def test_mlp_swiglu_and_grads():
    ref = randomize_(RefMLP(16, 24))
    x = torch.randn(4, 16)
    ref(x).pow(2).sum().backward()
    mlp = MLP(16, 24)
    copy_weights(mlp, ref)
    xm = to_mx(x)
    assert_close(to_torch(mlp(xm)), ref(x), what="mlp")
    g = grads_of(mlp, lambda: (mlp(xm) ** 2).sum())
    for n, p in ref.named_parameters():
        assert_close(to_torch(g[n]), p.grad, what=f"mlp d{n}")
