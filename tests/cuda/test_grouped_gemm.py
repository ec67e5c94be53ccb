"""kernels/triton/grouped_gemm.py: the grouped_gemm op's battery (`reference.testing`), what the kernel promises
beyond it (half results rounded once from float32, exact zero gradients for empty experts), the paired gate/up
kernel against per-expert float64 products, bad inputs.
"""

from __future__ import annotations

import pytest
import torch

from kernels.triton import grouped_gemm as gg
from reference.testing import assert_close
from reference.testing.pytest_plugin import cases, check_case
from tests.cuda.conftest import DEVICE


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


@pytest.mark.parametrize("case", cases("grouped_gemm"))
def test_battery(case):
    """The op's battery (`reference.testing.moe`): ragged segments, empty first/middle/last experts (NaN weights
    that must never be read), all rows in one expert, no rows, one decode token, int32 offsets, V3 and V2-Lite
    down_proj reductions; float32, bfloat16, float16; y, dx_sorted, dw."""
    check_case(case, gg.grouped_gemm, DEVICE.type)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_results_are_the_fp32_product_rounded_once_and_empty_experts_get_exact_zeros(dtype):
    """Beyond the op's bound: a half result is the float32 accumulation rounded to nearest once (on a GPU and
    under the interpreter), and an expert with no rows gets an exact zero weight gradient."""
    counts = [5, 0, 33, 1, 0, 17]
    offsets = _segments(counts)
    x = torch.randn(sum(counts), 36, device=DEVICE).to(dtype).requires_grad_()
    w = _weights(len(counts), 20, 36, dtype, counts)
    y = gg.grouped_gemm(x, w, offsets)
    ref = _per_segment(x.detach().double(), w.detach().double(), offsets)
    assert_close(y, ref.float().to(dtype), dtype, bound=5e-4, what="y vs the rounded fp32 product")
    _, dw = torch.autograd.grad(y, (x, w), torch.randn_like(y))
    empty = [i for i, c in enumerate(counts) if not c]
    assert torch.equal(dw[empty], torch.zeros_like(dw[empty])), "empty expert: dw must be exactly 0"


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
