"""Hugging Face checkpoint directories for the MLX model: the same files and names as `reference.checkpoint`.

Reading: ``config.json``, ``model*.safetensors`` (or the files of ``model.safetensors.index.json``) and
``mtp.safetensors`` through ``mx.load``; weights are mapped once, as mlx-lm's ``sanitize()``: per-expert
matrices (``mlp.experts.{e}.gate_proj.weight``) or transformers' packed ``experts.gate_up_proj`` are stacked into
``mlp.experts.gate_proj`` (E, I, H) ..., MTP layers ``model.layers.{num_hidden_layers + k}.*`` become
``mtp.{k}.*`` (their copies of the embedding and head are dropped: shared). FP8 checkpoints
(``weight_scale_inv``) are dequantized with `runtime_mlx.kernels.weight_dequant` in 128x128 blocks.

Writing: ``config.json``, ``model.safetensors`` (main model, experts unstacked), ``mtp.safetensors`` (MTP layers with
copies of ``embed_tokens`` and ``shared_head.head``, as the released DeepSeek-V3 weights), ``tokenizer.json``;
into a temporary sibling directory renamed over the target (`reference.checkpoint.replace_dir`).

The name mapping is written again here rather than imported: `reference.checkpoint` maps torch tensors.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import tempfile

import mlx.core as mx
from mlx.utils import tree_flatten

from reference.checkpoint import replace_dir
from reference.config import ModelConfig

from . import kernels

_EXPERT_RE = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_PACKED_RE = re.compile(r"^(.*\.mlp\.experts)\.gate_up_proj$")
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.*)$")
_MTP_SHARED_COPIES = ("embed_tokens.weight", "shared_head.head.weight")
_STACKED = ("mlp.experts.gate_proj", "mlp.experts.up_proj", "mlp.experts.down_proj")


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
    """Hugging Face names -> this model's parameter names (the reference's ``state_dict`` names): FP8 blocks
    dequantized, MTP layers to ``mtp.{k}``, experts stacked. Raises ``ValueError`` on missing experts."""
    n = cfg.num_hidden_layers
    weights = dict(weights)
    for name in [k for k in weights if k.endswith(".weight_scale_inv")]:
        w = name[: -len("_scale_inv")]
        weights[w] = kernels.weight_dequant(weights[w].view(mx.uint8), weights.pop(name).astype(mx.float32))
    out, experts = {}, {}
    for name, a in weights.items():
        m = _LAYER_RE.match(name)
        if m and int(m.group(1)) >= n:
            k = int(m.group(1)) - n
            if m.group(2) in _MTP_SHARED_COPIES or k >= cfg.num_nextn_predict_layers:
                continue
            name = f"mtp.{k}.{m.group(2)}"
        em, pm = _EXPERT_RE.match(name), _PACKED_RE.match(name)
        if em:
            experts.setdefault((em.group(1), em.group(3)), {})[int(em.group(2))] = a
        elif pm:  # transformers' packed layout (E, 2I, H)
            half = a.shape[1] // 2
            out[f"{pm.group(1)}.gate_proj"], out[f"{pm.group(1)}.up_proj"] = a[:, :half], a[:, half:]
        else:
            out[name] = a
    for (base, proj), per in experts.items():
        if sorted(per) != list(range(cfg.n_routed_experts)):
            missing = sorted(set(range(cfg.n_routed_experts)) - set(per))
            raise ValueError(f"checkpoint: {base} lacks experts {missing[:8]} for {proj}")
        out[f"{base}.{proj}"] = mx.stack([per[e] for e in range(cfg.n_routed_experts)])
    if cfg.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


def load_weights(model, weights: dict[str, mx.array], where: str = "weights") -> None:
    """Set every parameter of ``model`` from ``weights`` (this model's names), strictly: raises ``ValueError``
    naming missing, unexpected or mis-shaped arrays. Arrays keep their dtype."""
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{where} do not match the config: missing {missing[:6]}{' ...' if len(missing) > 6 else ''}"
                         f", unexpected {unexpected[:6]}{' ...' if len(unexpected) > 6 else ''}")
    for k, a in weights.items():
        if tuple(a.shape) != tuple(expected[k].shape):
            raise ValueError(f"{where}: {k} has shape {tuple(a.shape)}, config expects {tuple(expected[k].shape)}")
    model.load_weights(list(weights.items()), strict=True)


def load_torch_state_dict(model, state_dict: dict) -> None:
    """Set ``model``'s parameters from a reference model's ``state_dict()`` (same names; torch tensors), dropping
    a tied ``lm_head.weight``. Raises ``ValueError`` as `load_weights`."""
    tied = model.config.tie_word_embeddings
    weights = {k: mx.array(v.detach().cpu().numpy()) for k, v in state_dict.items()
               if not (tied and k == "lm_head.weight")}
    load_weights(model, weights, "reference state_dict")


def load_model(cls, path, dtype: mx.Dtype | None = None):
    """Build ``cls(config)`` from ``path``/config.json and load its weights strictly; cast floating weights to
    ``dtype`` when given (as the reference's ``model.to(dtype)``). Raises ``FileNotFoundError`` / ``ValueError``."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path!r} does not exist")
    cfg = ModelConfig.from_json(path)
    model = cls(cfg)
    load_weights(model, sanitize(read_weights(path), cfg), f"checkpoint {path!r}")
    if dtype is not None:
        model.set_dtype(dtype)
    mx.eval(model.parameters())
    return model


def to_hf(model) -> tuple[dict[str, mx.array], dict[str, mx.array]]:
    """This model's parameters -> (main, mtp) dicts of Hugging Face names, experts unstacked."""
    cfg = model.config
    n = cfg.num_hidden_layers
    main, mtp = {}, {}
    for name, a in tree_flatten(model.parameters()):
        out = main
        m = re.match(r"^mtp\.(\d+)\.(.*)$", name)
        if m:
            out, name = mtp, f"model.layers.{n + int(m.group(1))}.{m.group(2)}"
        if name.endswith(_STACKED):
            base, proj = name.rsplit(".", 1)
            for e in range(a.shape[0]):
                out[f"{base}.{e}.{proj}.weight"] = a[e]
        else:
            out[name] = a
    head = model.model.embed_tokens.weight if cfg.tie_word_embeddings else model.lm_head.weight
    for k in range(cfg.num_nextn_predict_layers):
        mtp[f"model.layers.{n + k}.embed_tokens.weight"] = model.model.embed_tokens.weight
        mtp[f"model.layers.{n + k}.shared_head.head.weight"] = head
    return main, mtp


def save_model(model, path, tokenizer_file=None) -> None:
    """Write the checkpoint directory ``path`` atomically (temporary sibling, then `replace_dir`)."""
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=parent)
    try:
        model.config.save_json(os.path.join(tmp, "config.json"))
        main, mtp = to_hf(model)
        mx.save_safetensors(os.path.join(tmp, "model.safetensors"), main, metadata={"format": "pt"})
        if mtp:
            mx.save_safetensors(os.path.join(tmp, "mtp.safetensors"), mtp, metadata={"format": "pt"})
        if tokenizer_file is not None:
            shutil.copyfile(tokenizer_file, os.path.join(tmp, "tokenizer.json"))
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
