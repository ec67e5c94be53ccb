"""Data parallelism (FSDP2 ZeRO-3 / ZeRO-2, HSDP, ZeRO-1) through `dsfs.parallel.trainer.ParallelTrainer` against
the single-process `dsfs.trainer.TorchTrainer` on the same global batches: one step's loss and every gradient within
1e-5, ten steps' losses within 1e-4, the MoE correction biases identical."""

from __future__ import annotations

import functools

import pytest
import torch

from dsfs.parallel.layout import Layout, ParallelDims
from dsfs.parallel.trainer import ParallelTrainer
from dsfs.train_config import TrainConfig
from dsfs.trainer import TorchTrainer
from tests.parallel.harness import spawn
from tests.parallel.oracle import TOL, full_grads, global_batch, max_error, parallel_model

STEPS = 10


def train_config(optimizer: str = "adamw", **kw) -> TrainConfig:
    """The equality runs' training config: 4 x 16-token micro-batches, lr 3e-3, clipping at 1.0 (it acts: the
    random model's gradient norm is larger)."""
    base = dict(batch_size=4, seq_len=16, lr=3e-3, min_lr_ratio=0.0, warmup_steps=0, max_steps=STEPS,
                time_budget_s=None, weight_decay=0.1, grad_clip=1.0, grad_accum=1, eval_every=STEPS,
                eval_batches=1, mtp_weight=0.3, optimizer=optimizer)
    return TrainConfig(**{**base, **kw})


def batches(cfg, n: int = STEPS) -> list[dict]:
    return [dict(zip(("input_ids", "targets"), global_batch(cfg, 4, 16, seed=s), strict=True)) for s in range(n)]


def by_name(trainer, tensors: dict, layout=None) -> dict:
    """``tensors`` (a dict by name) of every pipeline stage of this rank's pipeline (``all_gather_object`` over pp;
    the copies of a tied embedding hold the same gradient), or as they are without pipeline parallelism."""
    if layout is None or layout.dims.pp == 1:
        return tensors
    import torch.distributed as dist

    stages = [None] * layout.size("pp")
    dist.all_gather_object(stages, tensors, group=layout.group("pp"))
    return {k: v for stage in stages for k, v in stage.items()}


def run_steps(trainer, data: list[dict], layout=None) -> tuple[list[float], dict, dict]:
    """Losses of ``len(data)`` steps; the gradients of the first step (before its update) and the correction biases
    at the end, by name."""
    parts = getattr(trainer, "parts", [trainer.model])
    losses, grads = [], None
    for i, b in enumerate(data):
        losses.append(trainer.micro_step(b, 1)["loss"])
        if i == 0:
            grads = by_name(trainer, {k: v for part in parts for k, v in full_grads(part).items()}, layout)
        trainer.optimizer_step(3e-3)
    biases = {k: b.clone() for part in parts for k, b in part.named_buffers()
              if k.endswith("e_score_correction_bias")}
    return losses, grads, by_name(trainer, biases, layout)


@functools.cache
def single_process(optimizer: str):
    """The one-process run (`TorchTrainer`, eager) of `run_steps`, once per optimizer in each process."""
    model = parallel_model()
    data = batches(model.config)
    t = TorchTrainer(model, torch.device("cpu"), 3e-3, 0.1, 1.0, 0.3, compile=False, optimizer=optimizer)
    return run_steps(t, data)


def case(dims: dict, optimizer: str) -> dict:
    """One layout on this process group: the errors against the single-process run."""
    import torch.distributed as dist

    want_losses, want_grads, want_bias = single_process(optimizer)
    layout = Layout.build(ParallelDims(world_size=dist.get_world_size(), **dims), torch.device("cpu"))
    model = parallel_model()
    trainer = ParallelTrainer(model, layout, train_config(optimizer))
    losses, grads, biases = run_steps(trainer, batches(model.config), layout)
    grad_err, where = max_error(grads, want_grads)
    opt = trainer.optimizers[0]
    work = [None] * dist.get_world_size()  # Newton-Schulz (stacks of) matrices each rank orthogonalized
    dist.all_gather_object(work, getattr(opt, "ns_matrices", None))
    matrices = sum(len(g["params"]) for g in opt.param_groups if g.get("use_muon"))
    return {"loss1": abs(losses[0] - want_losses[0]), "grad": grad_err, "where": where, "ns_work": work,
            "muon_matrices": matrices,
            "loss10": max(abs(a - b) for a, b in zip(losses, want_losses, strict=True)),
            "bias": max_error(biases, want_bias)[0]}


CASES2 = {"zero3": dict(zero=3), "zero2": dict(zero=2), "zero1": dict(zero=1), "ep2": dict(ep=2), "cp2": dict(cp=2),
          "tp2": dict(tp=2), "pp2-1f1b": dict(pp=2), "pp2-zbv": dict(pp=2, pp_schedule="ZBVZeroBubble"),
          "zero3-muon": dict(zero=3), "tp2-muon": dict(tp=2)}
"""Every strategy on 2 processes (the other pipeline schedules: tests/parallel/test_pp.py)."""
CASES4 = {"hsdp": dict(dp_replicate=2, dp_shard=2), "fsdp2-tp2": dict(tp=2), "fsdp2-pp2": dict(pp=2),
          "fsdp2-ep2-tp2": dict(ep=2, tp=2)}
"""The combinations on 4 processes: HSDP, FSDP x TP, FSDP x PP, and FSDP x EP x TP (EP borrows the FSDP ranks: the
3-D layout that 4 processes allow)."""


def run_cases(cases: dict) -> dict:
    return {name: case(dims, "muon" if name.endswith("muon") else "adamw") for name, dims in cases.items()}


@pytest.fixture(scope="module")
def results():
    return {**spawn(2, run_cases, CASES2)[0], **spawn(4, run_cases, CASES4)[0]}


@pytest.mark.parametrize("name", [*CASES2, *CASES4])
def test_parallel_step_equals_one_process(results, name):
    """One step's loss and every gradient within 1e-5, ten steps' losses within 1e-4, the correction biases
    identical."""
    r = results[name]
    assert r["loss1"] < TOL and r["grad"] < TOL, r
    assert r["loss10"] < 1e-4, r
    assert r["bias"] == 0.0, r


@pytest.mark.parametrize("name", [n for n in [*CASES2, *CASES4] if n.endswith("muon") and "zero1" not in n])
def test_distributed_muon_splits_the_newton_schulz_work(results, name):
    """Each rank orthogonalizes its share of the whole matrices (and its local expert stacks), not all of them."""
    r = results[name]
    assert max(r["ns_work"]) < r["muon_matrices"] <= sum(r["ns_work"]), r
