"""Data-parallel MLX training (`runtime_mlx.distributed`) on 2 local processes joined by MLX's ring backend: one
step of `MLXTrainer` on 2 processes equals one process on the same global batch (loss and every parameter's
gradient within 1e-5, float32), 5 steps give the same losses within 1e-4 and the same MoE correction biases, every
process keeps the same weights; ``dsfs train --backend mlx --nproc 2`` in the launched processes writes the run of
a one-process run; `launch` stops the run and returns the exit code of a failed process.

The 2-process work runs in `_worker`, started once by `runtime_mlx.distributed.launch` (each process pays about
10 s of CPU importing torch and the reference): it writes its results to files that the tests compare. ``launch``
gives the processes the environment of ``mlx.launch --backend ring -n 2`` (``MLX_RANK``, ``MLX_HOSTFILE``);
``mlx.launch`` itself busy-waits on one core while its processes run (MLX 0.32) and exits 0 when they fail."""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
TOL = 1e-5
B, T, VOCAB = 4, 16, 96
STEPS = 5
RUN = dict(max_steps=3, batch_size=4, seq_len=32, lr=3e-3, warmup_steps=4, eval_every=2, eval_batches=1,
           optimizer="adamw")
CLI_ARGS = [a for k, v in RUN.items() for a in (f"--{k.replace('_', '-')}", str(v))]
CONFIG = dict(  # tests.test_train.MICRO_MODEL with two expert groups (not imported: the workers start faster)
    vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
    moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, n_group=2, topk_group=1,
    first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
    v_head_dim=8, num_nextn_predict_layers=1, max_position_embeddings=64, aux_loss_alpha=1e-3,
    bias_update_speed=1e-2)


def _worker(out: str, data_dir: str) -> None:
    """One of the 2 launched processes: `_check_trainer`, then ``dsfs train --backend mlx --nproc 2`` (the micro
    model as the tiny preset, eager) into ``out/run``; writes the CLI's exit code into ``rank{r}.rc`` and what it
    printed into ``rank{r}.out``."""
    from dsfs import cli
    from dsfs.presets import MODEL_PRESETS
    from tests.test_train import MICRO_MODEL

    _check_trainer(out)
    MODEL_PRESETS["tiny"] = {**MODEL_PRESETS["tiny"], **MICRO_MODEL}
    r = os.environ["MLX_RANK"]
    with open(Path(out) / f"rank{r}.out", "w") as f, contextlib.redirect_stdout(f):
        rc = cli.main(["train", "--backend", "mlx", "--nproc", "2", "--data", data_dir, "--out",
                       str(Path(out) / "run"), "-q", "--compile", "off", *CLI_ARGS])
    (Path(out) / f"rank{r}.rc").write_text(str(rc))


def _check_trainer(out: str, compile: bool = False) -> None:
    """The 2-process check of `MLXTrainer`: a data-parallel `MLXTrainer` and a one-process one (the oracle, computed
    by every process alike), from the same weights, on the same global batches; eager by default (``mx.compile``
    on MLX's CPU backend builds its kernels with the C++ compiler: about 30 s the first time on this machine).
    Writes ``rank{r}.json`` (errors and metrics) and ``rank{r}.npz`` (the data-parallel weights after the steps)."""
    import mlx.core as mx
    import torch
    from mlx.utils import tree_flatten

    from reference import Model as ReferenceModel
    from reference import ModelConfig
    from runtime_mlx import distributed
    from runtime_mlx.train import MLXTrainer, from_reference

    group = distributed.world()
    r = group.rank()
    cfg = ModelConfig(**CONFIG)

    def trainer(g):
        torch.manual_seed(0)
        return MLXTrainer(from_reference(ReferenceModel(cfg)), 3e-3, 0.1, 1.0, 0.3, compile=compile, group=g)

    dp, one = trainer(group), trainer(None)
    gen = torch.Generator().manual_seed(1)

    def batch(rows=B):
        ids = torch.randint(0, VOCAB, (rows, T + 1), generator=gen)
        return {"input_ids": ids[:, :-1], "targets": ids[:, 1:]}

    res = {"rank": r, "size": group.size(), "label": dp.label, "losses": [], "one_losses": [], "metrics": [],
           "one_metrics": [], "grad_norms": [], "one_grad_norms": []}
    for step in range(STEPS):
        accum = 1 if step < 3 else 2  # the last steps accumulate two micro-batches
        for _ in range(accum):
            b = batch()
            res["metrics"].append(dp.micro_step(b, accum))
            res["one_metrics"].append(one.micro_step(b, accum))
        if step == 0:
            got, want = dict(tree_flatten(dp.gradients())), dict(tree_flatten(one.gradients()))
            res["grad_names_match"] = sorted(got) == sorted(want)
            errs = {k: float(mx.abs(got[k] - want[k]).max()) for k in want}
            res["grad_err"] = max(errs.values())
            res["grad_err_at"] = max(errs, key=errs.get)
            res["n_grads"] = len(errs)
        res["losses"].append(res["metrics"][-1]["loss"])
        res["one_losses"].append(res["one_metrics"][-1]["loss"])
        res["grad_norms"].append(dp.optimizer_step(1e-2)["grad_norm"])
        res["one_grad_norms"].append(one.optimizer_step(1e-2)["grad_norm"])
    biases = [(m.gate.e_score_correction_bias, o.gate.e_score_correction_bias)
              for m, o in zip(dp.model.moe_layers(), one.model.moe_layers(), strict=True)]
    res["n_moe"] = len(biases)  # the model's MoE layer and its MTP layer's
    res["bias_err"] = max(float(mx.abs(a - b).max()) for a, b in biases)
    res["bias_moved"] = max(float(mx.abs(b).max()) for _, b in biases)
    params, ref = dict(tree_flatten(dp.model.parameters())), dict(tree_flatten(one.model.parameters()))
    res["param_err"] = max(float(mx.abs(params[k] - ref[k]).max()) for k in ref)
    np.savez(Path(out) / f"rank{r}.npz", **{k: np.array(v) for k, v in params.items()})

    b = batch()  # targets of unequal counts on the two halves: the loss is weighted by them
    b["targets"] = b["targets"].clone()
    b["targets"][0, : T // 2] = -100
    dp.model.eval()
    one.model.eval()
    res["eval"], res["one_eval"] = dp.eval_loss(b), one.eval_loss(b)
    try:
        dp.micro_step(batch(3), 1)
    except ValueError as e:
        res["odd_batch"] = str(e)
    res["agree"] = distributed.MLXCheckpoints(None, group).agree(5 * r)
    (Path(out) / f"rank{r}.json").write_text(json.dumps(res))


@pytest.fixture(scope="module")
def launched(data_dir, tmp_path_factory) -> dict:
    """`_worker` on 2 local processes joined by the ring backend: ``{"ranks": each process's `_check_trainer`
    results, "rcs": the CLI's exit codes, "out": what they printed, "dir": the output directory}``."""
    from runtime_mlx.distributed import launch

    out = tmp_path_factory.mktemp("dp")
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
            f"from tests.mlx.test_distributed import _worker; _worker({str(out)!r}, {str(data_dir)!r})")
    assert launch([sys.executable, "-c", code], 2) == 0
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    for r in ranks:
        r["params"] = dict(np.load(out / f"rank{r['rank']}.npz"))
    return {"ranks": ranks, "rcs": [int((out / f"rank{r}.rc").read_text()) for r in range(2)],
            "out": "".join((out / f"rank{r}.out").read_text() for r in range(2)), "dir": out}


@pytest.fixture
def two_ranks(launched) -> list[dict]:
    """Each launched process's `_check_trainer` results, with ``params``: its weights after the steps."""
    return launched["ranks"]


def test_one_step_gradients_match_one_process(two_ranks):
    for r in two_ranks:
        assert r["size"] == 2 and "data parallel over 2 processes" in r["label"]
        assert r["grad_names_match"] and r["n_grads"] > 20
        assert r["grad_err"] < TOL, (r["grad_err"], r["grad_err_at"])
        for k in ("loss", "lm_loss", "mtp_loss", "aux_loss"):
            assert abs(r["metrics"][0][k] - r["one_metrics"][0][k]) < TOL, k
        assert abs(r["grad_norms"][0] - r["one_grad_norms"][0]) < TOL


def test_steps_match_one_process(two_ranks):
    for r in two_ranks:
        assert len(r["losses"]) == STEPS
        assert max(abs(a - b) for a, b in zip(r["losses"], r["one_losses"], strict=True)) < 1e-4
        assert max(abs(a - b) for a, b in zip(r["grad_norms"], r["one_grad_norms"], strict=True)) < 1e-4
        assert r["n_moe"] == 2 and r["bias_moved"] > 0 and r["bias_err"] == 0.0
        assert r["param_err"] < 1e-4
        assert abs(r["eval"] - r["one_eval"]) < TOL


def test_every_process_keeps_the_same_weights(two_ranks):
    a, b = two_ranks[0]["params"], two_ranks[1]["params"]
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert two_ranks[0]["losses"] == two_ranks[1]["losses"]


def test_batch_must_split_and_agree_is_the_max(two_ranks):
    for r in two_ranks:
        assert r["odd_batch"] == ("a batch of 3 rows does not split over 2 processes (expected a batch size that is a "
                                  "multiple of 2)")
        assert r["agree"] == 5


def test_launch_returns_the_failed_exit_code(capfd):
    """A process that fails stops the run: the other (blocked) is terminated, the failure's code is returned."""
    from runtime_mlx.distributed import launch

    code = ("import sys, time, mlx.core as mx\n"
            "g = mx.distributed.init()\n"
            "assert g.size() == 2\n"
            "sys.exit(3) if g.rank() == 1 else time.sleep(120)")
    assert launch([sys.executable, "-c", code], 2, hint=lambda: "no checkpoint") == 3
    assert "dsfs: error: rank 1 exited with code 3; no checkpoint" in capfd.readouterr().err


def test_cli_nproc_2_matches_one_process(launched, data_dir, tmp_path):
    """``dsfs train --backend mlx --nproc 2`` in each of the 2 launched processes (the micro model as the tiny
    preset): rank 0 writes the run (metrics, checkpoints, final/) and prints the summary once; its losses are a
    one-process run's."""
    from dsfs.train import train
    from tests.test_train import MICRO_MODEL, read_metrics

    assert launched["rcs"] == [0, 0], launched["out"]
    assert launched["out"].count("steps 3,") == 1 and "backend mlx" in launched["out"]
    one = train("tiny", data_dir, tmp_path / "one", backend="mlx", model_overrides=MICRO_MODEL, verbose=False,
                compile=False, **RUN)
    dp = launched["dir"] / "run"
    ours, ours_val = read_metrics(dp)
    theirs, theirs_val = read_metrics(tmp_path / "one")
    assert [r["step"] for r in ours] == [1, 2, 3]
    for a, b in zip(ours, theirs, strict=True):
        assert math.isclose(a["loss"], b["loss"], abs_tol=1e-4), (a, b)
        assert math.isclose(a["grad_norm"], b["grad_norm"], abs_tol=1e-4), (a, b)
    assert [r["step"] for r in ours_val] == [0, 2, 3]
    assert math.isclose(ours_val[-1]["val_loss"], theirs_val[-1]["val_loss"], abs_tol=1e-4)
    assert one["steps"] == 3
    assert sorted(os.listdir(dp / "checkpoints")) == ["step_000002", "step_000003"]
    assert (dp / "final" / "model.safetensors").is_file()
