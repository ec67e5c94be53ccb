"""Starting a multi-process run: ``dsfs train --nproc N`` launches N workers on this machine with torch's elastic
launcher (what ``torchrun`` runs); each worker is ``python -m dsfs train ...`` with the same arguments, finds itself
in a launched world (``WORLD_SIZE`` > 1 in its environment), joins the process group (NCCL on GPUs, gloo on CPU)
and builds the run's mesh. Across machines, start the workers yourself: ``torchrun --nnodes 2 --nproc-per-node 8
--rdzv-endpoint HOST:PORT -m dsfs train ...``.

When a worker dies (killed, out of memory, an error), the launcher stops the others and `launch` reports which
rank failed, how, and the newest complete checkpoint to resume from.
"""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

import torch

from dsfs.parallel.layout import Layout, ParallelDims


def launched_world_size() -> int:
    """The world size this process was launched into (``WORLD_SIZE``, set by torchrun and `launch`), 1 when it was
    not."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_layout(dims: dict, device_type: str = "cpu") -> Layout:
    """Join the launched world (``init_process_group``: NCCL when ``device_type`` is ``"cuda"``, else gloo; this
    rank's GPU is ``LOCAL_RANK``) and build the `Layout` of ``dims`` (`ParallelDims` fields other than
    ``world_size``). Raises `ConfigError` for degrees that do not fit the world (the process group is destroyed
    first, so every rank exits with the same message)."""
    import torch.distributed as dist

    pdims = ParallelDims(world_size=launched_world_size(), **dims)
    if device_type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device(device_type)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    return Layout.build(pdims, device)


def finish() -> None:
    """Leave the process group (at the end of a worker's run)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def worker_argv(argv: list[str]) -> list[str]:
    """``argv`` of ``dsfs`` for the workers: the same arguments (each worker reads ``--nproc`` and checks it
    against its world)."""
    return ["-m", "dsfs", *argv]


def launch(argv: list[str], nproc: int, run_dir: str | os.PathLike | None) -> int:
    """Run ``dsfs <argv>`` on ``nproc`` local worker processes (torch's ``elastic_launch``, no restarts, a
    ``c10d`` rendezvous on a free local port) and wait for them. Returns 0 when every worker succeeded; when one
    failed, prints one line naming the first rank that failed (its exit code or signal) and the newest complete
    checkpoint in ``run_dir`` to resume from, and returns its exit code (130 / 143 when the run was interrupted
    and saved)."""
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # failures are reported below
    cfg = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"dsfs-{uuid.uuid4().hex[:8]}",
                       rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=0, monitor_interval=0.1,
                       start_method="spawn")
    try:
        elastic_launch(cfg, entrypoint=sys.executable)(*worker_argv(argv))
    except SignalException as e:  # Ctrl-C / SIGTERM to the launcher: passed on to the workers, which saved
        print(f"dsfs: stopped by {e.sigval.name}; {resume_hint(run_dir)}", file=sys.stderr)
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        # the root cause: not a worker the launcher itself stopped (SIGTERM) after another failed; then the earliest
        rank, failure = min(e.failures.items(), key=lambda rf: (rf[1].exitcode == -15, rf[1].timestamp, rf[0]))
        code = failure.exitcode
        if code in (2, 130, 143):  # a bad command line, or interrupted (the workers saved and said how to resume)
            return code
        if code == 1 and "no checkpoint" in resume_hint(run_dir):  # bad input: the worker's own line said why
            return code
        how = f"was killed by {failure.signal_name()}" if code < 0 else f"exited with code {code}"
        print(f"dsfs: error: rank {rank} {how}; {resume_hint(run_dir)}", file=sys.stderr)
        return 1 if code < 0 else code
    return 0


def resume_hint(run_dir: str | os.PathLike | None) -> str:
    """Where a failed run can resume: its newest complete checkpoint, or that it has none."""
    from dsfs.checkpointing import latest_checkpoint

    ckpt = latest_checkpoint(run_dir) if run_dir is not None and Path(run_dir).is_dir() else None
    if ckpt is None:
        return f"no checkpoint in {run_dir} yet: start the run again"
    return f"the last checkpoint is {ckpt}; continue with --resume (any --nproc and layout)"
