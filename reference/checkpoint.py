"""Hugging Face checkpoint directories: ``config.json`` + safetensors with DeepSeek-V3 parameter names.

Files written: ``config.json``, ``model.safetensors`` (the main model) and, when the model has MTP modules,
``mtp.safetensors`` holding them as layers ``model.layers.{num_hidden_layers + k}.*`` (with ``enorm``,
``hnorm``, ``eh_proj``, ``shared_head.norm``, and copies of ``embed_tokens``/``shared_head.head`` as in the
released DeepSeek-V3 weights). The MTP file is separate because ``transformers`` reads only
``model.safetensors`` and ``mlx_lm`` only ``model*.safetensors``, and mlx-lm's deepseek_v3 would reject the
extra layers; both then open the directory unchanged. Reading accepts sharded checkpoints
(``model.safetensors.index.json``), per-expert or stacked (``experts.gate_up_proj``) expert weights, and
FP8 weights with ``weight_scale_inv`` (dequantized in 128x128 blocks).
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import tempfile

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import ModelConfig

_EXPERT_RE = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_STACKED_RE = re.compile(r"^(.*\.mlp\.experts)\.(gate_up_proj|down_proj)$")
_MTP_SHARED_COPIES = ("embed_tokens.weight", "shared_head.head.weight")


def to_hf_state_dict(model) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Our ``state_dict`` -> (main, mtp) dicts of Hugging Face names, experts unstacked, tensors contiguous."""
    cfg = model.config
    n = cfg.num_hidden_layers
    main, mtp = {}, {}
    for name, t in model.state_dict().items():
        if name.startswith("rotary.") or (cfg.tie_word_embeddings and name == "lm_head.weight"):
            continue
        out = main
        m = re.match(r"^mtp\.(\d+)\.(.*)$", name)
        if m:
            out, name = mtp, f"model.layers.{n + int(m.group(1))}.{m.group(2)}"
        if name.endswith(("mlp.experts.gate_proj", "mlp.experts.up_proj", "mlp.experts.down_proj")):
            base, proj = name.rsplit(".", 1)
            for e in range(t.shape[0]):
                out[f"{base}.{e}.{proj}.weight"] = t[e].contiguous()
        else:
            out[name] = t.contiguous()
    for k in range(cfg.num_nextn_predict_layers):
        # copies: safetensors refuses tensors that share memory
        mtp[f"model.layers.{n + k}.embed_tokens.weight"] = model.model.embed_tokens.weight.detach().clone()
        mtp[f"model.layers.{n + k}.shared_head.head.weight"] = model.lm_head.weight.detach().clone()
    return main, mtp


def from_hf_state_dict(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Hugging Face names -> our ``state_dict`` names: MTP layers to ``mtp.{k}``, experts stacked, FP8
    blocks dequantized. Raises ``ValueError`` on missing experts."""
    from .fp8 import weight_dequant

    n = cfg.num_hidden_layers
    sd = dict(sd)
    for name in [k for k in sd if k.endswith(".weight_scale_inv")]:
        w = name[: -len("_scale_inv")]
        sd[w] = weight_dequant(sd[w], sd.pop(name).float(), dtype=torch.float32)
    out, experts = {}, {}
    for name, t in sd.items():
        m = re.match(r"^model\.layers\.(\d+)\.(.*)$", name)
        if m and int(m.group(1)) >= n:
            k = int(m.group(1)) - n
            if m.group(2) in _MTP_SHARED_COPIES or k >= cfg.num_nextn_predict_layers:
                continue  # shared with the main model / MTP depth this config does not use
            name = f"mtp.{k}.{m.group(2)}"
        em = _EXPERT_RE.match(name)
        sm = _STACKED_RE.match(name)
        if em:
            experts.setdefault((em.group(1), em.group(3)), {})[int(em.group(2))] = t
        elif sm and sm.group(2) == "gate_up_proj":  # transformers' packed layout (E, 2I, H)
            out[f"{sm.group(1)}.gate_proj"], out[f"{sm.group(1)}.up_proj"] = t.chunk(2, dim=1)
        elif sm:
            out[name] = t
        else:
            out[name] = t
    for (base, proj), per in experts.items():
        if sorted(per) != list(range(cfg.n_routed_experts)):
            missing = sorted(set(range(cfg.n_routed_experts)) - set(per))
            raise ValueError(f"checkpoint: {base} lacks experts {missing[:8]} for {proj}")
        out[f"{base}.{proj}"] = torch.stack([per[e] for e in range(cfg.n_routed_experts)])
    if cfg.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


def read_safetensors(path: str) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint directory ``path``: ``model*.safetensors`` (or the files of
    ``model.safetensors.index.json``) and ``mtp.safetensors``. Raises ``FileNotFoundError`` when there is no
    weight file and ``ValueError`` when one is corrupt."""
    files = sorted(glob.glob(os.path.join(path, "model*.safetensors")))
    mtp = os.path.join(path, "mtp.safetensors")
    if os.path.isfile(mtp):
        files.append(mtp)
    if not files:
        raise FileNotFoundError(f"no model*.safetensors in {path!r}")
    sd = {}
    for f in files:
        try:
            sd.update(load_file(f))
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"corrupt weight file {f!r}: {e}") from e
    return sd


def load_model(cls, path, device=None, dtype=None):
    """Build ``cls(config)`` from ``path``/config.json and load its weights (strictly: every parameter
    present with the right shape). Raises ``FileNotFoundError`` / ``ValueError`` naming missing, unexpected or
    mis-shaped tensors."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path!r} does not exist")
    cfg = ModelConfig.from_json(path)
    model = cls(cfg)
    sd = from_hf_state_dict(read_safetensors(path), cfg)
    expected = model.state_dict()
    missing = sorted(k for k in expected if k not in sd and not k.startswith("rotary.")
                     and not (cfg.tie_word_embeddings and k == "lm_head.weight"))
    unexpected = sorted(k for k in sd if k not in expected)
    if missing or unexpected:
        raise ValueError(f"checkpoint {path!r} does not match its config.json: missing {missing[:6]}"
                         f"{' ...' if len(missing) > 6 else ''}, unexpected {unexpected[:6]}"
                         f"{' ...' if len(unexpected) > 6 else ''}")
    for k, t in sd.items():
        if t.shape != expected[k].shape:
            raise ValueError(f"checkpoint {path!r}: {k} has shape {tuple(t.shape)}, config expects "
                             f"{tuple(expected[k].shape)}")
    model.load_state_dict(sd, strict=False)
    if dtype is not None:
        model = model.to(dtype)
    if device is not None:
        model = model.to(device)
    return model


def save_model(model, path, tokenizer_file=None) -> None:
    """Write the checkpoint directory atomically: everything goes to a temporary sibling directory that is
    renamed over ``path`` at the end, so a crash never leaves a half-written checkpoint."""
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=parent)
    try:
        model.config.save_json(os.path.join(tmp, "config.json"))
        main, mtp = to_hf_state_dict(model)
        save_file({k: v.detach().cpu() for k, v in main.items()}, os.path.join(tmp, "model.safetensors"),
                  metadata={"format": "pt"})
        if mtp:
            save_file({k: v.detach().cpu() for k, v in mtp.items()}, os.path.join(tmp, "mtp.safetensors"),
                      metadata={"format": "pt"})
        if tokenizer_file is not None:
            shutil.copyfile(tokenizer_file, os.path.join(tmp, "tokenizer.json"))
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(src: str, dst: str) -> None:
    """Move the finished directory ``src`` to ``dst`` (same filesystem), replacing any old ``dst``: the old
    one is first renamed aside and deleted last, so at every instant a complete copy exists on disk."""
    old = None
    if os.path.exists(dst):
        old = dst + ".old-" + os.path.basename(src)
        os.rename(dst, old)
    os.rename(src, dst)
    if old:
        shutil.rmtree(old, ignore_errors=True)
