"""Run a function on N local processes joined in a gloo process group (CPU) and collect what each rank returns:
the multi-process half of the equality tests against the single-process run.

The processes are started once per world size and serve every later call (starting one costs seconds: importing
torch and the model code), so the tests of every module share them. A call that fails on a rank tears the group
down (its other ranks may be waiting in a collective); the next call starts a fresh one. Collectives time out after
`TIMEOUT_S`, so a hang becomes an error.
"""

from __future__ import annotations

import atexit
import datetime
import os
import queue
import socket
import traceback

import torch
import torch.multiprocessing as mp

TIMEOUT_S = 180


def free_port() -> int:
    """A TCP port free on localhost now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(rank: int, nproc: int, port: int, tasks, results) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=nproc, timeout=datetime.timedelta(seconds=TIMEOUT_S))
    while (task := tasks.get()) is not None:
        fn, args, kwargs = task
        try:
            results.put((rank, {"ok": fn(*args, **kwargs)}))
        except BaseException:
            results.put((rank, {"error": traceback.format_exc()}))
    dist.destroy_process_group()


class _Group:
    """``nproc`` serving processes in one process group."""

    def __init__(self, nproc: int):
        ctx = mp.get_context("spawn")
        self.tasks = [ctx.Queue() for _ in range(nproc)]
        self.results = ctx.Queue()
        port = free_port()
        self.procs = [ctx.Process(target=_serve, args=(r, nproc, port, self.tasks[r], self.results), daemon=True)
                      for r in range(nproc)]
        for p in self.procs:
            p.start()

    def run(self, fn, args, kwargs) -> list[dict]:
        for q in self.tasks:
            q.put((fn, args, kwargs))
        got: dict[int, dict] = {}
        while len(got) < len(self.procs):
            try:
                rank, res = self.results.get(timeout=5)
            except queue.Empty:
                dead = [r for r, p in enumerate(self.procs) if not p.is_alive()]
                if dead:
                    raise RuntimeError(f"rank {dead[0]} died (exit code {self.procs[dead[0]].exitcode})") from None
                continue
            got[rank] = res
            if "error" in res:  # the others may wait for it in a collective: do not wait for them
                break
        return [got.get(r, {"error": "did not finish (another rank failed)"}) for r in range(len(self.procs))]

    def close(self, kill: bool = False) -> None:
        for q, p in zip(self.tasks, self.procs, strict=True):
            if kill:
                p.kill()
            elif p.is_alive():
                q.put(None)
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()


_GROUPS: dict[int, _Group] = {}


@atexit.register
def _close_all() -> None:
    for g in _GROUPS.values():
        g.close()
    _GROUPS.clear()


def spawn(nproc: int, fn, *args, **kwargs) -> list:
    """``fn(*args, **kwargs)`` on ``nproc`` processes (a module-level function: it is pickled by name), each in a
    gloo process group of that size with one torch thread; returns the ranks' results in rank order. Raises
    ``RuntimeError`` with the traceback of the first rank that failed."""
    group = _GROUPS.get(nproc) or _GROUPS.setdefault(nproc, _Group(nproc))
    try:
        results = group.run(fn, args, kwargs)
    except BaseException:
        _GROUPS.pop(nproc).close(kill=True)
        raise
    for r, res in enumerate(results):
        if "error" in res:
            _GROUPS.pop(nproc).close(kill=True)
            raise RuntimeError(f"rank {r} failed:\n{res['error']}")
    return [res["ok"] for res in results]
