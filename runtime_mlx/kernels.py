"""The hot ops of the MLX runtime: Metal kernels through ``mx.fast.metal_kernel``, or pure MLX where Metal is absent.

Every public op here dispatches once per call: on a Metal device (Apple Silicon) it launches the kernel bodies in
``kernels/metal/<family>.metal``; everywhere else (MLX's Linux CPU back end, its CUDA back end, or
``DSFS_MLX_KERNELS=mlx``) it runs a pure-MLX implementation of the same op. `kernel_path` tells which path an
op took last; `backend` tells which path the next call will take.

This module is the ONE place that holds every kernel's launch arguments (name, input/output names, source,
header, template, grid, threadgroup, output shapes and dtypes): each kernel is a `KernelSpec` (static: names
and source) and each call builds a `Launch` (per call: inputs, template, grid, threadgroup, outputs). The real
launch (`run_metal`) and the CPU emulation in ``tests/metal_emulation`` take the same `Launch`, so they cannot
drift apart: every ``_<op>_metal`` function takes ``runner=`` (None: `run_metal`), which the emulation tests set.
Each ``mx.fast.metal_kernel`` object is built once and cached. Kernels with a gradient (rms_norm, swiglu,
cross_entropy, and moe_route's weights) are ``mx.custom_function`` with a ``.vjp``; the backward kernels
recompute what they need (rstd, logsumexp) instead of keeping it alive between forward and backward.

Conventions (all ops):
- float inputs may be float32, float16 or bfloat16; reductions and softmax run in float32;
- integer outputs (indices) are int32;
- FP8 e4m3 values travel as their uint8 bit patterns (``mx.to_fp8`` / ``torch.float8_e4m3fn.view(uint8)``).

Source for the semantics: the plain-PyTorch ``reference`` package (the definition of correct).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import mlx.core as mx

__all__ = [
    "AMAX_MIN",
    "FP8_MAX",
    "POISON",
    "KernelSpec",
    "Launch",
    "SPECS",
    "act_quant",
    "backend",
    "cross_entropy",
    "indexer_mask",
    "indexer_scores",
    "indexer_topk",
    "kernel_path",
    "metal_available",
    "mla_decode",
    "moe_route",
    "rms_norm",
    "run_metal",
    "swiglu",
    "weight_dequant",
]

METAL_DIR = Path(__file__).resolve().parent.parent / "kernels" / "metal"
FP8_MAX = 448.0
AMAX_MIN = 1e-4
_FLOATS = (mx.float32, mx.float16, mx.bfloat16)

# ---------------------------------------------------------------------------------------------------------------
# Which path runs
# ---------------------------------------------------------------------------------------------------------------

_LAST_PATH: dict[str, str] = {}


def metal_available() -> bool:
    """True when the Metal kernels can run: MLX has a Metal device and ``DSFS_MLX_KERNELS`` is not ``mlx``."""
    if os.environ.get("DSFS_MLX_KERNELS", "").lower() == "mlx":
        return False
    try:
        return bool(mx.metal.is_available())
    except Exception:  # an MLX build without the metal module
        return False


def backend() -> str:
    """The path the next op call takes: ``"metal"`` or ``"mlx"``."""
    return "metal" if metal_available() else "mlx"


def kernel_path(op: str | None = None):
    """Which path an op took on its last call: ``"metal"`` or ``"mlx"`` (None if never called). With no ``op``,
    a dict of every op called so far -> its path."""
    return dict(_LAST_PATH) if op is None else _LAST_PATH.get(op)


def _use_metal(op: str) -> bool:
    path = backend()
    _LAST_PATH[op] = path
    return path == "metal"


# ---------------------------------------------------------------------------------------------------------------
# Kernel specs and launches (the data both the real launch and the emulation consume)
# ---------------------------------------------------------------------------------------------------------------


@cache
def _metal_file(family: str) -> dict[str, str]:
    """Sections of ``kernels/metal/<family>.metal``: ``{"header": text, "<kernel>": body, ...}``.

    A file holds a header (helper functions, before the first marker) and kernel bodies, each introduced by a
    line ``// @kernel <name>``. Raises FileNotFoundError if the file is missing.
    """
    text = (METAL_DIR / f"{family}.metal").read_text()
    sections, name, lines = {}, "header", []
    for line in text.splitlines(keepends=True):
        if line.startswith("// @kernel "):
            sections[name] = "".join(lines)
            name, lines = line.split()[2], []
        else:
            lines.append(line)
    sections[name] = "".join(lines)
    return sections


@dataclass(frozen=True)
class KernelSpec:
    """One Metal kernel: its name, file (op family), input and output buffer names, and whether outputs are
    ``device atomic<T>*``. ``source``/``header`` are read from ``kernels/metal/<family>.metal``."""

    name: str
    family: str
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    atomic_outputs: bool = False

    @property
    def source(self) -> str:
        return _metal_file(self.family)[self.name]

    @property
    def header(self) -> str:
        return _metal_file(self.family)["header"]


@dataclass
class Launch:
    """One call of a kernel: the arguments of ``mx.fast.metal_kernel(...)(**)``.

    ``inputs``: mx arrays in ``spec.input_names`` order (0-d arrays become ``constant T&`` scalars);
    ``template``: ``[(name, mx.Dtype | int | bool)]``; ``grid``: total threads per dimension (MLX dispatches
    threads, not groups: the last group of a dimension may be partial); ``threadgroup``: threads per group;
    ``output_shapes``/``output_dtypes``: one per ``spec.output_names``; ``init_value``: fill for the outputs
    (None: left uninitialised, as on the GPU).
    """

    spec: KernelSpec
    inputs: list
    template: list
    grid: tuple[int, int, int]
    threadgroup: tuple[int, int, int]
    output_shapes: list
    output_dtypes: list
    init_value: float | None = None


def _spec(name, family, inputs, outputs, atomic=False) -> KernelSpec:
    return KernelSpec(name, family, tuple(inputs.split()), tuple(outputs.split()), atomic)


SPECS: dict[str, KernelSpec] = {
    s.name: s
    for s in (
        _spec("rms_norm_fwd", "rms_norm", "x w eps", "out rstd"),
        _spec("rms_norm_bwd_dx", "rms_norm", "x w g eps", "dx rstd"),
        _spec("rms_norm_bwd_dw", "rms_norm", "x g rstd", "dw"),
        _spec("swiglu_fwd", "swiglu", "gate up", "out"),
        _spec("swiglu_bwd", "swiglu", "gate up g", "dgate dup"),
        _spec("moe_route", "moe", "logits bias", "topk_idx topk_weight scores"),
        _spec("mla_decode", "mla", "q_latent q_pe c_kv k_pe scale", "o_latent"),
        _spec("indexer_scores", "dsa", "q k w scale", "scores"),
        _spec("indexer_topk", "dsa", "scores", "topk_idx"),
        _spec("act_quant", "fp8", "x", "y s"),
        _spec("weight_dequant", "fp8", "w scale_inv", "out"),
        _spec("cross_entropy_fwd", "cross_entropy", "logits targets ignore_index", "loss lse"),
        _spec("cross_entropy_bwd", "cross_entropy", "logits targets g ignore_index", "dlogits"),
    )
}


@cache
def _metal_kernel(name: str):
    """The ``mx.fast.metal_kernel`` for ``SPECS[name]``, built once per process."""
    s = SPECS[name]
    return mx.fast.metal_kernel(
        name=s.name,
        input_names=list(s.input_names),
        output_names=list(s.output_names),
        source=s.source,
        header=s.header,
        atomic_outputs=s.atomic_outputs,
    )


POISON = False
"""When true (the test session sets it), outputs without an ``init_value`` are filled before the kernel runs:
NaN when every output is floating, else 127 (an e4m3 NaN in uint8, an out-of-range index in int32), so an
element no thread writes fails the comparison (DESIGN.md, "Tolerance")."""


def run_metal(launch: Launch) -> list:
    """Launch on the GPU through the cached ``mx.fast.metal_kernel``; returns the outputs (mx arrays)."""
    init = launch.init_value
    if init is None and POISON:
        floating = all(d in _FLOATS for d in launch.output_dtypes)
        init = float("nan") if floating else 127.0
    return _metal_kernel(launch.spec.name)(
        inputs=launch.inputs,
        template=launch.template,
        grid=launch.grid,
        threadgroup=launch.threadgroup,
        output_shapes=launch.output_shapes,
        output_dtypes=launch.output_dtypes,
        init_value=init,
    )


def _run(runner, launch: Launch) -> list:
    """Run ``launch`` with ``runner`` (a callable taking a `Launch`, e.g. the CPU emulation in the tests), or
    with `run_metal` when None (looked up at call time)."""
    return (runner or run_metal)(launch)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _scalar(v: float) -> mx.array:
    return mx.array(v, dtype=mx.float32)


def _check_float(name: str, a) -> None:
    if not isinstance(a, mx.array):
        raise TypeError(f"{name}: expected an mx.array, got {type(a).__name__}")
    if a.dtype not in _FLOATS:
        raise TypeError(f"{name}: expected float32, float16 or bfloat16, got {a.dtype}")


def _check_shape(name: str, a, shape: tuple) -> None:
    if len(shape) != a.ndim or any(s is not None and s != d for s, d in zip(shape, a.shape, strict=True)):
        want = tuple("*" if s is None else s for s in shape)
        raise ValueError(f"{name}: expected shape {want}, got {tuple(a.shape)}")


def _f32(a: mx.array) -> mx.array:
    return a if a.dtype == mx.float32 else a.astype(mx.float32)


def _tg_size(n: int, cap: int = 256) -> int:
    """Threads per group for a row of ``n`` elements: a multiple of 32, at least 32, at most ``cap``."""
    return max(32, min(cap, 32 * _cdiv(n, 32)))


# ---------------------------------------------------------------------------------------------------------------
# rms_norm
# ---------------------------------------------------------------------------------------------------------------


def rms_norm_mlx(x: mx.array, weight: mx.array, eps: float) -> mx.array:
    """Pure MLX: ``weight * (x * rsqrt(mean(x**2, -1) + eps)).astype(x.dtype)``, computed in float32."""
    xf = _f32(x)
    y = xf * mx.rsqrt(mx.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight * y.astype(x.dtype)


def rms_norm_launch(x2: mx.array, weight: mx.array, eps: float) -> Launch:
    """Forward launch over rows ``x2`` (N, D): one threadgroup of ``TG`` threads (32..256) per row, grid
    (N * TG, 1, 1); outputs ``out`` (N, D) in ``promote(x, weight)`` and ``rstd`` (N,) float32 (saved for the
    backward)."""
    n, d = x2.shape
    tg = _tg_size(d)
    out_dtype = mx.result_type(x2, weight)
    return Launch(SPECS["rms_norm_fwd"], [x2, weight, _scalar(eps)],
                  [("T", x2.dtype), ("W", weight.dtype), ("O", out_dtype), ("D", d), ("TG", tg)],
                  (n * tg, 1, 1), (tg, 1, 1), [(n, d), (n,)], [out_dtype, mx.float32])


def rms_norm_bwd_dx_launch(x2, weight, g2, eps) -> Launch:
    """Backward, first launch: ``dx`` (N, D) in x's dtype and ``rstd`` (N,) float32 (recomputed in the same pass),
    one threadgroup per row as the forward."""
    n, d = x2.shape
    tg = _tg_size(d)
    return Launch(SPECS["rms_norm_bwd_dx"], [x2, weight, g2, _scalar(eps)],
                  [("T", x2.dtype), ("W", weight.dtype), ("G", g2.dtype), ("D", d), ("TG", tg)],
                  (n * tg, 1, 1), (tg, 1, 1), [(n, d), (n,)], [x2.dtype, mx.float32])


def rms_norm_bwd_dw_launch(x2, g2, rstd) -> Launch:
    """Backward, second launch: ``dw`` (D,) float32, one thread per column summing over the N rows, grid (D rounded
    up to the threadgroup, 1, 1), threadgroup (32..256, 1, 1)."""
    n, d = x2.shape
    tw = min(256, 32 * _cdiv(d, 32))
    return Launch(SPECS["rms_norm_bwd_dw"], [x2, g2, rstd], [("T", x2.dtype), ("G", g2.dtype), ("N", n), ("D", d)],
                  (tw * _cdiv(d, tw), 1, 1), (tw, 1, 1), [(d,)], [mx.float32])


def _rms_norm_metal(x, weight, eps, runner=None):
    """The Metal path of `rms_norm`, forward only: returns (out, rstd). ``runner`` runs a `Launch`."""
    d = x.shape[-1]
    out, rstd = _run(runner, rms_norm_launch(x.reshape(-1, d), weight, eps))
    return out.reshape(x.shape), rstd


def _rms_norm_metal_bwd(x, weight, g, eps, runner=None):
    """The Metal VJP of `rms_norm`: returns (dx in x's shape and dtype, dw (D,) in weight's dtype)."""
    d = x.shape[-1]
    x2, g2 = x.reshape(-1, d), g.reshape(-1, d)
    dx, rstd = _run(runner, rms_norm_bwd_dx_launch(x2, weight, g2, eps))
    (dw,) = _run(runner, rms_norm_bwd_dw_launch(x2, g2, rstd))
    return dx.reshape(x.shape), dw.astype(weight.dtype)


@cache
def _rms_norm_custom(eps: float):
    @mx.custom_function
    def f(x, weight):
        return _rms_norm_metal(x, weight, eps)[0]

    @f.vjp
    def f_vjp(primals, cotangent, output):
        x, weight = primals
        return _rms_norm_metal_bwd(x, weight, cotangent, eps)

    del f_vjp
    return f


def rms_norm(x: mx.array, weight: mx.array, eps: float = 1e-6) -> mx.array:
    """RMSNorm over the last dimension, as `reference.rms_norm.rms_norm`.

    ``x`` (..., D) float32/float16/bfloat16, ``weight`` (D,) float; returns (..., D) in
    ``promote(x.dtype, weight.dtype)``: ``weight * (x * rsqrt(mean(x**2) + eps)).astype(x.dtype)`` with the
    reduction in float32. Differentiable in ``x`` and ``weight`` on both paths (Metal: a custom VJP with its own
    kernels). Raises TypeError on non-float inputs, ValueError if ``weight`` is not (D,).
    Source: Zhang & Sennrich 2019; DeepSeek-V3 uses it before attention, MoE and on the latents.
    """
    _check_float("x", x)
    _check_float("weight", weight)
    _check_shape("weight", weight, (x.shape[-1],))
    if _use_metal("rms_norm"):
        return _rms_norm_custom(float(eps))(x, weight)
    return rms_norm_mlx(x, weight, eps)


# ---------------------------------------------------------------------------------------------------------------
# swiglu
# ---------------------------------------------------------------------------------------------------------------

_EW_TG = 256


def swiglu_mlx(gate: mx.array, up: mx.array) -> mx.array:
    """Pure MLX: ``silu(gate) * up``."""
    return gate * mx.sigmoid(gate) * up


def swiglu_launch(gate: mx.array, up: mx.array) -> Launch:
    """Elementwise forward over n = gate.size elements: grid (n rounded up to 256, 1, 1), threadgroup (256, 1, 1)."""
    n = gate.size
    return Launch(SPECS["swiglu_fwd"], [gate.reshape(-1), up.reshape(-1)], [("T", gate.dtype), ("N", n)],
                  (_EW_TG * _cdiv(n, _EW_TG), 1, 1), (_EW_TG, 1, 1), [(n,)], [gate.dtype])


def swiglu_bwd_launch(gate: mx.array, up: mx.array, g: mx.array) -> Launch:
    """Elementwise backward: ``dgate = g * up * sig * (1 + gate * (1 - sig))``, ``dup = g * silu(gate)``; same grid
    as the forward; outputs in gate's dtype."""
    n = gate.size
    return Launch(SPECS["swiglu_bwd"], [gate.reshape(-1), up.reshape(-1), g.reshape(-1)],
                  [("T", gate.dtype), ("G", g.dtype), ("N", n)],
                  (_EW_TG * _cdiv(n, _EW_TG), 1, 1), (_EW_TG, 1, 1), [(n,), (n,)], [gate.dtype, gate.dtype])


def _swiglu_metal(gate, up, runner=None):
    (out,) = _run(runner, swiglu_launch(gate, up))
    return out.reshape(gate.shape)


def _swiglu_metal_bwd(gate, up, g, runner=None):
    dgate, dup = _run(runner, swiglu_bwd_launch(gate, up, g))
    return dgate.reshape(gate.shape), dup.reshape(up.shape)


@mx.custom_function
def _swiglu_custom(gate, up):
    return _swiglu_metal(gate, up)


@_swiglu_custom.vjp
def _swiglu_custom_vjp(primals, cotangent, output):
    return _swiglu_metal_bwd(primals[0], primals[1], cotangent)


def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    """``silu(gate) * up`` elementwise, as `reference.swiglu.swiglu`; ``gate``/``up`` (..., I) of one float dtype;
    returns (..., I) in that dtype. Differentiable on both paths. Raises TypeError/ValueError on mismatched
    dtypes or shapes. Source: Shazeer 2020, "GLU Variants Improve Transformer"."""
    _check_float("gate", gate)
    _check_float("up", up)
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"gate and up must match: {gate.shape} {gate.dtype} vs {up.shape} {up.dtype}")
    if _use_metal("swiglu"):
        return _swiglu_custom(gate, up)
    return swiglu_mlx(gate, up)


# ---------------------------------------------------------------------------------------------------------------
# moe_route
# ---------------------------------------------------------------------------------------------------------------


def _route_weights(scores, topk_idx, norm_topk_prob, routed_scaling_factor):
    w = mx.take_along_axis(scores, topk_idx, axis=-1)
    if norm_topk_prob:
        w = w / (w.sum(-1, keepdims=True) + 1e-20)
    return w * routed_scaling_factor


def moe_route_mlx(logits, bias, top_k, n_group, topk_group, norm_topk_prob, routed_scaling_factor):
    """Pure MLX `moe_route` (same contract)."""
    scores = mx.sigmoid(_f32(logits))
    choice = mx.stop_gradient(scores) + _f32(bias)
    choice = mx.where(mx.isnan(choice), mx.inf, choice)  # a NaN ranks first, as in torch.topk
    n, e = choice.shape
    if n_group > 1:
        grouped = choice.reshape(n, n_group, e // n_group)
        group_scores = mx.sort(grouped, axis=-1)[..., -2:].sum(-1)
        gidx = mx.argsort(-group_scores, axis=-1)[:, :topk_group]
        keep = mx.put_along_axis(mx.zeros(group_scores.shape, mx.bool_), gidx, mx.array(True), axis=-1)
        choice = mx.where(keep[..., None], grouped, -mx.inf).reshape(n, e)
    topk_idx = mx.argsort(-choice, axis=-1)[:, :top_k].astype(mx.int32)  # stable: ties go to the lower id
    return topk_idx, _route_weights(scores, topk_idx, norm_topk_prob, routed_scaling_factor), scores


def moe_route_launch(logits, bias, top_k, n_group, topk_group, norm_topk_prob, routed_scaling_factor) -> Launch:
    """One thread per token (N tokens, E experts held in registers), grid (N rounded up to 64, 1, 1),
    threadgroup (64, 1, 1). Outputs ``topk_idx`` (N, K) int32, ``topk_weight`` (N, K) float32, ``scores`` (N, E)
    float32."""
    n, e = logits.shape
    return Launch(SPECS["moe_route"], [logits, _f32(bias)],
                  [("T", logits.dtype), ("E", e), ("K", top_k), ("G", n_group), ("KG", topk_group),
                   ("NORM", bool(norm_topk_prob)), ("N", n)],
                  (64 * _cdiv(n, 64), 1, 1), (64, 1, 1), [(n, top_k), (n, top_k), (n, e)],
                  [mx.int32, mx.float32, mx.float32])


def _moe_route_metal(logits, bias, top_k, n_group, topk_group, norm_topk_prob, routed_scaling_factor,
                     runner=None):
    launch = moe_route_launch(logits, bias, top_k, n_group, topk_group, norm_topk_prob, routed_scaling_factor)
    idx, w, scores = _run(runner, launch)
    return idx, w * routed_scaling_factor, scores


@cache
def _moe_route_custom(top_k, n_group, topk_group, norm_topk_prob, routed_scaling_factor):
    args = (top_k, n_group, topk_group, norm_topk_prob, routed_scaling_factor)

    @mx.custom_function
    def f(logits, bias):
        return _moe_route_metal(logits, bias, *args)

    @f.vjp
    def f_vjp(primals, cotangents, outputs):
        logits, bias = primals
        idx = outputs[0]

        def weights_and_scores(lg):
            s = mx.sigmoid(_f32(lg))
            return _route_weights(s, idx, norm_topk_prob, routed_scaling_factor), s

        _, (dlogits,) = mx.vjp(weights_and_scores, [logits], [cotangents[1], cotangents[2]])
        return dlogits, mx.zeros_like(bias)

    del f_vjp
    return f


def moe_route(logits: mx.array, bias: mx.array, top_k: int, n_group: int, topk_group: int,
              norm_topk_prob: bool, routed_scaling_factor: float):
    """DeepSeek-V3 router (``noaux_tc``), as `reference.moe.Router` after its linear layer.

    ``logits`` (N, E) float (``x @ W^T``), ``bias`` (E,) float32 (``e_score_correction_bias``). Returns
    ``topk_idx`` (N, K) int32, sorted by descending biased score (ties to the lower expert id; a NaN score ranks
    above every number, as in ``torch.topk``, so a NaN logit's expert is picked and its NaN weight shows),
    ``topk_weight`` (N, K) float32 and ``scores`` (N, E) float32 = sigmoid(logits).
    Selection ranks ``scores + bias``: a group's score is the sum of its top-2 biased scores; groups outside
    the top ``topk_group`` are excluded; then the top-K experts. Weights are the unbiased scores of those
    experts, divided by their sum when ``norm_topk_prob``, times ``routed_scaling_factor``. Gradients flow
    from ``topk_weight`` and ``scores`` into ``logits``; ``bias`` gets none (it is updated outside autograd).
    Raises ValueError if E is not divisible by ``n_group`` or K / topk_group are out of range.
    Source: DeepSeek-V3 report section 2.1.2 (eq. 12-16).
    """
    _check_float("logits", logits)
    if logits.ndim != 2:
        raise ValueError(f"logits: expected (N, E), got {tuple(logits.shape)}")
    e = logits.shape[1]
    _check_shape("bias", bias, (e,))
    if n_group < 1 or e % n_group or not 1 <= topk_group <= n_group or not 1 <= top_k <= e:
        raise ValueError(f"bad routing sizes: E={e}, n_group={n_group}, topk_group={topk_group}, top_k={top_k}")
    if n_group > 1 and e // n_group < 2:
        raise ValueError(f"group-limited routing needs at least 2 experts per group, got E={e}, n_group={n_group}")
    if top_k > topk_group * (e // n_group):
        raise ValueError(f"top_k={top_k} exceeds the {topk_group * (e // n_group)} experts of the kept groups")
    args = (top_k, n_group, topk_group, bool(norm_topk_prob), float(routed_scaling_factor))
    if _use_metal("moe_route"):
        return _moe_route_custom(*args)(logits, bias)
    return moe_route_mlx(logits, bias, *args)


# ---------------------------------------------------------------------------------------------------------------
# mla_decode
# ---------------------------------------------------------------------------------------------------------------


def mla_decode_mlx(q_latent, q_pe, c_kv, k_pe, scale):
    """Pure MLX `mla_decode` (same contract)."""
    b, h, t, r = q_latent.shape
    s = c_kv.shape[1]
    ckv, kpe = _f32(c_kv)[:, None], _f32(k_pe)[:, None]
    logits = (_f32(q_latent) @ ckv.swapaxes(-1, -2) + _f32(q_pe) @ kpe.swapaxes(-1, -2)) * scale
    visible = mx.arange(s)[None, :] <= (mx.arange(t)[:, None] + (s - t))
    p = mx.softmax(mx.where(visible, logits, -mx.inf), axis=-1, precise=True)
    return (p @ ckv).astype(q_latent.dtype)


_MLA_TG = 128


def mla_decode_launch(q_latent, q_pe, c_kv, k_pe, scale) -> Launch:
    """One threadgroup of 128 threads (4 simdgroups) per query (b, h, t): grid (B*H*T*128, 1, 1). Each simdgroup
    takes every 4th key with an online softmax, lanes splitting the R latent features; the 4 partial results
    are merged through threadgroup memory (4*R + 8 floats). Output (B, H, T, R) in q_latent's dtype."""
    b, h, t, r = q_latent.shape
    s, dr = c_kv.shape[1], k_pe.shape[-1]
    return Launch(SPECS["mla_decode"], [q_latent, q_pe, c_kv, k_pe, _scalar(scale)],
                  [("T", q_latent.dtype), ("KT", c_kv.dtype), ("H", h), ("TQ", t), ("S", s), ("R", r), ("DR", dr),
                   ("NSG", _MLA_TG // 32)],
                  (b * h * t * _MLA_TG, 1, 1), (_MLA_TG, 1, 1), [(b, h, t, r)], [q_latent.dtype])


def _mla_decode_metal(q_latent, q_pe, c_kv, k_pe, scale, runner=None):
    (o,) = _run(runner, mla_decode_launch(q_latent, q_pe, c_kv, k_pe, scale))
    return o


def mla_decode(q_latent: mx.array, q_pe: mx.array, c_kv: mx.array, k_pe: mx.array, scale: float) -> mx.array:
    """Absorbed MLA attention over the latent cache (decode), as `reference.mla.MLA.attend_absorbed` before W_UV.

    ``q_latent`` (B, H, T, R) (``q_nope W_UK``), ``q_pe`` (B, H, T, DR) (rotated), ``c_kv`` (B, S, R) (normalized
    latents, also the values), ``k_pe`` (B, S, DR) (rotated, one head shared by all). Query t sees keys
    ``s <= S - T + t`` (causal, aligned to the end of the cache; S >= T). Returns
    ``o_latent = softmax((q_latent c_kv^T + q_pe k_pe^T) * scale) c_kv`` (B, H, T, R) in q_latent's dtype, softmax
    in float32. Forward only (decode). Raises ValueError on mismatched shapes or S < T.
    Source: DeepSeek-V3 report section 2.1.1 (eq. 1-11), "absorb" in DeepSeek's inference code.
    """
    for name, a in (("q_latent", q_latent), ("q_pe", q_pe), ("c_kv", c_kv), ("k_pe", k_pe)):
        _check_float(name, a)
    if q_latent.ndim != 4:
        raise ValueError(f"q_latent: expected (B, H, T, R), got {tuple(q_latent.shape)}")
    b, h, t, r = q_latent.shape
    _check_shape("c_kv", c_kv, (b, None, r))
    s = c_kv.shape[1]
    _check_shape("q_pe", q_pe, (b, h, t, None))
    _check_shape("k_pe", k_pe, (b, s, q_pe.shape[-1]))
    if s < t:
        raise ValueError(f"the cache must hold at least the T={t} new tokens, got S={s}")
    if _use_metal("mla_decode"):
        return _mla_decode_metal(q_latent, q_pe, c_kv, k_pe, scale)
    return mla_decode_mlx(q_latent, q_pe, c_kv, k_pe, scale)


# ---------------------------------------------------------------------------------------------------------------
# DSA lightning indexer
# ---------------------------------------------------------------------------------------------------------------


def indexer_scores_mlx(q, k, w, scale):
    """Pure MLX `indexer_scores` (same contract)."""
    logits = mx.maximum(_f32(q) @ _f32(k)[:, None].swapaxes(-1, -2) * scale, 0.0)  # (B, H, T, S)
    return (logits * _f32(w).transpose(0, 2, 1)[..., None]).sum(1)


def _visible(t: int, s: int) -> mx.array:
    """(T, S) causal mask aligned to the end: key s visible to query t iff s <= S - T + t."""
    return mx.arange(s)[None, :] <= (mx.arange(t)[:, None] + (s - t))


def indexer_topk_mlx(scores, topk):
    """Pure MLX top-k selection over ``scores`` (B, T, S): see `indexer_topk`."""
    _, t, s = scores.shape
    kk = min(topk, s)
    scores = mx.where(mx.isnan(scores), mx.inf, scores)  # a NaN ranks first, as in torch.sort
    masked = mx.where(_visible(t, s), scores, -mx.inf)
    idx = mx.argsort(-masked, axis=-1)[..., :kk].astype(mx.int32)  # stable: ties go to the earlier key
    n_visible = mx.clip(mx.arange(t) + (s - t) + 1, 0, s)
    return mx.where(mx.arange(kk)[None, :] < n_visible[:, None], idx, -1)


_IDX_TG = 128


def indexer_scores_launch(q, k, w, scale) -> Launch:
    """One thread per score (b, t, s): grid (B*T*S rounded up to 128, 1, 1), threadgroup (128, 1, 1); each thread
    reduces H heads of D features. Output (B, T, S) float32."""
    b, h, t, d = q.shape
    s = k.shape[1]
    n = b * t * s
    return Launch(SPECS["indexer_scores"], [q, k, w, _scalar(scale)],
                  [("T", q.dtype), ("KT", k.dtype), ("WT", w.dtype), ("H", h), ("TQ", t), ("S", s), ("D", d),
                   ("B", b)],
                  (_IDX_TG * _cdiv(n, _IDX_TG), 1, 1), (_IDX_TG, 1, 1), [(b, t, s)], [mx.float32])


def indexer_topk_launch(scores, topk) -> Launch:
    """One threadgroup of 128 threads per query row (b, t): grid (B*T*128, 1, 1). Each thread ranks its keys
    against all visible keys, streamed through a 128-float threadgroup tile; a key of rank < K writes its id
    to slot rank: O(S^2) comparisons per query, S^2 / 128 per thread. Fine for short contexts; not for long
    ones, decode included: a decode step has only B*T threadgroups, so at S = 32K each thread makes about 8M
    comparisons while the rest of the GPU idles. Output (B, T, min(topk, S)) int32."""
    b, t, s = scores.shape
    kk = min(topk, s)
    return Launch(SPECS["indexer_topk"], [scores], [("TQ", t), ("S", s), ("K", kk), ("TILE", _IDX_TG)],
                  (b * t * _IDX_TG, 1, 1), (_IDX_TG, 1, 1), [(b, t, kk)], [mx.int32])


def _indexer_scores_metal(q, k, w, scale, runner=None):
    (out,) = _run(runner, indexer_scores_launch(q, k, w, scale))
    return out


def _indexer_topk_metal(scores, topk, runner=None):
    (idx,) = _run(runner, indexer_topk_launch(scores, topk))
    return idx


def _check_indexer(q, k, w):
    for name, a in (("q", q), ("k", k), ("w", w)):
        _check_float(name, a)
    if q.ndim != 4:
        raise ValueError(f"q: expected (B, H, T, D), got {tuple(q.shape)}")
    b, h, t, d = q.shape
    _check_shape("k", k, (b, None, d))
    _check_shape("w", w, (b, t, h))
    if k.shape[1] < t:
        raise ValueError(f"k must hold at least the T={t} new tokens, got S={k.shape[1]}")


def indexer_scores(q: mx.array, k: mx.array, w: mx.array, scale: float) -> mx.array:
    """Lightning-indexer scores, as `reference.dsa.Indexer.scores` after its projections.

    ``q`` (B, H, T, D) (rotated queries), ``k`` (B, S, D) (one shared key head), ``w`` (B, T, H) (head weights,
    ``weights_proj(x) * H**-0.5``). Returns ``I[b, t, s] = sum_h w[b,t,h] relu(scale * q[b,h,t] . k[b,s])``
    (B, T, S) float32, unmasked. Forward only (the indexer's top-k is not differentiable).
    Raises ValueError on mismatched shapes. Source: DeepSeek-V3.2-Exp report eq. 1.
    """
    _check_indexer(q, k, w)
    if _use_metal("indexer_scores"):
        return _indexer_scores_metal(q, k, w, scale)
    return indexer_scores_mlx(q, k, w, scale)


def indexer_topk(q: mx.array, k: mx.array, w: mx.array, scale: float, topk: int) -> mx.array:
    """The indexer's causal top-k key set per query, as `reference.dsa.Indexer.select` (as indices).

    Shapes as `indexer_scores`. Returns ``idx`` (B, T, K) int32 with K = min(topk, S): the visible keys
    (``s <= S - T + t``) of largest score, in descending score order, exact ties to the earlier key (a NaN score
    ranks first, as in ``torch.sort``); a query with fewer than K visible keys keeps all of them and pads with -1.
    `indexer_mask` turns it into the boolean (B, T, S) selection. Raises ValueError on bad shapes or topk < 1.
    Source: DeepSeek-V3.2-Exp report sec. 2.1.
    """
    _check_indexer(q, k, w)
    if topk < 1:
        raise ValueError(f"topk must be >= 1, got {topk}")
    if _use_metal("indexer_topk"):
        return _indexer_topk_metal(_indexer_scores_metal(q, k, w, scale), topk)
    return indexer_topk_mlx(indexer_scores_mlx(q, k, w, scale), topk)


def indexer_mask(idx: mx.array, s: int) -> mx.array:
    """Boolean (B, T, S) selection from `indexer_topk` indices (B, T, K) (-1 = no key)."""
    b, t, kk = idx.shape
    slot = mx.where(idx < 0, s, idx)  # -1 goes to a spare column, dropped below
    sel = mx.put_along_axis(mx.zeros((b, t, s + 1), mx.bool_), slot, mx.array(True), axis=-1)
    return sel[..., :s]


# ---------------------------------------------------------------------------------------------------------------
# FP8
# ---------------------------------------------------------------------------------------------------------------


def act_quant_mlx(x, block_size=128):
    """Pure MLX `act_quant` (same contract)."""
    k = x.shape[-1]
    kb = _cdiv(k, block_size)
    lead = x.shape[:-1]
    xp = mx.pad(_f32(x), [(0, 0)] * (x.ndim - 1) + [(0, kb * block_size - k)]).reshape(*lead, kb, block_size)
    s = mx.maximum(mx.abs(xp).max(axis=-1), AMAX_MIN) / FP8_MAX
    v = xp / s[..., None]
    y = mx.where(mx.isnan(v), mx.array(0x7F, mx.uint8), mx.to_fp8(mx.clip(v, -FP8_MAX, FP8_MAX)))  # to_fp8(NaN) = 448
    y = y.reshape(*lead, kb * block_size)
    return y[..., :k], s


def weight_dequant_mlx(w, scale_inv, block_size=128, dtype=mx.float32):
    """Pure MLX `weight_dequant` (same contract)."""
    n, k = w.shape
    s = mx.repeat(mx.repeat(scale_inv, block_size, axis=0)[:n], block_size, axis=1)[:, :k]
    return (mx.from_fp8(w, dtype=mx.float32) * s).astype(dtype)


def act_quant_launch(x2, block_size) -> Launch:
    """One simdgroup (32 lanes) per 1 x block_size tile, 8 tiles per threadgroup: grid (32 * N * KB rounded up to
    256, 1, 1), threadgroup (256, 1, 1). Outputs ``y`` (N, K) uint8 e4m3 bits, ``s`` (N, KB) float32."""
    n, k = x2.shape
    kb = _cdiv(k, block_size)
    threads = 32 * n * kb
    return Launch(SPECS["act_quant"], [x2], [("T", x2.dtype), ("K", k), ("BS", block_size), ("NT", n * kb)],
                  (256 * _cdiv(threads, 256), 1, 1), (256, 1, 1), [(n, k), (n, kb)], [mx.uint8, mx.float32])


def weight_dequant_launch(w, scale_inv, block_size, dtype) -> Launch:
    """One thread per element: grid (K rounded up to 32, N, 1), threadgroup (32, 8, 1). Output (N, K) ``dtype``."""
    n, k = w.shape
    return Launch(SPECS["weight_dequant"], [w, scale_inv],
                  [("O", dtype), ("N", n), ("K", k), ("BS", block_size)],
                  (32 * _cdiv(k, 32), n, 1), (32, 8, 1), [(n, k)], [dtype])


def _act_quant_metal(x, block_size=128, runner=None):
    k = x.shape[-1]
    y, s = _run(runner, act_quant_launch(x.reshape(-1, k), block_size))
    return y.reshape(x.shape), s.reshape(*x.shape[:-1], s.shape[-1])


def _weight_dequant_metal(w, scale_inv, block_size=128, dtype=mx.float32, runner=None):
    (out,) = _run(runner, weight_dequant_launch(w, scale_inv, block_size, dtype))
    return out


def act_quant(x: mx.array, block_size: int = 128):
    """Quantize activations to FP8 e4m3 per 1 x ``block_size`` tile of the last dimension, as
    `reference.fp8.act_quant`.

    ``x`` (..., K) float (computed in float32; K need not be a multiple of the block). Returns ``(y, s)``:
    ``y`` (..., K) uint8, the e4m3fn bit patterns of ``clamp(x / s, +-448)`` rounded to nearest even;
    ``s`` (..., ceil(K / block_size)) float32 = max(amax_tile, 1e-4) / 448. A NaN makes its tile's scale and values
    NaN (e4m3 NaN is 0x7F), as the reference. Raises TypeError on a non-float x,
    ValueError on rank 0, K = 0 or a bad block_size. Source: DeepSeek-V3 report section 3.3.
    """
    _check_float("x", x)
    if not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if x.ndim < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must have shape (..., K) with K >= 1, got {tuple(x.shape)}")
    if _use_metal("act_quant"):
        return _act_quant_metal(x, block_size)
    return act_quant_mlx(x, block_size)


def weight_dequant(w: mx.array, scale_inv: mx.array, block_size: int = 128, dtype=mx.float32) -> mx.array:
    """Dequantize block-scaled FP8 weights, as `reference.fp8.weight_dequant`:
    ``out[n, k] = e4m3(w[n, k]) * scale_inv[n // bs, k // bs]``.

    ``w`` (N, K) uint8 e4m3fn bits; ``scale_inv`` (ceil(N / bs), ceil(K / bs)) float32 (edge blocks may be
    partial). Returns (N, K) in ``dtype`` (computed in float32). Raises TypeError on wrong dtypes, ValueError on
    a wrong rank or scale_inv shape. Source: DeepSeek-V3 inference/kernel.py ``weight_dequant``; report sec. 3.3.
    """
    if not isinstance(w, mx.array) or w.dtype != mx.uint8:
        raise TypeError(f"w: expected a uint8 mx.array of e4m3 bits, got {getattr(w, 'dtype', type(w).__name__)}")
    if not isinstance(scale_inv, mx.array) or scale_inv.dtype != mx.float32:
        raise TypeError(f"scale_inv: expected a float32 mx.array, got {getattr(scale_inv, 'dtype', None)}")
    if not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if w.ndim != 2:
        raise ValueError(f"w: expected (N, K), got {tuple(w.shape)}")
    n, k = w.shape
    _check_shape("scale_inv", scale_inv, (_cdiv(n, block_size), _cdiv(k, block_size)))
    if _use_metal("weight_dequant"):
        return _weight_dequant_metal(w, scale_inv, block_size, dtype)
    return weight_dequant_mlx(w, scale_inv, block_size, dtype)


# ---------------------------------------------------------------------------------------------------------------
# cross_entropy
# ---------------------------------------------------------------------------------------------------------------


def cross_entropy_mlx(logits, targets, ignore_index=-100):
    """Pure MLX `cross_entropy` (same contract)."""
    lf = _f32(logits)
    lse = mx.logsumexp(lf, axis=-1)
    valid = targets != ignore_index
    picked = mx.take_along_axis(lf, mx.where(valid, targets, 0)[:, None].astype(mx.int32), axis=-1)[:, 0]
    return mx.where(valid, lse - picked, 0.0)


_CE_TG = 256


def cross_entropy_launch(logits, targets, ignore_index) -> Launch:
    """Forward: one threadgroup of TG (32..256) threads per row, grid (N*TG, 1, 1); a strided online logsumexp,
    merged by simd and threadgroup reductions. Outputs ``loss`` (N,) and ``lse`` (N,) float32."""
    n, v = logits.shape
    tg = _tg_size(v, _CE_TG)
    return Launch(SPECS["cross_entropy_fwd"], [logits, targets, mx.array(int(ignore_index), dtype=mx.int32)],
                  [("T", logits.dtype), ("V", v), ("TG", tg)],
                  (n * tg, 1, 1), (tg, 1, 1), [(n,), (n,)], [mx.float32, mx.float32])


def cross_entropy_bwd_launch(logits, targets, g, ignore_index) -> Launch:
    """Backward: ``dlogits[n, v] = g[n] * (exp(logits[n, v] - lse[n]) - [v == target[n]])``, 0 on ignored rows,
    with each row's logsumexp recomputed in the kernel (fused: one read for lse, one read + write for dlogits).
    One threadgroup of TG (32..256) threads per row, grid (N*TG, 1, 1). Output (N, V) in logits' dtype."""
    n, v = logits.shape
    tg = _tg_size(v, _CE_TG)
    return Launch(SPECS["cross_entropy_bwd"], [logits, targets, g, mx.array(int(ignore_index), dtype=mx.int32)],
                  [("T", logits.dtype), ("G", g.dtype), ("V", v), ("TG", tg)],
                  (n * tg, 1, 1), (tg, 1, 1), [(n, v)], [logits.dtype])


def _cross_entropy_metal(logits, targets, ignore_index=-100, runner=None):
    """Returns (loss (N,), lse (N,))."""
    return tuple(_run(runner, cross_entropy_launch(logits, targets, ignore_index)))


def _cross_entropy_metal_bwd(logits, targets, g, ignore_index=-100, runner=None):
    (dlogits,) = _run(runner, cross_entropy_bwd_launch(logits, targets, g, ignore_index))
    return dlogits


@cache
def _cross_entropy_custom(ignore_index: int):
    @mx.custom_function
    def f(logits, targets):
        return _cross_entropy_metal(logits, targets, ignore_index)[0]

    @f.vjp
    def f_vjp(primals, cotangent, output):
        logits, targets = primals
        return _cross_entropy_metal_bwd(logits, targets, cotangent, ignore_index), mx.zeros_like(targets)

    del f_vjp
    return f


def cross_entropy(logits: mx.array, targets: mx.array, ignore_index: int = -100) -> mx.array:
    """Per-token cross-entropy over a chunk of logits (fused logsumexp + loss; the VJP kernel gives dlogits).

    ``logits`` (N, V) float, ``targets`` (N,) int32/int64 class ids or ``ignore_index``. Returns per-token losses
    (N,) float32, ``logsumexp(logits[n]) - logits[n, targets[n]]``, and 0 where ``targets == ignore_index``: the
    caller sums and divides by its own count of valid tokens (as MTP needs, DESIGN.md). Equal to
    ``torch.nn.functional.cross_entropy(..., reduction="none", ignore_index=ignore_index)``. Differentiable in
    ``logits``. Raises TypeError/ValueError on bad dtypes or shapes.
    """
    _check_float("logits", logits)
    if logits.ndim != 2:
        raise ValueError(f"logits: expected (N, V), got {tuple(logits.shape)}")
    if not isinstance(targets, mx.array) or targets.dtype not in (mx.int32, mx.int64):
        raise TypeError(f"targets: expected an int32/int64 mx.array, got {getattr(targets, 'dtype', None)}")
    _check_shape("targets", targets, (logits.shape[0],))
    if _use_metal("cross_entropy"):
        return _cross_entropy_custom(int(ignore_index))(logits, targets.astype(mx.int32))
    return cross_entropy_mlx(logits, targets, ignore_index)

