"""kernels/triton/distill.py: the op's battery (`reference.testing.distill`), and beyond the op spec: explicit chunk
sizes, beta 0 / between / 1 with temperatures 1 and 2, both gradient paths (the loss alone: the forward's saved
gradients; cotangents on soft_loss and hard_loss too: the pass run again), -inf logits in the kernel, a teacher of
another dtype, all-ignored targets, no_grad, the teacher getting no gradient, bad inputs.

The option tests take N = 13 tokens in chunks of 5 (the last one partial) and V = 300 (one masked 512-wide block, 4
tokens per program, the last program partly past its chunk), every third token ignored; V = 4100 spans three 2048-wide
blocks, the last of 4 columns. Outputs are poisoned (tests/cuda/conftest.py).
"""

import math

import pytest
import torch

from kernels.triton.distill import chunked_distill, distill, distill_logits
from reference.distill import distill as distill_ref
from reference.distill import soft_terms
from reference.testing import assert_close
from reference.testing.pytest_plugin import cases, check_case
from tests.cuda.conftest import DEVICE


@pytest.mark.parametrize("case", cases("distill"))
def test_battery(case):
    """The op's whole battery: ragged N and V (one over two 4096-wide blocks), beta 0, 0.25, 0.5 and 1, temperatures
    0.5, 1 and 2, several loss weightings, ignored tokens (all of them in one), another ignore_index, logits of std
    200, -inf logits in both models, a student of V2-Lite against a V3 teacher; float32, bfloat16, float16; the three
    losses and the gradients of student_hidden and student_weight for random cotangents of all three."""
    check_case(case, distill, DEVICE.type)


def _inputs(N=13, Hs=16, Ht=24, V=300, dtype=torch.float32, teacher_dtype=None, ignore_index=-100):
    sh = torch.randn(N, Hs, device=DEVICE).to(dtype).requires_grad_()
    sw = (torch.randn(V, Hs, device=DEVICE) * 2 / Hs**0.5).to(dtype).requires_grad_()
    th = torch.randn(N, Ht, device=DEVICE)
    th[:, :Hs] = sh.detach().float()  # the teacher sees what the student sees (correlated logits)
    tw = torch.randn(V, Ht, device=DEVICE) / Ht**0.5
    tw[:, :Hs] += sw.detach().float() * (Hs / Ht) ** 0.5
    td = teacher_dtype or dtype
    targets = torch.randint(0, V, (N,), device=DEVICE)
    targets[1::3] = ignore_index
    return sh, sw, th.to(td), tw.to(td), targets


def _compare(sh, sw, th, tw, targets, dtype, **kw):
    """Ours against the float64 reference: the three losses, then the gradients for the loss alone and for random
    cotangents of all three outputs."""
    outs = distill(sh, sw, th, tw, targets, **kw)
    assert all(o.dtype == torch.float32 and o.shape == () for o in outs)
    r64 = [x.detach().double() for x in (sh, sw, th, tw)]
    r64[0].requires_grad_()
    r64[1].requires_grad_()
    ref = distill_ref(*r64, targets, **kw)
    for name, o, r in zip(("loss", "soft_loss", "hard_loss"), outs, ref, strict=True):
        assert_close(o, r, dtype, what=name)
    cots = torch.randn(3, device=DEVICE)
    for pick in ([0], [0, 1, 2]):  # the loss alone (saved gradients), then all three (the pass again)
        got = torch.autograd.grad([outs[i] for i in pick], (sh, sw), [cots[i] for i in pick], retain_graph=True)
        want = torch.autograd.grad([ref[i] for i in pick], r64[:2], [cots[i].double() for i in pick],
                                   retain_graph=True)
        assert got[0].dtype == dtype and got[1].dtype == dtype
        assert_close(got[0], want[0], dtype, what=f"d_student_hidden, outputs {pick}")
        assert_close(got[1], want[1], dtype, what=f"d_student_weight, outputs {pick}")


@pytest.mark.parametrize("beta,temperature", [(0.0, 1.0), (0.0, 2.0), (0.5, 1.0), (0.5, 2.0), (0.25, 2.0),
                                              (1.0, 1.0), (1.0, 2.0)])
def test_against_reference_in_chunks_of_5(beta, temperature):
    x = _inputs()
    _compare(*x, torch.float32, beta=beta, temperature=temperature, weight_hard_loss=0.3, weight_soft_loss=0.7,
             chunk_size=5)


def test_vocab_over_two_blocks_and_another_ignore_index():
    x = _inputs(N=5, V=4100, ignore_index=7)
    _compare(*x, torch.float32, beta=1.0, temperature=2.0, ignore_index=7, chunk_size=2)


@pytest.mark.parametrize("teacher_dtype", [torch.bfloat16, torch.float32])
def test_bfloat16_student(teacher_dtype):
    x = _inputs(dtype=torch.bfloat16, teacher_dtype=teacher_dtype)
    _compare(*x, torch.bfloat16, beta=0.5, temperature=2.0, chunk_size=4)


def _logits_with_minus_inf(n=6, V=70):
    """Student and teacher logits (n, V) with -inf at columns 3 and 40 in both, at 10 in the teacher only and at 20 in
    the student only; targets on none of them, one ignored."""
    z, u = torch.randn(n, V, device=DEVICE) * 3, torch.randn(n, V, device=DEVICE) * 3
    z[:, [3, 40, 20]] = -math.inf
    u[:, [3, 40, 10]] = -math.inf
    targets = torch.randint(50, V, (n,), device=DEVICE)
    targets[2] = -100
    return z, u, targets


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_minus_inf_logits_count_zero(beta):
    """A probability of exactly 0 makes its terms 0 (never 0 * inf): -inf in both models, and in the one model whose
    zero probability keeps the divergence finite (the teacher at beta 0, the student at beta 1, either between)."""
    z, u, targets = _logits_with_minus_inf()
    if beta == 0.0:
        z[:, 20] = 0.5  # KL(p_t || p_s) is infinite where only the student is -inf
    if beta == 1.0:
        u[:, 10] = 0.5  # KL(p_s || p_t) is infinite where only the teacher is -inf
    T, ws, wh = 2.0, 0.6, 0.4
    scales = torch.tensor([ws, wh], device=DEVICE)
    soft, hard, grad = distill_logits(z, u, targets, scales, beta, T)
    z64 = z.double().requires_grad_()
    value, g_soft = soft_terms(z64 / T, u.double() / T, beta)
    valid = targets != -100
    hard_ref = torch.nn.functional.cross_entropy(z64, targets, reduction="none")
    assert torch.isfinite(soft).all() and torch.isfinite(hard).all() and torch.isfinite(grad).all()
    assert_close(soft, torch.where(valid, value, 0.0), what="soft")
    assert_close(hard, hard_ref.detach(), what="hard")
    g_hard = torch.autograd.grad(hard_ref.sum(), z64)[0]
    want = torch.where(valid[:, None], ws * g_soft / T + wh * g_hard, 0.0)
    assert_close(grad, want, what="d_logits")
    assert (grad[:, [3, 40]] == 0).all()


def test_all_ignored_no_grad_and_no_teacher_gradient():
    sh, sw, th, tw, targets = _inputs()
    th.requires_grad_()
    every = torch.full_like(targets, -100)
    outs = distill(sh, sw, th, tw, every, chunk_size=8)
    assert all(o.item() == 0 for o in outs)
    grads = torch.autograd.grad(outs, (sh, sw, th), [torch.ones(())] * 3, allow_unused=True)
    assert grads[2] is None  # the teacher never gets a gradient
    assert all(torch.isfinite(g).all() and (g == 0).all() for g in grads[:2])
    with torch.no_grad():
        outs = distill(sh, sw, th, tw, targets, beta=0.5, chunk_size=8)
    assert all(o.grad_fn is None for o in outs)
    ref = distill_ref(sh.detach().double(), sw.detach().double(), th.detach().double(), tw.double(), targets)
    for o, r in zip(outs, ref, strict=True):
        assert_close(o, r)
    soft, hard, dh, dw = chunked_distill(sh.detach(), sw.detach(), th.detach(), tw, targets, torch.ones(2),
                                         chunk_size=8, grad_weight=False)
    assert dw is None and dh.shape == sh.shape


def test_chunk_sizes_agree_and_saved_gradients_untouched():
    sh, sw, th, tw, targets = _inputs()
    h0, w0 = sh.detach().clone(), sw.detach().clone()
    base = distill(sh, sw, th, tw, targets)  # default chunk size
    g_base = torch.autograd.grad(base[0], (sh, sw))
    for chunk in (1, 64):
        outs = distill(sh, sw, th, tw, targets, chunk_size=chunk)
        for a, b in zip((*outs, *torch.autograd.grad(outs[0], (sh, sw))), (*base, *g_base), strict=True):
            assert_close(a, b)
    loss = distill(sh, sw, th, tw, targets)[0]
    first = torch.autograd.grad(loss * 0.5, (sh, sw), retain_graph=True)
    again = torch.autograd.grad(loss * 0.5, (sh, sw))  # the saved gradients were not scaled in place
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert torch.equal(sh, h0) and torch.equal(sw, w0)


BAD = [
    ("targets-int32", lambda a: distill(*a[:4], a[4].int()), TypeError, "targets: expected dtype"),
    ("targets-range", lambda a: distill(*a[:4], a[4].index_fill(0, torch.tensor([0]), 300)), ValueError,
     r"\[0, 300\) or ignore_index=-100, got 300"),
    ("teacher-vocab", lambda a: distill(a[0], a[1], a[2], a[3][:-1].contiguous(), a[4]), ValueError,
     "teacher_weight: expected shape"),
    ("teacher-tokens", lambda a: distill(a[0], a[1], a[2][:-1].contiguous(), a[3], a[4]), ValueError,
     "teacher_hidden: expected shape"),
    ("student-dtype", lambda a: distill(a[0], a[1].half(), *a[2:]), TypeError, "student_weight: expected dtype"),
    ("strided", lambda a: distill(a[0].t().contiguous().t(), *a[1:]), ValueError, "contiguous"),
    ("beta", lambda a: distill(*a, beta=1.5), ValueError, r"beta must be a finite number in \[0.0, 1.0\]"),
    ("temperature", lambda a: distill(*a, temperature=0.0), ValueError, "temperature must be a finite number > 0"),
    ("weight", lambda a: distill(*a, weight_soft_loss=float("nan")), ValueError, "weight_soft_loss"),
    ("chunk", lambda a: distill(*a, chunk_size=0), ValueError, "chunk_size"),
]


@pytest.mark.parametrize("call,exc,match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_inputs_raise(call, exc, match):
    args = [x.detach() for x in _inputs()]
    with pytest.raises(exc, match=match):
        call(args)
