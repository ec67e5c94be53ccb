"""kernels/triton/grpo.py: the op's battery (`reference.testing.grpo`), and beyond the op spec: `token_stats` /
`token_logps` alone (log-probs, entropies and their gradients at temperatures 0.7 and 1.3, explicit chunk sizes,
ignored positions, a vocabulary over two 2048-wide blocks, -inf logits, a peaked distribution), every loss type
against the reference, bfloat16 and a bfloat16 hidden state against a float32 head (autocast's), no_grad, bad inputs.

The tests take 3 completions of 7 tokens (21 tokens in chunks of 5, the last one partial) and V = 300 (one masked
512-wide block, 4 tokens per program, the last program partly past its chunk) or V = 4100 (three 2048-wide blocks,
the last of 4 columns); outputs are poisoned (tests/cuda/conftest.py).
"""

import pytest
import torch

from kernels.triton.grpo import chunked_logps, grpo, token_logps, token_stats
from reference.grpo import LOSS_TYPES, METRICS
from reference.grpo import grpo as grpo_ref
from reference.grpo import token_stats as token_stats_ref
from reference.testing import assert_close
from reference.testing.pytest_plugin import cases, check_case
from tests.cuda.conftest import DEVICE


@pytest.mark.parametrize("case", cases("grpo"))
def test_battery(case):
    """The op's whole battery: every loss type, beta 0 and > 0, clip-higher, temperatures 0.7 to 1.3, old and
    reference log-probs given or not, ragged lengths and V (one over a 4096-wide block), masked garbage and NaN, no
    completion token, zero advantages, log-ratios past the clamp, log-probs near -1e4, -inf logits, DeepSeek-V3 and
    V2-Lite hidden sizes with the vocabulary sliced; float32, bfloat16, float16; the six outputs and the gradients of
    hidden and weight."""
    check_case(case, grpo, DEVICE.type)


def _inputs(n=3, t=7, h=16, v=300, dtype=torch.float32, weight_dtype=None):
    hidden = torch.randn(n, t, h, device=DEVICE).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, device=DEVICE) * 2 / h**0.5).to(weight_dtype or dtype).requires_grad_()
    targets = torch.randint(0, v, (n, t), device=DEVICE)
    mask = torch.ones(n, t, dtype=torch.int64, device=DEVICE)
    mask[1, 4:] = 0
    mask[-1, 2:] = 0
    return hidden, weight, targets, mask


def _f64(*xs):
    return [x.detach().double().requires_grad_() for x in xs]


@pytest.mark.parametrize("temperature", [0.7, 1.3])
@pytest.mark.parametrize("V", [300, 4100])
def test_token_stats_in_chunks_of_5(V, temperature):
    """Log-probs (0 at ignored positions) and entropies against the float64 reference, and the log-probs' gradients
    for a random cotangent."""
    hidden, weight, targets, mask = _inputs(n=2 if V > 2048 else 3, v=V)
    targets = targets.masked_fill(mask == 0, -100)
    logps, entropy = token_stats(hidden, weight, targets, temperature, chunk_size=5)
    assert logps.dtype == entropy.dtype == torch.float32 and logps.shape == targets.shape
    assert not entropy.requires_grad and (logps[mask == 0] == 0).all() and (entropy[mask == 0] == 0).all()
    h64, w64 = _f64(hidden, weight)
    ref_logps, ref_entropy = token_stats_ref(h64, w64, targets, temperature)
    assert_close(logps, ref_logps, what="logps")
    assert_close(entropy, ref_entropy, what="entropy")
    g = torch.randn_like(logps)
    got = torch.autograd.grad(logps, (hidden, weight), g)
    want = torch.autograd.grad(ref_logps, (h64, w64), g.double())
    for a, b, name in zip(got, want, ("dh", "dw"), strict=True):
        assert_close(a, b, what=name)
    flat = token_logps(hidden.detach().reshape(-1, 16), weight.detach(), targets, temperature, chunk_size=5)
    assert torch.equal(flat, logps.detach())


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_grpo_against_reference(loss_type):
    """Every loss type with old and reference log-probs (some ratios clipped on each side), beta 0.04, clip-higher,
    temperature 0.7, chunks of 5: the six outputs and the loss's gradients."""
    hidden, weight, targets, mask = _inputs()
    adv = torch.randn(3, device=DEVICE)
    with torch.no_grad():
        logps = token_logps(hidden, weight, targets, 0.7)
    old, ref = logps + 0.3 * torch.randn_like(logps), logps + 0.5 * torch.randn_like(logps)
    kw = dict(beta=0.04, epsilon_low=0.2, epsilon_high=0.28, temperature=0.7, loss_type=loss_type,
              max_completion_length=9)
    outs = grpo(hidden, weight, targets, mask, adv, old, ref, chunk_size=5, **kw)
    assert [o.shape for o in outs] == [()] * 6 and all(o.dtype == torch.float32 for o in outs)
    h64, w64 = _f64(hidden, weight)
    want = grpo_ref(h64, w64, targets, mask, adv.double(), old.double(), ref.double(), **kw)
    for name, a, b in zip(("loss", *METRICS), outs, want, strict=True):
        assert_close(a, b, what=name)
    for a, b, name in zip(torch.autograd.grad(outs[0], (hidden, weight)), torch.autograd.grad(want[0], (h64, w64)),
                          ("dh", "dw"), strict=True):
        assert_close(a, b, what=name)


@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float32], ids=["bf16", "bf16-hidden-fp32-head"])
def test_bfloat16_hidden(weight_dtype):
    """bfloat16 hidden states against a bfloat16 head, or a float32 one (the hidden states of a model under bf16
    autocast): float32 outputs, gradients in each input's dtype, within the bfloat16 bound of float64."""
    hidden, weight, targets, mask = _inputs(dtype=torch.bfloat16, weight_dtype=weight_dtype)
    adv = torch.randn(3, device=DEVICE)
    outs = grpo(hidden, weight, targets, mask, adv, chunk_size=4, temperature=0.7)
    h64, w64 = _f64(hidden, weight)
    want = grpo_ref(h64, w64, targets, mask, adv.double(), temperature=0.7)
    for name, a, b in zip(("loss", *METRICS), outs, want, strict=True):
        assert_close(a, b, torch.bfloat16, what=name)
    dh, dw = torch.autograd.grad(outs[0], (hidden, weight))
    assert dh.dtype == torch.bfloat16 and dw.dtype == weight_dtype
    for a, b in zip((dh, dw), torch.autograd.grad(want[0], (h64, w64)), strict=True):
        assert_close(a, b, torch.bfloat16)


def test_minus_inf_logits_and_a_peaked_row():
    """Logits of -inf (vocabulary rows 3 and 40: hidden's first 4 features 1, those weight rows -1e38 there) count 0
    in the log-sum-exp and the entropy, and no NaN is formed; a row whose likeliest logit leads by 20 keeps its
    entropy (about 1e-5) and that token's log-prob (about -1e-6) to float32's relative precision."""
    hidden, weight = torch.randn(6, 8, device=DEVICE), torch.randn(70, 8, device=DEVICE)
    hidden[:, :4] = 1.0
    weight[[3, 40]] = 0.0
    weight[[3, 40], :4] = -1e38
    targets = torch.randint(50, 70, (6,), device=DEVICE)
    targets[2] = -100
    z = torch.randn(5, 70, device=DEVICE)  # the peaked rows: the logits are the hidden states (an identity head)
    peak = torch.randint(0, 70, (5,), device=DEVICE)
    z[torch.arange(5), peak] = 20.0
    for h, w, t in ((hidden, weight, targets), (z, torch.eye(70, device=DEVICE), peak)):
        logps, entropy, lse = chunked_logps(h, w, t, 0.5)
        ref_logps, ref_entropy = token_stats_ref(h.double(), w.double(), t[None], 0.5)
        assert torch.isfinite(logps).all() and torch.isfinite(entropy).all() and torch.isfinite(lse).all()
        assert_close(logps, ref_logps[0], what="logps")
        assert_close(entropy, ref_entropy[0], what="entropy")
        assert_close(lse, (h.double() @ w.double().T / 0.5).logsumexp(-1), what="lse")
    assert entropy.max() < 1e-3 and logps.abs().max() < 1e-5


def test_no_grad_and_inputs_untouched():
    hidden, weight, targets, mask = _inputs()
    h0, w0, t0 = hidden.detach().clone(), weight.detach().clone(), targets.clone()
    adv = torch.randn(3, device=DEVICE)
    with torch.no_grad():
        outs = grpo(hidden, weight, targets, mask, adv, chunk_size=8)
    assert all(o.grad_fn is None for o in outs)
    want = grpo_ref(hidden.detach().double(), weight.detach().double(), targets, mask, adv.double())
    for a, b in zip(outs, want, strict=True):
        assert_close(a, b)
    assert torch.equal(hidden, h0) and torch.equal(weight, w0) and torch.equal(targets, t0)


def _call(h, w, t, m, **kw):
    return grpo(h, w, t, m, torch.zeros(3, device=DEVICE), **kw)


BAD = [
    ("loss-type", lambda h, w, t, m: _call(h, w, t, m, loss_type="sapo"), ValueError, "loss_type must be one of"),
    ("beta-without-ref", lambda h, w, t, m: _call(h, w, t, m, beta=0.1), ValueError, "beta > 0 needs ref_logps"),
    ("dr-grpo", lambda h, w, t, m: _call(h, w, t, m, loss_type="dr_grpo"), ValueError, "max_completion_length"),
    ("temperature", lambda h, w, t, m: _call(h, w, t, m, temperature=0.0), ValueError, "temperature must be"),
    ("targets-int32", lambda h, w, t, m: _call(h, w, t.int(), m), TypeError, "targets: expected dtype"),
    ("targets-range", lambda h, w, t, m: _call(h, w, t + 300, m), ValueError, r"\[0, 300\)"),
    ("hidden-shape", lambda h, w, t, m: _call(h[:, :-1], w, t, m), ValueError, "hidden: expected shape"),
    ("weight-shape", lambda h, w, t, m: _call(h, w[:, :-1], t, m), ValueError, "weight: expected shape"),
    ("mask-shape", lambda h, w, t, m: _call(h, w, t, m[:, :-1]), ValueError, "completion_mask must be"),
    ("advantages", lambda h, w, t, m: grpo(h, w, t, m, torch.zeros(2)), ValueError, "advantages must be"),
    ("hidden-int", lambda h, w, t, m: _call(h.long(), w, t, m), TypeError, "hidden: expected dtype"),
    ("chunk", lambda h, w, t, m: _call(h, w, t, m, chunk_size=0), ValueError, "chunk_size"),
]


@pytest.mark.parametrize("call,exc,match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_inputs_raise(call, exc, match):
    hidden, weight, targets, mask = _inputs()
    with pytest.raises(exc, match=match):
        call(hidden.detach(), weight.detach(), targets, mask)
