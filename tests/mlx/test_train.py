"""``dsfs train --backend mlx``: a few steps of the micro model through the CLI; the run's checkpoint and final
model load in the reference, and the reference resumes it exactly (same losses as an uninterrupted reference
run: same initial weights, data order, AdamW moments); the MLX backend resumes a reference run; the trajectory
matches the reference loop's step by step."""

from __future__ import annotations

import json
import math
import os
import signal

import pytest
import torch

from dsfs import cli
from dsfs.checkpointing import load_trainer_state
from dsfs.evaluation import eval_batches, evaluate
from dsfs.presets import MODEL_PRESETS
from dsfs.train import train
from reference import Model as ReferenceModel
from reference.optim import optimizer_groups
from reference.testing import assert_close
from runtime_mlx import Model
from runtime_mlx.train import MLXTrainer, make_mlx_optimizer, optimizer_state_from_torch, optimizer_state_to_torch
from tests.mlx.utils import mx, to_mx, to_torch
from tests.test_train import MICRO_MODEL, MICRO_TRAIN, assert_is_trainer, make_data_dir, read_metrics

STEPS = dict(MICRO_TRAIN, max_steps=4, eval_every=2, eval_batches=1, optimizer="adamw")


def _train(data_dir, out, backend, **kw):
    return train("tiny", data_dir, out, backend=backend, model_overrides=MICRO_MODEL, verbose=False,
                 compile=kw.pop("compile", backend == "mlx"), **{**STEPS, **kw})


@pytest.fixture(scope="module")
def reference_run(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    _train(data_dir, out, "reference")
    return out


def test_cli_mlx_run_matches_reference_and_reference_resumes_it(data_dir, reference_run, tmp_path, capsys,
                                                              monkeypatch):
    """``dsfs train --backend mlx`` for 2 steps (the micro model as the tiny preset: the CLI has no model-size
    flags), then the reference resumes the run to step 4: every loss equals the uninterrupted reference run's."""
    monkeypatch.setitem(MODEL_PRESETS, "tiny", {**MODEL_PRESETS["tiny"], **MICRO_MODEL})
    out = tmp_path / "mlx"
    capsys.readouterr()
    rc = cli.main(["train", "--backend", "mlx", "--data", str(data_dir), "--out", str(out), "--max-steps", "2",
                   "--batch-size", "4", "--seq-len", "32", "--lr", "3e-3", "--warmup-steps", "4",
                   "--eval-every", "2", "--eval-batches", "1", "--optimizer", "adamw", "-q"])
    printed = capsys.readouterr().out
    assert rc == 0 and "backend mlx" in printed and "steps 2," in printed
    state = load_trainer_state(out / "checkpoints" / "step_000002")
    assert state["backend"] == "mlx" and state["optimizer"]["state"]
    assert sorted(p.name for p in (out / "final").iterdir()) == [
        "checksums.json", "config.json", "model.safetensors", "mtp.safetensors", "tokenizer.json",
        "tokenizer_config.json"]
    ref_final = ReferenceModel.from_pretrained(out / "final").eval()
    ids = torch.randint(0, ref_final.config.vocab_size, (2, 16))
    with torch.no_grad():
        assert_close(to_torch(Model.from_pretrained(out / "final")(to_mx(ids))), ref_final(ids),
                     what="final model: mlx vs reference loading it")
    s = train(data_dir=data_dir, out_dir=out, resume=True, backend="reference", verbose=False, compile=False,
              max_steps=4)
    assert s["steps"] == 4 and s["backend"] == "reference"
    ours, ours_val = read_metrics(out)
    theirs, theirs_val = read_metrics(reference_run)
    assert [r["step"] for r in ours] == [1, 2, 3, 4]
    for a, b in zip(ours, theirs, strict=True):  # steps 1-2 on mlx, 3-4 on the reference after the hand-over
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-5), (a, b)
        assert math.isclose(a["grad_norm"], b["grad_norm"], rel_tol=1e-4), (a, b)
    assert math.isclose(ours_val[-1]["val_loss"], theirs_val[-1]["val_loss"], rel_tol=1e-5)


def test_mlx_resumes_reference_run(data_dir, reference_run, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(reference_run, out)
    for p in (out / "checkpoints").iterdir():
        if p.name != "step_000002":
            shutil.rmtree(p)
    s = train(data_dir=data_dir, resume=out / "checkpoints" / "step_000002", out_dir=out, backend="mlx",
              verbose=False, max_steps=4)
    assert s["backend"] == "mlx" and s["steps"] == 4
    ours, ours_val = read_metrics(out)
    theirs, theirs_val = read_metrics(reference_run)
    for a, b in zip(ours, theirs, strict=True):
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-5), (a, b)
    assert math.isclose(ours_val[-1]["val_loss"], theirs_val[-1]["val_loss"], rel_tol=1e-5)


def test_runtime_mlx_does_not_import_dsfs():
    """Dependencies point dsfs -> runtimes -> reference: the MLX trainer gets what it needs passed in."""
    import ast
    import pathlib

    import runtime_mlx

    for path in pathlib.Path(runtime_mlx.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] == "dsfs" for n in names), f"{path.name}:{node.lineno} imports dsfs"


def test_optimizer_state_round_trip(reference_run):
    """The reference's AdamW state_dict -> MLX optimizer -> the same state_dict (moments, step, groups)."""
    from dsfs.checkpointing import latest_checkpoint

    ckpt = latest_checkpoint(reference_run)
    state = load_trainer_state(ckpt)
    model = Model.from_pretrained(ckpt)
    cfg = model.config
    groups = optimizer_groups(cfg, 3e-3, 0.1)
    opt = make_mlx_optimizer(groups)
    opt.init(model.trainable_parameters())
    optimizer_state_from_torch(opt, state["optimizer"], groups)
    back = optimizer_state_to_torch(opt, groups)
    want = state["optimizer"]
    assert [g["params"] for g in back["param_groups"]] == [g["params"] for g in want["param_groups"]]
    assert [g["weight_decay"] for g in back["param_groups"]] == [0.1, 0.0]
    assert sorted(back["state"]) == sorted(want["state"])
    for i, s in want["state"].items():
        assert float(back["state"][i]["step"]) == float(s["step"])
        assert torch.equal(back["state"][i]["exp_avg"], s["exp_avg"])
        assert torch.equal(back["state"][i]["exp_avg_sq"], s["exp_avg_sq"])
    assert mx.array_equal(opt.optimizers[0].state["step"], mx.array(4, dtype=mx.uint64))


def test_resume_refuses_other_data(data_dir, reference_run, tmp_path):
    from dsfs.checkpointing import CheckpointError

    other = make_data_dir(tmp_path / "other", vocab_size=320)
    with pytest.raises(CheckpointError):
        train(data_dir=other, resume=reference_run, out_dir=tmp_path / "o", backend="mlx", verbose=False)


def test_metrics_records_have_the_reference_fields(data_dir, reference_run, tmp_path):
    out = tmp_path / "run"
    _train(data_dir, out, "mlx", max_steps=1, eval_every=1, compile=False)
    ours = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    theirs = [json.loads(line) for line in (reference_run / "metrics.jsonl").read_text().splitlines()]
    assert {frozenset(r) for r in ours} == {frozenset(r) for r in theirs}  # train and eval records


def test_grad_accum_and_no_clip_match_reference(data_dir, tmp_path):
    kw = dict(max_steps=2, eval_every=2, grad_accum=2, grad_clip=0.0)
    _train(data_dir, tmp_path / "ref", "reference", compile=False, **kw)
    _train(data_dir, tmp_path / "mlx", "mlx", **kw)
    ours, _ = read_metrics(tmp_path / "mlx")
    theirs, _ = read_metrics(tmp_path / "ref")
    for a, b in zip(ours, theirs, strict=True):
        for k in ("loss", "lm_loss", "mtp_loss", "grad_norm"):
            assert math.isclose(a[k], b[k], rel_tol=1e-5), (k, a, b)
    assert ours[-1]["tokens"] == 2 * 2 * STEPS["batch_size"] * STEPS["seq_len"]


def test_dropout_run_is_reproducible_and_resumes_exactly(data_dir, tmp_path):
    """With hidden_dropout the compiled MLX step draws its masks from a key taken from torch's generator: the
    same seed gives the same run, a resumed run continues it exactly, and another seed another run."""
    drop = {**MICRO_MODEL, "hidden_dropout": 0.2}
    kw = dict(max_steps=4, eval_every=2, model_overrides=drop)
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        train("tiny", data_dir, tmp_path / name, backend="mlx", verbose=False, seed=seed, **{**STEPS, **kw})
    ta, tb, tc = (read_metrics(tmp_path / n)[0] for n in "abc")
    assert [r["loss"] for r in ta] == [r["loss"] for r in tb] != [r["loss"] for r in tc]

    def ctrl_c_at_2(rec):
        if rec["step"] == 2:
            os.kill(os.getpid(), signal.SIGINT)  # finish the step, checkpoint, stop

    with pytest.raises(KeyboardInterrupt):
        train("tiny", data_dir, tmp_path / "r", backend="mlx", verbose=False, on_step=ctrl_c_at_2,
              **{**STEPS, **kw})
    train(data_dir=data_dir, out_dir=tmp_path / "r", resume=True, backend="mlx", verbose=False)
    assert [r["loss"] for r in read_metrics(tmp_path / "r")[0]] == [r["loss"] for r in ta]


def test_muon_run_matches_reference_and_carries_over(data_dir, tmp_path):
    """``--optimizer muon``: the MLX run follows the reference run step by step; the reference's Muon state
    (momentum buffers + the AdamW groups' moments) round-trips through the MLX optimizer, and MLX resumes the
    reference run's step-2 checkpoint onto the same losses."""
    import shutil

    from dsfs.checkpointing import latest_checkpoint

    _train(data_dir, tmp_path / "ref", "reference", optimizer="muon")
    _train(data_dir, tmp_path / "mlx", "mlx", optimizer="muon")
    theirs, theirs_val = read_metrics(tmp_path / "ref")
    for a, b in zip(read_metrics(tmp_path / "mlx")[0], theirs, strict=True):
        for k in ("loss", "lm_loss", "mtp_loss", "grad_norm"):
            assert math.isclose(a[k], b[k], rel_tol=1e-4), (k, a, b)

    ckpt = tmp_path / "ref/checkpoints/step_000002"
    state = load_trainer_state(ckpt)
    groups = optimizer_groups(Model.from_pretrained(ckpt).config, 3e-3, 0.1, "muon")
    opt = make_mlx_optimizer(groups)
    opt.init(Model.from_pretrained(ckpt).trainable_parameters())
    optimizer_state_from_torch(opt, state["optimizer"], groups)
    back, want = optimizer_state_to_torch(opt, groups), state["optimizer"]
    assert [g["use_muon"] for g in back["param_groups"]] == [True, False, False]
    assert sorted(back["state"]) == sorted(want["state"])
    for i, s in want["state"].items():
        assert s.keys() == back["state"][i].keys()
        for k, v in s.items():
            assert torch.equal(back["state"][i][k], v), (i, k)
    as_adamw = [{**g, "use_muon": False} for g in state["optimizer"]["param_groups"]]
    with pytest.raises(ValueError, match="another optimizer's"):
        optimizer_state_from_torch(opt, {**state["optimizer"], "param_groups": as_adamw}, groups)

    out = tmp_path / "resumed"
    shutil.copytree(tmp_path / "ref", out)
    shutil.rmtree(latest_checkpoint(out))  # keep step 2
    s = train(data_dir=data_dir, resume=out / "checkpoints" / "step_000002", out_dir=out, backend="mlx",
              verbose=False, max_steps=4)
    assert s["backend"] == "mlx" and s["steps"] == 4
    ours, ours_val = read_metrics(out)
    for a, b in zip(ours, theirs, strict=True):
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-4), (a, b)
    assert math.isclose(ours_val[-1]["val_loss"], theirs_val[-1]["val_loss"], rel_tol=1e-4)


def test_mlx_trainer_satisfies_the_protocol(reference_run):
    """`MLXTrainer` is a `dsfs.trainer.Trainer`; its evaluation through `dsfs.evaluation.evaluate` is the reference
    trainer's on the same weights."""
    from dsfs.data import load_tokens

    final = reference_run / "final"
    trainer = MLXTrainer(Model.from_pretrained(final), 1e-3, 0.1, 1.0, 0.3, compile=False)
    assert_is_trainer(trainer)
    data_dir = load_trainer_state(reference_run / "checkpoints" / "step_000004")["data_dir"]
    batches = eval_batches(load_tokens(data_dir, "val"), 2, 16, 2)
    ours = evaluate(trainer.model, batches, trainer.eval_loss)
    assert trainer.model.training
    assert math.isclose(ours, evaluate(ReferenceModel.from_pretrained(final), batches), rel_tol=1e-5)
    assert set(trainer.micro_step(batches[0], 1)) == {"loss", "lm_loss", "mtp_loss", "aux_loss"}
    assert set(trainer.optimizer_step(1e-3)) == {"grad_norm"}


def test_init_from_on_mlx_matches_reference(data_dir, reference_run, tmp_path):
    """``init_from`` on the MLX backend starts from the same weights (step-0 validation) and follows the reference
    backend's init-from run, with the checkpoint's MTP depth dropped (``num_nextn_predict_layers`` 0)."""
    kw = dict(init_from=reference_run / "final", model_overrides={"num_nextn_predict_layers": 0})
    runs = {b: tmp_path / b for b in ("reference", "mlx")}
    for backend, out in runs.items():
        train("tiny", data_dir, out, backend=backend, verbose=False, compile=False, **{**STEPS, **kw})
    (ta, ea), (tb, eb) = read_metrics(runs["mlx"]), read_metrics(runs["reference"])
    assert math.isclose(ea[0]["val_loss"], read_metrics(reference_run)[1][-1]["val_loss"], rel_tol=1e-5)
    for a, b in zip(ta, tb, strict=True):
        assert a["mtp_loss"] is None and math.isclose(a["loss"], b["loss"], rel_tol=1e-5), (a, b)
    assert math.isclose(ea[-1]["val_loss"], eb[-1]["val_loss"], rel_tol=1e-5)
    assert load_trainer_state(runs["mlx"] / "checkpoints" / "step_000004")["backend"] == "mlx"


def test_eval_loss_ignores_masked_targets():
    """`MLXTrainer.eval_loss` on a batch with -100 targets (SFT's padding and prompt tokens) is the mean over the
    valid targets, as `dsfs.evaluation.torch_eval_loss` (``F.cross_entropy``, ``ignore_index=-100``), on the same
    weights; a batch without a valid target gives 0 (``F.cross_entropy`` gives NaN there)."""
    from dsfs.evaluation import torch_eval_loss
    from reference import ModelConfig
    from runtime_mlx.train import from_reference
    from tests.reference_utils import randomize_

    torch.manual_seed(0)
    ref = randomize_(ReferenceModel(ModelConfig(vocab_size=300, **MICRO_MODEL))).eval()
    trainer = MLXTrainer(from_reference(ref), 1e-3, 0.1, 1.0, 0.3, compile=False)
    x = torch.randint(0, 300, (3, 16))
    y = torch.randint(0, 300, (3, 16))
    y[0, :9], y[1, 4:], y[2, ::2] = -100, -100, -100
    batch = {"input_ids": x, "targets": y}
    ours = evaluate(trainer.model, [batch], trainer.eval_loss)
    assert math.isclose(ours, torch_eval_loss(ref, batch), rel_tol=1e-5)
    unmasked = evaluate(trainer.model, [{"input_ids": x, "targets": torch.where(y < 0, 7, y)}], trainer.eval_loss)
    assert not math.isclose(ours, unmasked, rel_tol=1e-3)  # the masked positions do not count
    assert evaluate(trainer.model, [{"input_ids": x, "targets": torch.full_like(y, -100)}], trainer.eval_loss) == 0.0
