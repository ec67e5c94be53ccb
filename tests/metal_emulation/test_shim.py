"""The emulation's own subset (README.md): simd shuffles and scans, float4, half storage, device atomics, the
generated signature, and a loud failure outside the subset. Small inline kernels, not ours."""

from __future__ import annotations

import sys

import mlx.core as mx
import numpy as np
import pytest

from runtime_mlx.kernels import KernelSpec, Launch
from tests.metal_emulation import driver
from tests.metal_emulation.driver import MetalEmulationError

pytestmark = pytest.mark.skipif(sys.platform != "linux" or driver.find_cxx() is None,
                                reason="the Metal emulation needs Linux and g++ (ucontext fibers, ELF sections)")

SIMD = """
uint i = thread_position_in_grid.x;
float v = float(x[i]);
float b = v;
for (ushort m = 16; m > 0; m /= 2) {
  b += metal::simd_shuffle_xor(b, m);
}
total[i] = b;
prefix[i] = metal::simd_prefix_exclusive_sum(v);
bcast[i] = metal::simd_broadcast(v, 3);
down[i] = metal::simd_shuffle_down(v, 1);
float4 q = float4(v, 2.0f * v, 3.0f, 4.0f) * 2.0f + float4(1.0f);
vec[i] = half(q.x + q.y + q[2] * q.w);
"""

HIST = """
uint i = thread_position_in_grid.x;
if (i < uint(N)) {
  metal::atomic_fetch_add_explicit(&counts[x[i] % x_shape[0]], 1, metal::memory_order_relaxed);
}
"""


def test_simd_vector_half():
    x = mx.array(np.arange(64) % 7 - 3.0, dtype=mx.float16)
    spec = KernelSpec("shim_simd", "none", ("x",), ("total", "prefix", "bcast", "down", "vec"))
    launch = Launch(spec, [x], [], (64, 1, 1), (64, 1, 1), [(64,)] * 5, [mx.float32] * 4 + [mx.float16])
    code = driver.generate(launch, source=SIMD, header="")
    assert "uint thread_index_in_simdgroup" not in code and "uint3 thread_position_in_grid" in code
    total, prefix, bcast, down, vec = (np.array(o).astype(np.float64)
                                       for o in driver.emulate(launch, 3, source=SIMD, header=""))
    v = np.array(x).astype(np.float64).reshape(2, 32)
    assert np.array_equal(total.reshape(2, 32), np.repeat(v.sum(1, keepdims=True), 32, 1))
    assert np.array_equal(prefix.reshape(2, 32), np.cumsum(v, 1) - v)
    assert np.array_equal(bcast.reshape(2, 32), np.repeat(v[:, 3:4], 32, 1))
    assert np.array_equal(down.reshape(2, 32), np.concatenate([v[:, 1:], v[:, 31:]], 1))
    assert np.array_equal(vec.reshape(2, 32), (2 * v + 1) + (4 * v + 1) + 7 * 9)


def test_device_atomics_and_shape():
    x = mx.array(np.random.default_rng(0).integers(0, 1000, 300), dtype=mx.int32)
    spec = KernelSpec("shim_hist", "none", ("x",), ("counts",), atomic_outputs=True)
    launch = Launch(spec, [x], [("N", 300)], (320, 1, 1), (64, 1, 1), [(300,)], [mx.int32], init_value=0)
    (counts,) = driver.emulate(launch, 5, source=HIST, header="")
    assert np.array_equal(np.array(counts), np.bincount(np.array(x) % 300, minlength=300))


def test_outside_the_subset_fails_loudly():
    spec = KernelSpec("shim_bad", "none", ("x",), ("y",))
    launch = Launch(spec, [mx.zeros((4,))], [], (4, 1, 1), (4, 1, 1), [(4,)], [mx.float32])
    src = "const device float* p = x;\ny[0] = p[0];\n"  # a raw device pointer would bypass the bounds checks
    with pytest.raises(MetalEmulationError, match="EMU_UNSUPPORTED_device"):
        driver.emulate(launch, 0, source=src, header="")
