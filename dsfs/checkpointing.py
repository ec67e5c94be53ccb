"""Training-state checkpoints and locating model directories.

A run directory (``dsfs train --out``) holds::

    checkpoints/step_000050/   a Hugging Face model directory (config.json, model.safetensors,
                               mtp.safetensors, tokenizer.json) plus trainer_state.pt and, written last,
                               checksums.json (every file; sha256 of the weights and the trainer state)
    final/                     the model at the end of the run (Hugging Face directory with checksums.json)
    metrics.jsonl, loss.png

A directory is either complete or hidden. Each ``step_*`` directory is written to a hidden temporary sibling
(``.tmp-step_*``) and renamed into place when complete; a directory replaced or pruned is first renamed to a hidden
``.old-*`` sibling, then deleted (`reference.checkpoint.replace_dir`, `remove_dir`). A killed process leaves only
hidden siblings: every reader ignores them, and the next process to hold the run directory deletes them
(`remove_leftovers`, called by `dsfs.rundir.lock_run_dir`).

What "complete" means (`checkpoint_problem`, `model_dir_problem`): a directory with ``checksums.json`` holds
config.json and every file with a digest there (weights; tokenizer.json may be removed by hand), and a training
checkpoint lists ``trainer_state.pt`` there; loading then verifies the digests. A
``step_*`` directory without checksums.json (written before checksums) counts when it holds trainer_state.pt,
config.json and model.safetensors. A model directory without checksums.json that is not a ``step_*`` one was
written elsewhere (``transformers``, ``mlx_lm``): it loads, unverified.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch

from dsfs.errors import CheckpointError
from reference.checkpoint import (
    CHECKSUMS,
    follow_umask,
    is_disk_full,
    missing_files,
    read_checksums,
    remove_dir,
    replace_dir,
    verify_checksums,
    write_checksums,
)

STATE_FILE = "trainer_state.pt"
STATE_FORMAT = 1
CHECKPOINTS = "checkpoints"
FINAL = "final"
HIDDEN = (".tmp-", ".old-")  # a write in progress / a directory on its way out: never a checkpoint
_STEP_RE = re.compile(r"^step_(\d{6,})$")


class DiskFullError(CheckpointError):
    """The disk filled up while a checkpoint or model directory was written; the previous ones are intact."""


def step_dir_name(step: int) -> str:
    """``step_{step:06d}``."""
    return f"step_{step:06d}"


def model_dir_problem(path: str | os.PathLike) -> str | None:
    """Why the model directory ``path`` must not be read (a hidden leftover ``.tmp-*`` / ``.old-*``, a file that its
    checksums.json requires and it lacks (`reference.checkpoint.missing_files`), an unreadable checksums.json, a
    ``step_*`` directory without checksums.json and without trainer_state.pt), or ``None`` when it may be. Digests are
    verified when loading, not here."""
    p = Path(path)
    if p.name.startswith(HIDDEN):
        return "a temporary directory left by an interrupted save or deletion (ignored; the next run in its run " \
               "directory deletes it)"
    try:
        gone = missing_files(p)
        marked = read_checksums(p) is not None
    except ValueError as e:
        return str(e)
    if gone:
        return f"an incomplete checkpoint: {gone[0]} is missing"
    if not marked and _STEP_RE.match(p.name) and not (p / STATE_FILE).is_file():
        return f"an incomplete checkpoint: {STATE_FILE} is missing"
    return None


def checkpoint_problem(step_dir: str | os.PathLike) -> str | None:
    """Why ``step_dir`` is not a complete training checkpoint (see `model_dir_problem`; it must also hold
    trainer_state.pt, listed in its checksums.json, or without one config.json and model.safetensors), or ``None``."""
    p = Path(step_dir)
    problem = model_dir_problem(p)
    if problem is not None:
        return problem
    if not (p / STATE_FILE).is_file():
        return f"not a training checkpoint: {STATE_FILE} is missing"
    sums = read_checksums(p)
    if sums is not None and STATE_FILE not in sums["sha256"]:
        return f"not a training checkpoint: {CHECKSUMS} does not list {STATE_FILE}"
    if sums is None:
        for f in ("config.json", "model.safetensors"):
            if not (p / f).is_file():
                return f"an incomplete checkpoint: {f} is missing"
    return None


def list_checkpoints(ckpt_dir: str | os.PathLike) -> list[Path]:
    """Complete ``step_*`` directories of ``ckpt_dir`` (`checkpoint_problem` is ``None``), oldest first.

    Returns ``[]`` when ``ckpt_dir`` does not exist. Hidden ``.tmp-*`` / ``.old-*`` and incomplete directories are
    ignored.
    """
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    found = []
    for p in d.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir() and checkpoint_problem(p) is None:
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(path: str | os.PathLike) -> Path | None:
    """The newest complete training checkpoint under ``path``: a ``step_*`` directory itself, a ``checkpoints``
    directory, or a run directory holding ``checkpoints/``. ``None`` when there is none (an incomplete ``step_*``
    directory named itself included)."""
    p = Path(path)
    if (p / STATE_FILE).is_file() or _STEP_RE.match(p.name):
        return p if checkpoint_problem(p) is None else None
    for d in (p / CHECKPOINTS, p):
        found = list_checkpoints(d)
        if found:
            return found[-1]
    return None


def remove_leftovers(run_dir: str | os.PathLike) -> list[Path]:
    """Delete what killed processes left in the run directory ``run_dir`` and its ``checkpoints/``: hidden
    ``.tmp-*`` / ``.old-*`` entries, incomplete ``step_*`` directories (`checkpoint_problem`) and an incomplete
    ``final/``. Only for the process that holds ``run_dir`` (`dsfs.rundir.lock_run_dir` calls it). Returns what it
    deleted."""
    run_dir = Path(run_dir)
    gone = []
    for d in (run_dir, run_dir / CHECKPOINTS):
        if not d.is_dir():
            continue
        for p in sorted(d.iterdir()):
            hidden = p.name.startswith(HIDDEN)
            broken = p.is_dir() and ((d.name == CHECKPOINTS and _STEP_RE.match(p.name) and checkpoint_problem(p))
                                     or (d == run_dir and p.name == FINAL and model_dir_problem(p)))
            if hidden or broken:
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
                gone.append(p)
    return gone


def resolve_model_dir(path: str | os.PathLike) -> Path:
    """The Hugging Face model directory that ``path`` names.

    ``path``: a model directory (holds ``config.json``), a run directory (its ``final/`` or newest complete
    ``checkpoints/step_*``, whichever was written last), or a ``checkpoints`` directory (its newest step).
    Raises ``CheckpointError`` when ``path`` does not exist, holds no model or is an incomplete or hidden leftover
    directory (`model_dir_problem`).
    """
    p = Path(path)
    if not p.is_dir():
        if p.exists():
            raise CheckpointError(f"{p} is a file; expected a model, run or checkpoints directory")
        raise CheckpointError(f"{p}: no such checkpoint directory")
    if (p / "config.json").is_file() or p.name.startswith(HIDDEN):
        problem = model_dir_problem(p)
        if problem is not None:
            raise CheckpointError(f"{p}: {problem}; expected a complete model directory")
        return p
    candidates = [c for c in (p / FINAL, latest_checkpoint(p))
                  if c is not None and (c / "config.json").is_file() and model_dir_problem(c) is None]
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
    ``trainer_state.pt``, then ``checksums.json`` is completed, all in a temporary sibling ``.tmp-step_*`` that is
    renamed over the step directory at the end; modes follow the umask. On any error (including KeyboardInterrupt)
    the temporary directory is removed and the error re-raised, a full disk as `DiskFullError`; existing checkpoints
    are untouched. Then only the newest ``keep_last`` complete step directories are kept (``None`` or ``0``: keep
    all), never the one just written; each is renamed aside before it is deleted (`reference.checkpoint.remove_dir`).
    Raises ``ValueError`` for a negative or non-integer ``keep_last``, before writing anything.
    """
    if keep_last is not None and (isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 0):
        raise ValueError(f"keep_last={keep_last!r}: expected None or an integer >= 0 (0 keeps every checkpoint)")
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / step_dir_name(step)
    tmp = ckpt_dir / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, tokenizer_file=tokenizer_file)
        _write_state(state, tmp / STATE_FILE)
        write_checksums(tmp)  # last: lists trainer_state.pt too
        follow_umask(tmp)
        replace_dir(str(tmp), str(final))
    except BaseException as e:
        full = isinstance(e, Exception) and is_disk_full(e, ckpt_dir)
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            raise DiskFullError(f"disk full while writing {final}; the earlier checkpoints in {ckpt_dir} are "
                                "intact: free some space, then resume") from e
        raise
    if keep_last:
        for old in list_checkpoints(ckpt_dir)[:-keep_last]:
            if old != final:
                remove_dir(old)
    return final


def save_model_dir(model, path: str | os.PathLike, tokenizer_file: str | os.PathLike | None = None) -> Path:
    """``model.save_pretrained(path, tokenizer_file=...)`` (atomic, with checksums.json), a full disk as
    `DiskFullError` naming ``path``; return ``path``."""
    try:
        model.save_pretrained(path, tokenizer_file=tokenizer_file)
    except Exception as e:
        if is_disk_full(e, Path(path).parent):
            raise DiskFullError(f"disk full while writing {path}; free some space, then resume") from e
        raise
    return Path(path)


def _write_state(state: dict, path: Path) -> None:
    torch.save({"format": STATE_FORMAT, **state}, path)


def load_trainer_state(step_dir: str | os.PathLike) -> dict:
    """Read ``step_dir/trainer_state.pt`` (tensors on CPU, ``weights_only`` unpickling), verified against the
    directory's checksums.json when it has one.

    Raises ``CheckpointError`` when the file is missing, unreadable, does not match its checksum or is not a trainer
    state of this format.
    """
    path = Path(step_dir) / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file; {step_dir} is not a training checkpoint")
    try:
        verify_checksums(step_dir, [STATE_FILE])
    except ValueError as e:
        raise CheckpointError(f"{path}: corrupt trainer state ({str(e).splitlines()[0]})") from e
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, bad pickle, ...: all mean the same to the user
        raise CheckpointError(f"{path}: corrupt trainer state ({type(e).__name__}: {str(e).splitlines()[0]})") from e
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{path}: not a dsfs trainer state (format {STATE_FORMAT})")
    return state


def load_model_dir(path: str | os.PathLike, model_cls=None, device=None):
    """``model_cls.from_pretrained(path)`` (default ``reference.Model``) moved to ``device`` (a sharded checkpoint:
    gathered whole, `dsfs.parallel.checkpoint.load_full_model`); errors from a
    missing or corrupt ``config.json`` / safetensors, a file that does not match checksums.json, a non-finite weight
    (naming the tensor) or an incomplete directory (`model_dir_problem`) become ``CheckpointError``."""
    if model_cls is None:
        from reference import Model as model_cls
    problem = model_dir_problem(path)
    if problem is not None:
        raise CheckpointError(f"cannot load the model in {path}: {problem}")
    if (Path(path) / ".metadata").is_file():  # a multi-process run's sharded checkpoint (dsfs.parallel.checkpoint)
        from dsfs.parallel.checkpoint import load_full_model

        return load_full_model(path, model_cls).to(device)
    try:
        return model_cls.from_pretrained(path, device=device)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot load the model in {path}: {str(e).splitlines()[0]}") from e
