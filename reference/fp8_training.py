"""FP8 mixed-precision training as DeepSeek-V3 trains (report section 3.3, Figures 6 and 7), in plain PyTorch.

Every linear layer that §3.3.1 puts in FP8 runs its three GEMMs on e4m3 operands (`reference.fp8`):

- Fprop ``y = x W^T``: x quantized in 1 x 128 tiles along K, W in 128 x 128 blocks (`fp8_gemm`);
- Dgrad ``dx = dy W``: dy in 1 x 128 tiles along N, W^T as the transpose of W's blocks;
- Wgrad ``dW = dy^T x``: both operands re-tiled along the token axis, the axis this GEMM contracts: 1 x 128 tiles
  of dy^T and x^T (`act_quant(..., transpose=True)`), per-row scales on both sides.

Scales come from the online amax of each tile or block (``scale_fmt="ue8m0"``: powers of two), the accumulation
is promoted to fp32 every 128 elements of K, outputs and gradients leave in the compute dtype (Wgrad in fp32, the
master weights' gradients). What is saved for backward is FP8 (§3.3.3, "low-precision storage"): a linear layer
keeps its input as e4m3 values plus one fp32 scale per 128, and Wgrad's operand is that copy dequantized and
re-quantized along the tokens, as §3.3.3 does for the input of the linear after attention (1 x 128 tiles converted
to 128 x 1 in backward; a second rounding: Wgrad's relative error against float64 is about 4.5e-2 instead of
3.7e-2 for N(0, 1) data, for half the saved bytes of keeping both tilings); the SwiGLU
MLPs (dense, shared and routed experts: `fp8_swiglu_mlp`) cache the SwiGLU inputs in FP8 and recompute the
SwiGLU output in backward, as §3.3.3 describes. Weights are re-quantized from the fp32 master weights in backward
(the same bits as the forward's), so no FP8 copy of them outlives a step.

`enable_fp8_training` puts a model on these: the attention projections (MLA's, the standard attention's, DSA's
indexer ``wq_b``/``wk``), the dense MLPs, the shared and the routed experts; the embedding, the output head, the
MoE gating, the norms, the attention core, MTP's ``eh_proj`` and the indexer's ``weights_proj`` stay in the model's
precision (§3.3.1). Parameter names are unchanged, so checkpoints are the same files.

``ops``: the GEMM and quantization ops to run, a namespace with `act_quant`, `fp8_gemm`, `fp8_grouped_gemm` and
`fp8_grouped_wgrad` of `reference.fp8`'s signatures (default `reference.fp8` itself: ``torch._scaled_mm`` per K block
on CPU, an exact emulation elsewhere); ``runtime_cuda`` passes ``kernels.triton.fp8``.
"""

from __future__ import annotations

import torch
from torch import nn

from . import fp8 as ref_fp8
from .fp8 import act_dequant, stacked_weight_quant
from .moe import Experts
from .swiglu import MLP

ATTENTION_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa",
                     "kv_b_proj", "wq_b", "wk")
"""Names of the linear layers of attention blocks that run in FP8 (MLA, standard attention, DSA's indexer)."""

FFN_LINEARS = ("gate_proj", "up_proj", "down_proj")
"""Names of the projections of the dense MLPs, shared and routed experts, all in FP8."""

__all__ = ["fp8_linear", "fp8_swiglu_mlp", "shared_input_linears", "FP8Linear", "FP8MLP", "FP8Experts",
           "enable_fp8_training", "fp8_ops_for", "ATTENTION_LINEARS", "FFN_LINEARS"]


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a linear layer returns for ``x``: autocast's when it is on (as ``nn.Linear`` under autocast), else
    ``x.dtype``."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def _wquant(w: torch.Tensor, bs: int, fmt):
    """(E, N, K) or (N, K) fp32 master weights -> e4m3 values and block scales of the same rank."""
    if w.dim() == 2:
        q, s = stacked_weight_quant(w.detach()[None], bs, fmt)
        return q[0], s[0]
    return stacked_weight_quant(w.detach(), bs, fmt)


def _wtrans(wq: torch.Tensor, ws: torch.Tensor):
    """The quantized W^T of a quantized W: the transposed values and the transposed block scales (Dgrad)."""
    return wq.transpose(-1, -2).contiguous(), ws.transpose(-1, -2).contiguous()


def _gemm(ops, aq, a_s, wq, ws, offsets, bs, out_dtype):
    """`fp8_gemm` against one weight (offsets None) or `fp8_grouped_gemm` against a stack."""
    if offsets is None:
        return ops.fp8_gemm(aq, a_s, wq, ws, bs, out_dtype)
    return ops.fp8_grouped_gemm(aq, a_s, wq, ws, offsets, bs, out_dtype)


def _wgrad(ops, dy: torch.Tensor, x: torch.Tensor, offsets, bs: int, fmt, shape) -> torch.Tensor:
    """Wgrad ``dW = dy^T x`` in FP8 (fp32 out) for dy (M, N), x (M, K) floats: both re-tiled along M (1 x bs tiles of
    dy^T and x^T); per expert segment of rows when ``offsets`` is given (tiles start at each segment: one
    `fp8_grouped_wgrad` call). ``shape``: the weight's, (N, K) or (E, N, K)."""
    if offsets is not None:
        return ops.fp8_grouped_wgrad(dy, x, offsets, bs, fmt)
    if dy.shape[0] == 0:
        return dy.new_zeros(shape, dtype=torch.float32)
    gq, gs = ops.act_quant(dy, bs, fmt, transpose=True)
    xq, xs = ops.act_quant(x, bs, fmt, transpose=True)
    return ops.fp8_gemm(gq, gs, xq, xs, bs, torch.float32)


class _FP8Linear(torch.autograd.Function):
    """``x @ W_i^T`` for each weight W_i, one quantized copy of x saved for all of them (`fp8_linear`)."""

    @staticmethod
    def forward(ctx, x, cfg, *weights):
        bs, fmt, ops, out_dtype = cfg
        x2 = x.reshape(-1, x.shape[-1])
        xq, xs = ops.act_quant(x2.contiguous(), bs, fmt)
        outs = []
        for w in weights:
            wq, ws = _wquant(w, bs, fmt)
            outs.append(ops.fp8_gemm(xq, xs, wq, ws, bs, out_dtype).reshape(*x.shape[:-1], w.shape[0]))
        ctx.save_for_backward(xq, xs, *weights)
        ctx.cfg, ctx.x_dtype, ctx.x_shape = cfg, x.dtype, x.shape
        return tuple(outs)

    @staticmethod
    def backward(ctx, *dys):
        xq, xs, *weights = ctx.saved_tensors
        bs, fmt, ops, _ = ctx.cfg
        dx, dws, x_deq = None, [], None
        for i, (w, dy) in enumerate(zip(weights, dys, strict=True)):
            dy2 = dy.reshape(-1, w.shape[0]).contiguous()
            if ctx.needs_input_grad[0]:
                gq, gs = ops.act_quant(dy2, bs, fmt)
                d = ops.fp8_gemm(gq, gs, *_wtrans(*_wquant(w, bs, fmt)), bs, torch.float32)
                dx = d if dx is None else dx + d
            if ctx.needs_input_grad[2 + i]:
                x_deq = act_dequant(xq, xs, bs) if x_deq is None else x_deq
                dws.append(_wgrad(ops, dy2, x_deq, None, bs, fmt, w.shape).to(w.dtype))
            else:
                dws.append(None)
        dx = None if dx is None else dx.to(ctx.x_dtype).reshape(ctx.x_shape)
        return (dx, None, *dws)


def fp8_linear(x: torch.Tensor, weight, block_size: int = 128, scale_fmt: str | None = None, ops=None):
    """An FP8 linear layer without bias, ``x @ weight^T``, whose Fprop, Dgrad and Wgrad run on e4m3 operands
    (module docstring; report section 3.3, Figure 6).

    x: (..., K) float (fp32, or bf16 under autocast); weight: an (N, K) float tensor (the fp32 master weight), or a
    tuple/list of them sharing the input (MLA's ``q_a_proj`` and ``kv_a_proj_with_mqa``, `shared_input_linears`):
    x is quantized and saved once for all. Returns (..., N) in the compute dtype (autocast's, else x's), a tuple for
    a tuple of weights. Gradients: dx in x's dtype, dW in the weight's. Saved for backward: x's e4m3 values and its
    float32 tile scales. ``scale_fmt``: None (fp32 scales) or ``"ue8m0"`` (powers of two); ``ops``: module
    docstring. Raises as `reference.fp8.act_quant` (ValueError on a bad ``scale_fmt``, K = 0) and ValueError when a
    weight's K differs.
    """
    many = isinstance(weight, tuple | list)
    weights = tuple(weight) if many else (weight,)
    for w in weights:
        if w.dim() != 2 or w.shape[1] != x.shape[-1]:
            raise ValueError(f"fp8_linear: weight must be (N, K={x.shape[-1]}), got {tuple(w.shape)}")
    cfg = (block_size, scale_fmt, ops or ref_fp8, _compute_dtype(x))
    with torch.autocast(x.device.type, enabled=False):
        outs = _FP8Linear.apply(x, cfg, *weights)
    return outs if many else outs[0]


def _swiglu_grads(g: torch.Tensor, u: torch.Tensor, dh: torch.Tensor):
    """d/dg and d/du of ``silu(g) * u`` (fp32) given dh."""
    sig = torch.sigmoid(g)
    return dh * u * sig * (1 + g * (1 - sig)), dh * g * sig


class _FP8SwiGLU(torch.autograd.Function):
    """``down(silu(x gate^T) * (x up^T))`` in FP8 (`fp8_swiglu_mlp`)."""

    @staticmethod
    def forward(ctx, x, offsets, cfg, gate, up, down):
        bs, fmt, ops, out_dtype = cfg
        xq, xs = ops.act_quant(x, bs, fmt)
        g = _gemm(ops, xq, xs, *_wquant(gate, bs, fmt), offsets, bs, out_dtype)
        u = _gemm(ops, xq, xs, *_wquant(up, bs, fmt), offsets, bs, out_dtype)
        h = (torch.nn.functional.silu(g.float()) * u.float()).to(out_dtype)
        y = _gemm(ops, *ops.act_quant(h, bs, fmt), *_wquant(down, bs, fmt), offsets, bs, out_dtype)
        # SwiGLU's inputs cached in FP8, its output recomputed in backward (report section 3.3.3)
        ctx.save_for_backward(xq, xs, *ops.act_quant(g, bs, fmt), *ops.act_quant(u, bs, fmt), gate, up, down,
                              *(() if offsets is None else (offsets,)))
        ctx.cfg, ctx.x_dtype, ctx.grouped = cfg, x.dtype, offsets is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        xq, xs, gq, gs, uq, us, gate, up, down, *off = ctx.saved_tensors
        offsets = off[0] if ctx.grouped else None
        bs, fmt, ops, _ = ctx.cfg
        need_x, need_gate, need_up, need_down = (ctx.needs_input_grad[i] for i in (0, 3, 4, 5))
        g, u = act_dequant(gq, gs, bs), act_dequant(uq, us, bs)
        dy = dy.contiguous()
        dh = _gemm(ops, *ops.act_quant(dy, bs, fmt), *_wtrans(*_wquant(down, bs, fmt)), offsets, bs, torch.float32)
        dg, du = _swiglu_grads(g, u, dh)
        dx = d_gate = d_up = d_down = None
        if need_x:
            dx = (_gemm(ops, *ops.act_quant(dg, bs, fmt), *_wtrans(*_wquant(gate, bs, fmt)), offsets, bs,
                        torch.float32)
                  + _gemm(ops, *ops.act_quant(du, bs, fmt), *_wtrans(*_wquant(up, bs, fmt)), offsets, bs,
                          torch.float32)).to(ctx.x_dtype)
        x = act_dequant(xq, xs, bs) if need_gate or need_up else None
        if need_gate:
            d_gate = _wgrad(ops, dg, x, offsets, bs, fmt, gate.shape).to(gate.dtype)
        if need_up:
            d_up = _wgrad(ops, du, x, offsets, bs, fmt, up.shape).to(up.dtype)
        if need_down:  # the SwiGLU output, recomputed from its FP8-cached inputs
            d_down = _wgrad(ops, dy, torch.nn.functional.silu(g) * u, offsets, bs, fmt, down.shape).to(down.dtype)
        return dx, None, None, d_gate, d_up, d_down


def fp8_swiglu_mlp(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                   offsets: torch.Tensor | None = None, block_size: int = 128, scale_fmt: str | None = None,
                   ops=None) -> torch.Tensor:
    """A SwiGLU MLP ``down(silu(x gate^T) * (x up^T))`` with all three projections in FP8 (Fprop, Dgrad, Wgrad as
    `fp8_linear`): a dense MLP or shared experts (``gate``/``up`` (I, H), ``down`` (H, I)), or the routed experts
    over expert-sorted rows (``gate``/``up`` (E, I, H), ``down`` (E, H, I), ``offsets`` (E + 1,) int32/int64 rising
    from 0 to M, `fp8_grouped_gemm`; Wgrad per expert segment).

    x: (M, H) float (or (..., H) for a dense MLP). Returns (M, H) (resp. (..., H)) in the compute dtype (autocast's,
    else x's). Saved for backward (report section 3.3.3): x and the SwiGLU inputs (x gate^T, x up^T) as e4m3 values
    with 1 x 128 tile scales; backward recomputes the SwiGLU output from them. Raises ValueError for shapes that do
    not chain (or offsets missing for stacked weights), as `reference.fp8` for the rest.
    """
    grouped = gate.dim() == 3
    if grouped != (offsets is not None) or up.shape != gate.shape or down.shape[-2:] != gate.shape[-2:][::-1] \
            or gate.shape[-1] != x.shape[-1]:
        raise ValueError(f"fp8_swiglu_mlp: expected gate/up (I, H) or (E, I, H) (the latter with offsets), down "
                         f"(H, I) or (E, H, I) and x (..., H); got x {tuple(x.shape)}, gate {tuple(gate.shape)}, up "
                         f"{tuple(up.shape)}, down {tuple(down.shape)}, offsets {offsets is not None}")
    cfg = (block_size, scale_fmt, ops or ref_fp8, _compute_dtype(x))
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    with torch.autocast(x.device.type, enabled=False):
        y = _FP8SwiGLU.apply(x2, offsets, cfg, gate, up, down)
    return y.reshape(*x.shape[:-1], y.shape[-1])


class FP8Linear(nn.Linear):
    """``nn.Linear`` on `fp8_linear` (the same ``weight`` and ``bias`` parameters; the bias is added in the compute
    dtype after the FP8 GEMM). Made by `enable_fp8_training` from an ``nn.Linear``; ``block_size``, ``scale_fmt`` and
    ``ops`` are instance attributes."""

    block_size: int = 128
    scale_fmt: str | None = None
    ops = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = fp8_linear(x, self.weight, self.block_size, self.scale_fmt, self.ops)
        return y if self.bias is None else y + self.bias.to(y.dtype)


class FP8MLP(MLP):
    """`reference.swiglu.MLP` (dense MLP, shared experts) on `fp8_swiglu_mlp`; same parameters."""

    block_size: int = 128
    scale_fmt: str | None = None
    ops = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_swiglu_mlp(x, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight, None,
                              self.block_size, self.scale_fmt, self.ops)


class FP8Experts(Experts):
    """`reference.moe.Experts` whose grouped SwiGLU runs `fp8_swiglu_mlp` over the expert-sorted rows (grouped FP8
    GEMMs for Fprop and Dgrad, Wgrad per expert); same parameters."""

    block_size: int = 128
    scale_fmt: str | None = None
    ops = None

    def grouped_swiglu(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        return fp8_swiglu_mlp(xs, self.gate_proj, self.up_proj, self.down_proj, offsets, self.block_size,
                              self.scale_fmt, self.ops)


def shared_input_linears(x: torch.Tensor, *linears: nn.Module) -> tuple[torch.Tensor, ...]:
    """Each of ``linears`` applied to the one input ``x`` (MLA's ``q_a_proj``/``q_proj`` and
    ``kv_a_proj_with_mqa``): one `fp8_linear` call when they are all `FP8Linear` with the same settings, so x is
    quantized and saved for backward once (report section 3.3.3), else each module on its own. Returns their outputs
    in order."""
    first = linears[0]
    if all(isinstance(m, FP8Linear) and (m.block_size, m.scale_fmt, m.ops) == (first.block_size, first.scale_fmt,
                                                                              first.ops) for m in linears):
        outs = fp8_linear(x, tuple(m.weight for m in linears), first.block_size, first.scale_fmt, first.ops)
        return tuple(y if m.bias is None else y + m.bias.to(y.dtype) for y, m in zip(outs, linears, strict=True))
    return tuple(m(x) for m in linears)


def fp8_ops_for(model_cls: type, device: torch.device | str):
    """The FP8 ops a model class runs on ``device``: the class's ``fp8_ops`` (``runtime_cuda.Model``: the Triton
    kernels) on CPU tensors (Triton's interpreter) and on GPUs with FP8 tensor cores (compute capability 8.9 or more:
    Ada, Hopper, Blackwell), else `reference.fp8` (``torch._scaled_mm`` per K block on CPU, an exact emulation on
    other GPUs: slow, but the same numbers)."""
    ops = getattr(model_cls, "fp8_ops", None)
    device = torch.device(device)
    if ops is None or (device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9)):
        return ref_fp8
    return ops


def enable_fp8_training(model: nn.Module, scale_fmt: str | None = None, ops=None, block_size: int = 128) -> list[str]:
    """Put ``model``'s FP8 layers (module docstring: attention projections `ATTENTION_LINEARS`, dense MLPs, shared
    and routed experts) on FP8 GEMMs, in place, by switching their classes to `FP8Linear`, `FP8MLP` and `FP8Experts`
    (parameters, buffers, names and hooks untouched); called again, it sets the new ``scale_fmt``/``ops``/
    ``block_size`` on all of them. Everything else keeps its precision. Returns the names of the switched modules.
    Raises ValueError for a bad ``scale_fmt`` (``None`` or ``"ue8m0"``)."""
    ref_fp8._check_scale_fmt(scale_fmt)
    done = []
    for name, m in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(m, MLP):
            m.__class__ = FP8MLP
        elif isinstance(m, Experts):
            m.__class__ = FP8Experts
        elif isinstance(m, nn.Linear) and leaf in ATTENTION_LINEARS:
            m.__class__ = FP8Linear
        else:
            continue
        m.block_size, m.scale_fmt, m.ops = block_size, scale_fmt, ops
        done.append(name)
    return done
