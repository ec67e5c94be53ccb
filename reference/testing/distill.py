"""The `distill` op spec: knowledge distillation (the generalized JSD of GKD, forward and reverse KL) fused with the
student's and the teacher's LM heads, ``(loss, soft_loss, hard_loss)`` and the gradients of ``student_hidden`` and
``student_weight``.

The signature a candidate must take is ``(student_hidden, student_weight, teacher_hidden, teacher_weight, targets,
beta, temperature, weight_hard_loss, weight_soft_loss, ignore_index)``, in this order; the reference, the Triton
kernel and the MLX op also take ``chunk_size`` next (not required of a candidate). The three outputs are float32
scalars whatever the inputs' dtype and each carries a gradient (a random cotangent for each in the backward check);
the teacher never gets one. Vocabularies are never a multiple of a chunk or block (one spans two 4,096-wide
blocks); samples cover beta 0 (forward KL), 0.5 and 1 (reverse KL) and another in between, temperatures 1 and 2,
several hard/soft weightings, ignored tokens, all targets ignored, logits of std 200, and two vocabulary entries
whose logits are -inf in float32 in both models (weight rows of -1e38 against constant features; finite, -4e38,
in the float64 reference), where every divergence term of those entries must count 0.
"""

from __future__ import annotations

import torch

from reference.distill import distill as distill_reference

from .shapes import V2_LITE, V3
from .spec import OpSpec, Output, Sample, randint, randn

PARAMS = ("student_hidden", "student_weight", "teacher_hidden", "teacher_weight", "targets", "beta", "temperature",
          "weight_hard_loss", "weight_soft_loss", "ignore_index")


def _inputs(rng, n: int, hs: int, ht: int, v: int, ignored=(), logit_scale: float = 1.0, ignore_index: int = -100):
    """student (n, hs) / (v, hs) and teacher (n, ht) / (v, ht) inputs giving logits of about ``logit_scale`` std,
    the teacher's correlated with the student's (its head shares a random projection of the student's), targets
    (n,) with rows ``ignored`` set to ``ignore_index``."""
    sh = randn(rng, n, hs)
    sw = randn(rng, v, hs, scale=logit_scale / hs**0.5)
    th = randn(rng, n, ht)
    th[:, :min(hs, ht)] = sh[:, :min(hs, ht)]  # the teacher sees what the student sees, and more
    tw = randn(rng, v, ht, scale=0.5 * logit_scale / ht**0.5)
    tw[:, :min(hs, ht)] += sw[:, :min(hs, ht)] * (hs / ht) ** 0.5
    targets = randint(rng, 0, v, n)
    if ignore_index >= 0:
        targets = torch.where(targets == ignore_index, (ignore_index + 1) % v, targets)
    targets[list(ignored)] = ignore_index
    return sh, sw, th, tw, targets


def _minus_inf(rng, n: int, hs: int, ht: int, v: int, rows=(3, 64)):
    """Both models give the vocabulary entries ``rows`` a logit of -inf in float32 (their hidden states' first 4
    features are 1 and those weight rows hold -1e38 there, 0 elsewhere: -4e38); no target is one of them."""
    sh, sw, th, tw, targets = _inputs(rng, n, hs, ht, v, ignored=(1,))
    for h, w in ((sh, sw), (th, tw)):
        h[:, :4] = 1.0
        w[list(rows)] = 0.0
        w[list(rows), :4] = -1e38
    for r in rows:
        targets = torch.where(targets == r, r + 1, targets)
    return sh, sw, th, tw, targets


def samples(rng: torch.Generator) -> list[Sample]:
    """The battery's samples of `distill`, seeded by ``rng`` (`OpSpec.samples`)."""
    out = []
    # 21 tokens, vocabulary 300, student 24 wide and teacher 40, every fourth token ignored.
    x = _inputs(rng, 21, 24, 40, 300, ignored=range(1, 21, 4), logit_scale=2.0)
    for beta, temp, wh, ws in ((0.5, 1.0, 0.5, 0.5), (0.0, 1.0, 0.5, 0.5), (1.0, 1.0, 0.5, 0.5), (0.5, 2.0, 0.2, 0.8),
                               (0.0, 2.0, 0.0, 1.0), (1.0, 0.5, 1.0, 0.3), (0.25, 1.0, 0.5, 0.5)):
        out.append(Sample(f"ragged N=21 V=300, 5 tokens ignored, beta {beta} temperature {temp} hard {wh} soft {ws}",
                          (*x, beta, temp, wh, ws, -100), tags=("ragged",)))
    x = _inputs(rng, 37, 16, 16, 301, ignored=(0, 5, 6, 36))
    out.append(Sample("ragged N=37 V=301, first and last tokens ignored, beta 0.5", (*x, 0.5, 1.0, 0.5, 0.5, -100),
                      tags=("ragged",)))
    x = _inputs(rng, 5, 8, 12, 4100, ignored=(2,), ignore_index=3)
    out.append(Sample("V=4100 (over 4096), ignore_index=3, beta 0.5 temperature 2", (*x, 0.5, 2.0, 0.5, 0.5, 3),
                      tags=("ragged",)))
    sh, sw, th, tw, _ = _inputs(rng, 6, 16, 24, 50)
    out.append(Sample("all targets ignored, beta 0.5", (sh, sw, th, tw, torch.full((6,), -100), 0.5, 1.0, 0.5, 0.5,
                                                        -100), tags=("edge",)))
    x = _inputs(rng, 9, 32, 48, 257, ignored=(4,), logit_scale=200.0)
    for beta in (0.0, 0.5, 1.0):
        out.append(Sample(f"large logits (std 200), beta {beta}", (*x, beta, 1.0, 0.5, 0.5, -100), tags=("edge",)))
    x = _minus_inf(rng, 11, 16, 24, 130)
    for beta in (0.0, 0.5, 1.0):
        out.append(Sample(f"-inf logits (two vocabulary rows in both models), beta {beta} temperature 2",
                          (*x, beta, 2.0, 0.5, 0.5, -100), tags=("edge",), dtypes=(torch.float32, torch.bfloat16)))
    x = _inputs(rng, 1, 64, 96, 1000)
    out.append(Sample("one token, beta 0.5", (*x, 0.5, 1.0, 0.5, 0.5, -100), tags=("decode",)))
    for student, teacher, vocab in [(V2_LITE, V3, 1031), (V2_LITE, V2_LITE, 2053)]:
        hs, ht = student["hidden_size"], teacher["hidden_size"]
        x = _inputs(rng, 4, hs, ht, vocab, ignored=(1,), logit_scale=3.0)
        out.append(Sample(f"{student['name']} student (hidden {hs}) of a {teacher['name']} teacher (hidden {ht}), "
                          f"vocab sliced to {vocab}, 4 tokens", (*x, 0.5, 1.0, 0.5, 0.5, -100),
                          shape=f"4x{hs}, {vocab}x{hs}; 4x{ht}, {vocab}x{ht}", tags=("model",)))
    return out


def bench_samples(rng: torch.Generator) -> list[Sample]:
    """The shapes ``dsfs bench`` times for `distill` (drawn without reading values), a small one first: 512 tokens,
    a student of hidden 256 and a teacher of hidden 512, vocabulary 4,096; and the realistic one: 4x1024 tokens, a
    student of hidden 1024 and a teacher of hidden 2048, vocabulary 32,000 (drawn first, so its values do not
    depend on the small one's)."""
    out = []
    for n, hs, ht, v in ((4 * 1024, 1024, 2048, 32000), (512, 256, 512, 4096)):
        x = _inputs(rng, n, hs, ht, v, logit_scale=3.0)
        out.append(Sample(f"{n} tokens, student hidden {hs}, teacher hidden {ht}, vocab {v}, beta 0.5",
                          (*x, 0.5, 1.0, 0.5, 0.5, -100), shape=f"{n}x{hs}, {v}x{hs}; {n}x{ht}, {v}x{ht}",
                          tags=("model",)))
    return out[::-1]


def _flops(s: Sample, dtype: torch.dtype) -> float:
    (n, hs), (_, ht), v = s.args[0].shape, s.args[2].shape, s.args[1].shape[0]
    # both heads' matmuls; per logit about 12 for the two softmaxes, the mixture, the divergences and the CE
    return 2.0 * n * v * (hs + ht) + 12.0 * n * v


def _bytes(s: Sample, dtype: torch.dtype) -> float:
    sh, sw, th, tw, targets = s.args[:5]
    return (sh.numel() + sw.numel() + th.numel() + tw.numel()) * dtype.itemsize + \
        targets.numel() * targets.element_size() + 3 * 4


def _torch_distill():
    """``F.linear`` of both heads on all N tokens, then the divergence on the whole (N, V) logits in float32 (TRL's
    ``generalized_jsd_loss`` with ``torch.xlogy``-style zero terms) and ``F.cross_entropy``; unfused."""
    import math

    import torch.nn.functional as F

    def kl(logp, logq):  # per row KL(p || q), 0 where p == 0
        p = logp.exp()
        return torch.where(p > 0, p * (logp - logq), 0.0).sum(-1)

    def f(student_hidden, student_weight, teacher_hidden, teacher_weight, targets, beta=0.5, temperature=1.0,
          weight_hard_loss=0.5, weight_soft_loss=0.5, ignore_index=-100):
        z = F.linear(student_hidden, student_weight).float()
        with torch.no_grad():
            zt = F.linear(teacher_hidden, teacher_weight).float()
        logp_s, logp_t = (z / temperature).log_softmax(-1), (zt / temperature).log_softmax(-1)
        if beta == 0:
            soft = kl(logp_t, logp_s)
        elif beta == 1:
            soft = kl(logp_s, logp_t)
        else:
            logm = torch.logaddexp(logp_s + math.log1p(-beta), logp_t + math.log(beta))
            soft = beta * kl(logp_t, logm) + (1 - beta) * kl(logp_s, logm)
        mask = targets != ignore_index
        denom = mask.sum().clamp(min=1)
        soft = soft.where(mask, 0.0).sum() / denom
        hard = F.cross_entropy(z, targets, ignore_index=ignore_index, reduction="sum") / denom
        return weight_hard_loss * hard + weight_soft_loss * soft, soft, hard

    return f


SPEC = OpSpec(
    name="distill", reference=distill_reference, params=PARAMS,
    outputs=(Output("loss", dtype=torch.float32, grad=True), Output("soft_loss", dtype=torch.float32, grad=True),
             Output("hard_loss", dtype=torch.float32, grad=True)),
    grads=("student_hidden", "student_weight"), samples=samples, bench_samples=bench_samples, flops=_flops,
    bytes=_bytes,
    ours={"cuda": "kernels.triton.distill:distill", "mlx": "runtime_mlx.kernels.distill:distill"},
    builtin={"torch": _torch_distill},
    source="Hinton et al. 2015 (distillation), Agarwal et al. 2024 (GKD, generalized JSD eq. 1); Liger-Kernel "
           "LigerFusedLinearJSDLoss and TRL GKDTrainer.generalized_jsd_loss",
)
