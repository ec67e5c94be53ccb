"""The sink_attention Metal kernels (kernels/metal/sink_attention.metal: forward, dq, dkv) under the CPU Metal
emulation against the reference op, each launch under two thread orders that must agree bit for bit; and the public
op on the emulated Metal path end to end (self-check, custom VJP through ``mx.grad``) against the pure-MLX path."""

from __future__ import annotations

import sys

import mlx.core as mx
import pytest
import torch

from reference.sink_attention import sink_attention as ref_sink_attention
from reference.testing import assert_close
from reference.testing.sink_attention import random_indices
from runtime_mlx import kernels as K
from runtime_mlx.kernels import launch
from runtime_mlx.kernels.sink_attention import _sink_attention_custom, _sink_attention_metal, _sink_attention_metal_bwd
from tests.metal_emulation import driver
from tests.metal_emulation.test_kernels import twice
from tests.mlx.utils import to_mx, to_torch

pytestmark = pytest.mark.skipif(sys.platform != "linux" or driver.find_cxx() is None,
                                reason="the Metal emulation needs Linux and g++ (ucontext fibers, ELF sections)")

# (B, S, H, D, L, K): float32 with 2 tiles of 32 staged rows (the second partial), 2 features per lane (the second
# partly past D = 40), 5 heads in one group; bfloat16 with 10 heads in groups of 8 (the second partial), the shapes
# of the op's self-check so that the dispatch test below reuses the compiled kernels.
CONFIGS = [((2, 3, 5, 40, 45, 37), torch.float32), ((1, 2, 10, 24, 9, 5), torch.bfloat16)]


def _inputs(b, s, h, d, n_rows, k, dtype):
    idx = random_indices(torch.Generator().manual_seed(0), b, s, n_rows, k, empty=0.3)
    idx[0, 1] = -1  # a query with no valid index
    idx[-1, 0, 0] = n_rows + 2  # past the last row
    return (torch.randn(b, s, h, d).to(dtype), torch.randn(b, n_rows, d).to(dtype), torch.randn(h), idx,
            torch.randn(b, s, h, d).to(dtype))


@pytest.mark.parametrize("shape,dtype", CONFIGS)
def test_kernels(shape, dtype):
    q, kv, sinks, idx, do = _inputs(*shape, dtype)
    leaves = [a.double().requires_grad_() for a in (q, kv, sinks)]
    ref = ref_sink_attention(*leaves[:2], leaves[2], idx, shape[3] ** -0.5)
    ref.backward(do.double())
    args = (to_mx(q), to_mx(kv), to_mx(sinks), to_mx(idx))
    o, lse = twice(_sink_attention_metal, *args, shape[3] ** -0.5)
    grads = twice(_sink_attention_metal_bwd, *args, o, lse, to_mx(do), shape[3] ** -0.5)
    assert o.dtype == args[0].dtype and grads[1].dtype == args[1].dtype and grads[2].dtype == mx.float32
    assert_close(to_torch(o), ref, dtype)
    assert (to_torch(o)[0, 1] == 0).all()
    for name, got, leaf in zip(("dq", "dkv", "dsinks"), grads, leaves, strict=True):
        assert_close(to_torch(got), leaf.grad, dtype, what=name)


@pytest.fixture
def emulated_metal(monkeypatch):
    monkeypatch.setattr(launch, "metal_available", lambda: True)
    monkeypatch.setattr(launch, "run_metal", driver.runner(7))
    launch.reset_checks()
    _sink_attention_custom.cache_clear()
    yield
    _sink_attention_custom.cache_clear()
    launch.reset_checks()


def test_dispatch_and_vjp(emulated_metal):
    shape, dtype = CONFIGS[1]
    q, kv, sinks, idx, do = (to_mx(a) for a in _inputs(*shape, dtype))

    def run():
        f = lambda a, c, e: (K.sink_attention(a, c, e, idx, 0.2).astype(mx.float32) * do.astype(mx.float32)).sum()  # noqa: E731
        return K.sink_attention(q, kv, sinks, idx, 0.2), mx.grad(f, argnums=(0, 1, 2))(q, kv, sinks)

    out, grads = run()
    assert K.kernel_path("sink_attention") == "metal"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(launch, "metal_available", lambda: False)
        out_p, grads_p = run()
    assert_close(to_torch(out), to_torch(out_p).double(), dtype)
    for name, g, g_p in zip(("dq", "dkv", "dsinks"), grads, grads_p, strict=True):
        assert_close(to_torch(g), to_torch(g_p).double(), dtype, what=name)
