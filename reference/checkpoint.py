"""Hugging Face checkpoint directories: ``config.json`` + safetensors with DeepSeek-V3 parameter names.

Files written: ``config.json``, ``model.safetensors`` (the main model) and, when the model has MTP modules,
``mtp.safetensors`` holding them as layers ``model.layers.{num_hidden_layers + k}.*`` (with ``enorm``,
``hnorm``, ``eh_proj``, ``shared_head.norm``, and copies of ``embed_tokens``/``shared_head.head`` as in the
released DeepSeek-V3 weights). The MTP file is separate because ``transformers`` reads only
``model.safetensors`` and ``mlx_lm`` only ``model*.safetensors``, and mlx-lm's deepseek_v3 would reject the
extra layers; both then open the directory unchanged. Reading accepts sharded checkpoints
(``model.safetensors.index.json``), per-expert or stacked (``experts.gate_up_proj``) expert weights, and
FP8 weights with ``weight_scale_inv`` (dequantized in 128x128 blocks).

A checkpoint whose ``config.json`` asks for more MTP depths than its files hold (``transformers`` never writes
MTP weights, yet its ``DeepseekV3Config`` defaults to ``num_nextn_predict_layers`` 1) loads with a warning that
names the missing depths (a `CheckpointWarning`, `config_for_weights`): without them (``missing_mtp="drop"``,
for inference; the model's config then says so, and so does what it saves) or with them freshly initialized
(``"init"``, for training).

Loaders build float32 models unless asked for a dtype; ``config.json`` states the dtype the saver wrote
(`dtype_name`). transformers saves a module of width 0 (``n_shared_experts`` 0) as zero-size tensors; a model
without that module loads them as nothing (they add 0 in transformers' forward).

The name mapping (`to_hf_names`, `from_hf_names`) works on names only: the array operations it needs (stack,
unstack, copy, FP8 dequantization) are passed in, so `runtime_mlx.checkpoint` maps MLX arrays with it too.
"""

from __future__ import annotations

import glob
import math
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import ModelConfig, hf_to_fields, read_config_json

_EXPERT_RE = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_PACKED_RE = re.compile(r"^(.*\.mlp\.experts)\.gate_up_proj$")
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.*)$")
_MTP_RE = re.compile(r"^mtp\.(\d+)\.(.*)$")
_MTP_SHARED_COPIES = ("embed_tokens.weight", "shared_head.head.weight")
_STACKED = ("mlp.experts.gate_proj", "mlp.experts.up_proj", "mlp.experts.down_proj")
MISSING_MTP = ("drop", "init")


class CheckpointWarning(UserWarning):
    """A checkpoint loads, but not all of it as its ``config.json`` says (MTP depths it lacks)."""


# ---------------------------------------------------------------- name mapping (any array library)


def to_hf_names(weights: dict, cfg: ModelConfig, unstack: Callable, copy: Callable = lambda a: a) -> tuple[dict, dict]:
    """Our parameter names -> (main, mtp) dicts of Hugging Face names; the arrays are not touched.

    ``weights``: our names (``state_dict`` names, with the MoE correction biases) -> arrays of any library;
    ``rotary.*`` buffers are dropped. A tied head is written as ``lm_head.weight``, ``copy(a)`` of the embedding:
    transformers ties it again from ``tie_word_embeddings``, and mlx_lm's deepseek_v3, which always has an
    ``lm_head``, finds its weight. Stacked experts
    ``...mlp.experts.{gate,up,down}_proj`` (E, ...) become ``...mlp.experts.{e}.{proj}.weight`` through
    ``unstack(a)`` (a sequence of E arrays); ``mtp.{k}.*`` become ``model.layers.{num_hidden_layers + k}.*``,
    each MTP layer with ``copy(a)`` of the embedding and the head (the embedding when tied), as the released
    DeepSeek-V3 weights. Raises ``KeyError`` when ``weights`` lacks ``model.embed_tokens.weight`` (or an untied
    ``lm_head.weight``) and the config has MTP layers or a tied head.
    """
    n = cfg.num_hidden_layers
    main, mtp = {}, {}
    for name, a in weights.items():
        if name.startswith("rotary.") or (cfg.tie_word_embeddings and name == "lm_head.weight"):
            continue  # the tied head is added below, as a copy
        out = main
        m = _MTP_RE.match(name)
        if m:
            out, name = mtp, f"model.layers.{n + int(m.group(1))}.{m.group(2)}"
        if name.endswith(_STACKED):
            base, proj = name.rsplit(".", 1)
            for e, w in enumerate(unstack(a)):
                out[f"{base}.{e}.{proj}.weight"] = w
        else:
            out[name] = a
    if cfg.tie_word_embeddings:
        main["lm_head.weight"] = copy(weights["model.embed_tokens.weight"])
    for k in range(cfg.num_nextn_predict_layers):
        head = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
        mtp[f"model.layers.{n + k}.embed_tokens.weight"] = copy(weights["model.embed_tokens.weight"])
        mtp[f"model.layers.{n + k}.shared_head.head.weight"] = copy(weights[head])
    return main, mtp


def from_hf_names(weights: dict, cfg: ModelConfig, stack: Callable, dequant: Callable) -> dict:
    """Hugging Face names -> our parameter names (the reference's ``state_dict`` names), for any array library.

    FP8 pairs ``<w>`` + ``<w>_scale_inv`` become ``dequant(w, scale_inv)`` (128x128 block scales); layers
    ``model.layers.{num_hidden_layers + k}.*`` become ``mtp.{k}.*`` (their copies of the embedding and head,
    and depths beyond ``num_nextn_predict_layers``, are dropped); per-expert matrices
    ``...experts.{e}.{proj}.weight`` are stacked by ``stack([a_0, ..., a_{E-1}])`` into (E, ...);
    transformers' packed ``experts.gate_up_proj`` (E, 2I, H) is sliced into ``gate_proj`` and ``up_proj``
    (E, I, H); a tied ``lm_head.weight`` is dropped, and so are the zero-size ``shared_experts`` tensors that
    transformers writes for ``n_shared_experts`` 0 (a module of width 0, which adds 0 there and does not exist
    here). Raises ``ValueError`` when an expert is missing.
    """
    n = cfg.num_hidden_layers
    weights = dict(weights)
    for name in [k for k in weights if k.endswith(".weight_scale_inv")]:
        w = name[: -len("_scale_inv")]
        weights[w] = dequant(weights[w], weights.pop(name))
    out, experts = {}, {}
    for name, a in weights.items():
        m = _LAYER_RE.match(name)
        if m and int(m.group(1)) >= n:
            k = int(m.group(1)) - n
            if m.group(2) in _MTP_SHARED_COPIES or k >= cfg.num_nextn_predict_layers:
                continue  # shared with the main model / MTP depth this config does not use
            name = f"mtp.{k}.{m.group(2)}"
        if cfg.n_shared_experts == 0 and ".mlp.shared_experts." in name and math.prod(a.shape) == 0:
            continue
        em, pm = _EXPERT_RE.match(name), _PACKED_RE.match(name)
        if em:
            experts.setdefault((em.group(1), em.group(3)), {})[int(em.group(2))] = a
        elif pm:
            half = a.shape[1] // 2
            out[f"{pm.group(1)}.gate_proj"], out[f"{pm.group(1)}.up_proj"] = a[:, :half], a[:, half:]
        else:
            out[name] = a
    for (base, proj), per in experts.items():
        if sorted(per) != list(range(cfg.n_routed_experts)):
            missing = sorted(set(range(cfg.n_routed_experts)) - set(per))
            raise ValueError(f"checkpoint: {base} lacks experts {missing[:8]} for {proj}")
        out[f"{base}.{proj}"] = stack([per[e] for e in range(cfg.n_routed_experts)])
    if cfg.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


# ---------------------------------------------------------------- torch


def to_hf_state_dict(model) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Our ``state_dict`` -> (main, mtp) dicts of Hugging Face names (`to_hf_names`), experts unstacked, the MTP
    layers' embedding and head cloned (safetensors refuses tensors that share memory)."""
    return to_hf_names(model.state_dict(), model.config, torch.unbind, lambda t: t.detach().clone())


def from_hf_state_dict(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Hugging Face names -> our ``state_dict`` names (`from_hf_names`): MTP layers to ``mtp.{k}``, experts
    stacked, FP8 blocks dequantized with `reference.fp8.weight_dequant`. Raises ``ValueError`` on missing
    experts."""
    from .fp8 import weight_dequant

    return from_hf_names(sd, cfg, torch.stack, lambda w, s: weight_dequant(w, s.float(), dtype=torch.float32))


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


def mtp_depths(names: Iterable[str], num_hidden_layers: int) -> list[int]:
    """The MTP depths that Hugging Face tensor ``names`` hold: every k with a ``model.layers.{num_hidden_layers +
    k}.*`` tensor, sorted."""
    depths = {int(m.group(1)) - num_hidden_layers for m in map(_LAYER_RE.match, names) if m}
    return sorted(k for k in depths if k >= 0)


def config_for_weights(path, names: Iterable[str], missing_mtp: str = "drop") -> tuple[ModelConfig, list[int]]:
    """The config to build for the checkpoint directory ``path`` whose tensors are named ``names`` (Hugging Face
    names), and the MTP depths the model must keep freshly initialized.

    When ``config.json`` asks for D MTP depths (``num_nextn_predict_layers``) and the files hold fewer, a
    `CheckpointWarning` names the missing depths and their layers, and ``missing_mtp`` decides: ``"drop"`` builds
    the model with the depths the files hold (they must be 0..m-1), ``"init"`` keeps all D and returns the
    missing ones (their weights keep the model's fresh initialization, drawn from the caller's RNG). Depths
    beyond D are ignored. Raises ``ValueError`` for another ``missing_mtp``, for a gap in the held depths under
    ``"drop"`` (naming the missing depth), or from `ModelConfig.from_dict`; ``FileNotFoundError`` without
    ``config.json``. The warning is a `CheckpointWarning`.
    """
    if missing_mtp not in MISSING_MTP:
        raise ValueError(f"missing_mtp={missing_mtp!r}; expected one of {MISSING_MTP}")
    fields = hf_to_fields(read_config_json(path))
    n = fields.get("num_hidden_layers", ModelConfig.num_hidden_layers)
    wanted = fields.get("num_nextn_predict_layers", ModelConfig.num_nextn_predict_layers)
    if not isinstance(n, int) or not isinstance(wanted, int):
        return ModelConfig.from_dict(fields), []  # raises, naming the field
    held = [k for k in mtp_depths(names, n) if k < wanted]
    missing = [k for k in range(wanted) if k not in held]
    if not missing:
        return ModelConfig.from_dict(fields), []
    if missing_mtp == "drop":
        if held != list(range(len(held))):
            raise ValueError(f"checkpoint {os.fspath(path)!r}: MTP depths {held} are not consecutive from 0: depth "
                             f"{missing[0]} (model.layers.{n + missing[0]}.*) is missing")
        fields["num_nextn_predict_layers"] = len(held)
    s = "" if len(missing) == 1 else "s"
    which = ", ".join(f"{k}: model.layers.{n + k}.*" for k in missing)
    has = f"depth{'' if len(held) == 1 else 's'} {held}" if held else "none"
    action = f"loading without {'it' if s == '' else 'them'}" if missing_mtp == "drop" else "initialized fresh"
    warnings.warn(f"checkpoint {os.fspath(path)!r}: config.json asks for {wanted} MTP depth"
                  f"{'' if wanted == 1 else 's'} but the weights hold {has} (missing depth{s} {which}); {action}",
                  CheckpointWarning, stacklevel=3)
    return ModelConfig.from_dict(fields), missing if missing_mtp == "init" else []


def mismatch(where: str, missing: list[str], unexpected: list[str], against: str = "its config.json") -> str:
    """The one-line message for tensors a model expects and a checkpoint lacks (``missing``) or holds beyond it
    (``unexpected``): ``"<where> does not match <against>: missing [...], unexpected [...]"``, each list only
    when not empty and cut after 6 names."""
    parts = [f"{what} {names[:6]}{' ...' if len(names) > 6 else ''}"
             for what, names in (("missing", missing), ("unexpected", unexpected)) if names]
    return f"{where} does not match {against}: {', '.join(parts)}"


def dtype_name(dtype) -> str:
    """The config.json name of a torch or MLX dtype: ``torch.bfloat16`` / ``mlx.core.bfloat16`` -> 'bfloat16'."""
    return str(dtype).rsplit(".", 1)[-1]


def load_model(cls, path, device=None, dtype=None, missing_mtp: str = "drop"):
    """Build ``cls(config)`` from ``path``/config.json and load its weights (strictly: every parameter
    present with the right shape), in eval mode, in float32 unless ``dtype`` is given (whatever the files
    store, as ``runtime_mlx.checkpoint.load_model``). MTP depths that config.json asks for and the files lack are
    dropped or initialized fresh, with a warning (``missing_mtp``, see `config_for_weights`). Raises
    ``FileNotFoundError`` / ``ValueError`` naming missing, unexpected or mis-shaped tensors."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path!r} does not exist")
    hf = read_safetensors(path)
    cfg, fresh = config_for_weights(path, hf, missing_mtp)
    model = cls(cfg)
    sd = from_hf_state_dict(hf, cfg)
    expected = model.state_dict()
    fresh_names = tuple(f"mtp.{k}." for k in fresh)
    missing = sorted(k for k in expected if k not in sd and not k.startswith("rotary.")
                     and not (cfg.tie_word_embeddings and k == "lm_head.weight") and not k.startswith(fresh_names))
    unexpected = sorted(k for k in sd if k not in expected)
    if missing or unexpected:
        raise ValueError(mismatch(f"checkpoint {path!r}", missing, unexpected))
    for k, t in sd.items():
        if t.shape != expected[k].shape:
            raise ValueError(f"checkpoint {path!r}: {k} has shape {tuple(t.shape)}, config expects "
                             f"{tuple(expected[k].shape)}")
    model.load_state_dict(sd, strict=False)
    if dtype is not None:
        model = model.to(dtype)
    if device is not None:
        model = model.to(device)
    return model.eval()  # as transformers' from_pretrained: inference mode (no dropout, no MoE load counting)


def save_model(model, path, tokenizer_file=None) -> None:
    """Write the checkpoint directory ``path`` atomically (`write_model_dir`) with the tensors of
    `to_hf_state_dict`, moved to the CPU; config.json states the embedding's dtype (as transformers' ``model.dtype``,
    the first floating parameter's)."""
    main, mtp = to_hf_state_dict(model)
    write_model_dir(path, model.config, main, mtp, lambda t, f: save_file(_cpu(t), f, metadata={"format": "pt"}),
                    tokenizer_file, dtype=dtype_name(model.model.embed_tokens.weight.dtype))


def write_model_dir(path, config: ModelConfig, main: dict, mtp: dict, save: Callable, tokenizer_file=None,
                    dtype: str | None = None) -> None:
    """Write a checkpoint directory atomically: ``config.json`` (stating ``dtype``, the stored weights' dtype
    name, as ``torch_dtype`` and ``dtype``: `ModelConfig.to_dict`), ``save(main, ".../model.safetensors")``,
    ``save(mtp, ".../mtp.safetensors")`` when ``mtp`` is not empty and a copy of ``tokenizer_file`` go to a
    temporary sibling directory that is renamed over ``path`` at the end (`replace_dir`), so a crash never leaves
    a half-written checkpoint; on any error the temporary directory is removed and the error re-raised."""
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=parent)
    try:
        config.save_json(os.path.join(tmp, "config.json"), dtype)
        save(main, os.path.join(tmp, "model.safetensors"))
        if mtp:
            save(mtp, os.path.join(tmp, "mtp.safetensors"))
        if tokenizer_file is not None:
            shutil.copyfile(tokenizer_file, os.path.join(tmp, "tokenizer.json"))
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: t.detach().cpu().contiguous() for k, t in tensors.items()}


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
