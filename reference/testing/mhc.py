"""The mHC (DeepSeek-V4's manifold-constrained hyper-connections) op specs: `mhc_pre` and `mhc_post`.

- `mhc_pre(streams, fn, base, scale, sinkhorn_iters, hc_eps, rms_norm_eps)`: the block input ``collapsed`` (B, S, D)
  in the streams' dtype, and the float32 mixes ``post`` (B, S, N) and ``comb`` (B, S, N, N) (Sinkhorn-Knopp
  projected); gradients to the streams and to the float32 parameters ``fn``, ``base`` and ``scale`` (kept in
  float32 whatever the streams' dtype, as in the model).
- `mhc_post(block_out, post, comb, streams)`: the new streams (B, S, N, D); gradients to all four (``post`` and
  ``comb`` stay float32, as `mhc_pre` returns them).

Samples: hc_mult N = 1, 2, 4 (and 3, not a power of two), 1, 3 and 20 Sinkhorn iterations, ragged hidden sizes
(33, 40, 50: no multiple of a block), tokens whose streams span 1e-3..1e2 (the RMSNorm makes the mixes
scale-free), one decode step (S = 1), no tokens, and a DeepSeek-V4-Flash slice (hidden 4096, N 4, 20 iterations,
a few tokens). Weights are drawn as `tests/test_mhc.py` draws them: ``fn`` of std ``(N D)**-0.5`` so the mixes
are O(1) and neither the sigmoids nor the softmax saturate, random biases, scales around 1.
"""

from __future__ import annotations

import torch

from reference.mhc import mhc_post, mhc_pre, sinkhorn_knopp

from .spec import OpSpec, Output, Sample, randn

V4_FLASH = dict(name="V4-Flash", hidden_size=4096, hc_mult=4, hc_sinkhorn_iters=20, hc_eps=1e-6, rms_norm_eps=1e-6)
"""deepseek-ai/DeepSeek-V4-Flash's mHC dims (its ``config.json``; also ``transformers``' DeepseekV4Config defaults)."""
EPS = 1e-6


def _weights(rng: torch.Generator, n: int, d: int) -> tuple:
    """``(fn, base, scale)`` float32 of one HyperConnection with O(1) mixes."""
    m = (2 + n) * n
    return randn(rng, m, n * d, scale=(n * d) ** -0.5), randn(rng, m), 1.0 + randn(rng, 3, scale=0.5)


def _pre_inputs(rng, b, s, n, d, iters, streams=None) -> tuple:
    x = randn(rng, b, s, n, d) if streams is None else streams
    return (x, *_weights(rng, n, d), iters, EPS, EPS)


def _pre_sample(name, rng, b, s, n, d, iters, tags, streams=None) -> Sample:
    return Sample(name, _pre_inputs(rng, b, s, n, d, iters, streams), keep=("fn", "base", "scale"),
                  shape=f"B{b} S{s} N{n} D{d} it{iters}", tags=tags)


def pre_samples(rng: torch.Generator) -> list[Sample]:
    """The battery's samples of `mhc_pre`, seeded by ``rng`` (`OpSpec.samples`)."""
    out = [_pre_sample(name, rng, *dims, tags=tags) for name, dims, tags in [
        ("N=4, 20 iterations, D=40", (2, 5, 4, 40, 20), ("ragged",)),
        ("N=2, 3 iterations, D=33", (1, 7, 2, 33, 3), ("ragged",)),
        ("N=1, 1 iteration, D=50", (3, 4, 1, 50, 1), ("ragged", "edge")),
        ("N=3 (not a power of two), 3 iterations", (1, 3, 3, 24, 3), ("ragged", "edge")),
        ("one decode step, N=4, 20 iterations", (3, 1, 4, 64, 20), ("decode",)),
        ("no tokens", (1, 0, 4, 32, 20), ("edge",)),
    ]]
    x = randn(rng, 2, 3, 4, 48) * 10.0 ** torch.randint(-3, 3, (2, 3, 1, 1), generator=rng).float()
    out.append(_pre_sample("tokens spanning 1e-3..1e2, N=4, 1 iteration", rng, 2, 3, 4, 48, 1, ("edge",),
                           streams=x))
    m = V4_FLASH
    out.append(_pre_sample(f"{m['name']} hidden {m['hidden_size']}, N {m['hc_mult']}, 3 tokens", rng, 1, 3,
                           m["hc_mult"], m["hidden_size"], m["hc_sinkhorn_iters"], ("model",)))
    return out


def pre_bench(rng: torch.Generator) -> list[Sample]:
    """The shapes ``dsfs bench`` times for `mhc_pre` (`OpSpec.bench_samples`)."""
    m = V4_FLASH
    n, d, it = m["hc_mult"], m["hidden_size"], m["hc_sinkhorn_iters"]
    return [_pre_sample(f"{m['name']} prefill of 4096 tokens", rng, 1, 4096, n, d, it, ("model",)),
            _pre_sample(f"{m['name']} decode, batch 16", rng, 16, 1, n, d, it, ("model", "decode")),
            _pre_sample("hidden 7168 (DeepSeek-V3's width), N 4, 4096 tokens", rng, 1, 4096, n, 7168, it, ("model",))]


def _pre_flops(s: Sample, dtype: torch.dtype) -> float:
    """The projection, the RMS, the collapse, and the Sinkhorn iterations (4 N^2 per normalization)."""
    b, sq, n, d = s.args[0].shape
    m, iters = (2 + n) * n, s.args[4]
    return b * sq * (2.0 * m * n * d + 3.0 * n * d + 2.0 * n * d + (2 * iters - 1) * 4.0 * n * n)


def _pre_bytes(s: Sample, dtype: torch.dtype) -> float:
    """Streams read once, fn once (float32), collapsed written in the streams' dtype, post and comb in float32."""
    b, sq, n, d = s.args[0].shape
    return (b * sq * (n * d + d)) * dtype.itemsize + s.args[1].numel() * 4 + b * sq * (n + n * n) * 4


PRE = OpSpec(
    name="mhc_pre", reference=mhc_pre,
    outputs=(Output("collapsed", grad=True), Output("post", dtype=torch.float32, grad=True),
             Output("comb", dtype=torch.float32, grad=True)),
    grads=("streams", "fn", "base", "scale"), samples=pre_samples, bench_samples=pre_bench,
    flops=_pre_flops, bytes=_pre_bytes,
    ours={"cuda": "kernels.triton.mhc:mhc_pre", "mlx": "runtime_mlx.kernels.mhc:mhc_pre"},
    source="DeepSeek-V4 report section 2.2; mHC, Xie et al. 2026 (arXiv 2512.24880) section 3",
)

# ----------------------------------------------------------------------------- mhc_post


def _post_inputs(rng, b, s, n, d) -> tuple:
    """``(block_out, post, comb, streams)``: post in (0, 2) and comb doubly stochastic, as `mhc_pre` makes them."""
    post = 2 * torch.sigmoid(randn(rng, b, s, n))
    comb = sinkhorn_knopp(torch.softmax(randn(rng, b, s, n, n), -1) + EPS, 20, EPS)
    return randn(rng, b, s, d), post, comb, randn(rng, b, s, n, d)


def _post_sample(name, rng, b, s, n, d, tags) -> Sample:
    return Sample(name, _post_inputs(rng, b, s, n, d), keep=("post", "comb"), shape=f"B{b} S{s} N{n} D{d}",
                  tags=tags)


def post_samples(rng: torch.Generator) -> list[Sample]:
    """The battery's samples of `mhc_post`, seeded by ``rng`` (`OpSpec.samples`)."""
    m = V4_FLASH
    return [_post_sample(name, rng, *dims, tags=tags) for name, dims, tags in [
        ("N=4, D=40", (2, 5, 4, 40), ("ragged",)),
        ("N=2, D=33", (1, 7, 2, 33), ("ragged",)),
        ("N=1, D=50", (3, 4, 1, 50), ("ragged", "edge")),
        ("N=3 (not a power of two)", (1, 3, 3, 24), ("ragged", "edge")),
        ("one decode step, N=4", (3, 1, 4, 64), ("decode",)),
        ("no tokens", (1, 0, 4, 32), ("edge",)),
        (f"{m['name']} hidden {m['hidden_size']}, N {m['hc_mult']}, 3 tokens", (1, 3, m["hc_mult"],
                                                                                 m["hidden_size"]), ("model",)),
    ]]


def post_bench(rng: torch.Generator) -> list[Sample]:
    """The shapes ``dsfs bench`` times for `mhc_post` (`OpSpec.bench_samples`)."""
    m = V4_FLASH
    n, d = m["hc_mult"], m["hidden_size"]
    return [_post_sample(f"{m['name']} prefill of 4096 tokens", rng, 1, 4096, n, d, ("model",)),
            _post_sample(f"{m['name']} decode, batch 16", rng, 16, 1, n, d, ("model", "decode"))]


def _post_flops(s: Sample, dtype: torch.dtype) -> float:
    b, sq, n, d = s.args[3].shape
    return b * sq * n * d * (1.0 + 2.0 * n)


def _post_bytes(s: Sample, dtype: torch.dtype) -> float:
    """block_out and the streams read, the new streams written, post and comb (float32) read."""
    b, sq, n, d = s.args[3].shape
    return b * sq * (d + 2 * n * d) * dtype.itemsize + b * sq * (n + n * n) * 4


POST = OpSpec(
    name="mhc_post", reference=mhc_post, outputs=(Output("out", grad=True),),
    grads=("block_out", "post", "comb", "streams"), samples=post_samples, bench_samples=post_bench,
    flops=_post_flops, bytes=_post_bytes,
    ours={"cuda": "kernels.triton.mhc:mhc_post", "mlx": "runtime_mlx.kernels.mhc:mhc_post"},
    source="DeepSeek-V4 report section 2.2 (hc_post); mHC, Xie et al. 2026 (arXiv 2512.24880) section 3",
)

SPECS = [PRE, POST]
