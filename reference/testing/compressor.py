"""The op spec of DeepSeek-V4's KV compressor pooling: `gated_pool(kv, gate, position_bias, overlap, prior_kv,
prior_gate)`, forward and the gradients of ``kv``, ``gate`` and ``position_bias``.

Samples: HCA (``overlap=False``, C = D) and CSA (``overlap=True``, C = 2 D) windows of m = 2..8 tokens (3: not a
power of two) and one m = 128 HCA case, ragged widths D, with and without the cached prior window (``prior_kv`` in
the dtype under test, ``prior_gate`` float32 as the cache keeps it, bias already added), one window alone (the
decode step that closes a window), gates of +-30 (exp overflows without the max subtracted). ``position_bias`` stays
float32 at every dtype (a float32 parameter in V4). Model samples: V4's CSA (m 4, head_dim 512), HCA (m 128) and
the indexer's CSA (m 4, index_head_dim 128), few windows.
"""

from __future__ import annotations

import torch

from reference.compressor import gated_pool

from .spec import OpSpec, Output, Sample, randn

V4 = dict(name="V4", head_dim=512, index_head_dim=128, csa_rate=4, hca_rate=128)
"""deepseek-ai/DeepSeek-V4 (transformers' ``DeepseekV4Config`` defaults): ``head_dim``, ``index_head_dim`` and the
``compress_rates`` of CSA and HCA."""


def _inputs(rng, b, n, m, d, overlap, prior=False, gate_scale=2.0) -> tuple:
    """``(kv, gate, position_bias, overlap[, prior_kv, prior_gate])`` for ``n`` windows of ``m`` tokens."""
    c = 2 * d if overlap else d
    args = (randn(rng, b, n * m, c), randn(rng, b, n * m, c, scale=gate_scale), randn(rng, m, c), overlap)
    if prior:
        args += (randn(rng, b, m, d), randn(rng, b, m, d, scale=gate_scale))
    return args


def _sample(name, rng, b, n, m, d, overlap, prior=False, tags=("ragged",), **kw) -> Sample:
    kind = "CSA" if overlap else "HCA"
    shape = f"B{b} T{n * m} m{m} D{d} {kind}{' +prior' if prior else ''}"
    return Sample(name, _inputs(rng, b, n, m, d, overlap, prior, **kw), keep=("position_bias", "prior_gate"),
                  shape=shape, tags=tags)


def samples(rng: torch.Generator) -> list[Sample]:
    """The battery's samples of `gated_pool`, seeded by ``rng`` (`OpSpec.samples`)."""
    out = [
        _sample("HCA, m 3, D 13", rng, 2, 4, 3, 13, False),
        _sample("HCA, m 8, D 40", rng, 1, 3, 8, 40, False),
        _sample("CSA, m 4, D 24, no prior (window 0 pools its own half)", rng, 2, 3, 4, 24, True),
        _sample("CSA, m 3, D 20, cached prior window", rng, 2, 2, 3, 20, True, prior=True),
        _sample("CSA, one window with the cached prior (decode)", rng, 2, 1, 4, 33, True, prior=True,
                tags=("decode", "ragged")),
        _sample("CSA, one window, no prior, m 2", rng, 1, 1, 2, 16, True, tags=("edge",)),
        _sample("HCA, gates of +-30 (exp overflows without the max)", rng, 1, 3, 5, 24, False, gate_scale=30.0,
                tags=("edge",)),
        _sample("CSA, gates of +-30, prior", rng, 1, 2, 4, 12, True, prior=True, gate_scale=30.0, tags=("edge",)),
        _sample("HCA, m 128, D 24, few windows", rng, 1, 2, 128, 24, False, tags=("ragged",)),
    ]
    d, di, csa, hca = V4["head_dim"], V4["index_head_dim"], V4["csa_rate"], V4["hca_rate"]
    out += [
        _sample(f"{V4['name']} CSA compressor, m {csa}, head_dim {d}, cached prior", rng, 1, 3, csa, d, True,
                prior=True, tags=("model",)),
        _sample(f"{V4['name']} HCA compressor, m {hca}, head_dim {d}", rng, 1, 2, hca, d, False, tags=("model",)),
        _sample(f"{V4['name']} indexer compressor (CSA), m {csa}, index_head_dim {di}", rng, 2, 4, csa, di, True,
                tags=("model",)),
    ]
    return out


def bench_samples(rng: torch.Generator) -> list[Sample]:
    """The shapes ``dsfs bench`` times for `gated_pool` (`OpSpec.bench_samples`): a prefill of 8192 tokens."""
    d, di, csa, hca, t = V4["head_dim"], V4["index_head_dim"], V4["csa_rate"], V4["hca_rate"], 8192
    return [
        _sample(f"{V4['name']} CSA compressor, prefill of {t}", rng, 1, t // csa, csa, d, True, tags=("model",)),
        _sample(f"{V4['name']} HCA compressor, prefill of {t}", rng, 1, t // hca, hca, d, False, tags=("model",)),
        _sample(f"{V4['name']} indexer compressor, prefill of {t}", rng, 1, t // csa, csa, di, True, tags=("model",)),
    ]


def _slots(s: Sample) -> tuple[int, int, int, int]:
    """``(B, n, slots per entry, D)`` of a sample."""
    kv, _, bias, overlap = s.args[:4]
    b, t, c = kv.shape
    m = bias.shape[0]
    return b, t // m, 2 * m if overlap else m, c // 2 if overlap else c


def _flops(s: Sample, dtype: torch.dtype) -> float:
    """Per slot and feature: the bias add, the max, the subtraction, exp, the sum of weights, multiply-add."""
    b, n, slots, d = _slots(s)
    return 7.0 * b * n * slots * d


def _bytes(s: Sample, dtype: torch.dtype) -> float:
    """kv and gate read once, the float32 bias, the prior rows (kv in ``dtype``, gate float32), the output."""
    kv, _, bias = s.args[:3]
    b, n, _, d = _slots(s)
    prior = s.args[4].numel() * (dtype.itemsize + 4) if len(s.args) > 4 else 0
    return 2 * kv.numel() * dtype.itemsize + bias.numel() * 4 + prior + b * n * d * dtype.itemsize


SPEC = OpSpec(
    name="gated_pool", reference=gated_pool, outputs=(Output("compressed", grad=True),),
    grads=("kv", "gate", "position_bias"), samples=samples, bench_samples=bench_samples, flops=_flops, bytes=_bytes,
    ours={"cuda": "kernels.triton.compressor:gated_pool", "mlx": "runtime_mlx.kernels.compressor:gated_pool"},
    source="DeepSeek-V4 report section 2.3.1 eqs. 9-12 (CSA), 2.3.2 eqs. 20-23 (HCA)",
)
