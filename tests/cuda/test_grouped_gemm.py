"""kernels/triton/grouped_gemm.py against per-expert float64 products (`reference.moe.Experts`' loop), fwd and grads.

Empty experts get NaN weights, which must never be read, and exact zero weight gradients.
"""

from __future__ import annotations

import pytest
import torch

from kernels.triton import grouped_gemm as gg
from tests.cuda.conftest import DEVICE
from reference.testing import assert_close


def _segments(counts):
    counts = torch.tensor(counts)
    return torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]).to(DEVICE)


def _per_segment(x, w, offsets):
    o = offsets.tolist()
    return torch.cat([x[o[e]:o[e + 1]] @ w[e].t() for e in range(w.shape[0])])


def _weights(e, n, kdim, dtype, counts):
    """(E, N, K) weights in ``dtype``; experts with no rows hold NaN."""
    w = (torch.randn(e, n, kdim, device=DEVICE) * kdim**-0.5).to(dtype)
    w[[i for i, c in enumerate(counts) if c == 0]] = float("nan")
    return w.requires_grad_()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("counts", [[5, 0, 33, 1, 0, 17], [0, 40, 0]])
def test_grouped_gemm_fwd_bwd(dtype, counts):
    e, n, kdim = len(counts), 20, 36
    offsets = _segments(counts)
    x = torch.randn(sum(counts), kdim, device=DEVICE).to(dtype).requires_grad_()
    w = _weights(e, n, kdim, dtype, counts)
    y = gg.grouped_gemm(x, w, offsets)
    assert y.dtype == dtype
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = _per_segment(x64, w64, offsets)
    assert_close(y, ref, dtype, what="y")
    if dtype != torch.float32:  # fp32 accumulation rounded to nearest once, on a GPU and under the interpreter
        assert_close(y, ref.float().to(dtype), dtype, bound=5e-4, what="y vs the rounded fp32 product")
    else:  # int32 offsets give the same result
        assert torch.equal(gg.grouped_gemm_forward(x.detach(), w.detach(), offsets.int()), y.detach())
    gy = torch.randn_like(ref)
    dx, dw = torch.autograd.grad(y, (x, w), gy.to(dtype))
    ref_dx, ref_dw = torch.autograd.grad(ref, (x64, w64), gy)
    assert_close(dx, ref_dx, dtype, what="dx")
    full = [i for i, c in enumerate(counts) if c]
    empty = [i for i, c in enumerate(counts) if not c]
    assert_close(dw[full], ref_dw[full], dtype, what="dw")
    assert torch.equal(dw[empty], torch.zeros_like(dw[empty])), "empty expert: dw must be 0"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_gate_up_equals_two_grouped_gemms(dtype):
    """The paired kernel (one pass for gate and up, one for their input gradient) against float64 products."""
    counts = [7, 0, 19, 2]
    e, i, h = len(counts), 12, 20
    offsets = _segments(counts)
    x = torch.randn(sum(counts), h, device=DEVICE).to(dtype).requires_grad_()
    gate, up = _weights(e, i, h, dtype, counts), _weights(e, i, h, dtype, counts)
    g, u = gg.grouped_gate_up(x, gate, up, offsets)
    leaves = [t.detach().double().requires_grad_() for t in (x, gate, up)]
    ref_g, ref_u = _per_segment(leaves[0], leaves[1], offsets), _per_segment(leaves[0], leaves[2], offsets)
    assert_close(g, ref_g, dtype, what="g")
    assert_close(u, ref_u, dtype, what="u")
    dg, du = torch.randn_like(ref_g), torch.randn_like(ref_u)
    grads = torch.autograd.grad((g, u), (x, gate, up), (dg.to(dtype), du.to(dtype)))
    ref_grads = torch.autograd.grad((ref_g, ref_u), leaves, (dg, du))
    full = [j for j, c in enumerate(counts) if c]
    assert_close(grads[0], ref_grads[0], dtype, what="dx")
    for name, got, ref in zip(["d gate", "d up"], grads[1:], ref_grads[1:], strict=True):
        assert_close(got[full], ref[full], dtype, what=name)
        assert torch.equal(got[1], torch.zeros_like(got[1])), f"{name}: empty expert must get 0"


def test_grouped_gemm_no_rows():
    w = torch.randn(3, 4, 5, device=DEVICE)
    x = torch.randn(0, 5, device=DEVICE)
    offsets = _segments([0, 0, 0])
    assert gg.grouped_gemm_forward(x, w, offsets).shape == (0, 4)
    dx, dw = gg.grouped_gemm_backward(torch.randn(0, 4, device=DEVICE), x, w, offsets)
    assert dx.shape == (0, 5) and torch.equal(dw, torch.zeros_like(dw))


def test_bad_inputs_raise():
    x, w, off = torch.randn(6, 5, device=DEVICE), torch.randn(2, 3, 5, device=DEVICE), _segments([2, 4])
    with pytest.raises(TypeError, match="w"):
        gg.grouped_gemm(x, w.double(), off)
    with pytest.raises(ValueError, match="offsets"):
        gg.grouped_gemm(x, w, off[:2])
    with pytest.raises(ValueError, match="columns"):
        gg.grouped_gemm(x[:, :4].contiguous(), w, off)
    with pytest.raises(ValueError, match="up_proj"):
        gg.grouped_gate_up(x, w, w[:, :2].contiguous(), off)
