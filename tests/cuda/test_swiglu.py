"""kernels/triton/swiglu.py against reference/swiglu.py (float64), forward and both gradients.

Sizes are not multiples of the kernel's 1024-element block (630 elements, and 3000 = 2 * 1024 + 952);
outputs are poisoned (tests/cuda/conftest.py). Gates span +-8, so sigmoid's flat tails are covered.
"""

import pytest
import torch

from kernels.triton.swiglu import swiglu, swiglu_bwd, swiglu_fwd
from reference.swiglu import swiglu as swiglu_ref
from tests.cuda.conftest import DEVICE
from reference.testing import assert_close


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(3, 7, 30), (2, 1500)], ids=str)
def test_matches_float64_reference(shape, dtype):
    g = (3 * torch.randn(shape, device=DEVICE)).clamp(-8, 8).to(dtype).requires_grad_()
    u = torch.randn(shape, device=DEVICE).to(dtype).requires_grad_()
    dy = torch.randn(shape, device=DEVICE).to(dtype)
    y = swiglu(g, u)
    assert y.dtype == dtype and y.shape == g.shape
    dg, du = torch.autograd.grad(y, (g, u), dy)
    g64, u64 = g.detach().double().requires_grad_(), u.detach().double().requires_grad_()
    ref = swiglu_ref(g64, u64)
    dg64, du64 = torch.autograd.grad(ref, (g64, u64), dy.double())
    assert_close(y, ref, dtype, what="y")
    assert_close(dg, dg64, dtype, what="d_gate")
    assert_close(du, du64, dtype, what="d_up")


def test_empty_and_inputs_untouched():
    g, u = torch.randn(0, 5, device=DEVICE), torch.randn(0, 5, device=DEVICE)
    assert swiglu_fwd(g, u).shape == (0, 5)
    g, u = torch.randn(4, 9, device=DEVICE), torch.randn(4, 9, device=DEVICE)
    g0, u0 = g.clone(), u.clone()
    swiglu_bwd(torch.randn(4, 9, device=DEVICE), g, u)
    assert torch.equal(g, g0) and torch.equal(u, u0)


BAD = [
    ("shape", lambda g, u: swiglu(g, u[:, :-1].contiguous()), ValueError, r"up: expected shape \(6, 10\)"),
    ("dtype", lambda g, u: swiglu(g, u.half()), TypeError, "up: expected dtype"),
    ("int", lambda g, u: swiglu(g.int(), u.int()), TypeError, "gate: expected dtype"),
    ("strided", lambda g, u: swiglu(g.t(), u.t()), ValueError, "contiguous"),
    ("device", lambda g, u: swiglu(g, u.to("meta")), ValueError, "up: expected device"),
]


@pytest.mark.parametrize("call,exc,match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_inputs_raise(call, exc, match):
    g, u = torch.randn(6, 10, device=DEVICE), torch.randn(6, 10, device=DEVICE)
    with pytest.raises(exc, match=match):
        call(g, u)
