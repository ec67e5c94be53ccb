"""The fine-grained FP8 op specs (DeepSeek-V3 report section 3.3; `reference.fp8`): `act_quant` (e4m3 per 1 x 128
tile; power-of-two UE8M0 scales; fused with the transpose Wgrad needs), `weight_dequant` (128 x 128 blocks),
`fp8_gemm` (block-scaled matmul, float32 accumulation; weight block scales or per-row tile scales),
`fp8_grouped_gemm` (the routed experts' grouped FP8 GEMM) and `fp8_grouped_wgrad` (the routed experts' Wgrad:
per-segment transposed quantization and GEMM).

Contracts:
- ``act_quant`` and ``weight_dequant`` are exact: the same float32 operations as the reference (an IEEE division
  ``x / s``, round to nearest even into e4m3; one float32 product rounded once to the output dtype), so the e4m3
  bits, the scales and the dequantized values are compared for equality.
- ``fp8_gemm`` is compared with the reference's float32 accumulation of exact fp8 products (which is within about
  1e-7 of the float64 product of the dequantized operands, measured) with the dtype's bound, except float32
  output: 5e-4, since fp8 tensor cores keep about 14 bits while accumulating within a 128-wide K-block (report
  section 3.3.2; the float32 scale-and-add promotion after each block is what the bound still pins).

The references see the candidate's own inputs (``reference_float64=False``): the FP8 values and float32 scales are
the inputs, not approximations of float64 ones. ``dtype`` / ``out_dtype`` arguments follow the dtype under test:
each such sample exists once per dtype (restricted to it by ``Sample.dtypes``).
"""

from __future__ import annotations

import torch

from reference.fp8 import (
    FP8_DTYPE,
    act_quant,
    fp8_gemm,
    fp8_grouped_gemm,
    fp8_grouped_wgrad,
    stacked_weight_quant,
    weight_dequant,
    weight_quant,
)

from .shapes import V2_LITE, V3
from .spec import FLOATS, OpSpec, Output, Sample, randn


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def tiles_spanning(rng: torch.Generator, rows: int, cols: int, block: int = 128, block_rows: int = 1) -> torch.Tensor:
    """(rows, cols) N(0, 1) values scaled by a different power of ten (1e-2 .. 1e2) per ``block_rows`` x ``block``
    tile, so scales differ from tile to tile (a wrong tile index shows)."""
    f = 10.0 ** (torch.rand(_cdiv(rows, block_rows), _cdiv(cols, block), generator=rng) * 4 - 2)
    f = f.repeat_interleave(block_rows, 0)[:rows].repeat_interleave(block, 1)[:, :cols]
    return randn(rng, rows, cols) * f


def _per_dtype(name: str, args: tuple, keep: tuple[str, ...], tags: tuple[str, ...], shape: str | None = None,
               dtypes=FLOATS) -> list[Sample]:
    """One sample per output dtype: ``args`` ends with the output dtype argument, set to the dtype under test."""
    return [Sample(f"{name}, {str(d).replace('torch.', '')} out", (*args, d), keep=keep, dtypes=(d,), shape=shape,
                   tags=tags) for d in dtypes]


# ============================================================================= act_quant


def _rounding_rows(rng: torch.Generator) -> torch.Tensor:
    """16 rows of 128 whose first value is 448, so every scale is exactly 1 and y is x rounded to e4m3: values whose
    rounding carries into the next binade (-7.85 -> -8, 31.55 -> 32), ties (15.5), subnormals (2^-10, 3 * 2^-10),
    values that round to zero, and random magnitudes from 1e-6 to 4e2."""
    special = torch.tensor([-7.85, 31.55, 15.5, -0.4687, 2.0**-7 * 1.0625, -(2.0**-10), 3 * 2.0**-10, 1e-30, 0.0,
                            448.0, -448.0, 2.0**-9, -(2.0**-10) * 1.5])
    n = 16 * 127 - len(special)
    rand = (torch.rand(n, generator=rng) * 2 - 1) * 10.0 ** (torch.rand(n, generator=rng) * 8.6 - 6)
    v = torch.cat([special, rand]).reshape(16, 127)
    return torch.cat([torch.full((16, 1), 448.0), v], dim=1)


def act_quant_samples(rng: torch.Generator) -> list[Sample]:
    """The battery's samples of `act_quant`, seeded by ``rng`` (`OpSpec.samples`)."""
    zero = tiles_spanning(rng, 3, 300)
    zero[0, 128:256] = 0.0  # an all-zero tile: amax clamped to 1e-4, y all zeros
    zero[1, 256:] = 0.0  # an all-zero partial tile
    zero[2, :128] *= 1e-7  # amax below 1e-4: the values land among e4m3's subnormals
    h3, i3, h2 = V3["hidden_size"], V3["moe_intermediate_size"], V2_LITE["hidden_size"]
    return [
        Sample("ragged K = 300 (last tile 44 wide), tiles spanning 1e-2..1e2", (tiles_spanning(rng, 18, 300)
                                                                               .reshape(2, 9, 300), 128),
               tags=("ragged",)),
        Sample("K = 50 < block: one partial tile", (tiles_spanning(rng, 5, 50), 128), tags=("ragged",)),
        Sample("zero tiles (amax clamped to 1e-4), a tile below 1e-4 (subnormals)", (zero, 128), tags=("edge",)),
        Sample("scale exactly 1: rounding that carries a binade, ties to even, subnormals",
               (_rounding_rows(rng), 128), tags=("edge",)),
        Sample("block_size 64, K = 200", (tiles_spanning(rng, 4, 200, 64), 64), tags=("ragged",)),
        Sample("ue8m0 scales (powers of two), ragged K = 300, a zero tile", (zero, 128, "ue8m0"), tags=("edge",)),
        Sample("ue8m0 scales, scale exactly 1 rows", (_rounding_rows(rng), 128, "ue8m0"), tags=("edge",)),
        Sample("transpose (Wgrad's 128 x 1 tiles): x 300 x 70, tiles along the 300 rows",
               (tiles_spanning(rng, 300, 70, 1, 128), 128, None, True), tags=("ragged",)),
        Sample("transpose with ue8m0 scales, x 200 x 130", (tiles_spanning(rng, 200, 130, 1, 128), 128, "ue8m0", True),
               tags=("ragged",)),
        Sample("no rows", (randn(rng, 0, 256), 128), tags=("edge",)),
        Sample(f"one decode token, {V3['name']} hidden {h3}", (tiles_spanning(rng, 1, h3).reshape(1, 1, h3), 128),
               tags=("decode", "model")),
        Sample(f"{V3['name']} hidden {h3}, 4 tokens", (tiles_spanning(rng, 4, h3), 128), tags=("model",)),
        Sample(f"{V3['name']} down_proj input (moe_intermediate {i3}), 4 tokens", (tiles_spanning(rng, 4, i3), 128),
               tags=("model",)),
        Sample(f"{V2_LITE['name']} hidden {h2}, 4 tokens", (tiles_spanning(rng, 4, h2), 128), tags=("model",)),
    ]


def act_quant_bench_samples(rng: torch.Generator) -> list[Sample]:
    """The shapes ``dsfs bench`` times for `act_quant` (`OpSpec.bench_samples`)."""
    h = V3["hidden_size"]
    return [Sample(f"{V3['name']} hidden {h}, {n} token{'s' * (n > 1)}", (randn(rng, n, h), 128), tags=("model",))
            for n in (1, 4096)]


def _act_quant_bytes(s: Sample, dtype) -> float:
    x, bs = s.args
    return float(x.numel() * (dtype.itemsize + 1) + _cdiv(x.shape[-1], bs) * (x.numel() // max(1, x.shape[-1])) * 4)


ACT_QUANT = OpSpec(
    name="act_quant", reference=act_quant,
    outputs=(Output("y", dtype=FP8_DTYPE, compare="equal"), Output("s", dtype=torch.float32, compare="equal")),
    samples=act_quant_samples, bench_samples=act_quant_bench_samples, reference_float64=False,
    flops=lambda s, dtype: 5.0 * s.args[0].numel(),  # |x|, max, divide, clamp, round
    bytes=_act_quant_bytes,
    ours={"cuda": "kernels.triton.fp8:act_quant", "mlx": "runtime_mlx.kernels.fp8:act_quant"},
    source="DeepSeek-V3 report section 3.3 (fine-grained quantization, 1 x 128 activation tiles); official "
           "inference/kernel.py act_quant",
)


# ============================================================================= weight_dequant


def _all_bit_patterns(n: int, k: int) -> torch.Tensor:
    """(n, k) e4m3 values cycling through all 256 bit patterns but the two NaNs (0x7f, 0xff), which become 0."""
    bits = torch.arange(256, dtype=torch.uint8)
    bits[(bits & 0x7F) == 0x7F] = 0
    return bits.repeat(_cdiv(n * k, 256))[: n * k].reshape(n, k).view(FP8_DTYPE)


def weight_dequant_samples(rng: torch.Generator) -> list[Sample]:
    """The battery's samples of `weight_dequant`, seeded by ``rng`` (`OpSpec.samples`)."""
    keep = ("scale_inv",)
    out = []
    wq, ws = weight_quant(tiles_spanning(rng, 200, 300, 128, 128))
    out += _per_dtype("ragged 200 x 300: partial edge blocks", (wq, ws, 128), keep, ("ragged",))
    bits = _all_bit_patterns(129, 131)
    out += _per_dtype("every e4m3 bit pattern but NaN, 2 x 2 blocks (partial)",
                      (bits, torch.rand(2, 2, generator=rng) * 4 + 0.5, 128), keep, ("edge",))
    w = tiles_spanning(rng, 150, 260, 128, 128)
    w[128:, 128:256] = 0.0  # a zero block: scale 1e-4 / 448, values 0
    wq, ws = weight_quant(w)
    out += _per_dtype("a zero block (amax clamped to 1e-4)", (wq, ws, 128), keep, ("edge",))
    wq, ws = weight_quant(tiles_spanning(rng, 100, 70, 64, 64), 64)
    out += _per_dtype("block_size 64, 100 x 70", (wq, ws, 64), keep, ("ragged",))
    # the model's K in full, rows sliced (Triton's interpreter takes about 8 ms per 128 x 128 block: all of V3's
    # 2048 x 7168 would take 7 s per dtype); bfloat16 out, as the model dequantizes
    for m, what, n, k, rows in ((V3, "expert gate_proj (1 of 256)", V3["moe_intermediate_size"], V3["hidden_size"],
                                 300),
                                (V2_LITE, "expert gate_proj (1 of 64)", V2_LITE["moe_intermediate_size"],
                                 V2_LITE["hidden_size"], 600)):
        wq, ws = weight_quant(tiles_spanning(rng, rows, k, 128, 128))
        out += _per_dtype(f"{m['name']} {what} {n} x {k}, rows sliced to {rows}", (wq, ws, 128), keep, ("model",),
                          dtypes=(torch.bfloat16,))
    return out


def weight_dequant_bench_samples(rng: torch.Generator) -> list[Sample]:
    """The shapes ``dsfs bench`` times for `weight_dequant` (`OpSpec.bench_samples`)."""
    keep, out = ("scale_inv",), []
    for what, n, k in (("expert gate_proj", V3["moe_intermediate_size"], V3["hidden_size"]),
                       ("q_b_proj", V3["num_attention_heads"] * (V3["qk_nope_head_dim"] + V3["qk_rope_head_dim"]),
                        V3["q_lora_rank"])):
        wq, ws = weight_quant(randn(rng, n, k))
        out += _per_dtype(f"{V3['name']} {what} {n} x {k}", (wq, ws, 128), keep, ("model",),
                          dtypes=(torch.bfloat16,))
    return out


def _dequant_bytes(s: Sample, dtype) -> float:
    w, scale_inv = s.args[0], s.args[1]
    return float(w.numel() * (1 + dtype.itemsize) + scale_inv.numel() * 4)


WEIGHT_DEQUANT = OpSpec(
    name="weight_dequant", reference=weight_dequant, outputs=(Output("w", compare="equal"),),
    samples=weight_dequant_samples, bench_samples=weight_dequant_bench_samples, reference_float64=False,
    flops=lambda s, dtype: float(s.args[0].numel()), bytes=_dequant_bytes,
    ours={"cuda": "kernels.triton.fp8:weight_dequant", "mlx": "runtime_mlx.kernels.fp8:weight_dequant"},
    source="DeepSeek-V3 report section 3.3 (128 x 128 weight blocks); official inference/kernel.py weight_dequant "
           "(weight_scale_inv of the FP8 checkpoints)",
)


# ============================================================================= fp8_gemm


def _operands(rng, lead: tuple[int, ...], n: int, k: int, bs: int = 128, zero: bool = False, rows: bool = False):
    """(a, a_s, b, b_s): activations ``lead + (k,)`` and weights (n, k) spanning many binades, quantized by the
    reference; with ``zero`` an all-zero activation tile and weight block (amax clamped); with ``rows`` b is
    quantized as an activation (per-row 1 x bs tiles: Wgrad's operands)."""
    m = 1
    for d in lead:
        m *= d
    x, w = tiles_spanning(rng, m, k, bs), tiles_spanning(rng, n, k, bs, bs)
    if zero:
        x[0, :bs] = 0.0
        w[-1, -1] = 0.0
        w[(n - 1) // bs * bs:, (k - 1) // bs * bs:] = 0.0  # the last (partial) block
    a, a_s = act_quant(x.reshape(*lead, k), bs)
    b, b_s = act_quant(w, bs) if rows else weight_quant(w, bs)
    return a, a_s, b, b_s


def fp8_gemm_samples(rng: torch.Generator) -> list[Sample]:
    """The battery's samples of `fp8_gemm`, seeded by ``rng`` (`OpSpec.samples`)."""
    keep, out = ("a_s", "b_s"), []

    def add(name, ops, bs, tags, dtypes=FLOATS):
        shape = f"{'x'.join(map(str, ops[0].shape))} @ {ops[2].shape[0]}x{ops[2].shape[1]}"
        out.extend(_per_dtype(name, (*ops, bs), keep, tags, shape, dtypes))

    add("ragged K = 300, N = 200 (partial blocks), leading dims 5 x 7", _operands(rng, (5, 7), 200, 300), 128,
        ("ragged",))
    add("K = 50 < block, N = 70", _operands(rng, (3,), 70, 50), 128, ("ragged",))
    add("a zero tile and a zero block (amax clamped to 1e-4)", _operands(rng, (6,), 150, 260, zero=True), 128,
        ("edge",))
    add("block_size 64, K = 200, N = 100", _operands(rng, (9,), 100, 200, 64), 64, ("ragged",))
    no_f16 = (torch.float32, torch.bfloat16)  # values spanning 1e-2..1e2 on both sides overflow float16's 65504
    add("Wgrad: per-row b scales (N, KB) from act_quant, N = 200, K = 300", _operands(rng, (70,), 200, 300, rows=True),
        128, ("ragged",), no_f16)
    add("per-row b scales, N = 1 (both readings agree)", _operands(rng, (5,), 1, 130, rows=True), 128, ("edge",))
    h3, i3 = V3["hidden_size"], V3["moe_intermediate_size"]
    h2, i2 = V2_LITE["hidden_size"], V2_LITE["moe_intermediate_size"]
    bf16 = (torch.bfloat16,)
    # K in full, N sliced: Triton's interpreter would take 11 s for all 2048 rows of V3's gate_proj
    add(f"one decode token x {V3['name']} expert gate_proj {i3} x {h3} (1 of 256), N sliced to 256",
        _operands(rng, (1,), 256, h3), 128, ("decode", "model"), bf16)
    add(f"{V2_LITE['name']} expert gate_proj {i2} x {h2} (1 of 64), 4 tokens", _operands(rng, (4,), i2, h2), 128,
        ("model",), bf16)
    return out


def fp8_gemm_bench_samples(rng: torch.Generator) -> list[Sample]:
    """The shapes ``dsfs bench`` times for `fp8_gemm` (`OpSpec.bench_samples`)."""
    keep, out = ("a_s", "b_s"), []
    i3, h3 = V3["moe_intermediate_size"], V3["hidden_size"]
    for n_tok in (1, 4096):
        x = randn(rng, n_tok, h3)
        a, a_s = act_quant(x)
        b, b_s = weight_quant(randn(rng, i3, h3))
        out += _per_dtype(f"{V3['name']} expert gate_proj {i3} x {h3}, {n_tok} token{'s' * (n_tok > 1)}",
                          (a, a_s, b, b_s, 128), keep, ("model",), dtypes=(torch.bfloat16,))
    return out


def _gemm_flops(s: Sample, dtype) -> float:
    a, b = s.args[0], s.args[2]
    return 2.0 * (a.numel() // max(1, a.shape[-1])) * b.shape[0] * b.shape[1]


def _gemm_bytes(s: Sample, dtype) -> float:
    a, a_s, b, b_s = s.args[:4]
    m = a.numel() // max(1, a.shape[-1])
    return float(a.numel() + b.numel() + 4 * (a_s.numel() + b_s.numel()) + m * b.shape[0] * dtype.itemsize)


FP8_GEMM = OpSpec(
    name="fp8_gemm", reference=fp8_gemm, outputs=(Output("c", bound={torch.float32: 5e-4}),),
    samples=fp8_gemm_samples, bench_samples=fp8_gemm_bench_samples, reference_float64=False,
    flops=_gemm_flops, bytes=_gemm_bytes,
    ours={"cuda": "kernels.triton.fp8:fp8_gemm", "mlx": "runtime_mlx.kernels.fp8:fp8_gemm"},
    source="DeepSeek-V3 report section 3.3 (fine-grained quantization, increased accumulation precision: "
           "promotion to float32 every 128 elements of K); official inference/kernel.py fp8_gemm",
)

# ============================================================================= fp8_grouped_gemm


def _grouped_operands(rng, counts: list[int], n: int, k: int, bs: int = 128):
    """(a, a_s, b, b_s, offsets) for experts with ``counts`` rows each, weights (E, n, k) spanning many binades."""
    m, e = sum(counts), len(counts)
    a, a_s = act_quant(tiles_spanning(rng, m, k, bs), bs)
    b, b_s = stacked_weight_quant(tiles_spanning(rng, e * n, k, bs, bs).reshape(e, n, k), bs)
    offsets = torch.tensor([0, *counts]).cumsum(0)
    return a, a_s, b, b_s, offsets


def fp8_grouped_gemm_samples(rng: torch.Generator) -> list[Sample]:
    """The battery's samples of `fp8_grouped_gemm`, seeded by ``rng`` (`OpSpec.samples`)."""
    keep, out = ("a_s", "b_s"), []

    def add(name, ops, tags, dtypes=FLOATS):
        shape = f"{ops[0].shape[0]}x{ops[0].shape[1]} @ {'x'.join(map(str, ops[2].shape))}"
        out.extend(_per_dtype(name, (*ops, 128), keep, tags, shape, dtypes))

    add("4 experts, ragged rows 5/0/37/20 (an empty expert), N = 200, K = 300",
        _grouped_operands(rng, [5, 0, 37, 20], 200, 300), ("ragged",), (torch.float32, torch.bfloat16))
    add("one expert holds every row, 3 empty", _grouped_operands(rng, [0, 0, 40, 0], 70, 130), ("edge",))
    add("no rows at all", _grouped_operands(rng, [0, 0], 64, 128), ("edge",))
    i2, h2 = V2_LITE["moe_intermediate_size"], V2_LITE["hidden_size"]
    add(f"{V2_LITE['name']} experts gate_proj {i2} x {h2}, 8 of 64 experts, 24 routed rows, N sliced to 256",
        _grouped_operands(rng, [3, 5, 0, 4, 2, 6, 1, 3], 256, h2), ("model",), (torch.bfloat16,))
    return out


def fp8_grouped_gemm_bench_samples(rng: torch.Generator) -> list[Sample]:
    """The shapes ``dsfs bench`` times for `fp8_grouped_gemm` (`OpSpec.bench_samples`): 4096 tokens routed top-8
    over 32 of DeepSeek-V3's experts (gate_proj 2048 x 7168), balanced."""
    i3, h3 = V3["moe_intermediate_size"], V3["hidden_size"]
    a, a_s = act_quant(randn(rng, 1024 * 32, h3))
    b, b_s = stacked_weight_quant(randn(rng, 32, i3, h3))
    offsets = torch.arange(33) * 1024
    return _per_dtype(f"{V3['name']} gate_proj {i3} x {h3}, 32 experts x 1024 rows", (a, a_s, b, b_s, offsets, 128),
                      ("a_s", "b_s"), ("model",), dtypes=(torch.bfloat16,))


def _grouped_flops(s: Sample, dtype) -> float:
    a, b = s.args[0], s.args[2]
    return 2.0 * a.shape[0] * b.shape[1] * b.shape[2]


def _grouped_bytes(s: Sample, dtype) -> float:
    a, a_s, b, b_s = s.args[:4]
    return float(a.numel() + b.numel() + 4 * (a_s.numel() + b_s.numel()) + a.shape[0] * b.shape[1] * dtype.itemsize)


FP8_GROUPED_GEMM = OpSpec(
    name="fp8_grouped_gemm", reference=fp8_grouped_gemm, outputs=(Output("c", bound={torch.float32: 5e-4}),),
    samples=fp8_grouped_gemm_samples, bench_samples=fp8_grouped_gemm_bench_samples, reference_float64=False,
    flops=_grouped_flops, bytes=_grouped_bytes,
    ours={"cuda": "kernels.triton.fp8:fp8_grouped_gemm", "mlx": "runtime_mlx.kernels.fp8:fp8_grouped_gemm"},
    source="DeepSeek-V3 report sections 2.1.2 (routed experts) and 3.3 (FP8 GEMMs, promotion every 128 elements)",
)

# ============================================================================= fp8_grouped_wgrad


def _wgrad_operands(rng, counts: list[int], n: int, k: int, bs: int = 128):
    """(dy, x, offsets) for experts with ``counts`` rows each: dy (M, n) and x (M, k) spanning many binades per
    bs x 1 tile (Wgrad's tiles run along the rows), offsets int64."""
    m = sum(counts)
    dy, x = tiles_spanning(rng, n, m, bs).T.contiguous(), tiles_spanning(rng, k, m, bs).T.contiguous()
    return dy, x, torch.tensor([0, *counts]).cumsum(0)


def fp8_grouped_wgrad_samples(rng: torch.Generator) -> list[Sample]:
    """The battery's samples of `fp8_grouped_wgrad`, seeded by ``rng`` (`OpSpec.samples`). Inputs stay below
    float16's range (the dtypes under test are the inputs')."""
    def add(name, ops, tags, *rest, dtypes=None):
        dy, x, offsets = ops
        shape = f"{dy.shape[0]}x{dy.shape[1]}, {x.shape[0]}x{x.shape[1]}, E={offsets.numel() - 1}"
        out.append(Sample(name, (*ops, 128, *rest), shape=shape, tags=tags, dtypes=dtypes))

    out: list[Sample] = []
    add("4 experts, ragged rows 5/0/170/20 (an empty expert; 170 = 128 + a partial 42-row tile), N = 200, K = 300",
        _wgrad_operands(rng, [5, 0, 170, 20], 200, 300), ("ragged",))
    add("ue8m0 scales, ragged rows 0/130/3/0, N = 70, K = 130", _wgrad_operands(rng, [0, 130, 3, 0], 70, 130),
        ("ragged", "edge"), "ue8m0")
    dy, x, offsets = _wgrad_operands(rng, [40, 0, 100], 64, 150)
    dy[40:, :] = 0.0  # an all-zero tile (amax clamped to 1e-4): zeros out
    add("an all-zero dy segment (amax clamped to 1e-4), N = 64, K = 150", (dy, x, offsets), ("edge",))
    add("no rows at all, 3 experts", _wgrad_operands(rng, [0, 0, 0], 64, 128), ("edge",))
    i2, h2 = V2_LITE["moe_intermediate_size"], V2_LITE["hidden_size"]
    add(f"{V2_LITE['name']} experts gate_proj Wgrad {i2} x {h2}, 8 of 64 experts, 150 routed rows, N sliced to 128, "
        f"K to 256", _wgrad_operands(rng, [30, 5, 0, 40, 2, 60, 1, 12], 128, 256), ("model",),
        dtypes=(torch.bfloat16,))
    return out


def fp8_grouped_wgrad_bench_samples(rng: torch.Generator) -> list[Sample]:
    """The shapes ``dsfs bench`` times for `fp8_grouped_wgrad` (`OpSpec.bench_samples`): the gate_proj Wgrad of
    32 of DeepSeek-V3's experts (2048 x 7168) over 1024 rows each."""
    i3, h3 = V3["moe_intermediate_size"], V3["hidden_size"]
    dy, x = randn(rng, 1024 * 32, i3), randn(rng, 1024 * 32, h3)
    return [Sample(f"{V3['name']} gate_proj Wgrad {i3} x {h3}, 32 experts x 1024 rows",
                   (dy, x, torch.arange(33) * 1024, 128), tags=("model",), dtypes=(torch.bfloat16,))]


def _wgrad_flops(s: Sample, dtype) -> float:
    dy, x = s.args[:2]
    return 2.0 * dy.shape[0] * dy.shape[1] * x.shape[1]


def _wgrad_bytes(s: Sample, dtype) -> float:
    dy, x, offsets = s.args[:3]
    e = offsets.numel() - 1
    return float((dy.numel() + x.numel()) * dtype.itemsize + 4 * e * dy.shape[1] * x.shape[1])


FP8_GROUPED_WGRAD = OpSpec(
    name="fp8_grouped_wgrad", reference=fp8_grouped_wgrad,
    # The quantization of the inputs is exact (the same float32 operations as the reference: bits and scales equal),
    # so what is left is the GEMM's accumulation, bounded as fp8_gemm's for float32 out: fp8 tensor cores keep about
    # 14 bits within a 128-token tile; the float32 promotion per tile is what the bound pins.
    outputs=(Output("dw", dtype=torch.float32, bound=5e-4),),
    samples=fp8_grouped_wgrad_samples, bench_samples=fp8_grouped_wgrad_bench_samples, reference_float64=False,
    flops=_wgrad_flops, bytes=_wgrad_bytes,
    ours={"cuda": "kernels.triton.fp8:fp8_grouped_wgrad", "mlx": "runtime_mlx.kernels.fp8:fp8_grouped_wgrad"},
    source="DeepSeek-V3 report sections 3.3 (Wgrad's operands re-tiled to 128 x 1 along the tokens, FP8 GEMMs "
           "promoted to float32 every 128 elements) and 2.1.2 (routed experts)",
)

SPECS = [ACT_QUANT, WEIGHT_DEQUANT, FP8_GEMM, FP8_GROUPED_GEMM, FP8_GROUPED_WGRAD]
