"""SwiGLU in MLX: the elementwise Metal kernels of ``kernels/metal/swiglu.metal`` (forward, and a backward as a
custom VJP) or the pure-MLX formula. Reference: `reference.swiglu.swiglu`."""

from __future__ import annotations

import mlx.core as mx

from .launch import Launch, cdiv, check_close, check_float, run, sample, spec, use_metal

FWD = spec("swiglu_fwd", "swiglu", "gate up", "out")
BWD = spec("swiglu_bwd", "swiglu", "gate up g", "dgate dup")
_TG = 256


def swiglu_mlx(gate: mx.array, up: mx.array) -> mx.array:
    """Pure MLX: ``silu(gate) * up``."""
    return gate * mx.sigmoid(gate) * up


def swiglu_launch(gate: mx.array, up: mx.array) -> Launch:
    """Elementwise forward over n = gate.size elements: grid (n rounded up to 256, 1, 1), threadgroup (256, 1, 1)."""
    n = gate.size
    return Launch(FWD, [gate.reshape(-1), up.reshape(-1)], [("T", gate.dtype), ("N", n)],
                  (_TG * cdiv(n, _TG), 1, 1), (_TG, 1, 1), [(n,)], [gate.dtype])


def swiglu_bwd_launch(gate: mx.array, up: mx.array, g: mx.array) -> Launch:
    """Elementwise backward: ``dgate = g * up * sig * (1 + gate * (1 - sig))``, ``dup = g * silu(gate)``; same grid
    as the forward; outputs in gate's dtype."""
    n = gate.size
    return Launch(BWD, [gate.reshape(-1), up.reshape(-1), g.reshape(-1)], [("T", gate.dtype), ("G", g.dtype), ("N", n)],
                  (_TG * cdiv(n, _TG), 1, 1), (_TG, 1, 1), [(n,), (n,)], [gate.dtype, gate.dtype])


def _swiglu_metal(gate, up, runner=None):
    (out,) = run(runner, swiglu_launch(gate, up))
    return out.reshape(gate.shape)


def _swiglu_metal_bwd(gate, up, g, runner=None):
    dgate, dup = run(runner, swiglu_bwd_launch(gate, up, g))
    return dgate.reshape(gate.shape), dup.reshape(up.shape)


@mx.custom_function
def _swiglu_custom(gate, up):
    return _swiglu_metal(gate, up)


@_swiglu_custom.vjp
def _swiglu_custom_vjp(primals, cotangent, output):
    return _swiglu_metal_bwd(primals[0], primals[1], cotangent)


def _self_check(dtype) -> None:
    """Metal forward and backward against the pure-MLX path on 300 elements (a partial threadgroup)."""
    gate, up, g = sample((3, 100), 1, dtype), sample((3, 100), 2, dtype), sample((3, 100), 3, dtype)
    (want,), (want_dg, want_du) = mx.vjp(swiglu_mlx, [gate, up], [g])
    dg, du = _swiglu_metal_bwd(gate, up, g)
    check_close("swiglu", _swiglu_metal(gate, up), want, dtype)
    check_close("swiglu dgate", dg, want_dg, dtype)
    check_close("swiglu dup", du, want_du, dtype)


def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    """``silu(gate) * up`` elementwise, as `reference.swiglu.swiglu`; ``gate``/``up`` (..., I) of one float dtype;
    returns (..., I) in that dtype. Differentiable on both paths. Raises TypeError/ValueError on mismatched
    dtypes or shapes. Source: Shazeer 2020, "GLU Variants Improve Transformer"."""
    check_float("gate", gate)
    check_float("up", up)
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"gate and up must match: {gate.shape} {gate.dtype} vs {up.shape} {up.dtype}")
    if use_metal("swiglu", (gate.dtype,), lambda: _self_check(gate.dtype)):
        return _swiglu_custom(gate, up)
    return swiglu_mlx(gate, up)
