"""runtime_mlx FP8: the batteries of act_quant (1x128 tiles) and weight_dequant (128x128 blocks) on every path
and of fp8_gemm (pure MLX) (`reference.testing.fp8`), and NaN inputs beyond the spec."""

from __future__ import annotations

import mlx.core as mx
import pytest
import torch

from reference import fp8 as ref_fp8
from reference.testing.pytest_plugin import cases, check_case
from runtime_mlx import kernels as K
from tests.mlx.kernel_refs import spread
from tests.mlx.utils import PATHS, to_mx, to_torch


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", cases("act_quant"))
def test_act_quant_battery(path, case):
    """The act_quant battery: the e4m3 bits (uint8 here) and the scales, exactly, on the path ``path``."""
    check_case(case, K.act_quant, "mlx")
    assert K.kernel_path("act_quant") == path


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", cases("weight_dequant"))
def test_weight_dequant_battery(path, case):
    """The weight_dequant battery (its ``dtype`` argument becomes the mx dtype of the same name), exactly."""
    check_case(case, K.weight_dequant, "mlx")
    assert K.kernel_path("weight_dequant") == path


@pytest.mark.parametrize("case", cases("fp8_gemm"))
def test_fp8_gemm_battery(case):
    """The fp8_gemm battery (pure MLX, no Metal path): float32 accumulation of each K block's exact e4m3 products,
    scaled per block, in the output dtype under test (``out_dtype`` becomes the mx dtype of the same name)."""
    check_case(case, K.fp8_gemm, "mlx")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape,bs", [((3, 5, 300), 128), ((7, 64), 32), ((2, 1), 128)])
def test_act_quant_nan_tile(path, shape, bs):
    """Beyond the spec (whose comparisons never pass a NaN): a NaN makes its tile's scale NaN and its values the
    e4m3 NaN 0x7F, as the reference; the other tiles are untouched."""
    x = spread(*shape)
    x[0, ..., :3] = 0.0
    x[-1, ..., -1] = float("nan")
    y_ref, s_ref = ref_fp8.act_quant(x, bs)
    y, s = K.act_quant(to_mx(x), bs)
    assert y.dtype == mx.uint8 and s.dtype == mx.float32
    assert torch.equal(to_torch(s).nan_to_num(-1.0), s_ref.nan_to_num(-1.0))  # scales are > 0: -1 marks NaN
    assert torch.equal(to_torch(y), y_ref.view(torch.uint8))  # round-to-nearest-even e4m3 bits, exactly


def test_weight_dequant_refuses_a_non_mlx_dtype():
    """The battery passes the mx dtype of the same name as the spec's torch dtype; a torch dtype here is an error."""
    w_fp8, s = ref_fp8.weight_quant(spread(45, 70), 32)
    with pytest.raises(TypeError, match="dtype: expected an mx.Dtype"):
        K.weight_dequant(to_mx(w_fp8), to_mx(s), 32, torch.bfloat16)


def test_fp8_gemm_default_out_dtype_and_refusals():
    """``out_dtype=None`` is float32 (the reference's default, ``torch.get_default_dtype()``); a torch dtype, float
    (not e4m3 bits) operands and mismatched scales are errors."""
    a, a_s = ref_fp8.act_quant(spread(3, 200), 64)
    b, b_s = ref_fp8.weight_quant(spread(70, 200), 64)
    args = [to_mx(t) for t in (a, a_s, b, b_s)]
    c = K.fp8_gemm(*args, 64)
    assert c.dtype == mx.float32
    assert torch.equal(to_torch(c), ref_fp8.fp8_gemm(a, a_s, b, b_s, 64))
    with pytest.raises(TypeError, match="out_dtype: expected an mx.Dtype"):
        K.fp8_gemm(*args, 64, torch.bfloat16)
    with pytest.raises(TypeError, match="a: expected a uint8"):
        K.fp8_gemm(args[0].astype(mx.float32), *args[1:], 64)
    with pytest.raises(ValueError, match="b_s: expected shape"):
        K.fp8_gemm(*args[:3], args[3][:, :1], 64)
