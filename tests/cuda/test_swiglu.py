"""kernels/triton/swiglu.py: the op's battery (`reference.testing.swiglu`), the launchers on empty input and their
inputs, bad inputs.

Outputs are poisoned (tests/cuda/conftest.py).
"""

import pytest
import torch

from kernels.triton.swiglu import swiglu, swiglu_bwd, swiglu_fwd
from reference.testing.pytest_plugin import cases, check_case
from tests.cuda.conftest import DEVICE


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # the interpreter's numpy sigmoid
@pytest.mark.parametrize("case", cases("swiglu"))
def test_battery(case):
    """The op's whole battery: sizes that are not multiples of the 1024-element block (630, 3000 = 2 * 1024 + 952,
    333), gates up to +-100 (exp overflows float32), one token, no tokens, DeepSeek-V3 expert (2048) and dense
    (18432) and V2-Lite expert (1408) widths; float32, bfloat16, float16; y, dgate, dup."""
    check_case(case, swiglu, DEVICE.type)


def test_empty_and_inputs_untouched():
    g, u = torch.randn(0, 5, device=DEVICE), torch.randn(0, 5, device=DEVICE)
    assert swiglu_fwd(g, u).shape == (0, 5)
    dg, du = swiglu_bwd(torch.randn(0, 5, device=DEVICE), g, u)
    assert dg.shape == du.shape == (0, 5)
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
