"""reference/preference.py: its battery against float64, Liger-Kernel's LigerFusedLinearDPOLoss and TRL's
DPOTrainer loss as oracles (values and gradients, float32 within 1e-5), and the numerics every implementation must
keep (ignored and padded positions, a sequence with no completion token, -inf logits, bf16, the chunking).

Conventions checked here (see also the module docstring of reference/preference.py):
- Liger's targets are aligned with its hidden states (no shift inside); TRL shifts inside its fused head (the
  hidden state at t predicts input_ids[t + 1]), so the TRL oracle passes ours ``hidden[:, :-1]`` and
  ``labels[:, 1:]``.
- Liger 0.8.5 has no "ipo" (its module rejects it, its function raises NotImplementedError); its
  ``average_log_prob`` log-probs (the inputs of ipo) are checked instead, and ipo itself against TRL, which divides
  the summed log-ratios by the completion length.
- TRL 1.16's and Liger 0.8.5's "sigmoid" ignore ``label_smoothing``; ours is cDPO there (TRL's formula before it
  moved it out of "sigmoid"), which equals TRL's "aot" loss on one pair at a time (a batch of one sorts nothing).
"""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from reference.preference import LOSS_TYPES, preference, preference_loss, sequence_logps
from reference.testing import assert_close, get_spec
from reference.testing.pytest_plugin import cases, check_case

# ----------------------------------------------------------------------------- the battery


@pytest.mark.parametrize("case", cases("preference"))
def test_reference_passes_its_battery(case):
    """The reference in the dtype under test against itself in float64, every sample."""
    check_case(case, get_spec("preference").reference, "cpu")


def test_torch_builtin_matches_the_reference():
    """The spec's unfused peer (timed by ``dsfs bench``) computes the same thing, every loss_type."""
    spec = get_spec("preference")
    builtin = spec.builtin["torch"]()
    for sample in spec.samples(spec.rng())[:4]:  # sigmoid, hinge, ipo, sigmoid with label_smoothing
        got, want = builtin(*sample.args), spec.reference(*sample.args)
        for name, a, b in zip(("loss", "chosen", "rejected"), got, want, strict=True):
            assert_close(a, b, what=f"{sample.name}: {name}")


def test_spec_samples_cover_the_contract():
    """Unique, seeded samples: every loss_type, label_smoothing > 0, every tag, a vocabulary over 4096; the bench
    shape draws as fake tensors (no values read) and has flop and byte counts."""
    from dsfs import bench

    spec = get_spec("preference")
    samples, again = spec.samples(spec.rng()), spec.samples(spec.rng())
    assert len({s.name for s in samples}) == len(samples)
    for a, b in zip(samples, again, strict=True):
        same = [torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
                for x, y in zip(a.args, b.args, strict=True)]
        assert all(same), a.name
    assert {s.args[6] for s in samples} == set(LOSS_TYPES) and any(s.args[7] > 0 for s in samples)
    assert {"ragged", "edge", "decode", "model"} <= {t for s in samples for t in s.tags}
    assert max(s.args[1].shape[0] for s in samples) > 4096
    row = max(bench.describe(spec), key=lambda r: r["flops"])  # the realistic shape (the small one is first)
    assert row["flops"] > 1e11 and row["bytes"] > 1e7


# ----------------------------------------------------------------------------- oracles


def _pairs(pairs=3, t=11, h=16, v=97, prompt=3, seed=0, dtype=torch.float32):
    """Policy hidden (2*pairs, t, h) and head (v, h), a reference model's (perturbed) hidden and head, targets with a
    prompt ignored and the last row padded."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2 * pairs, t, h, generator=g, dtype=dtype)
    weight = (torch.randn(v, h, generator=g, dtype=dtype) * 2 / h**0.5)
    ref_hidden = hidden + 0.3 * torch.randn(hidden.shape, generator=g, dtype=dtype)
    ref_weight = weight + 0.3 / h**0.5 * torch.randn(weight.shape, generator=g, dtype=dtype)
    targets = torch.randint(0, v, (2 * pairs, t), generator=g)
    targets[:, :prompt] = -100
    targets[-1, t - 3:] = -100
    return hidden.requires_grad_(), weight.requires_grad_(), ref_hidden, ref_weight, targets


def _assert_same(ours, theirs, inputs, what, cotangents=None):
    """Values equal, and the gradients of ``sum(c * out)`` to ``inputs`` (float32 bound 1e-5)."""
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert_close(a, b, what=f"{what}: output {i}")
    cots = cotangents or [torch.ones_like(o) for o in ours]
    ga = torch.autograd.grad([o for o in ours], inputs, cots, retain_graph=True)
    gb = torch.autograd.grad([o for o in theirs], inputs, cots, retain_graph=True)
    for x, a, b in zip(("hidden", "weight"), ga, gb, strict=True):
        assert_close(a, b, what=f"{what}: d{x}")


@pytest.fixture(scope="module")
def liger_dpo():
    return pytest.importorskip("liger_kernel.chunked_loss").LigerFusedLinearDPOLoss


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge"])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_matches_liger_dpo(liger_dpo, loss_type, beta):
    """Loss, chosen/rejected log-probs and the loss's gradients equal LigerFusedLinearDPOLoss with a reference
    model (ref_input / ref_weight), whose reference log-probs are our sequence_logps of the same inputs."""
    hidden, weight, ref_hidden, ref_weight, targets = _pairs(seed=int(beta * 10))
    b = hidden.shape[0] // 2
    liger = liger_dpo(beta=beta, loss_type=loss_type, compiled=False, use_ref_model=True)
    loss, aux = liger(weight, hidden, targets, ref_input=ref_hidden, ref_weight=ref_weight)
    with torch.no_grad():
        ref = sequence_logps(ref_hidden, ref_weight, targets)
    ours = preference(hidden, weight, targets, ref[:b], ref[b:], beta=beta, loss_type=loss_type)
    assert_close(ours[1], aux[0], what="chosen_logps")
    assert_close(ours[2], aux[1], what="rejected_logps")
    _assert_same(ours[:1], (loss,), (hidden, weight), f"liger {loss_type}")  # Liger's backward: the loss only
    assert_close(beta * (ours[1] - ref[:b]), aux[-2], what="rewards/chosen")
    assert_close(beta * (ours[2] - ref[b:]), aux[-1], what="rewards/rejected")


def test_averaged_logps_match_liger_average_log_prob(liger_dpo):
    """ipo's inputs: ``sequence_logps(average=True)`` equals Liger's ``average_log_prob`` log-probs, and the sigmoid
    loss on them equals Liger's, gradients included (Liger 0.8.5 itself has no ipo)."""
    hidden, weight, ref_hidden, ref_weight, targets = _pairs(seed=3)
    b = hidden.shape[0] // 2
    liger = liger_dpo(beta=0.3, compiled=False, use_ref_model=True, average_log_prob=True)
    loss, aux = liger(weight, hidden, targets, ref_input=ref_hidden, ref_weight=ref_weight)
    with torch.no_grad():
        ref = sequence_logps(ref_hidden, ref_weight, targets, average=True)
    logps = sequence_logps(hidden, weight, targets, average=True)
    assert_close(logps[:b], aux[0], what="chosen_logps")
    assert_close(logps[b:], aux[1], what="rejected_logps")
    ours = preference_loss(logps[:b], logps[b:], ref[:b], ref[b:], beta=0.3).mean()
    _assert_same((ours,), (loss,), (hidden, weight), "liger average_log_prob")
    with pytest.raises((ValueError, NotImplementedError), match="ipo"):  # if Liger gains ipo, test it above
        liger_dpo(beta=0.3, loss_type="ipo", compiled=False)


class _FakeCausalLM(torch.nn.Module):
    """The least a model needs for TRL's ``add_fused_lm_head``: a backbone returning fixed hidden states (B, T+1, H)
    and an LM head ``weight`` (V, H)."""

    def __init__(self, hidden, weight):
        super().__init__()
        text = SimpleNamespace(model_type="fake")
        self.config = SimpleNamespace(get_text_config=lambda: text)
        self._hidden, self._head = hidden, SimpleNamespace(weight=weight, bias=None)

    def base_model(self, *args, **kwargs):
        return SimpleNamespace(last_hidden_state=self._hidden)

    def get_output_embeddings(self):
        return self._head

    def forward(self, *args, **kwargs):
        raise NotImplementedError("only the fused LM head is used")


def _trl_dpo_loss(hidden_full, weight, input_ids, completion_mask, ref_chosen, ref_rejected, loss_type, beta,
                  label_smoothing=0.0):
    """``DPOTrainer._compute_loss`` of trl 1.16, unbound, on a stand-in ``self`` (no trainer, no real model) with
    precomputed reference log-probs; the policy's log-probs come from TRL's own fused head. Returns (loss, metrics)."""
    from trl import DPOTrainer
    from trl.trainer.utils import add_fused_lm_head

    model = _FakeCausalLM(hidden_full, weight)
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    identity = lambda x: x  # noqa: E731
    me = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=SimpleNamespace(device=hidden_full.device,
                                                                          gather_for_metrics=identity, gather=identity),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
        loss_types=[loss_type], loss_weights=[1.0], beta=beta, label_smoothing=label_smoothing, use_weighting=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
        args=SimpleNamespace(discopop_tau=0.05))
    inputs = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), completion_mask=completion_mask,
                  ref_chosen_logps=ref_chosen, ref_rejected_logps=ref_rejected)
    return DPOTrainer._compute_loss(me, model, inputs, False), me._metrics["train"]


def _trl_batch(pairs=3, t=12, h=16, v=83, seed=0):
    """input_ids (2*pairs, t) with prompts of 2-4 tokens (completion_mask 0 there) and the last row padded; the
    hidden states (2*pairs, t, h) of every position, the policy's and a reference model's heads."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, v, (2 * pairs, t), generator=g)
    completion_mask = torch.ones_like(input_ids)
    for r in range(2 * pairs):
        completion_mask[r, :2 + r % 3] = 0
    completion_mask[-1, t - 4:] = 0  # padding
    hidden = torch.randn(2 * pairs, t, h, generator=g, requires_grad=True)
    weight = (torch.randn(v, h, generator=g) * 2 / h**0.5).requires_grad_()
    ref_weight = weight.detach() + 0.3 / h**0.5 * torch.randn(v, h, generator=g)
    targets = input_ids[:, 1:].masked_fill(completion_mask[:, 1:] == 0, -100)  # ours: aligned, shifted by the caller
    return hidden, weight, ref_weight, input_ids, completion_mask, targets


@pytest.fixture(scope="module")
def trl():
    return pytest.importorskip("trl")


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_matches_trl_dpo_trainer(trl, loss_type):
    """Loss and gradients equal DPOTrainer's on the same model: TRL computes the log-probs itself (shifting inside)
    and, for ipo, divides the summed log-ratios by the completion length; ours gets averaged log-probs."""
    beta = 0.5 if loss_type == "ipo" else 0.1
    hidden, weight, ref_weight, input_ids, completion_mask, targets = _trl_batch(seed=LOSS_TYPES.index(loss_type))
    b = hidden.shape[0] // 2
    with torch.no_grad():
        ref_sum = sequence_logps(hidden[:, :-1], ref_weight, targets)  # TRL precomputes summed log-probs
        ref = sequence_logps(hidden[:, :-1], ref_weight, targets, average=loss_type == "ipo")
    theirs, metrics = _trl_dpo_loss(hidden, weight, input_ids, completion_mask, ref_sum[:b], ref_sum[b:], loss_type,
                                    beta)
    ours = preference(hidden[:, :-1], weight, targets, ref[:b], ref[b:], beta=beta, loss_type=loss_type)
    _assert_same(ours[:1], (theirs,), (hidden, weight), f"trl {loss_type}")
    if loss_type != "ipo":
        assert metrics["logps/chosen"][0] == pytest.approx(ours[1].mean().item(), rel=1e-5)
        assert metrics["rewards/margins"][0] == pytest.approx(
            (beta * ((ours[1] - ref[:b]) - (ours[2] - ref[b:]))).mean().item(), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("label_smoothing", [0.1, 0.5])
def test_label_smoothing_is_cdpo_as_trl_aot_on_one_pair(trl, label_smoothing):
    """sigmoid with label_smoothing: ``-(1 - ls) logsigmoid(beta x) - ls logsigmoid(-beta x)``, TRL's "aot" loss
    of each pair alone (TRL 1.16's own "sigmoid" ignores label_smoothing), gradients included."""
    hidden, weight, ref_weight, input_ids, completion_mask, targets = _trl_batch(seed=7)
    b = hidden.shape[0] // 2
    with torch.no_grad():
        ref = sequence_logps(hidden[:, :-1], ref_weight, targets)
    ours = preference(hidden[:, :-1], weight, targets, ref[:b], ref[b:], beta=0.2, label_smoothing=label_smoothing)
    per_pair = []
    for i in range(b):
        rows = [i, b + i]
        loss, _ = _trl_dpo_loss(hidden[rows], weight, input_ids[rows], completion_mask[rows], ref[i:i + 1],
                                ref[b + i:b + i + 1], "aot", 0.2, label_smoothing)
        per_pair.append(loss)
    _assert_same(ours[:1], (torch.stack(per_pair).mean(),), (hidden, weight), f"cDPO {label_smoothing}")
    plain, _ = _trl_dpo_loss(hidden, weight, input_ids, completion_mask, ref[:b], ref[b:], "sigmoid", 0.2,
                             label_smoothing)
    unsmoothed = preference(hidden[:, :-1], weight, targets, ref[:b], ref[b:], beta=0.2)[0]
    assert_close(plain, unsmoothed, what="TRL's sigmoid ignores label_smoothing")


# ----------------------------------------------------------------------------- semantics and numerics


def test_sequence_logps_is_the_sum_of_the_targets_log_softmax():
    hidden, weight, _, _, targets = _pairs(pairs=2, t=9, v=40)
    hidden, weight = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    targets[1] = -100  # a row with no completion token
    mask = targets != -100
    per_token = (hidden @ weight.T).log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0] * mask
    for average in (False, True):
        want = per_token.sum(-1) / (mask.sum(-1).clamp(min=1) if average else 1)
        got = sequence_logps(hidden, weight, targets, average=average, chunk_size=5)
        assert got.dtype == torch.float64 and got[1] == 0
        _assert_same((got,), (want,), (hidden, weight), f"average={average}", [torch.randn(4, dtype=torch.float64)])


def test_dpo_at_init_is_ln2():
    """Policy equal to the reference model: every logit is 0, the sigmoid loss is exactly ln 2 and its gradient
    (-beta/2 on every margin) is finite."""
    hidden, weight, _, _, targets = _pairs(pairs=4, seed=5)
    with torch.no_grad():
        ref = sequence_logps(hidden, weight, targets)
    loss, chosen, rejected = preference(hidden, weight, targets, ref[:4], ref[4:])
    assert loss.dtype == torch.float32
    assert loss.item() == torch.tensor(math.log(2), dtype=torch.float32).item()
    assert torch.equal(chosen.detach(), ref[:4]) and torch.equal(rejected.detach(), ref[4:])
    for g in torch.autograd.grad(loss, (hidden, weight)):
        assert torch.isfinite(g).all() and g.abs().sum() > 0


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_chunking_does_not_change_the_result(loss_type):
    """chunk_size 1, 7 and the default (all tokens in one chunk here) agree to float32 rounding, gradients too: no
    chunk sees another's rows."""
    hidden, weight, _, ref_weight, targets = _pairs(pairs=3, t=13, v=301, seed=11)
    with torch.no_grad():
        ref = sequence_logps(hidden, ref_weight, targets, average=loss_type == "ipo")
    outs = [preference(hidden, weight, targets, ref[:3], ref[3:], 0.2, loss_type, chunk_size=c)
            for c in (None, 1, 7)]
    for c, out in zip((1, 7), outs[1:], strict=True):
        _assert_same(out, outs[0], (hidden, weight), f"chunk_size {c}", [torch.tensor(1.0), torch.ones(3),
                                                                         torch.full((3,), -0.5)])


def test_ignored_positions_are_ignored():
    """Whatever the hidden states hold at ignored (prompt, padding) positions -- here logits in the thousands -- the
    outputs are the same and those positions get a zero gradient."""
    hidden, weight, _, ref_weight, targets = _pairs(pairs=2, seed=2)
    ref = sequence_logps(hidden, ref_weight, targets).detach()
    out = preference(hidden, weight, targets, ref[:2], ref[2:], label_smoothing=0.1)
    garbage = hidden.detach().clone()
    garbage[targets == -100] *= 1e3
    garbage.requires_grad_()
    out2 = preference(garbage, weight, targets, ref[:2], ref[2:], label_smoothing=0.1)
    for a, b in zip(out, out2, strict=True):
        assert_close(a, b)
    dh, dw = torch.autograd.grad(out2[0] + out2[1].sum() - out2[2].sum(), (garbage, weight))
    assert torch.isfinite(dh).all() and torch.isfinite(dw).all()
    assert (dh[targets == -100] == 0).all() and (dh[targets != -100] != 0).any()


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_a_sequence_without_completion_tokens_and_all_ignored(loss_type):
    """A row with no completion token has log-prob 0 (summed or averaged, never NaN) and no gradient; with every
    target ignored the loss is preference_loss of the reference log-probs alone and every gradient is 0."""
    hidden, weight, _, ref_weight, targets = _pairs(pairs=2, seed=4)
    targets[3] = -100
    ref = sequence_logps(hidden, ref_weight, targets, average=loss_type == "ipo").detach()
    loss, chosen, rejected = preference(hidden, weight, targets, ref[:2], ref[2:], 0.3, loss_type)
    assert rejected[1].item() == 0 and torch.isfinite(loss)
    dh, dw = torch.autograd.grad(loss + chosen.sum() + rejected.sum(), (hidden, weight))
    assert torch.isfinite(dh).all() and torch.isfinite(dw).all() and (dh[3] == 0).all()
    none = torch.full_like(targets, -100)
    loss, chosen, rejected = preference(hidden, weight, none, ref[:2], ref[2:], 0.3, loss_type)
    assert (chosen == 0).all() and (rejected == 0).all()
    assert_close(loss, preference_loss(chosen, rejected, ref[:2], ref[2:], 0.3, loss_type).mean())
    for g in torch.autograd.grad(loss + chosen.sum(), (hidden, weight)):
        assert (g == 0).all()


def _with_minus_inf(hidden, weight, rows=(3, 17)):
    """The vocabulary entries ``rows`` get a float32 logit of -inf: hidden's first 4 features set to 1, those
    weight rows -1e38 there and 0 elsewhere (-4e38 overflows). Returns the new leaves."""
    h, w = hidden.detach().clone(), weight.detach().clone()
    h[..., :4] = 1.0
    w[list(rows)] = 0.0
    w[list(rows), :4] = -1e38
    return h.requires_grad_(), w.requires_grad_()


def test_minus_inf_logits_stay_finite_and_change_nothing():
    """Vocabulary entries whose logit is -inf have probability 0: the outputs and gradients equal those of the
    same model without those entries, their weight rows get a zero gradient, and nothing is NaN."""
    hidden, weight, _, ref_weight, targets = _pairs(pairs=2, v=40, seed=9)
    rows = (3, 17)
    targets[torch.isin(targets, torch.tensor(rows))] = 5
    h, w = _with_minus_inf(hidden, weight, rows)
    assert torch.isinf(h[0, :1] @ w.T).any()
    keep = [i for i in range(w.shape[0]) if i not in rows]
    remap = torch.full((w.shape[0],), -100).index_put_((torch.tensor(keep),), torch.arange(len(keep)))
    targets_kept = torch.where(targets == -100, -100, remap[targets.clamp(min=0)])
    h2, w2 = h.detach().clone().requires_grad_(), w.detach()[keep].clone().requires_grad_()
    ref = sequence_logps(h2, ref_weight[keep], targets_kept).detach()
    for loss_type in LOSS_TYPES:
        out = preference(h, w, targets, ref[:2], ref[2:], 0.1, loss_type, 0.1 * (loss_type == "sigmoid"))
        want = preference(h2, w2, targets_kept, ref[:2], ref[2:], 0.1, loss_type, 0.1 * (loss_type == "sigmoid"))
        for a, b in zip(out, want, strict=True):
            assert_close(a, b, what=loss_type)
        dh, dw = torch.autograd.grad(sum(o.sum() for o in out), (h, w))
        dh2, dw2 = torch.autograd.grad(sum(o.sum() for o in want), (h2, w2))
        assert torch.isfinite(dh).all() and torch.isfinite(dw).all()
        assert (dw[list(rows)] == 0).all()
        assert_close(dh, dh2, what=f"{loss_type}: dhidden")
        assert_close(dw[keep], dw2, what=f"{loss_type}: dweight")


def test_bf16_inputs():
    """bf16 hidden and head: float32 outputs, bf16 gradients, finite, and equal to the float32 computation on the
    same (bf16-rounded) values within the bf16 bound."""
    hidden, weight, _, ref_weight, targets = _pairs(pairs=2, seed=6)
    ref = sequence_logps(hidden, ref_weight, targets).detach()
    hb, wb = hidden.detach().bfloat16().requires_grad_(), weight.detach().bfloat16().requires_grad_()
    hf, wf = hb.detach().float().requires_grad_(), wb.detach().float().requires_grad_()
    out = preference(hb, wb, targets, ref[:2], ref[2:], label_smoothing=0.2)
    want = preference(hf, wf, targets, ref[:2], ref[2:], label_smoothing=0.2)
    assert all(o.dtype == torch.float32 for o in out)
    for a, b in zip(out, want, strict=True):
        assert_close(a, b, torch.bfloat16)
    grads = torch.autograd.grad(out[0], (hb, wb))
    assert [g.dtype for g in grads] == [torch.bfloat16, torch.bfloat16]
    for g, g32 in zip(grads, torch.autograd.grad(want[0], (hf, wf)), strict=True):
        assert torch.isfinite(g).all()
        assert_close(g, g32, torch.bfloat16)


def test_autocast_no_grad_and_frozen_head():
    hidden, weight, _, ref_weight, targets = _pairs(pairs=2, seed=8)
    ref = sequence_logps(hidden, ref_weight, targets).detach()
    want = preference(hidden, weight, targets, ref[:2], ref[2:])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = preference(hidden, weight, targets, ref[:2], ref[2:])
    assert got[0].dtype == torch.float32
    assert_close(got[0], want[0], what="under autocast")
    with torch.no_grad():
        assert not preference(hidden, weight, targets, ref[:2], ref[2:])[0].requires_grad
    frozen = weight.detach()
    dh, = torch.autograd.grad(preference(hidden, frozen, targets, ref[:2], ref[2:])[0], hidden)
    assert_close(dh, torch.autograd.grad(want[0], hidden)[0], what="dhidden, head frozen")


def test_bad_input_raises_value_error():
    hidden, weight, _, _, targets = _pairs(pairs=2)
    ref = torch.zeros(2)
    with pytest.raises(ValueError, match="loss_type must be one of"):
        preference(hidden, weight, targets, ref, ref, loss_type="dpo")
    for beta in (0.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="beta must be a positive"):
            preference(hidden, weight, targets, ref, ref, beta=beta)
    for ls in (-0.1, 0.6):
        with pytest.raises(ValueError, match=r"label_smoothing must lie in \[0, 0.5\]"):
            preference(hidden, weight, targets, ref, ref, label_smoothing=ls)
    with pytest.raises(ValueError, match="2B rows"):
        preference(hidden[:3], weight, targets[:3], ref, ref)
    with pytest.raises(ValueError, match="2B rows"):
        preference(hidden[:0], weight, targets[:0], ref[:0], ref[:0])
    with pytest.raises(ValueError, match=r"ref_chosen_logps must be a float tensor of shape \(2,\)"):
        preference(hidden, weight, targets, torch.zeros(3), ref)
    with pytest.raises(ValueError, match=r"ref_rejected_logps must be a float tensor of shape \(2,\)"):
        preference(hidden, weight, targets, ref, torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"expected hidden \(B, T, H\), weight \(V, H\), targets \(B, T\)"):
        preference(hidden, weight[:, :-1], targets, ref, ref)
    with pytest.raises(ValueError, match="expected hidden"):
        preference(hidden, weight, targets[:, :-1], ref, ref)
    with pytest.raises(ValueError, match="expected hidden"):
        sequence_logps(hidden[0], weight, targets[0])
    with pytest.raises(ValueError, match="targets must be an integer tensor"):
        preference(hidden, weight, targets.float(), ref, ref)
    with pytest.raises(ValueError, match="chunk_size"):
        preference(hidden, weight, targets, ref, ref, chunk_size=0)
    with pytest.raises(ValueError, match="one shape"):
        preference_loss(ref, ref, ref, torch.zeros(3))
