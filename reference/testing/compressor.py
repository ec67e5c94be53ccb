"""The op specs of DeepSeek-V4's KV compressors: the pooling `gated_pool(kv, gate, position_bias, overlap, prior_kv,
prior_gate)`, forward and the gradients of ``kv``, ``gate`` and ``position_bias``; and CSA's indexer top-k
`compressed_topk(scores, visible, topk)` (integer indices compared exactly, float32 scores only).

Samples: HCA (``overlap=False``, C = D) and CSA (``overlap=True``, C = 2 D) windows of m = 2..8 tokens (3: not a
power of two) and one m = 128 HCA case, ragged widths D, with and without the cached prior window (``prior_kv`` in
the dtype under test, ``prior_gate`` float32 as the cache keeps it, bias already added), one window alone (the
decode step that closes a window), gates of +-30 (exp overflows without the max subtracted). ``position_bias`` stays
float32 at every dtype (a float32 parameter in V4). Model samples: V4's CSA (m 4, head_dim 512), HCA (m 128) and
the indexer's CSA (m 4, index_head_dim 128), few windows.

`compressed_topk` samples: prefix masks as the model makes them (`visible_entries`: a prefill from position 0 whose
first queries see nothing, a cached prefill, m 3, a decode step), general masks ((B, S, C) and (S, C)), topk > C,
exact ties (a 0.5 grid, ReLU zeros of both signs), NaN of either sign (visible and hidden), -inf scores (visible -inf
above the hidden entries of a prefix mask; tied with hidden entries of a general mask, the lower index first, as the
reference's stable sort puts them); V4-Flash: index_topk 512 over 4096 entries (a 16384-token context, 2 queries) and
a slice (topk 64 over 300 entries) that Triton's interpreter ranks in about a second.
"""

from __future__ import annotations

import torch

from reference.compressor import compressed_topk, gated_pool, visible_entries

from .spec import OpSpec, Output, Sample, randn

V4 = dict(name="V4", head_dim=512, index_head_dim=128, csa_rate=4, hca_rate=128, index_topk=512)
"""deepseek-ai/DeepSeek-V4 (transformers' ``DeepseekV4Config`` defaults): ``head_dim``, ``index_head_dim``, the
``compress_rates`` of CSA and HCA, and the indexer's ``index_topk``."""


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

# ----------------------------------------------------------------------------- CSA's indexer top-k


def _prefix(positions, num_entries: int, m: int = 4) -> torch.Tensor:
    """The model's mask (`visible_entries`): the queries at ``positions`` see the entries whose window closed."""
    return visible_entries(torch.as_tensor(positions), num_entries, m)


def _topk_sample(name, scores, visible, topk, tags) -> Sample:
    b, s, c = scores.shape
    mask = "(S, C)" if visible.ndim == 2 else "(B, S, C)"
    return Sample(name, (scores, visible, topk), shape=f"B{b} S{s} C{c} topk {topk}, {mask} mask", tags=tags)


def topk_samples(rng: torch.Generator) -> list[Sample]:
    """The battery's samples of `compressed_topk`, seeded by ``rng`` (`OpSpec.samples`)."""
    out = [
        _topk_sample("prefill from position 0, m 4: queries before the first window see nothing", randn(rng, 2, 13, 3),
                     _prefix(range(13), 3), 2, ("ragged", "edge")),
        _topk_sample("cached prefill at position 37, m 4, topk 4", randn(rng, 2, 6, 10), _prefix(range(37, 43), 10),
                     4, ("ragged",)),
        _topk_sample("m 3, positions 5..15 over 5 entries, topk 3", randn(rng, 1, 11, 5), _prefix(range(5, 16), 5, 3),
                     3, ("ragged",)),
        _topk_sample("decode step at position 163, all 41 entries visible, topk 8", randn(rng, 2, 1, 41),
                     _prefix([163], 41), 8, ("decode",)),
        _topk_sample("general (B, S, C) mask, C=29, topk 6", randn(rng, 2, 5, 29),
                     torch.rand(2, 5, 29, generator=rng) < 0.5, 6, ("ragged",)),
        _topk_sample("general (S, C) mask over a batch of 2, decode, topk 5", randn(rng, 2, 1, 23),
                     torch.rand(1, 23, generator=rng) < 0.3, 5, ("decode", "edge")),
    ]
    vis = torch.rand(1, 4, 13, generator=rng) < 0.5
    vis[0, 0], vis[0, 1] = False, True  # a query that sees nothing, one that sees everything
    out.append(_topk_sample("topk > C: every visible entry, -1 padding; rows of none and all", randn(rng, 1, 4, 13),
                            vis, 20, ("edge",)))
    grid = torch.round(randn(rng, 1, 3, 100) * 2) / 2  # a dozen values: every row full of exact ties
    out.append(_topk_sample("exact ties (scores on a 0.5 grid): lower index first, topk 40", grid,
                            torch.rand(1, 3, 100, generator=rng) < 0.7, 40, ("edge",)))
    signed = torch.relu(randn(rng, 1, 6, 21)) * torch.randint(-1, 2, (1, 6, 21), generator=rng)
    out.append(_topk_sample("ReLU zeros of both signs tie (-0.0 == 0.0), topk 9", signed,
                            torch.rand(1, 6, 21, generator=rng) < 0.8, 9, ("edge",)))
    nan = randn(rng, 1, 4, 30)
    nan[0, 0, [3, 11]] = float("nan")
    nan[0, 1, [5, 20]] = -float("nan")  # NaN with the sign bit set
    nan[0, 3] = float("nan")  # a whole row: the visible entries in index order
    vis = torch.rand(1, 4, 30, generator=rng) < 0.6
    vis[0, 0, 3], vis[0, 0, 11], vis[0, 1, 5], vis[0, 1, 20] = True, False, True, False  # hidden NaN: never taken
    out.append(_topk_sample("NaN of either sign ranks first, hidden NaN never, a row of NaN, topk 4", nan, vis, 4,
                            ("edge",)))
    inf = randn(rng, 1, 3, 16)
    inf[0, :, [2, 6, 9]] = float("-inf")
    out.append(_topk_sample("visible -inf ranks above the hidden entries of a prefix mask, topk 16", inf,
                            _prefix([27, 35, 47], 16), 16, ("edge",)))
    vis = torch.rand(1, 3, 16, generator=rng) < 0.5
    vis[0, :, [2, 6, 9]] = True
    out.append(_topk_sample("visible -inf ties with hidden entries (lower index first, as the stable sort), topk 12",
                            inf.clone(), vis, 12, ("edge",)))
    topk, m, c = V4["index_topk"], V4["csa_rate"], 16384 // V4["csa_rate"]
    out += [
        _topk_sample(f"V4-Flash index_topk {topk} sliced to 64, decode over 300 entries", randn(rng, 1, 1, 300),
                     _prefix([1201], 300, m), 64, ("model", "decode")),
        _topk_sample(f"V4-Flash index_topk {topk} over {c} entries (16384 tokens): 511 and all visible",
                     randn(rng, 1, 2, c), _prefix([2043, 16383], c, m), topk, ("model",)),
    ]
    return out


def topk_bench(rng: torch.Generator) -> list[Sample]:
    """The shapes ``dsfs bench`` times for `compressed_topk` (`OpSpec.bench_samples`)."""
    topk, m, t = V4["index_topk"], V4["csa_rate"], 8192
    return [
        _topk_sample(f"V4-Flash index_topk {topk}, prefill of {t}", randn(rng, 1, t, t // m),
                     _prefix(range(t), t // m, m), topk, ("model",)),
        _topk_sample(f"V4-Flash index_topk {topk}, decode, batch 16 at position {8 * t}",
                     randn(rng, 16, 1, 2 * t), _prefix([8 * t - 1], 2 * t, m), topk, ("model", "decode")),
    ]


def _topk_bytes(s: Sample, dtype: torch.dtype) -> float:
    """The scores and the mask read once, the int64 indices written."""
    scores, visible, topk = s.args
    b, q, c = scores.shape
    return scores.numel() * 4 + visible.numel() + b * q * min(topk, c) * 8


TOPK = OpSpec(
    name="compressed_topk", reference=compressed_topk, outputs=(Output("indices", dtype="int", compare="equal"),),
    samples=topk_samples, bench_samples=topk_bench, dtypes=(torch.float32,), bytes=_topk_bytes,
    ours={"cuda": "kernels.triton.compressor:compressed_topk", "mlx": "runtime_mlx.kernels.compressor:compressed_topk"},
    source="DeepSeek-V4 report section 2.3.1 eq. 17 (CSA's top-k selector); DESIGN.md, ties in any top-k",
)

SPECS = [SPEC, TOPK]
