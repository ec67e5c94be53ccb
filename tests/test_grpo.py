"""reference/grpo.py: its battery against float64, Liger-Kernel's LigerFusedLinearGRPOLoss and TRL's
GRPOTrainer._compute_loss as oracles (loss, gradients and metrics, float32 within 1e-5), and the numerics every
implementation must keep (masked positions, no completion token, zero advantages, log-ratios past the clamp,
log-probs near -1e4, -inf logits, bf16, the chunking).

Conventions checked here (see also the module docstring of reference/grpo.py):
- Liger's targets are aligned with its hidden states (no shift inside); TRL shifts inside its fused head (the hidden
  state at t predicts input_ids[t + 1]), so the TRL oracle passes ours ``hidden[:, :-1]`` and the completion ids.
- Both divide the logits by the temperature; both aggregate as ours on one process (TRL's dapo divides by
  ``num_items_in_batch``, the generation batch's completion tokens: here the batch's own); neither clamps the
  log-ratios, so the oracles' inputs keep them inside the bound (`LOG_RATIO_BOUND`), where the clamp does nothing.
- Liger logs ``kl`` (only for beta > 0) and the region clip ratio; TRL also the low and high clip ratios and the
  entropy.
"""

from __future__ import annotations

import math
from collections import defaultdict
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch

from reference.grpo import LOG_RATIO_BOUND, LOSS_TYPES, METRICS, grpo, grpo_loss, token_logps, token_stats
from reference.testing import assert_close, get_spec, rel_err
from reference.testing.pytest_plugin import cases, check_case
from tests.test_preference import _FakeCausalLM

# ----------------------------------------------------------------------------- the battery


@pytest.mark.parametrize("case", cases("grpo"))
def test_reference_passes_its_battery(case):
    """The reference in the dtype under test against itself in float64, every sample."""
    check_case(case, get_spec("grpo").reference, "cpu")


def test_torch_builtin_matches_the_reference():
    """The spec's unfused peer (timed by ``dsfs bench``) computes the same thing, every loss_type."""
    spec = get_spec("grpo")
    builtin = spec.builtin["torch"]()
    for sample in spec.samples(spec.rng())[:5]:  # grpo, bnpo, dr_grpo, dapo with beta > 0 and 0
        for name, a, b in zip(("loss", *METRICS), builtin(*sample.args), spec.reference(*sample.args), strict=True):
            assert_close(a, b, what=f"{sample.name}: {name}")


def test_spec_samples_cover_the_contract():
    """Unique, seeded samples: every loss_type, beta 0 and > 0, epsilon_high > epsilon_low, a temperature other than
    1, old and reference log-probs given and None, every tag, a vocabulary over 4096; the bench shape draws as fake
    tensors (no values read) and has flop and byte counts."""
    from dsfs import bench

    spec = get_spec("grpo")
    samples, again = spec.samples(spec.rng()), spec.samples(spec.rng())
    assert len({s.name for s in samples}) == len(samples)
    for a, b in zip(samples, again, strict=True):
        same = [torch.equal(x, y) if isinstance(x, torch.Tensor) and not x.isnan().any() else
                (torch.equal(x.nan_to_num(), y.nan_to_num()) if isinstance(x, torch.Tensor) else x == y)
                for x, y in zip(a.args, b.args, strict=True)]
        assert all(same), a.name
    assert {s.args[11] for s in samples} == set(LOSS_TYPES)
    assert {s.args[7] > 0 for s in samples} == {True, False} and any(s.args[9] > s.args[8] for s in samples)
    assert any(s.args[10] != 1 for s in samples)
    for i in (5, 6):
        assert {s.args[i] is None for s in samples} == {True, False}
    assert {"ragged", "edge", "decode", "model"} <= {t for s in samples for t in s.tags}
    assert max(s.args[1].shape[0] for s in samples) > 4096
    row = max(bench.describe(spec), key=lambda r: r["flops"])  # the realistic shape (the small one is first)
    assert row["flops"] > 1e11 and row["bytes"] > 1e7


# ----------------------------------------------------------------------------- oracles


def _group(n=6, t=9, h=16, v=83, seed=0, temperature=1.0, old=0.3, ref=0.4, dtype=torch.float32):
    """A group of n completions: the hidden states of a prompt token and t completion positions (n, t + 1, h) with
    gradients, the head (v, h) with gradients, completion ids, a mask with completions of different lengths,
    group-normalized advantages, and old / reference log-probs near the policy's (spreads ``old`` and ``ref``,
    None: not given). The policy's hidden states of the completion tokens are ``hidden_full[:, :-1]``."""
    g = torch.Generator().manual_seed(seed)
    hidden_full = torch.randn(n, t + 1, h, generator=g, dtype=dtype)
    weight = torch.randn(v, h, generator=g, dtype=dtype) * 2 / h**0.5
    ids = torch.randint(0, v, (n, t), generator=g)
    mask = torch.ones(n, t, dtype=torch.int64)
    for i in range(n):
        mask[i, t - (i * 3) % t:] = 0 if i else 1
    rewards = torch.randn(n, generator=g, dtype=dtype)
    adv = (rewards - rewards.mean()) / (rewards.std() + 1e-4)
    with torch.no_grad():
        logps = token_logps(hidden_full[:, :-1], weight, ids, temperature)
    near = [None if s is None else logps + s * torch.randn(logps.shape, generator=g, dtype=dtype) for s in (old, ref)]
    return hidden_full.requires_grad_(), weight.requires_grad_(), ids, mask, adv, *near


def _grads(out, inputs):
    return torch.autograd.grad(out, inputs, retain_graph=True)


def _assert_same(ours, theirs, inputs, what):
    assert_close(ours, theirs, what=f"{what}: loss")
    for x, a, b in zip(("hidden", "weight"), _grads(ours, inputs), _grads(theirs, inputs), strict=True):
        assert_close(a, b, what=f"{what}: d{x}")


CONFIGS = [  # loss_type, beta, epsilon_low, epsilon_high, temperature, old given
    (loss_type, beta, 0.2, eps_high, temp, old)
    for loss_type in LOSS_TYPES for beta, eps_high, temp, old in ((0.0, 0.2, 1.0, True), (0.04, 0.28, 0.7, True),
                                                                  (0.04, 0.28, 1.3, False))]


def _kw(loss_type, beta, eps_low, eps_high, temperature):
    return dict(beta=beta, epsilon_low=eps_low, epsilon_high=eps_high, temperature=temperature, loss_type=loss_type,
                max_completion_length=12)


@pytest.fixture(scope="module")
def liger_grpo():
    return pytest.importorskip("liger_kernel.chunked_loss").LigerFusedLinearGRPOLoss


@pytest.mark.parametrize("loss_type,beta,eps_low,eps_high,temperature,old_given", CONFIGS)
def test_matches_liger_grpo(liger_grpo, loss_type, beta, eps_low, eps_high, temperature, old_given):
    """Loss, its gradients, ``kl`` (beta > 0) and ``clip_ratio/region_mean`` equal LigerFusedLinearGRPOLoss's (chunks
    of 2 completions) on the same hidden states, head and log-probs."""
    hf, weight, ids, mask, adv, old, ref = _group(seed=LOSS_TYPES.index(loss_type), temperature=temperature,
                                                  old=0.3 if old_given else None, ref=0.4 if beta else None)
    hidden = hf[:, :-1]
    liger = liger_grpo(beta=beta, compiled=False, use_ref_model=ref is not None, chunk_size=2, epsilon_low=eps_low,
                       epsilon_high=eps_high, loss_type=loss_type, max_completion_length=12, temperature=temperature)
    loss, metrics = liger(hidden, weight, ids, mask, adv, ref_per_token_logps=ref, old_per_token_logps=old)
    ours = grpo(hidden, weight, ids, mask, adv, old, ref, **_kw(loss_type, beta, eps_low, eps_high, temperature),
                chunk_size=7)
    _assert_same(ours[0], loss, (hf, weight), f"liger {loss_type}")
    named = dict(zip(METRICS, ours[1:], strict=True))
    if beta:
        assert_close(named["kl"], metrics[0], what="kl")
    assert_close(named["clip_ratio/region_mean"], metrics[-1], what="clip_ratio/region_mean")
    if old_given:
        assert named["clip_ratio/low_mean"] > 0 and named["clip_ratio/high_mean"] > 0  # both sides clip here


def _trl_grpo_loss(hidden_full, weight, ids, mask, adv, old, ref, loss_type, beta, eps_low, eps_high, temperature,
                   max_completion_length):
    """``GRPOTrainer._compute_loss`` of trl 1.16, unbound, on a stand-in ``self`` (no trainer, no real model; one
    process, no gradient accumulation); the policy's log-probs and entropies come from TRL's own fused head (its
    ``_get_per_token_logps_and_entropies``) on a prompt of one token. Returns (loss, metrics)."""
    from trl import GRPOTrainer
    from trl.trainer.utils import add_fused_lm_head

    model = _FakeCausalLM(hidden_full, weight)
    add_fused_lm_head(model, temperature=temperature, outputs=("log_probs", "entropy"))
    identity = lambda x: x  # noqa: E731
    me = SimpleNamespace(
        model=SimpleNamespace(training=True), top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        importance_sampling_level="token", beta=beta, loss_type=loss_type, epsilon_low=eps_low,
        epsilon_high=eps_high, use_vllm=False, vllm_importance_sampling_correction=False,
        current_gradient_accumulation_steps=1, max_completion_length=max_completion_length,
        _entropy_bonus_enabled=False, aux_loss_enabled=False, _metrics={"train": defaultdict(list)},
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        accelerator=SimpleNamespace(num_processes=1, is_main_process=True, autocast=nullcontext, gather=identity,
                                    gather_for_metrics=identity, reduce=lambda x, reduction: x))
    me._get_per_token_logps_and_entropies = (
        lambda *a, **k: GRPOTrainer._get_per_token_logps_and_entropies(me, *a, **k))
    prompt = torch.zeros(ids.shape[0], 1, dtype=ids.dtype)
    inputs = dict(prompt_ids=prompt, prompt_mask=torch.ones_like(prompt), completion_ids=ids, completion_mask=mask,
                  advantages=adv, num_items_in_batch=mask.sum())
    if old is not None:
        inputs["old_per_token_logps"] = old
    if ref is not None:
        inputs["ref_per_token_logps"] = ref
    return GRPOTrainer._compute_loss(me, model, inputs), me._metrics["train"]


@pytest.fixture(scope="module")
def trl():
    return pytest.importorskip("trl")


@pytest.mark.parametrize("loss_type,beta,eps_low,eps_high,temperature,old_given", CONFIGS)
def test_matches_trl_grpo_trainer(trl, loss_type, beta, eps_low, eps_high, temperature, old_given):
    """Loss, its gradients and every metric ours has (kl, the three clip ratios, entropy) equal GRPOTrainer's on the
    same model: TRL computes the policy's log-probs and entropies itself (shifting inside)."""
    hf, weight, ids, mask, adv, old, ref = _group(seed=7 + LOSS_TYPES.index(loss_type), temperature=temperature,
                                                  old=0.3 if old_given else None, ref=0.4 if beta else None)
    kw = _kw(loss_type, beta, eps_low, eps_high, temperature)
    theirs, metrics = _trl_grpo_loss(hf, weight, ids, mask, adv, old, ref, loss_type, beta, eps_low, eps_high,
                                     temperature, kw["max_completion_length"])
    ours = grpo(hf[:, :-1], weight, ids, mask, adv, old, ref, **kw, chunk_size=5)
    _assert_same(ours[0], theirs, (hf, weight), f"trl {loss_type}")
    for name, value in zip(METRICS, ours[1:], strict=True):
        if name in metrics:
            assert value.item() == pytest.approx(metrics[name][0], rel=1e-5, abs=1e-7), name
    assert set(METRICS) - {"kl"} <= set(metrics) and ("kl" in metrics) == (beta > 0)


# ----------------------------------------------------------------------------- semantics and numerics


def test_token_logps_and_entropy_are_the_log_softmax_at_the_temperature():
    """float64: log_softmax(h W^T / temperature) at the targets and its entropy, 0 at ignored targets, and the
    gradients of the log-probs; the entropy has none."""
    hf, weight, ids, mask, _, _, _ = _group(dtype=torch.float64, seed=3)
    hidden = hf[:, :-1]
    ids = ids.masked_fill(mask == 0, -100)
    logps, entropy = token_stats(hidden, weight, ids, 0.7, chunk_size=5)
    logp_all = (hidden @ weight.T / 0.7).log_softmax(-1)
    want = logp_all.gather(-1, ids.clamp(min=0)[..., None])[..., 0] * mask
    assert logps.dtype == torch.float64 and not entropy.requires_grad
    assert_close(logps, want, torch.float64, what="logps")
    assert_close(entropy, -(logp_all.exp() * logp_all).sum(-1) * mask, torch.float64, what="entropy")
    cot = torch.randn(logps.shape, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(logps, (hf, weight), cot), torch.autograd.grad(want, (hf, weight), cot),
                    strict=True):
        assert_close(a, b, torch.float64)
    # unchunked: the same values up to the GEMM's blocking (bit for bit on some CPUs, not on every one)
    assert_close(token_logps(hidden.reshape(-1, hidden.shape[-1]), weight, ids, 0.7), logps.detach(), torch.float64)


def test_peaked_distributions_keep_their_relative_precision():
    """Each token's likeliest logit 20 above the others (N(0, 1)): the entropy (about 1e-5 nats) and the likeliest
    tokens' log-probs (about -1e-6) in float32 are within 1e-5 of float64, where ``lse - sum(p * x)`` and
    ``x - lse`` lose them to float32's cancellation against 1."""
    g = torch.Generator().manual_seed(5)
    hidden, weight = torch.randn(4, 6, 50, generator=g), torch.eye(50)  # the logits are the hidden states
    ids = torch.randint(0, 50, (4, 6), generator=g)
    hidden.scatter_add_(-1, ids[..., None], torch.full((4, 6, 1), 20.0))
    lp32, ent32 = token_stats(hidden, weight, ids)
    lp64, ent64 = token_stats(hidden.double(), weight.double(), ids)
    assert ent64.max() < 1e-3 and lp64.abs().max() < 1e-5
    assert_close(ent32, ent64, what="entropy")
    assert_close(lp32, lp64, what="logps of the likeliest tokens")
    lse = hidden.logsumexp(-1)
    naive_entropy = lse - (hidden.softmax(-1) * hidden).sum(-1)
    naive_logps = hidden.gather(-1, ids[..., None])[..., 0] - lse
    assert rel_err(naive_entropy, ent64) > 1e-2 and rel_err(naive_logps, lp64) > 1e-2


def test_on_policy_is_old_logps_equal_to_the_policys():
    """old_logps None is TRL's ``old = logps.detach()``: the same loss and gradients as passing the policy's own
    log-probs, every ratio 1, nothing clipped."""
    hf, weight, ids, mask, adv, _, ref = _group(seed=4)
    hidden = hf[:, :-1]
    with torch.no_grad():
        own = token_logps(hidden, weight, ids)
    a = grpo(hidden, weight, ids, mask, adv, None, ref, beta=0.04)
    b = grpo(hidden, weight, ids, mask, adv, own, ref, beta=0.04)
    for x, y in zip(a, b, strict=True):
        assert_close(x, y)
    _assert_same(a[0], b[0], (hf, weight), "on-policy")
    assert a[2] == 0 and a[3] == 0


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_chunking_does_not_change_the_result(loss_type):
    """chunk_size 1, 7 and the default (all tokens in one chunk here) agree to float32 rounding, gradients too."""
    hf, weight, ids, mask, adv, old, ref = _group(n=4, t=13, v=301, seed=11)
    kw = _kw(loss_type, 0.04, 0.2, 0.28, 0.7)
    outs = [grpo(hf[:, :-1], weight, ids, mask, adv, old, ref, **kw, chunk_size=c) for c in (None, 1, 7)]
    for c, out in zip((1, 7), outs[1:], strict=True):
        for name, a, b in zip(("loss", *METRICS), out, outs[0], strict=True):
            assert_close(a, b, what=f"chunk_size {c}: {name}")
        _assert_same(out[0], outs[0][0], (hf, weight), f"chunk_size {c}")


def test_masked_positions_are_ignored():
    """Whatever masked positions hold -- hidden states giving logits in the thousands, targets out of the vocabulary,
    NaN old and reference log-probs -- the outputs are the same and those positions get a zero gradient; a sequence
    without completion token adds 0 to every loss type (grpo: its mean counts as 0 among the N)."""
    hf, weight, ids, mask, adv, old, ref = _group(seed=2)
    mask[2] = 0
    kw = _kw("grpo", 0.04, 0.2, 0.28, 1.0)
    out = grpo(hf[:, :-1], weight, ids, mask, adv, old, ref, **kw)
    garbage = hf.detach()[:, :-1].clone()
    garbage[mask == 0] *= 1e3
    garbage.requires_grad_()
    off = mask == 0
    out2 = grpo(garbage, weight, ids.masked_fill(off, -7), mask, adv, old.masked_fill(off, math.nan),
                ref.masked_fill(off, math.nan), **kw)
    for a, b in zip(out, out2, strict=True):
        assert_close(a, b)
    dh, dw = torch.autograd.grad(out2[0], (garbage, weight))
    assert torch.isfinite(dh).all() and torch.isfinite(dw).all()
    assert (dh[off] == 0).all() and (dh[~off] != 0).any()


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_no_completion_token_gives_zero(loss_type):
    """An all-zero mask: every output 0 (not NaN) and zero gradients, every loss type."""
    hf, weight, ids, mask, adv, old, ref = _group(seed=5)
    out = grpo(hf[:, :-1], weight, ids, torch.zeros_like(mask), adv, old, ref, **_kw(loss_type, 0.04, 0.2, 0.2, 1.0))
    assert all(o.item() == 0 for o in out)
    for g in torch.autograd.grad(out[0], (hf, weight)):
        assert (g == 0).all()


def test_zero_advantages_leave_the_kl_alone():
    """Advantages of 0 (a group whose rewards are all equal): the policy term and its gradient vanish, the loss is
    beta times the KL term's aggregate, and nothing is clipped."""
    hf, weight, ids, mask, _, old, ref = _group(seed=6)
    zero = torch.zeros(ids.shape[0])
    loss, kl, low, high, region, _ = grpo(hf[:, :-1], weight, ids, mask, zero, old, ref, beta=0.1)
    assert_close(loss, 0.1 * kl, what="loss = beta * kl (dapo's mean is the metric's)")
    assert low == high == region == 0
    loss0 = grpo(hf[:, :-1], weight, ids, mask, zero, old, ref, beta=0.0)[0]
    assert loss0.item() == 0 and all((g == 0).all() for g in torch.autograd.grad(loss0, (hf, weight)))


def test_log_ratios_past_the_clamp_stay_finite():
    """Old log-probs 50 nats and 1e4 nats off the policy's, -inf, and reference log-probs 40 nats off: every output
    and gradient is finite and equals the formulas with both log-ratios clamped to +-20 (computed here from the
    policy's log-probs); the clamped terms give no gradient."""
    hf, weight, ids, mask, adv, old, ref = _group(seed=8)
    hidden = hf[:, :-1]
    with torch.no_grad():
        logps = token_logps(hidden, weight, ids)
    sign = torch.where(torch.arange(ids.numel()).view(ids.shape) % 2 == 0, 1.0, -1.0)
    old = logps + 50 * sign
    old[0, :3] = torch.tensor([-1e4, 1e4, -math.inf])
    ref = logps - 40 * sign
    out = grpo(hidden, weight, ids, mask, adv, old, ref, beta=0.04, loss_type="bnpo")
    assert all(torch.isfinite(o) for o in out)
    valid = mask.bool()
    coef = (-LOG_RATIO_BOUND * sign).exp()  # (logps - old) clamped
    a = adv[:, None]
    per_token = -torch.minimum(coef * a, coef.clamp(0.8, 1.2) * a)
    d = LOG_RATIO_BOUND * -sign
    kl = d.exp() - d - 1
    per_token[0, :3] = -torch.minimum(torch.tensor([20.0, -20.0, -20.0]).exp() * a[0],
                                      torch.tensor([1.2, 0.8, 0.8]) * a[0])
    want = ((per_token + 0.04 * kl) * valid).sum() / valid.sum()
    assert_close(out[0], want, what="loss")
    assert_close(out[1], (kl * valid).sum() / valid.sum(), what="kl")
    for g in torch.autograd.grad(out[0], (hf, weight)):
        assert torch.isfinite(g).all() and (g == 0).all()  # every term clamped: constant in the policy


def test_log_probs_near_minus_1e4_stay_finite():
    """Logits in the thousands (log-probs of -1e3 to -1e4 on policy): loss and gradients finite and equal to float64,
    entropy 0, nothing clipped on-policy; a log-ratio of 1e4 to the reference is clamped."""
    g = torch.Generator().manual_seed(9)
    hidden = torch.randn(3, 5, 8, generator=g)
    hidden[..., 0] = 1.5
    weight = torch.randn(13, 8, generator=g) * 1e-4
    weight[:, 0] = 1000.0 * (torch.arange(13) - 6)
    ids, mask, adv = torch.randint(0, 13, (3, 5), generator=g), torch.ones(3, 5, dtype=torch.int64), torch.randn(3)
    with torch.no_grad():
        logps = token_logps(hidden, weight, ids)
    assert logps.min() < -5e3
    ref = logps + 1e4
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = grpo(h, w, ids, mask, adv, None, ref, beta=0.04)
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    want = grpo(h64, w64, ids, mask, adv.double(), None, ref.double(), beta=0.04)
    for name, a, b in zip(("loss", *METRICS), out, want, strict=True):
        assert torch.isfinite(a)
        assert_close(a, b, what=name)
    assert out[-1] == 0 and out[4] == 0
    for a, b in zip(torch.autograd.grad(out[0], (h, w)), torch.autograd.grad(want[0], (h64, w64)), strict=True):
        assert torch.isfinite(a).all()
        assert_close(a, b)


def test_minus_inf_logits_stay_finite_and_change_nothing():
    """Vocabulary entries whose logit is -inf (hidden's first 4 features 1, those weight rows -1e38 there) have
    probability 0: the outputs and gradients equal those of the model without them, their rows get 0."""
    hf, weight, ids, mask, adv, old, ref = _group(v=40, seed=10)
    rows = [3, 17]
    ids[torch.isin(ids, torch.tensor(rows))] = 5
    h, w = hf.detach()[:, :-1].clone(), weight.detach().clone()
    h[..., :4] = 1.0
    w[rows] = 0.0
    w[rows, :4] = -1e38
    assert torch.isinf(h[0, :1] @ w.T).any()
    keep = [i for i in range(w.shape[0]) if i not in rows]
    remap = torch.full((w.shape[0],), -1).index_put_((torch.tensor(keep),), torch.arange(len(keep)))
    h2, w2 = h.clone().requires_grad_(), w[keep].clone().requires_grad_()
    h.requires_grad_(), w.requires_grad_()
    kw = _kw("grpo", 0.04, 0.2, 0.28, 0.7)
    out = grpo(h, w, ids, mask, adv, old, ref, **kw)
    want = grpo(h2, w2, remap[ids], mask, adv, old, ref, **kw)
    for a, b in zip(out, want, strict=True):
        assert_close(a, b)
    dh, dw = torch.autograd.grad(out[0], (h, w))
    dh2, dw2 = torch.autograd.grad(want[0], (h2, w2))
    assert torch.isfinite(dh).all() and torch.isfinite(dw).all() and (dw[rows] == 0).all()
    assert_close(dh, dh2, what="dhidden")
    assert_close(dw[keep], dw2, what="dweight")


def test_bf16_inputs():
    """bf16 hidden and head: float32 outputs, bf16 gradients, finite, equal to the float32 computation on the same
    (bf16-rounded) values within the bf16 bound."""
    hf, weight, ids, mask, adv, old, ref = _group(seed=12)
    hb, wb = hf.detach()[:, :-1].bfloat16().requires_grad_(), weight.detach().bfloat16().requires_grad_()
    h32, w32 = hb.detach().float().requires_grad_(), wb.detach().float().requires_grad_()
    kw = _kw("dr_grpo", 0.04, 0.2, 0.28, 0.7)
    out = grpo(hb, wb, ids, mask, adv, old, ref, **kw)
    want = grpo(h32, w32, ids, mask, adv, old, ref, **kw)
    assert all(o.dtype == torch.float32 for o in out)
    for a, b in zip(out, want, strict=True):
        assert_close(a, b, torch.bfloat16)
    grads = torch.autograd.grad(out[0], (hb, wb))
    assert [g.dtype for g in grads] == [torch.bfloat16, torch.bfloat16]
    for g, g32 in zip(grads, torch.autograd.grad(want[0], (h32, w32)), strict=True):
        assert torch.isfinite(g).all()
        assert_close(g, g32, torch.bfloat16)


def test_autocast_no_grad_and_frozen_head():
    hf, weight, ids, mask, adv, old, ref = _group(seed=13)
    hidden = hf[:, :-1]
    want = grpo(hidden, weight, ids, mask, adv, old, ref, beta=0.04)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = grpo(hidden, weight, ids, mask, adv, old, ref, beta=0.04)
    assert got[0].dtype == torch.float32
    assert_close(got[0], want[0], what="under autocast")
    with torch.no_grad():
        assert not grpo(hidden, weight, ids, mask, adv, old, ref)[0].requires_grad
    assert not any(m.requires_grad for m in want[1:])
    dh, = torch.autograd.grad(grpo(hidden, weight.detach(), ids, mask, adv, old, ref, beta=0.04)[0], hf)
    assert_close(dh, torch.autograd.grad(want[0], hf)[0], what="dhidden, head frozen")


def test_bad_input_raises_value_error():
    hf, weight, ids, mask, adv, old, ref = _group()
    h = hf[:, :-1]
    with pytest.raises(ValueError, match="loss_type must be one of"):
        grpo(h, weight, ids, mask, adv, loss_type="cispo")
    for beta in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="beta must be a finite number"):
            grpo(h, weight, ids, mask, adv, ref_logps=ref, beta=beta)
    with pytest.raises(ValueError, match="beta > 0 needs ref_logps"):
        grpo(h, weight, ids, mask, adv, beta=0.04)
    with pytest.raises(ValueError, match=r"epsilon_low must be a finite number in \[0.0, 1.0\]"):
        grpo(h, weight, ids, mask, adv, epsilon_low=1.5)
    with pytest.raises(ValueError, match="epsilon_high must be a finite number"):
        grpo(h, weight, ids, mask, adv, epsilon_high=-0.1)
    for temperature in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
            grpo(h, weight, ids, mask, adv, temperature=temperature)
    for m in (None, 0, 3.0):
        with pytest.raises(ValueError, match="'dr_grpo' needs max_completion_length"):
            grpo(h, weight, ids, mask, adv, loss_type="dr_grpo", max_completion_length=m)
    with pytest.raises(ValueError, match=r"expected hidden \(N, T, H\) or \(N\*T, H\)"):
        grpo(h, weight[:, :-1], ids, mask, adv)
    with pytest.raises(ValueError, match="expected hidden"):
        grpo(h, weight, ids[:, :-1], mask, adv)
    with pytest.raises(ValueError, match="at least one sequence"):
        grpo(h[:0], weight, ids[:0], mask[:0], adv[:0])
    with pytest.raises(ValueError, match=r"completion_mask must be a tensor .* of shape \(6, 9\)"):
        grpo(h, weight, ids, mask[:, :-1], adv)
    with pytest.raises(ValueError, match=r"advantages must be a float tensor of shape \(6,\)"):
        grpo(h, weight, ids, mask, adv[:-1])
    with pytest.raises(ValueError, match=r"old_logps must be a float tensor of shape \(6, 9\)"):
        grpo(h, weight, ids, mask, adv, old_logps=old[:, :-1])
    with pytest.raises(ValueError, match="targets must be an integer tensor"):
        grpo(h, weight, ids.float(), mask, adv)
    with pytest.raises(ValueError, match="must be floating point"):
        grpo(h.long(), weight, ids, mask, adv)
    with pytest.raises(ValueError, match="chunk_size"):
        grpo(h, weight, ids, mask, adv, chunk_size=0)
    with pytest.raises(ValueError, match="logps must be a float tensor"):
        grpo_loss(old[0], mask, adv)


def test_asv_liger_peer_is_the_same_loss():
    """bench/ops.py's ``liger`` row for grpo (`bench.ops._liger_grpo`, wrapped to the op's signature) computes our loss
    and its two metrics on the small bench shape, and grpo has its ``_memory`` suite."""
    pytest.importorskip("liger_kernel.chunked_loss")
    from bench import ops
    from dsfs import bench

    spec = get_spec("grpo")
    sample = bench.bench_samples(spec)[0]
    theirs = ops.PEERS["liger"]["grpo"](spec)(*sample.args)
    ours = spec.reference(*sample.args)
    assert_close(ours[0], theirs[0], what="loss")
    assert_close(ours[1], theirs[1], what="kl")
    assert_close(ours[4], theirs[2], what="clip_ratio/region_mean")
    assert "grpo" in ops.MEMORY_OPS and hasattr(ops, "grpo_memory") and hasattr(ops, "grpo_grad")
