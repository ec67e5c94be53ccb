"""Multi-process ``dsfs train`` runs end to end (gloo, 2 processes): the loss sequence of one process, sharded
checkpoints that resume under another layout or in one process (and one process's checkpoint resumed sharded),
``dsfs export`` of a sharded checkpoint, clear errors for a missing shard, and a killed rank."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dsfs.checkpointing import load_model_dir
from dsfs.errors import CheckpointError
from dsfs.train import train
from tests.parallel.harness import spawn
from tests.test_train import micro_train

STEPS = 6
LAYOUTS = {"ep": {"ep": 2}, "tp": {"tp": 2}, "pp": {"pp": 2}}
"""The layouts a 2-rank FSDP run's checkpoint resumes under."""


def losses(out) -> dict[int, float]:
    recs = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


def sharded_runs(data_dir: str, root: str, single_ckpt: str) -> None:
    """In each of 2 processes: a fresh run (FSDP), its step-3 checkpoint resumed under each of `LAYOUTS` in
    other directories, and the one-process run's step-3 checkpoint resumed sharded."""
    root = Path(root)
    micro_train(data_dir, root / "fsdp", max_steps=STEPS, save_every=3, keep_last=0, parallel={"dp_shard": 2})
    for name, dims in LAYOUTS.items():
        micro_train(data_dir, root / name, resume=root / "fsdp" / "checkpoints" / "step_000003", max_steps=STEPS,
                    parallel=dims)
    micro_train(data_dir, root / "from1", resume=single_ckpt, max_steps=STEPS, parallel={"dp_shard": 2})


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("parallel_runs")
    micro_train(data_dir, root / "one", max_steps=STEPS, save_every=3, keep_last=0)
    spawn(2, sharded_runs, str(data_dir), str(root), str(root / "one" / "checkpoints" / "step_000003"))
    micro_train(data_dir, root / "back", resume=root / "fsdp" / "checkpoints" / "step_000003", max_steps=STEPS)
    return root


def test_sharded_run_follows_one_process(runs):
    want = losses(runs / "one")
    for name in ("fsdp", *LAYOUTS, "from1", "back"):
        got = losses(runs / name)
        assert set(got) == set(range(1, STEPS + 1)) if name == "fsdp" else set(range(4, STEPS + 1)) <= set(got)
        err = max(abs(got[s] - want[s]) for s in got)
        assert err < 1e-5, (name, err)


def test_sharded_checkpoint_layout(runs):
    step = runs / "fsdp" / "checkpoints" / "step_000003"
    names = {p.name for p in step.iterdir()}
    assert {".metadata", "__0_0.distcp", "__1_0.distcp", "trainer_state.pt", "config.json", "checksums.json"} <= names
    assert "model.safetensors" not in names
    state = torch.load(step / "trainer_state.pt", weights_only=True)
    assert state["sharded"] and state["parallel"]["dp_shard"] == 2 and state["optimizer"] is None


def test_export_and_load_sharded(runs, tmp_path):
    """``dsfs export`` of a sharded checkpoint writes the Hugging Face directory of the same weights as final/."""
    from dsfs.cli import main

    step = runs / "fsdp" / "checkpoints" / f"step_{STEPS:06d}"
    assert main(["export", "--checkpoint", str(step), "--out", str(tmp_path / "hf")]) == 0
    a, b = load_model_dir(tmp_path / "hf"), load_model_dir(runs / "fsdp" / "final")
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(p, q), n


def test_missing_shard_is_a_clear_error(runs, tmp_path, data_dir):
    broken = tmp_path / "step_000003"
    shutil.copytree(runs / "fsdp" / "checkpoints" / "step_000003", broken)
    (broken / "__1_0.distcp").unlink()
    with pytest.raises(CheckpointError, match="__1_0.distcp is missing"):
        micro_train(data_dir, tmp_path / "resumed", resume=broken, max_steps=STEPS)
    with pytest.raises(CheckpointError, match="__1_0.distcp is missing"):
        load_model_dir(broken)


def _workers(launcher: int) -> dict[int, int]:
    """rank -> pid of the worker processes the launcher started (their environment names their RANK)."""
    out = {}
    for pid in subprocess.run(["pgrep", "-P", str(launcher)], capture_output=True, text=True).stdout.split():
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        rank = [e for e in env if e.startswith(b"RANK=")]
        if rank:
            out[int(rank[0][5:])] = int(pid)
    return out


def test_killed_rank_names_itself_and_the_checkpoint_then_resumes(data_dir, tmp_path):
    """SIGKILL one worker of ``dsfs train --nproc 2`` after its first checkpoint: the job exits naming the rank and
    the checkpoint, and a run resumes from that checkpoint (here in one process; any layout resumes it)."""
    out = tmp_path / "run"
    flags = ["--data", str(data_dir), "--out", str(out), "--backend", "reference", "--compile", "off", "-q",
             "--batch-size", "4", "--seq-len", "32", "--eval-batches", "2", "--save-every", "2",
             "--eval-every", "100", "--preset", "nano"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "dsfs", "train", "--nproc", "2", *flags]
    proc = subprocess.Popen([*cmd, "--max-steps", "400"], stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while not list((out / "checkpoints").glob("step_*")) and time.monotonic() < deadline:
        time.sleep(0.2)
    workers = _workers(proc.pid)
    assert 1 in workers, workers
    os.kill(workers[1], signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    line = [x for x in err.splitlines() if x.startswith("dsfs: error: rank 1")]
    assert line and "SIGKILL" in line[0] and "the last checkpoint is" in line[0] and "step_" in line[0], err[-2000:]
    ckpt = line[0].split("the last checkpoint is ")[1].split(";")[0]
    s = train(None, None, tmp_path / "resumed", resume=ckpt, max_steps=int(ckpt[-6:]) + 2, backend="reference",
              compile=False, verbose=False)  # resumed in this process: any layout continues it
    assert s["steps"] == int(ckpt[-6:]) + 2 and (tmp_path / "resumed" / "final" / "config.json").is_file()
