"""runtime_mlx FP8: the batteries of act_quant (1x128 tiles), weight_dequant (128x128 blocks), fp8_gemm,
fp8_grouped_gemm and fp8_grouped_wgrad on every path (`reference.testing.fp8`), NaN inputs beyond the spec, the ue8m0
scales, transposed quantization and per-row scales; FP8 training (`runtime_mlx.fp8`: fp8_linear, fp8_swiglu_mlp,
enable_fp8_training) against `reference.fp8_training` on the same values, forward and gradients; and `MLXTrainer`'s
precisions (fp8 and bf16 steps against fp32, bfloat16 optimizer moments and an exact resume)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import pytest
import torch
from mlx.utils import tree_flatten

from reference import Model as ReferenceModel
from reference import ModelConfig
from reference import fp8 as ref_fp8
from reference import fp8_training as ref_training
from reference.testing import assert_close
from reference.testing.pytest_plugin import cases, check_case
from runtime_mlx import kernels as K
from runtime_mlx.fp8 import FP8MLP, FP8Experts, FP8Linear, enable_fp8_training, fp8_linear, fp8_swiglu_mlp
from runtime_mlx.kernels.fp8 import (
    act_dequant,
    fp8_grouped_gemm,
    fp8_grouped_wgrad,
    to_e4m3,
    ue8m0_ceil,
    weight_quant,
    weight_quant_mlx,
)
from runtime_mlx.train import MLXTrainer, from_reference
from tests.mlx.kernel_refs import spread
from tests.mlx.utils import PATHS, model_pair, to_mx, to_torch
from tests.reference_utils import make_config, randomize_
from tests.test_train import MICRO_MODEL


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", cases("act_quant"))
def test_act_quant_battery(path, case):
    """The act_quant battery: the e4m3 bits (uint8 here) and the scales, exactly, on the path ``path``."""
    check_case(case, K.act_quant, "mlx")
    assert K.kernel_path("act_quant") == path


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", cases("weight_dequant"))
def test_weight_dequant_battery(path, case):
    """The weight_dequant battery (its ``dtype`` argument becomes the mx dtype of the same name), exactly."""
    check_case(case, K.weight_dequant, "mlx")
    assert K.kernel_path("weight_dequant") == path


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", cases("fp8_gemm"))
def test_fp8_gemm_battery(path, case):
    """The fp8_gemm battery: float32 accumulation of each K block's exact e4m3 products, scaled per block, in the
    output dtype under test (``out_dtype`` becomes the mx dtype of the same name), on the path ``path``."""
    check_case(case, K.fp8_gemm, "mlx")


def _cases_if_specified(op: str) -> list:
    """``cases(op)``, or one skipped case while the spec of ``op`` is not in `reference.testing` yet."""
    try:
        return cases(op)
    except KeyError:
        return [pytest.param(None, marks=pytest.mark.skip(reason=f"no {op} spec in reference.testing yet"))]


@pytest.mark.parametrize("case", _cases_if_specified("fp8_grouped_gemm"))
def test_fp8_grouped_gemm_battery(case):
    """The fp8_grouped_gemm battery (pure MLX: ``mx.gather_mm`` per K block), as fp8_gemm's."""
    check_case(case, fp8_grouped_gemm, "mlx")


@pytest.mark.parametrize("case", _cases_if_specified("fp8_grouped_wgrad"))
def test_fp8_grouped_wgrad_battery(case):
    """The fp8_grouped_wgrad battery (a loop over the experts of `act_quant` transposed and `fp8_gemm`): ragged and
    empty segments, partial tiles, ue8m0 scales, float32/bfloat16/float16 inputs, float32 out."""
    check_case(case, fp8_grouped_wgrad, "mlx")


def test_fp8_grouped_wgrad_refuses_bad_offsets():
    """Offsets that do not split the rows, of the wrong dtype or rank are errors."""
    dy, x = mx.zeros((5, 3)), mx.zeros((5, 4))
    for bad in ([0, 3, 2, 5], [0, 4], [1, 5]):
        with pytest.raises(ValueError, match="offsets must run nondecreasing"):
            fp8_grouped_wgrad(dy, x, mx.array(bad))
    with pytest.raises(TypeError, match="offsets"):
        fp8_grouped_wgrad(dy, x, mx.array([0.0, 5.0]))
    with pytest.raises(ValueError, match="same M"):
        fp8_grouped_wgrad(dy, x[:4], mx.array([0, 5]))
    assert fp8_grouped_wgrad(dy[:0], x[:0], mx.array([0])).shape == (0, 3, 4)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape,bs", [((3, 5, 300), 128), ((7, 64), 32), ((2, 1), 128)])
def test_act_quant_nan_tile(path, shape, bs):
    """Beyond the spec (whose comparisons never pass a NaN): a NaN makes its tile's scale NaN and its values the
    e4m3 NaN 0x7F, as the reference; the other tiles are untouched."""
    x = spread(*shape)
    x[0, ..., :3] = 0.0
    x[-1, ..., -1] = float("nan")
    y_ref, s_ref = ref_fp8.act_quant(x, bs)
    y, s = K.act_quant(to_mx(x), bs)
    assert y.dtype == mx.uint8 and s.dtype == mx.float32
    assert torch.equal(to_torch(s).nan_to_num(-1.0), s_ref.nan_to_num(-1.0))  # scales are > 0: -1 marks NaN
    assert torch.equal(to_torch(y), y_ref.view(torch.uint8))  # round-to-nearest-even e4m3 bits, exactly


def test_weight_dequant_refuses_a_non_mlx_dtype():
    """The battery passes the mx dtype of the same name as the spec's torch dtype; a torch dtype here is an error."""
    w_fp8, s = ref_fp8.weight_quant(spread(45, 70), 32)
    with pytest.raises(TypeError, match="dtype: expected an mx.Dtype"):
        K.weight_dequant(to_mx(w_fp8), to_mx(s), 32, torch.bfloat16)


def test_fp8_gemm_default_out_dtype_and_refusals():
    """``out_dtype=None`` is float32 (the reference's default, ``torch.get_default_dtype()``; the same result within
    float32 accumulation); a torch dtype, float (not e4m3 bits) operands and mismatched scales are errors."""
    a, a_s = ref_fp8.act_quant(spread(3, 200), 64)
    b, b_s = ref_fp8.weight_quant(spread(70, 200), 64)
    args = [to_mx(t) for t in (a, a_s, b, b_s)]
    c = K.fp8_gemm(*args, 64)
    assert c.dtype == mx.float32
    assert_close(to_torch(c), ref_fp8.fp8_gemm(a, a_s, b, b_s, 64), bound=1e-6)
    with pytest.raises(TypeError, match="out_dtype: expected an mx.Dtype"):
        K.fp8_gemm(*args, 64, torch.bfloat16)
    with pytest.raises(TypeError, match="a: expected a uint8"):
        K.fp8_gemm(args[0].astype(mx.float32), *args[1:], 64)
    with pytest.raises(ValueError, match="b_s: expected shape"):
        K.fp8_gemm(*args[:3], args[3][:, :1], 64)


# ------------------------------------------------------------------------------ ue8m0, transpose, per-row scales


def test_ue8m0_ceil_is_the_references():
    """Power-of-two scales, exactly: powers of two stay, anything above one goes to the next power (float32 bits);
    the smallest normal, the largest finite (to inf, as the reference), subnormal scales and NaN, as
    `reference.fp8.round_scale_ue8m0`."""
    s = torch.tensor([1.0, 1.5, 2.0**-20, 2.0**-20 * 1.0000001, 448.0, 1e-4 / 448, 3.0e38, 2.0**-126, 2.0**-140, 0.75,
                      float("nan"), float("inf")])
    s = torch.cat([s, torch.rand(500) * 10.0 ** (torch.rand(500) * 12 - 9)])
    want = ref_fp8.round_scale_ue8m0(s)
    got = to_torch(ue8m0_ceil(to_mx(s)))
    assert torch.equal(got.nan_to_num(-1.0), want.nan_to_num(-1.0))
    normal = got.isfinite() & (s >= 2.0**-126)  # a subnormal s rounds up to the smallest normal, 2^-126
    mant, _ = torch.frexp(got[normal])
    assert (mant == 0.5).all() and (got[normal] >= s[normal]).all() and (got[normal] < 2 * s[normal]).all()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape,bs", [((37, 300), 128), ((70, 45), 32), ((1, 5), 128)])
@pytest.mark.parametrize("fmt", [None, "ue8m0"])
def test_act_quant_scale_fmt_and_transpose(path, shape, bs, fmt):
    """act_quant with ``scale_fmt`` (float32 or power-of-two scales) and ``transpose`` (bs x 1 tiles of x, the Wgrad
    operand) against the reference: the e4m3 bits and the scales, exactly; a NaN's tile NaN in both layouts."""
    x = spread(*shape)
    x[0, 0] = float("nan")
    for transpose in (False, True):
        y_ref, s_ref = ref_fp8.act_quant(x, bs, fmt, transpose=transpose)
        y, s = K.act_quant(to_mx(x), bs, fmt, transpose=transpose)
        assert K.kernel_path("act_quant") == path
        assert torch.equal(to_torch(y), y_ref.view(torch.uint8)), transpose
        assert torch.equal(to_torch(s).nan_to_num(-1.0), s_ref.nan_to_num(-1.0)), transpose


def test_ue8m0_round_trip():
    """With ue8m0 scales the same power of two quantizes and dequantizes: ``dequant = e4m3 * s`` is exact, so
    dividing it by ``s`` gives back the e4m3 bits, for activations (1 x 128 tiles) and weights (128 x 128 blocks);
    the dequantized values are within e4m3's rounding of x (half a step: 2^-4 relative, or a subnormal step)."""
    x = spread(9, 300)
    y, s = K.act_quant(to_mx(x), 128, "ue8m0")
    deq = act_dequant(y, s, 128)
    s_cols = mx.repeat(s, 128, axis=-1)[:, :300]
    assert mx.array_equal(to_e4m3(deq / s_cols), y).item()
    err = (to_torch(deq) - x).abs()
    assert (err <= x.abs() * 2.0**-4 + to_torch(s_cols) * 2.0**-10).all()
    w = spread(150, 260)
    wq, ws = weight_quant(to_mx(w), 128, "ue8m0")
    wd = K.weight_dequant(wq, ws, 128)
    s_full = mx.repeat(mx.repeat(ws, 128, axis=0)[:150], 128, axis=1)[:, :260]
    assert mx.array_equal(to_e4m3(wd / s_full), wq).item()
    assert (to_torch(wd) - w).abs().max() <= (w.abs() * 2.0**-4 + to_torch(s_full) * 2.0**-10).max()


@pytest.mark.parametrize("fmt", [None, "ue8m0"])
def test_weight_quant_is_the_references(fmt):
    """weight_quant (pure MLX) equals the reference's, bits and scales; a stack (E, N, K) as
    ``stacked_weight_quant``."""
    w = spread(150, 260)
    wq, ws = ref_fp8.weight_quant(w, 128, fmt)
    mq, ms = weight_quant(to_mx(w), 128, fmt)
    assert torch.equal(to_torch(mq), wq.view(torch.uint8)) and torch.equal(to_torch(ms), ws)
    stack = spread(3, 70, 45)
    wq, ws = ref_fp8.stacked_weight_quant(stack, 32, fmt)
    mq, ms = weight_quant_mlx(to_mx(stack), 32, fmt)
    assert torch.equal(to_torch(mq), wq.view(torch.uint8)) and torch.equal(to_torch(ms), ws)
    with pytest.raises(ValueError, match="scale_fmt must be None"):
        weight_quant(to_mx(w), 128, "e8m0")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("m,n,k,bs", [(300, 70, 45, 128), (130, 1, 200, 64)])
def test_fp8_gemm_per_row_scales(path, m, n, k, bs):
    """The Wgrad GEMM: both operands from ``act_quant(..., transpose=True)``, b with per-row (N, KB) scales (N = 1:
    the readings agree), against the reference within float32 accumulation."""
    a, a_s = ref_fp8.act_quant(spread(k, m), bs, transpose=True)  # (M, K)
    b, b_s = ref_fp8.act_quant(spread(k, n), bs, transpose=True)  # (N, K)
    got = K.fp8_gemm(*[to_mx(t) for t in (a, a_s, b, b_s)], bs)
    assert K.kernel_path("fp8_gemm") == path
    assert_close(to_torch(got), ref_fp8.fp8_gemm(a, a_s, b, b_s, bs), bound=1e-6)


def test_fp8_grouped_gemm_matches_the_reference_and_refuses_bad_offsets():
    """Rows of 4 experts (one empty, one with a partial tile) against `reference.fp8.fp8_grouped_gemm` (float32
    accumulation, bfloat16 out too); offsets that do not split the rows, or of the wrong length, are errors."""
    off = torch.tensor([0, 60, 60, 200, 203])
    a, a_s = ref_fp8.act_quant(spread(203, 150), 128)
    b, b_s = ref_fp8.stacked_weight_quant(spread(4, 70, 150), 128)
    args = [to_mx(t) for t in (a, a_s, b, b_s)]
    for dtype, mdtype in ((torch.float32, mx.float32), (torch.bfloat16, mx.bfloat16)):
        got = fp8_grouped_gemm(*args, to_mx(off), 128, mdtype)
        assert got.dtype == mdtype
        assert_close(to_torch(got), ref_fp8.fp8_grouped_gemm(a, a_s, b, b_s, off, 128, dtype), dtype, bound=1e-6 if
                     dtype == torch.float32 else None)
    for bad in ([0, 60, 50, 200, 203], [1, 60, 60, 200, 203], [0, 60, 60, 200, 202]):
        with pytest.raises(ValueError, match="offsets must run nondecreasing"):
            fp8_grouped_gemm(*args, mx.array(bad), 128)
    with pytest.raises(ValueError, match="offsets: expected shape"):
        fp8_grouped_gemm(*args, mx.array([0, 203]), 128)


# ------------------------------------------------------------------------------ FP8 training ops


def _vjp(fn, primals, cotangent):
    outs, grads = mx.vjp(fn, [to_mx(t) for t in primals], [to_mx(cotangent)])
    return outs[0], grads


@pytest.mark.parametrize("fmt", [None, "ue8m0"])
def test_fp8_linear_matches_the_reference(fmt):
    """fp8_linear (Fprop, Dgrad, Wgrad in FP8) against `reference.fp8_training.fp8_linear` on the same x, W and dy:
    the output and both gradients within float32 accumulation (the same quantized operands on both sides)."""
    x, w, dy = spread(2, 37, 300), spread(200, 300) * 0.05, spread(2, 37, 200)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    y_ref = ref_training.fp8_linear(xr, wr, 128, fmt)
    y_ref.backward(dy)
    y, (dx, dw) = _vjp(lambda a, b: fp8_linear(a, b, 128, fmt), (x, w), dy)
    assert y.dtype == dx.dtype == dw.dtype == mx.float32
    assert_close(to_torch(y), y_ref.detach(), bound=2e-6, what="y")
    assert_close(to_torch(dx), xr.grad, bound=2e-6, what="dx")
    assert_close(to_torch(dw), wr.grad, bound=2e-6, what="dW")
    assert_close(to_torch(y), (x @ w.T), bound=0.1, what="y vs the float32 matmul")  # FP8, not garbage


@pytest.mark.parametrize("fmt", [None, "ue8m0"])
@pytest.mark.parametrize("grouped", [False, True], ids=["dense", "experts"])
def test_fp8_swiglu_mlp_matches_the_reference(fmt, grouped):
    """fp8_swiglu_mlp against the reference's on the same values: a dense MLP, or 4 experts over 203 expert-sorted
    rows (one expert empty, ragged segments: Wgrad tiles start at each segment). Output and the four gradients.
    With ue8m0 scales every product is exact, so the two agree to float32 rounding; with float32 scales the
    SwiGLU inputs and output are re-quantized from GEMM results that may differ in the last bit, which can move an
    e4m3 rounding (a few elements in 10^5 by one e4m3 step: up to 4e-4 seen), hence 2e-3 there."""
    h, i, m = 150, 260, 203
    off = torch.tensor([0, 60, 60, 200, m]) if grouped else None
    lead = (4,) if grouped else ()
    x, dy = spread(m, h), spread(m, h)
    ws = [spread(*lead, i, h) * 0.1, spread(*lead, i, h) * 0.1, spread(*lead, h, i) * 0.1]
    ps = [t.clone().requires_grad_() for t in (x, *ws)]
    y_ref = ref_training.fp8_swiglu_mlp(*ps, off, 128, fmt)
    y_ref.backward(dy)
    moff = None if off is None else to_mx(off)
    y, grads = _vjp(lambda a, g, u, d: fp8_swiglu_mlp(a, g, u, d, moff, 128, fmt), (x, *ws), dy)
    bound = 1e-5 if fmt == "ue8m0" else 2e-3
    assert_close(to_torch(y), y_ref.detach(), bound=bound, what="y")
    for name, g, p in zip(("dx", "d_gate", "d_up", "d_down"), grads, ps, strict=True):
        assert_close(to_torch(g), p.grad, bound=bound, what=name)
    if grouped:
        assert not mx.any(grads[1][1]).item()  # the empty expert: zero gradient


def _pair(attention_type: str, **overrides):
    kw = {"num_nextn_predict_layers": 1, "hidden_size": 160, "q_lora_rank": 140 if attention_type == "dsa" else None}
    cfg = make_config(attention_type, **{**kw, **overrides})
    return cfg, *model_pair(cfg, train=True)


@pytest.mark.parametrize("attention_type", ["mla", "dsa", "gqa"])
def test_enable_fp8_training_matches_the_reference(attention_type):
    """enable_fp8_training switches the modules the reference's switches (names), keeps every parameter name and
    the trainable set (DSA's frozen indexer stays frozen), and the model's loss and gradients follow the reference
    FP8 model's on the same weights (hidden 160: K blocks of 128 and a partial one). The ops agree to float32
    rounding (the tests above), but through a whole model a last-bit difference (here the attention core's, torch's
    against MLX's) now and then moves an e4m3 rounding or a tile's power-of-two scale when a gradient is
    re-quantized, which moves that layer's gradients by a few percent (seen up to 4%, in about a third of the draws):
    the bounds are FP8's, not float32's."""
    cfg, ref, model = _pair(attention_type)
    params = sorted(n for n, _ in tree_flatten(model.parameters()))
    trainable = sorted(n for n, _ in tree_flatten(model.trainable_parameters()))
    names = enable_fp8_training(model, "ue8m0")
    assert sorted(names) == sorted(ref_training.enable_fp8_training(ref, "ue8m0"))
    assert params == sorted(n for n, _ in tree_flatten(model.parameters()))
    assert trainable == sorted(n for n, _ in tree_flatten(model.trainable_parameters()))
    mods = dict(model.named_modules())
    assert isinstance(mods["model.layers.0.mlp"], FP8MLP) and isinstance(mods["model.layers.1.mlp.experts"], FP8Experts)
    assert isinstance(mods["model.layers.1.self_attn.o_proj"], FP8Linear)
    for keep in ("lm_head", "mtp.0.eh_proj", "model.layers.1.mlp.gate"):
        assert not isinstance(mods[keep], FP8Linear | FP8MLP), keep
    ids, tg = torch.randint(0, cfg.vocab_size, (2, 12)), torch.randint(0, cfg.vocab_size, (2, 12))
    out = ref.loss(ids, tg, mtp_weight=0.3)
    out.loss.backward()
    loss, grads = nn.value_and_grad(model, lambda: model.loss(to_mx(ids), to_mx(tg), mtp_weight=0.3).loss)()
    assert abs(loss.item() - out.loss.item()) <= 1e-3 * abs(out.loss.item())
    grads = dict(tree_flatten(grads))
    ref_grads = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    assert set(ref_grads) <= set(grads)
    flat = torch.cat([to_torch(grads[n]).flatten() for n in ref_grads])
    assert_close(flat, torch.cat([g.flatten() for g in ref_grads.values()]), bound=0.1, what="all gradients")


def test_enable_fp8_training_refusals():
    """A bad scale_fmt, and a model holding FP8 (uint8) weights, as ``from_pretrained(keep_fp8=True)`` loads them
    for inference, are errors naming the problem."""
    _, _, model = _pair("mla", hidden_size=32)
    with pytest.raises(ValueError, match="scale_fmt must be None"):
        enable_fp8_training(model, "e5m2")
    mlp = model.model.layers[0].mlp
    mlp.gate_proj.weight = mlp.gate_proj.weight.astype(mx.uint8)
    with pytest.raises(ValueError, match="holds FP8 weights"):
        enable_fp8_training(model)


def test_fp8_training_ops_trace_under_compile():
    """The FP8 model's loss and gradients under ``mx.compile`` equal the eager ones (the routed experts' Wgrad finds
    its segments without evaluating the routing)."""
    cfg, _, model = _pair("mla", hidden_size=32)
    enable_fp8_training(model)
    ids, tg = to_mx(torch.randint(0, cfg.vocab_size, (2, 12))), to_mx(torch.randint(0, cfg.vocab_size, (2, 12)))
    step = nn.value_and_grad(model, lambda a, b: model.loss(a, b, check_values=False).loss)
    eager = step(ids, tg)
    compiled = mx.compile(step, inputs=model.state, outputs=model.state)(ids, tg)
    for (n, a), (_, b) in zip(tree_flatten(eager), tree_flatten(compiled), strict=True):
        assert_close(to_torch(b), to_torch(a), bound=1e-5, what=n)


# ------------------------------------------------------------------------------ MLXTrainer precisions


def _trainer_pair():
    ref = randomize_(ReferenceModel(ModelConfig(vocab_size=300, **MICRO_MODEL)), router_bias=0.05)
    batches = [{"input_ids": torch.randint(0, 300, (2, 16)), "targets": torch.randint(0, 300, (2, 16))}
               for _ in range(3)]
    return ref, batches


def _train(trainer, batches):
    out = []
    for b in batches:
        out.append(trainer.micro_step(b, 1)["loss"])
        trainer.optimizer_step(3e-3)
    return out


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_trainer_fp8_step_is_the_reference_fp8_step(optimizer):
    """``MLXTrainer(precision="fp8")``: the first loss is the reference FP8 model's (`reference.fp8_training`) and
    close to the float32 trainer's (FP8 error, not a broken model); its moments are bfloat16 between steps, and the
    parameters stay float32."""
    ref, batches = _trainer_pair()
    fp32 = MLXTrainer(from_reference(ref), 3e-3, 0.1, 1.0, 0.3, optimizer=optimizer)
    fp8 = MLXTrainer(from_reference(ref), 3e-3, 0.1, 1.0, 0.3, optimizer=optimizer, precision="fp8")
    assert fp8.label == f" ({fp8.model.kernel_path} kernels, mx.compile, fp8)"
    l32, l8 = _train(fp32, batches[:2]), _train(fp8, batches[:2])
    ref_training.enable_fp8_training(ref)
    want = ref.loss(batches[0]["input_ids"], batches[0]["targets"], mtp_weight=0.3).loss.item()
    assert abs(l8[0] - want) <= 1e-3 * want  # FP8's bound (test_enable_fp8_training_matches_the_reference)
    assert all(abs(a - b) <= 0.02 * b for a, b in zip(l8, l32, strict=True)), (l8, l32)

    moments = [(k, v) for k, v in tree_flatten(fp8.opt.state) if k.rsplit(".", 1)[-1] in ("m", "v", "momentum_buffer")]
    assert moments and all(v.dtype == mx.bfloat16 for _, v in moments)
    assert all(p.dtype == mx.float32 for _, p in tree_flatten(fp8.model.parameters()))


def test_trainer_bf16_and_refusals():
    """``precision="bf16"``: bfloat16 compute from float32 master weights (loss within bf16 error of float32's,
    parameters float32 after the step, moments bfloat16); an unknown precision is an error."""
    ref, batches = _trainer_pair()
    fp32 = MLXTrainer(from_reference(ref), 3e-3, 0.1, 1.0, 0.3, compile=False)
    l32 = _train(fp32, batches[:2])
    bf16 = MLXTrainer(from_reference(ref), 3e-3, 0.1, 1.0, 0.3, compile=False, precision="bf16")
    lbf = _train(bf16, batches[:2])
    assert all(abs(a - b) <= 1.6e-2 * b for a, b in zip(lbf, l32, strict=True)), (lbf, l32)
    assert all(p.dtype == mx.float32 for _, p in tree_flatten(bf16.model.parameters()))
    assert {v.dtype for k, v in tree_flatten(bf16.opt.state) if k.endswith((".m", ".v"))} == {mx.bfloat16}
    want = fp32.eval_loss(batches[2])
    assert abs(bf16.eval_loss(batches[2]) - want) <= 1.6e-2 * want
    with pytest.raises(ValueError, match="precision='fp16'"):
        MLXTrainer(from_reference(ref), 3e-3, 0.1, 1.0, 0.3, precision="fp16")


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_bf16_moments_resume_exactly(optimizer):
    """The bfloat16 moments of an FP8 run go to the reference layout as bfloat16 tensors and load back bit for bit:
    a trainer resumed from step 2's state (weights and optimizer) continues with the uninterrupted run's losses."""
    ref, batches = _trainer_pair()
    a = MLXTrainer(from_reference(ref), 3e-3, 0.1, 1.0, 0.3, optimizer=optimizer, precision="fp8")
    _train(a, batches[:2])
    sd = a.state_dict()
    tensors = [v for s in sd["state"].values() for k, v in s.items() if k != "step"]
    assert tensors and all(t.dtype == torch.bfloat16 for t in tensors)
    weights = dict(tree_flatten(a.model.parameters()))
    b_model = from_reference(ref)
    b_model.update(a.model.parameters())
    b = MLXTrainer(b_model, 3e-3, 0.1, 1.0, 0.3, optimizer=optimizer, precision="fp8")
    b.load_state_dict(sd)
    for (k, x), (_, y) in zip(tree_flatten(a.opt.state), tree_flatten(b.opt.state), strict=True):
        assert x.dtype == y.dtype and mx.array_equal(x, y).item(), k
    assert all(mx.array_equal(weights[n], p).item() for n, p in tree_flatten(b.model.parameters()))
    assert _train(b, batches[2:]) == _train(a, batches[2:])
