"""The Metal fallback of `runtime_mlx.kernels`, faked on a machine without Metal: a kernel that fails to compile,
or whose one-time self-check against the pure-MLX path fails, sends its op to the pure-MLX path with one warning,
and `kernel_path` says "fallback"; ``DSFS_REQUIRE_METAL=1`` makes that an error; a passing self-check runs once
per op and static configuration. The Metal runner is replaced by fakes (`launch.run_metal`), the device by
``launch.metal_available``."""

from __future__ import annotations

import warnings

import mlx.core as mx
import pytest

from runtime_mlx import kernels as K
from runtime_mlx.kernels import launch
from runtime_mlx.kernels.rms_norm import _rms_norm_custom, rms_norm_mlx
from runtime_mlx.kernels.swiglu import swiglu_mlx


@pytest.fixture(autouse=True)
def fake_metal(monkeypatch):
    """Metal "available"; every check and fallback forgotten before and after; DSFS_REQUIRE_METAL unset."""
    monkeypatch.setattr(launch, "metal_available", lambda: True)
    monkeypatch.delenv("DSFS_REQUIRE_METAL", raising=False)
    launch.reset_checks()
    _rms_norm_custom.cache_clear()
    yield
    launch.reset_checks()
    _rms_norm_custom.cache_clear()


def compile_error(launch_):
    raise RuntimeError(f"[metal::Device] Unable to build metal library from source\nerror: use of undeclared "
                       f"identifier 'simd_sum' ({launch_.spec.name})")


def wrong_values(launch_):
    """Outputs of the right shapes and dtypes, all 1: a kernel that runs but computes nonsense."""
    return [mx.ones(s, dtype=d) for s, d in zip(launch_.output_shapes, launch_.output_dtypes, strict=True)]


def swiglu_runner(calls: list):
    """A correct fake Metal swiglu (its launches computed in pure MLX); appends each kernel name to ``calls``."""

    def run(launch_):
        calls.append(launch_.spec.name)
        if launch_.spec.name == "swiglu_fwd":
            return [swiglu_mlx(*launch_.inputs)]
        gate, up, g = launch_.inputs
        return list(mx.vjp(swiglu_mlx, [gate, up], [g])[1])

    return run


@pytest.mark.parametrize("runner,match", [(compile_error, "Unable to build metal library"),
                                          (wrong_values, "relative error")], ids=["compile_error", "wrong_values"])
def test_failing_kernel_falls_back_with_one_warning(monkeypatch, runner, match):
    monkeypatch.setattr(launch, "run_metal", runner)
    x, w = mx.random.normal((3, 40)), mx.random.normal((40,))
    with pytest.warns(K.MetalFallbackWarning, match=f"(?s)rms_norm: the Metal kernel failed .*{match}"):
        out = K.rms_norm(x, w)
    assert K.kernel_path("rms_norm") == "fallback"
    assert match in K.fallbacks()["rms_norm"]
    assert mx.allclose(out, rms_norm_mlx(x, w, 1e-6)).item()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning, and no second check
        dx = mx.grad(lambda a: K.rms_norm(a, w).sum())(mx.random.normal((5, 40)))
    assert dx.shape == (5, 40) and K.kernel_path("rms_norm") == "fallback"


def test_fallback_inside_compile(monkeypatch):
    """The first use may be inside ``mx.compile`` (the trainer's step): the self-check evaluates its own inputs
    there, and the compiled function takes the pure-MLX path."""
    monkeypatch.setattr(launch, "run_metal", compile_error)
    x, w = mx.random.normal((3, 40)), mx.random.normal((40,))
    with pytest.warns(K.MetalFallbackWarning, match="rms_norm"):
        out = mx.compile(lambda a, b: K.rms_norm(a, b) * 2)(x, w)
    assert mx.allclose(out, 2 * rms_norm_mlx(x, w, 1e-6)).item()


def test_require_metal_turns_fallback_into_error(monkeypatch):
    monkeypatch.setattr(launch, "run_metal", compile_error)
    monkeypatch.setenv("DSFS_REQUIRE_METAL", "1")
    with pytest.raises(K.MetalKernelError, match="(?s)rms_norm: the Metal kernel failed .*DSFS_REQUIRE_METAL=1"):
        K.rms_norm(mx.ones((2, 8)), mx.ones((8,)))
    assert "rms_norm" not in K.fallbacks()


def test_self_check_once_per_configuration(monkeypatch):
    calls = []
    monkeypatch.setattr(launch, "run_metal", swiglu_runner(calls))
    a, b = mx.random.normal((4, 10)), mx.random.normal((4, 10))
    out = K.swiglu(a, b)
    assert sorted(calls[:2]) == ["swiglu_bwd", "swiglu_fwd"] and calls[2:] == ["swiglu_fwd"]  # check, then call
    assert K.kernel_path("swiglu") == "metal" and mx.allclose(out, swiglu_mlx(a, b)).item()
    K.swiglu(b, a)
    assert len(calls) == 4  # checked already
    K.swiglu(a.astype(mx.bfloat16), b.astype(mx.bfloat16))
    assert len(calls) == 7  # a new dtype is a new kernel configuration: checked again
    assert K.fallbacks() == {}


def test_other_ops_keep_their_kernels(monkeypatch):
    """A fallback is per op: rms_norm's failure leaves swiglu on its (here, correct) Metal kernels."""
    calls = []
    good = swiglu_runner(calls)
    monkeypatch.setattr(launch, "run_metal", lambda l: good(l) if l.spec.family == "swiglu" else compile_error(l))
    with pytest.warns(K.MetalFallbackWarning):
        K.rms_norm(mx.ones((2, 8)), mx.ones((8,)))
    K.swiglu(mx.ones((3,)), mx.ones((3,)))
    assert (K.kernel_path("rms_norm"), K.kernel_path("swiglu")) == ("fallback", "metal")


def test_no_metal_is_not_a_fallback(monkeypatch):
    monkeypatch.setattr(launch, "metal_available", lambda: False)
    monkeypatch.setattr(launch, "run_metal", compile_error)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        K.rms_norm(mx.ones((2, 8)), mx.ones((8,)))
    assert K.kernel_path("rms_norm") == "mlx" and K.fallbacks() == {}
