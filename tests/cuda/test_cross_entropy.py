"""kernels/triton/cross_entropy.py: the op's battery (`reference.testing.cross_entropy`), and beyond the op spec:
per-token weights and explicit chunk sizes, the saved gradients, all-ignored targets, no_grad, bad inputs.

The weighted tests take N = 21 tokens in chunks of 8 (the last one partial) and V = 300 (one masked 512-wide block,
8 tokens per program, the last program partly past its chunk), a quarter of the targets ignored; outputs are
poisoned (tests/cuda/conftest.py).
"""

import pytest
import torch

from kernels.triton.cross_entropy import chunked_cross_entropy, linear_cross_entropy
from reference.cross_entropy import linear_cross_entropy as linear_cross_entropy_ref
from reference.testing import assert_close
from reference.testing.pytest_plugin import cases, check_case
from tests.cuda.conftest import DEVICE


@pytest.mark.parametrize("case", cases("linear_cross_entropy"))
def test_battery(case):
    """The op's whole battery: ragged N and V (one over two 4096-wide blocks), ignored rows (all of them for "sum"
    and "none"), another ignore_index, large logits, one token, DeepSeek-V3 and V2-Lite hidden sizes with the
    vocabulary sliced; "mean", "sum", "none"; float32, bfloat16, float16; loss, dhidden, dweight."""
    check_case(case, linear_cross_entropy, DEVICE.type)


def _inputs(N=21, H=24, V=300, dtype=torch.float32, ignore_index=-100):
    hidden = torch.randn(N, H, device=DEVICE).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, device=DEVICE) / H**0.25).to(dtype).requires_grad_()
    targets = torch.randint(0, V, (N,), device=DEVICE)
    targets[1::4] = ignore_index
    return hidden, weight, targets


def _run(fn, hidden, weight, targets, g, **kw):
    out = fn(hidden, weight, targets, **kw)
    return (out, *torch.autograd.grad(out, (hidden, weight), g))


def _compare(hidden, weight, targets, dtype, **kw):
    out = linear_cross_entropy(hidden, weight, targets, **kw)
    assert out.dtype == torch.float32
    g = torch.randn_like(out)
    dh, dw = torch.autograd.grad(out, (hidden, weight), g)
    assert dh.dtype == dtype and dw.dtype == dtype
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    ref, dh64, dw64 = _run(linear_cross_entropy_ref, h64, w64, targets, g.double(), **kw)
    assert_close(out, ref, dtype, what="loss")
    assert_close(dh, dh64, dtype, what="d_hidden")
    assert_close(dw, dw64, dtype, what="d_weight")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_token_weights_in_chunks_of_8(reduction, dtype):
    """Options beyond the op's signature: per-token weights, and a chunk size that leaves the last chunk partial."""
    hidden, weight, targets = _inputs(dtype=dtype)
    tw = torch.rand(hidden.shape[0], device=DEVICE) + 0.5
    _compare(hidden, weight, targets, dtype, reduction=reduction, token_weights=tw, chunk_size=8)


def test_chunk_sizes_agree_and_saved_tensors_untouched():
    hidden, weight, targets = _inputs()
    h0, w0 = hidden.detach().clone(), weight.detach().clone()
    g = torch.tensor(0.7, device=DEVICE)
    base = _run(linear_cross_entropy, hidden, weight, targets, g)  # default chunk size
    for chunk in (1, 64):
        for a, b in zip(_run(linear_cross_entropy, hidden, weight, targets, g, chunk_size=chunk), base, strict=True):
            assert_close(a, b)
    out = linear_cross_entropy(hidden, weight, targets, reduction="sum")
    first = torch.autograd.grad(out, (hidden, weight), retain_graph=True)
    again = torch.autograd.grad(out, (hidden, weight))  # the saved gradients were not scaled in place
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert torch.equal(hidden, h0) and torch.equal(weight, w0)


def test_all_ignored_and_no_grad():
    hidden, weight, targets = _inputs()
    ignored = torch.full_like(targets, -100)
    assert linear_cross_entropy(hidden, weight, ignored).isnan()  # 0 / 0, as F.cross_entropy
    assert linear_cross_entropy(hidden, weight, ignored, reduction="sum") == 0
    with torch.no_grad():
        out = linear_cross_entropy(hidden, weight, targets)
    assert_close(out, linear_cross_entropy_ref(hidden.double(), weight.double(), targets))
    scale = torch.ones(hidden.shape[0], device=DEVICE)
    loss, dh, dw = chunked_cross_entropy(hidden.detach(), weight.detach(), targets, scale, grad_weight=False)
    assert dw is None and dh.shape == hidden.shape


BAD = [
    ("targets-int32", lambda h, w, t: linear_cross_entropy(h, w, t.int()), TypeError, "targets: expected dtype"),
    ("targets-range", lambda h, w, t: linear_cross_entropy(h, w, t.where(t != 0, 300)), ValueError, r"\[0, 300\)"),
    ("targets-negative", lambda h, w, t: linear_cross_entropy(h, w, t - 5), ValueError, "ignore_index=-100"),
    ("targets-shape", lambda h, w, t: linear_cross_entropy(h, w, t[:-1]), ValueError, r"targets: expected shape"),
    ("weight-H", lambda h, w, t: linear_cross_entropy(h, w[:, :-1].contiguous(), t), ValueError,
     "weight: expected shape"),
    ("weight-dtype", lambda h, w, t: linear_cross_entropy(h, w.half(), t), TypeError, "weight: expected dtype"),
    ("hidden-3d", lambda h, w, t: linear_cross_entropy(h[None], w, t), ValueError, "hidden: expected 2 dims"),
    ("hidden-strided", lambda h, w, t: linear_cross_entropy(h.t().contiguous().t(), w, t), ValueError,
     "contiguous"),
    ("reduction", lambda h, w, t: linear_cross_entropy(h, w, t, reduction="avg"), ValueError, "reduction"),
    ("chunk", lambda h, w, t: linear_cross_entropy(h, w, t, chunk_size=0), ValueError, "chunk_size"),
    ("token-weights", lambda h, w, t: linear_cross_entropy(h, w, t, token_weights=torch.ones(3)), ValueError,
     "token_weights: expected shape"),
]


@pytest.mark.parametrize("call,exc,match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_inputs_raise(call, exc, match):
    hidden, weight, targets = _inputs()
    with pytest.raises(exc, match=match):
        call(hidden.detach(), weight.detach(), targets)
