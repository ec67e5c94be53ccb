"""Compiled CPU training (the `dsfs train` default) is deterministic: two runs with the same seed write the same
metrics and weights bit for bit, and a run stopped and resumed writes the losses of an uninterrupted one.

Without `dsfs.trainer.deterministic_algorithms`, inductor's compiled embedding backward accumulates gradient rows
with atomic adds from the OpenMP threads, in whatever order they arrive: at batch 8 x 64 every backward of the micro
model differs from the last in the low bits of ``embed_tokens``'s gradient (at 4 x 32, about one in five), and the
runs drift apart from the first steps. Only with more than one thread: the session's one thread (conftest) would
hide it, so this module trains on two (`dsfs train`'s default is every core). The micro model of `tests.test_train`
compiles in well under a minute here; the graph is compiled once per process and shared by the runs below.
"""

from __future__ import annotations

import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from dsfs import checkpointing
from dsfs.train import train
from dsfs.trainer import TorchTrainer, deterministic_algorithms
from reference import Model, ModelConfig
from tests.test_train import MICRO_MODEL, micro_train, read_metrics

# big enough that an atomic-add backward differs every step (see the module docstring), still a second a run
KW = dict(batch_size=8, seq_len=64, max_steps=8, eval_every=4, warmup_steps=2, compile=True)
KEYS = ("step", "loss", "lm_loss", "mtp_loss", "aux_loss", "lr", "grad_norm", "tokens")  # not the timings


@pytest.fixture(scope="module", autouse=True)
def _two_threads():
    """Two intra-op threads while this module runs (inductor bakes the count into the kernels it compiles)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def compiled_run(data_dir, tmp_path_factory):
    """An uninterrupted compiled 8-step micro run (checkpoints at steps 4 and 8)."""
    out = tmp_path_factory.mktemp("det") / "a"
    micro_train(data_dir, out, **KW)
    return out


def _same_run(a, b) -> None:
    (ta, ea), (tb, eb) = read_metrics(a), read_metrics(b)
    assert [[r[k] for k in KEYS] for r in ta] == [[r[k] for k in KEYS] for r in tb]
    assert ea == eb
    wa, wb = (load_file(r / "final/model.safetensors") for r in (a, b))
    assert wa.keys() == wb.keys() and [k for k in wa if not torch.equal(wa[k], wb[k])] == []


def test_deterministic_algorithms_sets_and_restores():
    det = torch.utils.deterministic
    before = (torch.are_deterministic_algorithms_enabled(), det.fill_uninitialized_memory)
    with deterministic_algorithms():
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        assert not det.fill_uninitialized_memory
    with deterministic_algorithms(False):
        assert torch.are_deterministic_algorithms_enabled() == before[0]
    assert (torch.are_deterministic_algorithms_enabled(), det.fill_uninitialized_memory) == before
    cpu, meta = torch.device("cpu"), torch.device("meta")
    model = Model(ModelConfig(**{**MICRO_MODEL, "vocab_size": 64}))
    assert TorchTrainer(model, cpu, 1e-3, 0.1, 1.0, 0.3, compile=True).deterministic  # the CPU default
    assert not TorchTrainer(model, cpu, 1e-3, 0.1, 1.0, 0.3, compile=False).deterministic  # eager: already is
    assert not TorchTrainer(model.to(meta), meta, 1e-3, 0.1, 1.0, 0.3, compile=True).deterministic


def test_compiled_backward_repeats_bit_for_bit():
    """The same batch through the compiled trainer's ``micro_step``, weights unchanged: the same gradients every
    time (without the fix, ``embed_tokens``'s differ on most calls)."""
    torch.manual_seed(0)
    model = Model(ModelConfig(**{**MICRO_MODEL, "vocab_size": 384}))
    trainer = TorchTrainer(model, torch.device("cpu"), 1e-3, 0.1, 1.0, 0.3, compile=True)
    ids = torch.randint(0, 384, (8, 65), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids[:, :-1].contiguous(), "targets": ids[:, 1:].contiguous()}
    first = None
    for _ in range(12):
        trainer.micro_step(batch, 1)
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        first = first or grads
        assert [n for n in grads if not torch.equal(grads[n], first[n])] == []


def test_two_compiled_runs_are_identical(data_dir, compiled_run, tmp_path):
    micro_train(data_dir, tmp_path / "b", **KW)
    _same_run(compiled_run, tmp_path / "b")


def test_compiled_run_resumes_exactly(data_dir, compiled_run, tmp_path):
    def ctrl_c_at_3(rec):
        if rec["step"] == 3:
            os.kill(os.getpid(), signal.SIGINT)  # finish the step, checkpoint, stop

    with pytest.raises(KeyboardInterrupt):
        micro_train(data_dir, tmp_path / "b", on_step=ctrl_c_at_3, **KW)
    assert [p.name for p in checkpointing.list_checkpoints(tmp_path / "b/checkpoints")] == ["step_000003"]
    s = train(data_dir=data_dir, out_dir=tmp_path / "b", resume=True, backend="reference", verbose=False,
              compile=True)
    assert s["steps"] == 8
    _same_run(compiled_run, tmp_path / "b")
