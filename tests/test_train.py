"""`dsfs train`: loss falls, exact resume, atomic checkpoints, resume errors, --init-from (our checkpoints and
transformers-saved ones), the training config, backend choice, the trainer protocol, CLI errors.

A micro model (hidden 32, 2 layers, MLA + DeepSeekMoE with 4 experts + MTP depth 1) trains on a ~100 KB slice
of the shared TinyStories sample with a ~384-token tokenizer, so each run takes about a second.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dsfs import checkpointing, cli, data, loop
from dsfs.backend import resolve_backend
from dsfs.checkpointing import CheckpointError, load_trainer_state
from dsfs.data import DataError
from dsfs.errors import BackendError, ConfigError, UserError
from dsfs.evaluation import eval_batches, evaluate
from dsfs.loop import lr_at
from dsfs.presets import MODEL_PRESETS, TRAIN_PRESETS
from dsfs.rundir import RunDirBusy, lock_run_dir
from dsfs.train import train
from dsfs.train_config import TrainConfig
from dsfs.trainer import TorchTrainer, Trainer
from reference import Model, ModelConfig
from reference.muon import Muon
from reference.optim import make_optimizer, param_groups

MICRO_MODEL = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, moe_intermediate_size=32,
    n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, n_group=1, topk_group=1,
    first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
    v_head_dim=8, num_nextn_predict_layers=1, max_position_embeddings=64,
)
MICRO_TRAIN = dict(batch_size=4, seq_len=32, lr=3e-3, warmup_steps=4, eval_every=20, eval_batches=2,
                   max_steps=40)
SAMPLE_CHARS = 100_000


def make_data_dir(root: Path, vocab_size: int = 384) -> Path:
    """Prepare a ~100 KB slice of the shared TinyStories sample (synthetic stories if it is absent)."""
    root.mkdir(parents=True, exist_ok=True)
    src = root / "stories.txt"
    if data.DEFAULT_INPUT.is_file():
        with open(data.DEFAULT_INPUT, encoding="utf-8") as f:
            text = f.read(SAMPLE_CHARS)
    else:
        rng = random.Random(0)
        words = "the a cat dog sun ran saw big little happy sad tree ball mom said played went home".split()
        text = "\n<|endoftext|>\n".join(" ".join(rng.choices(words, k=rng.randint(20, 200))) + "."
                                        for _ in range(150))
    src.write_text(text, encoding="utf-8")
    return data.prepare(src, root / f"data-v{vocab_size}", vocab_size=vocab_size, val_fraction=0.1, verbose=False)


def micro_train(data_dir, out, **kw):
    """``train()`` of the micro model, quiet; keyword arguments override ``MICRO_TRAIN``."""
    model_overrides = kw.pop("model_overrides", MICRO_MODEL)
    kw.setdefault("backend", "reference")  # CPU: deterministic on every machine
    kw.setdefault("compile", False)  # compilation costs more than these few steps
    return train("tiny", data_dir, out, model_overrides=model_overrides, verbose=False,
                 **{**MICRO_TRAIN, **kw})


def read_metrics(out) -> tuple[list[dict], list[dict]]:
    """(train records, eval records) of a run's metrics.jsonl."""
    recs = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if "loss" in r], [r for r in recs if "val_loss" in r]


@pytest.fixture(scope="module")
def short_run(data_dir, tmp_path_factory) -> Path:
    """A finished 4-step micro run with checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("short") / "run"
    micro_train(data_dir, out, max_steps=4, eval_every=2)
    return out


def _cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


# ---------------------------------------------------------------- training


def test_loss_falls_and_outputs_are_written(data_dir, tmp_path):
    out = tmp_path / "run"
    s = micro_train(data_dir, out, min_lr_ratio=0.1)
    train_recs, evals = read_metrics(out)
    assert [r["step"] for r in train_recs] == list(range(1, 41))
    assert [r["step"] for r in evals] == [0, 20, 40]
    first, last = (sum(r["loss"] for r in rs) / 5 for rs in (train_recs[:5], train_recs[-5:]))
    assert last < first - 0.5, (first, last)
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.5
    rec = train_recs[-1]
    assert set(rec) == {"step", "loss", "lm_loss", "mtp_loss", "aux_loss", "lr", "grad_norm", "tokens",
                        "tokens_per_s", "elapsed_s"}
    assert rec["tokens"] == 40 * 4 * 32 and rec["mtp_loss"] > 0 and rec["aux_loss"] == 0.0
    assert 0.1 * 3e-3 < rec["lr"] < 0.11 * 3e-3  # cosine decay towards min_lr_ratio * lr
    assert s["steps"] == 40 and s["val_loss"] == evals[-1]["val_loss"] and s["stopped"] == "max_steps"
    assert s["backend"] in ("reference", "cuda", "mlx") and s["tokens_per_s"] > 0
    assert (out / "loss.png").stat().st_size > 1000
    steps = [p.name for p in checkpointing.list_checkpoints(out / "checkpoints")]
    assert steps == ["step_000020", "step_000040"]
    assert {"config.json", "model.safetensors", "mtp.safetensors", "tokenizer.json",
            "trainer_state.pt"} <= {p.name for p in (out / "checkpoints/step_000040").iterdir()}
    model = Model.from_pretrained(out / "final")
    meta = data.load_meta(data_dir)
    assert model.config.vocab_size == meta["vocab_size"] and model.config.eos_token_id == meta["eos_id"]
    assert any(b.abs().sum() > 0 for n, b in model.named_buffers() if n.endswith("e_score_correction_bias"))


@pytest.mark.parametrize(("dropout", "optimizer", "precision"),
                         [(0.0, "adamw", {}), (0.1, "adamw", {}), (0.0, "muon", {}),
                          (0.0, "muon", {"precision": "fp8"}),
                          (0.0, "adamw", {"precision": "fp8", "scale_fmt": "ue8m0"})],
                         ids=["plain", "dropout", "muon", "fp8-muon", "fp8-ue8m0-adamw"])
def test_resume_is_exact(data_dir, tmp_path, dropout, optimizer, precision):
    """An interrupted run resumes bit for bit, also in FP8 training (bf16 moments in the checkpoint)."""
    kw = dict(max_steps=12, eval_every=4, warmup_steps=3, optimizer=optimizer, **precision,
              model_overrides={**MICRO_MODEL, "hidden_dropout": dropout})  # dropout masks come from the saved RNG
    micro_train(data_dir, tmp_path / "a", **kw)

    def ctrl_c_at_6(rec):
        if rec["step"] == 6:
            os.kill(os.getpid(), signal.SIGINT)  # the real Ctrl-C path: finish the step, checkpoint, stop

    with pytest.raises(KeyboardInterrupt):
        micro_train(data_dir, tmp_path / "b", on_step=ctrl_c_at_6, **kw)
    ckpts = [p.name for p in checkpointing.list_checkpoints(tmp_path / "b/checkpoints")]
    assert ckpts == ["step_000004", "step_000006"] and not (tmp_path / "b/final").exists()
    s = train(data_dir=data_dir, out_dir=tmp_path / "b", resume=True, backend="reference", verbose=False,
              compile=False)
    assert s["steps"] == 12  # preset, micro model and training config came from the checkpoint
    (ta, ea), (tb, eb) = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    keys = ("step", "loss", "lm_loss", "mtp_loss", "aux_loss", "lr", "grad_norm", "tokens")
    assert [[r[k] for k in keys] for r in ta] == [[r[k] for k in keys] for r in tb]
    assert ea == eb
    wa, wb = (load_file(tmp_path / r / "final/model.safetensors") for r in "ab")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_time_budget_stops_checkpoints_and_resumes(data_dir, tmp_path):
    out = tmp_path / "run"
    s = micro_train(data_dir, out, max_steps=8, time_budget_s=0)
    assert s["stopped"] == "time_budget" and s["steps"] == 1
    assert checkpointing.latest_checkpoint(out).name == "step_000001" and (out / "final").is_dir()
    s = train(data_dir=data_dir, resume=out / "checkpoints", backend="reference", verbose=False, time_budget_s=60,
              compile=False)
    assert s["steps"] == 8 and s["stopped"] == "max_steps"
    assert [r["step"] for r in read_metrics(out)[0]] == list(range(1, 9))


def test_grad_accum_runs(data_dir, tmp_path):
    s = micro_train(data_dir, tmp_path / "run", max_steps=2, grad_accum=2, eval_every=2)
    assert s["tokens"] == 2 * 2 * 4 * 32


def test_lr_schedule_and_weight_decay_groups():
    lrs = [lr_at(s, 1.0, 4, 20, 0.1) for s in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:], strict=False)) and lrs[-1] > 0.1
    assert lr_at(20, 1.0, 4, 20, 0.1) == pytest.approx(0.1)
    from reference import ModelConfig

    model = Model(ModelConfig(vocab_size=300, **MICRO_MODEL))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    dn = {names[id(p)] for p in decay["params"]}
    nn_ = {names[id(p)] for p in no_decay["params"]}
    assert "model.embed_tokens.weight" in nn_ and "lm_head.weight" in dn
    assert any(n.endswith("experts.gate_proj") for n in dn) and any(n.endswith("gate.weight") for n in dn)
    assert all(p.ndim == 1 for p in no_decay["params"] if names[id(p)] != "model.embed_tokens.weight")
    assert len(dn) + len(nn_) == len(list(model.parameters()))
    assert make_optimizer(model, 1e-3, 0.1).defaults["betas"] == (0.9, 0.95)


def test_muon_param_groups():
    """Muon takes the hidden matrices (attention, MLPs, stacked experts, MTP projection); AdamW keeps the
    embedding, LM head, routers and vectors (Moonlight's split), with decay on matrices only."""
    model = Model(ModelConfig(vocab_size=300, **MICRO_MODEL))
    names = {id(p): n for n, p in model.named_parameters()}
    muon, decay, no_decay = ({names[id(p)] for p in g["params"]} for g in param_groups(model, 0.1, "muon"))
    assert "model.layers.1.mlp.experts.gate_proj" in muon and "mtp.0.eh_proj.weight" in muon
    assert "model.layers.0.self_attn.kv_b_proj.weight" in muon and "model.layers.0.mlp.down_proj.weight" in muon
    assert decay == {"lm_head.weight", "model.layers.1.mlp.gate.weight", "mtp.0.mlp.gate.weight"}
    assert "model.embed_tokens.weight" in no_decay and "model.norm.weight" in no_decay
    assert len(muon) + len(decay) + len(no_decay) == len(list(model.parameters()))
    opt = make_optimizer(model, 1e-3, 0.1, "muon")
    assert isinstance(opt, Muon) and [g["use_muon"] for g in opt.param_groups] == [True, False, False]
    with pytest.raises(ValueError, match="optimizer='sgd': expected one of adamw, muon"):
        param_groups(model, 0.1, "sgd")


# ---------------------------------------------------------------- checkpoints


def _micro_model(vocab=300) -> Model:
    from reference import ModelConfig

    return Model(ModelConfig(vocab_size=vocab, **MICRO_MODEL))


def test_resumed_optimizer_keeps_its_fused_implementation():
    """The saved param groups carry the writer's choice (an MLX run's groups are never fused): loading them keeps
    this process's fused AdamW, and the moments come through."""
    model = Model(ModelConfig(vocab_size=300, **MICRO_MODEL))
    plain = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3, fused=False)
    model.loss(torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 4, dtype=torch.long)).loss.backward()
    plain.step()
    trainer = TorchTrainer(model, torch.device("cpu"), 1e-3, 0.1, 1.0, 0.3, compile=False)
    assert all(g["fused"] for g in trainer.opt.param_groups)
    trainer.load_state_dict(plain.state_dict())
    assert all(g["fused"] for g in trainer.opt.param_groups)
    p = model.lm_head.weight
    assert torch.equal(trainer.opt.state[p]["exp_avg"], plain.state[p]["exp_avg"])


def test_checkpoint_save_is_atomic_and_prunes(tmp_path, monkeypatch):
    model = _micro_model()
    ck = tmp_path / "checkpoints"
    for step in range(1, 6):
        checkpointing.save_checkpoint(model, {"step": step}, ck, step, keep_last=2)
    assert sorted(p.name for p in ck.iterdir()) == ["step_000004", "step_000005"]

    def boom(state, path):
        assert (path.parent / "model.safetensors").is_file()  # midway: the model is written, the state not
        raise OSError("disk full")

    monkeypatch.setattr(checkpointing, "_write_state", boom)
    with pytest.raises(OSError, match="disk full"):
        checkpointing.save_checkpoint(model, {"step": 6}, ck, 6, keep_last=2)
    with pytest.raises(KeyboardInterrupt):
        monkeypatch.setattr(checkpointing, "_write_state", lambda s, p: (_ for _ in ()).throw(KeyboardInterrupt))
        checkpointing.save_checkpoint(model, {"step": 5}, ck, 5, keep_last=2)  # overwrite attempt
    assert sorted(p.name for p in ck.iterdir()) == ["step_000004", "step_000005"]
    assert checkpointing.load_trainer_state(ck / "step_000005")["step"] == 5


def _copy_run(short_run, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(short_run, out)
    return out


def test_resume_rejects_corrupt_weights(data_dir, short_run, tmp_path):
    out = _copy_run(short_run, tmp_path)
    (out / "checkpoints/step_000004/model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match=r"step_000004.*model\.safetensors"):
        micro_train(data_dir, out, resume=True)


def test_resume_rejects_corrupt_trainer_state(data_dir, short_run, tmp_path):
    out = _copy_run(short_run, tmp_path)
    path = out / "checkpoints/step_000004/trainer_state.pt"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt trainer state"):
        micro_train(data_dir, out, resume=True)


def test_resume_rejects_other_model_config(data_dir, short_run, tmp_path):
    out = _copy_run(short_run, tmp_path)
    with pytest.raises(CheckpointError, match="hidden_size: checkpoint 32, requested 48"):
        micro_train(data_dir, out, resume=True, model_overrides={**MICRO_MODEL, "hidden_size": 48})


def test_resume_rejects_another_preset(data_dir, short_run, tmp_path, capsys):
    """--preset on --resume cannot relabel a run: its model and training options are the checkpoint's."""
    out = _copy_run(short_run, tmp_path)
    rc, _, err = _cli(capsys, "train", "--resume", "--out", out, "--preset", "small", "--data", data_dir, "-q")
    assert rc == 1 and err.count("\n") == 1 and "is a run of preset tiny; --preset small cannot change it" in err, err


def test_resume_rejects_other_optimizer_and_reads_old_checkpoints_as_adamw(data_dir, short_run, tmp_path):
    out = _copy_run(short_run, tmp_path)
    ran = load_trainer_state(out / "checkpoints/step_000004")["train_config"]["optimizer"]
    other = "muon" if ran == "adamw" else "adamw"
    with pytest.raises(CheckpointError, match=f"trained with optimizer {ran}; it cannot continue with {other}"):
        micro_train(data_dir, out, resume=True, optimizer=other)
    if ran == "adamw":  # a checkpoint from before the field existed continues as the AdamW run it was
        path = out / "checkpoints/step_000004/trainer_state.pt"
        state = torch.load(path, weights_only=False)
        del state["train_config"]["optimizer"]
        torch.save(state, path)
        assert micro_train(data_dir, out, resume=True, max_steps=5)["steps"] == 5


def test_resume_rejects_other_data(data_dir, short_run, tmp_path):
    out = _copy_run(short_run, tmp_path)
    other = make_data_dir(tmp_path / "other", vocab_size=300)
    with pytest.raises(CheckpointError, match="other data"):
        micro_train(other, out, resume=True)
    assert issubclass(CheckpointError, UserError) and issubclass(DataError, UserError)


def test_fresh_run_refuses_an_occupied_out_dir(data_dir, short_run, tmp_path):
    out = _copy_run(short_run, tmp_path)
    with pytest.raises(DataError, match="already holds a run"):
        micro_train(data_dir, out, max_steps=2)
    s = micro_train(data_dir, out, max_steps=2, eval_every=2, overwrite=True)
    assert s["steps"] == 2 and [p.name for p in checkpointing.list_checkpoints(out / "checkpoints")] == [
        "step_000002"]


def test_resume_without_checkpoint(data_dir, tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint to resume"):
        micro_train(data_dir, tmp_path / "empty", resume=True)


# ---------------------------------------------------------------- --init-from


def test_init_from_our_final_starts_at_step_0_with_its_weights(data_dir, short_run, tmp_path):
    """A new run from a finished run's final/: step 0, its weights (the step-0 validation equals the source run's
    last, bit for bit: same windows), a fresh optimizer; ``num_nextn_predict_layers`` 0 trains without MTP."""
    out = tmp_path / "ft"
    s = micro_train(data_dir, out, init_from=short_run / "final", model_overrides=None, max_steps=2, eval_every=2)
    recs, evals = read_metrics(out)
    assert s["steps"] == 2 and [r["step"] for r in recs] == [1, 2] and evals[0]["step"] == 0
    assert evals[0]["val_loss"] == read_metrics(short_run)[1][-1]["val_loss"]
    assert recs[0]["lr"] == lr_at(0, MICRO_TRAIN["lr"], MICRO_TRAIN["warmup_steps"], 2, 0.0)
    state = load_trainer_state(out / "checkpoints/step_000002")
    assert state["init_from"] == str((short_run / "final").resolve()) and state["step"] == 2
    assert {float(v["step"]) for v in state["optimizer"]["state"].values() if "step" in v} == {2.0}  # a fresh one

    s = micro_train(data_dir, tmp_path / "nomtp", init_from=short_run, model_overrides={"num_nextn_predict_layers": 0},
                    max_steps=1, eval_every=1)
    assert read_metrics(tmp_path / "nomtp")[0][0]["mtp_loss"] is None
    assert Model.from_pretrained(tmp_path / "nomtp/final").config.num_nextn_predict_layers == 0
    assert not (tmp_path / "nomtp/final/mtp.safetensors").exists()
    with pytest.raises(UserError, match="not both"):
        micro_train(data_dir, tmp_path / "x", init_from=short_run, resume=True)


def test_init_from_transformers_checkpoint(data_dir, tmp_path, capsys):
    """``dsfs train --init-from`` a ``DeepseekV3ForCausalLM`` saved by transformers with its default MTP depth 1
    and no MTP weights: the depth is initialized fresh and the CLI says so; the step-0 validation loss is the
    transformers model's; final/ holds the MTP weights its config names and the data's tokenizer ids."""
    transformers = pytest.importorskip("transformers")
    meta = data.load_meta(data_dir)
    torch.manual_seed(0)
    hf_cfg = transformers.DeepseekV3Config(
        vocab_size=meta["vocab_size"], hidden_size=32, intermediate_size=64, moe_intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, n_routed_experts=4, n_shared_experts=1,
        num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1, q_lora_rank=None,
        kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, max_position_embeddings=64)
    hf = transformers.DeepseekV3ForCausalLM(hf_cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    assert hf_cfg.num_nextn_predict_layers == 1
    val = eval_batches(data.load_tokens(data_dir, "val"), 4, 32, 2)
    want = evaluate(hf, val, lambda b: torch.nn.functional.cross_entropy(
        hf(b["input_ids"]).logits.flatten(0, 1), b["targets"].flatten()).item())

    out = tmp_path / "run"
    rc, _, err = _cli(capsys, "train", "--init-from", tmp_path / "hf", "--data", data_dir, "--out", out,
                      "--backend", "reference", "--compile", "off", "--max-steps", 2, "--batch-size", 4,
                      "--seq-len", 32, "--eval-every", 2, "--eval-batches", 2, "--warmup-steps", 1,
                      "--optimizer", "adamw")
    assert rc == 0, err
    assert "MTP depth" in err and "initialized fresh" in err and "bos/eos/pad ids" in err
    evals = read_metrics(out)[1]
    assert evals[0]["val_loss"] == pytest.approx(want, rel=1e-5)
    final = json.loads((out / "final/config.json").read_text())
    assert final["num_nextn_predict_layers"] == 1 and (out / "final/mtp.safetensors").is_file()
    assert (final["bos_token_id"], final["eos_token_id"]) == (meta["bos_id"], meta["eos_id"])
    Model.from_pretrained(out / "final")  # config and files agree: a strict load


def test_init_from_run_resumes_exactly(data_dir, short_run, tmp_path):
    """An --init-from run stopped after step 1 and resumed (its source deleted meanwhile) gives the same losses and
    weights as an uninterrupted one."""
    src = tmp_path / "src"
    shutil.copytree(short_run / "final", src)
    kw = dict(init_from=src, model_overrides=None, max_steps=6, eval_every=3)
    micro_train(data_dir, tmp_path / "a", **kw)
    assert micro_train(data_dir, tmp_path / "b", time_budget_s=0, **kw)["steps"] == 1
    shutil.rmtree(src)
    s = train(data_dir=data_dir, out_dir=tmp_path / "b", resume=True, backend="reference", verbose=False,
              compile=False, time_budget_s=60)
    assert s["steps"] == 6
    (ta, ea), (tb, eb) = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    keys = ("step", "loss", "lm_loss", "mtp_loss", "aux_loss", "lr", "grad_norm", "tokens")
    assert [[r[k] for k in keys] for r in ta] == [[r[k] for k in keys] for r in tb]
    assert [e["val_loss"] for e in ea] == [e["val_loss"] for e in eb if e["step"] != 1]
    wa, wb = (load_file(tmp_path / r / "final/model.safetensors") for r in "ab")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_init_from_rejects_data_that_does_not_fit(data_dir, short_run, tmp_path):
    bigger = make_data_dir(tmp_path / "big", vocab_size=420)
    with pytest.raises(DataError, match="vocab of 420 tokens.*vocab_size 384"):
        micro_train(bigger, tmp_path / "o", init_from=short_run / "final", model_overrides=None)
    smaller = make_data_dir(tmp_path / "small", vocab_size=300)
    with pytest.raises(DataError, match="tokenizer mismatch: .*final/tokenizer.json differs from .*tokenizer.json"):
        micro_train(smaller, tmp_path / "o", init_from=short_run / "final", model_overrides=None)


# ---------------------------------------------------------------- training config and trainer protocol


def test_train_config_validates_and_reads_old_checkpoints():
    tiny = TRAIN_PRESETS["tiny"]
    assert isinstance(tiny, TrainConfig) and TrainConfig.from_dict(tiny.to_dict()) == tiny
    assert tiny.replace(lr=None, batch_size=2).batch_size == 2 and tiny.batch_size == 8
    for field, value, msg in [("batch_size", 0, "batch_size=0: expected an integer >= 1"),
                              ("warmup_steps", 1.5, "warmup_steps=1.5: expected an integer >= 0"),
                              ("lr", float("nan"), "lr=nan: expected a finite number > 0"),
                              ("lr", 0.0, "lr=0.0: expected a finite number > 0"),
                              ("min_lr_ratio", 1.5, r"min_lr_ratio=1.5: expected a number in \[0, 1\]"),
                              ("optimizer", "sgd", "optimizer='sgd': expected one of adamw, muon"),
                              ("time_budget_s", -1, "time_budget_s=-1: expected None or a number")]:
        with pytest.raises(ConfigError, match=msg):
            tiny.replace(**{field: value})
    with pytest.raises(TypeError, match="unknown training fields"):
        tiny.replace(batch=3)
    with pytest.raises(ConfigError, match="seq_len=256 exceeds the model's max_position_embeddings=128"):
        tiny.check_model(128)
    old = {k: v for k, v in tiny.to_dict().items() if k != "optimizer"}  # written before the field existed
    assert TrainConfig.from_dict(old) == tiny.replace(optimizer="adamw")
    with pytest.raises(ConfigError, match=r"missing fields \['seq_len'\]"):
        TrainConfig.from_dict({k: v for k, v in old.items() if k != "seq_len"})


def assert_is_trainer(trainer) -> None:
    """``trainer`` satisfies `dsfs.trainer.Trainer`: every attribute, and every method with the protocol's
    parameter names."""
    import inspect

    assert isinstance(trainer, Trainer)
    for name in ("micro_step", "optimizer_step", "eval_loss", "state_dict", "load_state_dict"):
        want = list(inspect.signature(getattr(Trainer, name)).parameters)[1:]
        assert list(inspect.signature(getattr(trainer, name)).parameters) == want, name


def test_torch_trainer_satisfies_the_protocol():
    trainer = TorchTrainer(_micro_model(), torch.device("cpu"), 1e-3, 0.1, 1.0, 0.3, compile=False)
    assert_is_trainer(trainer)
    batch = eval_batches((torch.arange(400) * 7 % 300).numpy(), 2, 16, 1)[0]
    assert set(trainer.micro_step(batch, 1)) == {"loss", "lm_loss", "mtp_loss", "aux_loss"}
    assert set(trainer.optimizer_step(1e-3)) == {"grad_norm"}
    v = evaluate(trainer.model, [batch, batch], trainer.eval_loss)
    assert trainer.model.training and v == evaluate(trainer.model, [batch], trainer.eval_loss)


# ---------------------------------------------------------------- backend


def test_backend_resolution(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("sys.platform", "linux")
    with pytest.raises(BackendError, match="CUDA is not available"):
        resolve_backend("cuda")
    be = resolve_backend("auto")
    assert (be.name, be.model_cls, be.device.type, be.note) == ("reference", Model, "cpu", None)
    assert resolve_backend("reference").device.type == "cpu"
    if importlib.util.find_spec("mlx") is not None:
        assert resolve_backend("mlx").model_cls.__module__ == "runtime_mlx.model"
    with pytest.raises(BackendError, match="unknown backend"):
        resolve_backend("tpu")


def test_backend_import_error_is_shown(monkeypatch):
    """A runtime that fails to import: asked for by name, an error carrying the ImportError; chosen by ``auto``,
    the reference with a note naming it."""
    monkeypatch.setitem(sys.modules, "runtime_mlx", None)  # importing it now raises ImportError
    with pytest.raises(BackendError, match="backend mlx: runtime_mlx failed to import: .*runtime_mlx"):
        resolve_backend("mlx")
    monkeypatch.setattr("sys.platform", "darwin")
    monkeypatch.setattr("platform.machine", lambda: "arm64")
    be = resolve_backend("auto")
    assert (be.name, be.model_cls, be.device.type) == ("reference", Model, "cpu")
    assert be.note.startswith("backend mlx: runtime_mlx failed to import") and "reference model on cpu" in be.note


# ---------------------------------------------------------------- CLI


def test_cli_help_and_bad_input(capsys, tmp_path, data_dir):
    assert _cli(capsys, "train", "--help")[0] == 0
    rc, _, err = _cli(capsys, "train", "--data", tmp_path / "missing", "--out", tmp_path / "o", "-q")
    assert rc == 1 and err.count("\n") == 1 and "no such data directory" in err
    rc, _, err = _cli(capsys, "train", "--data", data_dir, "--out", tmp_path / "o", "--resume", "-q")
    assert rc == 1 and err.count("\n") == 1 and "no checkpoint to resume" in err
    rc, _, err = _cli(capsys, "train", "--data", data_dir, "--out", tmp_path / "o", "--batch-size", "0", "-q")
    assert rc == 1 and err.count("\n") == 1 and "--batch-size 0: expected an integer >= 1" in err
    rc, _, err = _cli(capsys, "train", "--max-steps", "many")
    assert rc == 2 and err.count("\n") == 1
    if not torch.cuda.is_available():
        rc, _, err = _cli(capsys, "train", "--data", data_dir, "--out", tmp_path / "o", "--backend", "cuda", "-q")
        assert rc == 1 and err.count("\n") == 1 and "CUDA is not available" in err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_backend_trains(data_dir, tmp_path):
    s = micro_train(data_dir, tmp_path / "run", backend="cuda", max_steps=20, eval_every=10)
    train_recs, evals = read_metrics(tmp_path / "run")
    assert s["device"] == "cuda" and all(math.isfinite(r["loss"]) for r in train_recs)
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    s = train(data_dir=data_dir, out_dir=tmp_path / "run", resume=True, backend="cuda", verbose=False,
              compile=False,
              max_steps=24)
    assert s["steps"] == 24


# ---------------------------------------------------------------- one run per directory, SIGTERM (issue 13)

CLI_SCRIPT = """\
import json, os, sys, time
from dsfs import loop, presets
presets.MODEL_PRESETS["tiny"] = {**presets.MODEL_PRESETS["tiny"], **json.loads(sys.argv[1])}
gate = sys.argv[2]
if gate:
    step = loop.TrainingRun.step
    def gated_step(self):
        while self.progress.step >= 1 and not os.path.exists(gate):
            time.sleep(0.02)
        return step(self)
    loop.TrainingRun.step = gated_step
from dsfs.cli import main
sys.exit(main(sys.argv[3:]))
"""


def cli_process(*argv, gate: Path | None = None) -> subprocess.Popen:
    """``dsfs <argv>`` in a subprocess whose ``tiny`` preset is the micro model (stdout and stderr piped, text);
    with ``gate``, each step after the first waits until that file exists."""
    return subprocess.Popen([sys.executable, "-c", CLI_SCRIPT, json.dumps(MICRO_MODEL), str(gate or ""),
                             *map(str, argv)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def micro_cli_flags(**kw) -> list[str]:
    """``MICRO_TRAIN`` (updated with ``kw``) as ``dsfs train`` options."""
    return [a for k, v in {**MICRO_TRAIN, **kw}.items() for a in (f"--{k.replace('_', '-')}", str(v))]


def test_a_held_run_dir_refuses_a_second_run(data_dir, short_run, tmp_path, monkeypatch):
    out = _copy_run(short_run, tmp_path)
    before = [p.name for p in checkpointing.list_checkpoints(out / "checkpoints")], (out / "metrics.jsonl").read_text()
    busy = rf"{re.escape(str(out))} is in use by another dsfs run \(pid {os.getpid()}\); wait for it or choose another"
    with lock_run_dir(out):  # as another process: flock refuses a second open file of the same process alike
        for kw in (dict(overwrite=True), dict(resume=True), dict(resume=out / "checkpoints", out_dir=None)):
            with pytest.raises(RunDirBusy, match=busy):
                micro_train(data_dir, kw.pop("out_dir", out), max_steps=6, **kw)
        with monkeypatch.context() as m:  # past train()'s early check: the loop's own lock, before it changes a file
            m.setattr("dsfs.train.check_out", lambda *a, **k: None)
            for kw in (dict(overwrite=True), dict(resume=True)):
                with pytest.raises(RunDirBusy, match=busy):
                    micro_train(data_dir, out, max_steps=6, **kw)
    assert ([p.name for p in checkpointing.list_checkpoints(out / "checkpoints")],
            (out / "metrics.jsonl").read_text()) == before
    (out / ".loss.99999999.tmp.png").write_bytes(b"left by a killed run")
    assert micro_train(data_dir, out, resume=True, max_steps=6)["steps"] == 6
    assert not list(out.glob(".*.tmp*"))  # temporaries of dead processes are dropped under the lock
    with lock_run_dir(out):  # released at the end of the run
        pass


def test_metrics_and_plot_temporaries_are_named_per_process(tmp_path, monkeypatch):
    renamed, replace = [], os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (renamed.append(Path(a).name), replace(a, b))[1])
    recs = [{"step": 1, "loss": 3.0}, {"step": 1, "val_loss": 2.9}]
    loop._write_metrics(tmp_path / "metrics.jsonl", recs)
    loop.plot_losses(recs, tmp_path / "loss.png")
    assert len(renamed) == 2 and all(str(os.getpid()) in name for name in renamed), renamed


def test_a_second_signal_quits_at_once(data_dir, tmp_path):
    def twice(rec):
        if rec["step"] == 3:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(loop._StopSignals.REPEAT_S + 0.1)
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(loop.Interrupted) as e:
        micro_train(data_dir, tmp_path / "run", max_steps=8, eval_every=2, on_step=twice)
    assert e.value.signum == signal.SIGINT
    assert [p.name for p in checkpointing.list_checkpoints(tmp_path / "run/checkpoints")] == ["step_000002"]


def test_one_signal_delivered_twice_still_saves(data_dir, tmp_path):
    """``timeout -s INT 60 uv run dsfs ...`` delivers one SIGINT to the run twice within milliseconds (once from the
    process group, once forwarded by uv): that is one Ctrl-C, which checkpoints."""
    def doubled(rec):
        if rec["step"] == 3:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(loop.Interrupted):
        micro_train(data_dir, tmp_path / "run", max_steps=8, eval_every=2, on_step=doubled)
    assert [p.name for p in checkpointing.list_checkpoints(tmp_path / "run/checkpoints")] == [
        "step_000002", "step_000003"]


def test_cli_exit_code_names_the_signal(capsys, monkeypatch):
    for exc, code, line in [(KeyboardInterrupt(), 130, "dsfs: interrupted"),
                            (loop.Interrupted(signal.SIGINT), 130, "dsfs: interrupted"),
                            (loop.Interrupted(signal.SIGTERM), 143, "dsfs: stopped by SIGTERM")]:
        monkeypatch.setattr("dsfs.train.train", lambda *a, exc=exc, **k: (_ for _ in ()).throw(exc))
        assert _cli(capsys, "train")[::2] == (code, line + "\n")


@pytest.mark.skipif(sys.platform == "win32", reason="SIGTERM to a child is POSIX")
def test_sigterm_checkpoints_exits_143_and_resumes_exactly(data_dir, tmp_path, monkeypatch):
    out, gate = tmp_path / "b", tmp_path / "gate"
    proc = cli_process("train", "--data", data_dir, "--out", out, "--backend", "reference", "--compile", "off",
                       "--threads", "1", "-q", *micro_cli_flags(max_steps=8, eval_every=4), gate=gate)
    try:
        deadline = time.monotonic() + 120
        while not any('"loss"' in line for line in _lines(out / "metrics.jsonl")):  # after its first step
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no step within 120 s"
            time.sleep(0.05)
        with pytest.raises(RunDirBusy, match=rf"\(pid {proc.pid}\)"):  # held by the child
            micro_train(data_dir, out, overwrite=True)
        proc.send_signal(signal.SIGTERM)
        gate.touch()
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143, err
    m = re.search(r"stopped by SIGTERM at step (\d+): checkpoint saved in (\S+); continue with dsfs train --resume "
                  rf"--out {re.escape(str(out))}", err)
    assert m and m[1] in ("1", "2"), err
    assert checkpointing.latest_checkpoint(out) == Path(m[2]) and not (out / "final").exists()
    monkeypatch.setitem(MODEL_PRESETS, "tiny", {**MODEL_PRESETS["tiny"], **MICRO_MODEL})  # the child's preset
    s = train(data_dir=data_dir, out_dir=out, resume=True, backend="reference", verbose=False, compile=False)
    assert s["steps"] == 8
    micro_train(data_dir, tmp_path / "a", max_steps=8, eval_every=4)  # uninterrupted
    (ta, ea), (tb, eb) = read_metrics(tmp_path / "a"), read_metrics(out)
    keys = ("step", "loss", "lm_loss", "mtp_loss", "aux_loss", "lr", "grad_norm", "tokens")
    assert [[r[k] for k in keys] for r in ta] == [[r[k] for k in keys] for r in tb] and ea == eb
    wa, wb = (load_file(d / "final/model.safetensors") for d in (tmp_path / "a", out))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.is_file() else []


# ---------------------------------------------------------------- train() argument checks (issue 13, defects 8-9)


def test_train_checks_its_run_options_before_any_work(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    for kw, msg in [(dict(keep_last=-1), "--keep-last -1: expected an integer >= 0"),
                    (dict(save_every=0), "--save-every 0: expected an integer >= 1"),
                    (dict(resume=True, overwrite=True), "pass --resume .* or --overwrite .*, not both")]:
        with pytest.raises(ConfigError, match=msg):
            micro_train(data_dir, out, **kw)
    assert not out.exists()
    train("tiny", data_dir, out, model_overrides=MICRO_MODEL, backend="reference", compile=False,
          **{**MICRO_TRAIN, "max_steps": 1})  # verbose
    err = capsys.readouterr().err
    assert ", 1 step; data " in err and "1 steps" not in err, err


def test_resume_keeps_the_runs_checkpoint_options(data_dir, tmp_path):
    """--keep-last and --save-every given at the start hold on --resume unless given again."""
    out = tmp_path / "run"
    micro_train(data_dir, out, max_steps=3, eval_every=3, save_every=1, keep_last=1)
    micro_train(data_dir, out, resume=True, max_steps=6)
    steps = [p.name for p in checkpointing.list_checkpoints(out / "checkpoints")]
    assert steps == ["step_000006"], steps  # saved every step, one kept (defaults would keep 3 of 3, 6)
