"""`runtime_mlx.posttrain`: the MLX DPO and distillation trainers against the torch ones (`dsfs.dpo.DPOTrainer`,
`dsfs.distill.DistillTrainer` with the reference ops) on the same weights: the first micro-step's loss and metrics
within float32 tolerance, the weights after one AdamW step within 1e-4, DPO's ln 2 at initialization exactly, the
tied head, on-policy batches; then ``dsfs dpo`` and ``dsfs distill`` with ``backend="mlx"`` end to end on a micro
checkpoint: an interrupted run resumes onto the uninterrupted run's losses exactly (MLX on the CPU is deterministic
run to run), and precomputed reference log-probs give the same run."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
from mlx.utils import tree_flatten

from dsfs.distill import DISTILL_CONFIG, DistillTrainer, distill
from dsfs.dpo import DPO_CONFIG, DPOTrainer, collate_pairs, dpo
from dsfs.evaluation import evaluate, torch_eval_loss
from reference import Model as ReferenceModel
from reference import ModelConfig
from reference.testing import assert_close
from runtime_mlx.posttrain import MLXDistillTrainer, MLXDPOTrainer, head_weight
from runtime_mlx.train import from_reference
from tests.mlx.utils import to_torch
from tests.reference_utils import randomize_
from tests.test_stage import ctrl_c_at, records
from tests.test_train import MICRO_MODEL, assert_is_trainer, make_data_dir, micro_train

CPU = torch.device("cpu")
LN2 = torch.tensor(math.log(2), dtype=torch.float32).item()


def micro_models(seed: int = 0, **overrides) -> tuple[ReferenceModel, ReferenceModel]:
    """Two reference micro models (vocab 300) with O(1) random weights: the second is the first perturbed."""
    torch.manual_seed(seed)
    a = randomize_(ReferenceModel(ModelConfig(vocab_size=300, **{**MICRO_MODEL, **overrides})), router_bias=0.05)
    b = copy.deepcopy(a)
    with torch.no_grad():
        for p in b.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return a, b


def pair_batch(n: int = 3, seed: int = 1) -> dict[str, torch.Tensor]:
    """`collate_pairs` of ``n`` random pairs of uneven lengths (padding and prompt targets -100)."""
    g = torch.Generator().manual_seed(seed)

    def ids(lo, hi):
        return torch.randint(5, 300, (int(torch.randint(lo, hi, (), generator=g)),), generator=g).tolist()

    return collate_pairs([(ids(3, 9), ids(2, 12), ids(2, 12)) for _ in range(n)], pad_id=2)


def assert_same_weights(mlx_model, torch_model, bound: float) -> None:
    sd = torch_model.state_dict()
    for name, v in tree_flatten(mlx_model.parameters()):
        assert_close(to_torch(v), sd[name], bound=bound, what=name)


def close(a: float, b: float, abs_tol: float = 0.0) -> bool:
    return math.isclose(a, b, rel_tol=1e-5, abs_tol=abs_tol)


# ---------------------------------------------------------------- DPO against the torch trainer


@pytest.mark.parametrize("loss_type, smoothing, tied", [("sigmoid", 0.0, False), ("sigmoid", 0.1, True),
                                                         ("ipo", 0.0, False), ("hinge", 0.0, False)])
def test_dpo_step_matches_torch_trainer(loss_type, smoothing, tied):
    """One micro-step: loss and TRL's metrics equal the torch DPOTrainer's (reference ops) within float32
    tolerance; after one AdamW step (clipping, MoE bias update) every weight agrees within 1e-4, the MTP module
    untouched as in torch (no gradient reaches it)."""
    policy, ref = micro_models(tie_word_embeddings=tied)
    tc = dataclasses.replace(DPO_CONFIG, lr=1e-3, weight_decay=0.1, grad_clip=1.0, optimizer="adamw")
    theirs = DPOTrainer(copy.deepcopy(policy), copy.deepcopy(ref), CPU, tc, 0.1, loss_type, smoothing)
    ours = MLXDPOTrainer(from_reference(policy), from_reference(ref), tc.lr, tc.weight_decay, tc.grad_clip,
                         tc.optimizer, 0.1, loss_type, smoothing)
    if tied:
        assert "lm_head" not in ours.model and head_weight(ours.model) is ours.model.model.embed_tokens.weight
    batch = pair_batch()
    a, b = theirs.micro_step(batch, 1), ours.micro_step(batch, 1)
    assert a.keys() == b.keys()
    scale = abs(a["logps/chosen"]) + abs(a["logps/rejected"])  # rewards are differences of such log-probs
    for k in a:
        assert close(b[k], a[k], abs_tol=1e-6 * scale * (0.1 if "rewards" in k else 1)), (k, a[k], b[k])
    ga, gb = theirs.optimizer_step(1e-3), ours.optimizer_step(1e-3)
    assert math.isclose(gb["grad_norm"], ga["grad_norm"], rel_tol=1e-5)
    assert_same_weights(ours.model, theirs.model, 1e-4)
    assert_same_weights(ours.model.mtp[0], policy.mtp[0], 0.0)
    # the second step from there, on another batch: still the torch trainer's
    batch = pair_batch(seed=2)
    a, b = theirs.micro_step(batch, 1), ours.micro_step(batch, 1)
    assert close(b["loss"], a["loss"]), (a, b)


def test_dpo_starts_at_ln2_exactly_and_evaluates_like_torch():
    """Policy and reference from one checkpoint with dropout configured (disabled in both): the first loss is ln 2 in
    float32 exactly, the rewards 0; ``ref_logps``, ``eval_loss`` and ``eval_metrics`` agree with the torch
    trainer's; precomputed reference log-probs in the batch replace the reference model."""
    policy, _ = micro_models(hidden_dropout=0.1)
    ours = MLXDPOTrainer(from_reference(policy), from_reference(policy), 1e-3, 0.0, 1.0, "adamw", 0.1, "sigmoid",
                         0.0)
    assert_is_trainer(ours)
    batch = pair_batch()
    m = ours.micro_step(batch, 1)
    assert m["loss"] == LN2
    assert m["rewards/chosen"] == m["rewards/rejected"] == m["rewards/margins"] == m["rewards/accuracies"] == 0.0
    ours.optimizer_step(1e-3)

    theirs = DPOTrainer(copy.deepcopy(policy), copy.deepcopy(policy), CPU, DPO_CONFIG, 0.1, "sigmoid", 0.0)
    ours0 = MLXDPOTrainer(from_reference(policy), None, 1e-3, 0.0, 1.0, "adamw", 0.1, "sigmoid", 0.0)
    ref_c, ref_r = (torch.tensor(t.tolist()) for t in ours.ref_logps(batch))
    assert_close(torch.cat([ref_c, ref_r]), torch.cat(theirs.ref_logps(batch)), what="reference log-probs")
    with_ref = {**batch, "ref_chosen_logps": ref_c, "ref_rejected_logps": ref_r}
    assert ours0.micro_step(with_ref, 1)["loss"] == LN2  # no reference model: the batch's log-probs
    with pytest.raises(ValueError, match="no reference model"):
        ours0.micro_step(batch, 1)

    evals = [pair_batch(seed=5), pair_batch(2, seed=6)]
    mine = MLXDPOTrainer(from_reference(policy), from_reference(_perturbed(policy)), 1e-3, 0.0, 1.0, "adamw", 0.1,
                         "sigmoid", 0.0)
    torch_ = DPOTrainer(copy.deepcopy(policy), _perturbed(policy), CPU, DPO_CONFIG, 0.1, "sigmoid", 0.0)
    assert close(evaluate(mine.model, evals, mine.eval_loss), evaluate(torch_.model, evals, torch_.eval_loss))
    a, b = torch_.eval_metrics(evals), mine.eval_metrics(evals)
    assert a.keys() == b.keys() and "val_rewards/margins" in b and mine.model.training
    for k in a:
        assert close(b[k], a[k], abs_tol=1e-5), (k, a[k], b[k])


def _perturbed(model: ReferenceModel) -> ReferenceModel:
    out = copy.deepcopy(model)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return out


# ---------------------------------------------------------------- distillation against the torch trainer


def lm_batch(seed: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randint(0, 300, (3, 17), generator=g), torch.randint(0, 300, (3, 17), generator=g)
    y[0, :5] = -100
    return {"input_ids": x, "targets": y}


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_distill_step_matches_torch_trainer(optimizer):
    """Two accumulated micro-steps: loss, soft and hard loss equal the torch DistillTrainer's within float32
    tolerance, the weights after the optimizer step within 1e-4; ``eval_loss`` is the student's cross-entropy over
    the non-ignored targets (`dsfs.evaluation.torch_eval_loss`)."""
    student, teacher = micro_models(seed=4)
    tc = dataclasses.replace(DISTILL_CONFIG, lr=1e-3, weight_decay=0.1, grad_clip=1.0, optimizer=optimizer)
    args = (0.5, 2.0, 0.3, 0.0, 8, 0)  # beta, temperature, weight_hard_loss, lmbda, max_new_tokens, eos_id
    theirs = DistillTrainer(copy.deepcopy(student), copy.deepcopy(teacher), CPU, tc, *args)
    ours = MLXDistillTrainer(from_reference(student), from_reference(teacher), tc.lr, tc.weight_decay, tc.grad_clip,
                             optimizer, *args)
    assert_is_trainer(ours)
    for seed in (3, 4):
        a, b = theirs.micro_step(lm_batch(seed), 2), ours.micro_step(lm_batch(seed), 2)
        assert a.keys() == b.keys() and b["on_policy"] == 0.0
        for k in ("loss", "soft_loss", "hard_loss"):
            assert close(b[k], a[k]), (k, a[k], b[k])
    assert math.isclose(ours.optimizer_step(1e-3)["grad_norm"], theirs.optimizer_step(1e-3)["grad_norm"],
                        rel_tol=1e-5)
    assert_same_weights(ours.model, theirs.model, 1e-4)
    batch = lm_batch(7)
    assert close(evaluate(ours.model, [batch], ours.eval_loss), torch_eval_loss(theirs.model.eval(), batch))


def test_distill_on_policy_batch_is_the_students_samples():
    """With ``lmbda`` 1 every micro-batch is the student's samples of the first half of each row (the MLX key drawn
    from torch's generator: the same torch state, the same samples), the targets the sampled tokens, no hard loss;
    its loss equals the torch trainer's on that batch; a student equal to its teacher has no divergence."""
    student, teacher = micro_models(seed=5)
    args = (0.0, 1.0, 0.5, 1.0, 6, 0)
    ours = MLXDistillTrainer(from_reference(student), from_reference(teacher), 1e-3, 0.0, 1.0, "adamw", *args)
    batch = {"input_ids": torch.randint(0, 300, (2, 10)), "targets": torch.randint(0, 300, (2, 10))}
    torch.manual_seed(11)
    torch.rand(())  # the coin micro_step draws first
    sampled = ours.on_policy(batch)
    x, y = sampled["input_ids"], sampled["targets"]
    assert x.shape == y.shape == (2, 5 + 6 - 1) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, :5], batch["input_ids"][:, :5]) and (y[:, :4] == -100).all()
    assert torch.equal(y[:, 4:-1], x[:, 5:])
    assert ours.model.training
    torch.manual_seed(11)
    m = ours.micro_step(batch, 1)
    assert m["on_policy"] == 1.0 and m["hard_loss"] is None
    theirs = DistillTrainer(copy.deepcopy(student), copy.deepcopy(teacher), CPU, DISTILL_CONFIG, *args)
    loss, soft, _ = theirs._loss(sampled, 0.0)
    assert close(m["loss"], loss.item()) and close(m["soft_loss"], soft.item())

    same = MLXDistillTrainer(from_reference(student), from_reference(student), 1e-3, 0.0, 1.0, "adamw", *args)
    assert same.micro_step(batch, 1)["soft_loss"] == pytest.approx(0.0, abs=1e-6)


# ---------------------------------------------------------------- end to end through dsfs


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> dict:
    """A data dir and a micro checkpoint trained on it for 2 steps, with dropout configured (off in DPO, on for a
    distillation student) and room for 128 positions."""
    root = tmp_path_factory.mktemp("posttrain")
    d = make_data_dir(root)
    torch.manual_seed(0)
    micro_train(d, root / "m", max_steps=2,
                model_overrides={**MICRO_MODEL, "max_position_embeddings": 128, "hidden_dropout": 0.1})
    return {"data": d, "model": root / "m" / "final"}


STAGE = dict(backend="mlx", verbose=False, batch_size=2, eval_every=3, eval_batches=1, warmup_steps=1, lr=1e-3)


def test_dpo_on_mlx_resumes_exactly_and_precomputes(ckpt, tmp_path):
    """``dpo(backend="mlx")``: ln 2 at the first step, an interrupted run resumed onto the uninterrupted run's
    losses exactly, and ``precompute_ref_log_probs`` the same run (within 1e-6)."""
    kw = dict(init_from=ckpt["model"], max_steps=3, num_examples=8, eval_examples=1, splits=["add_sub_1"],
              **{**STAGE, "seq_len": 128})
    s = dpo("arithmetic", tmp_path / "a", **kw)
    assert s["backend"] == "mlx" and math.isfinite(s["val_loss"]) and "val_rewards/margins" in s
    with pytest.raises(KeyboardInterrupt):
        dpo("arithmetic", tmp_path / "b", on_step=ctrl_c_at(2), **kw)
    dpo(None, tmp_path / "b", resume=True, **{**STAGE, "seq_len": 128})
    dpo("arithmetic", tmp_path / "c", precompute_ref_log_probs=True, **kw)
    (ta, ea), (tb, eb), (tc, _) = (records(tmp_path / n) for n in "abc")
    assert ta[0]["loss"] == LN2 and ta[0]["rewards/margins"] == 0.0
    assert [r["loss"] for r in ta] == [r["loss"] for r in tb] and len(ta) == 3
    assert [r["rewards/margins"] for r in ta] == [r["rewards/margins"] for r in tb]
    assert [r["val_loss"] for r in ea] == [r["val_loss"] for r in eb]
    for ra, rc in zip(ta, tc, strict=True):
        assert rc["loss"] == pytest.approx(ra["loss"], rel=1e-6, abs=1e-7)


def test_distill_on_mlx_resumes_exactly(ckpt, tmp_path):
    """``distill(backend="mlx")`` with on-policy micro-batches (``lmbda`` 0.5) and a dropout student: an interrupted
    run resumes onto the uninterrupted run's losses exactly (the coin, the samples' key and the dropout masks all
    come from torch's checkpointed generator)."""
    kw = dict(init_from=ckpt["model"], data_dir=ckpt["data"], max_steps=4, lmbda=0.5, max_new_tokens=8,
              **{**STAGE, "seq_len": 32})
    s = distill(ckpt["model"], tmp_path / "a", **kw)
    assert s["backend"] == "mlx" and math.isfinite(s["val_loss"])
    with pytest.raises(KeyboardInterrupt):
        distill(ckpt["model"], tmp_path / "b", on_step=ctrl_c_at(2), **kw)
    distill(None, tmp_path / "b", resume=True, **{**STAGE, "seq_len": 32})
    (ta, ea), (tb, eb) = records(tmp_path / "a"), records(tmp_path / "b")
    assert {r["on_policy"] for r in ta} == {0.0, 1.0}  # both kinds of batch, before and after the resume
    for k in ("loss", "soft_loss", "hard_loss", "on_policy"):
        assert [r[k] for r in ta] == [r[k] for r in tb], k
    assert [r["val_loss"] for r in ea] == [r["val_loss"] for r in eb]
