"""Run a function on N local processes joined in a gloo process group (CPU) and collect what each rank returns:
the multi-process half of the equality tests against the single-process run."""

from __future__ import annotations

import os
import socket
import tempfile
import traceback
from pathlib import Path

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port free on localhost now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, nproc: int, port: int, out: str, fn, args, kwargs) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=nproc)
    try:
        result = {"ok": fn(*args, **kwargs)}
    except BaseException:
        result = {"error": traceback.format_exc()}
    torch.save(result, Path(out) / f"rank{rank}.pt")
    if "error" not in result:
        dist.barrier()
    dist.destroy_process_group()


def spawn(nproc: int, fn, *args, **kwargs) -> list:
    """``fn(*args, **kwargs)`` on ``nproc`` processes (a module-level function: the processes are spawned), each in
    a gloo process group of that size with one torch thread; returns the ranks' results in rank order (picklable
    with ``torch.save``). Raises ``RuntimeError`` with the traceback of the first rank that failed."""
    with tempfile.TemporaryDirectory() as out:
        ctx = mp.start_processes(_entry, args=(nproc, free_port(), out, fn, args, kwargs), nprocs=nproc,
                                 start_method="spawn", join=False)
        while not ctx.join():
            pass
        results = [torch.load(Path(out) / f"rank{r}.pt", weights_only=False) for r in range(nproc)]
    for r, res in enumerate(results):
        if "error" in res:
            raise RuntimeError(f"rank {r} failed:\n{res['error']}")
    return [res["ok"] for res in results]
