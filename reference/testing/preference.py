"""The `preference` op spec: the DPO family (``sigmoid``/cDPO, ``hinge``, ``ipo``) fused with the LM head,
``(loss, chosen_logps, rejected_logps)`` and the gradients of ``hidden`` and ``weight``.

The signature a candidate must take is ``(hidden, weight, targets, ref_chosen_logps, ref_rejected_logps, beta,
loss_type, label_smoothing, ignore_index)``, in this order; the reference, the Triton kernel and the MLX op also
take ``chunk_size`` next (not required of a candidate). hidden is (2B, T, H) with the B chosen sequences first and
the B rejected ones after (Liger's layout), targets (2B, T) already aligned with hidden. The three outputs are
float32 whatever the inputs' dtype, and each carries a gradient (a random cotangent for each in the backward
check); the reference log-probs are float32 inputs that stay float32 (``keep``) and never get a gradient.
Vocabularies and sequence lengths are never a multiple of a chunk or block (one vocabulary spans two 4,096-wide
blocks); samples cover every ``loss_type``, ``label_smoothing`` > 0, prompt and padding positions ignored, a
sequence with no completion token, a batch with none, logits of std 200 and a vocabulary entry whose logit is
-inf in float32 (a weight row of -1e38 against constant features; finite, -4e38, in the float64 reference).
"""

from __future__ import annotations

import torch

from reference.preference import preference as preference_reference
from reference.preference import sequence_logps

from .shapes import V2_LITE, V3
from .spec import OpSpec, Output, Sample, randint, randn

PARAMS = ("hidden", "weight", "targets", "ref_chosen_logps", "ref_rejected_logps", "beta", "loss_type",
          "label_smoothing", "ignore_index")
KEEP = ("ref_chosen_logps", "ref_rejected_logps")


def _inputs(rng, pairs: int, t: int, h: int, v: int, prompt: int = 0, pad: int = 0, logit_scale: float = 1.0):
    """hidden (2*pairs, t, h), weight (v, h) giving logits of about ``logit_scale`` std, targets (2*pairs, t) with
    the first ``prompt`` positions ignored and the last ``pad`` positions of every other row (padding)."""
    hidden = randn(rng, 2 * pairs, t, h)
    weight = randn(rng, v, h, scale=logit_scale / h**0.5)
    targets = randint(rng, 0, v, 2 * pairs, t)
    targets[:, :prompt] = -100
    if pad:
        targets[1::2, t - pad:] = -100
    return hidden, weight, targets


def _ref_logps(rng, hidden, weight, targets, average: bool, ignore_index: int = -100, noise: float = 0.3):
    """The frozen reference model's log-probs: `sequence_logps` of the policy with a perturbed head, float32."""
    with torch.no_grad():
        ref_weight = weight + randn(rng, *weight.shape, scale=noise / weight.shape[1] ** 0.5)
        logps = sequence_logps(hidden, ref_weight, targets, ignore_index, average=average)
    pairs = hidden.shape[0] // 2
    return logps[:pairs].clone(), logps[pairs:].clone()


def _sample(rng, name, hidden, weight, targets, beta=0.1, loss_type="sigmoid", label_smoothing=0.0,
            ignore_index=-100, tags=(), dtypes=None, shape=None) -> Sample:
    ref_c, ref_r = _ref_logps(rng, hidden, weight, targets, loss_type == "ipo", ignore_index)
    return Sample(name, (hidden, weight, targets, ref_c, ref_r, beta, loss_type, label_smoothing, ignore_index),
                  keep=KEEP, tags=tags, dtypes=dtypes, shape=shape)


def _minus_inf(rng, pairs: int, t: int, h: int, v: int, rows=(5, 77)):
    """Inputs where the vocabulary entries ``rows`` have a logit of -inf in float32: hidden's first 4 features are
    1 and those weight rows hold -1e38 there (0 elsewhere), so each logit is -4e38; no target is one of them."""
    hidden, weight, targets = _inputs(rng, pairs, t, h, v, prompt=2)
    hidden[..., :4] = 1.0
    weight[list(rows)] = 0.0
    weight[list(rows), :4] = -1e38
    for r in rows:
        targets = torch.where(targets == r, r + 1, targets)
    return hidden, weight, targets


def samples(rng: torch.Generator) -> list[Sample]:
    """The battery's samples of `preference`, seeded by ``rng`` (`OpSpec.samples`)."""
    out = []
    # 3 pairs of 13 tokens, a vocabulary of 300: a 3-token prompt ignored, padding at the end of odd rows.
    h, w, t = _inputs(rng, 3, 13, 24, 300, prompt=3, pad=4, logit_scale=2.0)
    for loss_type, beta, ls in (("sigmoid", 0.1, 0.0), ("hinge", 0.05, 0.0), ("ipo", 0.5, 0.0), ("sigmoid", 0.2, 0.2)):
        smooth = f", label_smoothing {ls}" if ls else ""
        out.append(_sample(rng, f"ragged 3 pairs T=13 V=300, prompt and padding ignored, {loss_type} beta {beta}"
                                f"{smooth}", h, w, t, beta, loss_type, ls, tags=("ragged",)))
    h, w, t = _inputs(rng, 2, 9, 16, 4100)
    t[t == 3] = 4
    t[:, 0] = 3  # an ignore_index inside the vocabulary: only the prompt position and one more hold it
    t[0, 5] = 3
    out.append(_sample(rng, "V=4100 (over 4096), ignore_index=3, sigmoid", h, w, t, 0.1, "sigmoid", 0.0, 3,
                       tags=("ragged",)))
    h, w, t = _inputs(rng, 2, 11, 16, 301, prompt=2)
    t[3] = -100  # the second pair's rejected sequence has no completion token
    for loss_type in ("sigmoid", "ipo"):
        out.append(_sample(rng, f"a sequence with no completion token, {loss_type}", h, w, t, 0.1, loss_type,
                           tags=("edge",)))
    h, w, _ = _inputs(rng, 2, 5, 16, 50)
    out.append(_sample(rng, "all targets ignored, hinge", h, w, torch.full((4, 5), -100), 0.1, "hinge",
                       tags=("edge",)))
    h, w, t = _inputs(rng, 2, 7, 32, 257, prompt=2, logit_scale=200.0)
    out.append(_sample(rng, "large logits (std 200), sigmoid beta 0.001", h, w, t, 0.001, "sigmoid",
                       tags=("edge",)))
    h, w, t = _minus_inf(rng, 2, 9, 16, 130)
    out.append(_sample(rng, "-inf logits (two vocabulary rows), sigmoid label_smoothing 0.1", h, w, t, 0.1,
                       "sigmoid", 0.1, tags=("edge",), dtypes=(torch.float32, torch.bfloat16)))
    h, w, t = _inputs(rng, 1, 1, 64, 1000)
    out.append(_sample(rng, "one pair of one token, sigmoid", h, w, t, 0.1, "sigmoid", tags=("decode",)))
    for m, vocab in [(V3, 1031), (V2_LITE, 2053)]:
        hs = m["hidden_size"]
        h, w, t = _inputs(rng, 1, 3, hs, vocab, prompt=1, logit_scale=3.0)
        out.append(_sample(rng, f"{m['name']} LM head, hidden {hs}, vocab sliced to {vocab} of {m['vocab_size']}, "
                                f"1 pair of 3 tokens", h, w, t, 0.1, "sigmoid", tags=("model",),
                           shape=f"2x3x{hs}, {vocab}x{hs}"))
    return out


def bench_samples(rng: torch.Generator) -> list[Sample]:
    """The shapes ``dsfs bench`` times for `preference` (drawn without reading values: the reference log-probs are
    random), a small one first: 2 pairs of 128 tokens (a 32-token prompt ignored), hidden 256, vocabulary 4,096; and
    the realistic one: 2 pairs of 512 tokens (a 128-token prompt ignored), hidden 1024, vocabulary 32,000 (drawn
    first, so its values do not depend on the small one's)."""
    out = []
    for pairs, t, h, v in ((2, 512, 1024, 32000), (2, 128, 256, 4096)):
        hidden, weight, targets = _inputs(rng, pairs, t, h, v, prompt=t // 4, logit_scale=3.0)
        offset = 3000.0 * t / 512  # about the policy's summed log-probs of the completion tokens
        ref_c, ref_r = randn(rng, pairs, scale=10.0) - offset, randn(rng, pairs, scale=10.0) - offset
        out.append(Sample(f"{pairs}x2 sequences of {t} tokens, hidden {h}, vocab {v}, sigmoid",
                          (hidden, weight, targets, ref_c, ref_r, 0.1, "sigmoid", 0.0, -100), keep=KEEP,
                          shape=f"{2 * pairs}x{t}x{h}, {v}x{h}", tags=("model",)))
    return out[::-1]


def _flops(s: Sample, dtype: torch.dtype) -> float:
    (b, t, h), v = s.args[0].shape, s.args[1].shape[0]
    n = b * t
    return 2.0 * n * v * h + 4.0 * n * v  # the head's matmul; max, exp, sum and the target's logit per logit


def _bytes(s: Sample, dtype: torch.dtype) -> float:
    hidden, weight, targets, ref_c, ref_r = s.args[:5]
    return ((hidden.numel() + weight.numel()) * dtype.itemsize + targets.numel() * targets.element_size()
            + 4 * (ref_c.numel() + ref_r.numel()) + 4 * (1 + hidden.shape[0]))


def _torch_preference():
    """``F.linear`` then ``log_softmax`` on the whole (2B, T, V) logits in float32, the targets' log-probs summed
    (averaged for ipo) per sequence, then TRL's formulas; unfused."""
    import torch.nn.functional as F

    def f(hidden, weight, targets, ref_chosen_logps, ref_rejected_logps, beta=0.1, loss_type="sigmoid",
          label_smoothing=0.0, ignore_index=-100):
        logp = F.linear(hidden, weight).float().log_softmax(-1)
        mask = targets != ignore_index
        per_token = logp.gather(-1, targets.where(mask, 0)[..., None])[..., 0].where(mask, 0.0)
        logps = per_token.sum(-1)
        if loss_type == "ipo":
            logps = logps / mask.sum(-1).clamp(min=1)
        chosen, rejected = logps.chunk(2)
        logits = (chosen - rejected) - (ref_chosen_logps - ref_rejected_logps)
        if loss_type == "sigmoid":
            losses = (-F.logsigmoid(beta * logits) * (1 - label_smoothing)
                      - F.logsigmoid(-beta * logits) * label_smoothing)
        elif loss_type == "hinge":
            losses = torch.relu(1 - beta * logits)
        else:
            losses = (logits - 1 / (2 * beta)) ** 2
        return losses.mean(), chosen, rejected

    return f


SPEC = OpSpec(
    name="preference", reference=preference_reference, params=PARAMS,
    outputs=(Output("loss", dtype=torch.float32, grad=True), Output("chosen_logps", dtype=torch.float32, grad=True),
             Output("rejected_logps", dtype=torch.float32, grad=True)),
    grads=("hidden", "weight"), samples=samples, bench_samples=bench_samples, flops=_flops, bytes=_bytes,
    ours={"cuda": "kernels.triton.preference:preference", "mlx": "runtime_mlx.kernels.preference:preference"},
    builtin={"torch": _torch_preference},
    source="Rafailov et al. 2023 (DPO), Azar et al. 2023 (IPO), Mitchell 2023 (cDPO), Zhao et al. 2023 (SLiC "
           "hinge); TRL DPOTrainer and Liger-Kernel LigerFusedLinearDPOLoss",
)
