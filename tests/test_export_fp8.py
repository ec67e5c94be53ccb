"""``dsfs export --fp8`` and ``Model.from_pretrained(keep_fp8=True)`` (`dsfs.export`, `reference.fp8_checkpoint`).

The export writes DeepSeek's FP8 layout: the attention, FFN and expert matrices as float8_e4m3fn with float32
``weight_scale_inv`` 128x128 blocks (sizes here make partial blocks in both dimensions), everything else as stored,
and DeepSeek-V3's ``quantization_config`` (V3.1's ``scale_fmt: ue8m0`` when asked). Reloading it without keep_fp8
gives exactly `weight_dequant` of the stored tensors; transformers (FineGrainedFP8Config(dequantize=True)) opens it
with the same logits. (mlx_lm's check is in tests/mlx/test_fp8_checkpoint.py.)

keep_fp8 bounds (activations are quantized per 1x128 tile at run time, so logits are not those of the dequantized
model):
- every FP8 module of a loaded model, on the inputs it gets in a forward, against its dequantized twin with the
  inputs of its GEMMs rounded through ``act_dequant(act_quant(x))``: float32's 1e-5 for a linear layer (the same
  math), 1e-3 for the routed experts (`module_bound`); one FP8 linear against ``x @ dequant(W)^T``: 2^-4 (e4m3's
  largest relative rounding error; measured 2.5-2.7%);
- the whole model against that emulation: 0.05, not 1e-5. Quantization is discontinuous: a float32-rounding
  difference upstream moves an activation across an e4m3 rounding boundary (a jump of one e4m3 step, 6-12%), and
  through the top-k routing an expert; over 8 seeds 6 gave ~4e-7, one 3e-4, one 1.1e-2. Against the plain
  dequantized model: 0.5 (measured 0.10-0.25 on these random weights: FP8 activations through two layers and
  a routing); runtime_cuda's and MLX's FP8 modules against the reference's on the same inputs: 1e-5.
"""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file

from dsfs.cli import main
from reference import Model
from reference.config import ModelConfig, fp8_quantization_config, fp8_scale_fmt
from reference.fp8 import FP8_DTYPE, act_dequant, act_quant, weight_dequant, weight_quant
from reference.fp8_checkpoint import FP8WeightExperts, FP8WeightLinear, fp8_modules, fp8_weight_name
from reference.moe import Experts
from reference.swiglu import swiglu
from reference.testing import assert_close, rel_err
from tests.reference_utils import make_config, randomize_

VOCAB = 97
# every FP8 matrix has a partial 128 block: hidden 160, q_lora 136, kv_a 148 rows, experts 136
PARTIAL = dict(hidden_size=160, intermediate_size=200, moe_intermediate_size=136, q_lora_rank=136, kv_lora_rank=144,
               num_nextn_predict_layers=1)
# every FP8 matrix dimension a multiple of 128 or at most 128 (transformers' dequantization needs whole blocks)
ALIGNED = dict(hidden_size=128, intermediate_size=256, moe_intermediate_size=128, q_lora_rank=128, kv_lora_rank=64,
               qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)
QC = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}


def _source(root, attention_type="mla", seed=0, **kw):
    """A random model saved with a tokenizer (and its tokenizer_config.json) under ``root / 'src'``."""
    torch.manual_seed(seed)
    model = randomize_(Model(make_config(attention_type, **{**PARTIAL, **kw})), router_bias=0.1).eval()
    (root / "tok").mkdir(parents=True, exist_ok=True)
    (root / "tok" / "tokenizer.json").write_text('{"model": {}}')
    (root / "tok" / "tokenizer_config.json").write_text('{"eos_token": "<eos>"}')
    model.save_pretrained(root / "src", tokenizer_file=root / "tok" / "tokenizer.json")
    return model


def _export(src, out, *flags) -> int:
    return main(["export", "--checkpoint", str(src), "--out", str(out), "-q", *flags])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    model = _source(root)
    assert _export(root / "src", root / "fp8", "--fp8") == 0
    assert _export(root / "src", root / "ue8m0", "--fp8", "--scale-fmt", "ue8m0") == 0
    return root, model


def _tensors(d):
    return {**load_file(d / "model.safetensors"), **load_file(d / "mtp.safetensors")}


def _ids(seed=0, shape=(2, 11)):
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("fmt", ["fp8", "ue8m0"])
def test_export_layout(exported, fmt):
    root, _ = exported
    src, got = _tensors(root / "src"), _tensors(root / fmt)
    quantized = sorted(n for n in src if fp8_weight_name(n))
    assert sorted(got) == sorted([*src, *(n + "_scale_inv" for n in quantized)])
    for must in ("self_attn.kv_b_proj.weight", "self_attn.q_a_proj.weight", "mlp.experts.3.down_proj.weight",
                 "mlp.shared_experts.up_proj.weight", "model.layers.0.mlp.gate_proj.weight",
                 "model.layers.2.self_attn.o_proj.weight"):  # layer 2: the MTP layer, in mtp.safetensors
        assert any(n.endswith(must) for n in quantized), must
    for n, t in got.items():
        if n in quantized:
            rows, cols = t.shape
            assert t.dtype == FP8_DTYPE, n
            s = got[n + "_scale_inv"]
            assert s.dtype == torch.float32 and tuple(s.shape) == (-(-rows // 128), -(-cols // 128)), n
        elif not n.endswith("_scale_inv"):
            assert t.dtype == src[n].dtype and torch.equal(t, src[n]), n  # unquantized: as stored
    assert any(t.shape[0] % 128 and t.shape[1] % 128 for n, t in got.items() if n in quantized)  # partial blocks
    for kept in ("mlp.gate.weight", "e_score_correction_bias", "embed_tokens.weight", "lm_head.weight",
                 "eh_proj.weight", "shared_head.head.weight", "layernorm.weight", "enorm.weight"):
        assert all(got[n].dtype == torch.float32 for n in got if n.endswith(kept)), kept
    cfg = json.loads((root / fmt / "config.json").read_text())
    assert cfg["quantization_config"] == (QC if fmt == "fp8" else {**QC, "scale_fmt": "ue8m0"})
    assert cfg["torch_dtype"] == cfg["dtype"] == "float32"
    assert (root / fmt / "tokenizer.json").read_text() == '{"model": {}}'
    assert (root / fmt / "tokenizer_config.json").is_file()
    sums = json.loads((root / fmt / "checksums.json").read_text())
    assert "model.safetensors" in sums["sha256"] and "mtp.safetensors" in sums["sha256"]
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.parametrize("fmt", ["fp8", "ue8m0"])
def test_export_quantizes_as_weight_quant(exported, fmt):
    """The stored bytes are `reference.fp8.weight_quant` of the source; ue8m0 scales are powers of two."""
    root, _ = exported
    src, got = _tensors(root / "src"), _tensors(root / fmt)
    scale_fmt = "ue8m0" if fmt == "ue8m0" else None
    for n in (n for n in src if fp8_weight_name(n)):
        w, s = weight_quant(src[n], 128, scale_fmt)
        assert torch.equal(got[n].view(torch.uint8), w.view(torch.uint8)) and torch.equal(got[n + "_scale_inv"], s), n
        if scale_fmt:
            mantissa, _ = torch.frexp(s)
            assert torch.all(mantissa == 0.5), n


@pytest.mark.parametrize("fmt", ["fp8", "ue8m0"])
def test_reload_is_weight_dequant(exported, fmt):
    """Without keep_fp8 the export loads dequantized, exactly `weight_dequant` of what it stores."""
    root, source = exported
    got = _tensors(root / fmt)
    loaded = Model.from_pretrained(root / fmt)
    assert "quantization_config" not in loaded.config.to_dict()
    layer = loaded.model.layers[1]
    assert torch.equal(layer.self_attn.kv_b_proj.weight, weight_dequant(
        got["model.layers.1.self_attn.kv_b_proj.weight"], got["model.layers.1.self_attn.kv_b_proj.weight_scale_inv"]))
    assert torch.equal(layer.mlp.experts.down_proj[5], weight_dequant(
        got["model.layers.1.mlp.experts.5.down_proj.weight"],
        got["model.layers.1.mlp.experts.5.down_proj.weight_scale_inv"]))
    assert torch.equal(loaded.mtp[0].self_attn.q_b_proj.weight, weight_dequant(
        got["model.layers.2.self_attn.q_b_proj.weight"], got["model.layers.2.self_attn.q_b_proj.weight_scale_inv"]))
    assert torch.equal(loaded.lm_head.weight, source.lm_head.weight)
    assert torch.equal(layer.mlp.gate.e_score_correction_bias, source.model.layers[1].mlp.gate.e_score_correction_bias)
    err = rel_err(loaded.model.layers[0].mlp.up_proj.weight, source.model.layers[0].mlp.up_proj.weight)
    assert err < 2**-4, err  # e4m3 keeps 3 mantissa bits


def test_transformers_opens_fp8_export(tmp_path):
    transformers = pytest.importorskip("transformers")
    _source(tmp_path, **ALIGNED)
    assert _export(tmp_path / "src", tmp_path / "fp8", "--fp8", "--scale-fmt", "ue8m0") == 0
    logging.getLogger("transformers").setLevel(logging.ERROR)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "fp8", dtype=torch.float32,
        quantization_config=transformers.FineGrainedFP8Config(dequantize=True)).eval()
    ours = Model.from_pretrained(tmp_path / "fp8")
    ids = _ids()
    with torch.no_grad():
        expected, out = ours(ids), hf(ids).logits
    err = assert_close(out, expected, torch.float32, what="transformers (FineGrainedFP8, dequantize) vs reference")
    print(f"\n[export fp8] transformers on the FP8 export: rel err {err:.2e}")


# ---------------------------------------------------------------- keep_fp8


def _emulated(model: Model) -> Model:
    """``model`` (dequantized) with every input of an FP8 GEMM rounded as keep_fp8 quantizes it: the inputs of the
    FP8 linear layers and, per routed expert, of gate/up and of down."""
    def rounded(t):
        return act_dequant(*act_quant(t, 128, model.fp8_scale_fmt), dtype=t.dtype)

    def grouped_swiglu(self, xs, counts):
        xs, outs = rounded(xs), []
        for e, seg in enumerate(xs.split(counts.tolist())):
            if len(seg):
                h = rounded(swiglu(seg @ self.gate_proj[e].t(), seg @ self.up_proj[e].t()))
                outs.append(h @ self.down_proj[e].t())
        return torch.cat(outs)

    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name in model.fp8_names:
            m.register_forward_pre_hook(lambda mod, args: (rounded(args[0]),))
        elif isinstance(m, Experts):
            m.grouped_swiglu = grouped_swiglu.__get__(m)
    return model


def _pair(path, scale_fmt):
    fp8 = Model.from_pretrained(path, keep_fp8=True)
    dense = Model.from_pretrained(path)
    dense.fp8_scale_fmt = scale_fmt
    dense.fp8_names = {n for n, m in fp8.named_modules() if isinstance(m, FP8WeightLinear)}
    return fp8, dense


def module_bound(name: str) -> float:
    """The bound of an FP8 module against its twin on the same inputs: float32's 1e-5 for a linear layer; 1e-3 for
    the routed experts, whose SwiGLU output is quantized again inside the module, so that a float32-rounding
    difference of the gate/up GEMMs can move one of its elements across an e4m3 rounding boundary (one e4m3 step
    of one element: measured up to 2e-5 of the output; a wrong expert or weight is O(1))."""
    return 1e-3 if name.endswith(".experts") else 1e-5


def fp8_calls(model: Model, ids: torch.Tensor) -> list[tuple[str, tuple, torch.Tensor]]:
    """``(module name, inputs, output)`` of every call of an FP8 module in ``model(ids)``."""
    calls, handles = [], []
    for name, m in model.named_modules():
        if isinstance(m, (FP8WeightLinear, FP8WeightExperts)):
            handles.append(m.register_forward_hook(lambda mod, args, out, n=name: calls.append((n, args, out))))
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in handles:
            h.remove()
    return calls


@pytest.mark.parametrize("fmt", ["fp8", "ue8m0"])
def test_keep_fp8_modules(exported, fmt):
    """Each FP8 module on the inputs it gets in a forward = its dequantized twin with FP8-rounded GEMM inputs."""
    root, _ = exported
    fp8, dense = _pair(root / fmt, "ue8m0" if fmt == "ue8m0" else None)
    assert {type(m).__name__ for m in fp8_modules(fp8)} == {"FP8WeightLinear", "FP8WeightExperts"}
    kv_b = fp8.model.layers[1].self_attn.kv_b_proj
    assert kv_b.weight.dtype == FP8_DTYPE and kv_b.weight_scale_inv.dtype == torch.float32
    assert isinstance(fp8.model.layers[1].mlp.experts, FP8WeightExperts) and isinstance(fp8.mtp[0].self_attn.o_proj,
                                                                                   FP8WeightLinear)
    assert type(fp8.model.layers[1].mlp.gate).__name__ == "Router" and isinstance(fp8.lm_head, torch.nn.Linear)
    twins = dict(_emulated(dense).named_modules())
    calls = fp8_calls(fp8, _ids(1, (3, 13)))
    names = {n for n, m in fp8.named_modules() if isinstance(m, (FP8WeightLinear, FP8WeightExperts))}
    assert {n for n, _, _ in calls} == {n for n in names if not n.startswith("mtp.")}  # forward runs no MTP
    with torch.no_grad():
        for name, args, out in calls:
            assert_close(out, twins[name](*args), bound=module_bound(name), what=f"keep_fp8 {name}")


@pytest.mark.parametrize("fmt", ["fp8", "ue8m0"])
def test_keep_fp8_logits(exported, fmt):
    root, _ = exported
    fp8, dense = _pair(root / fmt, "ue8m0" if fmt == "ue8m0" else None)
    ids = _ids(1, (3, 13))
    with torch.no_grad():
        got, plain = fp8(ids), dense(ids)
        expected = _emulated(dense)(ids)
    err, plain_err = rel_err(got, expected), rel_err(got, plain)
    assert err < 0.05 and plain_err < 0.5, (err, plain_err)
    print(f"\n[keep_fp8 {fmt}] vs emulation {err:.2e}; vs the dequantized model {plain_err:.3f} (FP8 activations)")


@pytest.mark.parametrize("scale_fmt", [None, "ue8m0"])
def test_fp8_linear_bound(scale_fmt):
    """One FP8 linear (partial blocks, a bias) against ``x @ dequant(W)^T + b``: within e4m3's 2^-4."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(200, 300, generator=g) / 300**0.5
    m = FP8WeightLinear(300, 200, bias=True, scale_fmt=scale_fmt)
    m.weight, m.weight_scale_inv = weight_quant(w, 128, scale_fmt)
    m.bias.copy_(torch.randn(200, generator=g))
    x = torch.randn(2, 9, 300, generator=g)
    y = m(x)
    assert y.shape == (2, 9, 200) and y.dtype == torch.float32
    exact = x @ m.dense_weight().T + m.bias
    assert rel_err(y, exact) < 2**-4
    assert_close(y, act_dequant(*act_quant(x, 128, scale_fmt)) @ m.dense_weight().T + m.bias, torch.float32)


def test_keep_fp8_memory(exported):
    """Weight bytes: the FP8 matrices with their scales against the same matrices in bfloat16 and float32."""
    root, _ = exported
    fp8, dense = _pair(root / "fp8", None)
    mods = fp8_modules(fp8)
    fp8_bytes = sum(b.numel() * b.element_size() for m in mods for b in m.buffers())
    n = sum(b.numel() for m in mods for name, b in m.named_buffers() if not name.endswith("_scale_inv"))
    scales = sum(b.numel() for m in mods for name, b in m.named_buffers() if name.endswith("_scale_inv"))
    assert fp8_bytes == n + 4 * scales
    total = sum(t.numel() * t.element_size() for t in fp8.state_dict().values())
    total_f32 = sum(t.numel() * t.element_size() for t in dense.state_dict().values())
    print(f"\n[keep_fp8 memory] FP8 matrices {fp8_bytes} B = {fp8_bytes / (2 * n):.3f} x bf16, "
          f"{fp8_bytes / (4 * n):.3f} x fp32 (scales {4 * scales} B); whole model {total / total_f32:.3f} x fp32")
    assert fp8_bytes / (2 * n) < 0.51  # half of bf16, plus 4 bytes per 128x128 block (more with partial blocks)


def test_keep_fp8_generate_and_dtype(exported):
    root, _ = exported
    fp8, dense = _pair(root / "ue8m0", "ue8m0")
    prompt = _ids(2, (2, 4))
    out = fp8.generate(prompt, 6)  # the cache: MLA decodes absorbed, through the dequantized kv_b_proj
    assert out.shape == (2, 10) and torch.equal(out[:, :4], prompt) and int(out.max()) < VOCAB
    with torch.no_grad():
        assert torch.equal(out[:, 4], fp8(prompt)[:, -1].argmax(-1))
    half = Model.from_pretrained(root / "ue8m0", keep_fp8=True, dtype=torch.bfloat16)
    kv_b = half.model.layers[0].self_attn.kv_b_proj
    assert kv_b.weight.dtype == FP8_DTYPE and kv_b.weight_scale_inv.dtype == torch.float32
    assert half.model.embed_tokens.weight.dtype == torch.bfloat16
    with torch.no_grad():
        logits, full = half(prompt), fp8(prompt)
    # bf16 rounding moves activations across e4m3 rounding boundaries: FP8-noise-sized differences, and routing
    assert logits.dtype == torch.bfloat16 and rel_err(logits, full) < 0.5


def test_keep_fp8_errors(exported):
    root, _ = exported
    with pytest.raises(ValueError, match="keep_fp8 needs an FP8 checkpoint") as e:
        Model.from_pretrained(root / "src", keep_fp8=True)
    assert "\n" not in str(e.value) and "dsfs export --fp8" in str(e.value)
    fp8 = Model.from_pretrained(root / "fp8", keep_fp8=True)
    with pytest.raises(ValueError, match="save_pretrained: the model was loaded with keep_fp8=True"):
        fp8.save_pretrained(root / "nope")
    assert not (root / "nope").exists()
    with pytest.raises(RuntimeError, match="inference only"):
        fp8.train()


def test_keep_fp8_dsa(tmp_path):
    """V3.2: the indexer's wq_b and wk are FP8 (weights_proj and k_norm are not) and run FP8."""
    _source(tmp_path, "dsa", index_head_dim=16)
    assert _export(tmp_path / "src", tmp_path / "fp8", "--fp8") == 0
    got = _tensors(tmp_path / "fp8")
    assert got["model.layers.0.self_attn.indexer.wq_b.weight"].dtype == FP8_DTYPE
    assert got["model.layers.0.self_attn.indexer.wk.weight_scale_inv"].shape == (1, 2)
    assert got["model.layers.0.self_attn.indexer.weights_proj.weight"].dtype == torch.float32
    fp8, dense = _pair(tmp_path / "fp8", None)
    assert isinstance(fp8.model.layers[0].self_attn.indexer.wk, FP8WeightLinear)
    twins = dict(_emulated(dense).named_modules())
    calls = fp8_calls(fp8, _ids(4, (2, 9)))
    assert {"model.layers.0.self_attn.indexer.wq_b", "model.layers.1.self_attn.indexer.wk"} <= {n for n, _, _ in calls}
    with torch.no_grad():
        for name, args, out in calls:
            assert_close(out, twins[name](*args), bound=module_bound(name), what=f"keep_fp8 {name}")


def test_keep_fp8_runtime_cuda(exported):
    """runtime_cuda's model keeps FP8 on the Triton ops (`kernels.triton.fp8`), as close to the reference's as
    float32 allows."""
    runtime_cuda = pytest.importorskip("runtime_cuda")
    from kernels.triton import utils
    from tests.cuda.conftest import interpreter_unusable

    if utils.interpreted() and interpreter_unusable():
        pytest.skip(interpreter_unusable())
    root, _ = exported
    model = runtime_cuda.Model.from_pretrained(root / "ue8m0", keep_fp8=True)
    assert model.model.layers[0].mlp.up_proj.ops.__name__ == "kernels.triton.fp8"
    mods = dict(model.named_modules())
    errs = []
    with torch.no_grad():
        for name, args, out in fp8_calls(Model.from_pretrained(root / "ue8m0", keep_fp8=True), _ids(5, (2, 9))):
            errs.append(assert_close(mods[name](*args), out, bound=module_bound(name),
                                     what=f"runtime_cuda keep_fp8 {name}"))
        logits = model(_ids(5, (2, 9)))
    assert torch.isfinite(logits).all()
    print(f"\n[keep_fp8 runtime_cuda] FP8 modules vs the reference's: max rel err {max(errs):.2e}")


# ---------------------------------------------------------------- CLI and config


def test_export_cli(exported, tmp_path, capsys):
    root, _ = exported
    assert _export(root / "src", tmp_path / "plain") == 0  # no --fp8: the tensors as they are
    plain, src = _tensors(tmp_path / "plain"), _tensors(root / "src")
    assert sorted(plain) == sorted(src) and all(torch.equal(plain[n], src[n]) for n in src)
    assert "quantization_config" not in json.loads((tmp_path / "plain" / "config.json").read_text())
    run = tmp_path / "run"
    shutil.copytree(root / "src", run / "final")  # a run directory: its final/ model
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "o"), "--fp8"]) == 0
    assert "tensors in FP8 e4m3" in capsys.readouterr().out
    for argv, words in [
        (["--checkpoint", str(run), "--out", str(tmp_path / "o"), "--fp8"], "already exists; pass --overwrite"),
        (["--checkpoint", str(run), "--out", str(tmp_path / "x"), "--scale-fmt", "ue8m0"], "applies to --fp8"),
        (["--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "x")], "no such checkpoint directory"),
        (["--checkpoint", str(run / "final"), "--out", str(run / "final"), "--overwrite"], "is or holds"),
    ]:
        assert main(["export", *argv]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("dsfs: error: ") and words in err, err
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "x"), "--format", "onnx"]) == 2
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "x"), "--fp8", "--scale-fmt",
                 "e8m0"]) == 2  # argparse: not one of the choices
    assert "invalid choice: 'onnx'" in capsys.readouterr().err
    for argv, words in [  # options of another format
        (["--format", "gguf", "--fp8"], "--fp8 applies to --format hf"),
        (["--outtype", "q8_0"], "--outtype applies to --format gguf"),
        (["--format", "gguf", "--prefill-len", "8"], "apply to --format coreml"),
        (["--format", "coreml"], "expected a path ending in .mlpackage"),
    ]:
        assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "x"), *argv]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err, err
    before = (tmp_path / "o" / "model.safetensors").stat().st_mtime_ns
    assert _export(run, tmp_path / "o", "--fp8", "--scale-fmt", "ue8m0", "--overwrite") == 0
    assert json.loads((tmp_path / "o" / "config.json").read_text())["quantization_config"]["scale_fmt"] == "ue8m0"
    assert (tmp_path / "o" / "model.safetensors").stat().st_mtime_ns != before
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith((".tmp-", ".old-"))]


def test_export_keeps_stored_dtypes(tmp_path):
    """A bf16 checkpoint exports its unquantized tensors in bf16 (config.json says so), the FP8 ones from them."""
    model = _source(tmp_path).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    assert _export(tmp_path / "bf16", tmp_path / "fp8", "--fp8") == 0
    got, src = _tensors(tmp_path / "fp8"), _tensors(tmp_path / "bf16")
    assert got["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert json.loads((tmp_path / "fp8" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    n = "model.layers.1.mlp.experts.0.up_proj.weight"
    assert torch.equal(got[n].view(torch.uint8), weight_quant(src[n])[0].view(torch.uint8))


def test_config_scale_fmt():
    d = make_config().to_dict()
    assert fp8_quantization_config() == QC and fp8_quantization_config("ue8m0") == {**QC, "scale_fmt": "ue8m0"}
    assert fp8_scale_fmt({**d, "quantization_config": {**QC, "scale_fmt": "ue8m0"}}) == "ue8m0"
    assert fp8_scale_fmt({**d, "quantization_config": QC}) is None and fp8_scale_fmt(d) is None
    cfg = ModelConfig.from_dict({**d, "quantization_config": {**QC, "scale_fmt": "ue8m0"}})
    assert "quantization_config" not in cfg.to_dict()
    with pytest.raises(ValueError, match="quantization_config scale_fmt='e5m2'; expected one of"):
        ModelConfig.from_dict({**d, "quantization_config": {**QC, "scale_fmt": "e5m2"}})
    with pytest.raises(ValueError, match="scale_fmt='fp32'"):
        fp8_quantization_config("fp32")


def test_export_never_replaces_what_it_reads_or_a_non_model_directory(tmp_path, monkeypatch):
    """``--overwrite`` replaces a model directory (or an empty one) only: never the checkpoint being exported or a
    folder holding it, the working directory, or a folder of other files; an empty --out is refused."""
    from pathlib import Path

    from dsfs.export import ExportError, export

    _source(tmp_path / "run")
    src = tmp_path / "run" / "src"
    precious = tmp_path / "data"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    monkeypatch.chdir(precious)
    for out in (src, tmp_path / "run", tmp_path, Path("."), precious, ""):
        with pytest.raises(ExportError, match="is or holds|is empty"):
            export(src, out, overwrite=True)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="no config.json"):
        export(src, other, overwrite=True)
    assert (other / "notes.txt").read_text() == "keep me" and (precious / "notes.txt").exists()
    assert (src / "config.json").is_file()
    export(src, tmp_path / "out")
    export(src, tmp_path / "out", fp8=True, overwrite=True)  # a model directory: replaced
    assert "quantization_config" in (tmp_path / "out" / "config.json").read_text()
