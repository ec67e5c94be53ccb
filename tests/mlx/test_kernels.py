"""runtime_mlx.kernels against the plain-PyTorch reference (DESIGN.md, "Tolerance").

Every op runs the path this machine takes (pure MLX on Linux / MLX's CUDA back end; Metal on Apple Silicon),
and the pure-MLX implementation is also called directly, so both are checked wherever the Metal device exists.
Gradients are compared as well as outputs. Shapes are small: MLX's Linux CPU matmul is slow (DESIGN.md).
"""

from __future__ import annotations

import os

import mlx.core as mx
import pytest
import torch
import torch.nn.functional as F

from reference import dsa as ref_dsa
from reference import fp8 as ref_fp8
from reference.moe import route as ref_route
from reference.rms_norm import rms_norm as ref_rms_norm
from reference.swiglu import swiglu as ref_swiglu
from runtime_mlx import kernels as K
from runtime_mlx.kernels import launch
from tests.mlx.kernel_refs import ref_mla_decode, spread
from tests.mlx.utils import to_mx, to_torch
from tests.tolerance import assert_close

METAL = K.metal_available()
needs_metal = pytest.mark.skipif(not METAL, reason="Metal kernels need Apple Silicon (no Metal device)")
PATHS = ["mlx", pytest.param("metal", marks=needs_metal)]


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    """Metal outputs start as NaN (or 127 for integer outputs) on Apple Silicon."""
    monkeypatch.setattr(launch, "POISON", True)


@pytest.fixture(autouse=True)
def _path(request, monkeypatch):
    """``path`` "mlx" forces the pure-MLX path (DSFS_MLX_KERNELS=mlx); "metal" runs the Metal kernels."""
    path = request.node.callspec.params.get("path") if hasattr(request.node, "callspec") else None
    if path == "mlx":
        monkeypatch.setenv("DSFS_MLX_KERNELS", "mlx")
    yield path


def test_metal_when_required():
    """CI's macOS job sets DSFS_REQUIRE_METAL=1: there, a missing Metal device is a failure, not a skip."""
    if os.environ.get("DSFS_REQUIRE_METAL") == "1":
        assert METAL, "DSFS_REQUIRE_METAL=1 but MLX has no Metal device"


def test_path_reporting():
    K.rms_norm(mx.ones((2, 4)), mx.ones((4,)))
    assert K.kernel_path("rms_norm") == K.backend() == ("metal" if METAL else "mlx")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm(path, dtype):
    x = torch.randn(3, 5, 300, dtype=dtype)
    w = torch.randn(300)
    g = torch.randn(3, 5, 300)
    xr, wr = x.double().requires_grad_(), w.double().requires_grad_()
    ref = ref_rms_norm(xr, wr, 1e-6)
    ref.backward(g.double())

    def loss(xm, wm):
        return (K.rms_norm(xm, wm, 1e-6).astype(mx.float32) * to_mx(g)).sum()

    out = K.rms_norm(to_mx(x), to_mx(w), 1e-6)
    assert K.kernel_path("rms_norm") == path
    dx, dw = mx.grad(loss, argnums=(0, 1))(to_mx(x), to_mx(w))
    assert_close(to_torch(out), ref, dtype)
    assert_close(to_torch(dx), xr.grad, dtype, what="dx")
    assert_close(to_torch(dw), wr.grad, dtype, what="dw")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu(path, dtype):
    gate, up, g = torch.randn(7, 333, dtype=dtype), torch.randn(7, 333, dtype=dtype), torch.randn(7, 333)
    gr, ur = gate.double().requires_grad_(), up.double().requires_grad_()
    ref = ref_swiglu(gr, ur)
    ref.backward(g.double())
    out = K.swiglu(to_mx(gate), to_mx(up))
    dg, du = mx.grad(lambda a, b: (K.swiglu(a, b).astype(mx.float32) * to_mx(g)).sum(), argnums=(0, 1))(
        to_mx(gate), to_mx(up))
    assert_close(to_torch(out), ref, dtype)
    assert_close(to_torch(dg), gr.grad, dtype, what="dgate")
    assert_close(to_torch(du), ur.grad, dtype, what="dup")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("cfg", [(8, 2, 1, 1, True, 2.5), (24, 3, 4, 2, True, 1.0), (16, 4, 1, 1, False, 1.5)])
def test_route(path, cfg):
    e, top_k, n_group, topk_group, norm, rsf = cfg
    logits, bias = torch.randn(37, e, dtype=torch.float64), torch.randn(e, dtype=torch.float64) * 0.3
    gw, gs = torch.randn(37, top_k), torch.randn(37, e)
    lr = logits.clone().requires_grad_()
    idx, w, scores = ref_route(lr, bias, top_k, n_group, topk_group, norm, rsf)
    (w * gw.double()).sum().add((scores * gs.double()).sum()).backward()
    args = (top_k, n_group, topk_group, norm, rsf)
    lm, bm = to_mx(logits.float()), to_mx(bias.float())
    midx, mw, ms = K.route(lm, bm, *args)
    assert midx.dtype == mx.int32
    assert torch.equal(to_torch(midx).long(), idx)
    assert_close(to_torch(mw), w)
    assert_close(to_torch(ms), scores)

    def loss(lg):
        _, w_, s_ = K.route(lg, bm, *args)
        return (w_ * to_mx(gw)).sum() + (s_ * to_mx(gs)).sum()

    assert_close(to_torch(mx.grad(loss)(lm)), lr.grad, what="dlogits")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("cfg", [(10, 3, 1, 1), (16, 3, 4, 2)], ids=["flat", "groups"])
def test_route_nan_logit(path, cfg):
    """A NaN logit ranks first, as in torch.topk (the reference): its expert is picked and the NaN weight shows
    (a diverged router must give a NaN loss, not a finite one)."""
    e, top_k, n_group, topk_group = cfg
    logits, bias = torch.randn(4, e, dtype=torch.float64), torch.randn(e, dtype=torch.float64) * 0.1
    logits[1, 5] = float("nan")
    logits[2] = float("nan")
    idx, w, _ = ref_route(logits, bias, top_k, n_group, topk_group, True, 2.5)
    midx, mw, _ = K.route(to_mx(logits.float()), to_mx(bias.float()), top_k, n_group, topk_group, True, 2.5)
    midx = to_torch(midx).long()
    assert ((midx >= 0) & (midx < e)).all()
    assert torch.equal(midx[[0, 1, 3]], idx[[0, 1, 3]])
    assert torch.equal(to_torch(mw).isnan(), w.isnan())


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape", [(2, 3, 1, 37, 40, 8), (1, 2, 3, 19, 33, 6)])
def test_mla_decode(path, shape):
    b, h, t, s, r, dr = shape
    ql, qp = torch.randn(b, h, t, r, dtype=torch.float64), torch.randn(b, h, t, dr, dtype=torch.float64)
    ckv, kpe = torch.randn(b, s, r, dtype=torch.float64), torch.randn(b, s, dr, dtype=torch.float64)
    scale = (r + dr) ** -0.5
    ref = ref_mla_decode(ql, qp, ckv, kpe, scale)
    out = K.mla_decode(*(to_mx(a.float()) for a in (ql, qp, ckv, kpe)), scale)
    assert_close(to_torch(out), ref)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("cfg", [(16, 4, 1, 1), (24, 3, 4, 2)], ids=["flat", "groups"])
def test_route_exact_ties(path, cfg):
    """Equal biased scores (and equal group scores) rank the lower expert (group) index first (DESIGN.md), as the
    reference: logits drawn from 4 levels, so most rows tie at the top-k cut."""
    e, top_k, n_group, topk_group = cfg
    levels = torch.randn(4)
    logits = levels[torch.randint(0, 4, (40, e))]
    bias = torch.zeros(e)
    idx, w, _ = ref_route(logits, bias, top_k, n_group, topk_group, True, 1.0)
    midx, mw, _ = K.route(to_mx(logits), to_mx(bias), top_k, n_group, topk_group, True, 1.0)
    picked = logits.gather(1, idx)
    assert (picked[:, :-1] == picked[:, 1:]).any(), "no tie among the picked experts: the test tests nothing"
    assert torch.equal(to_torch(midx).long(), idx)
    assert_close(to_torch(mw), w, what="topk_weight")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape", [(2, 4, 5, 23, 16, 7), (1, 3, 9, 9, 8, 4), (1, 2, 2, 40, 12, 64)])
def test_indexer(path, shape):
    b, h, t, s, d, topk = shape
    q, k = torch.randn(b, t, h, d, dtype=torch.float64), torch.randn(b, s, d, dtype=torch.float64)
    w = torch.randn(b, t, h, dtype=torch.float64) * h**-0.5
    q[0, 0] = 0.0  # a query whose scores are all exact zeros: ties go to the earlier key
    scale = d**-0.5
    ref_scores = ref_dsa.indexer_scores(q, k, w, scale)
    qm, km, wm = (to_mx(a.float()) for a in (q, k, w))
    scores = K.indexer_scores(qm, km, wm, scale)
    assert_close(to_torch(scores), ref_scores)
    idx = K.indexer_topk(scores, topk)
    assert idx.shape == (b, t, min(topk, s)) and idx.dtype == mx.int32
    ref_idx = ref_dsa.indexer_topk(ref_scores, topk)
    assert torch.equal(to_torch(idx).long(), ref_idx)
    assert torch.equal(to_torch(K.indices_to_mask(idx, s)), ref_dsa.indices_to_mask(ref_idx, s))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("topk", [5, 40, 200])
def test_indexer_topk_exact_ties(path, topk):
    """Equal scores rank the earlier key first (DESIGN.md), as the reference: scores are multiples of 0.5, so
    every row ties; -1 pads the slots past a query's visible keys."""
    scores = torch.round(torch.randn(2, 6, 150) * 2) / 2
    idx = K.indexer_topk(to_mx(scores), topk)
    assert torch.equal(to_torch(idx).long(), ref_dsa.indexer_topk(scores, topk))


@pytest.mark.parametrize("path", PATHS)
def test_indexer_topk_nan_scores(path):
    """NaN scores (a diverged model) rank first, as the reference (a stable sort puts NaN first)."""
    scores = torch.randn(1, 3, 30)
    scores[0, :, [4, 9]] = float("nan")
    scores[0, 2] = float("nan")  # a whole row
    idx = K.indexer_topk(to_mx(scores), 6)
    assert torch.equal(to_torch(idx).long(), ref_dsa.indexer_topk(scores, 6))


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


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy(path, dtype):
    n, v = 13, 1000
    logits, tg = (torch.randn(n, v) * 3).to(dtype), torch.randint(0, v, (n,))
    tg[[2, 7]] = -100
    g = torch.randn(n)
    lr = logits.double().requires_grad_()
    ref = F.cross_entropy(lr, tg, reduction="none", ignore_index=-100)
    ref.backward(g.double())
    lm, tm = to_mx(logits), to_mx(tg)
    out = K.cross_entropy(lm, tm)
    dl = mx.grad(lambda a: (K.cross_entropy(a, tm) * to_mx(g)).sum())(lm)
    assert_close(to_torch(out), ref, dtype)
    assert_close(to_torch(dl), lr.grad, dtype, what="dlogits")


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
