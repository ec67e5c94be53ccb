"""The Metal path of every public op in `runtime_mlx.kernels`, end to end, with the emulation standing in for the
GPU: dispatch, ``mx.custom_function`` and its ``.vjp`` (gradients through ``mx.grad``), reshapes and path
reporting, compared with the pure-MLX path on the same inputs. The shapes repeat those of
tests/metal_emulation/test_kernels.py, so the compiled kernels are reused."""

from __future__ import annotations

import sys

import mlx.core as mx
import numpy as np
import pytest
import torch

from reference.testing import assert_close
from runtime_mlx import kernels as K
from runtime_mlx.kernels import launch
from runtime_mlx.kernels.rms_norm import _rms_norm_custom
from tests.metal_emulation import driver
from tests.mlx.utils import to_torch

pytestmark = pytest.mark.skipif(sys.platform != "linux" or driver.find_cxx() is None,
                                reason="the Metal emulation needs Linux and g++ (ucontext fibers, ELF sections)")


@pytest.fixture
def emulated_metal(monkeypatch):
    """`runtime_mlx.kernels` believes Metal is there and launches through the emulation (the one-time self-checks
    included: they must pass, or the op falls back and its path reads "fallback")."""
    monkeypatch.setattr(launch, "metal_available", lambda: True)
    monkeypatch.setattr(launch, "run_metal", driver.runner(7))
    launch.reset_checks()
    _rms_norm_custom.cache_clear()
    yield
    _rms_norm_custom.cache_clear()
    launch.reset_checks()


def both(fn):
    """``fn()`` on the emulated Metal path and on the pure-MLX path."""
    metal = fn()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(launch, "metal_available", lambda: False)
        plain = fn()
    return metal, plain


def close(a, b, what):
    assert_close(to_torch(a.astype(mx.float32)), to_torch(b.astype(mx.float32)).double(), torch.float32, what=what)


def test_training_ops_and_gradients(emulated_metal):
    x, w, g = mx.random.normal((5, 300)), mx.random.normal((300,)), mx.random.normal((5, 300))
    (out, grads), (out_p, grads_p) = both(lambda: (
        K.rms_norm(x, w, 1e-6), mx.grad(lambda a, b: (K.rms_norm(a, b, 1e-6) * g).sum(), argnums=(0, 1))(x, w)))
    assert K.kernel_path("rms_norm") == "mlx"  # the last call was the pure-MLX one
    close(out, out_p, "rms_norm")
    close(grads[0], grads_p[0], "rms_norm dx")
    close(grads[1], grads_p[1], "rms_norm dw")

    a, b = mx.random.normal((7, 111)), mx.random.normal((7, 111))
    (o, gr), (o_p, gr_p) = both(lambda: (
        K.swiglu(a, b), mx.grad(lambda u, v: (K.swiglu(u, v) * b).sum(), argnums=(0, 1))(a, b)))
    close(o, o_p, "swiglu")
    close(gr[0], gr_p[0], "swiglu dgate")
    close(gr[1], gr_p[1], "swiglu dup")

    logits, tg = mx.random.normal((9, 700)) * 3, mx.array(np.r_[np.arange(9) * 70][:9], dtype=mx.int32)
    tg = mx.where(mx.arange(9) == 4, -100, tg)
    cot = mx.random.normal((9,))
    (loss, dl), (loss_p, dl_p) = both(lambda: (
        K.cross_entropy(logits, tg), mx.grad(lambda z: (K.cross_entropy(z, tg) * cot).sum())(logits)))
    close(loss, loss_p, "cross_entropy")
    close(dl, dl_p, "cross_entropy dlogits")

    hid, head = mx.random.normal((13, 16)), mx.random.normal((300, 16)) * 0.3
    tg = mx.where(mx.arange(13) == 3, -100, mx.arange(13) * 20).astype(mx.int32)
    lce = mx.value_and_grad(lambda a, b: K.linear_cross_entropy(a, b, tg, chunk_size=5), argnums=(0, 1))
    (lv, (dh, dw)), (lv_p, (dh_p, dw_p)) = both(lambda: lce(hid, head))
    close(lv, lv_p, "linear_cross_entropy")
    close(dh, dh_p, "linear_cross_entropy d_hidden")
    close(dw, dw_p, "linear_cross_entropy d_weight")
    assert launch.fallbacks() == {}, "a self-check failed under the emulation"


def test_router_and_inference_ops(emulated_metal):
    lg, bias = mx.random.normal((70, 24)), mx.random.normal((24,)) * 0.3
    gw, gs = mx.random.normal((70, 3)), mx.random.normal((70, 24))
    args = (3, 4, 2, True, 2.5)

    def route():
        idx, w, s = K.route(lg, bias, *args)
        path = K.kernel_path("route")
        d = mx.grad(lambda z: (K.route(z, bias, *args)[1] * gw).sum() + (K.route(z, bias, *args)[2] * gs).sum())
        return path, idx, w, s, d(lg)

    (path, idx, w, s, d), (path_p, idx_p, w_p, s_p, d_p) = both(route)
    assert (path, path_p) == ("metal", "mlx")
    assert np.array_equal(np.array(idx), np.array(idx_p))
    close(w, w_p, "topk_weight")
    close(s, s_p, "scores")
    close(d, d_p, "dlogits")

    q, k, wi = mx.random.normal((2, 4, 3, 16)), mx.random.normal((2, 150, 16)), mx.random.normal((2, 4, 3))
    (i1, s1), (i2, s2) = both(lambda: (K.indexer_topk(K.indexer_scores(q, k, wi, 0.25), 20),
                                       K.indexer_scores(q, k, wi, 0.25)))
    assert np.array_equal(np.array(i1), np.array(i2))
    close(s1, s2, "indexer_scores")

    x = mx.random.normal((3, 300)) * 10
    (y1, sc1), (y2, sc2) = both(lambda: K.act_quant(x, 128))
    assert np.array_equal(np.array(y1), np.array(y2)) and np.array_equal(np.array(sc1), np.array(sc2))
    bits = mx.random.randint(0, 256, (130, 140)).astype(mx.uint8)
    bits = mx.where((bits & 0x7F) == 0x7F, mx.array(0, mx.uint8), bits)  # no NaN: an exact comparison
    deq1, deq2 = both(lambda: K.weight_dequant(bits, mx.random.uniform(shape=(2, 2), key=mx.random.key(1)) + 0.5))
    assert np.array_equal(np.array(deq1), np.array(deq2))

    ql, qp = mx.random.normal((2, 3, 3, 40)), mx.random.normal((2, 3, 3, 8))
    ckv, kpe = mx.random.normal((2, 37, 40)), mx.random.normal((2, 37, 8))
    o1, o2 = both(lambda: K.mla_decode(ql, qp, ckv, kpe, 0.2))
    close(o1, o2, "mla_decode")
    assert launch.fallbacks() == {}, "a self-check failed under the emulation"


def test_post_training_losses(emulated_metal):
    """`distill` (its own kernels, per chunk, the VJP kernel under ``mx.vjp``) and `preference` (the cross-entropy
    kernels under `sequence_logps`) through the public ops, chunks of 5 tokens over 13 (a partial last chunk):
    every output and the student's (policy's) gradients match the pure-MLX path, and the self-checks pass. V = 700 and
    float32, as in test_kernels.py, so the compiled kernels are reused."""
    n, v = 13, 700
    sh, sw = mx.random.normal((n, 16)), mx.random.normal((v, 16)) * 0.3
    th, tw = mx.random.normal((n, 24)), mx.random.normal((v, 24)) * 0.3
    tg = mx.where(mx.arange(n) == 3, -100, mx.arange(n) * 50).astype(mx.int32)
    cots = [mx.array(1.3), mx.array(-0.4), mx.array(0.7)]
    for beta in (0.0, 0.5, 1.0):
        def run(beta=beta):
            outs, grads = mx.vjp(lambda a, b: K.distill(a, b, th, tw, tg, beta, 2.0, 0.3, 0.7, chunk_size=5),
                                 [sh, sw], cots)
            return K.kernel_path("distill"), outs, grads

        (path, outs, grads), (path_p, outs_p, grads_p) = both(run)
        assert (path, path_p) == ("metal", "mlx")
        for name, x, y in zip(("loss", "soft_loss", "hard_loss"), outs, outs_p, strict=True):
            close(x, y, f"distill {name} beta {beta}")
        close(grads[0], grads_p[0], f"distill d_student_hidden beta {beta}")
        close(grads[1], grads_p[1], f"distill d_student_weight beta {beta}")

    hidden, weight = mx.random.normal((4, 6, 16)), mx.random.normal((v, 16)) * 0.3
    targets = mx.where(mx.arange(6)[None, :] < 2, -100, mx.arange(24).reshape(4, 6) * 29).astype(mx.int32)
    ref_c, ref_r = mx.array([-30.0, -25.0]), mx.array([-31.0, -24.0])
    pcots = [mx.array(1.0), mx.array([0.5, -0.2]), mx.array([0.3, 0.1])]

    def pref():
        outs, grads = mx.vjp(lambda a, b: K.preference(a, b, targets, ref_c, ref_r, 0.1, "sigmoid", 0.1,
                                                       chunk_size=5), [hidden, weight], pcots)
        return K.kernel_path("cross_entropy"), outs, grads

    (path, outs, grads), (path_p, outs_p, grads_p) = both(pref)
    assert (path, path_p) == ("metal", "mlx")
    for name, x, y in zip(("loss", "chosen_logps", "rejected_logps"), outs, outs_p, strict=True):
        close(x, y, f"preference {name}")
    close(grads[0], grads_p[0], "preference d_hidden")
    close(grads[1], grads_p[1], "preference d_weight")
    assert launch.fallbacks() == {}, "a self-check failed under the emulation"


def test_fp8_training_ops(emulated_metal):
    """FP8 training on the emulated Metal path: act_quant with ue8m0 scales and transposed (Wgrad's tiles), the
    tiled fp8_gemm with block and per-row scales (their self-checks pass), and `runtime_mlx.fp8.fp8_linear`'s
    output and gradients (Fprop, Dgrad, Wgrad through the kernels), against the pure-MLX path."""
    from runtime_mlx.fp8 import fp8_linear

    x = mx.random.normal((5, 300), key=mx.random.key(3)) * 10
    for fmt, tr in ((None, False), ("ue8m0", False), ("ue8m0", True)):
        (y1, s1), (y2, s2) = both(lambda fmt=fmt, tr=tr: K.act_quant(x, 128, fmt, transpose=tr))
        assert np.array_equal(np.array(y1), np.array(y2)) and np.array_equal(np.array(s1), np.array(s2))
    w = mx.random.normal((70, 300), key=mx.random.key(4)) * 0.05
    dy = mx.random.normal((5, 70), key=mx.random.key(5))

    def run():
        (y,), (dx, dw) = mx.vjp(lambda a, b: fp8_linear(a, b, 128, "ue8m0"), [x, w], [dy])
        return K.kernel_path("fp8_gemm"), y, dx, dw

    (path, y, dx, dw), (path_p, y_p, dx_p, dw_p) = both(run)
    assert (path, path_p) == ("metal", "mlx")
    close(y, y_p, "fp8_linear")
    close(dx, dx_p, "fp8_linear dx")
    close(dw, dw_p, "fp8_linear dW")
    assert launch.fallbacks() == {}, "a self-check failed under the emulation"
