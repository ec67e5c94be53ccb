"""The `linear_cross_entropy` op spec: the LM head fused with cross-entropy, ``CE(hidden @ weight.T, targets)``
with ``F.cross_entropy``'s ``ignore_index`` and ``reduction``, forward and the gradients of ``hidden`` and
``weight``.

The signature a candidate must take is ``(hidden, weight, targets, ignore_index, reduction)``, in this order: the
first five parameters of the reference, the Triton kernel and the MLX op alike. All three also take
``token_weights`` and ``chunk_size`` next; those options are not required of a candidate and are left to each
implementation's own tests. The loss is float32 whatever
the inputs' dtype; the gradients are in the inputs' dtypes. Vocabularies are never a multiple of a chunk or
block (and one spans two 4,096-wide blocks), and every reduction is sampled with ignored rows.
"""

from __future__ import annotations

import torch

from reference.cross_entropy import linear_cross_entropy

from .shapes import V2_LITE, V3
from .spec import OpSpec, Output, Sample, randint, randn

PARAMS = ("hidden", "weight", "targets", "ignore_index", "reduction")


def _inputs(rng, n: int, h: int, v: int, ignored=(), ignore_index: int = -100, logit_scale: float = 1.0):
    """hidden (n, h), weight (v, h) giving logits of about ``logit_scale`` std, targets (n,) with rows ``ignored``
    set to ``ignore_index``."""
    hidden = randn(rng, n, h)
    weight = randn(rng, v, h, scale=logit_scale / h**0.5)
    targets = randint(rng, 0, v, n)
    if ignore_index >= 0:  # an ignore_index inside the vocabulary: only the chosen rows hold it
        targets = torch.where(targets == ignore_index, (ignore_index + 1) % v, targets)
    targets[list(ignored)] = ignore_index
    return hidden, weight, targets


def samples(rng: torch.Generator) -> list[Sample]:
    """The battery's samples of `linear_cross_entropy`, seeded by ``rng`` (`OpSpec.samples`)."""
    out = []
    # 21 tokens, a vocabulary of 300 (not a multiple of any chunk or block), every fourth row ignored.
    h, w, t = _inputs(rng, 21, 24, 300, ignored=range(1, 21, 4), logit_scale=2.0)
    for reduction in ("mean", "sum", "none"):
        out.append(Sample(f"ragged N=21 V=300, 5 rows ignored, {reduction}", (h, w, t, -100, reduction),
                          tags=("ragged",)))
    h, w, t = _inputs(rng, 37, 16, 301, ignored=(0, 5, 6, 36))
    out.append(Sample("ragged N=37 V=301, first and last rows ignored, mean", (h, w, t, -100, "mean"),
                      tags=("ragged",)))
    h, w, t = _inputs(rng, 5, 8, 4100, ignored=(2,), ignore_index=3)
    out.append(Sample("V=4100 (over 4096), ignore_index=3, mean", (h, w, t, 3, "mean"), tags=("ragged",)))
    h, w, _ = _inputs(rng, 6, 16, 50)
    every = torch.full((6,), -100)
    for reduction in ("sum", "none"):  # "mean" is 0/0 = NaN there, as F.cross_entropy
        out.append(Sample(f"all rows ignored, {reduction}", (h, w, every, -100, reduction), tags=("edge",)))
    h, w, t = _inputs(rng, 9, 32, 257, ignored=(4,), logit_scale=200.0)
    for reduction in ("mean", "none"):
        out.append(Sample(f"large logits (std 200), {reduction}", (h, w, t, -100, reduction), tags=("edge",)))
    h, w, t = _inputs(rng, 1, 64, 1000)
    out.append(Sample("one token, sum", (h, w, t, -100, "sum"), tags=("decode",)))
    for m, vocab in [(V3, 1031), (V2_LITE, 2053)]:
        hs = m["hidden_size"]
        h, w, t = _inputs(rng, 4, hs, vocab, ignored=(1,), logit_scale=3.0)
        out.append(Sample(f"{m['name']} LM head, hidden {hs}, vocab sliced to {vocab} of {m['vocab_size']}, 4 tokens",
                          (h, w, t, -100, "mean"), shape=f"{4}x{hs}, {vocab}x{hs}", tags=("model",)))
    return out


def bench_samples(rng: torch.Generator) -> list[Sample]:
    """The shapes ``dsfs bench`` times for `linear_cross_entropy` (`OpSpec.bench_samples`)."""
    n = 4096
    out = []
    for m in (V3, V2_LITE):
        hs, vocab = m["hidden_size"], m["vocab_size"]
        h, w, t = _inputs(rng, n, hs, vocab, logit_scale=3.0)
        out.append(Sample(f"{m['name']} LM head, {n} tokens", (h, w, t, -100, "mean"), shape=f"{n}x{hs}, {vocab}x{hs}",
                          tags=("model",)))
    return out


def _flops(s: Sample, dtype: torch.dtype) -> float:
    (n, h), v = s.args[0].shape, s.args[1].shape[0]
    return 2.0 * n * v * h + 4.0 * n * v  # the head's matmul; max, exp, sum and the target's logit per logit


def _bytes(s: Sample, dtype: torch.dtype) -> float:
    hidden, weight, targets = s.args[:3]
    loss = 4 * (targets.numel() if s.args[4] == "none" else 1)
    return (hidden.numel() + weight.numel()) * dtype.itemsize + targets.numel() * targets.element_size() + loss


def _torch_linear_cross_entropy():
    """``F.linear`` then ``F.cross_entropy`` on the whole (N, V) logits, in float32."""
    import torch.nn.functional as F

    def f(hidden, weight, targets, ignore_index=-100, reduction="mean"):
        return F.cross_entropy(F.linear(hidden, weight).float(), targets, ignore_index=ignore_index,
                               reduction=reduction)

    return f


def _mlx_linear_cross_entropy():
    """``hidden @ weight.T`` then ``mlx.nn.losses.cross_entropy`` on the whole (N, V) logits, in float32; MLX's loss
    has no ``ignore_index``, so ignored rows get weight 0 and "mean" divides by the count of the others."""
    import mlx.core as mx
    import mlx.nn as nn

    def f(hidden, weight, targets, ignore_index=-100, reduction="mean"):
        valid = targets != ignore_index
        logits = (hidden @ weight.T).astype(mx.float32)
        losses = nn.losses.cross_entropy(logits, mx.where(valid, targets, 0), weights=valid.astype(mx.float32))
        if reduction == "none":
            return losses
        return losses.sum() / valid.sum() if reduction == "mean" else losses.sum()

    return f


SPEC = OpSpec(
    name="linear_cross_entropy", reference=linear_cross_entropy, params=PARAMS,
    outputs=(Output("loss", dtype=torch.float32, grad=True),), grads=("hidden", "weight"),
    samples=samples, bench_samples=bench_samples, flops=_flops, bytes=_bytes,
    ours={"cuda": "kernels.triton.cross_entropy:linear_cross_entropy",
          "mlx": "runtime_mlx.kernels.cross_entropy:linear_cross_entropy"},
    builtin={"torch": _torch_linear_cross_entropy, "mlx": _mlx_linear_cross_entropy},
    source="Wijmans et al. 2024 (Cut Your Losses) and Liger-Kernel's fused linear cross-entropy; "
           "DeepSeek-V3 report section 2.2 (the LM head and the MTP losses)",
)
