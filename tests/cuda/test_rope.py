"""kernels/triton/rope.py against reference/rope.py's apply_rope (float64), forward and gradient of x.

Shapes: D/2 not a power of two, row counts that leave the kernel's last row block partial (one block, and 39
rows of D = 128 in blocks of 32), one head and many, a decode step (T = 1) at an offset into a YaRN table.
Outputs are poisoned (tests/cuda/conftest.py).
"""

import pytest
import torch

from kernels.triton.rope import rope, rope_launch
from reference.rope import RotaryEmbedding, apply_rope
from tests.cuda.conftest import DEVICE
from reference.testing import assert_close

YARN = {"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1,
        "mscale": 1.0, "mscale_all_dim": 0.707}
SHAPES = [(2, 3, 7, 20), (3, 13, 128), (5, 1, 6)]


def _check(x, cos, sin, interleaved, offset, dtype):
    x = x.requires_grad_()
    dy = torch.randn_like(x)
    y = rope(x, cos, sin, interleaved, offset)
    assert y.dtype == dtype and y.shape == x.shape
    (dx,) = torch.autograd.grad(y, x, dy)
    T = x.shape[-2]
    x64 = x.detach().double().requires_grad_()
    ref = apply_rope(x64, cos[offset:offset + T].double(), sin[offset:offset + T].double(), interleaved)
    (dx64,) = torch.autograd.grad(ref, x64, dy.double())
    assert_close(y, ref, dtype, what="y")
    assert_close(dx, dx64, dtype, what="dx")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "neox"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(shape, interleaved, dtype):
    T, D = shape[-2:]
    cos, sin = RotaryEmbedding(D, 10000.0)(T, device=DEVICE)
    _check(torch.randn(shape, device=DEVICE).to(dtype), cos, sin, interleaved, 0, dtype)


@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "neox"])
@pytest.mark.parametrize("T", [1, 18])
def test_offset_into_yarn_table(T, interleaved):
    D, P, offset = 12, 50, 31
    cos, sin = RotaryEmbedding(D, 10000.0, YARN)(P, device=DEVICE)
    x = torch.randn(2, 4, T, D, device=DEVICE)
    _check(x, cos, sin, interleaved, offset, torch.float32)
    sliced = rope_launch(x, cos[offset:offset + T], sin[offset:offset + T], interleaved)
    assert torch.equal(sliced, rope_launch(x, cos, sin, interleaved, offset))


def test_bf16_table_with_fp32_input():
    x = torch.randn(3, 9, 16, device=DEVICE)
    cos, sin = RotaryEmbedding(16)(9, device=DEVICE, dtype=torch.bfloat16)
    y = rope(x, cos, sin, True)
    assert y.dtype == torch.float32
    assert_close(y, apply_rope(x.double(), cos.double(), sin.double(), True))


BAD = [
    ("odd-D", lambda x, c, s: rope(x[..., :7].contiguous(), c, s, True), ValueError, "D even"),
    ("rank1", lambda x, c, s: rope(x[0, 0, 0], c, s, True), ValueError, r"\(\.\.\., T, D\)"),
    ("int-x", lambda x, c, s: rope(x.long(), c, s, True), TypeError, "x: expected dtype"),
    ("cos-D", lambda x, c, s: rope(x, c[:, :3], s[:, :3], False), ValueError, "cos: expected shape"),
    ("sin-dtype", lambda x, c, s: rope(x, c, s.half(), False), TypeError, "sin: expected dtype"),
    ("sin-rows", lambda x, c, s: rope(x, c, s[:4], False), ValueError, r"sin: expected shape \(5, 4\)"),
    ("offset", lambda x, c, s: rope(x, c, s, True, 3), ValueError, "offset"),
    ("neg-offset", lambda x, c, s: rope(x, c, s, True, -1), ValueError, "offset"),
    ("strided", lambda x, c, s: rope(x.transpose(0, 1), c, s, True), ValueError, "contiguous"),
    ("device", lambda x, c, s: rope(x, c.to("meta"), s, True), ValueError, "cos: expected device"),
]


@pytest.mark.parametrize("call,exc,match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_inputs_raise(call, exc, match):
    x = torch.randn(2, 3, 4, 8, device=DEVICE)
    cos, sin = RotaryEmbedding(8)(5, device=DEVICE)
    with pytest.raises(exc, match=match):
        call(x, cos, sin)
