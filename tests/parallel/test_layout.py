"""`dsfs.parallel.layout.ParallelDims`: degrees validated against the world, the model and the batch, with errors
that name the fields; and ``dsfs train``'s multi-process options."""

from __future__ import annotations

import pytest

from dsfs.cli import main
from dsfs.errors import ConfigError
from dsfs.parallel.layout import ParallelDims
from tests.parallel.oracle import parallel_config


def test_dp_shard_takes_the_rest_of_the_world():
    d = ParallelDims(world_size=8, tp=2, pp=2)
    assert (d.dp_shard, d.dp, d.dp_shard_in_ep) == (2, 2, 1)
    assert ParallelDims(world_size=8, ep=4, cp=2).dp_shard_in_ep == 2
    assert ParallelDims(world_size=4, tp=2).describe() == "dp_shard 2 x tp 2 (ZeRO-3)"


@pytest.mark.parametrize("dims, match", [
    (dict(world_size=4, tp=3), "not divisible by dp_replicate x cp x tp x pp"),
    (dict(world_size=4, dp_shard=1, tp=2), "expected the world size 4"),
    (dict(world_size=4, ep=3), "--ep 3"),
    (dict(world_size=4, cp=2, ep=1, tp=2, dp_shard=1), None),
    (dict(world_size=4, cp=2, ep=3, dp_shard=2), "--ep 3"),
    (dict(world_size=2, tp=2, zero=1), "--zero 1"),
    (dict(world_size=2, zero=4), "--zero 4"),
    (dict(world_size=2, tp=0), "--tp 0"),
    (dict(world_size=2, pp=2, pp_schedule="GPipe"), "--pp-schedule GPipe"),
    (dict(world_size=4, pp=2, cp=2), "--pp with --cp"),
])
def test_bad_layouts_name_the_fields(dims, match):
    if match is None:
        ParallelDims(**dims)
        return
    with pytest.raises(ConfigError, match=match):
        ParallelDims(**dims)


@pytest.mark.parametrize("dims, cfg, match", [
    (dict(world_size=3, tp=3), {}, "num_attention_heads = 4 is not divisible by tp 3"),
    (dict(world_size=4, ep=4), {"n_routed_experts": 6, "n_group": 1, "topk_group": 1},
     "n_routed_experts = 6 is not divisible by ep 4"),
    (dict(world_size=8, ep=8), {"n_group": 4}, None),
    (dict(world_size=3, ep=3), {"n_routed_experts": 12, "n_group": 4}, "expert groups do not map"),
    (dict(world_size=8, pp=8), {}, "fewer than the 8 stages"),
    (dict(world_size=2, cp=2), {"aux_loss_alpha": 0.01}, "needs whole sequences"),
])
def test_model_checks(dims, cfg, match):
    d = ParallelDims(**dims)
    c = parallel_config(**cfg)
    if match is None:
        d.check_model(c)
        return
    with pytest.raises(ConfigError, match=match):
        d.check_model(c)


@pytest.mark.parametrize("dims, batch, seq, match", [
    (dict(world_size=4), 6, 16, "--batch-size 6 is not divisible"),
    (dict(world_size=2, cp=2, dp_shard=1), 4, 18, "not divisible by 2 x cp = 4"),
    (dict(world_size=2, tp=2), 4, 15, "not divisible by tp 2"),
    (dict(world_size=2, pp=2, pp_microbatches=3), 4, 16, "3 pipeline microbatches"),
])
def test_batch_checks(dims, batch, seq, match):
    with pytest.raises(ConfigError, match=match):
        ParallelDims(**dims).check_batch(batch, seq)


def test_cli_rejects_a_layout_before_starting_workers(capsys):
    assert main(["train", "--nproc", "4", "--tp", "3"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dsfs: error: world size 4 is not divisible"), err


def test_degrees_without_several_processes_are_refused(data_dir, tmp_path, monkeypatch):
    from tests.test_train import micro_train

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ConfigError, match="need several processes"):
        micro_train(data_dir, tmp_path / "run", parallel={"tp": 2})
