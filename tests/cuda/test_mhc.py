"""mHC kernels (kernels/triton/mhc.py): the batteries of `mhc_pre` and `mhc_post` (`reference.testing.mhc`: N = 1,
2, 3, 4, 1/3/20 Sinkhorn iterations, ragged hidden sizes, a decode step, no tokens, a DeepSeek-V4-Flash slice;
forward and gradients in float32, bfloat16 and float16), a whole HyperConnection step against the reference, and bad
inputs. Outputs start as NaN (tests/cuda/conftest.py)."""

import pytest
import torch

from kernels.triton.mhc import mhc_post, mhc_pre
from reference import mhc as ref
from reference.testing import assert_close
from reference.testing.pytest_plugin import cases, check_case
from tests.cuda.conftest import DEVICE


@pytest.mark.parametrize("case", cases("mhc_pre"))
def test_mhc_pre_battery(case):
    check_case(case, mhc_pre, DEVICE.type)


@pytest.mark.parametrize("case", cases("mhc_post"))
def test_mhc_post_battery(case):
    check_case(case, mhc_post, DEVICE.type)


def test_hyper_connection_step_equals_reference():
    """`mhc_pre`, a block, `mhc_post` and the next `mhc_pre` (the comb of one feeding the streams of the next),
    gradients to the first streams and both layers' parameters, against the reference ops."""
    torch.manual_seed(0)
    n, d = 4, 48
    layers = []
    for _ in range(2):
        hc = ref.HyperConnection(d, n, 3, 1e-6, 1e-6).to(DEVICE)
        with torch.no_grad():
            hc.fn.normal_(std=(n * d) ** -0.5)
            hc.base.normal_()
            hc.scale.normal_(1.0, 0.5)
        layers.append(hc)
    x0 = torch.randn(2, 5, n, d, device=DEVICE, requires_grad=True)
    w = torch.randn(2, 5, d, device=DEVICE)

    def step(pre, post):
        coll, p, c = pre(x0, layers[0].fn, layers[0].base, layers[0].scale, 3, 1e-6, 1e-6)
        x1 = post(torch.tanh(coll), p, c, x0)
        out, _, _ = pre(x1, layers[1].fn, layers[1].base, layers[1].scale, 3, 1e-6, 1e-6)
        params = [x0, *layers[0].parameters(), *layers[1].parameters()]
        return out, torch.autograd.grad((out * w).sum(), params)

    got, got_grads = step(mhc_pre, mhc_post)
    want, want_grads = step(ref.mhc_pre, ref.mhc_post)
    assert_close(got, want, what="two mHC layers")
    for i, (a, b) in enumerate(zip(got_grads, want_grads, strict=True)):
        assert_close(a, b, what=f"gradient {i}")


def test_bad_inputs():
    n, d = 4, 8
    x = torch.randn(1, 2, n, d, device=DEVICE)
    fn, base = torch.randn(24, n * d, device=DEVICE), torch.randn(24, device=DEVICE)
    scale = torch.ones(3, device=DEVICE)
    with pytest.raises(ValueError, match="sinkhorn_iters=0"):
        mhc_pre(x, fn, base, scale, 0, 1e-6, 1e-6)
    with pytest.raises(ValueError, match=r"fn: expected shape \(24, 32\)"):
        mhc_pre(x, fn[:, :16], base, scale, 3, 1e-6, 1e-6)
    with pytest.raises(ValueError, match="streams: expected 4 dims"):
        mhc_pre(x[0], fn, base, scale, 3, 1e-6, 1e-6)
    with pytest.raises(TypeError, match="streams: expected dtype"):
        mhc_pre(x.double(), fn, base, scale, 3, 1e-6, 1e-6)
    post, comb = torch.rand(1, 2, n, device=DEVICE), torch.rand(1, 2, n, n, device=DEVICE)
    with pytest.raises(ValueError, match=r"comb: expected shape \(1, 2, 4, 4\)"):
        mhc_post(x[:, :, 0].contiguous(), post, comb[..., :2].contiguous(), x)
    with pytest.raises(TypeError, match="block_out: expected dtype"):
        mhc_post(x[:, :, 0].half(), post, comb, x)
