"""Training-state checkpoints and locating model directories.

A run directory (``dsfs train --out``) holds::

    checkpoints/step_000050/   a Hugging Face model directory (config.json, model.safetensors,
                               mtp.safetensors, tokenizer.json) plus trainer_state.pt
    final/                     the model at the end of the run (Hugging Face directory only)
    metrics.jsonl, loss.png

Each ``step_*`` directory is written to a hidden temporary sibling (``.tmp-step_*``) and renamed into place
when complete, so a crash or Ctrl-C during a save never leaves a partial ``step_*`` directory; a killed
process may leave a ``.tmp-*`` directory behind, which every reader ignores.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch

from dsfs.errors import CheckpointError
from reference.checkpoint import replace_dir

STATE_FILE = "trainer_state.pt"
STATE_FORMAT = 1
CHECKPOINTS = "checkpoints"
FINAL = "final"
_STEP_RE = re.compile(r"^step_(\d{6,})$")


def step_dir_name(step: int) -> str:
    """``step_{step:06d}``."""
    return f"step_{step:06d}"


def list_checkpoints(ckpt_dir: str | os.PathLike) -> list[Path]:
    """Complete ``step_*`` directories of ``ckpt_dir`` (those holding ``trainer_state.pt``), oldest first.

    Returns ``[]`` when ``ckpt_dir`` does not exist. Temporary ``.tmp-*`` directories are ignored.
    """
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    found = []
    for p in d.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(path: str | os.PathLike) -> Path | None:
    """The newest training checkpoint under ``path``: a ``step_*`` directory itself, a ``checkpoints``
    directory, or a run directory holding ``checkpoints/``. ``None`` when there is none."""
    p = Path(path)
    if (p / STATE_FILE).is_file():
        return p
    for d in (p / CHECKPOINTS, p):
        found = list_checkpoints(d)
        if found:
            return found[-1]
    return None


def resolve_model_dir(path: str | os.PathLike) -> Path:
    """The Hugging Face model directory that ``path`` names.

    ``path``: a model directory (holds ``config.json``), a run directory (its ``final/`` or newest
    ``checkpoints/step_*``, whichever was written last), or a ``checkpoints`` directory (its newest step).
    Raises ``CheckpointError`` when ``path`` does not exist or holds no model.
    """
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"{p}: no such checkpoint directory")
    if (p / "config.json").is_file():
        return p
    candidates = [c for c in (p / FINAL, latest_checkpoint(p)) if c is not None and (c / "config.json").is_file()]
    if not candidates:
        raise CheckpointError(
            f"{p}: not a model directory (no config.json) and holds no final/ or checkpoints/step_* model"
        )
    return max(candidates, key=lambda c: (c / "config.json").stat().st_mtime_ns)


def save_checkpoint(
    model,
    state: dict,
    ckpt_dir: str | os.PathLike,
    step: int,
    tokenizer_file: str | os.PathLike | None = None,
    keep_last: int | None = 3,
) -> Path:
    """Write ``ckpt_dir/step_{step:06d}`` atomically and prune old ones; return the directory.

    The model goes through ``model.save_pretrained`` (Hugging Face format, ``tokenizer_file`` copied in) and
    ``state`` (a dict of tensors and plain Python values: optimizer state, RNG states, counters) to
    ``trainer_state.pt``, both into a temporary sibling that is renamed over the step directory at the end.
    On any error (including KeyboardInterrupt) the temporary directory is removed and the error re-raised;
    existing checkpoints are untouched. Then only the newest ``keep_last`` step directories are kept
    (``None`` or ``0``: keep all).
    """
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / step_dir_name(step)
    tmp = ckpt_dir / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, tokenizer_file=tokenizer_file)
        _write_state(state, tmp / STATE_FILE)
        replace_dir(str(tmp), str(final))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep_last:
        for old in list_checkpoints(ckpt_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _write_state(state: dict, path: Path) -> None:
    torch.save({"format": STATE_FORMAT, **state}, path)


def load_trainer_state(step_dir: str | os.PathLike) -> dict:
    """Read ``step_dir/trainer_state.pt`` (tensors on CPU, ``weights_only`` unpickling).

    Raises ``CheckpointError`` when the file is missing, unreadable or not a trainer state of this format.
    """
    path = Path(step_dir) / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file; {step_dir} is not a training checkpoint")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, bad pickle, ...: all mean the same to the user
        raise CheckpointError(f"{path}: corrupt trainer state ({type(e).__name__}: {str(e).splitlines()[0]})") from e
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{path}: not a dsfs trainer state (format {STATE_FORMAT})")
    return state


def load_model_dir(path: str | os.PathLike, model_cls=None, device=None):
    """``model_cls.from_pretrained(path)`` (default ``reference.Model``) moved to ``device``; errors from a
    missing or corrupt ``config.json`` / safetensors become ``CheckpointError`` naming the file."""
    if model_cls is None:
        from reference import Model as model_cls
    try:
        return model_cls.from_pretrained(path, device=device)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot load the model in {path}: {str(e).splitlines()[0]}") from e
