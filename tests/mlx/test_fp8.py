"""runtime_mlx FP8: act_quant (1x128 tiles) and weight_dequant (128x128 blocks) on every path against
reference.fp8."""

from __future__ import annotations

import mlx.core as mx
import pytest
import torch

from reference import fp8 as ref_fp8
from runtime_mlx import kernels as K
from tests.mlx.kernel_refs import spread
from tests.mlx.utils import PATHS, to_mx, to_torch
from reference.testing import assert_close


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape,bs", [((3, 5, 300), 128), ((7, 64), 32), ((2, 1), 128)])
def test_act_quant(path, shape, bs):
    x = spread(*shape)
    x[0, ..., :3] = 0.0
    x[-1, ..., -1] = float("nan")  # its tile: NaN scale and NaN (0x7F) values, as the reference
    y_ref, s_ref = ref_fp8.act_quant(x, bs)
    y, s = K.act_quant(to_mx(x), bs)
    assert y.dtype == mx.uint8 and s.dtype == mx.float32
    assert torch.equal(to_torch(s).nan_to_num(-1.0), s_ref.nan_to_num(-1.0))  # scales are > 0: -1 marks NaN
    assert torch.equal(to_torch(y), y_ref.view(torch.uint8))  # round-to-nearest-even e4m3 bits, exactly


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape,bs", [((300, 200), 128), ((45, 70), 32)])
def test_weight_dequant(path, shape, bs):
    w_fp8, s = ref_fp8.weight_quant(spread(*shape), bs)
    ref = ref_fp8.weight_dequant(w_fp8, s, bs)
    out = K.weight_dequant(to_mx(w_fp8.view(torch.uint8)), to_mx(s), bs)
    assert_close(to_torch(out), ref, bound=0.0)
