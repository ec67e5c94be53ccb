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
"""

from __future__ import annotations

import glob
import json
import os

import mlx.core as mx
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
from reference.config import ModelConfig

from . import kernels


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


def load_model(cls, path, dtype: mx.Dtype | None = None, missing_mtp: str = "drop"):
    """Build ``cls(config)`` from ``path``/config.json and load its weights strictly; cast floating weights to
    ``dtype``, float32 when None whatever the files store (as the reference's loader). MTP depths that
    config.json asks for and the files lack are dropped or initialized fresh, with a warning (``missing_mtp``,
    `reference.checkpoint.config_for_weights`). Raises ``FileNotFoundError`` / ``ValueError`` (also for a file that
    does not match ``checksums.json`` and for a stored tensor that is not finite, as the reference)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path!r} does not exist")
    verify_checksums(path)
    hf = read_weights(path)
    check_finite(hf, path, lambda a: not mx.issubdtype(a.dtype, mx.floating) or bool(mx.all(mx.isfinite(a))))
    cfg, fresh = config_for_weights(path, hf, missing_mtp)
    model = cls(cfg)
    load_weights(model, sanitize(hf, cfg), f"checkpoint {path!r}", tuple(fresh))
    model.set_dtype(mx.float32 if dtype is None else dtype)
    mx.eval(model.parameters())
    model.eval()  # as transformers' from_pretrained: inference mode (no dropout)
    return model


def to_hf(model) -> tuple[dict[str, mx.array], dict[str, mx.array]]:
    """This model's parameters -> (main, mtp) dicts of Hugging Face names, experts unstacked
    (`reference.checkpoint.to_hf_names`)."""
    return to_hf_names(dict(tree_flatten(model.parameters())), model.config, lambda a: [a[e] for e in range(len(a))])


def save_model(model, path, tokenizer_file=None) -> None:
    """Write the checkpoint directory ``path`` atomically (`reference.checkpoint.write_model_dir`: temporary
    sibling, then `replace_dir`) with the arrays of `to_hf`; config.json states the embedding's dtype."""
    main, mtp = to_hf(model)
    write_model_dir(path, model.config, main, mtp, lambda a, f: mx.save_safetensors(f, a, metadata={"format": "pt"}),
                    tokenizer_file, dtype=dtype_name(model.model.embed_tokens.weight.dtype))
