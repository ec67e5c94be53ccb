"""The DeepSeekMoE op specs: `route` (sigmoid scores, group-limited top-k with the correction bias, weights) and
`grouped_gemm` (the routed experts' products over expert-sorted rows).

Routing samples are drawn so that every top-k cut is decided: at the ``topk_group``-th group score and at the
``top_k``-th biased score of the kept experts, every value within `MARGIN` of the cut equals it exactly, in
float64 and in float32 (DESIGN.md: "oracle tests draw inputs whose top-k cuts have a margin"). Exact ties are
deliberate (logits from a few levels, or all equal), and there the lower expert (group) index wins. The K slots
of a token are ordered as the reference orders them: by biased score, best first, the lower index first among ties
(DESIGN.md: "Ties in any top-k"), so ``topk_idx`` is compared exactly and ``topk_weight``'s cotangent follows the
slots.
"""

from __future__ import annotations

import torch

from reference.moe import grouped_gemm, route, topk_indices

from .shapes import V2_LITE, V3
from .spec import OpSpec, Output, Sample, randn

MARGIN = 1e-4
"""The smallest gap, in biased sigmoid score, between a top-k cut and a value that is not tied with it: a thousand
times float32's rounding of a score, so no implementation's sigmoid decides a cut differently."""


# ============================================================================= route


def _cut_decided(v64: torch.Tensor, v32: torch.Tensor, k: int) -> torch.Tensor:
    """(N,) bool: the k-th largest of each row (stable order of ``v64``) has no value within `MARGIN` of it that is
    not exactly equal to it in both ``v64`` and ``v32`` (the same values computed in float32)."""
    if k >= v64.shape[-1]:
        return torch.ones(v64.shape[0], dtype=torch.bool)
    i = topk_indices(v64, k)[:, -1:]
    c64, c32 = v64.gather(1, i), v32.gather(1, i)
    near = (v64 - c64).abs() < MARGIN  # -inf (an excluded group's expert) is never near
    return (~near | ((v64 == c64) & (v32 == c32))).all(-1)


def _choices(logits: torch.Tensor, bias: torch.Tensor, n_group: int, topk_group: int, dtype: torch.dtype):
    """The biased scores with excluded groups at -inf and the group scores (None without groups), in ``dtype``,
    as `reference.moe.route` computes them."""
    c = torch.sigmoid(logits.to(dtype)) + bias.to(dtype)
    if n_group == 1:
        return c, None
    n, e = c.shape
    grouped = c.view(n, n_group, e // n_group)
    g = grouped.topk(2, dim=-1).values.sum(-1)
    return grouped, g


def decided(logits, bias, top_k, n_group=1, topk_group=1) -> torch.Tensor:
    """(N,) bool: tokens whose routing no implementation can decide differently (both cuts decided, see
    `_cut_decided`)."""
    c64, g64 = _choices(logits, bias, n_group, topk_group, torch.float64)
    c32, g32 = _choices(logits, bias, n_group, topk_group, torch.float32)
    n, e = logits.shape
    ok = torch.ones(n, dtype=torch.bool)
    if n_group > 1:
        ok &= _cut_decided(g64, g32, topk_group)
        keep = torch.zeros_like(g64, dtype=torch.bool).scatter_(1, topk_indices(g64, topk_group), True)
        c64 = c64.masked_fill(~keep[..., None], float("-inf")).view(n, e)
        c32 = c32.masked_fill(~keep[..., None], float("-inf")).view(n, e)
    return ok & _cut_decided(c64, c32, top_k)


def _plain_topk(logits, bias, top_k) -> torch.Tensor:
    """The experts a router without the group limit would pick (top_k of the biased scores over all experts)."""
    return topk_indices(torch.sigmoid(logits.double()) + bias.double(), top_k)


def _best_excluded(logits, bias, top_k, n_group, topk_group):
    """Tokens whose single best expert (by biased score) lies in a group the group limit excludes."""
    idx = route(logits.double(), bias.double(), top_k, n_group, topk_group)[0]
    best = _plain_topk(logits, bias, 1)
    return ~(idx == best).any(-1)


def _bias_changes_pick(logits, bias, top_k, n_group, topk_group):
    """Tokens whose set of experts differs with and without the bias."""
    with_bias = route(logits.double(), bias.double(), top_k, n_group, topk_group)[0].sort(-1).values
    without = route(logits.double(), torch.zeros_like(bias.double()), top_k, n_group, topk_group)[0].sort(-1).values
    return (with_bias != without).any(-1)


def _tie_at_expert_cut(logits, bias, top_k, n_group, topk_group):
    """Tokens where the top_k-th and the next kept expert have exactly equal biased scores."""
    idx = route(logits.double(), bias.double(), top_k + 1, n_group, topk_group)[0]
    c = (torch.sigmoid(logits.double()) + bias.double()).gather(1, idx)
    return c[:, top_k - 1] == c[:, top_k]


def _tie_at_group_cut(logits, bias, top_k, n_group, topk_group):
    """Tokens where the topk_group-th and the next group have exactly equal group scores."""
    _, g = _choices(logits, bias, n_group, topk_group, torch.float64)
    s = g.sort(-1, descending=True).values
    return s[:, topk_group - 1] == s[:, topk_group]


def _draw_randn(rng, n, e, n_group, bias):
    return randn(rng, n, e)


def _draw_levels(rng, n, e, n_group, bias):
    """Logits from five levels 0, 0.5, .., 2: many exactly equal scores and group scores (positive levels only,
    since ``sigmoid(x) + sigmoid(-x) = 1`` would make sums of different pairs equal in exact arithmetic only)."""
    return torch.randint(0, 5, (n, e), generator=rng).float() * 0.5


def _draw_planted(rng, n, e, n_group, bias):
    """randn logits, then in each token's weakest group one expert at +6 (the token's best score) and the others
    at -6: the group's score (about 1.0) stays below the kept groups', so the best expert must be left out."""
    x = randn(rng, n, e)
    size = e // n_group
    g = (torch.sigmoid(x.double()) + bias.double()).view(n, n_group, size).topk(2, -1).values.sum(-1)
    rows, worst = torch.arange(n), g.argmin(-1)
    x.view(n, n_group, size)[rows, worst] = -6.0
    x.view(n, n_group, size)[rows, worst, torch.randint(0, size, (n,), generator=rng)] = 6.0
    return x


def _route_sample(rng, name, n, e, top_k, n_group=1, topk_group=1, norm=True, rsf=1.0, bias=0.1, draw=_draw_randn,
                  want=None, tags=()) -> Sample:
    """A routing sample of ``n`` tokens over ``e`` experts whose cuts are all `decided` (and, with ``want``, where
    ``want(logits, bias, top_k, n_group, topk_group)`` holds for every token). ``bias``: the correction bias'
    standard deviation (0: no bias)."""
    b = randn(rng, e, scale=bias) if bias else torch.zeros(e)
    rows, tries = [], 0
    while sum(len(r) for r in rows) < n:
        tries += 1
        if tries > 200:
            raise RuntimeError(f"route sample {name!r}: cannot draw {n} decided tokens")
        cand = draw(rng, 2 * n + 8, e, n_group, b)
        ok = decided(cand, b, top_k, n_group, topk_group)
        if want is not None:
            ok &= want(cand, b, top_k, n_group, topk_group)
        rows.append(cand[ok])
    logits = torch.cat(rows)[:n].contiguous() if n else torch.zeros(0, e)
    return Sample(name, (logits, b, top_k, n_group, topk_group, norm, rsf), tags=tags)


def route_samples(rng: torch.Generator) -> list[Sample]:
    """The battery's samples of `route`, seeded by ``rng`` (`OpSpec.samples`)."""
    v3, v2 = V3, V2_LITE
    v3_cfg = (v3["n_routed_experts"], v3["num_experts_per_tok"], v3["n_group"], v3["topk_group"], True,
              v3["routed_scaling_factor"])
    e3, k3, g3, tg3, norm3, rsf3 = v3_cfg
    return [
        _route_sample(rng, "8 experts, top-2, no groups, 37 tokens", 37, 8, 2, tags=("ragged",)),
        _route_sample(rng, "16 experts in 4 groups keep 2, top-3, unnormalized x2.5", 37, 16, 3, 4, 2, False, 2.5,
                      tags=("ragged",)),
        _route_sample(rng, "12 experts in 3 groups keep 2, top-4 x2.5 (no powers of two)", 29, 12, 4, 3, 2, True,
                      2.5, tags=("ragged",)),
        _route_sample(rng, "16 experts in 4 groups keep 2, top-3: best expert in an excluded group", 23, 16, 3, 4,
                      2, draw=_draw_planted, want=_best_excluded, tags=("edge", "groups")),
        _route_sample(rng, "12 experts in 3 groups keep 1, top-2: best expert in an excluded group", 19, 12, 2, 3,
                      1, True, 2.5, draw=_draw_planted, want=_best_excluded, tags=("edge", "groups")),
        _route_sample(rng, "16 experts, top-4, bias N(0, 0.5) changes every pick (weights stay unbiased)", 21, 16,
                      4, 1, 1, True, 2.5, bias=0.5, want=_bias_changes_pick, tags=("edge",)),
        _route_sample(rng, "24 experts in 4 groups keep 2, top-3, bias N(0, 0.5) changes every pick", 21, 24, 3,
                      4, 2, bias=0.5, want=_bias_changes_pick, tags=("edge", "groups")),
        _route_sample(rng, "ties at the top-3 cut: logits from 5 levels, lower index first", 17, 16, 3, 1, 1,
                      bias=0, draw=_draw_levels, want=_tie_at_expert_cut, tags=("edge", "ties")),
        _route_sample(rng, "ties at the group cut: 16 experts in 4 groups keep 2, top-3, 5 levels", 17, 16, 3, 4,
                      2, bias=0, draw=_draw_levels, want=_tie_at_group_cut, tags=("edge", "ties", "groups")),
        _route_sample(rng, "ties: 12 experts in 3 groups keep 2, top-4 x2.5, logits from 5 levels", 17, 12, 4, 3,
                      2, True, 2.5, bias=0, draw=_draw_levels, tags=("edge", "ties", "groups")),
        Sample("all logits equal, 8 experts in 4 groups keep 2, top-3: experts 0, 1, 2",
               (torch.zeros(2, 8), torch.zeros(8), 3, 4, 2, True, 1.0), tags=("edge", "ties", "groups")),
        _route_sample(rng, "one token, V3 router", 1, e3, k3, g3, tg3, norm3, rsf3, tags=("decode", "model")),
        _route_sample(rng, "no tokens", 0, 16, 3, 4, 2, tags=("edge",)),
        _route_sample(rng, f"{v3['name']} router: {e3} experts in {g3} groups keep {tg3}, top-{k3} x{rsf3}, 5 tokens",
                      5, *v3_cfg, tags=("model", "groups")),
        _route_sample(rng, f"{v3['name']} router, best expert in an excluded group, 7 tokens", 7, *v3_cfg,
                      draw=_draw_planted, want=_best_excluded, tags=("model", "edge", "groups")),
        _route_sample(rng, f"{v2['name']} sizes (sigmoid scoring): {v2['n_routed_experts']} experts, "
                           f"top-{v2['num_experts_per_tok']}, no groups, unnormalized, 6 tokens", 6,
                      v2["n_routed_experts"], v2["num_experts_per_tok"], 1, 1, v2["norm_topk_prob"],
                      v2["routed_scaling_factor"], tags=("model",)),
    ]


def route_bench_samples(rng: torch.Generator) -> list[Sample]:
    """V3's router at 1 and 4,096 tokens: plain draws (timing needs no decided cuts, and plain draws are shapes
    only under torch's fake tensors, which ``dsfs bench --list`` and the asv suite use)."""
    e, k, g, tg = V3["n_routed_experts"], V3["num_experts_per_tok"], V3["n_group"], V3["topk_group"]
    b = randn(rng, e, scale=0.1)
    return [Sample(f"{V3['name']} router, {n} token{'s' * (n > 1)}",
                   (randn(rng, n, e), b, k, g, tg, True, V3["routed_scaling_factor"]), tags=("model",))
            for n in (1, 4096)]


def _route_flops(s: Sample, dtype) -> float:
    n, e = s.args[0].shape
    k = s.args[2]
    return float(n * (5 * e + 3 * k))  # sigmoid (4) and bias (1) per expert; normalize and scale per pick


def _route_bytes(s: Sample, dtype) -> float:
    n, e = s.args[0].shape
    k = s.args[2]
    return float(4 * (2 * n * e + e) + n * k * (8 + 4))  # logits, scores, bias; int64 ids and weights


ROUTE = OpSpec(
    name="route", reference=route,
    outputs=(Output("topk_idx", dtype="int", compare="equal"), Output("topk_weight", grad=True),
             Output("scores", grad=True)),
    grads=("logits",), dtypes=(torch.float32,), samples=route_samples, bench_samples=route_bench_samples,
    flops=_route_flops, bytes=_route_bytes,
    ours={"cuda": "kernels.triton.moe:route", "mlx": "runtime_mlx.kernels.moe:route"},
    source="DeepSeek-V3 report section 2.1.2 (eq. 12-16: sigmoid affinities, group-limited routing, the "
           "auxiliary-loss-free bias that picks but never weighs); official inference/model.py Gate",
)


# ============================================================================= grouped_gemm


def _offsets(counts, dtype=torch.int64) -> torch.Tensor:
    return torch.tensor([0, *counts]).cumsum(0).to(dtype)


def _gg_sample(rng, name, counts, n, k, nan_empty=False, index=torch.int64, dtypes=None, tags=()) -> Sample:
    """Rows (sum(counts), k), weights (E, n, k) scaled by k**-0.5, offsets of dtype ``index``; with ``nan_empty``
    the experts with no rows hold NaN (a kernel that reads them, or multiplies them by zero, fails)."""
    x = randn(rng, sum(counts), k)
    w = randn(rng, len(counts), n, k, scale=k**-0.5)
    if nan_empty:
        w[[e for e, c in enumerate(counts) if c == 0]] = float("nan")
    shape = f"{sum(counts)}x{k} @ {len(counts)}x{n}x{k}"
    return Sample(name, (x, w, _offsets(counts, index)), dtypes=dtypes, shape=shape, tags=tags)


def gg_samples(rng: torch.Generator) -> list[Sample]:
    """The battery's samples of `grouped_gemm`, seeded by ``rng`` (`OpSpec.samples`)."""
    h3, i3 = V3["hidden_size"], V3["moe_intermediate_size"]
    h2, i2 = V2_LITE["hidden_size"], V2_LITE["moe_intermediate_size"]
    bf16 = (torch.bfloat16,)
    return [
        _gg_sample(rng, "ragged segments 5,0,33,1,0,17", [5, 0, 33, 1, 0, 17], 20, 36, tags=("ragged",)),
        _gg_sample(rng, "empty first and last experts 0,40,0", [0, 40, 0], 33, 50, tags=("ragged", "edge")),
        _gg_sample(rng, "empty experts hold NaN weights (never read) 7,0,19,2,0", [7, 0, 19, 2, 0], 24, 40,
                   nan_empty=True, tags=("edge",)),
        _gg_sample(rng, "all rows in one of 5 experts, int32 offsets", [0, 0, 45, 0, 0], 17, 70, index=torch.int32,
                   tags=("edge",)),
        _gg_sample(rng, "no rows, 3 experts", [0, 0, 0], 12, 20, tags=("edge",)),
        _gg_sample(rng, "one decode token, top-8: one row each for 8 of 12 experts",
                   [1, 0, 1, 1, 0, 1, 1, 0, 1, 1, 1, 0], 24, 40, tags=("decode",)),
        # the model's reduction dims in full, its output dims sliced: under Triton's interpreter (32-wide tiles) the
        # backward over K = 7168 columns alone would take about 10 s (measured), so gate/up_proj are left out
        _gg_sample(rng, f"{V3['name']} down_proj: K = moe_intermediate {i3}, N = hidden {h3} sliced to 32, 2 of "
                        "256 experts, 5 rows", [3, 2], 32, i3, dtypes=bf16, tags=("model",)),
        _gg_sample(rng, f"{V2_LITE['name']} down_proj: K = moe_intermediate {i2}, N = hidden {h2} sliced to 32, "
                        "3 of 64 experts (first and last empty), 4 rows", [0, 4, 0], 32, i2, dtypes=bf16,
                   tags=("model",)),
    ]


def gg_bench_samples(rng: torch.Generator) -> list[Sample]:
    """The shapes ``dsfs bench`` times for `grouped_gemm` (`OpSpec.bench_samples`)."""
    out = []
    for m, ep in ((V3, 32), (V2_LITE, 8)):
        e = m["n_routed_experts"] // ep
        rows = 4096 * m["num_experts_per_tok"] // ep
        counts = [rows // e + (j < rows % e) for j in range(e)]
        h, i = m["hidden_size"], m["moe_intermediate_size"]
        for what, n, k in (("gate_proj", i, h), ("down_proj", h, i)):
            out.append(_gg_sample(rng, f"{m['name']} {what}, {e} of {m['n_routed_experts']} experts (one rank of "
                                       f"EP{ep}), 4096 tokens x top-{m['num_experts_per_tok']}: {rows} rows",
                                  counts, n, k, tags=("model",)))
    return out


def _gg_flops(s: Sample, dtype) -> float:
    x, w = s.args[0], s.args[1]
    return 2.0 * x.shape[0] * w.shape[1] * x.shape[1]


def _gg_bytes(s: Sample, dtype) -> float:
    x, w, offsets = s.args
    used = int((offsets.diff() > 0).sum())  # an empty expert's weights are not read
    return float((x.numel() + x.shape[0] * w.shape[1] + used * w.shape[1] * w.shape[2]) * dtype.itemsize
                 + offsets.numel() * offsets.element_size())


def _torch_grouped_mm():
    """``torch.nn.functional.grouped_mm`` (PyTorch >= 2.8) in the op's signature: cumulative int32 ends as
    ``offs``. Its CPU kernels need every row stride a multiple of 16 bytes, forward and backward, so K and N are
    zero-padded up to one where they are not (the model's sizes need no padding)."""
    import torch.nn.functional as F

    def grouped_gemm(x_sorted, w, offsets):
        align = 16 // x_sorted.element_size()
        n, pad_k, pad_n = w.shape[1], -x_sorted.shape[1] % align, -w.shape[1] % align
        if pad_k or pad_n:
            x_sorted, w = F.pad(x_sorted, (0, pad_k)), F.pad(w, (0, pad_k, 0, pad_n))
        return F.grouped_mm(x_sorted, w.transpose(1, 2), offs=offsets[1:].to(torch.int32))[:, :n]

    return grouped_gemm


GROUPED_GEMM = OpSpec(
    name="grouped_gemm", reference=grouped_gemm, outputs=(Output("y", grad=True),), grads=("x_sorted", "w"),
    samples=gg_samples, bench_samples=gg_bench_samples, flops=_gg_flops, bytes=_gg_bytes,
    ours={"cuda": "kernels.triton.grouped_gemm:grouped_gemm", "mlx": "runtime_mlx.kernels.moe:grouped_gemm"},
    builtin={"torch": _torch_grouped_mm},
    source="DeepSeek-V3 report section 2.1.2 (DeepSeekMoE: routed experts over expert-sorted tokens)",
)

SPECS = [ROUTE, GROUPED_GEMM]
