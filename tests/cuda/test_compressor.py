"""kernels/triton/compressor.py: the battery of `gated_pool` (`reference.testing.compressor`: HCA and CSA, m 2..8
and 128, ragged widths, the cached prior window, gates of +-30, V4 shapes; forward and the gradients of kv, gate and
position_bias), the gradients of the prior rows, several backward programs, and bad inputs. Then CSA's
`compressed_topk`: its battery (prefix and general masks, ties, NaN, -inf, topk > C, decode, V4-Flash; the full
V4-Flash row of 4096 entries only on a GPU), empty inputs and bad inputs. Outputs start as NaN
(tests/cuda/conftest.py)."""

import pytest
import torch

from kernels.triton.compressor import compressed_topk, gated_pool, gated_pool_bwd, gated_pool_fwd
from kernels.triton.utils import interpreted
from reference.compressor import compressed_topk as ref_compressed_topk
from reference.compressor import gated_pool as ref_gated_pool
from reference.testing import assert_close
from reference.testing.pytest_plugin import cases, check_case
from tests.cuda.conftest import DEVICE


@pytest.mark.parametrize("case", cases("gated_pool"))
def test_battery(case):
    check_case(case, gated_pool, DEVICE.type)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prior_rows_gradients(dtype):
    """Beyond the battery: the cached prior rows get their gradients (prior_gate float32 as in V4's cache), and a
    bf16 prior_kv beside float32 kv is cast as the reference casts it."""
    b, m, d = 2, 3, 10
    args = [torch.randn(b, 3 * m, 2 * d, device=DEVICE).to(dtype), torch.randn(b, 3 * m, 2 * d, device=DEVICE).to(
        dtype), torch.randn(m, 2 * d, device=DEVICE), torch.randn(b, m, d, device=DEVICE).bfloat16(),
        torch.randn(b, m, d, device=DEVICE)]
    args = [a.requires_grad_() for a in args]
    out = gated_pool(args[0], args[1], args[2], True, *args[3:])
    cot = torch.randn(out.shape, device=DEVICE)
    grads = torch.autograd.grad(out, args, cot.to(dtype))
    leaves = [a.detach().cpu().double().requires_grad_() for a in args]
    ref = ref_gated_pool(leaves[0], leaves[1], leaves[2], True, leaves[3].to(dtype).double(), leaves[4])
    want = torch.autograd.grad(ref, leaves, cot.cpu().double())
    assert_close(out, ref, dtype)
    for i, (g, w, a) in enumerate(zip(grads, want, args, strict=True)):
        assert g.dtype == a.dtype
        assert_close(g, w, a.dtype if a.dtype == torch.bfloat16 else dtype, what=f"gradient {i}")


def test_backward_programs_split_the_windows():
    """The backward's programs each take every P-th window; its dposition_bias partial sums add up whatever P is
    (on a GPU P follows the SM count; here 9 windows over up to 4 feature blocks)."""
    kv, gate = torch.randn(3, 12, 100, device=DEVICE), torch.randn(3, 12, 100, device=DEVICE)
    bias, dy = torch.randn(4, 100, device=DEVICE), torch.randn(3, 3, 100, device=DEVICE)
    leaves = [t.cpu().double().requires_grad_() for t in (kv, gate, bias)]
    ref = ref_gated_pool(*leaves, False)
    want = torch.autograd.grad(ref, leaves, dy.cpu().double())
    got = gated_pool_bwd(dy, kv, gate, bias, False)
    assert got[3] is None and got[4] is None
    for g, w, what in zip(got[:3], want, ("dkv", "dgate", "dposition_bias"), strict=True):
        assert_close(g, w, what=what)


def test_empty_and_bad_inputs():
    kv, bias = torch.randn(1, 8, 6, device=DEVICE), torch.randn(4, 6, device=DEVICE)
    assert gated_pool_fwd(kv[:, :0], kv[:, :0], bias, False).shape == (1, 0, 6)
    with pytest.raises(ValueError, match="multiple of m"):
        gated_pool_fwd(kv, kv, bias[:3], False)
    with pytest.raises(ValueError, match="even width"):
        odd = torch.randn(1, 8, 5, device=DEVICE)
        gated_pool_fwd(odd, odd, torch.randn(4, 5, device=DEVICE), True)
    with pytest.raises(ValueError, match="both or neither"):
        gated_pool_fwd(kv, kv, bias, True, prior_kv=torch.randn(1, 4, 3, device=DEVICE))
    with pytest.raises(ValueError, match="prior_gate"):
        gated_pool_fwd(kv, kv, bias, True, torch.randn(1, 4, 3, device=DEVICE), torch.randn(1, 4, 6, device=DEVICE))
    with pytest.raises(TypeError, match="gate"):
        gated_pool_fwd(kv, kv.half(), bias, False)
    with pytest.raises(ValueError, match="contiguous"):
        gated_pool_fwd(torch.randn(1, 6, 8, device=DEVICE).transpose(1, 2), kv, bias, False)


@pytest.mark.parametrize("case", cases("compressed_topk"))
def test_compressed_topk_battery(case):
    if interpreted() and case[1].args[0].shape[-1] > 1024:
        pytest.skip("Triton's interpreter ranks a few hundred entries a second: the 4096-entry row runs on a GPU")
    check_case(case, compressed_topk, DEVICE.type)


def test_compressed_topk_empty_and_bad_inputs():
    scores, visible = torch.randn(2, 3, 7, device=DEVICE), torch.ones(3, 7, dtype=torch.bool, device=DEVICE)
    assert compressed_topk(scores[..., :0], visible[:, :0], 4).shape == (2, 3, 0)  # before the first window closes
    assert compressed_topk(scores[:, :0], visible[:0], 4).shape == (2, 0, 4)
    strided = torch.randn(2, 7, 3, device=DEVICE).transpose(1, 2)  # any strides: the masked copy is contiguous
    assert torch.equal(compressed_topk(strided, visible, 4).cpu(), ref_compressed_topk(strided.cpu(), visible.cpu(), 4))
    with pytest.raises(TypeError, match="scores: expected dtype"):
        compressed_topk(scores.double(), visible, 4)
    with pytest.raises(TypeError, match="visible: expected dtype"):
        compressed_topk(scores, visible.int(), 4)
    with pytest.raises(ValueError, match="visible: expected shape"):
        compressed_topk(scores, visible[:, :5], 4)
    with pytest.raises(ValueError, match="visible: expected shape"):
        compressed_topk(scores, visible[None].expand(3, 3, 7), 4)
    with pytest.raises(ValueError, match="topk must be at least 1"):
        compressed_topk(scores, visible, 0)
