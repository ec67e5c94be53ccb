"""reference/distill.py: its battery against float64, Liger-Kernel's LigerFusedLinearJSDLoss and TRL's
GKDTrainer.generalized_jsd_loss as oracles (values and gradients, float32 within 1e-5), and the numerics every
implementation must keep (ignored tokens, all targets ignored, -inf logits, bf16, the chunking, no teacher gradient).

Conventions checked here: both oracles divide the logits by ``temperature`` and do not multiply by
``temperature**2``; beta 0 is forward KL(p_t || p_s) and beta 1 reverse KL(p_s || p_t); the per-token divergence is
summed over the vocabulary and averaged over the non-ignored tokens (the count clamped to 1, so all-ignored gives 0);
the hard loss is the cross-entropy of the unscaled student logits over the same count (Liger). Liger's backward
passes only the gradient of ``loss`` (it drops those of ``soft_loss`` and ``hard_loss``); ours carries all three.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from reference.distill import distill
from reference.testing import assert_close, get_spec
from reference.testing.pytest_plugin import cases, check_case

# ----------------------------------------------------------------------------- the battery


@pytest.mark.parametrize("case", cases("distill"))
def test_reference_passes_its_battery(case):
    """The reference in the dtype under test against itself in float64, every sample."""
    check_case(case, get_spec("distill").reference, "cpu")


def test_torch_builtin_matches_the_reference():
    """The spec's unfused peer (timed by ``dsfs bench``) computes the same thing at every beta and temperature."""
    spec = get_spec("distill")
    builtin = spec.builtin["torch"]()
    for sample in spec.samples(spec.rng())[:7]:
        for name, a, b in zip(("loss", "soft", "hard"), builtin(*sample.args), spec.reference(*sample.args),
                              strict=True):
            assert_close(a, b, what=f"{sample.name}: {name}")


def test_spec_samples_cover_the_contract():
    """Unique, seeded samples: beta 0, 0.5 and 1, a temperature other than 1, several weightings, every tag, a
    vocabulary over 4096; the bench shape draws as fake tensors (no values read) and has flop and byte counts."""
    from dsfs import bench

    spec = get_spec("distill")
    samples, again = spec.samples(spec.rng()), spec.samples(spec.rng())
    assert len({s.name for s in samples}) == len(samples)
    for a, b in zip(samples, again, strict=True):
        same = [torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
                for x, y in zip(a.args, b.args, strict=True)]
        assert all(same), a.name
    assert {0.0, 0.5, 1.0} <= {s.args[5] for s in samples} and any(s.args[6] != 1 for s in samples)
    assert len({s.args[7:9] for s in samples}) >= 3
    assert {"ragged", "edge", "decode", "model"} <= {t for s in samples for t in s.tags}
    assert max(s.args[1].shape[0] for s in samples) > 4096
    row = max(bench.describe(spec), key=lambda r: r["flops"])  # the realistic shape (the small one is first)
    assert row["flops"] > 1e11 and row["bytes"] > 1e7


# ----------------------------------------------------------------------------- oracles


def _tokens(n=23, hs=16, ht=24, v=97, seed=0, ignored=(1, 6, 11, 22), dtype=torch.float32):
    """Student (n, hs) / (v, hs) with gradients, a correlated teacher (n, ht) / (v, ht), targets with ``ignored``."""
    g = torch.Generator().manual_seed(seed)
    sh = torch.randn(n, hs, generator=g, dtype=dtype)
    sw = torch.randn(v, hs, generator=g, dtype=dtype) * 2 / hs**0.5
    th = torch.randn(n, ht, generator=g, dtype=dtype)
    th[:, :hs] = sh
    tw = torch.randn(v, ht, generator=g, dtype=dtype) / ht**0.5
    tw[:, :hs] += sw * (hs / ht) ** 0.5
    targets = torch.randint(0, v, (n,), generator=g)
    targets[list(ignored)] = -100
    return sh.requires_grad_(), sw.requires_grad_(), th, tw, targets


def _assert_grads(ours, theirs, inputs, what):
    for x, a, b in zip(("student_hidden", "student_weight"), torch.autograd.grad(ours, inputs, retain_graph=True),
                       torch.autograd.grad(theirs, inputs, retain_graph=True), strict=True):
        assert_close(a, b, what=f"{what}: d{x}")


@pytest.fixture(scope="module")
def liger_jsd():
    return pytest.importorskip("liger_kernel.chunked_loss").LigerFusedLinearJSDLoss


@pytest.mark.parametrize("beta,temperature,w_hard,w_soft,chunk", [
    (0.0, 1.0, 0.5, 0.5, 1024), (0.5, 1.0, 0.5, 0.5, 1024), (1.0, 1.0, 0.5, 0.5, 1024), (0.0, 2.0, 0.2, 0.8, 8),
    (0.5, 2.0, 0.0, 1.0, 8), (1.0, 2.0, 1.0, 0.0, 5), (0.3, 0.7, 0.7, 0.3, 1024)])
def test_matches_liger_jsd(liger_jsd, beta, temperature, w_hard, w_soft, chunk):
    """loss, soft_loss and hard_loss equal LigerFusedLinearJSDLoss(return_soft_hard_loss=True), and so do the
    loss's gradients (Liger's backward carries the loss's only)."""
    sh, sw, th, tw, targets = _tokens(seed=int(beta * 10 + temperature))
    liger = liger_jsd(weight_hard_loss=w_hard, weight_soft_loss=w_soft, beta=beta, temperature=temperature,
                      compiled=False, chunk_size=chunk, return_soft_hard_loss=True)
    theirs = liger(sh, sw, th, tw, targets)
    ours = distill(sh, sw, th, tw, targets, beta, temperature, w_hard, w_soft, chunk_size=7)
    for name, a, b in zip(("loss", "soft_loss", "hard_loss"), ours, theirs, strict=True):
        assert_close(a, b, what=name)
    _assert_grads(ours[0], theirs[0], (sh, sw), f"liger beta {beta} T {temperature}")


@pytest.fixture(scope="module")
def gkd():
    pytest.importorskip("trl")
    return pytest.importorskip("trl.experimental.gkd").GKDTrainer


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0, 0.2])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_soft_loss_matches_trl_generalized_jsd(gkd, beta, temperature):
    """soft_loss and its gradients equal GKDTrainer.generalized_jsd_loss (batchmean over the labels' valid tokens)
    on the whole (B, T, V) logits; TRL masks label -100 only."""
    b, t = 3, 8
    sh, sw, th, tw, targets = _tokens(n=b * t, seed=int(beta * 10), ignored=(0, 1, 8, 9, 23))
    theirs = gkd.generalized_jsd_loss((sh @ sw.T).view(b, t, -1), (th @ tw.T).view(b, t, -1),
                                      labels=targets.view(b, t), beta=beta, temperature=temperature)
    _, soft, _ = distill(sh, sw, th, tw, targets, beta, temperature, 0.5, 0.5, chunk_size=5)
    assert_close(soft, theirs, what="soft_loss")
    _assert_grads(soft, theirs, (sh, sw), f"trl beta {beta} T {temperature}")


def test_hard_loss_is_cross_entropy_of_the_unscaled_student():
    sh, sw, th, tw, targets = _tokens(seed=4)
    loss, soft, hard = distill(sh, sw, th, tw, targets, 0.5, 3.0, 0.25, 0.75)
    want = F.cross_entropy(sh @ sw.T, targets)
    assert_close(hard, want, what="hard_loss")
    _assert_grads(hard, want, (sh, sw), "hard")
    assert_close(loss, 0.25 * hard + 0.75 * soft, what="loss")


# ----------------------------------------------------------------------------- semantics and numerics


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_chunking_does_not_change_the_result(beta):
    """chunk_size 1, 7 and the default (all tokens in one chunk here) agree to float32 rounding, for every output
    and its gradients: no chunk sees another's tokens."""
    sh, sw, th, tw, targets = _tokens(n=29, v=301, seed=12)
    outs = [distill(sh, sw, th, tw, targets, beta, 2.0, 0.4, 0.6, chunk_size=c) for c in (None, 1, 7)]
    for c, out in zip((1, 7), outs[1:], strict=True):
        for name, a, b in zip(("loss", "soft_loss", "hard_loss"), out, outs[0], strict=True):
            assert_close(a, b, what=f"chunk_size {c}: {name}")
            _assert_grads(a, b, (sh, sw), f"chunk_size {c}: {name}")


def test_ignored_tokens_are_ignored_and_all_ignored_gives_zero():
    sh, sw, th, tw, targets = _tokens(seed=2)
    out = distill(sh, sw, th, tw, targets)
    garbage, tgarbage = sh.detach().clone(), th.clone()
    garbage[targets == -100] *= 1e3  # logits in the thousands at ignored tokens
    tgarbage[targets == -100] *= -1e3
    garbage.requires_grad_()
    out2 = distill(garbage, sw, tgarbage, tw, targets)
    for a, b in zip(out, out2, strict=True):
        assert_close(a, b)
    dh, dw = torch.autograd.grad(sum(out2), (garbage, sw))
    assert torch.isfinite(dh).all() and torch.isfinite(dw).all()
    assert (dh[targets == -100] == 0).all() and (dh[targets != -100] != 0).any()
    none = torch.full_like(targets, -100)
    for beta in (0.0, 0.5, 1.0):
        out = distill(sh, sw, th, tw, none, beta)
        assert all(o.item() == 0 for o in out)
        for g in torch.autograd.grad(sum(out), (sh, sw)):
            assert (g == 0).all()


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_minus_inf_logits_stay_finite_and_change_nothing(beta):
    """Vocabulary entries whose logit is -inf in both models (hidden's first 4 features 1, those weight rows -1e38
    there, 0 elsewhere) have probability 0 in both: every term counts 0 (no NaN from 0 * (-inf + inf)), the
    outputs and gradients equal those of the models without those entries, and their weight rows get 0."""
    sh, sw, th, tw, targets = _tokens(v=40, seed=9)
    rows = [3, 17]
    targets[torch.isin(targets, torch.tensor(rows))] = 5
    sh, sw, th, tw = (x.detach().clone() for x in (sh, sw, th, tw))
    for h, w in ((sh, sw), (th, tw)):
        h[:, :4] = 1.0
        w[rows] = 0.0
        w[rows, :4] = -1e38
    assert torch.isinf(sh[:1] @ sw.T).any() and torch.isinf(th[:1] @ tw.T).any()
    keep = [i for i in range(sw.shape[0]) if i not in rows]
    remap = torch.full((sw.shape[0],), -100).index_put_((torch.tensor(keep),), torch.arange(len(keep)))
    targets_kept = torch.where(targets == -100, -100, remap[targets.clamp(min=0)])
    sh.requires_grad_(), sw.requires_grad_()
    sh2, sw2 = sh.detach().clone().requires_grad_(), sw.detach()[keep].clone().requires_grad_()
    out = distill(sh, sw, th, tw, targets, beta, 2.0)
    want = distill(sh2, sw2, th, tw[keep], targets_kept, beta, 2.0)
    for a, b in zip(out, want, strict=True):
        assert torch.isfinite(a)
        assert_close(a, b)
    dh, dw = torch.autograd.grad(sum(out), (sh, sw))
    dh2, dw2 = torch.autograd.grad(sum(want), (sh2, sw2))
    assert torch.isfinite(dh).all() and torch.isfinite(dw).all() and (dw[rows] == 0).all()
    assert_close(dh, dh2, what="dstudent_hidden")
    assert_close(dw[keep], dw2, what="dstudent_weight")


def test_bf16_inputs():
    """bf16 inputs: float32 outputs, bf16 gradients, finite, equal to the float32 computation on the same values
    within the bf16 bound."""
    sh, sw, th, tw, targets = _tokens(seed=6)
    hb, wb, thb, twb = (x.detach().bfloat16() for x in (sh, sw, th, tw))
    hb.requires_grad_(), wb.requires_grad_()
    hf, wf = hb.detach().float().requires_grad_(), wb.detach().float().requires_grad_()
    out = distill(hb, wb, thb, twb, targets, 0.5, 2.0)
    want = distill(hf, wf, thb.float(), twb.float(), targets, 0.5, 2.0)
    assert all(o.dtype == torch.float32 for o in out)
    for a, b in zip(out, want, strict=True):
        assert_close(a, b, torch.bfloat16)
    grads = torch.autograd.grad(out[0], (hb, wb))
    assert [g.dtype for g in grads] == [torch.bfloat16, torch.bfloat16]
    for g, g32 in zip(grads, torch.autograd.grad(want[0], (hf, wf)), strict=True):
        assert torch.isfinite(g).all()
        assert_close(g, g32, torch.bfloat16)


def test_teacher_gets_no_gradient_autocast_no_grad_frozen_head():
    sh, sw, th, tw, targets = _tokens(seed=8)
    th, tw = th.clone().requires_grad_(), tw.clone().requires_grad_()
    out = distill(sh, sw, th, tw, targets)
    sum(out).backward()
    assert th.grad is None and tw.grad is None and sh.grad is not None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = distill(sh, sw, th, tw, targets)
    assert got[0].dtype == torch.float32
    assert_close(got[0], out[0], what="under autocast")
    with torch.no_grad():
        assert not distill(sh, sw, th, tw, targets)[0].requires_grad
    dh, = torch.autograd.grad(distill(sh, sw.detach(), th, tw, targets)[0], sh)
    assert_close(dh, torch.autograd.grad(distill(sh, sw, th, tw, targets)[0], sh)[0], what="dhidden, head frozen")


def test_bad_input_raises_value_error():
    sh, sw, th, tw, targets = _tokens()
    with pytest.raises(ValueError, match="vocabularies differ: student_weight has 97 rows, teacher_weight 96"):
        distill(sh, sw, th, tw[:-1], targets)
    with pytest.raises(ValueError, match=r"expected student_hidden \(N, Hs\)"):
        distill(sh, sw[:, :-1], th, tw, targets)
    with pytest.raises(ValueError, match="expected student_hidden"):
        distill(sh, sw, th[:-1], tw, targets)
    with pytest.raises(ValueError, match="expected student_hidden"):
        distill(sh[None], sw, th[None], tw, targets[None])
    with pytest.raises(ValueError, match="expected student_hidden"):
        distill(sh, sw, th, tw, targets[:-1])
    for beta in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"beta must be a finite number in \[0.0, 1.0\]"):
            distill(sh, sw, th, tw, targets, beta=beta)
    for temperature in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
            distill(sh, sw, th, tw, targets, temperature=temperature)
    with pytest.raises(ValueError, match="weight_soft_loss must be a finite number"):
        distill(sh, sw, th, tw, targets, weight_soft_loss=float("nan"))
    with pytest.raises(ValueError, match="targets must be an integer tensor"):
        distill(sh, sw, th, tw, targets.float())
    with pytest.raises(ValueError, match="must be floating point"):
        distill(sh, sw, th.long(), tw, targets)
    with pytest.raises(ValueError, match="chunk_size"):
        distill(sh, sw, th, tw, targets, chunk_size=0)
