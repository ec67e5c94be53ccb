"""`dsfs.rundir`: one process per run directory (the lock itself; `dsfs train` under it is in tests/test_train.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from dsfs.errors import UserError
from dsfs.rundir import LOCK_FILE, RunDirBusy, check_run_dir_free, lock_run_dir


def test_second_lock_fails_naming_the_holder_and_the_lock_is_released(tmp_path):
    out = tmp_path / "run"
    check_run_dir_free(out)  # nothing there: free, and nothing is created
    assert not out.exists()
    with lock_run_dir(out) as held:
        assert held == out and (out / LOCK_FILE).read_text().strip() == str(os.getpid())
        for attempt in (lambda: lock_run_dir(out).__enter__(), lambda: check_run_dir_free(out)):
            with pytest.raises(RunDirBusy, match=rf"is in use by another dsfs run \(pid {os.getpid()}\); wait for "
                               "it or choose another --out"):
                attempt()
    check_run_dir_free(out)
    with pytest.raises(ZeroDivisionError), lock_run_dir(out):  # released after an error inside the block too
        raise ZeroDivisionError
    with lock_run_dir(out):
        pass


def test_out_that_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    for attempt in (lambda: lock_run_dir(tmp_path / "f").__enter__(), lambda: check_run_dir_free(tmp_path / "f")):
        with pytest.raises(UserError, match="not a directory"):
            attempt()


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")
def test_lock_of_a_killed_process_is_released(tmp_path):
    out = tmp_path / "run"
    code = ("import sys, time; from dsfs.rundir import lock_run_dir\n"
            "with lock_run_dir(sys.argv[1]):\n    print('held', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(RunDirBusy, match=rf"\(pid {proc.pid}\)"):
            check_run_dir_free(out)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    deadline = time.monotonic() + 10  # the kernel drops the lock when the process is gone
    while True:
        try:
            with lock_run_dir(out):
                break
        except RunDirBusy:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
