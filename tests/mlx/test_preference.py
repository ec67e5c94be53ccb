"""`runtime_mlx.kernels.preference` (the DPO family fused with the LM head, chunked over tokens): the op's battery
(`reference.testing.preference`) on every path; beyond the op spec, explicit chunk sizes (chunks that cross
sequences, a partial last one), every ``loss_type`` with and without ``label_smoothing``, `sequence_logps` (summed
and averaged, a sequence without completion tokens), `preference_loss` alone (large margins stay finite, no
gradient to the reference log-probs), padding positions with huge hidden states, bfloat16, and argument errors.
Everything against `reference.preference` in float64."""

from __future__ import annotations

import mlx.core as mx
import pytest
import torch

from reference import preference as ref
from reference.testing import assert_close
from reference.testing.pytest_plugin import cases, check_case
from runtime_mlx.kernels import kernel_path, preference, preference_loss, sequence_logps
from tests.mlx.utils import PATHS, to_mx, to_torch


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", cases("preference"))
def test_battery(path, case):
    """The op's battery on `runtime_mlx.kernels.preference` (int64 targets, as the battery passes them), its
    per-chunk `cross_entropy` on the path ``path`` (pure MLX, or Metal)."""
    check_case(case, preference, "mlx")
    assert kernel_path("cross_entropy") == path


def _inputs(pairs=3, t=11, h=16, v=301):
    """hidden (2*pairs, t, h) float64, weight (v, h), targets with a 3-token prompt ignored, padding (the last 4
    positions of odd rows) whose hidden states are huge (std 1e3: logits in the thousands), and the second pair's
    rejected sequence without any completion token."""
    torch.manual_seed(0)
    hidden, weight = torch.randn(2 * pairs, t, h, dtype=torch.float64), torch.randn(v, h, dtype=torch.float64) * 0.4
    targets = torch.randint(0, v, (2 * pairs, t))
    targets[:, :3] = -100
    targets[1::2, t - 4:] = -100
    hidden[1::2, t - 4:] *= 1e3
    targets[pairs + 1] = -100
    return hidden, weight, targets


def _ref_logps(hidden, weight, targets, average):
    with torch.no_grad():
        logps = ref.sequence_logps(hidden, weight + 0.05 * torch.randn_like(weight), targets, average=average)
    pairs = hidden.shape[0] // 2
    return logps[:pairs], logps[pairs:]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("loss_type,beta,label_smoothing", [("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.2),
                                                            ("hinge", 0.05, 0.0), ("ipo", 0.5, 0.0)])
def test_matches_reference(path, loss_type, beta, label_smoothing):
    """3 pairs of 11 tokens in chunks of 7 (66 tokens: chunks cross sequences, the last one partial); loss, both
    log-probs and the gradients of hidden and weight for random cotangents of all three outputs."""
    hidden, weight, targets = _inputs()
    rc, rr = _ref_logps(hidden, weight, targets, loss_type == "ipo")
    kw = dict(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing, chunk_size=7)
    hr, wr = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    want = ref.preference(hr, wr, targets, rc, rr, **kw)
    cots = [torch.randn((), dtype=torch.float64), torch.randn(3, dtype=torch.float64),
            torch.randn(3, dtype=torch.float64)]
    gh, gw = torch.autograd.grad(want, (hr, wr), cots)

    tm, rcm, rrm = to_mx(targets), to_mx(rc), to_mx(rr)
    outs, (dh, dw) = mx.vjp(lambda a, b: preference(a, b, tm, rcm, rrm, **kw), [to_mx(hidden), to_mx(weight)],
                            [to_mx(c) for c in cots])
    assert kernel_path("cross_entropy") == path
    for name, o, r in zip(("loss", "chosen_logps", "rejected_logps"), outs, want, strict=True):
        assert o.dtype == mx.float32 and o.shape == tuple(r.shape)
        assert_close(to_torch(o), r.detach(), what=name)
    assert_close(to_torch(dh), gh, what="d_hidden")
    assert_close(to_torch(dw), gw, what="d_weight")
    assert to_torch(outs[2])[1].item() == 0.0  # no completion token: 0, not NaN (averaged or not)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("average", [False, True])
def test_sequence_logps(path, average):
    hidden, weight, targets = _inputs()
    hr, wr = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    want = ref.sequence_logps(hr, wr, targets, average=average, chunk_size=5)
    cot = torch.randn(6, dtype=torch.float64)
    gh, gw = torch.autograd.grad(want, (hr, wr), cot)
    tm = to_mx(targets.int())
    out, (dh, dw) = mx.vjp(lambda a, b: sequence_logps(a, b, tm, average=average, chunk_size=5),
                           [to_mx(hidden), to_mx(weight)], [to_mx(cot)])
    assert out[0].dtype == mx.float32 and out[0].shape == (6,)
    assert_close(to_torch(out[0]), want.detach(), what="logps")
    assert_close(to_torch(dh), gh, what="d_hidden")
    assert_close(to_torch(dw), gw, what="d_weight")
    assert to_torch(out[0])[4].item() == 0.0
    assert (to_torch(dh)[4] == 0).all()


@pytest.mark.parametrize("loss_type,label_smoothing", [("sigmoid", 0.0), ("sigmoid", 0.3), ("hinge", 0.0),
                                                       ("ipo", 0.0)])
def test_preference_loss(loss_type, label_smoothing):
    """The per-pair formula on (B,) log-probs, margins up to 1e4 (logsigmoid stays finite), against the
    reference's; the gradient reaches the policy's log-probs only."""
    torch.manual_seed(2)
    logps = [torch.randn(8, dtype=torch.float64) * s - 50 for s in (1e4, 1e2, 10, 10)]
    want = ref.preference_loss(*[x.requires_grad_() for x in logps], beta=0.2, loss_type=loss_type,
                               label_smoothing=label_smoothing)
    cot = torch.randn(8, dtype=torch.float64)
    g = torch.autograd.grad(want, logps[:2], cot)
    m = [to_mx(x.detach()) for x in logps]
    out, vjps = mx.vjp(lambda *a: preference_loss(*a, beta=0.2, loss_type=loss_type, label_smoothing=label_smoothing),
                       m, [to_mx(cot)])
    assert out[0].dtype == mx.float32
    assert_close(to_torch(out[0]), want.detach())
    assert_close(to_torch(vjps[0]), g[0], what="d_chosen")
    assert_close(to_torch(vjps[1]), g[1], what="d_rejected")
    assert not mx.any(vjps[2]).item() and not mx.any(vjps[3]).item(), "the reference log-probs got a gradient"


@pytest.mark.parametrize("path", PATHS)
def test_bfloat16(path):
    """bfloat16 hidden and weight (without the huge padding): float32 outputs, gradients in bfloat16, within the
    bfloat16 bound of the float64 reference on the same rounded inputs."""
    hidden, weight, targets = _inputs()
    hidden[1::2, -4:] /= 1e3
    hidden, weight = hidden.bfloat16(), weight.bfloat16()
    rc, rr = _ref_logps(hidden.double(), weight.double(), targets, False)
    hr, wr = hidden.double().requires_grad_(), weight.double().requires_grad_()
    want = ref.preference(hr, wr, targets, rc, rr, beta=0.1, chunk_size=16)
    cots = [torch.tensor(1.0, dtype=torch.float64), torch.randn(3, dtype=torch.float64),
            torch.randn(3, dtype=torch.float64)]
    gh, gw = torch.autograd.grad(want, (hr, wr), cots)
    tm, rcm, rrm = to_mx(targets), to_mx(rc), to_mx(rr)
    outs, (dh, dw) = mx.vjp(lambda a, b: preference(a, b, tm, rcm, rrm, beta=0.1, chunk_size=16),
                            [to_mx(hidden), to_mx(weight)], [to_mx(c) for c in cots])
    assert all(o.dtype == mx.float32 for o in outs) and dh.dtype == dw.dtype == mx.bfloat16
    for name, o, r in zip(("loss", "chosen_logps", "rejected_logps"), outs, want, strict=True):
        assert_close(to_torch(o), r.detach(), torch.bfloat16, what=name)
    assert_close(to_torch(dh), gh, torch.bfloat16, what="d_hidden")
    assert_close(to_torch(dw), gw, torch.bfloat16, what="d_weight")


def test_bad_arguments():
    hidden, weight = mx.zeros((4, 5, 8)), mx.zeros((11, 8))
    tg, r = mx.zeros((4, 5), dtype=mx.int32), mx.zeros((2,))
    with pytest.raises(ValueError, match="loss_type"):
        preference(hidden, weight, tg, r, r, loss_type="kto")
    with pytest.raises(ValueError, match="beta"):
        preference(hidden, weight, tg, r, r, beta=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        preference(hidden, weight, tg, r, r, label_smoothing=0.7)
    with pytest.raises(ValueError, match="2B rows"):
        preference(hidden[:3], weight, tg[:3], r, r)
    with pytest.raises(ValueError, match="ref_rejected_logps"):
        preference(hidden, weight, tg, r, mx.zeros((3,)))
    with pytest.raises(ValueError, match="chunk_size"):
        preference(hidden, weight, tg, r, r, chunk_size=0)
    with pytest.raises(ValueError, match="weight"):
        sequence_logps(hidden, mx.zeros((11, 9)), tg)
    with pytest.raises(ValueError, match="targets"):
        sequence_logps(hidden, weight, tg[:, :4])
    with pytest.raises(TypeError, match="targets"):
        sequence_logps(hidden, weight, tg.astype(mx.float32))
    with pytest.raises(TypeError, match="hidden"):
        sequence_logps(hidden.astype(mx.int32), weight, tg)
    with pytest.raises(ValueError, match="rejected_logps"):
        preference_loss(r, mx.zeros((3,)), r, r)
