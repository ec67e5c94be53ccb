"""The `grpo` op spec: GRPO's clipped policy loss with the k3 KL penalty (``grpo``, ``bnpo``, ``dr_grpo``, ``dapo``)
fused with the LM head, ``(loss, kl, clip_ratio/low_mean, clip_ratio/high_mean, clip_ratio/region_mean, entropy)``
and the gradients of ``hidden`` and ``weight``.

The signature a candidate must take is ``(hidden, weight, targets, completion_mask, advantages, old_logps, ref_logps,
beta, epsilon_low, epsilon_high, temperature, loss_type, max_completion_length)``, in this order; the reference, the
Triton kernel and the MLX op also take ``chunk_size`` next (not required of a candidate). hidden is (N, T, H), targets
and completion_mask (N, T) (int64, 1 on completion tokens); advantages (N,), old_logps and ref_logps (N, T) or None
are float32 inputs that stay float32 (``keep``) and never get a gradient. The six outputs are float32 scalars
whatever the inputs' dtype; the loss carries a gradient (a random cotangent in the backward check), the metrics none.

Vocabularies and lengths are never a multiple of a chunk or block (one vocabulary spans two 4,096-wide blocks).
Samples cover every ``loss_type``, ``beta`` 0 and > 0, ``epsilon_high`` above ``epsilon_low``, temperatures 0.7, 1
and 1.3, old and reference log-probs given (drawn near the policy's, so some ratios clip on each side) or None,
completions of different lengths (padding masked), NaN and garbage hidden states at masked positions, a sequence
without completion token, a batch without any, zero advantages, log-ratios far past the clamp (old log-probs 50
nats off and -1e4, reference 40 nats off), log-probs near -1e4 (logits in the thousands whose runners-up trail by
at least 1,000 nats: every entropy exactly 0), and vocabulary entries whose logit is -inf in float32 (a weight row of
-1e38 against constant features; finite, -4e38, in the float64 reference).
"""

from __future__ import annotations

import math

import torch

from reference.grpo import grpo as grpo_reference
from reference.grpo import grpo_loss, token_logps

from .shapes import V2_LITE, V3
from .spec import OpSpec, Output, Sample, randint, randn

PARAMS = ("hidden", "weight", "targets", "completion_mask", "advantages", "old_logps", "ref_logps", "beta",
          "epsilon_low", "epsilon_high", "temperature", "loss_type", "max_completion_length")
KEEP = ("advantages", "old_logps", "ref_logps")


def _inputs(rng, n: int, t: int, h: int, v: int, lengths=None, logit_scale: float = 1.0):
    """hidden (n, t, h), weight (v, h) giving logits of about ``logit_scale`` std, targets (n, t), completion_mask
    (n, t) int64 with 1 on the first ``lengths[i]`` positions of row i (all of them by default), advantages (n,)."""
    hidden = randn(rng, n, t, h)
    weight = randn(rng, v, h, scale=logit_scale / h**0.5)
    targets = randint(rng, 0, v, n, t)
    mask = torch.ones(n, t, dtype=torch.int64)
    for i, length in enumerate(lengths or ()):
        mask[i, length:] = 0
    return hidden, weight, targets, mask, randn(rng, n)


def _near(rng, hidden, weight, targets, temperature, spread: float | None) -> torch.Tensor | None:
    """Log-probs near the policy's (its `token_logps` plus N(0, spread**2) noise), float32; None for no spread."""
    if spread is None:
        return None
    with torch.no_grad():
        logps = token_logps(hidden, weight, targets, temperature)
    return logps + randn(rng, *logps.shape, scale=spread)


def _sample(rng, name, x, old=0.3, ref=0.3, beta=0.04, eps=(0.2, 0.2), temperature=1.0, loss_type="dapo",
            max_completion_length=None, tags=(), dtypes=None, shape=None) -> Sample:
    """A sample of the policy inputs ``x`` (`_inputs`), old and reference log-probs `_near` the policy's with the
    spreads ``old`` and ``ref`` (None: not given)."""
    hidden, weight, targets, mask, adv = x
    old_logps = _near(rng, hidden, weight, targets, temperature, old)
    ref_logps = _near(rng, hidden, weight, targets, temperature, ref)
    return Sample(name, (hidden, weight, targets, mask, adv, old_logps, ref_logps, beta, *eps, temperature, loss_type,
                         max_completion_length), keep=KEEP, tags=tags, dtypes=dtypes, shape=shape)


def _huge_logits(rng, n: int, t: int, h: int, v: int):
    """Logits in the thousands: hidden's first feature is +-1..2, the weight's first column ``1000 * (j - v / 2)``
    and the rest tiny, so each token's runner-up trails its likeliest by >= 1,000 nats (entropy exactly 0) and the
    targets' log-probs reach about -1e4."""
    hidden, weight, targets, mask, adv = _inputs(rng, n, t, h, v)
    hidden[..., 0] = (1 + torch.rand(n, t, generator=rng)) * torch.where(torch.rand(n, t, generator=rng) < 0.5, -1, 1)
    weight.mul_(1e-4)
    weight[:, 0] = 1000.0 * (torch.arange(v) - v // 2)
    return hidden, weight, targets, mask, adv


def _minus_inf(rng, n: int, t: int, h: int, v: int, rows=(5, 77)):
    """Inputs where the vocabulary entries ``rows`` have a logit of -inf in float32: hidden's first 4 features are
    1 and those weight rows hold -1e38 there (0 elsewhere), so each logit is -4e38; no target is one of them."""
    hidden, weight, targets, mask, adv = _inputs(rng, n, t, h, v, lengths=(t, t - 3))
    hidden[..., :4] = 1.0
    weight[list(rows)] = 0.0
    weight[list(rows), :4] = -1e38
    for r in rows:
        targets = torch.where(targets == r, r + 1, targets)
    return hidden, weight, targets, mask, adv


def samples(rng: torch.Generator) -> list[Sample]:
    """The battery's samples of `grpo`, seeded by ``rng`` (`OpSpec.samples`)."""
    out = []
    # A group of 4 completions of 13, 9, 5 and 11 tokens (padding masked), a vocabulary of 300.
    x = _inputs(rng, 4, 13, 24, 300, lengths=(13, 9, 5, 11), logit_scale=2.0)
    for loss_type, beta, eps, temp, old, ref in (("grpo", 0.04, (0.2, 0.2), 1.0, 0.3, 0.3),
                                                 ("bnpo", 0.0, (0.2, 0.2), 1.0, 0.3, None),
                                                 ("dr_grpo", 0.04, (0.2, 0.28), 0.7, 0.3, 0.3),
                                                 ("dapo", 0.1, (0.2, 0.28), 1.3, None, 0.5),
                                                 ("dapo", 0.0, (0.2, 0.2), 1.0, None, None)):
        given = ", ".join(f"{k} {'given' if v is not None else 'None'}" for k, v in (("old", old), ("ref", ref)))
        out.append(_sample(rng, f"ragged 4x13 V=300, padding masked, {loss_type} beta {beta} epsilon {eps[0]}/"
                                f"{eps[1]} temperature {temp}, {given}", x, old, ref, beta, eps, temp, loss_type,
                           16 if loss_type == "dr_grpo" else None, tags=("ragged",)))
    x = _inputs(rng, 2, 5, 16, 4100, lengths=(5, 3))
    out.append(_sample(rng, "V=4100 (over 4096), grpo beta 0.04", x, loss_type="grpo", tags=("ragged",)))
    hidden, weight, targets, mask, adv = _inputs(rng, 3, 7, 16, 301, lengths=(7, 0, 4))
    hidden[mask == 0] *= 1e3  # garbage at masked positions, logits in the thousands
    targets[2, 4:] = -100  # any value outside the mask
    s = _sample(rng, "a sequence without completion token, garbage and NaN at masked positions, grpo",
                (hidden, weight, targets, mask, adv), loss_type="grpo", tags=("edge",))
    s.args[5][mask == 0] = float("nan")
    s.args[6][mask == 0] = float("nan")
    out.append(s)
    x = _inputs(rng, 2, 5, 16, 50)
    for loss_type in ("bnpo", "dr_grpo"):
        mask = torch.zeros_like(x[3])
        out.append(_sample(rng, f"no completion token at all, {loss_type} beta 0.04", (*x[:3], mask, x[4]),
                           loss_type=loss_type, max_completion_length=8, tags=("edge",)))
    x = _inputs(rng, 3, 6, 16, 97, lengths=(6, 4, 5))
    for beta in (0.0, 0.04):
        out.append(_sample(rng, f"zero advantages, dapo beta {beta}", (*x[:4], torch.zeros(3)), beta=beta,
                           tags=("edge",)))
    x = _inputs(rng, 3, 8, 16, 120, lengths=(8, 6, 7), logit_scale=2.0)
    s = _sample(rng, "log-ratios past the clamp (old 50 nats off and -1e4, reference 40 off), bnpo beta 0.04",
                x, loss_type="bnpo", tags=("edge",))
    sign = torch.where(torch.rand(3, 8, generator=rng) < 0.5, -1.0, 1.0)
    s.args[5].add_(50 * sign)
    s.args[5][1, :3] = -1e4
    s.args[6].add_(-40 * sign)
    out.append(s)
    x = _huge_logits(rng, 2, 7, 8, 13)
    s = _sample(rng, "log-probs near -1e4 (logits in the thousands), on-policy, reference 25 nats off, dapo beta 0.04",
                x, old=None, ref=0.0, tags=("edge",))
    s.args[6].add_(25 * torch.where(torch.rand(2, 7, generator=rng) < 0.5, -1.0, 1.0))
    out.append(s)
    x = _minus_inf(rng, 2, 9, 16, 130)
    out.append(_sample(rng, "-inf logits (two vocabulary rows), grpo beta 0.04 temperature 0.7", x, temperature=0.7,
                       loss_type="grpo", tags=("edge",), dtypes=(torch.float32, torch.bfloat16)))
    x = _inputs(rng, 1, 1, 64, 1000)
    out.append(_sample(rng, "one completion of one token, dapo, reference 1 nat off", x, ref=1.0, tags=("decode",)))
    # On-policy and beta 0 (TRL's defaults): the loss does not depend on the log-probs' values, whose float32 error
    # grows with the hidden size (MLX's CPU matmul: about 2e-5 at 7168), only its gradient on the softmax.
    for m, vocab in [(V3, 1031), (V2_LITE, 2053)]:
        hs = m["hidden_size"]
        x = _inputs(rng, 2, 3, hs, vocab, lengths=(3, 2), logit_scale=3.0)
        out.append(_sample(rng, f"{m['name']} LM head, hidden {hs}, vocab sliced to {vocab} of {m['vocab_size']}, "
                                f"2 completions of 3 tokens, on-policy dapo beta 0", x, old=None, ref=None, beta=0.0,
                           eps=(0.2, 0.28), tags=("model",), shape=f"2x3x{hs}, {vocab}x{hs}"))
    return out


def bench_samples(rng: torch.Generator) -> list[Sample]:
    """The shapes ``dsfs bench`` times for `grpo` (drawn without reading values: the old and reference log-probs are
    random), a small one first: 8 completions of 128 tokens, hidden 256, vocabulary 4,096; and the realistic one: 8
    completions of 512 tokens, hidden 1024, vocabulary 32,000 (drawn first, so its values do not depend on the small
    one's); dapo, beta 0.04, epsilon 0.2/0.28, old and reference log-probs given."""
    out = []
    for n, t, h, v in ((8, 512, 1024, 32000), (8, 128, 256, 4096)):
        hidden, weight, targets, mask, adv = _inputs(rng, n, t, h, v, logit_scale=3.0)
        mask[1::2, t // 2:] = 0  # half the completions end half way
        offset = math.log(v) + 4.5  # about minus the policy's log-probs (logits of std 3: lse ~ log V + 3**2 / 2)
        old, ref = randn(rng, n, t, scale=0.3) - offset, randn(rng, n, t, scale=0.3) - offset
        out.append(Sample(f"{n} completions of {t} tokens, hidden {h}, vocab {v}, dapo beta 0.04",
                          (hidden, weight, targets, mask, adv, old, ref, 0.04, 0.2, 0.28, 1.0, "dapo", None),
                          keep=KEEP, shape=f"{n}x{t}x{h}, {v}x{h}", tags=("model",)))
    return out[::-1]


def _flops(s: Sample, dtype: torch.dtype) -> float:
    (n, t, h), v = s.args[0].shape, s.args[1].shape[0]
    # the head's matmul; per logit about 7 for the temperature, max, exp, sum, and the entropy's product and sum
    return 2.0 * n * t * v * h + 7.0 * n * t * v


def _bytes(s: Sample, dtype: torch.dtype) -> float:
    hidden, weight, targets, mask, adv, old, ref = s.args[:7]
    tokens = sum(x.numel() * x.element_size() for x in (targets, mask, old, ref) if x is not None)
    return (hidden.numel() + weight.numel()) * dtype.itemsize + tokens + 4 * adv.numel() + 4 * 6


def _torch_grpo():
    """``F.linear`` then ``log_softmax`` on the whole (N, T, V) logits in float32 divided by the temperature, the
    targets' log-probs and the entropies, then TRL's loss lines (`reference.grpo.grpo_loss`); unfused."""
    import torch.nn.functional as F

    def f(hidden, weight, targets, completion_mask, advantages, old_logps=None, ref_logps=None, beta=0.0,
          epsilon_low=0.2, epsilon_high=0.2, temperature=1.0, loss_type="dapo", max_completion_length=None):
        logp = (F.linear(hidden, weight).float() / temperature).log_softmax(-1)
        valid = completion_mask != 0
        per_token = logp.gather(-1, targets.where(valid, 0)[..., None])[..., 0]
        entropy = -torch.where(logp > -float("inf"), logp.exp() * logp, 0.0).sum(-1)
        out = grpo_loss(per_token, completion_mask, advantages, old_logps, ref_logps, beta, epsilon_low, epsilon_high,
                        loss_type, max_completion_length)
        with torch.no_grad():
            return *out, torch.where(valid, entropy, 0.0).sum() / valid.sum().clamp(min=1)

    return f


SPEC = OpSpec(
    name="grpo", reference=grpo_reference, params=PARAMS,
    outputs=(Output("loss", dtype=torch.float32, grad=True), Output("kl", dtype=torch.float32),
             Output("clip_ratio/low_mean", dtype=torch.float32), Output("clip_ratio/high_mean", dtype=torch.float32),
             Output("clip_ratio/region_mean", dtype=torch.float32), Output("entropy", dtype=torch.float32)),
    grads=("hidden", "weight"), samples=samples, bench_samples=bench_samples, flops=_flops, bytes=_bytes,
    ours={"cuda": "kernels.triton.grpo:grpo", "mlx": "runtime_mlx.kernels.grpo:grpo"},
    builtin={"torch": _torch_grpo},
    source="Shao et al. 2024 (DeepSeekMath section 4.1, GRPO eq. 3, k3 KL eq. 4), Yu et al. 2025 (DAPO: clip-higher, "
           "token-level loss), Liu et al. 2025 (Dr. GRPO); TRL GRPOTrainer._compute_loss and Liger-Kernel "
           "LigerFusedLinearGRPOLoss",
)
