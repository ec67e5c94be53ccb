"""runtime_mlx sink_attention: the op's battery (`reference.testing.sink_attention`: ragged sizes, -1 slots, a query
with no valid index, dominating and vanishing sinks, a decode step, a V4-Flash slice; forward and the gradients of q,
kv and sinks through MLX) on every path, MLX's int32 indices, and bad inputs."""

from __future__ import annotations

import mlx.core as mx
import pytest
import torch

from reference.sink_attention import sink_attention as ref_sink_attention
from reference.testing import assert_close
from reference.testing.pytest_plugin import cases, check_case
from reference.testing.sink_attention import v4_indices
from runtime_mlx import kernels as K
from tests.mlx.utils import PATHS, to_mx, to_torch


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", cases("sink_attention"))
def test_battery(path, case):
    check_case(case, K.sink_attention, "mlx")
    assert K.kernel_path("sink_attention") == path


def test_int32_window_and_compressed_indices():
    """V4's layout (window with -1 before position 0, then compressed entries) as int32, output and dsinks."""
    idx = v4_indices(torch.Generator().manual_seed(0), 2, 3, 1, 1, 5, 7, 4)  # (2, 3, 9) over 1 + 3 + 7 rows
    q, kv, sinks = torch.randn(2, 3, 4, 16), torch.randn(2, 11, 16), torch.randn(4)
    sinks64 = sinks.double().requires_grad_()
    ref = ref_sink_attention(q.double(), kv.double(), sinks64, idx, 0.25)
    ref.sum().backward()
    dsinks = mx.grad(lambda s: K.sink_attention(to_mx(q), to_mx(kv), s, to_mx(idx).astype(mx.int32), 0.25).sum())(
        to_mx(sinks))
    assert_close(to_torch(K.sink_attention(to_mx(q), to_mx(kv), to_mx(sinks), to_mx(idx).astype(mx.int32), 0.25)),
                 ref)
    assert_close(to_torch(dsinks), sinks64.grad, what="dsinks")


def test_bad_inputs():
    q, kv, sinks, idx = mx.zeros((1, 2, 3, 8)), mx.zeros((1, 5, 8)), mx.zeros((3,)), mx.zeros((1, 2, 4), mx.int32)
    with pytest.raises(ValueError, match="sinks"):
        K.sink_attention(q, kv, sinks[:2], idx, 1.0)
    with pytest.raises(ValueError, match="kv"):
        K.sink_attention(q, kv[..., :4], sinks, idx, 1.0)
    with pytest.raises(TypeError, match="indices"):
        K.sink_attention(q, kv, sinks, idx.astype(mx.float32), 1.0)
    with pytest.raises(TypeError, match="kv"):
        K.sink_attention(q, kv.astype(mx.float16), sinks, idx, 1.0)
