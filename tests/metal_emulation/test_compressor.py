"""The compressor pooling kernels (kernels/metal/compressor.metal, forward and backward) under the CPU Metal
emulation, against `reference.compressor.gated_pool` in float64: HCA and CSA, with and without the cached prior
window, ragged widths, m not a power of two; each launch under two thread orders that must agree bit for bit; then
the public op end to end on the emulated Metal path (self-check, custom VJP) against its pure-MLX path. CSA's
`compressed_topk` (DSA's top-k kernel over the masked scores) against `reference.compressor.compressed_topk`:
prefix and general masks, exact ties, NaN, visible -inf, topk > C, a decode step; and the public op end to end."""

from __future__ import annotations

import sys

import mlx.core as mx
import pytest
import torch

from reference.compressor import compressed_topk as ref_compressed_topk
from reference.compressor import gated_pool as ref_gated_pool
from reference.compressor import visible_entries
from reference.testing import assert_close
from runtime_mlx import kernels as K
from runtime_mlx.kernels import launch
from runtime_mlx.kernels.compressor import (
    _compressed_topk_metal,
    _gated_pool_custom,
    _gated_pool_metal,
    _gated_pool_metal_bwd,
)
from tests.metal_emulation import driver
from tests.metal_emulation.test_kernels import twice
from tests.mlx.utils import to_mx, to_torch

pytestmark = pytest.mark.skipif(sys.platform != "linux" or driver.find_cxx() is None,
                                reason="the Metal emulation needs Linux and g++ (ucontext fibers, ELF sections)")

CASES = [  # (B, windows, m, D, overlap, prior)
    (2, 3, 3, 13, False, False),
    (1, 2, 128, 5, False, False),
    (2, 3, 4, 20, True, False),
    (2, 2, 3, 9, True, True),
]


def _inputs(b, n, m, d, overlap, prior, dtype):
    c = 2 * d if overlap else d
    args = [torch.randn(b, n * m, c).to(dtype), (torch.randn(b, n * m, c) * 2).to(dtype), torch.randn(m, c)]
    if prior:
        args += [torch.randn(b, m, d).to(dtype), torch.randn(b, m, d) * 2]
    return args


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cfg", CASES, ids=["hca", "hca-m128", "csa", "csa-prior"])
def test_gated_pool(cfg, dtype):
    b, n, m, d, overlap, prior = cfg
    args = _inputs(b, n, m, d, overlap, prior, dtype)
    dy = torch.randn(b, n, d).to(dtype)
    leaves = [a.double().requires_grad_() for a in args]
    ref = ref_gated_pool(leaves[0], leaves[1], leaves[2], overlap, *leaves[3:])
    ref.backward(dy.double())
    margs = [to_mx(a) for a in args]
    out = twice(_gated_pool_metal, *margs[:3], overlap, *margs[3:])
    grads = twice(lambda *a, **kw: [g for g in _gated_pool_metal_bwd(*a, **kw) if g is not None], *margs[:3], overlap,
                  to_mx(dy), *margs[3:])
    assert_close(to_torch(out), ref, dtype)
    names = ("dkv", "dgate", "dposition_bias", "dprior_kv", "dprior_gate")
    for name, g, a, leaf in zip(names, grads, margs, leaves, strict=False):
        assert g.dtype == a.dtype, name
        assert_close(to_torch(g), leaf.grad, dtype, what=name)
    assert len(grads) == len(margs)


@pytest.mark.parametrize("cfg", [CASES[0], CASES[3]], ids=["hca", "csa-prior"])
def test_public_op_on_emulated_metal(monkeypatch, cfg):
    """`K.gated_pool` on the Metal path (its self-check passes, the custom VJP runs) equals its pure-MLX path."""
    monkeypatch.setattr(launch, "metal_available", lambda: True)
    monkeypatch.setattr(launch, "run_metal", driver.runner(7))
    launch.reset_checks()
    _gated_pool_custom.cache_clear()
    b, n, m, d, overlap, prior = cfg
    args = [to_mx(a) for a in _inputs(b, n, m, d, overlap, prior, torch.float32)]
    cot = mx.random.normal((b, n, d))

    def loss(*a):
        return (K.gated_pool(a[0], a[1], a[2], overlap, *a[3:]) * cot).sum()

    grads = mx.grad(loss, argnums=tuple(range(len(args))))(*args)
    assert K.kernel_path("gated_pool") == "metal"
    monkeypatch.setattr(launch, "metal_available", lambda: False)
    want = mx.grad(loss, argnums=tuple(range(len(args))))(*args)
    assert K.kernel_path("gated_pool") == "mlx"
    for i, (g, w) in enumerate(zip(grads, want, strict=True)):
        assert_close(to_torch(g), to_torch(w).double(), torch.float32, what=f"gradient {i}")
    launch.reset_checks()
    _gated_pool_custom.cache_clear()


def _topk_inputs(name):
    """``(scores, visible, topk)`` of one `compressed_topk` case (float32 scores on a 0.5 grid: exact ties)."""
    g = torch.Generator().manual_seed(3)
    if name == "prefix":  # the model's mask: a cached prefill at position 530, m 4, over 140 entries (two tiles)
        return (torch.round(torch.randn(2, 5, 140, generator=g) * 2) / 2,
                visible_entries(torch.arange(530, 535), 140, 4), 20)
    if name == "decode":  # one query per sequence at position 100 over 37 entries: 25 visible, -1 padding
        return torch.randn(2, 1, 37, generator=g), visible_entries(torch.tensor([100]), 37, 4), 30
    scores = torch.round(torch.randn(1, 4, 40, generator=g) * 2) / 2
    visible = torch.rand(1, 4, 40, generator=g) < 0.5
    scores[0, 0, [1, 7]], scores[0, 1, 3] = float("nan"), -float("nan")
    visible[0, 0, 1], visible[0, 0, 7] = True, False  # a hidden NaN is never taken
    scores[0, 2, ::3] = float("-inf")  # visible -inf ties with the hidden entries, the lower index first
    visible[0, 3] = False  # a query that sees nothing
    return scores, visible, 25


@pytest.mark.parametrize("name", ["prefix", "general", "decode"])
def test_compressed_topk(name):
    scores, visible, topk = _topk_inputs(name)
    got = twice(_compressed_topk_metal, to_mx(scores), to_mx(visible), topk)
    want = ref_compressed_topk(scores, visible, topk)
    assert got.dtype == mx.int32
    assert torch.equal(to_torch(got).long(), want)
    assert (want >= 0).any()


def test_compressed_topk_public_op_on_emulated_metal(monkeypatch):
    """`K.compressed_topk` takes the Metal path (its self-check passes on the emulation) and equals the reference."""
    monkeypatch.setattr(launch, "metal_available", lambda: True)
    monkeypatch.setattr(launch, "run_metal", driver.runner(7))
    launch.reset_checks()
    scores, visible, topk = _topk_inputs("general")
    got = K.compressed_topk(to_mx(scores), to_mx(visible), topk)
    assert K.kernel_path("compressed_topk") == "metal"
    assert torch.equal(to_torch(got).long(), ref_compressed_topk(scores, visible, topk))
    launch.reset_checks()
