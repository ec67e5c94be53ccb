"""The mHC kernels of kernels/metal/mhc.metal (forward and VJP of `mhc_pre` and `mhc_post`) under the CPU Metal
emulation, against the float64 reference, each under two thread orders that must agree bit for bit (`twice`); then
the public ops `runtime_mlx.kernels.mhc_pre` / `mhc_post` end to end on the emulated Metal path (dispatch, the
one-time self-check, ``mx.custom_function`` and its VJP) through the op's battery."""

from __future__ import annotations

import sys

import pytest
import torch

from reference.mhc import mhc_post as ref_post
from reference.mhc import mhc_pre as ref_pre
from reference.testing import assert_close
from reference.testing.mhc import _post_inputs, _pre_inputs
from reference.testing.pytest_plugin import cases, check_case
from runtime_mlx import kernels as K
from runtime_mlx.kernels import launch
from runtime_mlx.kernels.mhc import (
    _mhc_post_metal,
    _mhc_post_metal_bwd,
    _mhc_pre_custom,
    _mhc_pre_metal,
    _mhc_pre_metal_bwd,
)
from tests.metal_emulation import driver
from tests.metal_emulation.test_kernels import twice
from tests.mlx.utils import to_mx, to_torch

pytestmark = pytest.mark.skipif(sys.platform != "linux" or driver.find_cxx() is None,
                                reason="the Metal emulation needs Linux and g++ (ucontext fibers, ELF sections)")


def _reference(fn, args, cotangents):
    """``fn`` on float64 copies of ``args`` (tensors) and the gradients for ``cotangents``."""
    ins = [a.double().requires_grad_() for a in args]
    out = fn(*ins)
    out = out if isinstance(out, tuple) else (out,)
    return out, torch.autograd.grad(out, ins, [c.double() for c in cotangents])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dims", [(2, 3, 4, 40, 20), (1, 3, 3, 24, 3)], ids=["N4-it20", "N3-it3"])
def test_mhc_pre(dtype, dims):
    """D = 40 and 24 (not a multiple of 32), N = 3 (not a power of two), 20 and 3 Sinkhorn iterations."""
    g = torch.Generator().manual_seed(sum(dims))
    x, fn, base, scale, iters, hc_eps, rms_eps = _pre_inputs(g, *dims)
    x = x.to(dtype)
    b, s, n, d = x.shape
    cots = [torch.randn(b, s, d, generator=g).to(dtype), torch.randn(b, s, n, generator=g),
            torch.randn(b, s, n, n, generator=g)]
    want, want_grads = _reference(lambda *a: ref_pre(*a, iters, hc_eps, rms_eps), (x, fn, base, scale), cots)
    args = [to_mx(a) for a in (x, fn, base, scale)]
    got = twice(_mhc_pre_metal, *args, iters, hc_eps, rms_eps)
    grads = twice(_mhc_pre_metal_bwd, *args, iters, hc_eps, rms_eps, *(to_mx(c) for c in cots))
    for name, a, w in zip(("collapsed", "post", "comb", "dstreams", "dfn", "dbase", "dscale"), (*got, *grads),
                          (*want, *want_grads), strict=True):
        assert_close(to_torch(a), w, dtype, what=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [4, 3])
def test_mhc_post(dtype, n):
    g = torch.Generator().manual_seed(n)
    bo, post, comb, x = _post_inputs(g, 2, 3, n, 40)
    bo, x = bo.to(dtype), x.to(dtype)
    cot = torch.randn(x.shape, generator=g).to(dtype)
    (want,), want_grads = _reference(ref_post, (bo, post, comb, x), [cot])
    args = [to_mx(a) for a in (bo, post, comb, x)]
    out = twice(_mhc_post_metal, *args)
    grads = twice(_mhc_post_metal_bwd, *args, to_mx(cot))
    assert_close(to_torch(out), want, dtype)
    for name, a, w in zip(("dblock_out", "dpost", "dcomb", "dstreams"), grads, want_grads, strict=True):
        assert_close(to_torch(a), w, dtype, what=name)


@pytest.fixture
def emulated_metal(monkeypatch):
    """`runtime_mlx.kernels` believes Metal is there and launches through the emulation."""
    monkeypatch.setattr(launch, "metal_available", lambda: True)
    monkeypatch.setattr(launch, "run_metal", driver.runner(7))
    launch.reset_checks()
    _mhc_pre_custom.cache_clear()
    yield
    _mhc_pre_custom.cache_clear()
    launch.reset_checks()


@pytest.mark.parametrize("case", cases("mhc_pre", dtypes=[torch.bfloat16], tags=["decode"])
                         + cases("mhc_post", dtypes=[torch.bfloat16], tags=["decode"]))
def test_public_ops_on_emulated_metal(emulated_metal, case):
    """The battery's decode cases (bfloat16, the model's dtype) on the public ops: the self-check passes (no
    fallback), outputs and gradients through ``mx.vjp`` of the custom function are within the bounds."""
    op = case[0].name
    check_case(case, getattr(K, op), "mlx")
    assert K.kernel_path(op) == "metal", K.fallbacks()
