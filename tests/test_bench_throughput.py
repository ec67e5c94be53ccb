"""bench/train_throughput.py runs end to end at a toy size (eager only): every model trains on the same batches,
interleaved, and the JSON records each one's tokens/s and per-round times. Its numbers are measured in the bench,
never asserted here."""

from __future__ import annotations

import json

from bench import train_throughput


def test_interleaved_rounds_cover_every_model(tmp_path):
    out = tmp_path / "tt.json"
    train_throughput.main(["--no-compile", "--steps", "4", "--rounds", "9", "--warmup", "1", "--batch-size", "2",
                           "--seq-len", "16", "--out", str(out)])
    res = json.loads(out.read_text())
    assert len(res["tokens_per_s"]) == 3 and all(v > 0 for v in res["tokens_per_s"].values())
    assert all(len(ts) == 4 and min(ts) > 0 for ts in res["round_times_s"].values())  # 9 rounds asked, 4 steps
    assert res["args"]["shape"] == "tiny"


def test_muon_rows_split_parameters_as_dsfs_train(tmp_path, monkeypatch):
    """``--optimizer muon`` trains every model with Muon; the bench's by-name split of the reference model is the
    one `dsfs train` uses (`reference.optim.param_groups`)."""
    import torch

    from reference import Model, ModelConfig
    from reference.optim import param_groups

    monkeypatch.setattr(train_throughput, "OPTIMIZER", ["adamw"])  # main sets it; restored after the test
    out = tmp_path / "tt.json"
    train_throughput.main(["--no-compile", "--steps", "2", "--rounds", "2", "--warmup", "1", "--batch-size", "2",
                           "--seq-len", "16", "--optimizer", "muon", "--out", str(out)])
    res = json.loads(out.read_text())
    assert res["args"]["optimizer"] == "muon" and all(v > 0 for v in res["tokens_per_s"].values())
    assert train_throughput.OPTIMIZER == ["muon"]
    torch.manual_seed(0)
    model = Model(ModelConfig(**train_throughput.SHAPES["tiny"]))
    ours = train_throughput.make_optimizer(model)
    assert [set(map(id, g["params"])) for g in ours.param_groups][0] == set(
        map(id, param_groups(model, 0.1, "muon")[0]["params"]))
