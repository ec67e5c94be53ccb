"""Sharded checkpoints of a multi-process run through ``torch.distributed.checkpoint`` (DCP).

A sharded ``checkpoints/step_N/`` holds, beside the usual ``config.json``, ``tokenizer.json`` and
``trainer_state.pt`` (rank 0's counters, RNG and data-order state, training config and the run's `ParallelDims`,
without the optimizer), DCP's files: ``.metadata`` and one ``__<rank>_0.distcp`` per rank, holding the model and
optimizer state keyed by parameter name (the optimizer's flattened: ``state.<name>.exp_avg``, ...). Every rank writes
its own shards into one hidden temporary directory; rank 0 then writes the rest and ``checksums.json`` (listing every
shard: a missing one makes the checkpoint incomplete, `dsfs.checkpointing.checkpoint_problem`) and renames it into
place, as for a one-process checkpoint.

DCP reshards on load: a checkpoint saved under one layout (4 ranks of FSDP) loads under another (2 ranks of TP, one
process, a pipeline), because the keys are parameter names and the tensors are described by their global shapes.
`load_full_model` reads one into a plain model in one process (``dsfs export``, ``dsfs generate``).
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from dsfs.checkpointing import STATE_FILE, DiskFullError, list_checkpoints, save_model_dir, step_dir_name
from dsfs.errors import CheckpointError
from reference.checkpoint import (
    copy_tokenizer,
    follow_umask,
    is_disk_full,
    remove_dir,
    replace_dir,
    verify_checksums,
    write_checksums,
)

METADATA = ".metadata"


def is_sharded(path: str | os.PathLike) -> bool:
    """Whether the directory ``path`` holds a DCP checkpoint (its ``.metadata``)."""
    return (Path(path) / METADATA).is_file()


def _options(full: bool = False):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=full, flatten_optimizer_state_dict=True)


def _optimizer_of(opt):
    """The optimizer whose state a rank holds: ZeRO-1's local one (its share of the parameters), else ``opt``."""
    return getattr(opt, "optim", opt)


def state_dicts(parts: list[nn.Module], optimizers: list) -> dict:
    """``{"model": ..., "optimizer": ...}``: the model parts' and their optimizers' state, keyed by parameter name
    (DTensor shards under FSDP/TP/EP), the optimizers' flattened so that pipeline stages merge (DCP's
    ``get_model_state_dict`` / ``get_optimizer_state_dict``; an optimizer not stepped yet gets its state first)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    model, optim = {}, {}
    for part, opt in zip(parts, optimizers, strict=True):
        model.update(get_model_state_dict(part, options=_options()))
        optim.update(get_optimizer_state_dict(part, _optimizer_of(opt), options=_options()))
    return {"model": model, "optimizer": optim}


def save_sharded(parts: list[nn.Module], optimizers: list, config, state: dict, ckpt_dir: str | os.PathLike,
                 step: int, tokenizer_file: str | os.PathLike | None = None, keep_last: int | None = 3) -> Path:
    """Write ``ckpt_dir/step_{step:06d}`` as a sharded checkpoint (module docstring), collectively: every rank calls
    it. ``config``: the model's ``ModelConfig``; ``state``: rank 0's trainer state (its ``"optimizer"`` entry is
    dropped: the optimizer state is in the shards). Atomic (a hidden temporary directory renamed at the end; on an
    error it is removed, a full disk raised as `DiskFullError`); keeps the newest ``keep_last`` checkpoints.
    Returns the directory."""
    import torch.distributed.checkpoint as dcp

    rank0 = dist.get_rank() == 0
    ckpt_dir = Path(ckpt_dir)
    final = ckpt_dir / step_dir_name(step)
    tmp = ckpt_dir / f".tmp-{final.name}-sharded"
    if rank0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    try:
        dcp.save(state_dicts(parts, optimizers), checkpoint_id=str(tmp))
        dist.barrier()
        if rank0:
            config.save_json(tmp / "config.json")
            copy_tokenizer(tokenizer_file, tmp)
            torch.save({"format": 1, **{k: v for k, v in state.items() if k != "optimizer"}, "optimizer": None,
                        "sharded": True}, tmp / STATE_FILE)
            write_checksums(tmp)
            follow_umask(tmp)
            replace_dir(str(tmp), str(final))
    except BaseException as e:
        if rank0:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, Exception) and is_disk_full(e, ckpt_dir):
            raise DiskFullError(f"disk full while writing {final}; the earlier checkpoints in {ckpt_dir} are "
                                "intact: free some space, then resume") from e
        raise
    dist.barrier()
    if rank0 and keep_last:
        for old in list_checkpoints(ckpt_dir)[:-keep_last]:
            if old != final:
                remove_dir(old)
    return final


def load_sharded(path: str | os.PathLike, parts: list[nn.Module], optimizers: list | None = None) -> None:
    """Load the sharded checkpoint ``path`` into the model parts (and their optimizers, when given), whatever the
    layout it was saved under: collectively in a process group, or in one process. Raises `CheckpointError` naming
    the checkpoint and the first problem (a tensor the checkpoint lacks, a shape that differs: another model)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    optimizers = optimizers or []
    sd = state_dicts(parts, optimizers) if optimizers else {"model": _model_state(parts)}
    try:
        verify_checksums(path)  # every shard present and intact, before DCP reads them
        with warnings.catch_warnings():  # one process reading shards is what load_full_model means to do
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(sd, checkpoint_id=str(path))
    except Exception as e:  # CheckpointException wraps each rank's error
        raise CheckpointError(f"cannot load the sharded checkpoint {path}: {_first_line(e)}") from e
    for part in parts:
        set_model_state_dict(part, sd["model"], options=_options())
    for part, opt in zip(parts, optimizers, strict=False):
        set_optimizer_state(part, _optimizer_of(opt), sd["optimizer"], _options())


def set_optimizer_state(part: nn.Module, opt, osd: dict, options) -> None:
    """DCP's ``set_optimizer_state_dict``, keeping ``opt``'s own implementation choice: the saved groups carry the
    writer's ``fused`` flag, which need not fit this run (a fused kernel cannot take tensor-parallel and plain
    parameters in one call)."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    fused = [g.get("fused") for g in opt.param_groups]
    set_optimizer_state_dict(part, opt, osd, options=options)
    for g, f in zip(opt.param_groups, fused, strict=True):
        g["fused"] = f


def _model_state(parts: list[nn.Module]) -> dict:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    out = {}
    for part in parts:
        out.update(get_model_state_dict(part, options=_options()))
    return out


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    for line in text.splitlines():  # DCP's CheckpointException lists per-rank tracebacks: keep the error line
        if "Error" in line and ":" in line and not line.startswith("Traceback"):
            return line.strip()
    return text.splitlines()[0] if text else type(e).__name__


def load_full_model(path: str | os.PathLike, model_cls=None):
    """The model of the sharded checkpoint ``path`` whole, in this process (no process group needed): a
    ``model_cls`` (default ``reference.Model``) of its ``config.json``, float32, in eval mode. Raises
    `CheckpointError` (see `load_sharded`)."""
    if model_cls is None:
        from reference import Model as model_cls
    from reference import ModelConfig

    try:
        cfg = ModelConfig.from_json(path)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable config.json ({e})") from e
    model = model_cls(cfg)
    load_sharded(path, [model])
    return model.eval()


def full_model_state(parts: list[nn.Module], layout) -> dict[str, torch.Tensor] | None:
    """The whole model's state dict on global rank 0, CPU tensors (``None`` elsewhere), gathered from every rank's
    shards (collective: every rank calls it): FSDP/TP/EP shards through DCP's full state dict, pipeline stages
    through the ``pp`` group. For ``final/``; the whole model must fit in rank 0's memory (at scale: export the
    sharded checkpoint instead)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    sd = {}
    for part in parts:
        full = get_model_state_dict(part, options=_options(full=True))
        sd.update({k: v.detach().cpu() for k, v in full.items()})
    if layout.dims.pp > 1:
        gathered = [None] * layout.size("pp") if layout.rank("pp") == 0 else None
        dist.gather_object(sd, gathered, group_dst=0, group=layout.group("pp"))
        if gathered is not None:
            sd = {k: v for stage in gathered for k, v in stage.items()}
    return sd if dist.get_rank() == 0 else None


def save_full_model(parts: list[nn.Module], layout, config, path: str | os.PathLike,
                    tokenizer_file: str | os.PathLike | None = None) -> Path:
    """Write the whole model as a Hugging Face directory at ``path`` from rank 0 (`full_model_state` into a
    ``reference.Model`` of ``config``, then ``save_pretrained``: atomic, with checksums.json); collective. Returns
    ``path``."""
    from reference import Model

    sd = full_model_state(parts, layout)
    if sd is not None:
        model = Model(config)
        missing, unexpected = model.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise RuntimeError(f"gathered state does not fit the model: missing {missing}, unexpected {unexpected}")
        save_model_dir(model, path, tokenizer_file)
    dist.barrier()
    return Path(path)
