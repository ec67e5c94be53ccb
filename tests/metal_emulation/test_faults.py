"""Planted faults must fail: the emulation catches the classic GPU bugs in our real kernels.

Each test edits the source string of one real kernel (never the file), runs it under the emulation and checks
that the fault shows: an off-by-one index as an out-of-bounds error, a removed barrier as a result that moves
with the thread order or reads the poisoned
threadgroup memory (and misses the reference), a barrier in a divergent branch as an error, an unwritten
output element as the poison (NaN) left in place.
"""

from __future__ import annotations

import sys

import mlx.core as mx
import numpy as np
import pytest
import torch

from reference.rms_norm import rms_norm as ref_rms_norm
from reference.testing import assert_close, rel_err
from runtime_mlx.kernels import SPECS
from runtime_mlx.kernels.cross_entropy import _cross_entropy_metal
from runtime_mlx.kernels.dsa import _indexer_topk_metal, indexer_topk_mlx
from runtime_mlx.kernels.fp8 import _act_quant_metal
from runtime_mlx.kernels.rms_norm import _rms_norm_metal
from runtime_mlx.kernels.swiglu import _swiglu_metal
from tests.metal_emulation import driver
from tests.metal_emulation.driver import MetalEmulationError
from tests.mlx.utils import to_mx, to_torch

pytestmark = pytest.mark.skipif(sys.platform != "linux" or driver.find_cxx() is None,
                                reason="the Metal emulation needs Linux and g++ (ucontext fibers, ELF sections)")

BARRIER = "metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);\n"


def planted(kernel: str, old: str, new: str) -> str:
    """``SPECS[kernel].source`` with the first ``old`` replaced by ``new`` (which must be there)."""
    src = SPECS[kernel].source
    assert old in src, f"the fault site {old!r} is no longer in {kernel}: update this test"
    return src.replace(old, new, 1)


def test_off_by_one_read():
    x, w = mx.random.normal((5, 300)), mx.random.normal((300,))
    src = planted("rms_norm_fwd", "j < uint(D)", "j <= uint(D)")
    with pytest.raises(MetalEmulationError, match=r"out-of-bounds access: x\[1500\], buffer has 1500 elements"):
        _rms_norm_metal(x, w, 1e-6, runner=driver.runner(0, source=src))


def test_off_by_one_guard():
    gate, up = mx.random.normal((777,)), mx.random.normal((777,))
    src = planted("swiglu_fwd", "if (i >= uint(N))", "if (i > uint(N))")
    with pytest.raises(MetalEmulationError, match=r"out-of-bounds access: gate\[777\]"):
        _swiglu_metal(gate, up, runner=driver.runner(0, source=src))


def test_removed_barrier_rms_norm():
    x, w = torch.randn(6, 300), torch.randn(300)
    ref = ref_rms_norm(x.double(), w.double(), 1e-6)
    src = planted("rms_norm_fwd", BARRIER + "if (sg == 0)", "if (sg == 0)")
    outs = [to_torch(_rms_norm_metal(to_mx(x), to_mx(w), 1e-6, runner=driver.runner(s, source=src))[0])
            for s in range(4)]
    # sg 0 reads the other simdgroups' partial sums before they are written: poison (NaN) or stale values
    assert all(rel_err(o, ref) > 1e-5 for o in outs)
    with pytest.raises(AssertionError, match="relative error"):
        for o in outs:
            assert_close(o, ref)


def test_removed_barrier_indexer_topk():
    scores = mx.random.normal((1, 3, 200))  # two 128-key tiles per row
    ref = np.array(indexer_topk_mlx(scores, 50))
    src = planted("indexer_topk", "    " + BARRIER + "    if (cb + tid < nvis)", "    if (cb + tid < nvis)")
    outs = [np.array(_indexer_topk_metal(scores, 50, runner=driver.runner(s, source=src))) for s in range(3)]
    assert any(not np.array_equal(o, ref) for o in outs)
    assert any(not np.array_equal(outs[0], o) for o in outs[1:]), "result did not move"
    good = np.array(_indexer_topk_metal(scores, 50, runner=driver.runner(0)))
    assert np.array_equal(good, ref)


def test_barrier_in_divergent_branch():
    logits, targets = mx.random.normal((3, 500)), mx.array([1, 2, 3], dtype=mx.int32)
    src = planted("cross_entropy_fwd", "if (tid == 0) {\n", "if (tid == 0) {\n  " + BARRIER)
    with pytest.raises(MetalEmulationError, match=r"threadgroup_barrier reached by 1 of 256 threads"):
        _cross_entropy_metal(logits, targets, -100, runner=driver.runner(0, source=src))


def test_unwritten_output_stays_poisoned():
    x = mx.random.normal((4, 300))
    src = planted("act_quant", "if (lane == 0) {", "if (lane == 0 && tile != 0) {")
    _, s = _act_quant_metal(x, 128, runner=driver.runner(0, source=src))
    s = np.array(s)
    assert np.isnan(s[0, 0]) and np.isfinite(s.reshape(-1)[1:]).all()
