"""DeepSeek-V4 checkpoints: the tensor names ``transformers`` writes and reads, and DeepSeek's own.

Our module tree has ``transformers``' ``DeepseekV4ForCausalLM`` parameter names
(``model.layers.{i}.self_attn.q_a_proj``, ``mlp.experts.gate_up_proj`` (E, 2 I, hidden), ...). On disk its
``save_pretrained`` writes a mix: the reverse of its conversion from DeepSeek's names inside the layers
(``model.layers.{i}.attn.wq_a.weight``, ``ffn.experts.{e}.w1.weight``, ``hc_attn_fn``, ``attn.attn_sink``,
``attn.compressor.ape``, ``attn.indexer.compressor.wkv.weight``, ...) and ``head.weight``, but
``model.embed_tokens.weight``, ``model.norm.weight`` and ``model.hc_head.hc_fn`` unchanged. We write exactly that (it
reads it back), and read it, DeepSeek's released layout (no ``model.`` prefix, ``embed.weight``, ``hc_head_fn``,
``attn.kv_norm``) and our module names. MTP blocks are ``mtp.{k}.*`` in DeepSeek's names (in ``mtp.safetensors``;
transformers skips them). Quantized (FP8/FP4 ``.scale``) checkpoints are refused.
"""

from __future__ import annotations

import os
import re
import warnings

import torch
from safetensors.torch import save_file

from .checkpoint import (
    CheckpointWarning,
    _cpu,
    _finite,
    check_finite,
    dtype_name,
    load_strict,
    read_safetensors,
    verify_checksums,
    write_model_dir,
)
from .config import read_config_json
from .v4_config import V4Config

_A, _C, _I = "self_attn.", "self_attn.compressor.", "self_attn.compressor.indexer."
# our (and transformers') name inside a layer -> the name on disk
_LAYER = {
    _A + "q_a_proj.weight": "attn.wq_a.weight", _A + "q_a_norm.weight": "attn.q_norm.weight",
    _A + "q_b_proj.weight": "attn.wq_b.weight", _A + "kv_proj.weight": "attn.wkv.weight",
    _A + "kv_norm.weight": "attn.norm.weight", _A + "o_a_proj.weight": "attn.wo_a.weight",
    _A + "o_b_proj.weight": "attn.wo_b.weight", _A + "sinks": "attn.attn_sink",
    _C + "kv_proj.weight": "attn.compressor.wkv.weight", _C + "gate_proj.weight": "attn.compressor.wgate.weight",
    _C + "position_bias": "attn.compressor.ape", _C + "kv_norm.weight": "attn.compressor.norm.weight",
    _I + "kv_proj.weight": "attn.indexer.compressor.wkv.weight",
    _I + "gate_proj.weight": "attn.indexer.compressor.wgate.weight",
    _I + "position_bias": "attn.indexer.compressor.ape", _I + "kv_norm.weight": "attn.indexer.compressor.norm.weight",
    _I + "q_b_proj.weight": "attn.indexer.wq_b.weight",
    _I + "scorer.weights_proj.weight": "attn.indexer.weights_proj.weight",
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate.weight": "ffn.gate.weight", "mlp.gate.e_score_correction_bias": "ffn.gate.bias",
    "mlp.gate.tid2eid": "ffn.gate.tid2eid", "mlp.shared_experts.gate_proj.weight": "ffn.shared_experts.w1.weight",
    "mlp.shared_experts.down_proj.weight": "ffn.shared_experts.w2.weight",
    "mlp.shared_experts.up_proj.weight": "ffn.shared_experts.w3.weight",
    **{f"{hc}_hc.{p}": f"hc_{hc}_{p}" for hc in ("attn", "ffn") for p in ("fn", "base", "scale")},
    # MTP blocks only
    **{f"{p}.weight": f"{p}.weight" for p in ("e_proj", "h_proj", "enorm", "hnorm", "norm")},
    **{f"hc_head.hc_{p}": f"hc_head_{p}" for p in ("fn", "base", "scale")},
}
_FROM_DISK = {v: k for k, v in _LAYER.items()} | {"attn.kv_norm.weight": _A + "kv_norm.weight"}  # DeepSeek's name
_TOP = {"lm_head.weight": "head.weight"}
_TOP_FROM_DISK = {"head.weight": "lm_head.weight", "embed.weight": "model.embed_tokens.weight",
                  "norm.weight": "model.norm.weight", "hc_head_fn": "model.hc_head.hc_fn",
                  "hc_head_base": "model.hc_head.hc_base", "hc_head_scale": "model.hc_head.hc_scale"}
_BLOCK = re.compile(r"^(model\.layers\.\d+\.|mtp\.\d+\.)(.*)$")
_EXPERT = re.compile(r"^(?:ffn|mlp)\.experts\.(\d+)\.(w[123])\.weight$")


def to_disk_names(sd: dict[str, torch.Tensor], config: V4Config) -> dict[str, torch.Tensor]:
    """Our state dict -> the tensors as transformers' ``save_pretrained`` writes them (module docstring): routed
    experts split per expert into ``w1`` (gate), ``w3`` (up), ``w2`` (down). Tied heads are not written twice."""
    out = {}
    for name, t in sd.items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        m = _BLOCK.match(name)
        if m is None:
            out[_TOP.get(name, name)] = t
            continue
        prefix, rest = m.groups()
        if rest == "mlp.experts.gate_up_proj":
            for e, (gate, up) in enumerate(zip(*t.chunk(2, dim=1), strict=True)):
                out[f"{prefix}ffn.experts.{e}.w1.weight"] = gate.contiguous()
                out[f"{prefix}ffn.experts.{e}.w3.weight"] = up.contiguous()
        elif rest == "mlp.experts.down_proj":
            for e, down in enumerate(t):
                out[f"{prefix}ffn.experts.{e}.w2.weight"] = down.contiguous()
        elif prefix.startswith("mtp.") and rest == _A + "kv_norm.weight":
            out[prefix + "attn.kv_norm.weight"] = t  # DeepSeek's name: transformers never reads MTP blocks
        else:
            if rest not in _LAYER:
                raise KeyError(f"to_disk_names: no checkpoint name for {name!r}")
            out[prefix + _LAYER[rest]] = t
    return out


def from_disk_names(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors named as transformers writes them, as DeepSeek releases them, or as our modules name them -> our
    state dict (experts stacked). Raises ``ValueError`` for quantized tensors (``*.scale``) and for an expert list with
    gaps."""
    out, experts = {}, {}
    for name, t in tensors.items():
        if name.endswith(".scale") and name[:-6] + ".weight" in tensors:
            raise ValueError(f"tensor {name!r}: quantized (FP8/FP4) DeepSeek-V4 checkpoints are not supported; "
                             "dequantize the weights first")
        if not name.startswith(("model.", "mtp.")):
            name = _TOP_FROM_DISK.get(name) or (f"model.{name}" if name.startswith("layers.") else name)
        m = _BLOCK.match(name)
        if m is None:
            out[_TOP_FROM_DISK.get(name, name)] = t
            continue
        prefix, rest = m.groups()
        e = _EXPERT.match(rest)
        if e is not None:
            experts.setdefault(prefix, {}).setdefault(int(e.group(1)), {})[e.group(2)] = t
            continue
        out[prefix + _FROM_DISK.get(rest, rest)] = t
    for prefix, by_expert in experts.items():
        n = max(by_expert) + 1
        if sorted(by_expert) != list(range(n)) or any(set(w) != {"w1", "w2", "w3"} for w in by_expert.values()):
            raise ValueError(f"{prefix}ffn.experts: expected w1, w2 and w3 of experts 0..{n - 1}")
        out[prefix + "mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat((by_expert[i]["w1"], by_expert[i]["w3"])) for i in range(n)])
        out[prefix + "mlp.experts.down_proj"] = torch.stack([by_expert[i]["w2"] for i in range(n)])
    return out


def read_v4(path) -> tuple[V4Config, dict[str, torch.Tensor]]:
    """The config and the state dict (our names, `from_disk_names`) of the checkpoint directory ``path``, what every
    backend's loader starts from: checksums verified, every stored tensor finite. MTP blocks that config.json asks for
    and the files lack (every checkpoint transformers saves) are dropped from the config with a `CheckpointWarning`;
    blocks beyond it are dropped from the weights. Raises ``FileNotFoundError`` / ``ValueError`` naming the problem."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path!r} does not exist")
    verify_checksums(path)
    raw = read_safetensors(path)
    check_finite(raw, path, _finite)
    sd = from_disk_names(raw)
    cfg = V4Config.from_dict(read_config_json(path))
    wanted = cfg.num_nextn_predict_layers
    keep = [k for k in sorted({int(k.split(".")[1]) for k in sd if k.startswith("mtp.")}) if k < wanted]
    if len(keep) < wanted:
        if keep != list(range(len(keep))):
            raise ValueError(f"checkpoint {path!r}: MTP blocks {keep} are not consecutive from 0")
        warnings.warn(f"checkpoint {path!r}: config.json asks for {wanted} MTP block(s) but the weights hold "
                      f"{len(keep)}; loading without the missing ones", CheckpointWarning, stacklevel=4)
        cfg.num_nextn_predict_layers = len(keep)
    depth = cfg.num_nextn_predict_layers
    return cfg, {k: v for k, v in sd.items() if not k.startswith("mtp.") or int(k.split(".")[1]) < depth}


def load_v4(cls, path, device=None, dtype=None):
    """Build ``cls(config)`` from the checkpoint directory ``path`` (`read_v4`) and load its weights strictly, in eval
    mode, in float32 unless ``dtype``. Raises ``FileNotFoundError`` / ``ValueError`` naming missing, unexpected,
    mis-shaped or non-finite tensors, or files that do not match ``checksums.json``."""
    path = os.fspath(path)
    cfg, sd = read_v4(path)
    return load_strict(cls(cfg), sd, path, device, dtype)


def save_v4(model, path, tokenizer_file=None) -> None:
    """Write ``config.json``, ``model.safetensors`` (transformers' names) and ``mtp.safetensors`` (``mtp.{k}.*``),
    plus ``tokenizer.json`` when given, atomically (`reference.checkpoint.write_model_dir`)."""
    disk = to_disk_names(model.state_dict(), model.config)
    main = {k: v for k, v in disk.items() if not k.startswith("mtp.")}
    mtp = {k: v for k, v in disk.items() if k.startswith("mtp.")}
    write_model_dir(path, model.config, main, mtp, lambda t, f: save_file(_cpu(t), f, metadata={"format": "pt"}),
                    tokenizer_file, dtype=dtype_name(model.model.embed_tokens.weight.dtype))
