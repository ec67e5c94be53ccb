"""FP8 mixed-precision training in MLX, as DeepSeek-V3 trains (report section 3.3, Figures 6 and 7); mirrors
`reference.fp8_training` (the definition of correct) op for op.

Every linear layer that section 3.3.1 puts in FP8 runs its three GEMMs on e4m3 operands (`runtime_mlx.kernels.fp8`:
`act_quant` and `fp8_gemm` are Metal kernels on Apple Silicon, pure MLX elsewhere):

- Fprop ``y = x W^T``: x quantized in 1 x 128 tiles along K, W in 128 x 128 blocks;
- Dgrad ``dx = dy W``: dy in 1 x 128 tiles, W^T as the transpose of W's blocks;
- Wgrad ``dW = dy^T x``: both operands re-tiled along the token axis (1 x 128 tiles of dy^T and x^T,
  ``act_quant(..., transpose=True)``, per-row scales on both sides), x rebuilt from its saved FP8 copy.

Scales come from the online amax of each tile or block (``scale_fmt="ue8m0"``: powers of two), the accumulation is
promoted to float32 every 128 elements of K, outputs leave in x's dtype, dx in x's dtype and dW in the weight's
(float32 master weights). The SwiGLU MLPs (dense, shared and routed experts: `fp8_swiglu_mlp`) keep the SwiGLU
inputs in FP8 and recompute the SwiGLU output in backward (section 3.3.3). Weights are re-quantized from the master
weights in backward (the same bits as the forward's). Each op is an ``mx.custom_function`` whose extra outputs are
what the reference saves for backward (the e4m3 values and their scales); they trace under ``mx.compile``.

Routed experts: the grouped GEMM `fp8_grouped_gemm` over the expert-sorted rows for Fprop and Dgrad; Wgrad per expert
segment with tiles starting at each segment (as the reference's loop over experts), computed without evaluating the
routing (static shapes: tiles found by a scatter-max, the dequantized operands multiplied by ``mx.segmented_mm``), so
it agrees with the reference to float32 rounding (the scales multiply the operands before the sum instead of the
per-tile partial sums after it; exactly equal products with ``"ue8m0"`` scales).

`enable_fp8_training` puts a `runtime_mlx.Model` on these, as `reference.fp8_training.enable_fp8_training` does the
reference model: the attention projections (`ATTENTION_LINEARS`: MLA's, the standard attention's, DSA's indexer
``wq_b``/``wk``), the dense MLPs, the shared and the routed experts; the embedding, the output head, the MoE gating,
the norms, the attention core, MTP's ``eh_proj`` and the indexer's ``weights_proj`` keep the parameters' precision.
Parameter names are unchanged, so checkpoints are the same files.
"""

from __future__ import annotations

from functools import cache

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from reference.fp8_training import ATTENTION_LINEARS

from .kernels.fp8 import (
    act_dequant,
    act_quant,
    check_scale_fmt,
    expert_of_rows,
    fp8_gemm,
    fp8_grouped_gemm_mlx,
    fp8_grouped_wgrad_mlx,
    weight_quant_mlx,
)
from .moe import Experts
from .swiglu import MLP

__all__ = ["ATTENTION_LINEARS", "FP8Experts", "FP8Linear", "FP8MLP", "enable_fp8_training", "fp8_linear",
           "fp8_swiglu_mlp"]


def _wtrans(wq: mx.array, ws: mx.array):
    """The quantized W^T of a quantized W (Dgrad): the transposed values and the transposed block scales."""
    return wq.swapaxes(-1, -2), ws.swapaxes(-1, -2)


def _gemm(aq, a_s, wq, ws, eid, bs, out_dtype):
    """`fp8_gemm` against one weight (``eid`` None) or the grouped GEMM against a stack by row expert ``eid``."""
    if eid is None:
        return fp8_gemm(aq, a_s, wq, ws, bs, out_dtype)
    return fp8_grouped_gemm_mlx(aq, a_s, wq, ws, eid, bs, out_dtype)


def _wgrad(dy: mx.array, x: mx.array, offsets, bs: int, fmt) -> mx.array:
    """Wgrad ``dW = dy^T x`` in FP8, float32 out, for dy (M, N) and x (M, K): both re-tiled along M; per expert
    segment when ``offsets`` (E + 1,) is given (`fp8_grouped_wgrad_mlx`, returns (E, N, K))."""
    if offsets is None:
        return fp8_gemm(*act_quant(dy, bs, fmt, transpose=True), *act_quant(x, bs, fmt, transpose=True), bs,
                        mx.float32)
    return fp8_grouped_wgrad_mlx(dy, x, offsets, expert_of_rows(offsets, dy.shape[0]), bs, fmt)


@cache
def _linear_fn(bs: int, fmt):
    @mx.custom_function
    def f(x, w):
        x2 = x.reshape(-1, x.shape[-1])
        xq, xs = act_quant(x2, bs, fmt)
        y = fp8_gemm(xq, xs, *weight_quant_mlx(w, bs, fmt), bs, x.dtype)
        return y.reshape(*x.shape[:-1], w.shape[0]), xq, xs  # xq, xs: what backward keeps of x

    @f.vjp
    def f_vjp(primals, cotangents, outputs):
        x, w = primals
        _, xq, xs = outputs
        dy = cotangents[0].reshape(-1, w.shape[0])
        dx = fp8_gemm(*act_quant(dy, bs, fmt), *_wtrans(*weight_quant_mlx(w, bs, fmt)), bs, mx.float32)
        dw = _wgrad(dy, act_dequant(xq, xs, bs), None, bs, fmt)
        return dx.astype(x.dtype).reshape(x.shape), dw.astype(w.dtype)

    del f_vjp
    return f


def fp8_linear(x: mx.array, weight: mx.array, block_size: int = 128, scale_fmt: str | None = None) -> mx.array:
    """An FP8 linear layer without bias, ``x @ weight^T``, whose Fprop, Dgrad and Wgrad run on e4m3 operands, as
    `reference.fp8_training.fp8_linear` (module docstring; report section 3.3, Figure 6).

    ``x`` (..., K) float; ``weight`` (N, K) float (the float32 master weight). Returns (..., N) in x's dtype.
    Gradients (``mx.grad`` / ``mx.vjp``): dx in x's dtype, dW in the weight's. Backward keeps x's e4m3 values and
    float32 tile scales and rebuilds the Wgrad operand from them. ``scale_fmt``: None (float32 scales) or
    ``"ue8m0"`` (powers of two). Raises TypeError on non-float inputs, ValueError on a bad ``block_size`` or
    ``scale_fmt``, K = 0 or a weight that is not (N, K).
    """
    check_scale_fmt(scale_fmt)
    if not isinstance(weight, mx.array) or weight.ndim != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"fp8_linear: weight must be (N, K={x.shape[-1]}), got {getattr(weight, 'shape', None)}")
    return _linear_fn(block_size, scale_fmt)(x, weight)[0]


def _silu_parts(g: mx.array):
    sig = mx.sigmoid(g)
    return g * sig, sig


@cache
def _swiglu_fn(bs: int, fmt, grouped: bool):
    def forward(x, gate, up, down, offsets):
        eid = expert_of_rows(offsets, x.shape[0]) if grouped else None
        dt = x.dtype
        xq, xs = act_quant(x, bs, fmt)
        g = _gemm(xq, xs, *weight_quant_mlx(gate, bs, fmt), eid, bs, dt)
        u = _gemm(xq, xs, *weight_quant_mlx(up, bs, fmt), eid, bs, dt)
        h = (_silu_parts(g.astype(mx.float32))[0] * u.astype(mx.float32)).astype(dt)
        y = _gemm(*act_quant(h, bs, fmt), *weight_quant_mlx(down, bs, fmt), eid, bs, dt)
        # SwiGLU's inputs kept in FP8, its output recomputed in backward (report section 3.3.3)
        return (y, xq, xs, *act_quant(g, bs, fmt), *act_quant(u, bs, fmt))

    def backward(primals, cotangents, outputs):
        x, gate, up, down, offsets = primals
        eid = expert_of_rows(offsets, x.shape[0]) if grouped else None
        off = offsets if grouped else None
        _, xq, xs, gq, gs, uq, us = outputs
        g, u = act_dequant(gq, gs, bs), act_dequant(uq, us, bs)
        silu, sig = _silu_parts(g)
        h = silu * u
        dy = cotangents[0]
        f32 = mx.float32
        dh = _gemm(*act_quant(dy, bs, fmt), *_wtrans(*weight_quant_mlx(down, bs, fmt)), eid, bs, f32)
        dg, du = dh * u * sig * (1 + g * (1 - sig)), dh * g * sig
        dx = (_gemm(*act_quant(dg, bs, fmt), *_wtrans(*weight_quant_mlx(gate, bs, fmt)), eid, bs, f32)
              + _gemm(*act_quant(du, bs, fmt), *_wtrans(*weight_quant_mlx(up, bs, fmt)), eid, bs, f32))
        xd = act_dequant(xq, xs, bs)
        return (dx.astype(x.dtype), _wgrad(dg, xd, off, bs, fmt).astype(gate.dtype),
                _wgrad(du, xd, off, bs, fmt).astype(up.dtype), _wgrad(dy, h, off, bs, fmt).astype(down.dtype),
                mx.zeros_like(offsets))

    f = mx.custom_function(forward)
    f.vjp(backward)
    return f


def fp8_swiglu_mlp(x: mx.array, gate: mx.array, up: mx.array, down: mx.array, offsets: mx.array | None = None,
                   block_size: int = 128, scale_fmt: str | None = None) -> mx.array:
    """A SwiGLU MLP ``down(silu(x gate^T) * (x up^T))`` with all three projections in FP8 (Fprop, Dgrad, Wgrad as
    `fp8_linear`), as `reference.fp8_training.fp8_swiglu_mlp`: a dense MLP or shared experts (``gate``/``up`` (I,
    H), ``down`` (H, I)), or the routed experts over expert-sorted rows (``gate``/``up`` (E, I, H), ``down`` (E, H,
    I), ``offsets`` (E + 1,) integer rising from 0 to M: the grouped GEMM; Wgrad per expert segment).

    ``x``: (M, H) float (or (..., H) for a dense MLP). Returns (M, H) (resp. (..., H)) in x's dtype; gradients in
    the dtypes of x and the weights. Backward keeps x and the SwiGLU inputs as e4m3 values with 1 x 128 tile scales
    and recomputes the SwiGLU output from them (report section 3.3.3). ``offsets`` are not checked against M (no
    evaluation: the layer traces under ``mx.compile``). Raises ValueError for shapes that do not chain, offsets
    missing for stacked weights (or given for matrices), or a bad ``scale_fmt``.
    """
    check_scale_fmt(scale_fmt)
    grouped = gate.ndim == 3
    if grouped != (offsets is not None) or up.shape != gate.shape or down.shape[-2:] != gate.shape[-2:][::-1] \
            or gate.shape[-1] != x.shape[-1] or (grouped and (x.ndim != 2 or offsets.shape != (gate.shape[0] + 1,))):
        raise ValueError(f"fp8_swiglu_mlp: expected gate/up (I, H) or (E, I, H) (the latter with offsets (E + 1,) "
                         f"and x (M, H)), down (H, I) or (E, H, I) and x (..., H); got x {tuple(x.shape)}, gate "
                         f"{tuple(gate.shape)}, up {tuple(up.shape)}, down {tuple(down.shape)}, offsets "
                         f"{None if offsets is None else tuple(offsets.shape)}")
    x2 = x.reshape(-1, x.shape[-1])
    off = offsets.astype(mx.int32) if grouped else mx.zeros((1,), mx.int32)
    y = _swiglu_fn(block_size, scale_fmt, grouped)(x2, gate, up, down, off)[0]
    return y.reshape(*x.shape[:-1], y.shape[-1])


class FP8Linear(nn.Linear):
    """``nn.Linear`` on `fp8_linear` (the same ``weight`` and ``bias``; the bias is added in the output's dtype after
    the FP8 GEMM). Made by `enable_fp8_training`; ``block_size`` and ``scale_fmt`` are instance attributes."""

    block_size: int = 128
    scale_fmt: str | None = None

    def __call__(self, x: mx.array) -> mx.array:
        y = fp8_linear(x, self.weight, self.block_size, self.scale_fmt)
        return y + self.bias.astype(y.dtype) if "bias" in self else y


class FP8MLP(MLP):
    """`runtime_mlx.swiglu.MLP` (dense MLP, shared experts) on `fp8_swiglu_mlp`; the same parameters."""

    block_size: int = 128
    scale_fmt: str | None = None

    def __call__(self, x: mx.array) -> mx.array:
        return fp8_swiglu_mlp(x, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight, None,
                              self.block_size, self.scale_fmt)


class FP8Experts(Experts):
    """`runtime_mlx.moe.Experts` whose grouped SwiGLU runs `fp8_swiglu_mlp` over the expert-sorted rows (grouped FP8
    GEMMs for Fprop and Dgrad, Wgrad per expert); the same parameters."""

    block_size: int = 128
    scale_fmt: str | None = None

    def grouped_swiglu(self, xs: mx.array, idx: mx.array) -> mx.array:
        counts = (idx[:, None] == mx.arange(self.num_experts, dtype=idx.dtype)[None]).astype(mx.int32).sum(axis=0)
        offsets = mx.concatenate([mx.zeros((1,), mx.int32), mx.cumsum(counts)])
        return fp8_swiglu_mlp(xs, self.gate_proj, self.up_proj, self.down_proj, offsets, self.block_size,
                              self.scale_fmt)


def enable_fp8_training(model: nn.Module, scale_fmt: str | None = None, block_size: int = 128) -> list[str]:
    """Put ``model``'s FP8 layers (module docstring: the attention projections `ATTENTION_LINEARS`, dense MLPs,
    shared and routed experts) on FP8 GEMMs, in place, by switching their classes to `FP8Linear`, `FP8MLP` and
    `FP8Experts` (parameters, frozen flags and names untouched, so optimizer groups and checkpoints are the same),
    as `reference.fp8_training.enable_fp8_training`. Everything else keeps its precision. Call it before building
    the optimizer and compiling the step. Returns the names of the switched modules (the reference's names).
    Raises ValueError for a bad ``scale_fmt`` (None or ``"ue8m0"``) or ``block_size``, or a model holding FP8
    (uint8) weights (``from_pretrained(..., keep_fp8=True)``: inference only; load it dequantized to train)."""
    check_scale_fmt(scale_fmt)
    if not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    fp8 = [n for n, p in tree_flatten(model.parameters()) if p.dtype == mx.uint8]
    if fp8:
        raise ValueError(f"enable_fp8_training: the model holds FP8 weights ({fp8[0]}, ...: loaded with keep_fp8), "
                         "which are for inference; load the checkpoint dequantized (the default) to train")
    done = []
    for name, m in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(m, MLP):
            m.__class__ = FP8MLP
        elif isinstance(m, Experts):
            m.__class__ = FP8Experts
        elif type(m) is nn.Linear and leaf in ATTENTION_LINEARS:
            m.__class__ = FP8Linear
        elif not isinstance(m, FP8Linear):
            continue
        m.block_size, m.scale_fmt = block_size, scale_fmt
        done.append(name)
    return done
