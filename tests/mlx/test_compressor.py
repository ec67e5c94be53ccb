"""runtime_mlx gated_pool (DeepSeek-V4's compressor pooling): the op's battery on every path (`reference.testing.
compressor`: HCA and CSA, prior rows, gates of +-30, V4 shapes; forward and the gradients of kv, gate and
position_bias), the gradients of the prior rows, and bad inputs. CSA's `compressed_topk`: its battery on every path
(prefix and general masks, ties, NaN, -inf, topk > C, decode, V4-Flash), empty and bad inputs."""

from __future__ import annotations

import mlx.core as mx
import pytest
import torch

from reference.compressor import gated_pool as ref_gated_pool
from reference.testing import assert_close
from reference.testing.pytest_plugin import cases, check_case
from runtime_mlx import kernels as K
from tests.mlx.utils import PATHS, to_mx, to_torch


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", cases("gated_pool"))
def test_battery(path, case):
    check_case(case, K.gated_pool, "mlx")
    assert K.kernel_path("gated_pool") == path


@pytest.mark.parametrize("path", PATHS)
def test_prior_rows_gradients(path):
    """CSA's cached prior window gets its gradients too (beyond the battery's kv, gate, position_bias)."""
    b, m, d = 2, 3, 10
    args = [torch.randn(b, 2 * m, 2 * d), torch.randn(b, 2 * m, 2 * d), torch.randn(m, 2 * d), torch.randn(b, m, d),
            torch.randn(b, m, d)]
    cot = torch.randn(b, 2, d)
    leaves = [a.double().requires_grad_() for a in args]
    ref_gated_pool(leaves[0], leaves[1], leaves[2], True, *leaves[3:]).backward(cot.double())

    def loss(*a):
        return (K.gated_pool(a[0], a[1], a[2], True, *a[3:]) * to_mx(cot)).sum()

    grads = mx.grad(loss, argnums=tuple(range(5)))(*[to_mx(a) for a in args])
    for i, (g, leaf) in enumerate(zip(grads, leaves, strict=True)):
        assert_close(to_torch(g), leaf.grad, what=f"gradient {i}")


def test_bad_inputs():
    kv, bias = mx.zeros((1, 8, 6)), mx.zeros((4, 6))
    with pytest.raises(ValueError, match="multiple of m"):
        K.gated_pool(kv, kv, mx.zeros((3, 6)), False)
    with pytest.raises(ValueError, match="even width"):
        K.gated_pool(mx.zeros((1, 8, 5)), mx.zeros((1, 8, 5)), mx.zeros((4, 5)), True)
    with pytest.raises(ValueError, match="both or neither"):
        K.gated_pool(kv, kv, bias, True, prior_kv=mx.zeros((1, 4, 3)))
    with pytest.raises(ValueError, match="gate"):
        K.gated_pool(kv, mx.zeros((1, 8, 4)), bias, False)
    with pytest.raises(TypeError, match="kv"):
        K.gated_pool(kv.astype(mx.int32), kv, bias, False)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", cases("compressed_topk"))
def test_compressed_topk_battery(path, case):
    check_case(case, K.compressed_topk, "mlx")
    assert K.kernel_path("compressed_topk") == path


def test_compressed_topk_empty_and_bad_inputs():
    scores, visible = mx.zeros((2, 3, 7)), mx.ones((3, 7), dtype=mx.bool_)
    for s, v, shape in [(scores[..., :0], visible[:, :0], (2, 3, 0)), (scores[:, :0], visible[:0], (2, 0, 4))]:
        out = K.compressed_topk(s, v, 4)
        assert out.shape == shape and out.dtype == mx.int32
    with pytest.raises(TypeError, match="scores"):
        K.compressed_topk(scores.astype(mx.int32), visible, 4)
    with pytest.raises(TypeError, match="visible"):
        K.compressed_topk(scores, visible.astype(mx.int32), 4)
    with pytest.raises(ValueError, match="visible: expected shape"):
        K.compressed_topk(scores, visible[:, :5], 4)
    with pytest.raises(ValueError, match="topk"):
        K.compressed_topk(scores, visible, 0)
