"""Hugging Face checkpoint directories for the MLX model: the same files and names as `reference.checkpoint`.

Reading: ``config.json``, ``model*.safetensors`` (or the files of ``model.safetensors.index.json``) and
``mtp.safetensors`` through ``mx.load``; weights are mapped once, as mlx-lm's ``sanitize()``: per-expert
matrices (``mlp.experts.{e}.gate_proj.weight``) or transformers' packed ``experts.gate_up_proj`` are stacked into
``mlp.experts.gate_proj`` (E, I, H) ..., MTP layers ``model.layers.{num_hidden_layers + k}.*`` become
``mtp.{k}.*`` (their copies of the embedding and head are dropped: shared). FP8 checkpoints
(``weight_scale_inv``) are dequantized with `runtime_mlx.kernels.weight_dequant` in 128x128 blocks. MTP depths
that config.json asks for and the files lack are dropped or initialized fresh, with a warning, as in the
reference (`reference.checkpoint.config_for_weights`). The model is float32 unless a dtype is asked for, as the
reference's (MLX's ``gather_mm`` on Linux takes only float32, and transformers' float32 logits are the oracle).

Writing: ``config.json``, ``model.safetensors`` (main model, experts unstacked), ``mtp.safetensors`` (MTP layers with
copies of ``embed_tokens`` and ``shared_head.head``, as the released DeepSeek-V3 weights), ``tokenizer.json``;
config.json states the embedding's dtype, and ``checksums.json`` last; into a temporary sibling directory renamed
over the target (`reference.checkpoint.write_model_dir`: modes follow the umask, a full disk is `DiskFullError`).

The name mapping is the reference's (`reference.checkpoint.to_hf_names`, `from_hf_names`) with MLX's stack,
unstack and FP8 dequantization passed in.

``keep_fp8`` (`load_model`, ``Model.from_pretrained``): an FP8 checkpoint's FP8 matrices stay FP8 for inference, as
`reference.fp8_checkpoint` keeps them: `FP8WeightLinear` and `FP8WeightExperts` hold the e4m3 bits as uint8 and the
float32 ``weight_scale_inv`` blocks (frozen) and run `runtime_mlx.kernels.fp8` (``act_quant`` with the checkpoint's
``scale_fmt``, ``fp8_gemm``, ``fp8_grouped_gemm``); they raise in training mode.
"""

from __future__ import annotations

import glob
import json
import os

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from reference.checkpoint import (
    check_finite,
    config_for_weights,
    dtype_name,
    from_hf_names,
    mismatch,
    to_hf_names,
    verify_checksums,
    write_model_dir,
)
from reference.config import ModelConfig, fp8_scale_fmt, read_config_json
from reference.fp8_checkpoint import (
    BLOCK,
    SCALE_SUFFIX,
    TRAINING_ERROR,
    FP8Pair,
    check_fp8_checkpoint,
    check_not_fp8,
    fp8_pairs_from_hf,
)

from . import kernels
from .kernels import fp8 as fp8_ops


def weight_files(path: str) -> list[str]:
    """The safetensors files of the directory ``path``: ``model*.safetensors`` (or those of
    ``model.safetensors.index.json``) then ``mtp.safetensors``. Raises ``FileNotFoundError`` when there is none."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            files = sorted({os.path.join(path, v) for v in json.load(f)["weight_map"].values()})
    else:
        files = sorted(glob.glob(os.path.join(path, "model*.safetensors")))
    mtp = os.path.join(path, "mtp.safetensors")
    if os.path.isfile(mtp) and mtp not in files:
        files.append(mtp)
    if not files:
        raise FileNotFoundError(f"no model*.safetensors in {path!r}")
    return files


def read_weights(path: str) -> dict[str, mx.array]:
    """All arrays of the checkpoint directory ``path`` by their stored names. Raises ``FileNotFoundError`` /
    ``ValueError`` (a corrupt file)."""
    weights = {}
    for f in weight_files(path):
        try:
            weights.update(mx.load(f))
        except (RuntimeError, ValueError, OSError) as e:
            raise ValueError(f"corrupt weight file {f!r}: {e}") from e
    return weights


def sanitize(weights: dict[str, mx.array], cfg: ModelConfig) -> dict[str, mx.array]:
    """Hugging Face names -> this model's parameter names (the reference's ``state_dict`` names) through
    `reference.checkpoint.from_hf_names`: FP8 blocks dequantized (`runtime_mlx.kernels.weight_dequant`), MTP
    layers to ``mtp.{k}``, experts stacked with ``mx.stack``. Raises ``ValueError`` on missing experts."""
    return from_hf_names(weights, cfg, mx.stack,
                         lambda w, s: kernels.weight_dequant(w.view(mx.uint8), s.astype(mx.float32)))


def load_weights(model, weights: dict[str, mx.array], where: str = "weights", fresh: tuple[int, ...] = ()) -> None:
    """Set every parameter of ``model`` from ``weights`` (this model's names), strictly: raises ``ValueError``
    naming missing, unexpected or mis-shaped arrays. Arrays keep their dtype. ``fresh``: MTP depths whose
    parameters (``mtp.{k}.*``) may be absent and then keep their current values."""
    expected = dict(tree_flatten(model.parameters()))
    fresh_names = tuple(f"mtp.{k}." for k in fresh)
    missing = sorted(k for k in set(expected) - set(weights) if not k.startswith(fresh_names))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise ValueError(mismatch(where, missing, unexpected, "the config"))
    for k, a in weights.items():
        if tuple(a.shape) != tuple(expected[k].shape):
            raise ValueError(f"{where}: {k} has shape {tuple(a.shape)}, config expects {tuple(expected[k].shape)}")
    model.load_weights(list(weights.items()), strict=not fresh)


def load_torch_state_dict(model, state_dict: dict) -> None:
    """Set ``model``'s parameters from a reference model's ``state_dict()`` (same names; torch tensors), dropping
    a tied ``lm_head.weight``. Raises ``ValueError`` as `load_weights`."""
    tied = model.config.tie_word_embeddings
    weights = {k: mx.array(v.detach().cpu().numpy()) for k, v in state_dict.items()
               if not (tied and k == "lm_head.weight")}
    load_weights(model, weights, "reference state_dict")


def _train_guard(module) -> None:
    if module.training:
        raise RuntimeError(TRAINING_ERROR.format(type(module).__name__))


class FP8WeightLinear(nn.Module):
    """``y = x W^T (+ b)`` with W in FP8, as `reference.fp8_checkpoint.FP8WeightLinear`: ``weight`` (N, K) uint8 e4m3fn
    bits, ``weight_scale_inv`` (cdiv(N, 128), cdiv(K, 128)) float32, ``bias`` (N,) when asked; all frozen.

    ``__call__(x)``: x (..., K) float -> (..., N) in x's dtype, ``fp8_gemm(*act_quant(x, 128, scale_fmt), weight,
    weight_scale_inv)`` (`runtime_mlx.kernels.fp8`). ``dtype``: the dtype of `dense_weight` (the model's). Raises
    ``RuntimeError`` in training mode. Source: DeepSeek-V3 report section 3.3."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, scale_fmt: str | None = None,
                 dtype=mx.float32, block_size: int = BLOCK):
        super().__init__()
        self.in_features, self.out_features, self.block_size = in_features, out_features, block_size
        self.scale_fmt, self.dense_dtype = scale_fmt, dtype
        self.weight = mx.zeros((out_features, in_features), dtype=mx.uint8)
        self.weight_scale_inv = mx.ones((-(-out_features // block_size), -(-in_features // block_size)))
        if bias:
            self.bias = mx.zeros((out_features,), dtype=dtype)
        self.freeze()

    def __call__(self, x: mx.array) -> mx.array:
        _train_guard(self)
        kw = {} if self.scale_fmt is None else {"scale_fmt": self.scale_fmt}
        a, a_s = fp8_ops.act_quant(x, self.block_size, **kw)
        y = fp8_ops.fp8_gemm(a, a_s, self.weight, self.weight_scale_inv, self.block_size, out_dtype=x.dtype)
        return y + self.bias.astype(y.dtype) if "bias" in self else y

    def dense_weight(self, dtype=None) -> mx.array:
        """The dequantized (N, K) matrix in ``dtype`` (default: ``dense_dtype``)."""
        return fp8_ops.weight_dequant(self.weight, self.weight_scale_inv, self.block_size, dtype or self.dense_dtype)


def linear_weight(linear) -> mx.array:
    """The (N, K) matrix of a linear module: an ``nn.Linear``'s ``weight``, an `FP8WeightLinear`'s dequantized (in the
    model's dtype)."""
    return linear.dense_weight() if isinstance(linear, FP8WeightLinear) else linear.weight


class FP8WeightExperts(nn.Module):
    """`runtime_mlx.moe.Experts` with FP8 weights, as `reference.fp8_checkpoint.FP8WeightExperts`: ``gate_proj``,
    ``up_proj`` (E, I, H), ``down_proj`` (E, H, I) uint8 e4m3fn bits, each with ``<name>_scale_inv`` (E, cdiv(rows,
    128), cdiv(cols, 128)) float32; frozen. ``__call__(x, topk_idx, topk_weight)`` -> (N, H) in x's dtype: token
    copies sorted by expert, each projection a grouped FP8 GEMM on activations quantized per 1 x 128 tile, SwiGLU
    between them. Raises ``RuntimeError`` in training mode."""

    PROJS = ("gate_proj", "up_proj", "down_proj")

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, scale_fmt: str | None = None,
                 block_size: int = BLOCK):
        super().__init__()
        self.num_experts, self.block_size, self.scale_fmt = num_experts, block_size, scale_fmt
        e, h, i = num_experts, hidden_size, intermediate_size
        for name, (n, k) in zip(self.PROJS, ((i, h), (i, h), (h, i)), strict=True):
            setattr(self, name, mx.zeros((e, n, k), dtype=mx.uint8))
            setattr(self, name + SCALE_SUFFIX, mx.ones((e, -(-n // block_size), -(-k // block_size))))
        self.freeze()

    def _gemm(self, xs, name, offsets):
        kw = {} if self.scale_fmt is None else {"scale_fmt": self.scale_fmt}
        a, a_s = fp8_ops.act_quant(xs, self.block_size, **kw)
        return fp8_ops.fp8_grouped_gemm(a, a_s, self[name], self[name + SCALE_SUFFIX], offsets, self.block_size,
                                        out_dtype=xs.dtype)

    def __call__(self, x: mx.array, topk_idx: mx.array, topk_weight: mx.array) -> mx.array:
        _train_guard(self)
        n, k = topk_idx.shape
        flat = topk_idx.reshape(-1)
        order = mx.argsort(flat)
        counts = (flat[:, None] == mx.arange(self.num_experts)[None]).astype(mx.int32).sum(axis=0)
        offsets = mx.concatenate([mx.zeros((1,), mx.int32), mx.cumsum(counts)])
        xs = x[order // k]
        h = kernels.swiglu(self._gemm(xs, "gate_proj", offsets), self._gemm(xs, "up_proj", offsets))
        ys = self._gemm(h, "down_proj", offsets)[mx.argsort(order)].reshape(n, k, -1)
        return (ys * topk_weight[..., None].astype(ys.dtype)).sum(axis=1)


def _module(model, path: str):
    """The submodule of ``model`` at the dotted ``path`` (list items by index), or None."""
    obj = model
    for part in path.split(".") if path else []:
        try:
            obj = obj[int(part)] if isinstance(obj, list) else getattr(obj, part)
        except (AttributeError, IndexError, KeyError, ValueError):
            return None
    return obj


def _replace(model, path: str, new) -> None:
    parent, _, child = path.rpartition(".")
    owner = _module(model, parent)
    if isinstance(owner, list):
        owner[int(child)] = new
    else:
        setattr(owner, child, new)


def keep_fp8_weights(model, hf: dict[str, mx.array], scale_fmt: str | None, dtype) -> dict[str, mx.array]:
    """Switch ``model``'s ``nn.Linear`` / ``Experts`` modules whose weights the Hugging Face arrays ``hf`` store in
    FP8 to `FP8WeightLinear` / `FP8WeightExperts` and return the weights to load (this model's names): the FP8 bits
    (uint8) and float32 scales as stored, every other floating array cast to ``dtype`` (an FP8 array of another
    parameter dequantized), as `reference.fp8_checkpoint.keep_fp8_state_dict`. Raises ``ValueError`` when ``hf``
    holds no FP8 weight, or from `reference.checkpoint.from_hf_names`."""
    from .moe import Experts

    check_fp8_checkpoint(hf)
    hf = {k: v.astype(mx.float32) if k.endswith(SCALE_SUFFIX) else v.view(mx.uint8) if k + SCALE_SUFFIX in hf else v
          for k, v in hf.items()}
    sd = fp8_pairs_from_hf(hf, model.config, mx.stack)

    def dense(v):
        if isinstance(v, FP8Pair):
            w = v.weight
            v = (mx.stack([fp8_ops.weight_dequant(w[e], v.scale_inv[e]) for e in range(w.shape[0])]) if w.ndim == 3
                 else fp8_ops.weight_dequant(w, v.scale_inv))
        return v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v

    out, experts = {}, {}
    for name, v in sd.items():
        owner, _, leaf = name.rpartition(".")
        mod = _module(model, owner)
        if isinstance(v, FP8Pair) and isinstance(mod, nn.Linear) and leaf == "weight":
            n, k = mod.weight.shape
            _replace(model, owner, FP8WeightLinear(k, n, "bias" in mod, scale_fmt, dtype))
            out[name], out[name + SCALE_SUFFIX] = v.weight, v.scale_inv
        elif isinstance(mod, Experts) and leaf in FP8WeightExperts.PROJS:
            experts.setdefault(owner, {})[leaf] = v
        else:
            out[name] = dense(v)
    for owner, projs in experts.items():
        if len(projs) == 3 and all(isinstance(v, FP8Pair) for v in projs.values()):
            e, i, h = _module(model, owner).gate_proj.shape
            _replace(model, owner, FP8WeightExperts(e, h, i, scale_fmt))
            for leaf, v in projs.items():
                out[f"{owner}.{leaf}"], out[f"{owner}.{leaf}{SCALE_SUFFIX}"] = v.weight, v.scale_inv
        else:
            out.update({f"{owner}.{leaf}": dense(v) for leaf, v in projs.items()})
    return out


def load_model(cls, path, dtype: mx.Dtype | None = None, missing_mtp: str = "drop", keep_fp8: bool = False):
    """Build ``cls(config)`` from ``path``/config.json and load its weights strictly; cast floating weights to
    ``dtype``, float32 when None whatever the files store (as the reference's loader). MTP depths that
    config.json asks for and the files lack are dropped or initialized fresh, with a warning (``missing_mtp``,
    `reference.checkpoint.config_for_weights`). ``keep_fp8``: an FP8 checkpoint's FP8 matrices stay FP8
    (`keep_fp8_weights`; inference only), ``dtype`` applying to the other weights. Raises ``FileNotFoundError`` /
    ``ValueError`` (also for a file that does not match ``checksums.json``, for a stored tensor that is not finite,
    as the reference, and with ``keep_fp8`` for a checkpoint without FP8 weights)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path!r} does not exist")
    if read_config_json(path).get("model_type") == "deepseek_v4":  # `runtime_mlx.v4_model`
        if keep_fp8:
            raise ValueError(f"checkpoint {path!r}: keep_fp8 is not supported for DeepSeek-V4")
        from .v4_model import V4Model, load_v4

        return load_v4(V4Model, path, dtype=dtype)
    verify_checksums(path)
    hf = read_weights(path)
    check_finite(hf, path, lambda a: not mx.issubdtype(a.dtype, mx.floating) or bool(mx.all(mx.isfinite(a))))
    cfg, fresh = config_for_weights(path, hf, missing_mtp)
    model = cls(cfg)
    dtype = mx.float32 if dtype is None else dtype
    if keep_fp8:
        model.set_dtype(dtype)  # the fresh MTP depths' weights; the loaded ones come in their dtypes below
        try:
            weights = keep_fp8_weights(model, hf, fp8_scale_fmt(read_config_json(path)), dtype)
        except ValueError as e:
            raise ValueError(f"checkpoint {path!r}: {e}") from e
        load_weights(model, weights, f"checkpoint {path!r}", tuple(fresh))
    else:
        load_weights(model, sanitize(hf, cfg), f"checkpoint {path!r}", tuple(fresh))
        model.set_dtype(dtype)
    mx.eval(model.parameters())
    model.eval()  # as transformers' from_pretrained: inference mode (no dropout)
    return model


def to_hf(model) -> tuple[dict[str, mx.array], dict[str, mx.array]]:
    """This model's parameters -> (main, mtp) dicts of Hugging Face names, experts unstacked
    (`reference.checkpoint.to_hf_names`)."""
    return to_hf_names(dict(tree_flatten(model.parameters())), model.config, lambda a: [a[e] for e in range(len(a))])


def save_model(model, path, tokenizer_file=None) -> None:
    """Write the checkpoint directory ``path`` atomically (`reference.checkpoint.write_model_dir`: temporary
    sibling, then `replace_dir`) with the arrays of `to_hf`; config.json states the embedding's dtype. Raises
    ``ValueError`` for a model loaded with ``keep_fp8`` (not supported)."""
    check_not_fp8(model, "save_pretrained", (FP8WeightLinear, FP8WeightExperts))
    main, mtp = to_hf(model)
    write_model_dir(path, model.config, main, mtp, lambda a, f: mx.save_safetensors(f, a, metadata={"format": "pt"}),
                    tokenizer_file, dtype=dtype_name(model.model.embed_tokens.weight.dtype))
