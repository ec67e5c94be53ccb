"""The `sink_attention` op spec: DeepSeek-V4's attention core, shared-KV MQA with a learned sink logit per head over
a per-query index set (`reference.sink_attention.sink_attention`), forward and the gradients of q, kv and sinks.

Samples: random distinct indices in random order with -1 slots, V4's own layout (the sliding window of
`reference.sink_attention.window_indices` followed by top-k compressed entries), a query with no valid index (zero
output, zero gradient but for the sink's), indices past the last row, sinks that dominate or vanish, a decode step,
and a V4-Flash slice: all 64 heads of 512 with the 128-slot window and index_topk 512 sliced to 32, few queries.
``sinks`` stays float32 at every dtype (``keep``), as V4 keeps it (``attn_sink`` is a float32 parameter).
"""

from __future__ import annotations

import torch

from reference.sink_attention import sink_attention, window_indices

from .spec import OpSpec, Output, Sample, randn

V4_FLASH = dict(name="V4-Flash", num_attention_heads=64, head_dim=512, sliding_window=128, index_topk=512,
                compress_rate=4)
"""The attention dimensions of ``transformers``' ``DeepseekV4Config`` defaults (V4-Flash)."""


def random_indices(rng: torch.Generator, b: int, s: int, n_rows: int, k: int, empty: float = 0.0) -> torch.Tensor:
    """(B, S, K) int64: ``k`` distinct rows of ``n_rows`` per query in random order, each slot -1 with probability
    ``empty``."""
    idx = torch.rand(b, s, n_rows, generator=rng).topk(k, dim=-1).indices  # random values: random order
    return idx.masked_fill(torch.rand(b, s, k, generator=rng) < empty, -1)


def v4_indices(rng: torch.Generator, b: int, s: int, offset: int, cached: int, window: int, n_comp: int,
               topk: int) -> torch.Tensor:
    """(B, S, window + topk) int64 into V4's ``kv`` = [``cached`` window rows; ``s`` new rows; ``n_comp``
    compressed entries]: each query's sliding window (`window_indices`, oldest first, -1 before position 0),
    then ``topk`` distinct compressed entries in random order (the indexer's pick)."""
    win = window_indices(s, offset, cached, window).expand(b, s, window)
    comp = random_indices(rng, b, s, n_comp, topk) + cached + s
    return torch.cat((win, comp), dim=-1)


def _inputs(rng, b, s, h, d, n_rows, idx, sinks=None) -> tuple:
    sinks = randn(rng, h) if sinks is None else sinks
    return randn(rng, b, s, h, d), randn(rng, b, n_rows, d), sinks, idx, d**-0.5


def _shape(b, s, h, d, n_rows, k) -> str:
    return f"B{b} S{s} H{h} D{d} L{n_rows} K{k}"


def _sample(name, rng, b, s, h, d, n_rows, idx, tags, sinks=None) -> Sample:
    return Sample(name, _inputs(rng, b, s, h, d, n_rows, idx, sinks), keep=("sinks",),
                  shape=_shape(b, s, h, d, n_rows, idx.shape[-1]), tags=tags)


def samples(rng: torch.Generator) -> list[Sample]:
    """The battery's samples of `sink_attention`, seeded by ``rng`` (`OpSpec.samples`)."""
    out = [_sample("ragged: 5 heads of 24, 20 slots over 37 rows, a quarter -1", rng, 2, 3, 5, 24, 37,
                   random_indices(rng, 2, 3, 37, 20, empty=0.25), ("ragged",)),
           _sample("V4 layout: window 6 (-1 before position 0) + top-5 of 12 compressed, 3 heads of 40", rng, 1, 5,
                   3, 40, 2 + 5 + 12, v4_indices(rng, 1, 5, 2, 2, 6, 12, 5), ("ragged",))]
    idx = random_indices(rng, 1, 4, 9, 5)
    idx[0, 1] = -1  # a query with no valid index: zero output
    idx[0, 2, 1:] = -1  # one valid index
    idx[0, 3, 0] = 9 + 3  # past the last row: an empty slot too
    out.append(_sample("a query with no valid index (zero output), one with one, an index past L", rng, 1, 4, 2, 16,
                       9, idx, ("edge",)))
    out.append(_sample("sinks that dominate (+8) and vanish (-30)", rng, 1, 3, 4, 32, 25,
                       random_indices(rng, 1, 3, 25, 12, empty=0.2), ("edge",),
                       sinks=torch.tensor([8.0, -30.0, 0.0, 2.0])))
    out.append(_sample("one decode step, 8 heads of 64, 40 of 100 rows", rng, 2, 1, 8, 64, 100,
                       random_indices(rng, 2, 1, 100, 40, empty=0.1), ("decode", "ragged")))
    h, d, w, topk, m = (V4_FLASH[k] for k in ("num_attention_heads", "head_dim", "sliding_window", "index_topk",
                                              "compress_rate"))
    pos, nk = 200, 32  # two queries at positions 200, 201; cached rows: the 127 before them
    out.append(_sample(f"{V4_FLASH['name']}: {h} heads of {d}, window {w} + index_topk {topk} sliced to {nk}, "
                       "2 queries", rng, 1, 2, h, d, w - 1 + 2 + pos // m,
                       v4_indices(rng, 1, 2, pos, w - 1, w, pos // m, nk), ("model",)))
    return out


def bench_samples(rng: torch.Generator) -> list[Sample]:
    """The shapes ``dsfs bench`` times for `sink_attention` (`OpSpec.bench_samples`): V4-Flash's CSA layer, all
    heads, the full window and index_topk."""
    h, d, w, topk, m = (V4_FLASH[k] for k in ("num_attention_heads", "head_dim", "sliding_window", "index_topk",
                                              "compress_rate"))
    out = []
    for name, b, s, pos in [(f"{V4_FLASH['name']} CSA prefill of 4096", 1, 4096, 0),
                            (f"{V4_FLASH['name']} CSA decode, batch 16 at position 8192", 16, 1, 8192)]:
        cached, n_comp = min(pos, w - 1), (pos + s) // m
        idx = v4_indices(rng, b, s, pos, cached, w, n_comp, topk)
        out.append(_sample(name, rng, b, s, h, d, cached + s + n_comp, idx, ("model",)))
    return out


def _valid(idx: torch.Tensor, n_rows: int) -> torch.Tensor:
    return (idx >= 0) & (idx < n_rows)


def _flops(s: Sample, dtype: torch.dtype) -> float:
    """Two dots of D per (head, valid slot): the logit and the weighted row."""
    q, kv, _, idx, _ = s.args
    return 4.0 * q.shape[2] * q.shape[3] * int(_valid(idx, kv.shape[1]).sum())


def _bytes(s: Sample, dtype: torch.dtype) -> float:
    """q, o, the indices and the float32 sinks, plus the kv rows some query selected (each read once)."""
    q, kv, sinks, idx, _ = s.args
    rows = sum(int(torch.unique(i[_valid(i, kv.shape[1])]).numel()) for i in idx)  # per batch element
    return (2 * q.numel() + rows * kv.shape[2]) * dtype.itemsize + idx.numel() * idx.element_size() + 4 * sinks.numel()


SPEC = OpSpec(
    name="sink_attention", reference=sink_attention, outputs=(Output("o", grad=True),), grads=("q", "kv", "sinks"),
    samples=samples, bench_samples=bench_samples, flops=_flops, bytes=_bytes,
    ours={"cuda": "kernels.triton.sink_attention:sink_attention",
          "mlx": "runtime_mlx.kernels.sink_attention:sink_attention"},
    source="DeepSeek-V4 report section 2.3 (shared-KV MQA with attention sinks over the sliding window and the "
           "selected compressed entries); Xiao et al. 2023, attention sinks",
)
