"""runtime_mlx mHC: the batteries of `mhc_pre` and `mhc_post` (`reference.testing.mhc`: N = 1, 2, 3, 4, 1/3/20
Sinkhorn iterations, ragged hidden sizes, a decode step, no tokens, a DeepSeek-V4-Flash slice; forward and gradients)
on every path (pure MLX, and Metal on Apple Silicon), and bad inputs."""

from __future__ import annotations

import mlx.core as mx
import pytest

from reference.testing.pytest_plugin import cases, check_case
from runtime_mlx import kernels as K
from tests.mlx.utils import PATHS


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", cases("mhc_pre"))
def test_mhc_pre_battery(path, case):
    check_case(case, K.mhc_pre, "mlx")
    assert K.kernel_path("mhc_pre") == path


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", cases("mhc_post"))
def test_mhc_post_battery(path, case):
    check_case(case, K.mhc_post, "mlx")
    assert K.kernel_path("mhc_post") == path


def test_bad_inputs():
    x = mx.zeros((1, 2, 4, 8))
    fn, base, scale = mx.zeros((24, 32)), mx.zeros((24,)), mx.ones((3,))
    with pytest.raises(ValueError, match="sinkhorn_iters=0"):
        K.mhc_pre(x, fn, base, scale, 0, 1e-6, 1e-6)
    with pytest.raises(ValueError, match=r"fn: expected shape \(24, 32\)"):
        K.mhc_pre(x, fn[:, :16], base, scale, 3, 1e-6, 1e-6)
    with pytest.raises(ValueError, match=r"streams: expected \(B, S, N, D\)"):
        K.mhc_pre(x[0], fn, base, scale, 3, 1e-6, 1e-6)
    with pytest.raises(TypeError, match="streams: expected float32"):
        K.mhc_pre(x.astype(mx.int32), fn, base, scale, 3, 1e-6, 1e-6)
    post, comb = mx.ones((1, 2, 4)), mx.ones((1, 2, 4, 4))
    with pytest.raises(ValueError, match=r"comb: expected shape \(1, 2, 4, 4\)"):
        K.mhc_post(x[:, :, 0], post, comb[..., :2], x)
    with pytest.raises(TypeError, match="block_out: expected the streams' dtype"):
        K.mhc_post(x[:, :, 0].astype(mx.float16), post, comb, x)
