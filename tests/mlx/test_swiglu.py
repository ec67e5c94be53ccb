"""runtime_mlx swiglu: the op's battery (`reference.testing.swiglu`) on every path, and the MLP with its
gradients against the reference."""

from __future__ import annotations

import pytest
import torch

from reference.swiglu import MLP as RefMLP
from reference.testing import assert_close
from reference.testing.pytest_plugin import cases, check_case
from runtime_mlx import kernels as K
from runtime_mlx.swiglu import MLP
from tests.mlx.utils import PATHS, copy_weights, grads_of, to_mx, to_torch
from tests.reference_utils import randomize_


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", cases("swiglu"))
def test_battery(path, case):
    """The op's battery on `runtime_mlx.kernels.swiglu`, on the path ``path`` (pure MLX, or Metal)."""
    check_case(case, K.swiglu, "mlx")
    assert K.kernel_path("swiglu") == path


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
