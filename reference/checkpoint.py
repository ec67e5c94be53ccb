"""Hugging Face checkpoint directories: ``config.json`` + safetensors with DeepSeek-V3 parameter names.

Files written: ``config.json``, ``model.safetensors`` (the main model) and, when the model has MTP modules,
``mtp.safetensors`` holding them as layers ``model.layers.{num_hidden_layers + k}.*`` (with ``enorm``,
``hnorm``, ``eh_proj``, ``shared_head.norm``, and copies of ``embed_tokens``/``shared_head.head`` as in the
released DeepSeek-V3 weights). The MTP file is separate because ``transformers`` reads only
``model.safetensors`` and ``mlx_lm`` only ``model*.safetensors``, and mlx-lm's deepseek_v3 would reject the
extra layers; both then open the directory unchanged. Reading accepts sharded checkpoints
(``model.safetensors.index.json``), per-expert or stacked (``experts.gate_up_proj``) expert weights, and
FP8 weights with ``weight_scale_inv`` (dequantized in 128x128 blocks, or kept in FP8 for inference with
``keep_fp8``: `reference.fp8_checkpoint`).

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

Safety of what we write (`write_model_dir`, every backend):
- Atomic: the files go to a hidden ``.tmp-*`` sibling renamed into place at the end; a directory replaced or deleted
  is first renamed to a hidden ``.old-*`` sibling (`replace_dir`, `remove_dir`). A killed process leaves only such
  hidden siblings, which readers ignore and ``dsfs`` deletes on its next start in the run directory.
- ``checksums.json`` is written last: ``files`` lists every file of the directory, ``sha256`` the digests of the
  binary ones (weights, a trainer state); ``config.json`` and ``tokenizer.json`` are listed but not hashed (text a
  user may edit, checked when parsed). A directory with it is complete when it holds config.json and every file with
  a digest (`missing_files`). Loading verifies the digests when the file is there (`verify_checksums`);
  a directory without it is one written elsewhere (``transformers``, ``mlx_lm``) or before checksums, and loads
  unverified. Every loaded float tensor must be finite (`check_finite`).
- Files and directories follow the umask (0644 / 0755 under umask 022), as every other file (`follow_umask`).
- A full disk is one error, `DiskFullError` ("disk full while writing <dir>"), whatever the writer raised.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Callable, Iterable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import ModelConfig, fp8_scale_fmt, hf_to_fields, read_config_json

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


def load_model(cls, path, device=None, dtype=None, missing_mtp: str = "drop", keep_fp8: bool = False, ops=None):
    """Build ``cls(config)`` from ``path``/config.json and load its weights (strictly: every parameter
    present with the right shape), in eval mode, in float32 unless ``dtype`` is given (whatever the files
    store, as ``runtime_mlx.checkpoint.load_model``). MTP depths that config.json asks for and the files lack are
    dropped or initialized fresh, with a warning (``missing_mtp``, see `config_for_weights`).

    ``keep_fp8``: an FP8 checkpoint's FP8 matrices stay FP8 (`reference.fp8_checkpoint.keep_fp8_state_dict`:
    `FP8WeightLinear` / `FP8WeightExperts` modules running ``ops``' FP8 GEMMs, activations quantized with config.json's
    ``scale_fmt``; inference only); ``dtype`` then applies to the other weights. Otherwise FP8 weights are
    dequantized. Raises ``FileNotFoundError`` / ``ValueError`` naming missing, unexpected or mis-shaped tensors, a
    file that does not match ``checksums.json`` (`verify_checksums`), the first stored tensor that is not finite
    (`check_finite`), or, with ``keep_fp8``, a checkpoint without FP8 weights."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path!r} does not exist")
    if read_config_json(path).get("model_type") == "deepseek_v4":
        if keep_fp8:
            raise ValueError(f"checkpoint {path!r}: keep_fp8 is not supported for DeepSeek-V4")
        from .v4_checkpoint import load_v4

        return load_v4(getattr(cls, "v4_class", None) or cls, path, device=device, dtype=dtype)
    verify_checksums(path)
    hf = read_safetensors(path)
    check_finite(hf, path, _finite)
    cfg, fresh = config_for_weights(path, hf, missing_mtp)
    model = cls(cfg)
    if keep_fp8:
        from .fp8_checkpoint import default_ops, keep_fp8_state_dict

        try:
            sd = keep_fp8_state_dict(model, hf, fp8_scale_fmt(read_config_json(path)), ops or default_ops(cls, device))
        except ValueError as e:
            raise ValueError(f"checkpoint {path!r}: {e}") from e
    else:
        sd = from_hf_state_dict(hf, cfg)
    fresh_names = tuple(f"mtp.{k}." for k in fresh)
    return load_strict(model, sd, path, device, dtype, optional=lambda k: k.startswith(("rotary.", *fresh_names)))


def load_strict(model, sd: dict, path, device=None, dtype=None, optional: Callable[[str], bool] = lambda k: False):
    """Load the state dict ``sd`` into ``model`` strictly: every tensor of the model present (except a tied
    ``lm_head.weight`` and those ``optional`` accepts), none beyond them, every shape as the config expects; then
    ``dtype``, ``device``, and eval mode (as transformers' ``from_pretrained``: no dropout, no MoE load counting).
    Returns the model. Raises ``ValueError`` naming the missing, unexpected or mis-shaped tensors of checkpoint
    ``path``."""
    expected = model.state_dict()
    tied = model.config.tie_word_embeddings
    missing = sorted(k for k in expected if k not in sd and not optional(k) and not (tied and k == "lm_head.weight"))
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
    return model.eval()


def save_model(model, path, tokenizer_file=None) -> None:
    """Write the checkpoint directory ``path`` atomically (`write_model_dir`) with the tensors of
    `to_hf_state_dict`, moved to the CPU; config.json states the embedding's dtype (as transformers' ``model.dtype``,
    the first floating parameter's). Raises ``ValueError`` for a model loaded with ``keep_fp8`` (not supported)."""
    from .fp8_checkpoint import check_not_fp8

    check_not_fp8(model, "save_pretrained")
    main, mtp = to_hf_state_dict(model)
    write_model_dir(path, model.config, main, mtp, lambda t, f: save_file(_cpu(t), f, metadata={"format": "pt"}),
                    tokenizer_file, dtype=dtype_name(model.model.embed_tokens.weight.dtype))


TOKENIZER_CONFIG = "tokenizer_config.json"


def copy_tokenizer(tokenizer_file, path) -> None:
    """Copy ``tokenizer_file`` into the directory ``path`` as ``tokenizer.json``, with the ``tokenizer_config.json``
    beside it when there is one (``dsfs prepare`` writes it: bos/eos/pad and the chat template, for transformers);
    nothing when ``tokenizer_file`` is None."""
    if tokenizer_file is None:
        return
    shutil.copyfile(tokenizer_file, os.path.join(path, "tokenizer.json"))
    tokenizer_config = os.path.join(os.path.dirname(os.path.abspath(tokenizer_file)), TOKENIZER_CONFIG)
    if os.path.isfile(tokenizer_config):
        shutil.copyfile(tokenizer_config, os.path.join(path, TOKENIZER_CONFIG))


def write_model_dir(path, config: ModelConfig, main: dict, mtp: dict, save: Callable, tokenizer_file=None,
                    dtype: str | None = None) -> None:
    """Write a checkpoint directory atomically: ``config.json`` (stating ``dtype``, the stored weights' dtype
    name, as ``torch_dtype`` and ``dtype``: `ModelConfig.to_dict`), ``save(main, ".../model.safetensors")``,
    ``save(mtp, ".../mtp.safetensors")`` when ``mtp`` is not empty, a copy of ``tokenizer_file`` (as
    ``tokenizer.json``) with the ``tokenizer_config.json`` beside it when there is one (``dsfs prepare`` writes it:
    bos/eos/pad and the chat template) and, last, ``checksums.json`` (`write_checksums`) go to a temporary sibling
    directory ``.tmp-<name>-*`` that is renamed over ``path`` at the end (`replace_dir`), so a crash never leaves a
    half-written checkpoint. Modes follow the umask (`follow_umask`). On any error the temporary directory is
    removed and the error re-raised; a full disk as `DiskFullError` naming ``path``."""
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=parent)
    try:
        config.save_json(os.path.join(tmp, "config.json"), dtype)
        save(main, os.path.join(tmp, "model.safetensors"))
        if mtp:
            save(mtp, os.path.join(tmp, "mtp.safetensors"))
        copy_tokenizer(tokenizer_file, tmp)
        write_checksums(tmp)
        follow_umask(tmp)
        replace_dir(tmp, path)
    except BaseException as e:
        full = isinstance(e, Exception) and is_disk_full(e, parent)
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            raise DiskFullError(path) from e
        raise


def _finite(t: torch.Tensor) -> bool:
    """No NaN or inf in a float tensor of 2 bytes or more (FP8 e4m3 bytes are not checked)."""
    return not t.is_floating_point() or t.element_size() == 1 or bool(torch.isfinite(t).all())


def _cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: t.detach().cpu().contiguous() for k, t in tensors.items()}


def _aside(path: str) -> str:
    """A fresh hidden sibling name for ``path`` on its way out: ``.old-<name>-<random>``."""
    return os.path.join(os.path.dirname(path), f".old-{os.path.basename(path)}-{uuid.uuid4().hex[:8]}")


def replace_dir(src: str, dst: str) -> None:
    """Move the finished directory ``src`` to ``dst`` (same filesystem), replacing any old ``dst``: the old
    one is first renamed aside (a hidden ``.old-*`` sibling) and deleted last, so at every instant a complete copy
    exists on disk and a kill leaves only hidden siblings."""
    dst = os.fspath(dst)
    old = None
    if os.path.exists(dst):
        old = _aside(dst)
        os.rename(dst, old)
    os.rename(src, dst)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def remove_dir(path) -> None:
    """Delete the directory ``path`` atomically for readers: rename it to a hidden ``.old-*`` sibling, then delete
    that, so a kill midway never leaves a partial directory under its own name."""
    old = _aside(os.fspath(path))
    os.rename(path, old)
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------- checksums, finiteness, modes, full disks

CHECKSUMS = "checksums.json"
CHECKSUMS_FORMAT = "dsfs-checksums-1"
UNHASHED = (".json",)  # text a user may edit (config.json, tokenizer.json): listed, not hashed


def file_sha256(path) -> str:
    """Hex sha256 of the file ``path``."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def read_checksums(path) -> dict | None:
    """The ``checksums.json`` of the directory ``path`` (``{"format", "files": [...], "sha256": {name: hex}}``), or
    ``None`` when it has none. Raises ``ValueError`` when it is unreadable."""
    f = os.path.join(os.fspath(path), CHECKSUMS)
    if not os.path.isfile(f):
        return None
    try:
        with open(f, encoding="utf-8") as fh:
            sums = json.load(fh)
        if sums.get("format") != CHECKSUMS_FORMAT or not isinstance(sums.get("files"), list) \
                or not isinstance(sums.get("sha256"), dict):
            raise ValueError(f"expected format {CHECKSUMS_FORMAT}")
    except (OSError, ValueError, AttributeError) as e:
        raise ValueError(f"checkpoint {os.fspath(path)!r}: unreadable {CHECKSUMS} ({e})") from e
    return sums


def write_checksums(path) -> None:
    """Write ``path/checksums.json`` (through a temporary file and a rename): every file of the directory, and the
    sha256 of each one not ending in ``.json``. Digests already in an older ``checksums.json`` are kept (a file added
    later is hashed alone)."""
    path = os.fspath(path)
    old = read_checksums(path) or {"sha256": {}}
    names = sorted(n for n in os.listdir(path) if n != CHECKSUMS and os.path.isfile(os.path.join(path, n)))
    digests = {n: old["sha256"].get(n) or file_sha256(os.path.join(path, n)) for n in names
               if not n.endswith(UNHASHED)}
    tmp = os.path.join(path, f".{CHECKSUMS}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"format": CHECKSUMS_FORMAT, "files": names, "sha256": digests}, f, indent=1)
    os.replace(tmp, os.path.join(path, CHECKSUMS))


def missing_files(path) -> list[str]:
    """The files the directory ``path`` must hold by its ``checksums.json`` and lacks: config.json and every file with
    a digest there ([] without a checksums.json; tokenizer.json may be removed by hand). Raises ``ValueError`` when
    checksums.json is unreadable."""
    sums = read_checksums(path)
    if sums is None:
        return []
    return [n for n in ("config.json", *sums["sha256"]) if not os.path.isfile(os.path.join(os.fspath(path), n))]


def verify_checksums(path, names: Iterable[str] | None = None) -> None:
    """Check the files of the directory ``path`` against its ``checksums.json`` (all hashed files, or only
    ``names``); nothing to check without one. Raises ``ValueError``: "checkpoint '<path>': <file> does not match its
    checksum (corrupted?)", or "<file> is missing (an incomplete checkpoint)"."""
    sums = read_checksums(path)
    if sums is None:
        return
    path = os.fspath(path)
    for n in missing_files(path):
        raise ValueError(f"checkpoint {path!r}: {n} is missing (an incomplete checkpoint)")
    for n, digest in sums["sha256"].items():
        if (names is None or n in names) and file_sha256(os.path.join(path, n)) != digest:
            raise ValueError(f"checkpoint {path!r}: {n} does not match its checksum (corrupted? delete {CHECKSUMS} "
                             "to load a file edited on purpose)")


def check_finite(tensors: dict, where, finite: Callable) -> None:
    """Raise ``ValueError`` naming the first tensor of ``tensors`` (name -> array) for which ``finite(a)`` is false:
    "checkpoint '<where>': tensor <name> holds non-finite values (NaN or inf)"."""
    for name, a in tensors.items():
        if not finite(a):
            raise ValueError(f"checkpoint {os.fspath(where)!r}: tensor {name} holds non-finite values (NaN or inf)")


def follow_umask(path) -> None:
    """Give the directory ``path`` mode ``0o777 & ~umask`` and its files ``0o666 & ~umask``, as ``mkdir`` and
    ``open`` would (``tempfile.mkdtemp`` makes 0700 and safetensors 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    path = os.fspath(path)
    os.chmod(path, 0o777 & ~mask)
    for n in os.listdir(path):
        f = os.path.join(path, n)
        if os.path.isfile(f) and not os.path.islink(f):
            os.chmod(f, 0o666 & ~mask)


class DiskFullError(OSError):
    """The disk filled up while writing ``path``; ``str()`` is "disk full while writing <path>"."""

    def __init__(self, path):
        super().__init__(errno.ENOSPC, f"disk full while writing {os.fspath(path)}")
        self.path = os.fspath(path)

    def __str__(self) -> str:
        return self.strerror


_FULL_WORDS = ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122")
# what writers that lose the errno say about a failed write: torch's zip writer, MLX's safetensors writer
_WRITE_FAILED_WORDS = ("unexpected pos", "file write failed", "Unable to write", "iostream error")
LOW_SPACE = 1 << 20


def is_disk_full(e: BaseException, where) -> bool:
    """Whether the error ``e`` of a write under the directory ``where`` means a full disk (or quota): an ``OSError``
    with ``ENOSPC`` / ``EDQUOT`` anywhere in its chain, a message saying so (safetensors' ``SafetensorError``), or a
    failed write from a writer that drops the errno (torch's ``RuntimeError`` "unexpected pos", MLX's "Unable to
    write") while the filesystem of ``where`` has under 1 MiB free."""
    chain, x = [], e
    while x is not None and len(chain) < 8:
        chain.append(x)
        x = x.__cause__ or x.__context__
    if any(isinstance(x, OSError) and x.errno in (errno.ENOSPC, errno.EDQUOT) for x in chain):
        return True
    if any(w in str(x) for x in chain for w in _FULL_WORDS):
        return True
    if any(w in str(x) for x in chain for w in _WRITE_FAILED_WORDS):
        try:
            return shutil.disk_usage(where).free < LOW_SPACE
        except OSError:
            return False
    return False
