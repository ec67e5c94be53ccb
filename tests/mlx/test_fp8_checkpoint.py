"""FP8 checkpoints in MLX: mlx_lm opens ``dsfs export --fp8`` unchanged, and ``runtime_mlx.Model.from_pretrained(...,
keep_fp8=True)`` keeps the FP8 weights (uint8 e4m3 bits + float32 block scales) and runs `runtime_mlx.kernels.fp8`.

Bounds: mlx_lm dequantizes to bfloat16, exact for power-of-two (ue8m0) scales: float32's 1e-5 against the reference on
the dequantized weights; with float32 scales the bf16 rounding of each weight gives bf16's bound. keep_fp8: each FP8
module of the MLX model on the inputs the reference's module gets in a forward: float32's 1e-5 (the same quantization
of the same activations), 1e-3 for the routed experts (tests/test_export_fp8.py `module_bound`); the whole model
against the reference's keep_fp8 model: 0.05, since a float32-rounding difference upstream can move an activation
across an e4m3 rounding boundary and, through top-k routing, an expert (over 8 seeds: 4 gave <= 2e-6, the others
4e-5, 3e-4, 1e-2 and 2e-2).
"""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten

from dsfs.cli import main
from reference import Model as ReferenceModel
from reference.testing import assert_close, rel_err
from runtime_mlx import Model
from runtime_mlx.checkpoint import FP8WeightExperts, FP8WeightLinear
from tests.mlx.utils import PATHS, mx, to_mx, to_torch
from tests.reference_utils import make_config, randomize_
from tests.test_export_fp8 import fp8_calls, module_bound

mlx_utils = pytest.importorskip("mlx_lm.utils")

VOCAB = 97
PARTIAL = dict(hidden_size=160, intermediate_size=200, moe_intermediate_size=136, q_lora_rank=136, kv_lora_rank=144,
               num_nextn_predict_layers=1)  # every FP8 matrix has partial 128 blocks


def _export(root, attention_type="mla", seed=0, **kw):
    """A random reference model saved under ``root / 'src'`` and exported to ``root / 'fp8'`` (float32 scales) and
    ``root / 'ue8m0'``. Returns the model."""
    torch.manual_seed(seed)
    model = randomize_(ReferenceModel(make_config(attention_type, **{**PARTIAL, **kw})), router_bias=0.1).eval()
    model.save_pretrained(root / "src")
    for name, flags in (("fp8", []), ("ue8m0", ["--scale-fmt", "ue8m0"])):
        assert main(["export", "--checkpoint", str(root / "src"), "--out", str(root / name), "--fp8", "-q",
                     *flags]) == 0
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8")
    _export(root)
    return root


def _ids(seed=0, shape=(2, 11)):
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def _dsa_ids(model, seed=0):
    """Token ids whose indexer scores have no near-tie at the top-k cut (implementations round differently)."""
    from tests.test_oracle import topk_margin

    for s in range(seed, seed + 20):
        ids = _ids(s, (2, 9))
        if topk_margin(model, ids) > 1e-3:
            return ids
    raise AssertionError("could not draw indexer scores without near-ties")


@pytest.mark.parametrize("fmt", ["fp8", "ue8m0"])
def test_mlx_lm_opens_fp8_export(exported, fmt):
    lm, _ = mlx_utils.load_model(pathlib.Path(exported / fmt))
    ids = _ids()
    with torch.no_grad():
        expected = ReferenceModel.from_pretrained(exported / fmt)(ids)
    out = lm(to_mx(ids)).astype(mx.float32)
    bound = torch.float32 if fmt == "ue8m0" else torch.bfloat16  # mlx_lm dequantizes to bf16: exact for 2^k scales
    err = assert_close(to_torch(out), expected, bound, what=f"mlx_lm on the FP8 export ({fmt})")
    print(f"\n[mlx fp8] mlx_lm on the {fmt} export: rel err {err:.2e}")


def test_mlx_lm_opens_fp8_export_v32(tmp_path):
    _export(tmp_path, "dsa", index_head_dim=16)
    ref = ReferenceModel.from_pretrained(tmp_path / "ue8m0")
    ids = _dsa_ids(ref)
    lm, _ = mlx_utils.load_model(pathlib.Path(tmp_path / "ue8m0"))
    with torch.no_grad():
        expected = ref(ids)
    err = assert_close(to_torch(lm(to_mx(ids)).astype(mx.float32)), expected, torch.float32,
                       what="mlx_lm deepseek_v32 on the FP8 export")
    print(f"\n[mlx fp8] mlx_lm deepseek_v32 on the ue8m0 export: rel err {err:.2e}")


def _module(model, name: str):
    obj = model
    for part in name.split("."):
        obj = obj[int(part)] if isinstance(obj, list) else getattr(obj, part)
    return obj


def _check_modules(model, ref, ids) -> float:
    """Every FP8 module of the MLX ``model`` on the inputs the reference ``ref``'s module of that name gets in
    ``ref(ids)``, against its output, within `module_bound`. Returns the largest error."""
    errs = []
    for name, args, out in fp8_calls(ref, ids):
        got = _module(model, name)(*(to_mx(a) for a in args))
        errs.append(assert_close(to_torch(got), out, bound=module_bound(name), what=f"MLX keep_fp8 {name}"))
    assert errs
    return max(errs)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("fmt", ["fp8", "ue8m0"])
def test_keep_fp8_matches_reference(exported, fmt, path):
    model = Model.from_pretrained(exported / fmt, keep_fp8=True)
    kv_b = model.model.layers[1].self_attn.kv_b_proj
    assert isinstance(kv_b, FP8WeightLinear) and kv_b.weight.dtype == mx.uint8
    assert kv_b.weight_scale_inv.dtype == mx.float32
    assert isinstance(model.model.layers[1].mlp.experts, FP8WeightExperts)
    assert isinstance(model.mtp[0].self_attn.o_proj, FP8WeightLinear)
    assert not isinstance(model.lm_head, FP8WeightLinear) and not isinstance(model.mtp[0].eh_proj, FP8WeightLinear)
    frozen = {k for k, a in tree_flatten(model.parameters()) if a.dtype == mx.uint8 or k.endswith("_scale_inv")}
    assert frozen and not frozen & {k for k, _ in tree_flatten(model.trainable_parameters())}
    ref = ReferenceModel.from_pretrained(exported / fmt, keep_fp8=True)
    ids = _ids(1, (3, 13))
    err = _check_modules(model, ref, ids)
    with torch.no_grad():
        expected = ref(ids)
    whole = rel_err(to_torch(model(to_mx(ids))), expected)
    assert whole < 0.05, whole
    plain = rel_err(to_torch(Model.from_pretrained(exported / fmt)(to_mx(ids))), expected)
    print(f"\n[mlx keep_fp8 {fmt}] FP8 modules vs the reference's {err:.2e}; model vs reference keep_fp8 {whole:.2e}, "
          f"vs the dequantized model {plain:.3f}")


def test_keep_fp8_dsa_matches_reference(tmp_path):
    _export(tmp_path, "dsa", index_head_dim=16)
    ref = ReferenceModel.from_pretrained(tmp_path / "fp8", keep_fp8=True)
    model = Model.from_pretrained(tmp_path / "fp8", keep_fp8=True)
    assert isinstance(model.model.layers[0].self_attn.indexer.wq_b, FP8WeightLinear)
    ids = _dsa_ids(ReferenceModel.from_pretrained(tmp_path / "fp8"))
    err = _check_modules(model, ref, ids)
    with torch.no_grad():
        whole = rel_err(to_torch(model(to_mx(ids))), ref(ids))
    assert whole < 0.05, whole
    print(f"\n[mlx keep_fp8 dsa] FP8 modules vs the reference's {err:.2e}; model {whole:.2e}")


def test_keep_fp8_generate_memory_dtype(exported):
    model = Model.from_pretrained(exported / "ue8m0", keep_fp8=True)
    ref = ReferenceModel.from_pretrained(exported / "ue8m0", keep_fp8=True)
    prompt = _ids(2, (2, 4))
    out = np.array(model.generate(to_mx(prompt), 6))  # cached decode: MLA absorbed through the dequantized kv_b_proj
    assert out.shape == (2, 10) and np.array_equal(out[:, :4], prompt.numpy()) and out.max() < VOCAB
    assert np.array_equal(out[:, 4], np.array(model(to_mx(prompt))[:, -1].argmax(-1)))
    same = (out == ref.generate(prompt, 6).numpy()).mean()
    print(f"\n[mlx keep_fp8 generate] greedy tokens equal to the reference keep_fp8's: {same:.2f}")
    params = dict(tree_flatten(model.parameters()))
    fp8 = {k: a for k, a in params.items() if a.dtype == mx.uint8 or k.endswith("_scale_inv")}
    n = sum(a.size for a in fp8.values() if a.dtype == mx.uint8)
    nbytes = sum(a.nbytes for a in fp8.values())
    dense = Model.from_pretrained(exported / "ue8m0")
    total, total_f32 = (sum(a.nbytes for _, a in tree_flatten(m.parameters())) for m in (model, dense))
    print(f"\n[mlx keep_fp8 memory] FP8 matrices {nbytes} B = {nbytes / (2 * n):.3f} x bf16; whole model "
          f"{total / total_f32:.3f} x fp32")
    assert nbytes / (2 * n) < 0.51
    half = Model.from_pretrained(exported / "ue8m0", keep_fp8=True, dtype=mx.bfloat16)
    kv_b = half.model.layers[0].self_attn.kv_b_proj
    assert kv_b.weight.dtype == mx.uint8 and kv_b.weight_scale_inv.dtype == mx.float32
    assert half.model.embed_tokens.weight.dtype == mx.bfloat16 and half(to_mx(prompt)).dtype == mx.bfloat16


def test_keep_fp8_errors(exported):
    with pytest.raises(ValueError, match="keep_fp8 needs an FP8 checkpoint") as e:
        Model.from_pretrained(exported / "src", keep_fp8=True)
    assert "\n" not in str(e.value)
    model = Model.from_pretrained(exported / "fp8", keep_fp8=True)
    with pytest.raises(ValueError, match="save_pretrained: the model was loaded with keep_fp8=True"):
        model.save_pretrained(exported / "nope")
    model.train()
    with pytest.raises(RuntimeError, match="inference only"):
        model(to_mx(_ids()))


def test_mlx_checkpoint_exports(tmp_path):
    """A checkpoint the MLX model saved exports to FP8 and loads back, in MLX and in the reference."""
    ref = randomize_(ReferenceModel(make_config("mla", **PARTIAL)), router_bias=0.1).eval()
    ref.save_pretrained(tmp_path / "ref")
    Model.from_pretrained(tmp_path / "ref").save_pretrained(tmp_path / "mlx")
    assert main(["export", "--checkpoint", str(tmp_path / "mlx"), "--out", str(tmp_path / "fp8"), "--fp8", "-q"]) == 0
    ids = _ids(3)
    _check_modules(Model.from_pretrained(tmp_path / "fp8", keep_fp8=True),
                   ReferenceModel.from_pretrained(tmp_path / "fp8", keep_fp8=True), ids)
