"""FP8 checkpoints as DeepSeek ships them, and inference that keeps their weights in FP8.

DeepSeek-V3's released checkpoint (and V3.1's, V3.2's) stores the matrices of the attention projections and of
every FFN (dense, shared and routed experts; V3.2 also the lightning indexer's ``wq_b`` and ``wk``) as
``float8_e4m3fn`` ``weight`` with a float32 ``weight_scale_inv`` per 128 x 128 block (edge blocks partial), and
everything else (embeddings, norms, the head, the router and its ``e_score_correction_bias``, MTP's ``eh_proj``,
the indexer's ``weights_proj`` and ``k_norm``) unquantized; its ``config.json`` says so in ``quantization_config``
(`reference.config.fp8_quantization_config`; V3.1 adds ``"scale_fmt": "ue8m0"``, power-of-two scales).
Source: DeepSeek-V3 report (arXiv 2412.19437) section 3.3; the official ``inference/`` code (``kernel.py``,
``model.py``'s ``linear``: ``fp8_gemm(act_quant(x), weight, weight.scale)``).

- `fp8_weight_name`, `quantize_tensors`: which Hugging Face tensors that layout quantizes, and quantizing them
  (`reference.fp8.weight_quant`), for ``dsfs export --fp8``.
- `FP8WeightLinear`, `FP8WeightExperts`: inference modules holding the FP8 weights and their scales (half the bytes
  of bf16), whose forward is the block-scaled GEMM on FP8 activations (1 x 128 tiles quantized at run time, as
  ``activation_scheme: dynamic``): ``fp8_gemm(act_quant(x), weight, weight_scale_inv)`` and, for the routed
  experts, ``fp8_grouped_gemm``. ``ops`` (a module or namespace with ``act_quant``, ``fp8_gemm``,
  ``fp8_grouped_gemm`` of `reference.fp8`'s signatures) picks the implementation: `reference.fp8` by default,
  ``kernels.triton.fp8`` for ``runtime_cuda``.
- `keep_fp8_state_dict`: the conversion behind ``Model.from_pretrained(path, keep_fp8=True)``: the model's
  ``nn.Linear`` / ``Experts`` modules whose weights the checkpoint stores in FP8 become `FP8WeightLinear` /
  `FP8WeightExperts`, loaded with the stored bytes as they are.
- `linear_weight`: the dense (N, K) matrix of either kind of linear module, for the code that reads a weight
  directly: MLA's absorbed decode folds ``kv_b_proj``'s matrix into the query and output, dequantized as DeepSeek's
  ``inference/model.py`` does (``weight_dequant(wkv_b.weight, wkv_b.scale)``).

A keep_fp8 model is for inference only: its FP8 modules raise in training mode. Dtype casts of the model
(``model.to(torch.bfloat16)``) leave the FP8 weights in e4m3 and their scales in float32; device moves move them.
"""

from __future__ import annotations

import re
import types

import torch
from torch import nn

from . import fp8 as reference_fp8
from .fp8 import FP8_DTYPE, weight_dequant, weight_quant
from .fp8_training import ATTENTION_LINEARS, FFN_LINEARS

BLOCK = 128  # DeepSeek's weight_block_size [128, 128] and activation tile 1 x 128
SCALE_SUFFIX = "_scale_inv"

_FP8_WEIGHT = re.compile(  # the layers FP8 training runs in FP8 (`reference.fp8_training`), by checkpoint name
    rf"(^|\.)(self_attn\.(indexer\.)?({'|'.join(ATTENTION_LINEARS)})"
    rf"|mlp\.(shared_experts\.|experts\.\d+\.)?({'|'.join(FFN_LINEARS)}))\.weight$")
_EXPERT_PROJS = FFN_LINEARS
TRAINING_ERROR = ("{}: a model loaded with keep_fp8=True runs inference only (training FP8 weights is not "
                  "supported); load the checkpoint without keep_fp8 to train it (its weights are then dequantized)")


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def fp8_weight_name(name: str) -> bool:
    """Whether the Hugging Face tensor ``name`` is one DeepSeek's FP8 checkpoints store in FP8: the ``weight`` of an
    attention projection (``q_proj``, ``q_a_proj``, ``q_b_proj``, ``kv_a_proj_with_mqa``, ``kv_b_proj``, ``o_proj``;
    also ``k_proj``/``v_proj`` of our MHA/GQA variants), of V3.2's indexer ``wq_b``/``wk``, or of a dense, shared or
    routed expert's ``gate_proj``/``up_proj``/``down_proj``, in any decoder or MTP layer. Not the embeddings, norms,
    ``lm_head``, the router (``mlp.gate``), ``eh_proj``, ``shared_head``, the indexer's ``weights_proj``/``k_norm``
    or any bias."""
    return bool(_FP8_WEIGHT.search(name))


def quantize_tensors(tensors: dict[str, torch.Tensor], scale_fmt: str | None = None,
                     block_size: int = BLOCK) -> dict[str, torch.Tensor]:
    """Hugging Face tensors -> the same with every `fp8_weight_name` matrix ``<w>`` replaced by ``<w>`` float8_e4m3fn
    and ``<w>_scale_inv`` float32 (cdiv(N, 128), cdiv(K, 128)) block scales (`reference.fp8.weight_quant`, computed in
    float32; ``scale_fmt`` None: amax / 448, 'ue8m0': rounded up to powers of two); the other tensors are returned
    as they are. Raises ``ValueError`` for a bad ``scale_fmt`` or a matched tensor that is not 2-D, ``TypeError``
    for one that is not floating (or is FP8 already)."""
    out = {}
    for name, t in tensors.items():
        if fp8_weight_name(name):
            out[name], out[name + SCALE_SUFFIX] = weight_quant(t, block_size, scale_fmt)
        else:
            out[name] = t
    return out


def _train_guard(module: nn.Module, mode: bool) -> None:
    if mode:
        raise RuntimeError(TRAINING_ERROR.format(type(module).__name__))


class _FP8Buffers(nn.Module):
    """Keeps the FP8 buffers (``FP8_BUFFERS``) in e4m3 and their scales in float32 under dtype casts of the model
    (``model.to(torch.bfloat16)``, ``.half()``); device moves apply to them. Training mode raises."""

    FP8_BUFFERS: tuple[str, ...] = ()

    def _apply(self, fn, recurse=True):
        kept = {k: self._buffers.pop(k) for k in self.FP8_BUFFERS}
        try:
            super()._apply(fn, recurse)
        finally:
            for k, t in kept.items():  # to the device fn sends t's device to; fn's dtype cast is not applied
                self._buffers[k] = t.to(fn(torch.zeros((), device=t.device)).device)
        return self

    def train(self, mode: bool = True):
        _train_guard(self, mode)
        return super().train(mode)


class FP8WeightLinear(_FP8Buffers):
    """``y = x W^T (+ b)`` with W stored in FP8: buffers ``weight`` (N, K) float8_e4m3fn and ``weight_scale_inv``
    (cdiv(N, 128), cdiv(K, 128)) float32 (the checkpoint's tensors), ``bias`` (N,) or None.

    ``forward(x)``: x (..., K) float -> (..., N) in x's dtype: ``ops.fp8_gemm(*ops.act_quant(x, 128, scale_fmt),
    weight, weight_scale_inv)``, the activations quantized per 1 x 128 tile with the checkpoint's ``scale_fmt``
    (DeepSeek's ``linear`` in ``inference/model.py``). Raises ``RuntimeError`` in training mode.
    Source: DeepSeek-V3 report section 3.3.
    """

    FP8_BUFFERS = ("weight", "weight_scale_inv")

    def __init__(self, in_features: int, out_features: int, bias: bool = False, scale_fmt: str | None = None,
                 ops=None, block_size: int = BLOCK):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.block_size, self.scale_fmt = block_size, scale_fmt
        self.ops = reference_fp8 if ops is None else ops
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=FP8_DTYPE))
        nb, kb = _cdiv(out_features, block_size), _cdiv(in_features, block_size)
        self.register_buffer("weight_scale_inv", torch.ones(nb, kb, dtype=torch.float32))
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self.training = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            _train_guard(self, True)
        kw = {} if self.scale_fmt is None else {"scale_fmt": self.scale_fmt}
        x2 = x.reshape(-1, self.in_features)
        a, a_s = self.ops.act_quant(x2, self.block_size, **kw)
        y = self.ops.fp8_gemm(a, a_s, self.weight, self.weight_scale_inv, self.block_size, out_dtype=x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def dense_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dequantized (N, K) matrix in ``dtype`` (`reference.fp8.weight_dequant`)."""
        return weight_dequant(self.weight, self.weight_scale_inv, self.block_size, dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"fp8 e4m3, {self.block_size}x{self.block_size} blocks, scale_fmt={self.scale_fmt}")


class FP8WeightExperts(_FP8Buffers):
    """`reference.moe.Experts` with FP8 weights: buffers ``gate_proj``, ``up_proj`` (E, I, H) and ``down_proj``
    (E, H, I) float8_e4m3fn, each with ``<name>_scale_inv`` (E, cdiv(rows, 128), cdiv(cols, 128)) float32 block
    scales (the checkpoint's per-expert tensors, stacked).

    ``forward(x, topk_idx, topk_weight)``: as `reference.moe.Experts` (token copies sorted by expert, results
    weighted and added back), each projection a grouped FP8 GEMM ``ops.fp8_grouped_gemm`` on activations quantized
    per 1 x 128 tile; SwiGLU in x's dtype between them. Returns (N, H) in x's dtype. Raises ``RuntimeError`` in
    training mode.
    """

    FP8_BUFFERS = tuple(p + s for p in _EXPERT_PROJS for s in ("", SCALE_SUFFIX))

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, scale_fmt: str | None = None,
                 ops=None, block_size: int = BLOCK):
        super().__init__()
        self.num_experts, self.block_size, self.scale_fmt = num_experts, block_size, scale_fmt
        self.ops = reference_fp8 if ops is None else ops
        e, h, i = num_experts, hidden_size, intermediate_size
        for name, (n, k) in zip(_EXPERT_PROJS, ((i, h), (i, h), (h, i)), strict=True):
            self.register_buffer(name, torch.zeros(e, n, k, dtype=FP8_DTYPE))
            self.register_buffer(name + SCALE_SUFFIX,
                                 torch.ones(e, _cdiv(n, block_size), _cdiv(k, block_size), dtype=torch.float32))
        self.training = False

    def _gemm(self, xs: torch.Tensor, name: str, offsets: torch.Tensor) -> torch.Tensor:
        kw = {} if self.scale_fmt is None else {"scale_fmt": self.scale_fmt}
        a, a_s = self.ops.act_quant(xs, self.block_size, **kw)
        return self.ops.fp8_grouped_gemm(a, a_s, getattr(self, name), getattr(self, name + SCALE_SUFFIX), offsets,
                                         self.block_size, out_dtype=xs.dtype)

    def forward(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor) -> torch.Tensor:
        from .moe import expert_counts
        from .swiglu import swiglu

        if self.training:
            _train_guard(self, True)
        n, k = topk_idx.shape
        flat = topk_idx.reshape(-1)
        order = torch.argsort(flat, stable=True)
        token = order // k
        counts = expert_counts(flat, self.num_experts)
        offsets = torch.cat((counts.new_zeros(1), counts.cumsum(0)))
        xs = x.index_select(0, token)
        h = swiglu(self._gemm(xs, "gate_proj", offsets), self._gemm(xs, "up_proj", offsets))
        ys = self._gemm(h, "down_proj", offsets) * topk_weight.reshape(-1)[order, None].to(x.dtype)
        return x.new_zeros(n, x.shape[1]).index_add(0, token, ys)

    def extra_repr(self) -> str:
        e, i, h = self.gate_proj.shape
        return f"num_experts={e}, hidden={h}, intermediate={i}, fp8 e4m3, scale_fmt={self.scale_fmt}"


def linear_weight(linear: nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The (N, K) matrix of a linear module: an ``nn.Linear``'s ``weight`` itself (``dtype`` unused), or an
    `FP8WeightLinear`'s dequantized in ``dtype``."""
    if isinstance(linear, FP8WeightLinear):
        return linear.dense_weight(dtype)
    return linear.weight


def check_fp8_checkpoint(names) -> None:
    """Raise ``ValueError`` unless Hugging Face tensor ``names`` hold FP8 block-quantized weights (a
    ``*.weight_scale_inv``): keep_fp8 needs an FP8 checkpoint."""
    if not any(n.endswith("weight" + SCALE_SUFFIX) for n in names):
        raise ValueError("keep_fp8 needs an FP8 checkpoint and this one holds no FP8 weights (no *.weight_scale_inv "
                         "tensors); load it without keep_fp8, or write an FP8 copy first with 'dsfs export --fp8'")


def default_ops(cls: type, device=None):
    """The FP8 ops a model class runs a keep_fp8 checkpoint with on ``device`` (default: CPU):
    `reference.fp8_training.fp8_ops_for` (``runtime_cuda.Model``: the Triton kernels where FP8 tensor cores or the
    interpreter run them, else `reference.fp8`)."""
    from .fp8_training import fp8_ops_for

    return fp8_ops_for(cls, device or "cpu")


def check_ops(ops) -> object:
    """``ops`` (None: `reference.fp8`) after checking it has ``act_quant``, ``fp8_gemm`` and ``fp8_grouped_gemm``;
    raises ``TypeError`` naming the missing ones."""
    ops = reference_fp8 if ops is None else ops
    missing = [f for f in ("act_quant", "fp8_gemm", "fp8_grouped_gemm") if not callable(getattr(ops, f, None))]
    if missing:
        raise TypeError(f"keep_fp8: ops {getattr(ops, '__name__', ops)!r} lacks {missing}")
    return ops


class FP8Pair(types.SimpleNamespace):
    """An FP8 ``weight`` and its ``scale_inv`` block scales (arrays of any library) under one of our names;
    ``shape`` is the weight's."""

    @property
    def shape(self):
        return self.weight.shape


def fp8_pairs_from_hf(weights: dict, cfg, stack) -> dict:
    """`reference.checkpoint.from_hf_names` keeping FP8 weights: Hugging Face names -> our names, where each FP8
    ``<w>`` + ``<w>_scale_inv`` becomes an `FP8Pair` (stacked experts: a pair of (E, ...) stacks, both made with
    ``stack``) and every other array is mapped as `from_hf_names` maps it. Raises ``ValueError`` for a projection
    whose experts are stored partly in FP8, and from `from_hf_names`."""
    from .checkpoint import from_hf_names

    def stack_any(items):
        pairs = [isinstance(a, FP8Pair) for a in items]
        if not any(pairs):
            return stack(items)
        if not all(pairs):
            raise ValueError("keep_fp8: the experts of one projection are stored partly in FP8, partly not")
        return FP8Pair(weight=stack([a.weight for a in items]), scale_inv=stack([a.scale_inv for a in items]))

    return from_hf_names(weights, cfg, stack_any, lambda w, s: FP8Pair(weight=w, scale_inv=s))


def _dequant(p: FP8Pair) -> torch.Tensor:
    if p.weight.ndim == 3:
        return torch.stack([weight_dequant(w, s) for w, s in zip(p.weight, p.scale_inv, strict=True)])
    return weight_dequant(p.weight, p.scale_inv)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def keep_fp8_state_dict(model: nn.Module, hf: dict[str, torch.Tensor], scale_fmt: str | None = None,
                        ops=None) -> dict[str, torch.Tensor]:
    """Switch ``model``'s modules whose weights the Hugging Face tensors ``hf`` store in FP8 to FP8 modules, and
    return the state dict to load (our names; `reference.checkpoint.from_hf_names` mapping).

    An ``nn.Linear`` whose ``weight`` comes with a ``weight_scale_inv`` becomes an `FP8WeightLinear` (its bias kept); an
    ``Experts`` whose three stacked projections all do becomes an `FP8WeightExperts`; the returned dict then holds the
    FP8 tensors and their scales (``...kv_b_proj.weight``, ``...kv_b_proj.weight_scale_inv``,
    ``...experts.gate_proj``, ``...experts.gate_proj_scale_inv``) as stored. An FP8 tensor of any other parameter is
    dequantized (float32). ``scale_fmt``: the checkpoint's (`reference.config.fp8_scale_fmt`), used to quantize the
    activations; ``ops``: the FP8 ops (`check_ops`). Raises ``ValueError`` when ``hf`` holds no FP8 weight, from
    `reference.checkpoint.from_hf_names`, ``TypeError`` from `check_ops`.
    """
    from .moe import Experts

    check_fp8_checkpoint(hf)
    ops = check_ops(ops)
    sd = fp8_pairs_from_hf({k: v.float() if k.endswith(SCALE_SUFFIX) else v for k, v in hf.items()}, model.config,
                           torch.stack)
    modules = dict(model.named_modules())
    out, experts = {}, {}
    for name, v in sd.items():
        owner, _, leaf = name.rpartition(".")
        mod = modules.get(owner)
        if isinstance(v, FP8Pair) and isinstance(mod, nn.Linear) and leaf == "weight":
            _replace(model, owner, FP8WeightLinear(mod.in_features, mod.out_features, mod.bias is not None, scale_fmt,
                                                   ops))
            out[name], out[name + SCALE_SUFFIX] = v.weight, v.scale_inv
        elif isinstance(mod, Experts) and leaf in _EXPERT_PROJS:
            experts.setdefault(owner, {})[leaf] = v
        else:
            out[name] = _dequant(v) if isinstance(v, FP8Pair) else v
    for owner, projs in experts.items():
        mod = modules[owner]
        if len(projs) == 3 and all(isinstance(v, FP8Pair) for v in projs.values()):
            e, i, h = mod.gate_proj.shape
            _replace(model, owner, FP8WeightExperts(e, h, i, scale_fmt, ops))
            for leaf, v in projs.items():
                out[f"{owner}.{leaf}"], out[f"{owner}.{leaf}{SCALE_SUFFIX}"] = v.weight, v.scale_inv
        else:
            out.update({f"{owner}.{leaf}": _dequant(v) if isinstance(v, FP8Pair) else v for leaf, v in projs.items()})
    return out


def fp8_modules(model: nn.Module) -> list[nn.Module]:
    """The `FP8WeightLinear` and `FP8WeightExperts` modules of ``model``."""
    return [m for m in model.modules() if isinstance(m, (FP8WeightLinear, FP8WeightExperts))]


SAVE_ERROR = ("{}: the model was loaded with keep_fp8=True and saving its FP8 modules is not supported; the FP8 "
              "checkpoint it came from is already the file to keep (or load it without keep_fp8 and save that, or "
              "'dsfs export --fp8' it)")


def check_not_fp8(model, what: str, fp8_types: tuple = (FP8WeightLinear, FP8WeightExperts)) -> None:
    """Raise ``ValueError`` (`SAVE_ERROR`) when ``model`` holds FP8 modules (``fp8_types``; MLX passes its own)."""
    if any(isinstance(m, fp8_types) for m in model.modules()):  # torch and MLX modules both list them
        raise ValueError(SAVE_ERROR.format(what))
