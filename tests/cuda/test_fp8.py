"""kernels/triton/fp8.py: the batteries of act_quant, weight_dequant, fp8_gemm, fp8_grouped_gemm and fp8_grouped_wgrad
(`reference.testing.fp8`), on both rounding paths for act_quant, the fp32 rounding alone, quantize-then-GEMM end to end,
bad inputs; and direct tests against `reference.fp8` of what FP8 training adds (report section 3.3): ue8m0 scales, the
transposed quantization of Wgrad, per-row b scales (Wgrad), ``W.T`` views (Dgrad), the grouped GEMM with ragged and
empty experts, the routed experts' grouped Wgrad (per-segment tiles), NaN and zero tiles.

Which rounding path an act_quant test takes is in its id: ``fp32-round`` (the kernel rounds to the e4m3 grid in
float32, then casts exactly) or ``cast`` (Triton's float32 -> e4m3 cast). Under the interpreter the ``cast`` path is
skipped: its cast is wrong where rounding carries into the next power of two (DESIGN.md); on a GPU both run.

Bounds (the specs'): act_quant and weight_dequant must equal the reference bit for bit (the same float32
operations, IEEE division). fp8_gemm is compared with the reference's float32 accumulation of exact fp8 products
(within 1e-7 of the float64 product of the dequantized operands): 5e-4 for float32 output, for the fp8 tensor cores
of a GPU, which keep about 14 bits while accumulating within a K-block (arXiv 2412.19437, section 3.3.2); under the
interpreter the kernel matches the reference within float32 rounding (the reference runs ``torch._scaled_mm`` per K
block on CPU); the direct GEMM tests below use ``GEMM_BOUND``: 1e-5 interpreted, 5e-4 on a GPU. Every output buffer
is NaN-poisoned first (tests/cuda/conftest.py), so an element a kernel leaves unwritten fails.
"""

from functools import partial

import pytest
import torch

from kernels.triton.fp8 import (
    _segment_quant_t,
    act_quant,
    fp8_gemm,
    fp8_grouped_gemm,
    fp8_grouped_wgrad,
    weight_dequant,
)
from kernels.triton.utils import interpreted
from reference import fp8 as ref
from reference.testing import assert_close
from reference.testing.fp8 import tiles_spanning
from reference.testing.pytest_plugin import cases, check_case
from tests.cuda.conftest import DEVICE

E4M3_GRID = torch.arange(256, dtype=torch.uint8).view(ref.FP8_DTYPE).double()
E4M3_GRID = E4M3_GRID[E4M3_GRID.isfinite()]
GEMM_BOUND = 1e-5 if interpreted() else 5e-4
FLOATS = [torch.float32, torch.bfloat16, torch.float16]
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


@pytest.mark.parametrize("case", cases("fp8_grouped_gemm"))
def test_fp8_grouped_gemm_battery(case):
    """The grouped GEMM's battery (its spec's samples: ragged segments, empty experts, each output dtype)."""
    check_case(case, fp8_grouped_gemm, DEVICE.type)


@pytest.mark.parametrize("case", cases("fp8_grouped_wgrad"))
def test_fp8_grouped_wgrad_battery(case):
    """The grouped Wgrad's battery: ragged segments with empty experts, a segment of 170 rows (a partial second
    tile), N and K not multiples of 128, ue8m0 scales, an all-zero segment, no rows; float32/bfloat16/float16 inputs."""
    check_case(case, fp8_grouped_wgrad, DEVICE.type)


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
    ("scale-fmt", lambda x, a, a_s, b, b_s: act_quant(x, scale_fmt="e8m0"), ValueError, "scale_fmt"),
    ("transpose-3d", lambda x, a, a_s, b, b_s: act_quant(x[None], transpose=True), ValueError, "2-D"),
    ("transpose-M0", lambda x, a, a_s, b, b_s: act_quant(x[:0], transpose=True), ValueError, "M >= 1"),
    ("wd-float", lambda x, a, a_s, b, b_s: weight_dequant(b.float(), b_s), TypeError, "w_fp8: expected dtype"),
    ("wd-1d", lambda x, a, a_s, b, b_s: weight_dequant(b[0], b_s), ValueError, "w_fp8: expected 2 dims"),
    ("wd-scale", lambda x, a, a_s, b, b_s: weight_dequant(b, b_s.T.contiguous()), ValueError,
     r"scale_inv: expected shape \(2, 3\)"),
    ("wd-out", lambda x, a, a_s, b, b_s: weight_dequant(b, b_s, dtype=torch.int32), TypeError, "dtype"),
    ("mm-K", lambda x, a, a_s, b, b_s: fp8_gemm(a, a_s, b[:, :256].contiguous(), b_s[:, :2].contiguous()),
     ValueError, "b: expected shape"),
    ("mm-as", lambda x, a, a_s, b, b_s: fp8_gemm(a, a_s[:2], b, b_s), ValueError, r"a_s: expected shape \(4, 3\)"),
    ("mm-bs", lambda x, a, a_s, b, b_s: fp8_gemm(a, a_s, b, b_s.half()), TypeError, "b_s: expected dtype"),
    ("mm-bs-shape", lambda x, a, a_s, b, b_s: fp8_gemm(a, a_s, b, b_s[:1]), ValueError,
     r"b_s: expected shape \(2, 3\) \(block scales\) or \(200, 3\) \(per-row"),
    ("gg-b-2d", lambda x, a, a_s, b, b_s: fp8_grouped_gemm(a, a_s, b, b_s, _offsets([4])), ValueError,
     "b: expected 3 dims"),
    ("gg-offsets", lambda x, a, a_s, b, b_s: fp8_grouped_gemm(a, a_s, b[None], b_s[None], _offsets([4]).float()),
     TypeError, "offsets: expected dtype"),
    ("gg-offsets-E", lambda x, a, a_s, b, b_s: fp8_grouped_gemm(a, a_s, b[None], b_s[None], _offsets([2, 2])),
     ValueError, r"offsets: expected shape \(2,\)"),
    ("gg-bs", lambda x, a, a_s, b, b_s: fp8_grouped_gemm(a, a_s, b[None], b_s, _offsets([4])), ValueError,
     r"b_s: expected shape \(1, 2, 3\)"),
    ("gw-offsets", lambda x, a, a_s, b, b_s: fp8_grouped_wgrad(x, x, _offsets([4]).float()), TypeError,
     "offsets: expected dtype"),
    ("gw-offsets-empty", lambda x, a, a_s, b, b_s: fp8_grouped_wgrad(x, x, _offsets([4])[:0]), ValueError,
     r"offsets: expected shape \(E \+ 1,\)"),
    ("gw-M", lambda x, a, a_s, b, b_s: fp8_grouped_wgrad(x, x[:3], _offsets([4])), ValueError,
     r"x: expected shape \(4, '\*'\)"),
    ("gw-fp8", lambda x, a, a_s, b, b_s: fp8_grouped_wgrad(a, x, _offsets([4])), TypeError, "dy: expected dtype"),
    ("gw-fmt", lambda x, a, a_s, b, b_s: fp8_grouped_wgrad(x, x, _offsets([4]), scale_fmt="e8m0"), ValueError,
     "scale_fmt"),
    ("mm-a", lambda x, a, a_s, b, b_s: fp8_gemm(x, a_s, b, b_s), TypeError, "a: expected dtype"),
    ("mm-device", lambda x, a, a_s, b, b_s: fp8_gemm(a, a_s, b, b_s.to("meta")), ValueError, "b_s: expected device"),
]


@pytest.mark.parametrize("call,exc,match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_inputs_raise(call, exc, match):
    with pytest.raises(exc, match=match):
        call(*_valid())


# ============================================================================= FP8 training (report section 3.3)


def _offsets(counts, dtype=torch.int64):
    """(E+1,) offsets on DEVICE from the rows per expert."""
    return torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=dtype, device=DEVICE)


def _quant_inputs(rng, m, k, bs=128, transpose=False):
    """(m, k) values spanning 1e-2..1e2 per quantization tile (1 x bs, or bs x 1 with ``transpose``), with an all-zero
    tile, a tile below 1e-4 (e4m3 subnormals) and a partial edge tile."""
    x = tiles_spanning(rng, k, m, bs).T.contiguous() if transpose else tiles_spanning(rng, m, k, bs)
    if transpose:
        x[:bs, 0] = 0.0
        x[bs:, 1] *= 1e-7
    else:
        x[0, :bs] = 0.0
        x[1, bs:] *= 1e-7
    return x


def _assert_quant_equal(got, want, what):
    """e4m3 bits and float32 scales equal; NaN matches NaN (any sign: 0x7f or 0xff) in values and scales."""
    (y, s), (y_ref, s_ref) = got, want
    assert y.shape == y_ref.shape and s.shape == s_ref.shape and y.is_contiguous(), what
    y, y_ref = _bits(y), _bits(y_ref)
    nan = (y_ref & 0x7F) == 0x7F
    assert torch.equal((y & 0x7F) == 0x7F, nan), f"{what}: NaN values differ"
    assert torch.equal(y[~nan], y_ref[~nan]), f"{what}: {(y != y_ref).sum()} e4m3 values differ"
    s, s_ref = s.cpu(), s_ref.cpu()
    assert torch.equal(s.isnan(), s_ref.isnan()), f"{what}: NaN scales differ"
    assert torch.equal(s.nan_to_num(), s_ref.nan_to_num()), f"{what}: scales differ"


@pytest.mark.parametrize("rnd", PATHS)
@pytest.mark.parametrize("transpose", [False, True], ids=["rows", "transpose"])
@pytest.mark.parametrize("scale_fmt", [None, "ue8m0"], ids=["fp32-scale", "ue8m0"])
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_act_quant_scale_fmt_transpose(dtype, scale_fmt, transpose, rnd):
    """ue8m0 scales and the fused transposed quantization against the reference, bit for bit: ragged sizes (300 rows
    along the tiles: 128 + 128 + 44), an all-zero tile, a tile below 1e-4, block_size 128 and 64; the rounding path is
    in the id (``fp32-round``: the kernel's float32 rounding to the e4m3 grid, the one the interpreter runs)."""
    rng = torch.Generator().manual_seed(11)
    for bs, (m, k) in ((128, (300, 37) if transpose else (37, 300)), (64, (100, 20) if transpose else (20, 100))):
        x = _quant_inputs(rng, m, k, bs, transpose).to(dtype)
        got = act_quant(x.to(DEVICE), bs, scale_fmt, transpose, round_in_fp32=rnd)
        _assert_quant_equal(got, ref.act_quant(x, bs, scale_fmt, transpose), f"bs {bs}")
        if scale_fmt == "ue8m0":  # powers of two, at least the float32 scale and under twice it
            s, s_plain = got[1].cpu(), ref.act_quant(x, bs, None, transpose)[1]
            assert torch.equal(torch.frexp(s).mantissa, torch.full_like(s, 0.5))
            assert (s >= s_plain).all() and (s < 2 * s_plain).all()


@pytest.mark.parametrize("scale_fmt", [None, "ue8m0"], ids=["fp32-scale", "ue8m0"])
def test_act_quant_rounding_rows_ue8m0_and_transposed(scale_fmt):
    """The fp32-round path on values whose rounding carries a binade, ties, subnormals (each tile's amax 448, so the
    scale is exactly 1 for both formats), quantized along rows and, transposed, along columns of x^T."""
    special = [-7.85, 31.55, 15.5, -0.4687, 2.0**-7 * 1.0625, -(2.0**-10), 3 * 2.0**-10, 1e-30, 0.0, 448.0]
    v = torch.cat([torch.tensor(special), (torch.rand(16 * 127 - 10) * 2 - 1) * 10.0 ** (torch.rand(16 * 127 - 10)
                                                                                         * 8.6 - 6)])
    x = torch.cat([torch.full((16, 1), 448.0), v.reshape(16, 127)], dim=1)
    for transpose, xx in ((False, x), (True, x.T.contiguous())):
        got = act_quant(xx.to(DEVICE), 128, scale_fmt, transpose, round_in_fp32=True)
        assert (got[1] == 1).all()
        _assert_quant_equal(got, ref.act_quant(xx, 128, scale_fmt, transpose), f"transpose={transpose}")


def test_act_quant_strided_inputs():
    """Views are read in place: ``x.T`` (the autograd function's ``W.T``), a column slice, with and without the fused
    transpose, give what their contiguous copies give."""
    x = torch.randn(70, 200, device=DEVICE)
    for view in (x.T, x[:, 3:150], x[::2]):
        for transpose in (False, True):
            _assert_quant_equal(act_quant(view, transpose=transpose), act_quant(view.contiguous(), transpose=transpose),
                                f"{tuple(view.stride())} transpose={transpose}")


@pytest.mark.parametrize("transpose", [False, True], ids=["rows", "transpose"])
def test_act_quant_nan_tile(transpose):
    """A NaN reaches its tile's scale and every value of that tile (e4m3 NaN), as in the reference; the other tiles
    are untouched. fp32-round path under the interpreter (its own cast turns NaN into 384), both on a GPU."""
    x = torch.randn(150, 140)
    x[130, 5] = float("nan")  # tile (130, 0:128) of x; transposed, tile (5, 128:150) of x^T
    for rnd in (True,) if interpreted() else (True, False):
        got = act_quant(x.to(DEVICE), transpose=transpose, round_in_fp32=rnd)
        _assert_quant_equal(got, ref.act_quant(x, transpose=transpose), f"round_in_fp32={rnd}")
        assert got[1].isnan().sum() == 1


def test_wgrad_per_row_scales():
    """Wgrad's GEMM, both operands from the transposed act_quant (per-row 1 x 128 scales on b as well as a): ragged
    token count (the contracted axis, 300 = 128 + 128 + 44), ragged N and K, against the reference and the
    unquantized product; N = 1, where the two readings of b_s are one scale."""
    rng = torch.Generator().manual_seed(3)
    dy, x = tiles_spanning(rng, 300, 70, 1, 128), tiles_spanning(rng, 300, 90, 1, 128)
    a, a_s = act_quant(dy.to(DEVICE), transpose=True)
    b, b_s = act_quant(x.to(DEVICE), transpose=True)
    assert b_s.shape == (90, 3)  # (N, KB): per-row
    for out_dtype in (torch.float32, torch.bfloat16):
        c = fp8_gemm(a, a_s, b, b_s, out_dtype=out_dtype)
        want = ref.fp8_gemm(a.cpu(), a_s.cpu(), b.cpu(), b_s.cpu(), out_dtype=torch.float64)
        assert_close(c, want, out_dtype, bound=GEMM_BOUND if out_dtype == torch.float32 else None, what="wgrad")
    err = assert_close(fp8_gemm(a, a_s, b, b_s), dy.double().T @ x.double(), bound=0.06, what="fp8 vs exact")
    assert err > 1e-3
    c1 = fp8_gemm(a, a_s, b[:1], b_s[:1], out_dtype=torch.float32)  # column 0 of the whole product
    assert_close(c1, want[:, :1], bound=GEMM_BOUND, what="N = 1")


def test_dgrad_transposed_weight_views():
    """Dgrad's GEMM: b = W^T as the view ``w_fp8.T`` and its block scales as ``scale_inv.T`` (what the autograd
    function passes), W 200 x 300 (partial blocks both ways), a decode-sized and a ragged batch of gradients."""
    rng = torch.Generator().manual_seed(5)
    wq, ws = ref.weight_quant(tiles_spanning(rng, 200, 300, 128, 128))
    wq, ws = wq.to(DEVICE), ws.to(DEVICE)
    for m in (1, 33):
        g, g_s = act_quant(torch.randn(m, 200, device=DEVICE))
        c = fp8_gemm(g, g_s, wq.T, ws.T, out_dtype=torch.float32)
        want = ref.fp8_gemm(g.cpu(), g_s.cpu(), wq.T.contiguous().cpu(), ws.T.contiguous().cpu(),
                            out_dtype=torch.float64)
        assert_close(c, want, bound=GEMM_BOUND, what=f"dgrad m={m}")


def test_fp8_gemm_nan_and_zero_tiles():
    """An activation tile holding a NaN makes its row NaN (through the NaN scale, whatever the e4m3 NaN decodes to);
    an all-zero activation tile and weight block contribute zero; the other rows match the reference."""
    x, w = torch.randn(20, 260), torch.randn(150, 260)
    x[4, 200] = float("nan")
    x[7, :128] = 0.0
    w[128:, 128:256] = 0.0
    a, a_s = act_quant(x.to(DEVICE))
    b, b_s = ref.weight_quant(w)
    c = fp8_gemm(a, a_s, b.to(DEVICE), b_s.to(DEVICE), out_dtype=torch.float32).cpu()
    assert c[4].isnan().all() and not c[torch.arange(20) != 4].isnan().any()
    want = ref.fp8_gemm(a.cpu(), a_s.cpu(), b, b_s, out_dtype=torch.float64)
    keep = torch.arange(20) != 4
    assert_close(c[keep], want[keep], bound=GEMM_BOUND, what="rows without NaN")


@pytest.mark.parametrize("counts", [[0, 37, 1, 0, 40], [0, 0, 5], [70], [3, 0, 0, 0]],
                         ids=["ragged-empty-middle", "empty-first", "one-expert", "empty-last"])
@pytest.mark.parametrize("per_row", [False, True], ids=["block-scales", "per-row-scales"])
def test_fp8_grouped_gemm(counts, per_row):
    """Each expert's rows against its own weights only (rows sorted by expert, ragged segments: empty experts first,
    in the middle and last, a segment of 1 row and segments crossing tile boundaries), N = 70 and K = 260 partial
    blocks, int32 and int64 offsets, against `reference.fp8.fp8_grouped_gemm` (per-row b_s: against a per-expert
    `reference.fp8.fp8_gemm`); the poisoned output is written everywhere."""
    rng = torch.Generator().manual_seed(len(counts))
    E, N, K = len(counts), 70, 260
    w = tiles_spanning(rng, E * N, K, 128, 128).reshape(E, N, K)
    if per_row:
        b, b_s = act_quant(w)
    else:
        b, b_s = ref.stacked_weight_quant(w)
    a, a_s = act_quant(tiles_spanning(rng, sum(counts), K))
    for idx in (torch.int32, torch.int64):
        offsets = _offsets(counts, idx)
        c = fp8_grouped_gemm(a.to(DEVICE), a_s.to(DEVICE), b.to(DEVICE), b_s.to(DEVICE), offsets,
                             out_dtype=torch.float32)
        if per_row:
            bounds = offsets.tolist()
            want = torch.cat([ref.fp8_gemm(a[bounds[e]:bounds[e + 1]], a_s[bounds[e]:bounds[e + 1]], b[e], b_s[e],
                                           out_dtype=torch.float64) for e in range(E)])
        else:
            want = ref.fp8_grouped_gemm(a, a_s, b, b_s, offsets.cpu(), out_dtype=torch.float64)
        assert_close(c, want, bound=GEMM_BOUND, what=f"{idx} offsets")


def test_fp8_grouped_gemm_edges():
    """No rows (an empty result), bfloat16 output, a ``W.T``-style strided b (copied K-major), K < block_size."""
    b, b_s = ref.stacked_weight_quant(torch.randn(3, 40, 50))
    b, b_s = b.to(DEVICE), b_s.to(DEVICE)
    a, a_s = act_quant(torch.randn(0, 50, device=DEVICE))
    assert fp8_grouped_gemm(a, a_s, b, b_s, _offsets([0, 0, 0])).shape == (0, 40)
    a, a_s = act_quant(torch.randn(9, 50, device=DEVICE))
    offsets = _offsets([4, 0, 5])
    want = ref.fp8_grouped_gemm(a.cpu(), a_s.cpu(), b.cpu(), b_s.cpu(), offsets.cpu(), out_dtype=torch.float64)
    c = fp8_grouped_gemm(a, a_s, b, b_s, offsets, out_dtype=torch.bfloat16)
    assert c.dtype == torch.bfloat16
    assert_close(c, want, torch.bfloat16, what="bfloat16 out")
    strided = b.transpose(1, 2).contiguous().transpose(1, 2)  # (E, N, K) with unit stride along N
    assert_close(fp8_grouped_gemm(a, a_s, strided, b_s, offsets, out_dtype=torch.float32), want, bound=GEMM_BOUND,
                 what="strided b")


WGRAD_COUNTS = pytest.mark.parametrize("counts", [[0, 150, 1, 0, 40], [0, 0, 5], [300], [3, 0, 0, 0]],
                                       ids=["ragged-empty-middle", "empty-first", "one-expert-3-tiles", "empty-last"])


@WGRAD_COUNTS
@pytest.mark.parametrize("scale_fmt", [None, "ue8m0"], ids=["fp32-scale", "ue8m0"])
def test_segment_quant_t_is_act_quant_of_each_segment(counts, scale_fmt):
    """The first launch of `fp8_grouped_wgrad` alone: for each expert segment, the transposed e4m3 values and the
    scales at the segment's tile columns (expert order, cdiv(count, 128) tiles each) equal `reference.fp8.act_quant`
    of that segment with ``transpose=True``, bit for bit (zero tiles and tiles below 1e-4 included)."""
    rng = torch.Generator().manual_seed(len(counts))
    x = _quant_inputs(rng, sum(counts), 40, transpose=True)
    offsets, bounds = _offsets(counts), [0, *torch.tensor(counts).cumsum(0).tolist()]
    t_max = -(-sum(counts) // 128) + min(len(counts), sum(counts))
    consts = dict(AMAX_MIN=ref.AMAX_MIN, FP8_MAX=ref.FP8_MAX, UE8M0=scale_fmt == "ue8m0", ROUND_FP32=True)
    y, s = _segment_quant_t(x.to(DEVICE), offsets, t_max, 128, consts)
    first = 0
    for e, (r0, r1) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        if r1 > r0:
            tiles = -(-(r1 - r0) // 128)
            got = (y[:, r0:r1].contiguous(), s[:, first:first + tiles].contiguous())
            _assert_quant_equal(got, ref.act_quant(x[r0:r1], 128, scale_fmt, transpose=True), f"expert {e}")
            first += tiles


@WGRAD_COUNTS
@pytest.mark.parametrize("scale_fmt", [None, "ue8m0"], ids=["fp32-scale", "ue8m0"])
def test_fp8_grouped_wgrad(counts, scale_fmt):
    """The routed experts' Wgrad against `reference.fp8.fp8_grouped_wgrad`: ragged segments (empty experts first, in
    the middle and last, a 1-row segment, 150 and 300 rows: partial last tiles), N = 70 and K = 40 (partial tiles),
    int32 and int64 offsets, a strided dy (a transposed view) and bfloat16 inputs; every element of the poisoned
    output written (an empty expert's zeros)."""
    rng = torch.Generator().manual_seed(7 + len(counts))
    m = sum(counts)
    dy = tiles_spanning(rng, 70, m, 128).to(DEVICE).T  # (M, 70), strides (1, M)
    x = tiles_spanning(rng, 40, m, 128).T.contiguous().to(DEVICE)
    for idx, dtype in ((torch.int32, torch.float32), (torch.int64, torch.bfloat16)):
        offsets = _offsets(counts, idx)
        d, a = dy.to(dtype), x.to(dtype)
        c = fp8_grouped_wgrad(d, a, offsets, 128, scale_fmt)
        assert c.shape == (len(counts), 70, 40) and c.dtype == torch.float32 and c.is_contiguous()
        want = ref.fp8_grouped_wgrad(d.cpu(), a.cpu(), offsets.cpu(), 128, scale_fmt)
        assert_close(c, want.double(), bound=GEMM_BOUND, what=f"{idx} offsets, {dtype} inputs")
        for e in range(len(counts)):
            if counts[e] == 0:
                assert not c[e].any(), f"empty expert {e} not zero"


def test_fp8_grouped_wgrad_edges():
    """No rows (zeros for every expert), no experts, block_size 64, and the training layer's call through
    ``ops`` (`reference.fp8_training._wgrad` with the Triton module)."""
    from reference.fp8_training import _wgrad

    assert not fp8_grouped_wgrad(torch.randn(0, 20, device=DEVICE), torch.randn(0, 30, device=DEVICE),
                                 _offsets([0, 0])).any()
    assert fp8_grouped_wgrad(torch.randn(0, 20, device=DEVICE), torch.randn(0, 30, device=DEVICE),
                             _offsets([])).shape == (0, 20, 30)
    dy, x, offsets = torch.randn(100, 20, device=DEVICE), torch.randn(100, 30, device=DEVICE), _offsets([70, 0, 30])
    want = ref.fp8_grouped_wgrad(dy.cpu(), x.cpu(), offsets.cpu(), 64)
    assert_close(fp8_grouped_wgrad(dy, x, offsets, 64), want.double(), bound=GEMM_BOUND, what="block_size 64")
    import kernels.triton.fp8 as tri

    want = ref.fp8_grouped_wgrad(dy.cpu(), x.cpu(), offsets.cpu())
    assert_close(_wgrad(tri, dy, x, offsets, 128, None, (3, 20, 30)), want.double(), bound=GEMM_BOUND, what="_wgrad")


def _train_step(ops, seed: int = 0):
    """One FP8 training forward and backward of a micro model (hidden 144: a partial 128-block) with ``ops``; returns
    the loss and every gradient."""
    from reference.config import ModelConfig
    from reference.fp8_training import enable_fp8_training
    from reference.model import Model

    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=64, hidden_size=144, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=96, moe_intermediate_size=48, n_routed_experts=4, num_experts_per_tok=2,
                      n_shared_experts=1, n_group=1, topk_group=1, first_k_dense_replace=1, q_lora_rank=32,
                      kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                      num_nextn_predict_layers=0, max_position_embeddings=64)
    model = Model(cfg).to(DEVICE)
    enable_fp8_training(model, ops=ops)
    x = torch.randint(0, 64, (2, 24), device=DEVICE)
    loss = model.loss(x, x).loss
    loss.backward()
    return loss.detach().cpu(), {n: p.grad.cpu() for n, p in model.named_parameters() if p.grad is not None}


def test_fp8_training_step_on_triton_ops_equals_the_reference_ops():
    """`reference.fp8_training` with ``ops=kernels.triton.fp8`` (what runtime_cuda trains with) against the
    reference's ops: the same loss within 1e-5 and gradients within 2e-3 relative (the FP8 GEMMs agree to float32
    rounding, but a last-bit difference upstream can flip an e4m3 rounding, a 6% step of one element, which then
    moves everything computed from it: measured up to 3e-4, on the dense MLP's down_proj)."""
    import kernels.triton.fp8 as tri

    loss_t, grads_t = _train_step(tri)
    loss_r, grads_r = _train_step(None)
    assert torch.allclose(loss_t, loss_r, rtol=1e-5)
    assert grads_t.keys() == grads_r.keys()
    for n in grads_r:
        err = ((grads_t[n] - grads_r[n]).norm() / grads_r[n].norm().clamp(min=1e-30)).item()
        assert err < 2e-3, (n, err)
