"""The post-training verbs (`dsfs sft`, `dsfs dpo`, `dsfs distill`) on a micro model: the loss mask, batches, exact
resume, DPO's ln 2 at initialization (with dropout configured), precomputed reference log-probs, distillation's
shared-tokenizer checks, the run directory, and one-line CLI errors.

The micro model (tests/test_train.py's: hidden 32, 2 layers, MLA + DeepSeekMoE + MTP) is pretrained for a few steps
on a slice of TinyStories with a ~384-token tokenizer; every stage run is a few steps of a second or two.
"""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch

from dsfs import arithmetic, chat, cli
from dsfs.data import read_tokenizer
from dsfs.distill import distill
from dsfs.dpo import collate_pairs, dpo
from dsfs.errors import CheckpointError, ConfigError, DataError
from dsfs.sft import collate, sft
from dsfs.stage import ExampleOrder
from tests.test_train import MICRO_MODEL, make_data_dir, micro_train

STAGE = dict(backend="reference", verbose=False, batch_size=4, seq_len=64, eval_every=3, eval_batches=1,
             warmup_steps=1, lr=1e-3)
SFT = dict(STAGE, compile=False)  # compiling costs more than these few steps


def records(out: Path) -> tuple[list[dict], list[dict]]:
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if "loss" in r], [r for r in recs if "val_loss" in r]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def conversations(n: int = 12) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"Count to {i}."},
                          {"role": "assistant", "content": " ".join(str(k) for k in range(1, i + 2))}]}
            for i in range(n)]


# ---------------------------------------------------------------- batches


def test_sft_labels_are_the_assistant_tokens_shifted(base):
    tok = read_tokenizer(base["plain"] / "tokenizer.json")
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello 42"}, {"role": "user", "content": "Again"},
            {"role": "assistant", "content": "Bye"}]
    ids, labels, cut = chat.sft_features(msgs, tok, 64)
    assert not cut
    b = collate([(ids, labels), (ids[:5], labels[:5])], pad_id=2)
    x, y = b["input_ids"], b["targets"]
    assert x.shape == y.shape and x.shape[1] % 16 == 0
    n = len(ids) - 1
    assert x[0, :n].tolist() == ids[:-1] and (x[0, n:] == 2).all()
    _, mask = chat.render(msgs, tok)
    want = [t if m else -100 for t, m in zip(ids[1:], mask[1:], strict=True)]
    assert y[0, :n].tolist() == want and (y[0, n:] == -100).all()
    # the supervised tokens decode to the two assistant replies, each with its eos
    text = tok.decode([t for t in want if t != -100], skip_special_tokens=False)
    assert text == "Hello 42<|endoftext|>Bye<|endoftext|>"


def test_dpo_pairs_are_chosen_rows_then_rejected_with_completion_targets():
    pairs = [([1, 3, 10, 11, 4], [20, 21, 0], [30, 0]), ([1, 3, 12, 4], [22, 0], [31, 32, 33, 0])]
    b = collate_pairs(pairs, pad_id=2)
    x, y = b["input_ids"], b["targets"]
    assert x.shape == (4, 16)
    assert x[0, :7].tolist() == [1, 3, 10, 11, 4, 20, 21] and y[0, :7].tolist() == [-100] * 4 + [20, 21, 0]
    assert x[3, :7].tolist() == [1, 3, 12, 4, 31, 32, 33] and y[3, :7].tolist() == [-100] * 3 + [31, 32, 33, 0]
    assert (y[:, 8:] == -100).all()


def test_example_order_is_a_function_of_its_position():
    a = ExampleOrder(7, seed=3)
    first = a.take(10) + a.take(11)
    b = ExampleOrder(7, seed=3, pos=10)
    assert b.take(11) == first[10:]
    assert sorted(first[:7]) == list(range(7)) and sorted(first[7:14]) == list(range(7))


# ---------------------------------------------------------------- sft


def ctrl_c_at(step: int):
    """An ``on_step`` that sends this process SIGINT after ``step``: the real Ctrl-C path (finish, save, stop)."""
    def on_step(rec):
        if rec["step"] == step:
            os.kill(os.getpid(), signal.SIGINT)
    return on_step


def test_sft_on_conversations_trains_and_resumes_exactly(base, tmp_path):
    data = write_jsonl(tmp_path / "conv.jsonl", conversations())
    whole = sft(str(data), tmp_path / "a", init_from=base["plain"], max_steps=6, **SFT)
    with pytest.raises(KeyboardInterrupt):
        sft(str(data), tmp_path / "b", init_from=base["plain"], max_steps=6, on_step=ctrl_c_at(4), **SFT)
    resumed = sft(None, tmp_path / "b", resume=True, **SFT)
    ta, ea = records(tmp_path / "a")
    tb, eb = records(tmp_path / "b")
    assert [r["loss"] for r in ta] == [r["loss"] for r in tb]
    assert [r["val_loss"] for r in ea] == [r["val_loss"] for r in eb]
    assert resumed["steps"] == whole["steps"] == 6
    assert (tmp_path / "a" / "final" / "tokenizer.json").is_file()
    assert ta[-1]["loss"] < ta[0]["loss"]


def test_sft_arithmetic_reports_accuracy_per_split(base, tmp_path):
    s = sft("arithmetic", tmp_path / "r", init_from=base["plain"], max_steps=2, num_examples=40, eval_examples=3,
            splits=["add_sub_1", "add_sub_2"], **{**SFT, "seq_len": 128})
    _, ev = records(tmp_path / "r")
    assert {"val_accuracy", "val_accuracy/add_sub_1", "val_accuracy/add_sub_2"} <= set(ev[-1])
    assert 0.0 <= s["val_accuracy"] <= 1.0
    assert (tmp_path / "r" / "loss.png").stat().st_size > 0


def test_sft_counts_truncated_sequences(base, tmp_path):
    long = [{"messages": [{"role": "user", "content": "Say many numbers."},
                          {"role": "assistant", "content": " ".join(["7"] * 40)}]}] * 6
    data = write_jsonl(tmp_path / "long.jsonl", long + conversations(6))
    s = sft(str(data), tmp_path / "t", init_from=base["plain"], max_steps=1, **{**SFT, "seq_len": 40})
    assert sum(c.get("truncated", 0) for c in s["truncated"].values()) >= 5


def test_sft_resume_keeps_its_options(base, tmp_path):
    data = write_jsonl(tmp_path / "conv.jsonl", conversations())
    sft(str(data), tmp_path / "r", init_from=base["plain"], max_steps=1, **SFT)
    with pytest.raises(CheckpointError, match="keeps its options"):
        sft("arithmetic", tmp_path / "r", resume=True, max_steps=2, **SFT)
    with pytest.raises(CheckpointError, match="dsfs sft run"):
        dpo(None, tmp_path / "r", resume=True, max_steps=2, **STAGE)


# ---------------------------------------------------------------- dpo


@pytest.mark.parametrize("which", ["plain", "dropout"])
def test_dpo_starts_at_ln2_exactly(base, tmp_path, which):
    s = dpo("arithmetic", tmp_path / "d", init_from=base[which], max_steps=2, num_examples=16, eval_examples=2,
            splits=["add_sub_1"], **{**STAGE, "seq_len": 128})
    first = records(tmp_path / "d")[0][0]
    assert first["loss"] == torch.tensor(math.log(2), dtype=torch.float32).item()  # ln 2 in float32, exactly
    assert first["rewards/margins"] == 0.0 and first["rewards/chosen"] == 0.0
    assert {"rewards/rejected", "rewards/accuracies", "logps/chosen", "logps/rejected"} <= set(first)
    assert math.isfinite(s["val_loss"]) and "val_rewards/margins" in s


def test_dpo_precomputed_reference_log_probs_give_the_same_run(base, tmp_path):
    kw = dict(init_from=base["plain"], max_steps=3, num_examples=12, eval_examples=2, splits=["add_sub_1"],
              **{**STAGE, "seq_len": 128})
    dpo("arithmetic", tmp_path / "a", **kw)
    dpo("arithmetic", tmp_path / "b", precompute_ref_log_probs=True, **kw)
    a, b = records(tmp_path / "a")[0], records(tmp_path / "b")[0]
    for ra, rb in zip(a, b, strict=True):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-6, abs=1e-7)


def test_dpo_bad_options(base, tmp_path):
    with pytest.raises(ConfigError, match="--label-smoothing applies"):
        dpo("arithmetic", tmp_path / "x", init_from=base["plain"], loss_type="ipo", label_smoothing=0.1, **STAGE)
    with pytest.raises(ConfigError, match="--beta"):
        dpo("arithmetic", tmp_path / "x", init_from=base["plain"], beta=0.0, **STAGE)
    with pytest.raises(ConfigError, match="needs --init-from"):
        dpo("arithmetic", tmp_path / "x", **STAGE)


# ---------------------------------------------------------------- distill


def test_distill_trains_a_student_and_resumes_exactly(base, tmp_path):
    kw = dict(init_from=base["dropout"], data_dir=base["data"], max_steps=4, **{**STAGE, "seq_len": 32})
    whole = distill(base["plain"], tmp_path / "a", **kw)
    with pytest.raises(KeyboardInterrupt):
        distill(base["plain"], tmp_path / "b", on_step=ctrl_c_at(2), **kw)
    distill(None, tmp_path / "b", resume=True, **{**STAGE, "seq_len": 32})
    ta, tb = records(tmp_path / "a")[0], records(tmp_path / "b")[0]
    assert [r["loss"] for r in ta] == [r["loss"] for r in tb]
    assert {"soft_loss", "hard_loss"} <= set(ta[0])
    assert whole["teacher_params"] == whole["student_params"]


def test_distill_on_policy_batches_drop_the_hard_loss(base, tmp_path):
    distill(base["plain"], tmp_path / "p", init_from=base["plain"], data_dir=base["data"], lmbda=1.0, beta=0.0,
            max_new_tokens=4, max_steps=1, **{**STAGE, "seq_len": 16})
    rec = records(tmp_path / "p")[0][0]
    assert rec["on_policy"] == 1.0 and rec["hard_loss"] is None
    assert rec["soft_loss"] == pytest.approx(0.0, abs=1e-5)  # the student is the teacher: no divergence


def test_distill_refuses_another_tokenizer(base, tmp_path):
    other = make_data_dir(tmp_path / "other", vocab_size=300)
    with pytest.raises(DataError, match="tokenizer"):
        distill(base["plain"], tmp_path / "x", init_from=base["plain"], data_dir=other, **STAGE)


# ---------------------------------------------------------------- CLI


@pytest.mark.parametrize("argv, code, message", [
    (["sft", "--dataset", "arithmetic"], 1, "needs --init-from"),
    (["dpo", "--loss-type", "kto"], 2, "invalid choice"),
    (["distill", "--teacher", "nowhere"], 1, "needs the student"),
    (["sft", "--init-from", "nowhere", "--dataset", "arithmetic"], 1, "no such checkpoint directory"),
    (["sft", "--lr", "-1", "--init-from", "x"], 1, "--lr -1"),
])
def test_cli_errors_are_one_line(argv, code, message, capsys):
    assert cli.main(argv) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_cli_sft_runs(base, tmp_path, capsys):
    data = write_jsonl(tmp_path / "conv.jsonl", conversations())
    argv = ["sft", "--init-from", str(base["plain"]), "--dataset", str(data), "--out", str(tmp_path / "c"),
            "--max-steps", "2", "--batch-size", "4", "--seq-len", "64", "--eval-every", "1", "--eval-batches", "1",
            "--backend", "reference", "--compile", "off", "-q"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    assert "final model:" in capsys.readouterr().out


def test_arithmetic_prompts_fit_the_generation_budget(base):
    tok = read_tokenizer(base["plain"] / "tokenizer.json")
    for name in arithmetic.SPLITS:
        for p in arithmetic.problems(name, 20, 0):
            ids, _ = chat.render(arithmetic.conversation(p), tok)
            prompt, _ = chat.render(arithmetic.conversation(p)[:-1], tok, add_generation_prompt=True)
            assert len(ids) - len(prompt) <= arithmetic.max_completion_tokens(name)  # mul_3x3 runs longer


# ---------------------------------------------------------------- bad input found by trying to break the verbs


def test_padding_stops_at_the_models_positions(base, tmp_path):
    """Batches round their width up to 16 but never past --seq-len (here the model's 100 positions)."""
    micro_train(base["data"], tmp_path / "m100", max_steps=1,
                model_overrides={**MICRO_MODEL, "max_position_embeddings": 100})
    long = [{"messages": [{"role": "user", "content": "Many sevens?"},
                          {"role": "assistant", "content": " ".join(["7"] * 60)}]}] * 8
    data = write_jsonl(tmp_path / "long.jsonl", long)
    s = sft(str(data), tmp_path / "s", init_from=tmp_path / "m100" / "final", max_steps=1,
            **{**SFT, "seq_len": 100})
    assert s["truncated"]["train"]["truncated"] >= 1
    pairs = [{"prompt": "Say sevens.", "chosen": " ".join(["7"] * 60), "rejected": "no"}] * 8
    d = dpo(str(write_jsonl(tmp_path / "p.jsonl", pairs)), tmp_path / "d", init_from=tmp_path / "m100" / "final",
            max_steps=1, **{**STAGE, "seq_len": 100})
    assert math.isfinite(d["val_loss"])


def test_conversations_whose_prompt_fills_the_length_are_dropped_and_counted(base, tmp_path):
    rows = conversations(8) + [{"messages": [{"role": "user", "content": " ".join(["word"] * 80)},
                                             {"role": "assistant", "content": "ok"}]}] * 3
    s = sft(str(write_jsonl(tmp_path / "c.jsonl", rows)), tmp_path / "s", init_from=base["plain"], max_steps=1,
            eval_dataset=str(write_jsonl(tmp_path / "e.jsonl", conversations(3))), **{**SFT, "seq_len": 40})
    assert s["truncated"]["train"]["dropped"] == 3


@pytest.mark.parametrize("kw, match", [
    (dict(beta=float("inf")), "--beta inf"),
    (dict(splits=["add_sub_1"], dataset="FILE"), "--splits applies"),
    (dict(eval_dataset="FILE"), "--eval-dataset applies"),
    (dict(splits=[""]), "--splits"),
])
def test_dpo_refuses_options_it_would_ignore_or_crash_on(base, tmp_path, kw, match):
    f = str(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}] * 4))
    kw = {k: f if v == "FILE" else v for k, v in kw.items()}
    with pytest.raises(ConfigError, match=match):
        dpo(kw.pop("dataset", "arithmetic"), tmp_path / "x", init_from=base["plain"], **kw, **STAGE)


def test_distill_checks_temperature_and_on_policy_length(base, tmp_path):
    with pytest.raises(ConfigError, match="--temperature inf"):
        distill(base["plain"], tmp_path / "x", init_from=base["plain"], data_dir=base["data"],
                temperature=float("inf"), **STAGE)
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        distill(base["plain"], tmp_path / "x", init_from=base["plain"], data_dir=base["data"], lmbda=1.0,
                max_new_tokens=500, **STAGE)


def test_resume_accepts_options_given_at_their_value(base, tmp_path):
    kw = dict(init_from=base["plain"], max_steps=2, num_examples=12, eval_examples=2, splits=["add_sub_1"],
              **{**STAGE, "seq_len": 128})
    with pytest.raises(KeyboardInterrupt):
        dpo("arithmetic", tmp_path / "r", on_step=ctrl_c_at(1), **kw)
    kw.pop("init_from")
    s = dpo("arithmetic", tmp_path / "r", resume=True, beta=0.1, loss_type="sigmoid", **kw)
    assert s["steps"] == 2


def test_a_run_that_stopped_before_its_first_step_can_start_again(base, tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 0, "val_loss": 3.0}\n')
    data = write_jsonl(tmp_path / "conv.jsonl", conversations())
    assert sft(str(data), out, init_from=base["plain"], max_steps=1, **SFT)["steps"] == 1
    with pytest.raises(DataError, match="already holds a run"):
        sft(str(data), out, init_from=base["plain"], max_steps=1, **SFT)


def test_dpo_rpo_alpha_adds_the_chosen_nll(base, tmp_path):
    dpo("arithmetic", tmp_path / "d", init_from=base["plain"], max_steps=1, num_examples=8, eval_examples=2,
        splits=["add_sub_1"], rpo_alpha=0.5, **{**STAGE, "seq_len": 128})
    first = records(tmp_path / "d")[0][0]
    ln2 = torch.tensor(math.log(2), dtype=torch.float32).item()
    assert first["nll_loss"] > 0 and first["loss"] == pytest.approx(ln2 + 0.5 * first["nll_loss"], rel=1e-6)


def test_task_default_sizes_stop_at_what_a_split_holds():
    from dsfs.tasks import load_task

    t = load_task("arithmetic", num_train=5000, num_held_out=500, splits=["mul_2x1"], at_most=True)
    assert len(t.train) == arithmetic.capacity("mul_2x1") and len(t.held_out) == arithmetic.capacity(
        "mul_2x1", held_out=True)
    assert not {p.canonical for p in t.train} & {p.canonical for p in t.held_out}
    with pytest.raises(DataError, match="ask fewer"):
        load_task("arithmetic", num_train=5000, splits=["mul_2x1"])
