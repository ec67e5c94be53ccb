"""Data parallelism for ``dsfs train --backend mlx`` on several processes, through MLX's own collectives
(``mlx.core.distributed``: the ring backend over TCP on CPUs and between Macs, NCCL on CUDA, MPI, JACCL).

Every process runs the same training loop (`dsfs.loop.TrainingRun`) on the same global batches, starting from the
same weights; `runtime_mlx.train.MLXTrainer` takes this process's rows of each micro-batch (`local_rows`),
averages the gradients over the processes before clipping and the update (`average_gradients`), so every process
keeps identical weights and optimizer state, sums the MoE expert loads before the auxiliary-loss-free bias update
(DeepSeek-V3 report section 2.1.2) and averages the logged metrics (`sum_over`). Rank 0 alone writes the run
directory (`MLXCheckpoints`); a Ctrl-C or time budget seen by one process stops all of them after the same step
(`MLXCheckpoints.agree`).

Starting the processes: ``dsfs train --backend mlx --nproc N`` (`launch_mlx`: N local processes joined by the ring
backend), or MLX's launcher, ``mlx.launch --backend ring -n N -- dsfs train --backend mlx ...`` (``--hosts`` /
``--hostfile`` for several machines). A launched process finds itself through the environment the launchers set
(`launched`: ``MLX_RANK``, or Open MPI's ``OMPI_COMM_WORLD_SIZE`` under ``mpirun``) and joins with
``mx.distributed.init()`` (`world`).

Collectives may sit inside ``mx.compile``d functions in MLX 0.32 (checked on the ring backend); the trainer keeps
them outside, in the eager part of the step, so the compiled micro-step and update are the one-process ones.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

INTERRUPTED = (130, 143)
"""Exit codes of a run stopped by SIGINT or SIGTERM after saving (``128 + signum``, `dsfs.loop.Interrupted`)."""


def launched() -> bool:
    """Whether an MLX launcher started this process: ``MLX_RANK`` (``mlx.launch``'s ring, NCCL and JACCL backends,
    `launch`) or ``OMPI_COMM_WORLD_SIZE`` (``mpirun``) in the environment. Reads the environment only."""
    return "MLX_RANK" in os.environ or "OMPI_COMM_WORLD_SIZE" in os.environ


@functools.cache
def world() -> mx.distributed.Group | None:
    """The group of every process of this MLX launch (``mx.distributed.init()``, joined once), or ``None`` for one
    process (not `launched`, or a world of one)."""
    if not launched():
        return None
    group = mx.distributed.init()
    return group if group.size() > 1 else None


def rank(group: mx.distributed.Group | None) -> int:
    """This process's rank in ``group`` (0 for ``None``: one process)."""
    return group.rank() if group is not None else 0


def size(group: mx.distributed.Group | None) -> int:
    """The number of processes of ``group`` (1 for ``None``)."""
    return group.size() if group is not None else 1


def local_rows(x, group: mx.distributed.Group | None):
    """This process's rows of a global batch ``x`` (B, ...) (a torch tensor or an array): rank ``r`` of ``n`` takes
    rows ``[r B/n, (r+1) B/n)``, as `dsfs.parallel.trainer.local_rows`. ``x`` itself for ``None``. Raises
    ``ValueError`` when ``n`` does not divide B."""
    n = size(group)
    if n == 1:
        return x
    b = x.shape[0]
    if b % n:
        raise ValueError(f"a batch of {b} rows does not split over {n} processes (expected a batch size that is a "
                         f"multiple of {n})")
    r, k = group.rank(), b // n
    return x[r * k:(r + 1) * k]


def average_gradients(grads, group: mx.distributed.Group | None):
    """The gradient tree ``grads`` averaged over the processes of ``group`` (``mlx.nn.average_gradients``: the
    arrays concatenated into buffers of up to 32 MiB, one ``all_sum`` each, divided by the group size); ``grads``
    itself for ``None``. Not evaluated."""
    if group is None:
        return grads
    return nn.average_gradients(grads, group)


def sum_over(arrays: list[mx.array], group: mx.distributed.Group | None) -> list[mx.array]:
    """Each array of ``arrays`` summed over the processes of ``group``, in one ``all_sum`` (flattened and
    concatenated in the first array's dtype, then split back to the shapes and dtypes given); ``arrays`` itself
    for ``None``. Integer counts stay exact. Not evaluated."""
    if group is None or not arrays:
        return list(arrays)
    dtype = arrays[0].dtype
    flat = mx.distributed.all_sum(mx.concatenate([a.reshape(-1).astype(dtype) for a in arrays]), group=group)
    out, i = [], 0
    for a in arrays:
        out.append(flat[i:i + a.size].reshape(a.shape).astype(a.dtype))
        i += a.size
    return out


def barrier(group: mx.distributed.Group | None) -> None:
    """Wait until every process of ``group`` gets here (one small ``all_sum``); nothing for ``None``."""
    if group is not None:
        mx.eval(mx.distributed.all_sum(mx.zeros((1,)), group=group))


class MLXCheckpoints:
    """How a data-parallel MLX run saves and agrees (the `dsfs.loop.LocalCheckpoints` interface). Every process
    holds the same weights and optimizer state, so rank 0 (``main``: it holds the run directory, writes metrics and
    prints) writes checkpoints and ``final/`` with ``local``, the one-process saver (``dsfs.loop.LocalCheckpoints()``,
    passed in: runtime_mlx imports no dsfs), and the others write nothing; each save ends with a barrier, so no
    process leaves the run (and no launcher stops it) while rank 0 is still writing. ``agree`` is the maximum over
    the processes (``all_max``), so a Ctrl-C or a time budget seen by one process stops all of them after the same
    step. ``group``: default `world` (``None``: one process, which behaves as ``local``)."""

    def __init__(self, local, group: mx.distributed.Group | None = None):
        self.group = group if group is not None else world()
        self.main = rank(self.group) == 0
        self.local = local

    def save(self, trainer, state: dict, ckpt_dir: Path, step: int, tokenizer_file, keep_last: int) -> Path | None:
        """Rank 0 writes the checkpoint of ``step`` (``local.save``) and returns its directory; the others return
        ``None`` once it is written."""
        path = self.local.save(trainer, state, ckpt_dir, step, tokenizer_file, keep_last) if self.main else None
        self.agree(0)
        return path

    def save_final(self, trainer, path: Path, tokenizer_file) -> Path | None:
        """Rank 0 writes the final model directory ``path`` (``local.save_final``) and returns it; the others return
        ``None`` once it is written."""
        out = self.local.save_final(trainer, path, tokenizer_file) if self.main else None
        self.agree(0)
        return out

    def agree(self, value: int) -> int:
        """The largest ``value`` (a non-negative int below 2**31: a flag, a signal number) over the processes; also a
        barrier."""
        if self.group is None:
            return int(value)
        return int(mx.distributed.all_max(mx.array([int(value)], dtype=mx.int32), group=self.group).item())


# ---------------------------------------------------------------- starting the processes


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _stop(procs: list[subprocess.Popen], grace_s: float = 5.0) -> None:
    """SIGTERM to the processes still running, SIGKILL to those alive ``grace_s`` later (one blocked in a collective
    whose peer died cannot run its Python signal handler)."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    end = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.0, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def launch(command: list[str], nproc: int, hint: Callable[[], str] | None = None, wait_s: float = 120.0) -> int:
    """Run ``command`` (an argv list) as ``nproc`` local processes joined by MLX's ring backend, as ``mlx.launch
    --backend ring -n nproc`` does on localhost (each process gets ``MLX_RANK`` and ``MLX_HOSTFILE``: a JSON list of
    one ``"127.0.0.1:PORT"`` list per rank), on free ports, and wait for them. Unlike ``mlx.launch`` it returns the
    run's exit code, and a failed process stops the others.

    Returns 0 when every process succeeded. When one exits with 130 or 143 (a run interrupted by SIGINT / SIGTERM,
    which saved its checkpoint and said how to resume), the others get ``wait_s`` seconds to finish the same way and
    that code is returned. Any other failure stops the rest (SIGTERM, then SIGKILL), prints one line naming the
    first rank that failed (its exit code or signal), followed by ``hint()`` when given (where to resume:
    ``dsfs.parallel.launch.resume_hint``), and returns its exit code (1 for a signal). SIGINT and SIGTERM sent to
    this process are passed on to the workers (when called from the main thread). Raises ``ValueError`` for
    ``nproc`` below 1."""
    if nproc < 1:
        raise ValueError(f"nproc={nproc}: expected an integer >= 1")
    hosts = [[f"127.0.0.1:{p}"] for p in _free_ports(nproc)]
    fd, hostfile = tempfile.mkstemp(prefix="dsfs-mlx-hosts-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(hosts, f)
    procs: list[subprocess.Popen] = []

    def forward(signum, frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    main_thread = threading.current_thread() is threading.main_thread()  # where Python signal handlers can go
    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)} if main_thread else {}
    try:
        for r in range(nproc):
            procs.append(subprocess.Popen(command, env={**os.environ, "MLX_RANK": str(r), "MLX_HOSTFILE": hostfile}))
        failed, deadline = None, None
        while any([p.poll() is None for p in procs]):  # a list: poll every process
            if failed is None:
                failed = next(((r, p.returncode) for r, p in enumerate(procs)
                               if p.returncode not in (None, 0)), None)
                if failed is not None and failed[1] not in INTERRUPTED:
                    _stop(procs)
                    break
                if failed is not None:
                    deadline = time.monotonic() + wait_s
            elif time.monotonic() > deadline:
                _stop(procs)
                break
            time.sleep(0.05)
        if failed is None:
            failed = next(((r, p.returncode) for r, p in enumerate(procs) if p.returncode != 0), None)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        _stop(procs)
        os.unlink(hostfile)
    if failed is None:
        return 0
    r, code = failed
    if code in INTERRUPTED:
        return code
    how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
    more = f"; {hint()}" if hint is not None else ""
    print(f"dsfs: error: rank {r} {how}{more}", file=sys.stderr)
    return 1 if code < 0 else code


def launch_mlx(argv: list[str], nproc: int, hint: Callable[[], str] | None = None) -> int:
    """``dsfs <argv>`` (``python -m dsfs``, this interpreter) on ``nproc`` local processes joined by MLX's ring
    backend (`launch`: its exit code, errors and signals; ``hint``: what a failure's line adds); each process runs the
    same command, finds itself `launched` and trains its share."""
    return launch([sys.executable, "-m", "dsfs", *argv], nproc, hint)
