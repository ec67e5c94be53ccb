"""kernels/triton/fp8.py against reference/fp8.py.

Which rounding path each test takes is in its id: ``fp32-round`` (the kernel rounds to the e4m3 grid in float32,
then casts exactly) or ``cast`` (Triton's float32 -> e4m3 cast). Under the interpreter the ``cast`` path is
skipped: its cast is wrong where rounding carries into the next power of two (DESIGN.md); on a GPU both run.

Bounds: act_quant and weight_dequant must equal the reference bit for bit (the same float32 operations, IEEE
division). fp8_gemm is compared with the float64 product of the dequantized operands: 1e-5 (float32) under the
interpreter, which accumulates each K-block's fp8 product exactly; 5e-4 on a GPU, whose fp8 tensor cores keep
about 14 bits while accumulating within a K-block (arXiv 2412.19437, section 3.3.2).
"""

import pytest
import torch

from kernels.triton.fp8 import act_quant, fp8_gemm, weight_dequant
from kernels.triton.utils import interpreted
from reference import fp8 as ref
from tests.cuda.conftest import DEVICE
from reference.testing import assert_close

E4M3_GRID = torch.arange(256, dtype=torch.uint8).view(ref.FP8_DTYPE).double()
E4M3_GRID = E4M3_GRID[E4M3_GRID.isfinite()]
PATHS = [pytest.param(True, id="fp32-round"),
         pytest.param(False, id="cast", marks=pytest.mark.skipif(
             interpreted(), reason="the interpreter's float32 -> e4m3 cast is wrong where rounding carries"))]
GEMM_BOUND = 1e-5 if interpreted() else 5e-4


def _spanning(*shape, block=128):
    """randn scaled by a different power of ten (1e-2 .. 1e2) per block of the last dim, one tiny tile."""
    x = torch.randn(*shape)
    f = 10.0 ** (torch.rand(-(-shape[-1] // block)) * 4 - 2)
    x = x * f.repeat_interleave(block)[: shape[-1]]
    x.view(-1, shape[-1])[0, :block] *= 1e-7  # amax below 1e-4: the tile lands among the subnormals
    return x


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


@pytest.mark.parametrize("rnd", PATHS)
@pytest.mark.parametrize("bs", [128, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_act_quant_equals_reference(dtype, bs, rnd):
    x = _spanning(2, 9, 300, block=bs).to(dtype)
    x[1, 3, bs:2 * bs] = 0.0  # all-zero tile
    y, s = act_quant(x.to(DEVICE), bs, round_in_fp32=rnd)
    y_ref, s_ref = ref.act_quant(x, bs)
    assert y.dtype == ref.FP8_DTYPE and y.shape == x.shape and s.shape == s_ref.shape
    assert torch.equal(s.cpu(), s_ref), "scales differ"
    assert torch.equal(_bits(y), _bits(y_ref)), f"{(_bits(y) != _bits(y_ref)).sum()} values differ"


@pytest.mark.parametrize("bs", [128, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_dequant_equals_reference_with_partial_blocks(dtype, bs):
    w = _spanning(200, 300, block=bs) * 10.0 ** (torch.rand(200, 1) * 2 - 1)
    wq, ws = ref.weight_quant(w, bs)
    out = weight_dequant(wq.to(DEVICE), ws.to(DEVICE), bs, dtype=dtype)
    assert out.dtype == dtype and out.shape == w.shape
    assert torch.equal(out.cpu(), ref.weight_dequant(wq, ws, bs, dtype=dtype))  # one rounding, to nearest


@pytest.mark.parametrize("bs", [128, 64])
def test_fp8_gemm_matches_float64_product(bs):
    N, K = 200, 300
    x, w = _spanning(5, 7, K, block=bs), _spanning(N, K, block=bs)
    a, a_s = ref.act_quant(x, bs)
    b, b_s = ref.weight_quant(w, bs)
    c = fp8_gemm(a.to(DEVICE), a_s.to(DEVICE), b.to(DEVICE), b_s.to(DEVICE), bs)
    assert c.dtype == torch.float32 and c.shape == (5, 7, N)
    k_blk = torch.arange(K) // bs
    a64 = a.double() * a_s.double()[..., k_blk]
    b64 = b.double() * b_s.double()[torch.arange(N)[:, None] // bs, k_blk[None, :]]
    assert_close(c, a64 @ b64.T, bound=GEMM_BOUND, what="fp8_gemm vs float64 dequantized product")
    c16 = fp8_gemm(a.to(DEVICE), a_s.to(DEVICE), b.to(DEVICE), b_s.to(DEVICE), bs, out_dtype=torch.bfloat16)
    assert c16.dtype == torch.bfloat16
    assert_close(c16, a64 @ b64.T, torch.bfloat16)


def test_quantize_then_gemm_end_to_end():
    x, w = torch.randn(33, 260, device=DEVICE), torch.randn(70, 260)
    a, a_s = act_quant(x)
    b, b_s = ref.weight_quant(w)
    c = fp8_gemm(a, a_s, b.to(DEVICE), b_s.to(DEVICE))
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
