"""kernels/triton/fp8.py: the batteries of act_quant, weight_dequant and fp8_gemm (`reference.testing.fp8`), on both
rounding paths for act_quant, the fp32 rounding alone, quantize-then-GEMM end to end, bad inputs.

Which rounding path an act_quant test takes is in its id: ``fp32-round`` (the kernel rounds to the e4m3 grid in
float32, then casts exactly) or ``cast`` (Triton's float32 -> e4m3 cast). Under the interpreter the ``cast`` path is
skipped: its cast is wrong where rounding carries into the next power of two (DESIGN.md); on a GPU both run.

Bounds (the specs'): act_quant and weight_dequant must equal the reference bit for bit (the same float32
operations, IEEE division). fp8_gemm is compared with the reference's float32 accumulation of exact fp8 products
(within 1e-7 of the float64 product of the dequantized operands): 5e-4 for float32 output, for the fp8 tensor cores
of a GPU, which keep about 14 bits while accumulating within a K-block (arXiv 2412.19437, section 3.3.2); under the
interpreter the kernel matches the reference exactly.
"""

from functools import partial

import pytest
import torch

from kernels.triton.fp8 import act_quant, fp8_gemm, weight_dequant
from kernels.triton.utils import interpreted
from reference import fp8 as ref
from reference.testing import assert_close
from reference.testing.pytest_plugin import cases, check_case
from tests.cuda.conftest import DEVICE

E4M3_GRID = torch.arange(256, dtype=torch.uint8).view(ref.FP8_DTYPE).double()
E4M3_GRID = E4M3_GRID[E4M3_GRID.isfinite()]
PATHS = [pytest.param(True, id="fp32-round"),
         pytest.param(False, id="cast", marks=pytest.mark.skipif(
             interpreted(), reason="the interpreter's float32 -> e4m3 cast is wrong where rounding carries"))]


@pytest.mark.parametrize("rnd", PATHS)
@pytest.mark.parametrize("case", cases("act_quant"))
def test_act_quant_battery(case, rnd):
    """The op's battery on each rounding path: ragged K, zero and sub-1e-4 tiles, scale exactly 1 (carries,
    ties, subnormals), block_size 64, no rows, V3 and V2-Lite widths; float32, bfloat16, float16 inputs; the e4m3
    bits and the scales exactly."""
    check_case(case, partial(act_quant, round_in_fp32=rnd), DEVICE.type)


@pytest.mark.parametrize("case", cases("weight_dequant"))
def test_weight_dequant_battery(case):
    """Partial edge blocks, every e4m3 bit pattern, a zero block, block_size 64, V3 and V2-Lite expert weights;
    each output dtype, exactly."""
    check_case(case, weight_dequant, DEVICE.type)


@pytest.mark.parametrize("case", cases("fp8_gemm"))
def test_fp8_gemm_battery(case):
    """Ragged K and N (partial blocks), K below one block, zero tiles and blocks, block_size 64, a decode token
    against V3's gate_proj, V2-Lite's gate_proj; each output dtype."""
    check_case(case, fp8_gemm, DEVICE.type)


def _bits(t):
    return t.view(torch.uint8).cpu()


def test_fp32_rounding_is_nearest_grid_point():
    """The fp32-round path alone: values whose rounding carries into the next binade, ties, subnormals."""
    special = [-7.85, 31.55, 15.5, -0.4687, 2.0**-7 * 1.0625, -(2.0**-10), 3 * 2.0**-10, 1e-30, 0.0, 448.0]
    v = torch.cat([torch.tensor(special), (torch.rand(2022) * 2 - 1) * 10.0 ** (torch.rand(2022) * 8.6 - 6)])
    x = torch.cat([torch.full((16, 1), 448.0), v.reshape(16, 127)], dim=1)  # scale exactly 1: y is v rounded
    y, s = act_quant(x.to(DEVICE), round_in_fp32=True)
    assert (s == 1).all()
    y = y[:, 1:].reshape(-1)
    yd = y.double().cpu()
    dist = (v.double()[:, None] - E4M3_GRID).abs()
    assert torch.equal((v.double() - yd).abs(), dist.amin(dim=1)), "not the nearest e4m3 value"
    assert torch.equal(_bits(y), _bits(v.to(ref.FP8_DTYPE))), "ties or signs differ from torch's cast"
    assert yd[:2].tolist() == [-8.0, 32.0]


def test_quantize_then_gemm_end_to_end():
    x, w = torch.randn(33, 260, device=DEVICE), torch.randn(70, 260)
    a, a_s = act_quant(x)
    b, b_s = ref.weight_quant(w)
    c = fp8_gemm(a, a_s, b.to(DEVICE), b_s.to(DEVICE))
    assert c.dtype == torch.get_default_dtype()  # out_dtype=None (the battery passes it explicitly)
    err = assert_close(c, x.double().cpu() @ w.double().T, bound=0.06, what="fp8 vs unquantized product")
    assert err > 1e-3  # it really went through fp8


def _valid():
    x = torch.randn(4, 300, device=DEVICE)
    a, a_s = act_quant(x)
    b, b_s = ref.weight_quant(torch.randn(200, 300))
    return x, a, a_s, b.to(DEVICE), b_s.to(DEVICE)


BAD = [
    ("bs-not-pow2", lambda x, a, a_s, b, b_s: act_quant(x, 96), ValueError, "power of two"),
    ("bs-small", lambda x, a, a_s, b, b_s: weight_dequant(b, b_s, 8), ValueError, "power of two"),
    ("K0", lambda x, a, a_s, b, b_s: act_quant(x[:, :0]), ValueError, "K >= 1"),
    ("x-fp8", lambda x, a, a_s, b, b_s: act_quant(a), TypeError, "x: expected dtype"),
    ("x-strided", lambda x, a, a_s, b, b_s: act_quant(x.t()), ValueError, "contiguous"),
    ("wd-float", lambda x, a, a_s, b, b_s: weight_dequant(b.float(), b_s), TypeError, "w_fp8: expected dtype"),
    ("wd-1d", lambda x, a, a_s, b, b_s: weight_dequant(b[0], b_s), ValueError, "w_fp8: expected 2 dims"),
    ("wd-scale", lambda x, a, a_s, b, b_s: weight_dequant(b, b_s.T.contiguous()), ValueError,
     r"scale_inv: expected shape \(2, 3\)"),
    ("wd-out", lambda x, a, a_s, b, b_s: weight_dequant(b, b_s, dtype=torch.int32), TypeError, "dtype"),
    ("mm-K", lambda x, a, a_s, b, b_s: fp8_gemm(a, a_s, b[:, :256].contiguous(), b_s[:, :2].contiguous()),
     ValueError, "b: expected shape"),
    ("mm-as", lambda x, a, a_s, b, b_s: fp8_gemm(a, a_s[:2], b, b_s), ValueError, r"a_s: expected shape \(4, 3\)"),
    ("mm-bs", lambda x, a, a_s, b, b_s: fp8_gemm(a, a_s, b, b_s.half()), TypeError, "b_s: expected dtype"),
    ("mm-a", lambda x, a, a_s, b, b_s: fp8_gemm(x, a_s, b, b_s), TypeError, "a: expected dtype"),
    ("mm-device", lambda x, a, a_s, b, b_s: fp8_gemm(a, a_s, b, b_s.to("meta")), ValueError, "b_s: expected device"),
]


@pytest.mark.parametrize("call,exc,match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_inputs_raise(call, exc, match):
    with pytest.raises(exc, match=match):
        call(*_valid())
