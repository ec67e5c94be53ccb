"""Checkpoint safety (issue 13): pruning never loses the newest checkpoint, a directory is complete or a hidden
leftover that readers ignore and the next start deletes, a full disk is one error, corrupted or non-finite weights
are refused, modes follow the umask, and the ``kill -9`` trial (`bench.kill_trial`) holds."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import types
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import reference.checkpoint as ref_ckpt
from bench import kill_trial
from dsfs import checkpointing
from dsfs.checkpointing import (
    CheckpointError,
    DiskFullError,
    latest_checkpoint,
    list_checkpoints,
    load_model_dir,
    load_trainer_state,
    remove_leftovers,
    resolve_model_dir,
    save_checkpoint,
    save_model_dir,
)
from dsfs.errors import UserError
from dsfs.rundir import lock_run_dir
from reference import Model, ModelConfig
from tests.test_train import MICRO_MODEL, _cli, micro_train


def _model() -> Model:
    torch.manual_seed(0)
    return Model(ModelConfig(vocab_size=300, **MICRO_MODEL))


def _names(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def _flip_data_byte(f: Path, at: int = 10) -> None:
    """Flip one byte of the tensor data of the safetensors file ``f``; its header stays valid."""
    data = bytearray(f.read_bytes())
    data[8 + int.from_bytes(data[:8], "little") + at] ^= 0x55
    f.write_bytes(bytes(data))


# ---------------------------------------------------------------- pruning (defect 1) and leftovers (defect 5)


def test_negative_keep_last_is_refused_and_the_new_checkpoint_is_never_pruned(tmp_path):
    model, ck = _model(), tmp_path / "checkpoints"
    for step in (1, 2):
        save_checkpoint(model, {"step": step}, ck, step, keep_last=2)
    with pytest.raises(ValueError, match=r"keep_last=-1: expected None or an integer >= 0"):
        save_checkpoint(model, {"step": 3}, ck, 3, keep_last=-1)
    assert _names(ck) == ["step_000001", "step_000002"]
    save_checkpoint(model, {"step": 5}, ck, 5, keep_last=1)
    save_checkpoint(model, {"step": 4}, ck, 4, keep_last=1)  # older than the newest, yet just written: kept
    assert _names(ck) == ["step_000004", "step_000005"]


def test_a_kill_while_pruning_leaves_no_partial_checkpoint(tmp_path, monkeypatch):
    run, model = tmp_path / "run", _model()
    ck = run / "checkpoints"
    for step in (1, 2):
        save_checkpoint(model, {"step": step}, ck, step, keep_last=2)
    rmtree = shutil.rmtree

    def killed(path, *a, **k):  # kill -9 midway through deleting: the trainer state gone, the weights still there
        if (Path(path) / "trainer_state.pt").exists():
            (Path(path) / "trainer_state.pt").unlink()
            raise KeyboardInterrupt
        rmtree(path, *a, **k)

    with monkeypatch.context() as m:
        m.setattr(shutil, "rmtree", killed)
        with pytest.raises(KeyboardInterrupt):
            save_checkpoint(model, {"step": 3}, ck, 3, keep_last=2)
    visible = [n for n in _names(ck) if not n.startswith(".")]
    assert visible == [p.name for p in list_checkpoints(ck)] == ["step_000002", "step_000003"]
    assert [n for n in _names(ck) if n.startswith(".old-step_000001-")]
    with lock_run_dir(run):  # the next start deletes it
        assert _names(ck) == ["step_000002", "step_000003"]


def test_incomplete_and_hidden_directories_are_refused_and_cleaned_on_start(tmp_path, capsys):
    run, model = tmp_path / "run", _model()
    ck = run / "checkpoints"
    good = save_checkpoint(model, {"step": 1}, ck, 1)
    for step, marked in ((2, True), (3, False)):  # what the old pruning left: the weights without the trainer state
        d = ck / f"step_00000{step}"
        shutil.copytree(good, d)
        (d / "trainer_state.pt").unlink()
        if not marked:
            (d / "checksums.json").unlink()
    tmp = ck / ".tmp-step_000004-123"  # a kill during a write
    shutil.copytree(good, tmp)
    (tmp / "checksums.json").unlink()
    shutil.copytree(good, run / ".old-final-abc")
    (run / "metrics.jsonl").write_text("")
    assert list_checkpoints(ck) == [good] and latest_checkpoint(run) == good == resolve_model_dir(run)
    for bad in (ck / "step_000002", ck / "step_000003"):
        assert latest_checkpoint(bad) is None
        for read in (resolve_model_dir, load_model_dir):
            with pytest.raises(CheckpointError, match=r"an incomplete checkpoint: trainer_state\.pt is missing"):
                read(bad)
    with pytest.raises(CheckpointError, match="a temporary directory left by an interrupted save"):
        resolve_model_dir(tmp)
    rc, _, err = _cli(capsys, "generate", "--checkpoint", ck / "step_000002", "--prompt", "x")
    assert rc == 1 and err.count("\n") == 1 and "incomplete checkpoint" in err, err
    with lock_run_dir(run):
        assert _names(ck) == ["step_000001"] and _names(run) == [".lock", "checkpoints", "metrics.jsonl"]
    assert remove_leftovers(run) == []


def test_model_dirs_without_checksums_load_unverified(tmp_path):
    """A directory without checksums.json is one written elsewhere (transformers, mlx_lm) or before checksums."""
    d = tmp_path / "hf"
    _model().save_pretrained(d)
    (d / "checksums.json").unlink()
    _flip_data_byte(d / "model.safetensors", at=1)  # nothing to tell: it loads (finite values)
    assert resolve_model_dir(d) == d and load_model_dir(d) is not None
    step = tmp_path / "checkpoints/step_000007"  # a training checkpoint from before checksums
    save_checkpoint(_model(), {"step": 7}, step.parent, 7)
    (step / "checksums.json").unlink()
    assert list_checkpoints(step.parent) == [step] and load_trainer_state(step)["step"] == 7


# ---------------------------------------------------------------- a full disk (defect 4)


@pytest.mark.parametrize("writer", ["safetensors", "torch"])
def test_disk_full_is_one_error_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, writer):
    run, model = tmp_path / "run", _model()
    ck = run / "checkpoints"
    save_checkpoint(model, {"step": 1}, ck, 1)
    if writer == "safetensors":  # what safetensors raises on ENOSPC
        def full(tensors, filename, metadata=None):
            Path(filename).write_bytes(b"\0" * 64)
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

        monkeypatch.setattr(ref_ckpt, "save_file", full)
    else:  # torch's zip writer loses the errno: a failed write while the disk has no room left
        def full(obj, f):
            Path(f).write_bytes(b"\0" * 64)
            raise RuntimeError("[enforce fail at inline_container.cc:671] . unexpected pos 576 vs 534")

        monkeypatch.setattr(torch, "save", full)
        monkeypatch.setattr(shutil, "disk_usage", lambda p: types.SimpleNamespace(total=10**9, used=10**9, free=0))
    where = re.escape(str(ck / "step_000002"))
    with pytest.raises(DiskFullError, match=rf"^disk full while writing {where}; the earlier checkpoints") as ei:
        save_checkpoint(model, {"step": 2}, ck, 2)
    assert isinstance(ei.value, UserError) and "\n" not in str(ei.value)
    assert _names(ck) == ["step_000001"]  # the temporary directory is gone, the previous checkpoint intact
    assert load_trainer_state(ck / "step_000001")["step"] == 1 and load_model_dir(ck / "step_000001") is not None
    if writer == "safetensors":
        with pytest.raises(DiskFullError, match=rf"^disk full while writing {re.escape(str(run / 'final'))}"):
            save_model_dir(model, run / "final")
        assert _names(run) == ["checkpoints"]


def test_a_write_error_with_room_on_disk_is_not_disk_full(tmp_path, monkeypatch):
    def broken(obj, f):
        raise RuntimeError("[enforce fail at inline_container.cc:671] . unexpected pos 576 vs 534")

    monkeypatch.setattr(torch, "save", broken)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: types.SimpleNamespace(total=10**12, used=0, free=10**12))
    with pytest.raises(RuntimeError, match="unexpected pos"):
        save_checkpoint(_model(), {"step": 1}, tmp_path / "checkpoints", 1)
    assert _names(tmp_path / "checkpoints") == []


# ---------------------------------------------------------------- corrupted and non-finite weights (defect 6)


def test_flipped_bytes_fail_the_checksum(tmp_path):
    ck = tmp_path / "checkpoints"
    d = save_checkpoint(_model(), {"step": 1}, ck, 1)
    _flip_data_byte(d / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.safetensors does not match its checksum \(corrupted\?"):
        Model.from_pretrained(d)
    with pytest.raises(CheckpointError, match=r"model\.safetensors does not match its checksum"):
        load_model_dir(d)
    state = d / "trainer_state.pt"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0x55
    state.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"corrupt trainer state .*trainer_state\.pt does not match its checksum"):
        load_trainer_state(d)


def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path):
    model = _model()
    with torch.no_grad():
        model.model.layers[1].self_attn.kv_a_proj_with_mqa.weight[0, 0] = float("nan")
    model.save_pretrained(tmp_path / "ck")
    for marked in (True, False):
        if not marked:
            (tmp_path / "ck" / "checksums.json").unlink()
        with pytest.raises(ValueError, match=r"tensor model\.layers\.1\.self_attn\.kv_a_proj_with_mqa\.weight holds "
                                             r"non-finite values \(NaN or inf\)"):
            Model.from_pretrained(tmp_path / "ck")


def test_eval_and_generate_refuse_corrupted_weights_in_one_line(data_dir, tmp_path, capsys):
    micro_train(data_dir, tmp_path / "run", max_steps=2, warmup_steps=1, eval_every=2, eval_batches=1)
    final = tmp_path / "run" / "final"
    sd = load_file(final / "model.safetensors")
    sd["model.norm.weight"][3] = float("nan")  # NaN bytes in the file, as in the issue
    save_file(sd, final / "model.safetensors", metadata={"format": "pt"})
    verbs = (["eval", "--checkpoint", final, "--data", data_dir, "--batches", "1", "--batch-size", "1",
              "--seq-len", "8", "--device", "cpu"],
             ["generate", "--checkpoint", final, "--prompt", "Once", "--max-new-tokens", "2", "--device", "cpu"])
    for words in ("model.safetensors does not match its checksum", "tensor model.norm.weight holds non-finite"):
        for argv in verbs:
            rc, out, err = _cli(capsys, *argv)
            assert rc == 1 and out == "" and err.count("\n") == 1 and words in err, (argv[0], err)
        (final / "checksums.json").unlink(missing_ok=True)  # then as a directory written elsewhere: the finite check


# ---------------------------------------------------------------- modes (defect 10)


def _modes(d: Path) -> tuple[int, set[int]]:
    return stat.S_IMODE(d.stat().st_mode), {stat.S_IMODE(f.stat().st_mode) for f in d.iterdir()}


@pytest.mark.parametrize("umask, modes", [(0o022, (0o755, {0o644})), (0o077, (0o700, {0o600}))])
def test_saved_directories_follow_the_umask(tmp_path, umask, modes):
    model, old = _model(), os.umask(umask)
    try:
        step = save_checkpoint(model, {"step": 1}, tmp_path / "run/checkpoints", 1)
        final = save_model_dir(model, tmp_path / "run/final")
    finally:
        os.umask(old)
    assert _modes(step) == modes and _modes(final) == modes


def test_checksums_list_every_file_and_hash_the_binary_ones(tmp_path):
    tok = tmp_path / "tokenizer.json"
    tok.write_text("{}")
    d = save_checkpoint(_model(), {"step": 1}, tmp_path / "checkpoints", 1, tokenizer_file=tok)
    sums = json.loads((d / "checksums.json").read_text())
    assert sums["files"] == ["config.json", "model.safetensors", "mtp.safetensors", "tokenizer.json",
                             "trainer_state.pt"]
    assert sorted(sums["sha256"]) == ["model.safetensors", "mtp.safetensors", "trainer_state.pt"]
    assert sums["sha256"]["trainer_state.pt"] == ref_ckpt.file_sha256(d / "trainer_state.pt")
    assert checkpointing.checkpoint_problem(d) is None


# ---------------------------------------------------------------- the kill -9 trial, small


def test_kill_trial_few_kills(tmp_path):
    """`bench.kill_trial` with 2 kills (the full trial: ``python -m bench.kill_trial --kills 30``)."""
    f = kill_trial.trial(kills=2, seed=0, workdir=tmp_path, max_steps=40, window_s=1.5, say=lambda s: None)
    assert not f.failures, f.failures
    assert f.kills == 2 and f.final_step == 40 and f.resumes_ok == f.resumes and f.cleaned == f.leftovers
    assert f.loadable >= f.checkpoints_left > 0
