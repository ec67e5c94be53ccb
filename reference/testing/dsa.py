"""The DeepSeek Sparse Attention (V3.2) op specs: the lightning indexer's scores, its causal top-k selection, and
attention over the selected keys.

- `indexer_scores(q, k, w, scale)`: float32 (B, T, S) whatever the inputs' dtype, forward only (the indexer gets
  no gradient from the LM loss).
- `indexer_topk(scores, topk)`: the causal top-``min(topk, S)`` keys of each query, best first, -1 for slots a
  query cannot fill; integer indices compared exactly. Exact ties go to the earlier key (-0.0 ties with 0.0), a
  NaN of either sign ranks first: samples hold ties on purpose (scores on a grid of 0.5, ReLU zeros of both signs,
  a query whose scores are all zero), NaNs and -inf. float32 scores only (``indexer_scores``' output).
- `sparse_attention(q, k, v, indices, scale)`: forward and the gradients of q, k and v, in both MLA forms (naive:
  one key head per query head; absorbed: one latent key/value head) and grouped heads; index lists in random order
  with -1 slots, and a query that selects nothing (zero output).

Model samples: V3.2's indexer (64 heads of 128), index_topk 2048 sliced to 128 and 256 (Triton's interpreter
ranks a few hundred keys a second), MLA dims (128 + 64 / 128 naive, 512 + 64 / 512 absorbed) with a slice of the
heads and index_topk sliced to 64. The bench shapes use the full index_topk.
"""

from __future__ import annotations

import torch

from reference.attention import causal_mask
from reference.dsa import indexer_scores, indexer_topk, indices_to_mask, sparse_attention

from .shapes import V32
from .spec import OpSpec, Output, Sample, randn, spread

# ----------------------------------------------------------------------------- indexer scores


def _indexer_inputs(rng, b, t, s, h, d, q=randn) -> tuple:
    """``(q, k, w, scale)``: w includes the ``H**-0.5`` factor, scale ``D**-0.5`` (as `reference.dsa.Indexer`)."""
    return q(rng, b, t, h, d), randn(rng, b, s, d), randn(rng, b, t, h, scale=h**-0.5), d**-0.5


def scores_samples(rng: torch.Generator) -> list[Sample]:
    """The battery's samples of `indexer_scores`, seeded by ``rng`` (`OpSpec.samples`)."""
    out = []
    for name, (b, t, s, h, d), tags in [
        ("ragged: 6 heads of 24, S=29", (2, 5, 29, 6, 24), ("ragged",)),
        ("one decode step, S=29", (2, 1, 29, 6, 24), ("decode", "ragged")),
        ("more queries than keys, 3 heads of 40", (1, 9, 7, 3, 40), ("ragged", "edge")),
    ]:
        out.append(Sample(name, _indexer_inputs(rng, b, t, s, h, d), tags=tags))
    out.append(Sample("query rows spanning 1e-3..1e2", _indexer_inputs(rng, 1, 4, 33, 5, 20, q=spread),
                      tags=("edge",)))
    h, d = V32["index_n_heads"], V32["index_head_dim"]
    out += [Sample(f"{V32['name']} indexer, {h} heads of {d}, 2 queries over 203 keys",
                   _indexer_inputs(rng, 1, 2, 203, h, d), tags=("model",)),
            Sample(f"{V32['name']} indexer, one decode step over 300 keys", _indexer_inputs(rng, 2, 1, 300, h, d),
                   tags=("model", "decode"))]
    return out


def scores_bench(rng: torch.Generator) -> list[Sample]:
    """The shapes ``dsfs bench`` times for `indexer_scores` (`OpSpec.bench_samples`)."""
    h, d = V32["index_n_heads"], V32["index_head_dim"]
    return [Sample(f"{V32['name']} indexer, prefill of 4096", _indexer_inputs(rng, 1, 4096, 4096, h, d),
                   tags=("model",)),
            Sample(f"{V32['name']} indexer, decode, batch 16 over 8192", _indexer_inputs(rng, 16, 1, 8192, h, d),
                   tags=("model", "decode"))]


def _scores_flops(s: Sample, dtype: torch.dtype) -> float:
    b, t, h, d = s.args[0].shape
    return b * t * h * s.args[1].shape[1] * (2.0 * d + 3)  # dot, then scale and ReLU, weight, sum over heads


def _scores_bytes(s: Sample, dtype: torch.dtype) -> float:
    q, k, w = s.args[:3]
    b, t, _, _ = q.shape
    return (q.numel() + k.numel() + w.numel()) * dtype.itemsize + b * t * k.shape[1] * 4


SCORES = OpSpec(
    name="indexer_scores", reference=indexer_scores, outputs=(Output("scores", dtype=torch.float32),),
    samples=scores_samples, bench_samples=scores_bench, flops=_scores_flops, bytes=_scores_bytes,
    ours={"cuda": "kernels.triton.dsa:indexer_scores", "mlx": "runtime_mlx.kernels.dsa:indexer_scores"},
    source="DeepSeek-V3.2-Exp report section 2.1, eq. 1 (the lightning indexer)",
)

# ----------------------------------------------------------------------------- top-k selection


def _with(x: torch.Tensor, at: tuple, value: float) -> torch.Tensor:
    x[at] = value
    return x


def topk_samples(rng: torch.Generator) -> list[Sample]:
    """The battery's samples of `indexer_topk`, seeded by ``rng`` (`OpSpec.samples`)."""
    out = [
        Sample("causal offset, S=21 T=3 topk 5", (randn(rng, 2, 3, 21), 5), tags=("ragged",)),
        Sample("topk > S: every visible key (a NaN first), -1 padding", (_with(randn(rng, 1, 4, 13), (0, 2, 5),
                                                                            float("nan")), 20), tags=("edge",)),
        Sample("one decode step, S=40 topk 8", (randn(rng, 1, 1, 40), 8), tags=("decode",)),
        Sample("prefill S=T=7 topk 3, early queries padded", (randn(rng, 2, 7, 7), 3), tags=("edge",)),
        Sample("topk 1", (randn(rng, 1, 3, 20), 1), tags=("edge",)),
    ]
    grid = torch.round(randn(rng, 1, 3, 100) * 2) / 2  # a dozen values: every row full of exact ties
    grid[0, 1, [3, 77]] = float("-inf")
    out.append(Sample("exact ties (scores on a 0.5 grid, two -inf): earlier key first, topk 40", (grid, 40),
                      tags=("edge",)))
    out.append(Sample("exact ties, topk > visible keys", (grid[:, :, :30].clone(), 40), tags=("edge",)))
    signed = torch.relu(randn(rng, 1, 6, 21)) * torch.randint(-1, 2, (1, 6, 21), generator=rng)
    out.append(Sample("ReLU zeros of both signs tie (-0.0 == 0.0), topk 9", (signed, 9), tags=("edge",)))
    zeros = randn(rng, 2, 3, 24)
    zeros[1, 1] = 0.0  # a query whose every score is zero: index order
    zeros[0, 2, ::2] = -0.0
    out.append(Sample("a query whose scores are all zero: index order, topk 6", (zeros, 6), tags=("edge",)))
    nan = randn(rng, 1, 4, 40)
    nan[0, 0, 3] = float("nan")
    nan[0, 1, [5, 20]] = -float("nan")  # NaN with the sign bit set
    nan[0, 2, 7] = -float("nan")
    nan[0, 3] = float("nan")  # a whole row: index order
    out.append(Sample("NaN of either sign ranks first, a row of NaN, topk 4", (nan, 4), tags=("edge",)))
    topk = V32["index_topk"]  # a Triton interpreter's top-k costs milliseconds per key: slice k and S
    out += [Sample(f"{V32['name']} index_topk {topk} sliced to 128, 2 queries over 300 keys",
                   (randn(rng, 1, 2, 300), 128), tags=("model",)),
            Sample(f"{V32['name']} index_topk {topk} sliced to 256, one decode step over 400 keys",
                   (randn(rng, 1, 1, 400), 256), tags=("model", "decode"))]
    return out


def topk_bench(rng: torch.Generator) -> list[Sample]:
    """The shapes ``dsfs bench`` times for `indexer_topk` (`OpSpec.bench_samples`)."""
    topk = V32["index_topk"]
    return [Sample(f"{V32['name']} index_topk {topk}, prefill of 4096", (randn(rng, 1, 4096, 4096), topk),
                   tags=("model",)),
            Sample(f"{V32['name']} index_topk {topk}, decode, batch 16 over 8192", (randn(rng, 16, 1, 8192), topk),
                   tags=("model", "decode"))]


def _topk_bytes(s: Sample, dtype: torch.dtype) -> float:
    scores, topk = s.args
    b, t, n = scores.shape
    return scores.numel() * scores.element_size() + b * t * min(topk, n) * 8


TOPK = OpSpec(
    name="indexer_topk", reference=indexer_topk, outputs=(Output("indices", dtype="int", compare="equal"),),
    samples=topk_samples, bench_samples=topk_bench, dtypes=(torch.float32,), bytes=_topk_bytes,
    ours={"cuda": "kernels.triton.dsa:indexer_topk", "mlx": "runtime_mlx.kernels.dsa:indexer_topk"},
    source="DeepSeek-V3.2-Exp report section 2.1 (top-k selection); DESIGN.md, ties in any top-k",
)

# ----------------------------------------------------------------------------- sparse attention


def random_indices(rng: torch.Generator, b: int, t: int, s: int, nk: int) -> torch.Tensor:
    """(B, T, NK) int64: distinct causal keys (queries at the end of the keys) in random order, -1 where a query
    sees fewer than ``nk`` keys."""
    r = torch.rand(b, t, s, generator=rng).masked_fill(~causal_mask(t, s, s - t), -1.0)
    val, idx = r.topk(nk, dim=-1)
    return torch.where(val >= 0, idx, -1)


def _sparse_inputs(rng, b, h, hk, t, s, dk, dv, nk, indices=None) -> tuple:
    idx = random_indices(rng, b, t, s, nk) if indices is None else indices
    return (randn(rng, b, h, t, dk), randn(rng, b, hk, s, dk), randn(rng, b, hk, s, dv), idx, dk**-0.5)


def _sparse_shape(b, h, hk, t, s, dk, dv, nk) -> str:
    return f"B{b} H{h}/{hk} T{t} S{s} Dk{dk} Dv{dv} NK{nk}"


def sparse_samples(rng: torch.Generator) -> list[Sample]:
    """The battery's samples of `sparse_attention`, seeded by ``rng`` (`OpSpec.samples`)."""
    out = []
    for name, dims, tags in [
        ("naive (Hk=H), 20 indices, -1 slots", (1, 3, 3, 5, 21, 40, 24, 20), ("ragged",)),
        ("grouped heads (H=4, Hk=2)", (1, 4, 2, 5, 21, 20, 12, 20), ("ragged",)),
        ("absorbed (one latent head, Dk=30, Dv=24)", (2, 5, 1, 3, 21, 30, 24, 20), ("ragged",)),
        ("one decode step, 16 of 45 keys", (2, 3, 3, 1, 45, 24, 20, 16), ("decode", "ragged")),
    ]:
        out.append(Sample(name, _sparse_inputs(rng, *dims), shape=_sparse_shape(*dims), tags=tags))
    dims = (1, 2, 2, 4, 9, 16, 10, 5)
    idx = random_indices(rng, 1, 4, 9, 5)
    idx[0, 1] = -1  # a query that selects nothing
    idx[0, 2, 1:] = -1
    out.append(Sample("a query selecting nothing (zero output), one selecting one key", _sparse_inputs(
        rng, *dims, indices=idx), shape=_sparse_shape(*dims), tags=("edge",)))
    h, dn, dr, dv, r = (V32["num_attention_heads"], V32["qk_nope_head_dim"], V32["qk_rope_head_dim"],
                        V32["v_head_dim"], V32["kv_lora_rank"])
    topk, nk = V32["index_topk"], 64
    for name, dims in [
        (f"{V32['name']} naive MLA, 4 of {h} heads, index_topk {topk} sliced to {nk}", (1, 4, 4, 2, 150, dn + dr, dv,
                                                                                       nk)),
        (f"{V32['name']} absorbed MLA decode, 16 of {h} heads, index_topk {topk} sliced to {nk}",
         (1, 16, 1, 1, 150, r + dr, r, nk)),
    ]:
        out.append(Sample(name, _sparse_inputs(rng, *dims), shape=_sparse_shape(*dims), tags=("model",)))
    return out


def sparse_bench(rng: torch.Generator) -> list[Sample]:
    """The shapes ``dsfs bench`` times for `sparse_attention` (`OpSpec.bench_samples`)."""
    h, dn, dr, dv, r = (V32["num_attention_heads"], V32["qk_nope_head_dim"], V32["qk_rope_head_dim"],
                        V32["v_head_dim"], V32["kv_lora_rank"])
    topk = V32["index_topk"]
    out = []
    for name, dims in [(f"{V32['name']} naive MLA prefill of 4096, index_topk {topk}",
                        (1, h, h, 4096, 4096, dn + dr, dv, topk)),
                       (f"{V32['name']} absorbed MLA decode, batch 16 over 8192, index_topk {topk}",
                        (16, h, 1, 1, 8192, r + dr, r, topk))]:
        out.append(Sample(name, _sparse_inputs(rng, *dims), shape=_sparse_shape(*dims), tags=("model",)))
    return out


def _sparse_flops(s: Sample, dtype: torch.dtype) -> float:
    q, k, v, idx, _ = s.args
    h, dk, dv = q.shape[1], q.shape[3], v.shape[3]
    return 2.0 * h * int((idx >= 0).sum()) * (dk + dv)


def _sparse_bytes(s: Sample, dtype: torch.dtype) -> float:
    """q, o and the indices, plus the key and value rows some query selected (each read once)."""
    q, k, v, idx, _ = s.args
    out = q.shape[0] * q.shape[1] * q.shape[2] * v.shape[3]
    rows = sum(int(torch.unique(i[(i >= 0) & (i < k.shape[2])]).numel()) for i in idx)  # per batch element
    kv = rows * k.shape[1] * (k.shape[3] + v.shape[3])
    return (q.numel() + kv + out) * dtype.itemsize + idx.numel() * idx.element_size()


def _torch_sparse():
    """``scaled_dot_product_attention`` under the dense mask of the selection (a query that selects nothing sees
    key 0, its output zeroed)."""
    import torch.nn.functional as F

    def sparse_attention_sdpa(q, k, v, indices, scale):
        sel = indices_to_mask(indices, k.shape[2])
        empty = ~sel.any(-1, keepdim=True)
        sel[..., :1] |= empty
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=sel[:, None], scale=scale,
                                           enable_gqa=k.shape[1] != q.shape[1])
        return o.masked_fill(empty[:, None], 0.0)

    return sparse_attention_sdpa


SPARSE = OpSpec(
    name="sparse_attention", reference=sparse_attention, outputs=(Output("o", grad=True),), grads=("q", "k", "v"),
    samples=sparse_samples, bench_samples=sparse_bench, flops=_sparse_flops, bytes=_sparse_bytes,
    ours={"cuda": "kernels.triton.dsa:sparse_attention", "mlx": "runtime_mlx.kernels.dsa:sparse_attention"},
    builtin={"torch": _torch_sparse},  # MLX has no sparse attention: ours is mx.fast's SDPA under the selection mask
    source="DeepSeek-V3.2-Exp report section 2.1 (sparse MLA over the selected tokens)",
)

SPECS = [SCORES, TOPK, SPARSE]
