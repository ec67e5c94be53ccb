"""kernels/triton/preference.py: the op's battery (`reference.testing.preference`), and beyond the op spec:
`sequence_logps` alone (sums and averages, explicit chunk sizes, a row with no completion token, ragged V, bfloat16,
a non-contiguous hidden), every loss type against the reference with random cotangents on all three outputs, no_grad,
bad inputs.

The tests take 2-3 pairs of T = 7 tokens (14-21 tokens in chunks of 5, the last one partial) and V = 300 (one masked
512-wide block, 8 tokens per program) or V = 4100 (over one 4096-wide block); outputs are poisoned
(tests/cuda/conftest.py).
"""

import pytest
import torch

from kernels.triton.preference import preference, sequence_logps
from reference.preference import preference as preference_ref
from reference.preference import sequence_logps as sequence_logps_ref
from reference.testing import assert_close
from reference.testing.pytest_plugin import cases, check_case
from tests.cuda.conftest import DEVICE


@pytest.mark.parametrize("case", cases("preference"))
def test_battery(case):
    """The op's whole battery: sigmoid, cDPO, hinge and ipo, ragged T and V (one over a 4096-wide block), prompt and
    padding ignored, another ignore_index, a sequence with no completion token, a batch with none, logits of std 200,
    -inf logits, DeepSeek-V3 and V2-Lite hidden sizes with the vocabulary sliced; float32, bfloat16, float16; the
    loss, both log-probs and the gradients of hidden and weight for random cotangents of all three."""
    check_case(case, preference, DEVICE.type)


def _inputs(rows=6, T=7, H=16, V=300, dtype=torch.float32):
    hidden = torch.randn(rows, T, H, device=DEVICE).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, device=DEVICE) * 2 / H**0.5).to(dtype).requires_grad_()
    targets = torch.randint(0, V, (rows, T), device=DEVICE)
    targets[:, :2] = -100  # a prompt
    targets[1::2, -2:] = -100  # padding
    targets[rows // 2 - 1] = -100  # the last chosen sequence has no completion token
    return hidden, weight, targets


def _grads(outs, ins, cots):
    return torch.autograd.grad(outs, ins, cots)


def _f64(*xs):
    return [x.detach().double().requires_grad_() for x in xs]


@pytest.mark.parametrize("average", [False, True])
@pytest.mark.parametrize("V", [300, 4100])
def test_sequence_logps_in_chunks_of_5(V, average):
    hidden, weight, targets = _inputs(rows=2 if V > 2048 else 6, V=V)
    out = sequence_logps(hidden, weight, targets, average=average, chunk_size=5)
    assert out.dtype == torch.float32 and out.shape == (hidden.shape[0],)
    h64, w64 = _f64(hidden, weight)
    ref = sequence_logps_ref(h64, w64, targets, average=average)
    assert_close(out, ref, what="logps")
    assert out[hidden.shape[0] // 2 - 1] == 0  # the row with no completion token: 0, not NaN
    g = torch.randn_like(out)
    for a, b, name in zip(_grads(out, (hidden, weight), g), _grads(ref, (h64, w64), g.double()), ("dh", "dw"),
                          strict=True):
        assert_close(a, b, what=name)


def test_sequence_logps_bfloat16_and_non_contiguous_hidden():
    hidden, weight, targets = _inputs(dtype=torch.bfloat16)
    out = sequence_logps(hidden, weight, targets, chunk_size=4)
    h64, w64 = _f64(hidden, weight)
    ref = sequence_logps_ref(h64, w64, targets)
    assert_close(out, ref, torch.bfloat16)
    g = torch.randn_like(out)
    dh, dw = _grads(out, (hidden, weight), g)
    assert dh.dtype == torch.bfloat16 and dw.dtype == torch.bfloat16
    for a, b in zip((dh, dw), _grads(ref, (h64, w64), g.double()), strict=True):
        assert_close(a, b, torch.bfloat16)
    wide = torch.randn(6, 9, 16, device=DEVICE)
    strided = wide[:, 1:8]  # (6, 7, 16), not contiguous
    assert_close(sequence_logps(strided, weight.detach().float(), targets, chunk_size=5),
                 sequence_logps_ref(strided.double(), weight.detach().double(), targets))


@pytest.mark.parametrize("loss_type,beta,label_smoothing", [("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.2),
                                                            ("hinge", 0.2, 0.0), ("ipo", 0.3, 0.0)])
def test_preference_against_reference(loss_type, beta, label_smoothing):
    hidden, weight, targets = _inputs()
    B = hidden.shape[0] // 2
    ref_c, ref_r = torch.randn(B, device=DEVICE) * 3, torch.randn(B, device=DEVICE) * 3
    kw = dict(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)
    outs = preference(hidden, weight, targets, ref_c, ref_r, chunk_size=5, **kw)
    assert [o.shape for o in outs] == [(), (B,), (B,)] and all(o.dtype == torch.float32 for o in outs)
    h64, w64 = _f64(hidden, weight)
    ref = preference_ref(h64, w64, targets, ref_c.double(), ref_r.double(), **kw)
    for name, o, r in zip(("loss", "chosen_logps", "rejected_logps"), outs, ref, strict=True):
        assert_close(o, r, what=name)
    cots = [torch.randn(o.shape, device=DEVICE) for o in outs]
    for a, b, name in zip(_grads(outs, (hidden, weight), cots), _grads(ref, (h64, w64), [c.double() for c in cots]),
                          ("dh", "dw"), strict=True):
        assert_close(a, b, what=name)


def test_no_grad_and_inputs_untouched():
    hidden, weight, targets = _inputs()
    h0, w0 = hidden.detach().clone(), weight.detach().clone()
    ref_c, ref_r = torch.randn(3, device=DEVICE), torch.randn(3, device=DEVICE)
    with torch.no_grad():
        outs = preference(hidden, weight, targets, ref_c, ref_r, chunk_size=8)
    assert all(o.grad_fn is None for o in outs)
    ref = preference_ref(hidden.detach().double(), weight.detach().double(), targets, ref_c.double(), ref_r.double())
    for o, r in zip(outs, ref, strict=True):
        assert_close(o, r)
    assert torch.equal(hidden, h0) and torch.equal(weight, w0)


def _call(h, w, t, **kw):
    return preference(h, w, t, torch.zeros(3), torch.zeros(3), **kw)


BAD = [
    ("odd-rows", lambda h, w, t: preference(h[:5], w, t[:5], torch.zeros(2), torch.zeros(2)), ValueError, "2B rows"),
    ("no-rows", lambda h, w, t: preference(h[:0], w, t[:0], torch.zeros(0), torch.zeros(0)), ValueError, "2B rows"),
    ("loss-type", lambda h, w, t: _call(h, w, t, loss_type="kto"), ValueError, "loss_type must be one of"),
    ("beta", lambda h, w, t: _call(h, w, t, beta=0.0), ValueError, "beta must be a positive finite number"),
    ("label-smoothing", lambda h, w, t: _call(h, w, t, label_smoothing=0.7), ValueError, "label_smoothing"),
    ("ref-shape", lambda h, w, t: preference(h, w, t, torch.zeros(6), torch.zeros(3)), ValueError,
     r"ref_chosen_logps: expected shape \(3,\)"),
    ("targets-int32", lambda h, w, t: _call(h, w, t.int()), TypeError, "targets: expected dtype"),
    ("targets-shape", lambda h, w, t: _call(h, w, t[:, :-1]), ValueError, "targets: expected shape"),
    ("targets-range", lambda h, w, t: _call(h, w, t.clamp(min=0) + 300), ValueError, r"\[0, 300\)"),
    ("weight-dtype", lambda h, w, t: _call(h, w.half(), t), TypeError, "weight: expected dtype"),
    ("hidden-2d", lambda h, w, t: sequence_logps(h[0], w, t), ValueError, "hidden: expected 3 dims"),
    ("chunk", lambda h, w, t: _call(h, w, t, chunk_size=0), ValueError, "chunk_size"),
]


@pytest.mark.parametrize("call,exc,match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_inputs_raise(call, exc, match):
    hidden, weight, targets = _inputs()
    with pytest.raises(exc, match=match):
        call(hidden.detach(), weight.detach(), targets)
