"""kernels/triton/rope.py: the op's battery (`reference.testing.rope`), offsets against sliced tables, a
low-precision table, bad inputs.

Outputs are poisoned (tests/cuda/conftest.py).
"""

import pytest
import torch

from kernels.triton.rope import rope, rope_launch
from reference.rope import RotaryEmbedding, apply_rope
from reference.testing import assert_close
from reference.testing.pytest_plugin import cases, check_case
from reference.testing.rope import SMALL_YARN
from tests.cuda.conftest import DEVICE


@pytest.mark.parametrize("case", cases("rope"))
def test_battery(case):
    """The op's whole battery: interleaved and NeoX pairings of every shape (D/2 not a power of two, a partial
    last row block, no heads), a decode step at the last table row, offsets into a YaRN table of amplitude != 1,
    DeepSeek-V3 MLA q_pe / k_pe and the V3.2 indexer's rope dims; float32, bfloat16, float16; y and dx."""
    check_case(case, rope, DEVICE.type)


@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "neox"])
@pytest.mark.parametrize("T", [1, 18])
def test_offset_equals_sliced_table(T, interleaved):
    """Passing the whole table and an offset is bitwise the same as passing the sliced table."""
    D, P, offset = 12, 50, 31
    cos, sin = RotaryEmbedding(D, 10000.0, SMALL_YARN)(P, device=DEVICE)
    x = torch.randn(2, 4, T, D, device=DEVICE)
    sliced = rope_launch(x, cos[offset:offset + T], sin[offset:offset + T], interleaved)
    assert torch.equal(sliced, rope_launch(x, cos, sin, interleaved, offset))


def test_bf16_table_with_fp32_input():
    """Beyond the op spec (float32 tables): a bfloat16 table rotates a float32 input, which keeps its dtype."""
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
