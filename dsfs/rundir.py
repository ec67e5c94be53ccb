"""One process per run directory: an OS file lock on ``<run dir>/.lock``.

A run directory (``dsfs train --out``, and every later stage's) is written by one process at a time. The process
that writes it holds an exclusive lock on ``.lock`` (``fcntl.flock`` on POSIX, ``msvcrt.locking`` on Windows),
taken before anything in the directory changes (before ``--overwrite`` clears it, before a resumed run rewrites
metrics.jsonl) and held until the run ends. The operating system drops the lock when the process dies, ``kill -9``
included, so a crashed run never leaves a stale lock; the file itself stays, holding the last holder's pid, which
the error for a second process names::

    with lock_run_dir("runs/x"):      # RunDirBusy: runs/x is in use by another dsfs run (pid 1234); ...
        ...

The lock belongs to one open file: a second ``lock_run_dir`` of the same directory fails even in the same process.

Leftover temporaries are deleted once the lock is held: what a killed writer left (hidden ``.tmp-*`` / ``.old-*``
directories, incomplete ``checkpoints/step_*``: `dsfs.checkpointing.remove_leftovers`), since no other process can be
writing them then.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from dsfs.errors import UserError

LOCK_FILE = ".lock"

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
    import msvcrt

_WIN_LOCK_OFFSET = 1 << 20  # Windows locks a byte range, which others cannot read: lock one byte past the pid


class RunDirBusy(UserError):
    """Another process holds the run directory; the message names its pid."""


def _try_lock(fd: int) -> bool:
    """Take the exclusive lock on ``fd`` without waiting; ``False`` when another open file holds it."""
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:
            os.lseek(fd, _WIN_LOCK_OFFSET, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    except OSError:
        return False
    return True


def _unlock(fd: int) -> None:
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
    else:
        os.lseek(fd, _WIN_LOCK_OFFSET, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)


def _busy(path: Path, fd: int) -> RunDirBusy:
    os.lseek(fd, 0, os.SEEK_SET)
    pid = os.read(fd, 32).decode("ascii", "replace").strip()
    holder = f"pid {pid}" if pid.isdigit() else "pid unknown"
    return RunDirBusy(f"{path} is in use by another dsfs run ({holder}); wait for it or choose another --out")


def _check_dir(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise UserError(f"{path}: not a directory (expected a run directory for --out)")


@contextlib.contextmanager
def lock_run_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Hold the run directory ``path`` (created if missing) for this process until the block ends; yield it.
    Once held, leftovers of killed writers in it are deleted (`dsfs.checkpointing.remove_leftovers`).

    Writes this process's pid into ``path/.lock``. Raises `RunDirBusy` naming the holder's pid when another
    process (or another ``lock_run_dir`` of this one) holds it, and `UserError` when ``path`` is a file."""
    path = Path(path)
    _check_dir(path)
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        if not _try_lock(fd):
            raise _busy(path, fd)
        try:
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, f"{os.getpid()}\n".encode())
            from dsfs.checkpointing import remove_leftovers  # here: the lock itself needs no torch

            remove_leftovers(path)
            yield path
        finally:
            _unlock(fd)
    finally:
        os.close(fd)


def check_run_dir_free(path: str | os.PathLike) -> None:
    """Raise `RunDirBusy` when another process holds ``path`` now (`lock_run_dir`); create nothing.

    A quick check before slow work: the holder may change afterwards, so the writer still takes the lock."""
    path = Path(path)
    _check_dir(path)
    try:
        fd = os.open(path / LOCK_FILE, os.O_RDWR)
    except OSError:  # no lock file: nobody ever held it
        return
    try:
        if not _try_lock(fd):
            raise _busy(path, fd)
        _unlock(fd)
    finally:
        os.close(fd)
