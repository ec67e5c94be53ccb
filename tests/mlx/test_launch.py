"""runtime_mlx.kernels launch machinery: which path runs and how it is reported, Metal required where CI says
so, and every op's argument checks."""

from __future__ import annotations

import os

import mlx.core as mx
import pytest

from runtime_mlx import kernels
from runtime_mlx import kernels as K
from tests.mlx.utils import METAL


def test_metal_when_required():
    """CI's macOS job sets DSFS_REQUIRE_METAL=1: there, a missing Metal device is a failure, not a skip."""
    if os.environ.get("DSFS_REQUIRE_METAL") == "1":
        assert METAL, "DSFS_REQUIRE_METAL=1 but MLX has no Metal device"


def test_path_reporting():
    K.rms_norm(mx.ones((2, 4)), mx.ones((4,)))
    assert K.kernel_path("rms_norm") == K.backend() == ("metal" if METAL else "mlx")


def test_kernel_path_reported():
    assert kernels.backend() in ("metal", "mlx")
    if not kernels.metal_available():
        kernels.rms_norm(mx.ones((2, 4)), mx.ones((4,)))
        assert kernels.kernel_path("rms_norm") == "mlx"


def test_bad_inputs():
    with pytest.raises(TypeError):
        K.rms_norm(mx.ones((2, 4), dtype=mx.int32), mx.ones((4,)))
    with pytest.raises(ValueError):
        K.rms_norm(mx.ones((2, 4)), mx.ones((5,)))
    with pytest.raises(ValueError):
        K.route(mx.ones((2, 10)), mx.zeros((10,)), 2, 3, 1, True, 1.0)
    with pytest.raises(ValueError):
        K.indexer_topk(mx.ones((1, 5, 4)), 2)  # more queries than keys
    with pytest.raises(ValueError):
        K.indexer_topk(mx.ones((1, 2, 4)), 0)
    with pytest.raises(TypeError):
        K.weight_dequant(mx.ones((4, 4)), mx.ones((1, 1)))
    with pytest.raises(ValueError):
        K.mla_decode(mx.ones((1, 2, 3, 8)), mx.ones((1, 2, 3, 4)), mx.ones((1, 2, 8)), mx.ones((1, 2, 4)), 1.0)
