"""runtime_mlx rms_norm (the kernel on every path, and the RMSNorm module with its gradients) against the
reference."""

from __future__ import annotations

import mlx.core as mx
import pytest
import torch

from reference.rms_norm import RMSNorm as RefRMSNorm
from reference.testing import assert_close
from reference.testing.pytest_plugin import cases, check_case
from runtime_mlx import kernels as K
from runtime_mlx.rms_norm import RMSNorm
from tests.mlx.utils import PATHS, copy_weights, grads_of, to_mx, to_torch
from tests.reference_utils import randomize_


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", cases("rms_norm"))
def test_battery(path, case):
    """The op's battery on `runtime_mlx.kernels.rms_norm`, on the path ``path`` (pure MLX, or Metal)."""
    check_case(case, K.rms_norm, "mlx")
    assert K.kernel_path("rms_norm") == path


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
