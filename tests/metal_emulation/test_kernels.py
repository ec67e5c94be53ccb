"""Every kernel in kernels/metal (and its VJP kernel) under the CPU Metal emulation, against the reference op.

Each op runs through its real Metal path in `runtime_mlx.kernels` (the same `Launch` data and post-processing),
with the launch itself executed by `driver.emulate` instead of ``mx.fast.metal_kernel``. Each is run under two
thread orders, which must agree bit for bit (a race shows as a moving result); outputs are poisoned (NaN) before
each run; sizes are ragged (not multiples of the threadgroup, the block or 32). Errors: `reference.testing`.
"""

from __future__ import annotations

import sys

import mlx.core as mx
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from reference import dsa as ref_dsa
from reference import fp8 as ref_fp8
from reference.distill import soft_terms
from reference.mla import mla_decode as ref_mla_decode
from reference.moe import route as ref_route
from reference.rms_norm import rms_norm as ref_rms_norm
from reference.swiglu import swiglu as ref_swiglu
from reference.testing import assert_close
from runtime_mlx.kernels import METAL_DIR, SPECS
from runtime_mlx.kernels.cross_entropy import _cross_entropy_metal, _cross_entropy_metal_bwd
from runtime_mlx.kernels.distill import _distill_logits_metal, _distill_logits_metal_bwd
from runtime_mlx.kernels.dsa import _indexer_scores_metal, _indexer_topk_metal
from runtime_mlx.kernels.fp8 import _act_quant_metal, _fp8_gemm_metal, _weight_dequant_metal
from runtime_mlx.kernels.launch import metal_file
from runtime_mlx.kernels.mla import _mla_decode_metal
from runtime_mlx.kernels.moe import _route_metal
from runtime_mlx.kernels.rms_norm import _rms_norm_metal, _rms_norm_metal_bwd
from runtime_mlx.kernels.swiglu import _swiglu_metal, _swiglu_metal_bwd
from tests.metal_emulation import driver
from tests.mlx.kernel_refs import spread
from tests.mlx.utils import to_mx, to_torch

pytestmark = pytest.mark.skipif(sys.platform != "linux" or driver.find_cxx() is None,
                                reason="the Metal emulation needs Linux and g++ (ucontext fibers, ELF sections)")

SEEDS = (1, 2)


def _bits(a: mx.array) -> bytes:
    return np.array(a.view(mx.uint16) if a.dtype == mx.bfloat16 else a).tobytes()


def twice(fn, *args, **kw):
    """``fn(*args, runner=...)`` under two thread orders; asserts identical bits and returns the first result."""
    outs = [fn(*args, runner=driver.runner(seed), **kw) for seed in SEEDS]
    first = outs[0] if isinstance(outs[0], tuple | list) else (outs[0],)
    second = outs[1] if isinstance(outs[1], tuple | list) else (outs[1],)
    for a, b in zip(first, second, strict=True):
        assert _bits(a) == _bits(b), "result moves with the thread order (a race)"
    return outs[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm(dtype):
    n, d = 5, 300  # TG = 256 threads: each thread takes one or two columns
    x, w, g = torch.randn(n, d, dtype=dtype), torch.randn(d), torch.randn(n, d)
    xr, wr = x.double().requires_grad_(), w.double().requires_grad_()
    ref = ref_rms_norm(xr, wr, 1e-6)
    ref.backward(g.double())
    out, rstd = twice(_rms_norm_metal, to_mx(x), to_mx(w), 1e-6)
    dx, dw = twice(_rms_norm_metal_bwd, to_mx(x), to_mx(w), to_mx(g), 1e-6)
    assert_close(to_torch(out), ref, dtype)
    assert_close(to_torch(rstd), x.double().pow(2).mean(-1).add(1e-6).rsqrt(), what="rstd")
    assert_close(to_torch(dx), xr.grad, dtype, what="dx")
    assert_close(to_torch(dw), wr.grad, dtype, what="dw")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu(dtype):
    gate, up, g = torch.randn(7, 111, dtype=dtype), torch.randn(7, 111, dtype=dtype), torch.randn(7, 111, dtype=dtype)
    gr, ur = gate.double().requires_grad_(), up.double().requires_grad_()
    ref = ref_swiglu(gr, ur)
    ref.backward(g.double())
    out = twice(_swiglu_metal, to_mx(gate), to_mx(up))
    dg, du = twice(_swiglu_metal_bwd, to_mx(gate), to_mx(up), to_mx(g))
    assert_close(to_torch(out), ref, dtype)
    assert_close(to_torch(dg), gr.grad, dtype, what="dgate")
    assert_close(to_torch(du), ur.grad, dtype, what="dup")


@pytest.mark.parametrize("cfg", [(24, 3, 4, 2, True, 2.5), (10, 2, 1, 1, False, 1.0)])
def test_route(cfg):
    e, top_k, n_group, topk_group, norm, rsf = cfg
    logits, bias = torch.randn(70, e, dtype=torch.float64), torch.randn(e, dtype=torch.float64) * 0.3
    idx, w, scores = ref_route(logits, bias, top_k, n_group, topk_group, norm, rsf)
    midx, mw, ms = twice(_route_metal, to_mx(logits.float()), to_mx(bias.float()), top_k, n_group,
                         topk_group, norm, rsf)
    assert torch.equal(to_torch(midx).long(), idx)
    assert_close(to_torch(mw), w, what="topk_weight")
    assert_close(to_torch(ms), scores, what="scores")


@pytest.mark.parametrize("cfg", [(16, 4, 1, 1), (24, 3, 4, 2)], ids=["flat", "groups"])
def test_route_exact_ties(cfg):
    """Equal biased scores (and equal group scores) rank the lower expert (group) index first (DESIGN.md), as the
    reference: logits drawn from 4 levels, so most rows tie at the top-k cut."""
    e, top_k, n_group, topk_group = cfg
    logits, bias = torch.randn(4)[torch.randint(0, 4, (40, e))], torch.zeros(e)
    idx, w, _ = ref_route(logits, bias, top_k, n_group, topk_group, True, 1.0)
    picked = logits.gather(1, idx)
    assert (picked[:, :-1] == picked[:, 1:]).any(), "no tie among the picked experts: the test tests nothing"
    midx, mw, _ = twice(_route_metal, to_mx(logits), to_mx(bias), top_k, n_group, topk_group, True, 1.0)
    assert torch.equal(to_torch(midx).long(), idx)
    assert_close(to_torch(mw), w, what="topk_weight")


@pytest.mark.parametrize("cfg", [(10, 3, 1, 1), (16, 3, 4, 2)], ids=["flat", "groups"])
def test_route_nan_logit(cfg):
    """A NaN logit ranks first, as in torch.topk (the reference): its expert is picked and the NaN weight shows."""
    e, top_k, n_group, topk_group = cfg
    logits, bias = torch.randn(4, e, dtype=torch.float64), torch.randn(e, dtype=torch.float64) * 0.1
    logits[1, 5] = float("nan")
    logits[2] = float("nan")
    idx, w, _ = ref_route(logits, bias, top_k, n_group, topk_group, True, 2.5)
    midx, mw, _ = twice(_route_metal, to_mx(logits.float()), to_mx(bias.float()), top_k, n_group,
                        topk_group, True, 2.5)
    midx = to_torch(midx).long()
    assert ((midx >= 0) & (midx < e)).all()
    assert torch.equal(midx[[0, 1, 3]], idx[[0, 1, 3]])
    assert torch.equal(to_torch(mw).isnan(), w.isnan())


@pytest.mark.parametrize("shape,dtype", [((2, 3, 3, 37, 40, 8), torch.float32),
                                         ((1, 2, 1, 70, 64, 16), torch.bfloat16)])
def test_mla_decode(shape, dtype):
    b, h, t, s, r, dr = shape  # R = 40: lanes hold 2 features, the second partly past the end
    ql, qp = torch.randn(b, h, t, r).to(dtype), torch.randn(b, h, t, dr).to(dtype)
    ckv, kpe = torch.randn(b, s, r).to(dtype), torch.randn(b, s, dr).to(dtype)
    scale = (r + dr) ** -0.5
    ref = ref_mla_decode(ql.double(), qp.double(), ckv.double(), kpe.double(), scale)
    out = twice(_mla_decode_metal, to_mx(ql), to_mx(qp), to_mx(ckv), to_mx(kpe), scale)
    assert out.dtype == to_mx(ql).dtype
    assert_close(to_torch(out), ref, dtype)


def test_indexer():
    b, h, t, s, d = 2, 3, 4, 150, 16  # S > 128: the top-k streams two tiles
    q, k = torch.randn(b, t, h, d, dtype=torch.float64), torch.randn(b, s, d, dtype=torch.float64)
    w = torch.randn(b, t, h, dtype=torch.float64) * h**-0.5
    q[0, 1] = 0.0  # all-zero scores: ties go to the earlier key
    scale = d**-0.5
    qm, km, wm = (to_mx(a.float()) for a in (q, k, w))
    scores = twice(_indexer_scores_metal, qm, km, wm, scale)
    assert_close(to_torch(scores), ref_dsa.indexer_scores(q, k, w, scale), what="scores")
    for topk in (20, 148, 300):  # fewer than, between and more than the visible keys (147..150)
        idx = twice(_indexer_topk_metal, scores, topk)
        assert idx.shape == (b, t, min(topk, s))
        assert torch.equal(to_torch(idx).long(), ref_dsa.indexer_topk(to_torch(scores), topk)), f"topk={topk}"


@pytest.mark.parametrize("topk", [7, 200])
def test_indexer_topk_exact_ties(topk):
    """Equal scores rank the earlier key first (DESIGN.md), as the reference: scores are multiples of 0.5, so ties
    decide most slots, across the two 128-key tiles."""
    scores = torch.round(torch.randn(1, 3, 140) * 2) / 2
    idx = twice(_indexer_topk_metal, to_mx(scores), topk)
    assert torch.equal(to_torch(idx).long(), ref_dsa.indexer_topk(scores, topk))


def test_indexer_topk_nan_scores():
    """NaN scores (from a diverged model) rank first, as the reference: the ranks stay a permutation, so no two
    keys write one slot (a race) and no slot is left unwritten (a wild index for the mask)."""
    scores = torch.randn(1, 3, 140)
    scores[0, 0, [2, 50]] = float("nan")
    scores[0, 2] = float("nan")  # a whole row
    for topk in (5, 200):
        idx = twice(_indexer_topk_metal, to_mx(scores), topk)
        assert torch.equal(to_torch(idx).long(), ref_dsa.indexer_topk(scores, topk)), f"topk={topk}"


@pytest.mark.parametrize("shape,bs,dtype", [((3, 300), 128, torch.float32), ((5, 70), 32, torch.bfloat16)])
def test_act_quant(shape, bs, dtype):
    x = spread(*shape).to(dtype)
    x[0, :3] = 0.0
    x[-1, 1] = float("nan")  # its tile: NaN scale and NaN (0x7F) values, as the reference
    x[1, :bs] = 0.0  # an all-zero tile: amax clamped to 1e-4
    y_ref, s_ref = ref_fp8.act_quant(x, bs)
    y, s = twice(_act_quant_metal, to_mx(x), bs)
    assert torch.equal(to_torch(s).nan_to_num(-1.0), s_ref.nan_to_num(-1.0))  # scales are > 0: -1 marks NaN
    assert torch.equal(to_torch(y), y_ref.view(torch.uint8)), "e4m3 bits differ from torch's cast"
    finite = ~y_ref.float().isnan()
    assert_close(to_torch(y).view(torch.float8_e4m3fn).double()[finite], y_ref.double()[finite], bound=0.0,
                 what="e4m3 values")


@pytest.mark.parametrize("shape,bs,dtype", [((3, 300), 128, torch.float32), ((5, 70), 32, torch.bfloat16)])
def test_act_quant_ue8m0(shape, bs, dtype):
    """The kernel's ue8m0 option: scales rounded up to a power of two (exactly, from the float32 bits), the same
    scale quantizing; bits and scales equal the reference's, a NaN's tile NaN, an all-zero tile clamped."""
    x = (spread(*shape) * 10.0 ** torch.linspace(-6, 3, shape[0])[:, None]).to(dtype)  # scales from 1e-9 on
    x[-1, 1] = float("nan")
    x[1, :bs] = 0.0
    y_ref, s_ref = ref_fp8.act_quant(x, bs, "ue8m0")
    y, s = twice(_act_quant_metal, to_mx(x), bs, scale_fmt="ue8m0")
    assert torch.equal(to_torch(s).nan_to_num(-1.0), s_ref.nan_to_num(-1.0))
    assert torch.equal(to_torch(y), y_ref.view(torch.uint8))


def _fp8_gemm_f64(a, a_s, b, b_s, bs):
    """The exact value of the block-scaled FP8 GEMM (float64: each K block's products, scaled, summed)."""
    k, n = a.shape[-1], b.shape[0]
    b_s_n = b_s if b_s.shape[0] == n else b_s.repeat_interleave(bs, 0)[:n]
    acc = torch.zeros(a.shape[0], n, dtype=torch.float64)
    for i in range(-(-k // bs)):
        k0, k1 = i * bs, min(i * bs + bs, k)
        part = a[:, k0:k1].double() @ b[:, k0:k1].double().T
        acc += part * a_s[:, i, None].double() * b_s_n[None, :, i].double()
    return acc


@pytest.mark.parametrize("m,n,k,bs,rows,dtype", [(37, 70, 300, 128, False, torch.float32),
                                                 (130, 65, 45, 32, True, torch.float32),
                                                 (5, 130, 200, 64, True, torch.bfloat16),
                                                 (70, 1, 50, 128, False, torch.float16)],
                         ids=["blocks-f32", "rows-2x2-tiles", "rows-bf16", "N1-f16"])
def test_fp8_gemm(m, n, k, bs, rows, dtype):
    """The tiled FP8 GEMM (64 x 64 tiles through threadgroup memory, K in blocks of ``bs``, 32-wide chunks) against
    the exact float64 value: ragged M, N, K (partial tiles, blocks and chunks), weight block scales or per-row
    (Wgrad) scales, float32 accumulation within 1e-6, the output dtype's rounding; a NaN (0x7F) in a row of a makes
    that row NaN, as the reference."""
    a, a_s = ref_fp8.act_quant(spread(m, k), bs)
    w = spread(n, k)
    b, b_s = ref_fp8.act_quant(w, bs) if rows else ref_fp8.weight_quant(w, bs)
    a = a.view(torch.uint8).clone()
    a[1, 3] = 0x7F
    want = _fp8_gemm_f64(a.view(torch.float8_e4m3fn), a_s, b, b_s, bs)
    mdt = to_mx(torch.zeros(1, dtype=dtype)).dtype
    c = twice(_fp8_gemm_metal, to_mx(a), to_mx(a_s), to_mx(b.view(torch.uint8)), to_mx(b_s), bs, mdt)
    assert c.dtype == mdt and c.shape == (m, n)
    got = to_torch(c).double()
    assert got[1].isnan().all() and not got[[0, *range(2, m)]].isnan().any()
    keep = [0, *range(2, m)]
    assert_close(got[keep], want[keep], dtype, bound=1e-6 if dtype == torch.float32 else None)


def test_weight_dequant():
    w_fp8, s = ref_fp8.weight_quant(spread(45, 70), 32)
    ref = ref_fp8.weight_dequant(w_fp8, s, 32)
    out = twice(_weight_dequant_metal, to_mx(w_fp8.view(torch.uint8)), to_mx(s), 32)
    assert_close(to_torch(out), ref, bound=0.0)
    every = torch.arange(256, dtype=torch.uint8).reshape(1, 256)  # every bit pattern, NaNs included
    dec = twice(_weight_dequant_metal, to_mx(every), mx.ones((1, 2)), 128)
    ref_all = every.view(torch.float8_e4m3fn).float()
    assert torch.equal(to_torch(dec).isnan(), ref_all.isnan())
    assert torch.equal(to_torch(dec).nan_to_num(), ref_all.nan_to_num())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy(dtype):
    n, v = 9, 700  # V = 700: TG = 256 threads, a partial last stride
    logits, tg, g = (torch.randn(n, v) * 3).to(dtype), torch.randint(0, v, (n,)), torch.randn(n)
    tg[[2, 7]] = -100
    lr = logits.double().requires_grad_()
    ref = F.cross_entropy(lr, tg, reduction="none", ignore_index=-100)
    ref.backward(g.double())
    tm = to_mx(tg).astype(mx.int32)
    loss, lse = twice(_cross_entropy_metal, to_mx(logits), tm, -100)
    dlogits = twice(_cross_entropy_metal_bwd, to_mx(logits), tm, to_mx(g), -100)
    assert_close(to_torch(loss), ref, dtype)
    assert_close(to_torch(lse), logits.double().logsumexp(-1), what="lse")
    assert_close(to_torch(dlogits), lr.grad, dtype, what="dlogits")


def test_cross_entropy_masked_vocab():
    """-inf logits (a masked or padded vocabulary) add nothing to the logsumexp, as in F.cross_entropy; a lane
    whose first column is -inf must not turn its running sum into NaN (exp(-inf - -inf))."""
    n, v = 3, 300
    logits, tg, g = torch.randn(n, v), torch.tensor([1, 2, 3]), torch.randn(n)
    logits[:, ::7] = float("-inf")  # column 0: lane 0 starts on a -inf, then meets column 256
    lr = logits.double().requires_grad_()
    ref = F.cross_entropy(lr, tg, reduction="none")
    ref.backward(g.double())
    tm = to_mx(tg).astype(mx.int32)
    loss, lse = twice(_cross_entropy_metal, to_mx(logits), tm, -100)
    dlogits = twice(_cross_entropy_metal_bwd, to_mx(logits), tm, to_mx(g), -100)
    assert_close(to_torch(loss), ref)
    assert_close(to_torch(lse), logits.double().logsumexp(-1), what="lse")
    assert_close(to_torch(dlogits), lr.grad, what="dlogits")


def _distill_ref(z, u, tg, beta, temperature, gs, gh):
    """float64 per-token soft and hard losses and dz of `distill_logits` (`reference.distill.soft_terms` and
    ``F.cross_entropy``), 0 on ignored rows (-100)."""
    valid = tg != -100
    zs, us = torch.where(valid[:, None], z, 0.0), torch.where(valid[:, None], u, 0.0)
    soft, g_soft = soft_terms(zs / temperature, us / temperature, beta)
    zr = zs.clone().requires_grad_()
    hard = F.cross_entropy(zr, tg, reduction="none", ignore_index=-100)
    (g_hard,) = torch.autograd.grad(hard, zr, gh)
    dz = torch.where(valid[:, None], g_soft * (gs / temperature)[:, None] + g_hard, 0.0)
    return torch.where(valid, soft, 0.0), hard.detach(), dz


@pytest.mark.parametrize("dtypes,beta", [((torch.float32, torch.float32), 0.0), ((torch.float32, torch.float32), 1.0),
                                         ((torch.float32, torch.float32), 0.5),
                                         ((torch.bfloat16, torch.bfloat16), 0.5),
                                         ((torch.bfloat16, torch.float32), 1.0)],
                         ids=["f32-beta0", "f32-beta1", "f32-beta0.5", "bf16-beta0.5", "bf16-student-beta1"])
def test_distill(dtypes, beta):
    """Both distill kernels (modes 0, 1, 2: forward KL, reverse KL, JSD) at temperature 2 against the reference: V =
    700 (TG = 256 threads, a partial last stride), two rows ignored (their outputs written, 0)."""
    n, v = 9, 700
    zdt, udt = dtypes
    z, u = (torch.randn(n, v) * 3).to(zdt), (torch.randn(n, v) * 3).to(udt)
    tg, gs, gh = torch.randint(0, v, (n,)), torch.randn(n), torch.randn(n)
    tg[[2, 7]] = -100
    soft_ref, hard_ref, dz_ref = _distill_ref(z.double(), u.double(), tg, beta, 2.0, gs.double(), gh.double())
    zm, um, tm = to_mx(z), to_mx(u), to_mx(tg).astype(mx.int32)
    soft, hard = twice(_distill_logits_metal, zm, um, tm, beta, 2.0, -100)
    dz = twice(_distill_logits_metal_bwd, zm, um, tm, to_mx(gs), to_mx(gh), beta, 2.0, -100)
    assert soft.dtype == hard.dtype == mx.float32 and dz.dtype == zm.dtype
    assert_close(to_torch(soft), soft_ref, zdt, what="soft")
    assert_close(to_torch(hard), hard_ref, zdt, what="hard")
    assert_close(to_torch(dz), dz_ref, zdt, what="dz")
    assert (to_torch(soft)[[2, 7]] == 0).all() and (to_torch(dz)[[2, 7]] == 0).all()


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_distill_masked_vocab(beta):
    """-inf logits: every seventh column in both models (column 0 too: lane 0 starts on a -inf and then meets
    column 256), a column -inf in the student only (p_s = 0: beta 1 and between) or in the teacher only (p_t = 0:
    beta 0 and between), so 0 * log 0 terms count 0, never NaN; an ignored row of -inf and an ignored row of NaN
    give 0 and a zero dz. The rows that are not ignored match the reference (the same shapes as `test_distill`, so
    its compiled kernels are reused)."""
    n, v = 9, 700
    z, u = torch.randn(n, v) * 3, torch.randn(n, v) * 3
    z[:, ::7] = u[:, ::7] = float("-inf")
    if beta > 0:
        z[:, 3] = float("-inf")
    if beta < 1:
        u[:, 5] = float("-inf")
    tg, gs, gh = torch.tensor([1, 2, -100, 8, -100, 699, 10, 11, 12]), torch.randn(n), torch.randn(n)
    z[2], u[2] = float("-inf"), float("-inf")  # a fully masked row
    z[4] = float("nan")
    soft_ref, hard_ref, dz_ref = _distill_ref(z.double(), u.double(), tg, beta, 2.0, gs.double(), gh.double())
    zm, um, tm = to_mx(z), to_mx(u), to_mx(tg).astype(mx.int32)
    soft, hard = twice(_distill_logits_metal, zm, um, tm, beta, 2.0, -100)
    dz = twice(_distill_logits_metal_bwd, zm, um, tm, to_mx(gs), to_mx(gh), beta, 2.0, -100)
    assert_close(to_torch(soft), soft_ref, what="soft")
    assert_close(to_torch(hard), hard_ref, what="hard")
    assert_close(to_torch(dz), dz_ref, what="dz")
    assert (to_torch(dz)[[2, 4]] == 0).all()


def test_every_body_has_a_spec():
    """Each ``// @kernel`` body in kernels/metal has its `KernelSpec` (and so its launch), and each spec a body."""
    bodies = {(f.stem, name) for f in METAL_DIR.glob("*.metal") for name in metal_file(f.stem) if name != "header"}
    assert bodies == {(s.family, s.name) for s in SPECS.values()}
    for s in SPECS.values():
        for name in s.input_names + s.output_names:
            assert name in s.source, f"{s.name}: buffer {name} unused by the body"
