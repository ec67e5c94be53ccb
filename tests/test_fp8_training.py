"""FP8 training (`reference.fp8_training`, DeepSeek-V3 report section 3.3): the FP8 linear's three GEMMs against
float64, the FP8 SwiGLU MLP, what is saved for backward, the model conversion, bf16 optimizer moments and
``dsfs train --precision``.

Bounds: each FP8 GEMM equals the float64 product of its dequantized operands within 5e-7 (float32 accumulation);
against the unquantized float64 product, e4m3's 3 mantissa bits give relative errors of a few percent per
quantized operand (measured: Fprop, Dgrad and Wgrad 3-5e-2 on N(0, 1) data; the SwiGLU MLP, three chained GEMMs
and a recomputation from FP8-cached inputs, 6-8e-2), so those tests bound them by 0.08 and 0.12.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from dsfs.errors import ConfigError
from dsfs.train_config import TrainConfig
from reference.config import ModelConfig
from reference.fp8 import FP8_DTYPE, act_dequant, act_quant, weight_dequant, weight_quant
from reference.fp8_training import (
    ATTENTION_LINEARS,
    FP8MLP,
    FP8Experts,
    FP8Linear,
    enable_fp8_training,
    fp8_linear,
    fp8_swiglu_mlp,
)
from reference.model import Model
from reference.optim import make_optimizer
from reference.testing import rel_err
from tests.test_train import MICRO_MODEL


def _q(x: torch.Tensor, fmt=None) -> torch.Tensor:
    """Float64 value of x after act_quant (1 x 128 tiles along its last dimension)."""
    return act_dequant(*act_quant(x, 128, fmt)).double()


def _qt(x: torch.Tensor, fmt=None) -> torch.Tensor:
    """Float64 value of x after the Wgrad re-tiling (128 x 1 tiles of x, i.e. act_quant of x^T, transposed back)."""
    return act_dequant(*act_quant(x, 128, fmt, transpose=True)).double().T


def _w(w: torch.Tensor, fmt=None) -> torch.Tensor:
    return weight_dequant(*weight_quant(w, 128, fmt)).double()


@pytest.mark.parametrize("fmt", [None, "ue8m0"])
def test_fp8_linear_gemms_equal_float64_of_their_quantized_operands(fmt):
    """Fprop ``q(x) q(W)^T``, Dgrad ``q(dy) q(W)`` and Wgrad ``qt(dy)^T qt(q(x))`` (both re-tiled along the tokens;
    x's operand rebuilt from its saved FP8 copy) within 5e-7 of float64; ragged M = 210, K = 300, N = 200."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 70, 300, generator=g).requires_grad_()
    w = (torch.randn(200, 300, generator=g) * 0.05).requires_grad_()
    y = fp8_linear(x, w, scale_fmt=fmt)
    dy = torch.randn(y.shape, generator=g)
    y.backward(dy)
    x2, dy2 = x.detach().reshape(-1, 300), dy.reshape(-1, 200)
    assert rel_err(y.reshape(-1, 200), _q(x2, fmt) @ _w(w.detach(), fmt).T) < 5e-7
    assert rel_err(x.grad.reshape(-1, 300), _q(dy2, fmt) @ _w(w.detach(), fmt)) < 5e-7
    x_saved = act_dequant(*act_quant(x2, 128, fmt))
    assert rel_err(w.grad, _qt(dy2, fmt).T @ _qt(x_saved, fmt)) < 5e-7
    # against the unquantized float64 layer: the stated FP8 bound
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    (x64 @ w64.T).backward(dy.double())
    for got, want in ((y, x64.detach() @ w64.detach().T), (x.grad, x64.grad), (w.grad, w64.grad)):
        assert 1e-3 < rel_err(got, want) < 0.08
    assert x.grad.dtype == x.dtype and w.grad.dtype == w.dtype


def test_fp8_linear_shares_one_saved_input_across_weights_and_saves_fp8():
    """Several weights on one input (MLA's q_a/kv_a) equal separate calls, and what autograd saves is e4m3 values and
    float32 scales (plus the parameters): the activation is stored in FP8 (report section 3.3.3)."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(40, 130, generator=g, requires_grad=True)
    w1, w2 = (torch.randn(n, 130, generator=g).requires_grad_() for n in (70, 20))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        a, b = fp8_linear(x, (w1, w2))
    non_params = [t for t in saved if t is not w1 and t is not w2]
    assert sorted(str(t.dtype) for t in non_params) == ["torch.float32", "torch.float8_e4m3fn"]
    (a.sum() + (b * 2).sum()).backward()
    grads = [t.grad.clone() for t in (x, w1, w2)]
    for t in (x, w1, w2):
        t.grad = None
    fp8_linear(x, w1).sum().backward()
    (fp8_linear(x, w2) * 2).sum().backward()
    for got, t in zip(grads, (x, w1, w2), strict=True):
        assert rel_err(got, t.grad) < 1e-6


def test_fp8_linear_rejects_bad_input():
    with pytest.raises(ValueError, match="weight must be"):
        fp8_linear(torch.randn(4, 8), torch.randn(3, 9))
    with pytest.raises(ValueError, match="scale_fmt"):
        fp8_linear(torch.randn(4, 8), torch.randn(3, 8), scale_fmt="e5m2")


def _swiglu64(x, g, u, d, offsets):
    b = offsets.tolist()
    return torch.cat([(torch.nn.functional.silu(x[b[e]:b[e + 1]] @ g[e].T) * (x[b[e]:b[e + 1]] @ u[e].T)) @ d[e].T
                      for e in range(g.shape[0])])


def test_fp8_swiglu_mlp_routed_experts_against_float64():
    """The routed experts in FP8 (grouped Fprop/Dgrad, per-expert Wgrad, SwiGLU inputs cached in FP8 and the output
    recomputed): output and every gradient within 0.12 of float64; an expert without rows gets an exact zero
    gradient; one group equals the dense MLP."""
    g = torch.Generator().manual_seed(3)
    xs = torch.randn(100, 130, generator=g, requires_grad=True)
    gate, up = ((torch.randn(4, 96, 130, generator=g) * 0.1).requires_grad_() for _ in range(2))
    down = (torch.randn(4, 130, 96, generator=g) * 0.1).requires_grad_()
    offsets = torch.tensor([0, 30, 30, 75, 100])
    y = fp8_swiglu_mlp(xs, gate, up, down, offsets)
    dy = torch.randn(y.shape, generator=g)
    y.backward(dy)
    p64 = [t.detach().double().requires_grad_() for t in (xs, gate, up, down)]
    y64 = _swiglu64(*p64, offsets)
    y64.backward(dy.double())
    assert 1e-3 < rel_err(y, y64.detach()) < 0.12
    for t, t64 in zip((xs, gate, up, down), p64, strict=True):
        assert 1e-3 < rel_err(t.grad, t64.grad) < 0.12
    assert all(torch.equal(w.grad[1], torch.zeros_like(w.grad[1])) for w in (gate, up, down))
    one = fp8_swiglu_mlp(xs[:30], gate[0], up[0], down[0])
    assert torch.equal(one, y[:30])
    with pytest.raises(ValueError, match="offsets"):
        fp8_swiglu_mlp(xs, gate, up, down)


def _micro(vocab=300) -> Model:
    torch.manual_seed(0)
    return Model(ModelConfig(vocab_size=vocab, **{**MICRO_MODEL, "q_lora_rank": 16}))


def test_enable_fp8_training_converts_the_report_s_layers_only():
    """Attention projections, the dense MLP and the shared and routed experts go to FP8; the embedding, head, MoE
    gate, norms and MTP's eh_proj do not (report section 3.3.1). Names and tensors of the state dict do not change,
    and the forward stays within FP8's error of the fp32 model's."""
    model = _micro()
    fp8 = copy.deepcopy(model)
    names = enable_fp8_training(fp8)
    kinds = {type(m) for n, m in fp8.named_modules() if n in names}
    assert kinds == {FP8Linear, FP8MLP, FP8Experts}
    for n, m in fp8.named_modules():
        leaf = n.rsplit(".", 1)[-1]
        if type(m) is nn.Linear:
            assert leaf not in ATTENTION_LINEARS and leaf in ("lm_head", "gate", "eh_proj", "gate_proj", "up_proj",
                                                              "down_proj"), n
    assert {n.rsplit(".", 1)[-1] for n in names} >= {"q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj",
                                                     "o_proj", "mlp", "experts", "shared_experts"}
    sd, sd8 = model.state_dict(), fp8.state_dict()
    assert sd.keys() == sd8.keys() and all(torch.equal(sd[k], sd8[k]) for k in sd)
    x = torch.randint(0, 300, (2, 40))
    lo, lo8 = model.loss(x, x).loss.item(), fp8.loss(x, x).loss.item()
    assert lo != lo8 and abs(lo8 - lo) / lo < 0.02
    with pytest.raises(ValueError, match="scale_fmt"):
        enable_fp8_training(copy.deepcopy(model), scale_fmt="fp32")


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_bf16_moments_between_steps_and_exact_reload(optimizer):
    """``moment_dtype=bfloat16``: the moments are bf16 after every step (the parameters stay fp32), a state dict
    saved and loaded into a fresh optimizer continues bit for bit."""
    def run(model, opt, steps, seed):
        g = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            x = torch.randint(0, 300, (2, 16), generator=g)
            model.loss(x, x).loss.backward()
            opt.step()
            opt.zero_grad()

    a = _micro()
    opt_a = make_optimizer(a, 1e-3, 0.1, optimizer, moment_dtype=torch.bfloat16)
    run(a, opt_a, 2, 0)
    moments = [v for st in opt_a.state.values() for k, v in st.items() if k != "step"]
    assert moments and all(v.dtype == torch.bfloat16 for v in moments)
    assert all(p.dtype == torch.float32 for p in a.parameters())
    b = copy.deepcopy(a)
    opt_b = make_optimizer(b, 1e-3, 0.1, optimizer, moment_dtype=torch.bfloat16)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    run(a, opt_a, 2, 1)
    run(b, opt_b, 2, 1)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_train_config_precision_fields():
    base = TrainConfig.from_dict({k: v for k, v in _tc().to_dict().items() if k not in ("precision", "scale_fmt")})
    assert base.precision == "auto" and base.scale_fmt is None  # a checkpoint written before the fields existed
    assert base.replace(precision="fp8", scale_fmt="ue8m0").scale_fmt == "ue8m0"
    with pytest.raises(ConfigError, match="precision"):
        base.replace(precision="fp16")
    with pytest.raises(ConfigError, match="FP8 training only"):
        base.replace(scale_fmt="ue8m0")


def _tc() -> TrainConfig:
    from dsfs.presets import TRAIN_PRESETS

    return TRAIN_PRESETS["tiny"]


def test_cli_rejects_compile_with_fp8(data_dir, tmp_path, capsys):
    from dsfs.cli import main

    rc = main(["train", "--data", str(data_dir), "--out", str(tmp_path / "r"), "--precision", "fp8", "--compile",
               "on", "--max-steps", "1", "-q"])
    err = capsys.readouterr().err
    assert rc != 0 and "FP8 training runs eager" in err and len(err.strip().splitlines()) == 1
    rc = main(["train", "--data", str(data_dir), "--out", str(tmp_path / "s"), "--scale-fmt", "ue8m0",
               "--max-steps", "1", "-q"])
    assert rc != 0 and "FP8 training only" in capsys.readouterr().err


def test_fp8_checkpoint_is_the_fp32_format(data_dir, tmp_path):
    """A short FP8 run writes the same checkpoint files and tensor dtypes as an fp32 one (fp32 master weights)."""
    from safetensors.torch import load_file

    from tests.test_train import micro_train

    for p in ("auto", "fp8"):
        micro_train(data_dir, tmp_path / p, max_steps=2, eval_every=2, precision=p)
    a, b = (load_file(tmp_path / p / "final/model.safetensors") for p in ("auto", "fp8"))
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype == torch.float32 for k in a)
    assert any(not torch.equal(a[k], b[k]) for k in a)
    assert FP8_DTYPE not in {t.dtype for t in b.values()}


def test_fp8_layers_under_bf16_autocast():
    """Under bf16 autocast (FP8 training on a GPU runs the rest of the model so): the FP8 linear and MLP return bf16
    like ``nn.Linear`` would, take bf16 gradients, and give fp32 gradients to fp32 master weights and inputs."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(30, 130, generator=g, requires_grad=True)
    w = torch.randn(70, 130, generator=g, requires_grad=True)
    gate, up = (torch.randn(40, 130, generator=g).requires_grad_() for _ in range(2))
    down = torch.randn(130, 40, generator=g, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fp8_linear(x, w)
        z = fp8_swiglu_mlp(x, gate, up, down)
    assert y.dtype == z.dtype == torch.bfloat16
    (y.float().square().mean() + z.float().square().mean()).backward()
    assert all(t.grad.dtype == torch.float32 and t.grad.isfinite().all() for t in (x, w, gate, up, down))
    want = fp8_linear(x.detach(), w.detach())
    assert rel_err(y.float(), want) < 1e-2  # the same FP8 product, rounded to bf16


def test_resume_at_another_precision_drops_fp8_scales(data_dir, tmp_path, capsys):
    """A UE8M0 FP8 run continued at fp32: the scale format goes with the precision and the change is said."""
    from dsfs.train import train
    from tests.test_train import micro_train

    micro_train(data_dir, tmp_path / "r", max_steps=2, eval_every=2, precision="fp8", scale_fmt="ue8m0")
    s = train(data_dir=data_dir, out_dir=tmp_path / "r", resume=True, max_steps=3, precision="fp32",
              backend="reference", compile=False)
    assert s["steps"] == 3 and "resuming a fp8 run at --precision fp32" in capsys.readouterr().err
