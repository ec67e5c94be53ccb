"""`dsfs grpo` and `dsfs pipeline` on a micro model: a run logs TRL's metrics, resumes exactly after a Ctrl-C in the
middle of ``num_iterations``, uses the calculator, takes a prompt file with a user's reward function, refuses bad
input in one line; rejection sampling keeps only correct, well-formatted completions; the pipeline skips what is
finished and resumes what was interrupted."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from dsfs import cli
from dsfs.errors import ConfigError
from dsfs.grpo import grpo
from dsfs.pipeline import Pipeline, format_table, read_config, rejection_sample
from dsfs.rollout import Completion
from dsfs.tasks import load_task as real_load_task
from tests.test_stage import STAGE, ctrl_c_at, records

RUN = dict(STAGE, batch_size=8, seq_len=96, eval_every=2, eval_examples=3)
OPTS = dict(num_generations=4, max_completion_length=10)


def test_grpo_logs_trl_metrics_and_resumes_exactly_mid_iterations(base, tmp_path):
    opts = dict(OPTS, num_iterations=2, beta=0.04, epsilon_high=0.28, loss_type="grpo")
    kw = dict(splits=["add_sub_1"], max_steps=5, **RUN)
    whole = grpo("arithmetic", tmp_path / "a", init_from=base["plain"], grpo_options=opts, **kw)
    with pytest.raises(KeyboardInterrupt):
        grpo("arithmetic", tmp_path / "b", init_from=base["plain"], grpo_options=opts, on_step=ctrl_c_at(3), **kw)
    grpo(None, tmp_path / "b", resume=True, **{k: v for k, v in RUN.items() if k != "eval_examples"})
    ta, ea = records(tmp_path / "a")
    tb, eb = records(tmp_path / "b")
    assert [r["loss"] for r in ta] == [r["loss"] for r in tb] and len(ta) == 5
    assert [r["reward"] for r in ta] == [r["reward"] for r in tb]
    for key in ("reward", "reward_std", "rewards/accuracy_reward/mean", "rewards/format_reward/std",
                "frac_reward_zero_std", "completions/mean_length", "completions/clipped_ratio", "kl", "entropy",
                "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "grad_norm"):
        assert key in ta[-1], key
    assert ta[0]["kl"] == 0.0  # the policy starts as the reference
    assert ta[0]["reward"] == ta[1]["reward"]  # num_iterations 2: one generation serves two steps
    assert "val_accuracy" in whole and "val_format" in whole and whole["steps"] == 5


def test_grpo_with_the_calculator(base, tmp_path):
    s = grpo("arithmetic", tmp_path / "t", init_from=base["plain"], splits=["mul_3x3"], max_steps=1,
             grpo_options=dict(OPTS, tools=True, style="tool", max_completion_length=24), **RUN)
    train, _ = records(tmp_path / "t")
    assert "tools/calls_mean" in train[-1] and s["steps"] == 1


def test_grpo_prompt_file_and_a_users_reward(base, tmp_path, monkeypatch):
    (tmp_path / "grpo_run_rewards.py").write_text(
        "def short(prompts, completions, target, **kw):\n"
        "    return [1.0 if target[i] in c else -len(c) / 100 for i, c in enumerate(completions)]\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    rows = [{"prompt": f"Say {w}.", "target": w} for w in ("yes", "no", "cat", "dog")]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = grpo(str(tmp_path / "p.jsonl"), tmp_path / "f", init_from=base["plain"], max_steps=2,
             grpo_options=dict(OPTS, reward_funcs=["grpo_run_rewards:short", "format"], reward_weights=[1.0, 0.5],
                               dynamic_sampling=True, max_resample=1), **{**RUN, "eval_examples": None})
    train, _ = records(tmp_path / "f")
    assert "rewards/short/mean" in train[-1] and "dynamic_sampling/dropped_groups" in train[-1]
    assert s["val_loss"] is None and s["steps"] == 2


@pytest.mark.parametrize("argv, message", [
    (["grpo", "--dataset", "arithmetic", "--num-generations", "3"], "multiple of --num-generations 3"),
    (["grpo", "--dataset", "arithmetic", "--loss-type", "ppo"], "invalid choice"),
    (["grpo", "--dataset", "arithmetic", "--reward-funcs", "nope:fn"], "nope"),
    (["grpo", "--dataset", "arithmetic", "--reward-weights", "1,x"], "comma-separated numbers"),
    (["grpo", "--dataset", "arithmetic", "--temperature", "0"], "--temperature 0"),
    (["grpo", "--dataset", "arithmetic", "--max-completion-length", "500"], "--seq-len"),
])
def test_grpo_bad_input_is_one_line(base, tmp_path, argv, message, capsys):
    rc = cli.main(argv + ["--init-from", str(base["plain"]), "--out", str(tmp_path / "x"), "--backend", "reference",
                          "-q"])
    err = capsys.readouterr().err
    assert rc in (1, 2) and message in err and len(err.strip().splitlines()) <= 3, err


def test_rejection_sampling_keeps_correct_formatted_completions(base, tmp_path, monkeypatch):
    from dsfs import arithmetic

    def scripted(model, prompts, max_new_tokens, num_generations=1, tokenizer=None, **kw):
        out = []
        for i, p in enumerate(prompts):
            for g in range(num_generations):
                ans = answers[i] if g % 2 == 0 else answers[i] + 1
                text = f"<think>\nx\n</think>\n<answer>\n{ans}\n</answer>"
                out.append(Completion(list(p), tokenizer.encode(text).ids + [0], finish_reason="stop"))
        return out

    problems = arithmetic.problems("add_sub_1", 5, seed=1)
    answers = [p.answer for p in problems]
    monkeypatch.setattr("dsfs.rollout.rollout", scripted)
    monkeypatch.setattr("dsfs.tasks.load_task", lambda *a, **k: _task(problems))
    res = rejection_sample(base["plain"], tmp_path / "rs.jsonl", num_examples=5, num_generations=4,
                           backend="reference", verbose=False)
    rows = [json.loads(x) for x in (tmp_path / "rs.jsonl").read_text().splitlines()]
    assert res["sampled"] == 20 and res["kept"] == len(rows) == 5  # one kept per prompt: duplicates dropped
    assert all(r["messages"][-1]["content"].endswith(f"{a}\n</answer>") for r, a in zip(rows, answers, strict=True))


def _task(problems):
    t = real_load_task("arithmetic", num_train=1, num_held_out=1, splits=["add_sub_1"], style="r1")
    t.train = problems
    return t


def test_pipeline_config_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    for text, msg in [("[pretrainn]\n", "unknown table [pretrainn]"), ("[pipeline]\nout = 'x'\n", "no stage table"),
                      ("[pipeline]\nfoo = 1\n[sft]\n", "unknown key 'foo'"), ("[sft\n", "not valid TOML")]:
        bad.write_text(text)
        with pytest.raises(ConfigError, match=msg.replace("[", r"\[")):
            read_config(bad)
    with pytest.raises(ConfigError, match="no such file"):
        read_config(tmp_path / "none.toml")


def test_pipeline_runs_skips_and_resumes(base, tmp_path):
    out = tmp_path / "pipe"
    cfg = tmp_path / "p.toml"
    common = "backend = 'reference'\nbatch_size = 8\nseq_len = 96\neval_every = 2\neval_batches = 1\n"
    cfg.write_text(
        f"[pipeline]\nout = '{out}'\nbackend = 'reference'\n"
        f"[sft]\ninit_from = '{base['plain']}'\ndataset = 'arithmetic'\nsplits = ['add_sub_1']\nstyle = 'r1'\n"
        f"max_steps = 2\neval_examples = 3\n{common}compile = false\n"
        f"[grpo]\ndataset = 'arithmetic'\nsplits = ['add_sub_1']\nmax_steps = 3\neval_examples = 3\n"
        f"num_generations = 4\nmax_completion_length = 10\n{common}")
    with pytest.raises(KeyboardInterrupt):
        p = Pipeline(read_config(cfg), verbose=False)
        p.cfg["grpo"]["on_step"] = ctrl_c_at(2)
        p.run()
    state = json.loads((out / "pipeline.json").read_text())
    assert list(state["stages"]) == ["sft"]  # grpo was interrupted: not recorded
    rows = Pipeline(read_config(cfg), verbose=False).run()
    assert [r["stage"] for r in rows] == ["sft", "grpo"]
    train, _ = records(out / "grpo")
    assert [r["step"] for r in train] == [1, 2, 3]
    table = format_table(rows)
    assert "sft" in table and "grpo" in table and "val_accuracy" in table
    again = Pipeline(read_config(cfg), verbose=False).run()  # everything finished: skipped
    assert [r["summary"] for r in again] == [r["summary"] for r in rows]
    cfg.write_text(cfg.read_text().replace("max_steps = 3", "max_steps = 4"))
    with pytest.raises(ConfigError, match="finished .* with other settings"):
        Pipeline(read_config(cfg), verbose=False).run()
    shutil.rmtree(out / "grpo")  # as the message says: the stage runs again with the new settings
    rows = Pipeline(read_config(cfg), verbose=False).run()
    assert [r["step"] for r in records(out / "grpo")[0]] == [1, 2, 3, 4] and rows[0]["summary"] == again[0]["summary"]
    cfg.write_text(cfg.read_text() + "typo_key = 1\n")
    with pytest.raises(ConfigError, match="\\[grpo\\]: unknown key 'typo_key'"):
        Pipeline(read_config(cfg), verbose=False).run()


def test_example_config_parses():
    cfg = read_config(Path(__file__).resolve().parent.parent / "examples" / "r1-tiny.toml")
    assert {"prepare", "pretrain", "sft", "grpo", "rejection_sampling", "distill", "export"} <= set(cfg)
    assert sys.version_info >= (3, 11)


def test_grpo_on_mlx_matches_the_reference(base, tmp_path):
    pytest.importorskip("mlx.core")
    opts = dict(OPTS, beta=0.04, num_iterations=2)
    kw = dict(splits=["add_sub_1"], max_steps=2, **{k: v for k, v in RUN.items() if k != "backend"})
    runs = {}
    for be in ("reference", "mlx"):
        grpo("arithmetic", tmp_path / be, init_from=base["plain"], grpo_options=opts, backend=be, **kw)
        runs[be] = records(tmp_path / be)[0]
    a, b = runs["reference"][0], runs["mlx"][0]
    assert a["reward"] == b["reward"] and a["completions/mean_length"] == b["completions/mean_length"]
    for k in ("loss", "kl", "entropy"):
        assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), k


def test_generate_batches_prompts_and_eval_takes_the_calculator(base, capsys):
    argv = ["generate", "--checkpoint", str(base["plain"]), "--prompt", "Once", "--prompt", "The dog",
            "--num-return-sequences", "2", "--max-new-tokens", "5", "--device", "cpu"]
    assert cli.main(argv) == 0
    out, err = capsys.readouterr()
    assert [line for line in out.splitlines() if line.startswith("---")] == ["--- 0", "--- 1", "--- 2", "--- 3"]
    assert "4 sequences" in err
    assert cli.main(["eval", "--checkpoint", str(base["plain"]), "--task", "arithmetic", "--splits", "mul_3x3",
                     "--examples", "2", "--tools", "--device", "cpu"]) == 0
    assert "with the calculator" in capsys.readouterr().out
    assert cli.main(["eval", "--checkpoint", str(base["plain"]), "--tools"]) == 1
    assert "--tools applies to --task" in capsys.readouterr().err
