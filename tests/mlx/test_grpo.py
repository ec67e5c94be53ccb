"""`runtime_mlx.kernels.grpo` (GRPO's clipped loss with the k3 KL, fused with the LM head, chunked over tokens): the
op's battery (`reference.testing.grpo`) on every path; beyond the op spec, explicit chunk sizes (chunks that cross
sequences, a partial last one), every ``loss_type`` with and without old and reference log-probs, `token_stats`
(log-probs, entropies, gradients at a temperature), `grpo_loss` alone (clipped on both sides, ties, log-ratios past
the clamp, the gradient of ``torch.minimum`` and ``torch.clamp`` exactly), bfloat16 and a bfloat16 hidden state
against a float32 head, the cross-entropy kernels' Metal path under the CPU emulation, and argument errors.
Everything against `reference.grpo` in float64."""

from __future__ import annotations

import math
import sys

import mlx.core as mx
import pytest
import torch

from reference import grpo as ref
from reference.testing import assert_close
from reference.testing.pytest_plugin import cases, check_case
from runtime_mlx.kernels import grpo, grpo_loss, kernel_path, token_logps, token_stats
from tests.mlx.utils import PATHS, to_mx, to_torch


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", cases("grpo"))
def test_battery(path, case):
    """The op's battery on `runtime_mlx.kernels.grpo` (int64 targets and mask, as the battery passes them), its VJP's
    per-chunk `cross_entropy` on the path ``path`` (pure MLX, or Metal)."""
    check_case(case, grpo, "mlx")
    assert kernel_path("cross_entropy") == path


def _inputs(n=4, t=9, h=16, v=301, temperature=1.0):
    """hidden (n, t, h) float64, weight (v, h), targets, a mask with completions of 9, 6, 3 and 0 tokens whose
    masked positions hold huge hidden states (logits in the thousands), advantages, and old / reference log-probs
    near the policy's (some ratios clipped on each side)."""
    torch.manual_seed(0)
    hidden, weight = torch.randn(n, t, h, dtype=torch.float64), torch.randn(v, h, dtype=torch.float64) * 0.5
    targets = torch.randint(0, v, (n, t))
    mask = torch.ones(n, t, dtype=torch.int64)
    for i in range(n):
        mask[i, t - 3 * i:] = 0 if i else 1
    hidden[mask == 0] *= 1e3
    with torch.no_grad():
        logps = ref.token_logps(hidden, weight, targets, temperature)
    old = logps + 0.3 * torch.randn(n, t, dtype=torch.float64)
    refl = logps + 0.5 * torch.randn(n, t, dtype=torch.float64)
    return hidden, weight, targets, mask, torch.randn(n, dtype=torch.float64), old, refl


def _compare(args, kw, dtype=torch.float32, cot=1.7):
    """Ours (inputs cast to ``dtype``, the log-probs and advantages float32) against the float64 reference on the same
    values: the six outputs and the loss's gradients for the cotangent ``cot``."""
    hidden, weight, targets, mask, adv, old, refl = args
    h, w = hidden.to(dtype), weight.to(dtype)
    hr, wr = h.double().requires_grad_(), w.double().requires_grad_()
    want = ref.grpo(hr, wr, targets, mask, adv, old, refl, **kw)
    gh, gw = torch.autograd.grad(want[0] * cot, (hr, wr))
    extra = [None if x is None else to_mx(x.float()) for x in (old, refl)]
    tm, mm, am = to_mx(targets), to_mx(mask), to_mx(adv.float())
    outs, (dh, dw) = mx.vjp(lambda a, b: grpo(a, b, tm, mm, am, *extra, **kw)[0], [to_mx(h), to_mx(w)],
                            [mx.array(cot)])
    full = grpo(to_mx(h), to_mx(w), tm, mm, am, *extra, **kw)
    bound = dtype if dtype != torch.float32 else torch.float32
    for name, o, r in zip(("loss", *ref.METRICS), full, want, strict=True):
        assert o.dtype == mx.float32 and o.shape == ()
        assert_close(to_torch(o), r.detach(), bound, what=name)
    assert_close(to_torch(outs[0]), want[0].detach(), bound, what="loss under vjp")
    assert dh.dtype == to_mx(h).dtype and dw.dtype == to_mx(w).dtype
    assert_close(to_torch(dh), gh, bound, what="d_hidden")
    assert_close(to_torch(dw), gw, bound, what="d_weight")
    return dh


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("loss_type", ref.LOSS_TYPES)
@pytest.mark.parametrize("given", ["old+ref", "on-policy"])
def test_matches_reference(path, loss_type, given):
    """4 completions of 9 tokens in chunks of 7 (36 tokens: chunks cross sequences, the last one partial), beta 0.04
    with clip-higher at temperature 0.7, or on-policy with beta 0 at 1.3; the masked positions get no gradient."""
    temperature = 0.7 if given == "old+ref" else 1.3
    args = list(_inputs(temperature=temperature))
    if given == "on-policy":
        args[5] = args[6] = None
    kw = dict(beta=0.04 if args[6] is not None else 0.0, epsilon_low=0.2, epsilon_high=0.28, temperature=temperature,
              loss_type=loss_type, max_completion_length=11, chunk_size=7)
    dh = _compare(args, kw)
    assert (to_torch(dh)[args[3] == 0] == 0).all()
    assert kernel_path("cross_entropy") == path


@pytest.mark.parametrize("path", PATHS)
def test_token_stats(path):
    """Log-probs (0 at ignored positions), entropies (no gradient) and the log-probs' gradients for a random
    cotangent, at temperature 0.7, chunks of 5; the flattened hidden states give the same."""
    hidden, weight, targets, mask, *_ = _inputs()
    hidden[mask == 0] /= 1e3
    targets = targets.masked_fill(mask == 0, -100)
    hr, wr = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    want_lp, want_ent = ref.token_stats(hr, wr, targets, 0.7)
    cot = torch.randn(targets.shape, dtype=torch.float64)
    gh, gw = torch.autograd.grad(want_lp, (hr, wr), cot)
    tm = to_mx(targets)

    def f(a, b):
        lp, ent = token_stats(a, b, tm, 0.7, chunk_size=5)
        return lp, ent

    (lp, ent), (dh, dw) = mx.vjp(f, [to_mx(hidden), to_mx(weight)], [to_mx(cot), mx.ones(targets.shape)])
    assert lp.dtype == ent.dtype == mx.float32
    assert_close(to_torch(lp), want_lp.detach(), what="logps")
    assert_close(to_torch(ent), want_ent, what="entropy")
    assert_close(to_torch(dh), gh, what="d_hidden (the entropy's cotangent ignored)")
    assert_close(to_torch(dw), gw, what="d_weight")
    flat = token_logps(to_mx(hidden).reshape(-1, 16), to_mx(weight), tm, 0.7, chunk_size=5)
    assert_close(to_torch(flat), want_lp.detach(), what="flattened hidden")


def test_grpo_loss_gradients_are_torchs():
    """`grpo_loss` alone on log-probs whose ratios fall inside the clip range, below and above it (with advantages of
    both signs), exactly on its bounds (a tie of the minimum), and past the log-ratio clamp (+-50, 1e4, -inf): its
    values and the gradient of the log-probs equal the reference's (``torch.minimum`` splits a tie, ``torch.clamp``
    passes its bounds)."""
    torch.manual_seed(3)
    n, t = 4, 12
    logps = -torch.rand(n, t, dtype=torch.float64) * 5
    shift = torch.tensor([0.0, 0.1, -0.1, 0.5, -0.5, math.log(1.28), math.log(0.8), 50.0, -50.0, 1e4, -1e4, 0.02])
    old = logps - shift.double()
    old[0, 9] = -math.inf
    refl = logps + torch.linspace(-45, 45, t, dtype=torch.float64)
    mask = torch.ones(n, t, dtype=torch.int64)
    mask[3, 6:] = 0
    adv = torch.tensor([1.0, -1.0, 0.5, -2.0], dtype=torch.float64)
    for loss_type in ref.LOSS_TYPES:
        kw = dict(beta=0.04, epsilon_low=0.2, epsilon_high=0.28, loss_type=loss_type, max_completion_length=16)
        lr = logps.clone().requires_grad_()
        want = ref.grpo_loss(lr, mask, adv, old, refl, **kw)
        (g,) = torch.autograd.grad(want[0], lr)
        args = [to_mx(x.float()) for x in (mask, adv, old, refl)]
        outs, (dl,) = mx.vjp(lambda x, args=args, kw=kw: grpo_loss(x, *args, **kw)[:1], [to_mx(logps.float())],
                             [mx.array(1.0)])
        full = grpo_loss(to_mx(logps.float()), *args, **kw)
        for name, o, r in zip(("loss", *ref.METRICS[:4]), full, want, strict=True):
            assert math.isfinite(o.item())
            assert_close(to_torch(o), r.detach(), what=f"{loss_type}: {name}")
        assert_close(to_torch(dl), g, what=f"{loss_type}: d_logps")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)],
                         ids=["bf16", "bf16-hidden-fp32-head"])
def test_low_precision(path, dtypes):
    """bfloat16 hidden states against a bfloat16 head or a float32 one: float32 outputs, gradients in each input's
    dtype, within the bfloat16 bound of the float64 reference on the same (rounded) values."""
    hidden, weight, targets, mask, adv, old, refl = _inputs()
    hidden[mask == 0] /= 1e3
    h, w = hidden.to(dtypes[0]), weight.to(dtypes[1])
    hr, wr = h.double().requires_grad_(), w.double().requires_grad_()
    kw = dict(beta=0.04, temperature=0.7, chunk_size=16)
    want = ref.grpo(hr, wr, targets, mask, adv, old, refl, **kw)
    gh, gw = torch.autograd.grad(want[0], (hr, wr))
    tm, mm, am, om, rm = to_mx(targets), to_mx(mask), to_mx(adv.float()), to_mx(old.float()), to_mx(refl.float())
    outs, (dh, dw) = mx.vjp(lambda a, b: grpo(a, b, tm, mm, am, om, rm, **kw), [to_mx(h), to_mx(w)],
                            [mx.array(1.0)] + [mx.array(0.0)] * 5)
    assert all(o.dtype == mx.float32 for o in outs)
    assert dh.dtype == mx.bfloat16 and dw.dtype == to_mx(w).dtype
    for name, o, r in zip(("loss", *ref.METRICS), outs, want, strict=True):
        assert_close(to_torch(o), r.detach(), torch.bfloat16, what=name)
    assert_close(to_torch(dh), gh, torch.bfloat16, what="d_hidden")
    assert_close(to_torch(dw), gw, torch.bfloat16, what="d_weight")


def test_no_completion_token_and_minus_inf_logits():
    """An all-zero mask: six zeros (not 0 / 0) and zero gradients; vocabulary rows whose logit is -inf (weight rows
    of -1e38 against features of 1) count 0 and change nothing."""
    hidden, weight, targets, mask, adv, old, refl = (to_mx(x.float()) if x.is_floating_point() else to_mx(x)
                                                     for x in _inputs())
    zero = mx.zeros_like(mask)
    outs, grads = mx.vjp(lambda a, b: grpo(a, b, targets, zero, adv, old, refl, beta=0.04, chunk_size=5),
                         [hidden, weight], [mx.array(1.0)] + [mx.array(0.0)] * 5)
    assert [o.item() for o in outs] == [0.0] * 6
    assert not mx.any(grads[0]).item() and not mx.any(grads[1]).item()
    h, w, tg, m, a, o, r = _inputs(v=40)
    h[m == 0] /= 1e3
    h[..., :4] = 1.0
    w[[3, 17]] = 0.0
    w[[3, 17], :4] = -1e38
    tg[torch.isin(tg, torch.tensor([3, 17]))] = 5
    assert torch.isinf(h.float()[0, :1] @ w.float().T).any()
    _compare([h, w, tg, m, a, o, r], dict(beta=0.04, temperature=0.7, loss_type="grpo", chunk_size=6))


@pytest.mark.skipif(sys.platform != "linux", reason="the Metal emulation needs Linux and g++")
def test_metal_path_under_the_emulation(monkeypatch):
    """The Metal path (the cross-entropy kernels in the VJP, run by the CPU emulation of tests/metal_emulation)
    gives the pure-MLX path's loss and gradients, and its self-check passes."""
    from runtime_mlx.kernels import launch
    from tests.metal_emulation import driver

    if driver.find_cxx() is None:
        pytest.skip("the Metal emulation needs g++")
    hidden, weight, targets, mask, adv, old, refl = (to_mx(x.float()) if x.is_floating_point() else to_mx(x)
                                                     for x in _inputs(n=2, t=7, v=700))

    def run():
        return mx.vjp(lambda a, b: grpo(a, b, targets, mask, adv, old, refl, beta=0.04, chunk_size=5)[0],
                      [hidden, weight], [mx.array(1.0)])

    plain = run()
    monkeypatch.setattr(launch, "metal_available", lambda: True)
    monkeypatch.setattr(launch, "run_metal", driver.runner(7))
    launch.reset_checks()
    try:
        metal = run()
        assert kernel_path("cross_entropy") == "metal" and launch.fallbacks() == {}
    finally:
        launch.reset_checks()
    for name, a, b in (("loss", metal[0][0], plain[0][0]), ("d_hidden", metal[1][0], plain[1][0]),
                       ("d_weight", metal[1][1], plain[1][1])):
        assert_close(to_torch(a), to_torch(b).double(), what=name)


def test_bad_arguments():
    hidden, weight = mx.zeros((3, 5, 8)), mx.zeros((11, 8))
    tg, m, a = mx.zeros((3, 5), dtype=mx.int32), mx.ones((3, 5), dtype=mx.int32), mx.zeros((3,))
    with pytest.raises(ValueError, match="loss_type"):
        grpo(hidden, weight, tg, m, a, loss_type="cispo")
    with pytest.raises(ValueError, match="beta > 0 needs ref_logps"):
        grpo(hidden, weight, tg, m, a, beta=0.1)
    with pytest.raises(ValueError, match="max_completion_length"):
        grpo(hidden, weight, tg, m, a, loss_type="dr_grpo")
    with pytest.raises(ValueError, match="epsilon_low"):
        grpo(hidden, weight, tg, m, a, epsilon_low=2.0)
    with pytest.raises(ValueError, match="temperature"):
        grpo(hidden, weight, tg, m, a, temperature=0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        grpo(hidden, weight, tg, m, a, chunk_size=0)
    with pytest.raises(ValueError, match="expected hidden"):
        grpo(hidden, mx.zeros((11, 9)), tg, m, a)
    with pytest.raises(ValueError, match="expected hidden"):
        grpo(hidden, weight, tg[:, :4], m, a)
    with pytest.raises(ValueError, match="completion_mask"):
        grpo(hidden, weight, tg, m[:, :4], a)
    with pytest.raises(ValueError, match="advantages"):
        grpo(hidden, weight, tg, m, mx.zeros((2,)))
    with pytest.raises(ValueError, match="old_logps"):
        grpo(hidden, weight, tg, m, a, old_logps=mx.zeros((3, 4)))
    with pytest.raises(TypeError, match="targets"):
        grpo(hidden, weight, tg.astype(mx.float32), m, a)
    with pytest.raises(TypeError, match="hidden"):
        grpo(hidden.astype(mx.int32), weight, tg, m, a)
    with pytest.raises(ValueError, match="at least one sequence"):
        token_logps(hidden[:0], weight, tg[:0])
