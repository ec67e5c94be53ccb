"""``dsfs export``: write a checkpoint out for other tools, optionally in DeepSeek's FP8 layout.

`export` reads any checkpoint dsfs opens (a model directory, ours or one saved by ``transformers``, a run's
``final/`` or ``checkpoints/step_N``, a run or checkpoints directory: `dsfs.checkpointing.resolve_model_dir`) and
writes a Hugging Face directory as ``save_pretrained`` does (``config.json``, ``model.safetensors``, ``mtp.safetensors``
with the MTP layers, ``tokenizer.json`` and ``tokenizer_config.json`` when the source has them, ``checksums.json``),
atomically (a temporary sibling renamed into place: `reference.checkpoint.write_model_dir`). Unquantized tensors
keep the dtype the source stores them in.

``fp8``: the matrices that DeepSeek-V3's released checkpoint stores in FP8 (`reference.fp8_checkpoint.fp8_weight_name`)
become float8_e4m3fn ``weight`` + float32 ``weight_scale_inv`` in 128 x 128 blocks (`reference.fp8.weight_quant`),
and ``config.json`` gets DeepSeek's ``quantization_config`` (`reference.config.fp8_quantization_config`, with
``"scale_fmt": "ue8m0"`` for power-of-two scales as DeepSeek-V3.1's). ``transformers`` (FineGrainedFP8), mlx_lm
(its deepseek_v3 ``sanitize`` dequantizes) and dsfs (dequantized, or ``keep_fp8``) open it unchanged.

``gguf``: one GGUF file for llama.cpp (`dsfs.gguf_export`: architecture ``deepseek2``, or ``deepseek32`` for V3.2's
DSA), tensors in ``outtype``. ``coreml``: an ``.mlpackage`` for Apple's Core ML (`dsfs.coreml_export`): a fixed-length
prefill and a KV-cache decode step. Both are written to a hidden temporary sibling and renamed into place.

``FORMATS`` lists the output formats.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dsfs.checkpointing import load_model_dir, resolve_model_dir
from dsfs.errors import UserError
from reference.checkpoint import DiskFullError, dtype_name, is_disk_full, replace_dir, to_hf_state_dict, write_model_dir
from reference.config import FP8_SCALE_FMTS, fp8_quantization_config, read_config_json
from reference.fp8 import FP8_DTYPE
from reference.fp8_checkpoint import quantize_tensors
from reference.v4_checkpoint import to_disk_names
from reference.v4_model import V4Model

FORMATS = ("hf", "gguf", "coreml")


class ExportError(UserError):
    """``dsfs export``: an existing output without ``--overwrite``, an option it cannot honour."""


def stored_dtypes(model_dir: str | os.PathLike) -> dict[str, torch.dtype]:
    """The dtype of every tensor of the checkpoint directory's safetensors files, by its stored name (read from the
    file headers only)."""
    out = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            for k in h.keys():
                out[k] = h.get_slice(k).get_dtype()
    names = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
    return {k: names[v] for k, v in out.items() if v in names}


def _config_dtype(model_dir) -> torch.dtype | None:
    """The float dtype ``config.json`` states the weights are stored in (``dtype`` / ``torch_dtype``), or None."""
    d = read_config_json(model_dir)
    name = d.get("dtype") or d.get("torch_dtype")
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point and dtype != FP8_DTYPE else None


def _check_out(out: Path, keep: tuple[Path, ...], overwrite: bool, fmt: str = "hf") -> None:
    """Raise `ExportError` unless ``out`` may be written: not one of ``keep`` (the checkpoint, the run it
    was given as, the working directory) nor a folder holding one of them; when it exists, only with ``overwrite``,
    and only what this format writes (replacing deletes it): for 'hf' a directory that is empty or holds a model
    (``config.json``), for 'gguf' a GGUF file (its first bytes ``GGUF``), for 'coreml' an ``.mlpackage``
    (``Manifest.json``)."""
    target = out.resolve()
    for k in keep:
        if k.resolve().is_relative_to(target):
            raise ExportError(f"--out {out} is or holds {k} (the checkpoint being exported, its run, or the working "
                              "directory); choose another directory")
    if fmt == "coreml" and out.suffix != ".mlpackage":
        raise ExportError(f"--out {out}: expected a path ending in .mlpackage (Core ML's package format)")
    if not out.exists():
        return
    if not overwrite:
        raise ExportError(f"--out {out} already exists; pass --overwrite to replace it")
    if fmt == "gguf":
        if not out.is_file():
            raise ExportError(f"--out {out} is not a file; expected the GGUF file to write")
        with open(out, "rb") as f:
            if f.read(4) != b"GGUF":
                raise ExportError(f"--out {out} is not a GGUF file, so --overwrite will not replace it; choose "
                                  "another path")
        return
    if fmt == "coreml":
        if not (out / "Manifest.json").is_file():
            raise ExportError(f"--out {out} is not a Core ML package (no Manifest.json), so --overwrite will not "
                              "replace it; choose another path")
        return
    if not out.is_dir():
        raise ExportError(f"--out {out} is a file; expected a directory to write")
    if any(out.iterdir()) and not (out / "config.json").is_file():
        raise ExportError(f"--out {out} holds files but no config.json: not a model directory, so --overwrite will "
                          "not replace it; choose another directory")


def _write_atomic(out: Path, write) -> None:
    """Run ``write(tmp)`` on a hidden temporary sibling path of ``out`` and rename the result over ``out`` (a file
    with ``os.replace``, a directory with `replace_dir`), so a crash never leaves a half-written export under its
    own name. On any error the temporary path is removed and the error re-raised; a full disk as `DiskFullError`."""
    parent = out.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=parent))
    except OSError as e:
        raise ExportError(f"--out {out}: cannot write in {parent} ({e.strerror or e})") from None
    tmp = tmp_dir / out.name
    try:
        write(tmp)
        if tmp.is_dir():
            replace_dir(str(tmp), str(out))
        else:
            os.replace(tmp, out)
    except BaseException as e:
        if isinstance(e, Exception) and is_disk_full(e, parent):
            raise DiskFullError(str(out)) from e
        raise
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def export(checkpoint: str | os.PathLike, out: str | os.PathLike, fmt: str = "hf", fp8: bool = False,
           scale_fmt: str | None = None, overwrite: bool = False, outtype: str | None = None,
           prefill_len: int | None = None, context_len: int | None = None) -> dict:
    """Write the model of ``checkpoint`` to ``out`` in format ``fmt``: 'hf' a Hugging Face directory, 'gguf' one
    GGUF file for llama.cpp (`dsfs.gguf_export.write_gguf`, tensors in ``outtype``: `dsfs.gguf_export.OUTTYPES`,
    default f16 as llama.cpp's converter), 'coreml' an ``.mlpackage`` (`dsfs.coreml_export.write_coreml`: a prefill
    of ``prefill_len`` tokens and a decode step over a cache of ``context_len`` positions).

    'hf' only: ``fp8``, DeepSeek's FP8 layout, ``scale_fmt`` None (float32 scales amax / 448) or 'ue8m0' (powers of
    two). Each unquantized tensor keeps the dtype the source stores it in (config.json's ``dtype``, else float32, for
    one the source stores in FP8 or does not hold as such).

    Returns ``{"model_dir", "out", "format", "tensors", "bytes", ...}`` (the source directory, the output, the
    format, the tensors written, the bytes written; 'hf' adds ``fp8_tensors``, the writers their own fields).
    Raises `ExportError` (a `UserError`) for an ``out`` that exists without ``overwrite``, is the source or is not
    what ``fmt`` writes, an unknown ``fmt``, ``scale_fmt`` or ``outtype``, an option of another format, a model the
    format cannot express; `dsfs.errors.CheckpointError` for a checkpoint that cannot be loaded; ``OSError`` from
    the write (`reference.checkpoint.DiskFullError` for a full disk).
    """
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt}: expected one of {', '.join(FORMATS)}")
    if scale_fmt is not None and scale_fmt not in FP8_SCALE_FMTS:
        raise ExportError(f"--scale-fmt {scale_fmt}: expected one of {', '.join(FP8_SCALE_FMTS)}")
    if scale_fmt is not None and not fp8:
        raise ExportError("--scale-fmt applies to --fp8 exports (the scales of the FP8 weights)")
    if fp8 and fmt != "hf":
        raise ExportError(f"--fp8 applies to --format hf; for --format {fmt} choose the tensor type with --outtype"
                          if fmt == "gguf" else "--fp8 applies to --format hf")
    if outtype is not None and fmt != "gguf":
        raise ExportError(f"--outtype applies to --format gguf, not {fmt}")
    if (prefill_len is not None or context_len is not None) and fmt != "coreml":
        raise ExportError(f"--prefill-len and --context-len apply to --format coreml, not {fmt}")
    if fmt == "gguf":
        from dsfs.gguf_export import OUTTYPES
        outtype = outtype or "f16"
        if outtype not in OUTTYPES:
            raise ExportError(f"--outtype {outtype}: expected one of {', '.join(OUTTYPES)}")
    if not str(out).strip():  # before Path(), which reads "" as "."
        raise ExportError("--out is empty; expected the path to write")
    model_dir = resolve_model_dir(checkpoint)
    out = Path(out)
    _check_out(out, (model_dir, Path(checkpoint), Path.cwd()), overwrite, fmt)
    model = load_model_dir(model_dir)  # float32, validated: checksums, finite weights, names and shapes
    v4 = isinstance(model, V4Model)
    if v4 and (fmt != "hf" or fp8):
        what = "--fp8" if fmt == "hf" else f"--format {fmt}"
        raise ExportError(f"{what}: not supported for DeepSeek-V4 (model_type deepseek_v4) yet; --format hf without "
                          "--fp8 writes it")
    if fmt == "gguf":
        from dsfs.gguf_export import check_gguf, write_gguf
        check_gguf(model.config)  # before any file is written
        r = {}
        _write_atomic(out, lambda tmp: r.update(write_gguf(model, model_dir, tmp, outtype)))
        return {"model_dir": str(model_dir), "out": str(out), "format": fmt, **r,
                "bytes": out.stat().st_size}
    if fmt == "coreml":
        from dsfs.coreml_export import check_coreml, write_coreml
        check_coreml(model.config, prefill_len, context_len)
        r = {}
        _write_atomic(out, lambda tmp: r.update(write_coreml(model, tmp, prefill_len, context_len)))
        return {"model_dir": str(model_dir), "out": str(out), "format": fmt, **r,
                "bytes": sum(f.stat().st_size for f in out.rglob("*") if f.is_file())}
    if v4:  # transformers' names, MTP blocks as mtp.{k}.* (reference.v4_checkpoint)
        disk = to_disk_names(model.state_dict(), model.config)
        main = {k: v for k, v in disk.items() if not k.startswith("mtp.")}
        mtp = {k: v for k, v in disk.items() if k.startswith("mtp.")}
    else:
        main, mtp = to_hf_state_dict(model)
    stored, fallback = stored_dtypes(model_dir), _config_dtype(model_dir) or torch.float32

    def finish(tensors: dict) -> dict:
        tensors = {k: t.detach().to("cpu", stored.get(k, fallback)).contiguous() for k, t in tensors.items()}
        return quantize_tensors(tensors, scale_fmt) if fp8 else tensors

    main, mtp = finish(main), finish(mtp)
    config = model.config
    if fp8:
        config = dataclasses.replace(config, extra={**config.extra, "quantization_config":
                                                    fp8_quantization_config(scale_fmt)})
    tokenizer = model_dir / "tokenizer.json"
    write_model_dir(out, config, main, mtp, lambda t, f: save_file(t, f, metadata={"format": "pt"}),
                    tokenizer if tokenizer.is_file() else None, dtype_name(main["model.embed_tokens.weight"].dtype))
    written = {**main, **mtp}
    return {"model_dir": str(model_dir), "out": str(out), "format": fmt,
            "fp8_tensors": sum(t.dtype == FP8_DTYPE for t in written.values()),
            "tensors": len(written), "bytes": sum(f.stat().st_size for f in out.glob("*.safetensors"))}
