"""runtime_mlx checkpoints: the Hugging Face directory it writes opens in mlx_lm and in the reference with the
same logits, and it opens the reference's (also FP8 block-quantized and transformers' packed experts); writing
is atomic; bad directories raise. Checkpoints from elsewhere (see tests/test_checkpoint.py): transformers-saved
DeepSeek-V3 / V3.2 with default configs, with the config values transformers reads in a defined way (`VARIANTS`),
in bf16 (loaded in float32 unless asked), and a DeepSeek-V3-shaped FP8 release match transformers' logits; the saved
config.json states the saved dtype."""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import types
import warnings

import pytest
import torch
from mlx.utils import tree_flatten
from safetensors.torch import load_file, save_file

from reference import Model as ReferenceModel
from reference.checkpoint import CheckpointWarning, DiskFullError
from reference.fp8 import weight_quant
from reference.testing import assert_close
from runtime_mlx import Model
from runtime_mlx.checkpoint import to_hf
from tests.mlx.utils import copy_weights, model_pair, mx, to_mx, to_torch
from tests.reference_utils import make_config
from tests.test_checkpoint import (
    CASES,
    SEQ,
    VARIANTS,
    _saved_dtype,
    draw_ids,
    hf_checkpoint,
    hf_float32,
    write_deepseek_checkpoint,
)

mlx_utils = pytest.importorskip("mlx_lm.utils")
transformers = pytest.importorskip("transformers")


def _config(attention_type="mla", **kw):
    base = dict(q_lora_rank=12, num_nextn_predict_layers=1, n_routed_experts=8, n_group=2, topk_group=1)
    return make_config(attention_type, **{**base, **kw})


def _positive_bias(ref):
    """mlx-lm zero-fills the dropped groups where the reference puts -inf: equal when biased scores are > 0."""
    with torch.no_grad():
        for m in ref.moe_layers():
            m.gate.e_score_correction_bias.abs_()


@pytest.mark.parametrize("attention_type", ["mla", "dsa"])
def test_mlx_checkpoint_loads_in_mlx_lm_and_reference(tmp_path, attention_type):
    cfg = _config(attention_type)
    ref, model = model_pair(cfg)
    _positive_bias(ref)
    copy_weights(model, ref)
    model.save_pretrained(tmp_path / "ck", tokenizer_file=None)
    files = sorted(p.name for p in (tmp_path / "ck").iterdir())
    assert files == ["checksums.json", "config.json", "model.safetensors", "mtp.safetensors"]
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in load_file(tmp_path / "ck" / "model.safetensors")
    assert "model.layers.2.eh_proj.weight" in load_file(tmp_path / "ck" / "mtp.safetensors")
    ids = torch.randint(0, cfg.vocab_size, (2, 10))
    ours = model(to_mx(ids))
    with torch.no_grad():
        expected = ref(ids)
    e_ours = assert_close(to_torch(ours), expected, what="mlx vs reference")
    loaded = ReferenceModel.from_pretrained(tmp_path / "ck").eval()
    with torch.no_grad():
        e_ref = assert_close(loaded(ids), to_torch(ours), what="reference loading the mlx checkpoint")
    lm, _ = mlx_utils.load_model(pathlib.Path(tmp_path / "ck"))
    e_lm = assert_close(to_torch(lm(to_mx(ids))), to_torch(ours), what="mlx_lm loading the mlx checkpoint")
    again = Model.from_pretrained(tmp_path / "ck")
    assert mx.array_equal(again(to_mx(ids)), ours)
    print(f"\n[mlx] {attention_type}: mlx vs reference {e_ours:.1e}, reference load {e_ref:.1e}, mlx_lm {e_lm:.1e}")


def test_loads_reference_checkpoint_with_tokenizer(tmp_path):
    ref, _ = model_pair(_config(tie_word_embeddings=True))
    tok = tmp_path / "tokenizer.json"
    tok.write_text("{}")
    ref.save_pretrained(tmp_path / "ck", tokenizer_file=tok)
    model = Model.from_pretrained(tmp_path / "ck")
    ids = torch.randint(0, 97, (1, 7))
    with torch.no_grad():
        assert_close(to_torch(model(to_mx(ids))), ref(ids), what="mlx loading the reference checkpoint")
    model.save_pretrained(tmp_path / "again", tokenizer_file=tok)
    assert (tmp_path / "again" / "tokenizer.json").read_text() == "{}"
    names = [set(load_file(tmp_path / d / "model.safetensors")) for d in ("again", "ck")]
    assert names[0] == names[1]


def test_fp8_and_packed_experts(tmp_path):
    """FP8 e4m3 matrices with 128x128 ``weight_scale_inv`` are dequantized as the reference does; transformers'
    packed ``experts.gate_up_proj`` (E, 2I, H) is split."""
    ref, _ = model_pair(_config(num_nextn_predict_layers=0))
    ref.save_pretrained(tmp_path / "ck")
    sd = load_file(tmp_path / "ck" / "model.safetensors")
    for name in ("model.layers.0.self_attn.kv_b_proj.weight", "model.layers.1.mlp.shared_experts.up_proj.weight"):
        sd[name], sd[name + "_scale_inv"] = weight_quant(sd[name])
    base = "model.layers.1.mlp.experts"
    gate = torch.stack([sd.pop(f"{base}.{e}.gate_proj.weight") for e in range(8)])
    up = torch.stack([sd.pop(f"{base}.{e}.up_proj.weight") for e in range(8)])
    sd[f"{base}.gate_up_proj"] = torch.cat((gate, up), dim=1)
    save_file(sd, tmp_path / "ck" / "model.safetensors")
    (tmp_path / "ck" / "checksums.json").unlink()  # edited on purpose: its checksum would refuse it
    ids = torch.randint(0, 97, (1, 7))
    loaded = ReferenceModel.from_pretrained(tmp_path / "ck").eval()
    with torch.no_grad():
        expected = loaded(ids)
    got = Model.from_pretrained(tmp_path / "ck")(to_mx(ids))
    assert_close(to_torch(got), expected, what="fp8 + packed experts")


@pytest.mark.filterwarnings("ignore:checkpoint .* MTP depth")  # the 3-layer config reads layer 2 as main
def test_save_is_atomic_and_bad_dirs_raise(tmp_path, monkeypatch):
    _, model = model_pair(_config())
    model.save_pretrained(tmp_path / "ck")
    before = (tmp_path / "ck" / "model.safetensors").read_bytes()

    def crash(path, arrays, metadata=None):
        raise OSError("disk full")

    monkeypatch.setattr(mx, "save_safetensors", crash)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path / "ck")
    assert (tmp_path / "ck" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError):
        Model.from_pretrained(tmp_path / "missing")
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (tmp_path / "ck" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"does not match the config: unexpected \['model\.layers\.2\.eh_proj"):
        Model.from_pretrained(tmp_path / "ck")
    (tmp_path / "ck" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="corrupt"):
        Model.from_pretrained(tmp_path / "ck")


def test_full_disk_checksums_modes_and_non_finite_weights(tmp_path, monkeypatch):
    """MLX saves go through `reference.checkpoint.write_model_dir`: checksums.json, the umask's modes and one
    `DiskFullError` for MLX's errno-less write error; loading verifies checksums and finiteness as the reference."""
    _, model = model_pair(_config())
    old = os.umask(0o022)
    try:
        model.save_pretrained(tmp_path / "ck")
    finally:
        os.umask(old)
    ck = tmp_path / "ck"
    assert {p.stat().st_mode & 0o777 for p in ck.iterdir()} == {0o644} and ck.stat().st_mode & 0o777 == 0o755
    sums = json.loads((ck / "checksums.json").read_text())
    assert sorted(sums["sha256"]) == ["model.safetensors", "mtp.safetensors"]
    sd = load_file(ck / "model.safetensors")
    name = "model.layers.0.self_attn.kv_b_proj.weight"
    sd[name][1, 2] = float("inf")
    save_file(sd, ck / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.safetensors does not match its checksum \(corrupted\?"):
        Model.from_pretrained(ck)
    (ck / "checksums.json").unlink()
    with pytest.raises(ValueError, match=rf"tensor {re.escape(name)} holds non-finite values"):
        Model.from_pretrained(ck)

    def full(path, arrays, metadata=None):  # what mx.save_safetensors raises on ENOSPC
        raise RuntimeError("[write] Unable to write 334556 bytes to file.")

    monkeypatch.setattr(mx, "save_safetensors", full)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: types.SimpleNamespace(total=10**9, used=10**9, free=0))
    with pytest.raises(DiskFullError, match=rf"^disk full while writing {re.escape(str(tmp_path / 'ck2'))}$"):
        model.save_pretrained(tmp_path / "ck2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


@pytest.mark.parametrize("case", list(CASES))
def test_transformers_default_checkpoint_loads(case, tmp_path):
    hf = hf_checkpoint(case, tmp_path / "hf")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = Model.from_pretrained(tmp_path / "hf")
        ids = draw_ids(ReferenceModel.from_pretrained(tmp_path / "hf"))  # DSA: top-k cuts with a margin
    said = [str(w.message) for w in caught]
    if CASES[case][0] == "DeepseekV3":  # transformers' default asks for one MTP depth and writes none
        assert len(said) == 2 and "(missing depth 0: model.layers.2.*); loading without it" in said[0], said
    else:
        assert said == []
    assert model.config.num_nextn_predict_layers == 0 and len(model.mtp) == 0
    with torch.no_grad():
        expected = hf(ids).logits
    got = model(to_mx(ids))
    err = assert_close(to_torch(got), expected, torch.float32, what=f"runtime_mlx loading transformers' {case}")
    print(f"\n[mlx checkpoint] transformers {case}: rel err {err:.2e}")
    model.save_pretrained(tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = Model.from_pretrained(tmp_path / "ours")
    assert mx.array_equal(again(to_mx(ids)), got)


@pytest.mark.parametrize("case", list(VARIANTS))
def test_transformers_variant_loads_and_saves_as_transformers_reads_it(case, tmp_path):
    hf = hf_checkpoint(case, tmp_path / "hf")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = Model.from_pretrained(tmp_path / "hf")
        ids = draw_ids(ReferenceModel.from_pretrained(tmp_path / "hf"))  # DSA: top-k cuts with a margin
    with torch.no_grad():
        expected = hf(ids).logits
    got = model(to_mx(ids))
    err = assert_close(to_torch(got), expected, torch.float32, what=f"runtime_mlx loading transformers' {case}")
    model.save_pretrained(tmp_path / "ours")
    with torch.no_grad():
        back = hf_float32(tmp_path / "ours")(ids).logits
    err_back = assert_close(back, to_torch(got), torch.float32, what=f"transformers loading runtime_mlx's {case}")
    print(f"\n[mlx checkpoint] transformers {case}: rel err {err:.2e}; saved and read by transformers {err_back:.2e}")


def test_bf16_checkpoint_loads_in_float32_unless_asked(tmp_path):
    """A bf16 checkpoint with a MoE layer: float32 by default (MLX's gather_mm on Linux takes only float32)."""
    hf_checkpoint("v3_moe", tmp_path / "hf", dtype=torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CheckpointWarning)  # transformers' default MTP depth
        model = Model.from_pretrained(tmp_path / "hf")
        half = Model.from_pretrained(tmp_path / "hf", dtype=mx.bfloat16)
        ids = draw_ids(ReferenceModel.from_pretrained(tmp_path / "hf"))
    assert {p.dtype for _, p in tree_flatten(model.parameters())} == {mx.float32}
    assert {p.dtype for _, p in tree_flatten(half.parameters())} == {mx.bfloat16}
    with torch.no_grad():
        expected = hf_float32(tmp_path / "hf")(ids).logits
    err = assert_close(to_torch(model(to_mx(ids))), expected, torch.float32, what="runtime_mlx, bf16 checkpoint")
    print(f"\n[mlx checkpoint] transformers bf16 checkpoint in float32: rel err {err:.2e}")


def test_saved_config_states_the_saved_dtype(tmp_path):
    hf_checkpoint("v3_moe", tmp_path / "hf", dtype=torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CheckpointWarning)
        Model.from_pretrained(tmp_path / "hf").save_pretrained(tmp_path / "f32")
        Model.from_pretrained(tmp_path / "hf", dtype=mx.bfloat16).save_pretrained(tmp_path / "bf16")
    assert _saved_dtype(tmp_path / "f32") == ("float32", "float32", torch.float32)
    assert load_file(tmp_path / "bf16" / "model.safetensors")["lm_head.weight"].dtype == torch.bfloat16
    assert _saved_dtype(tmp_path / "bf16") == ("bfloat16", "bfloat16", torch.bfloat16)


def test_missing_mtp_init(tmp_path):
    hf_checkpoint("v3_moe", tmp_path / "hf")
    mx.random.seed(5)
    with pytest.warns(CheckpointWarning, match=r"missing depth 0: model\.layers\.2\.\*\); initialized fresh"):
        model = Model.from_pretrained(tmp_path / "hf", missing_mtp="init")
    assert model.config.num_nextn_predict_layers == 1
    mx.random.seed(5)
    fresh = dict(tree_flatten(Model(model.config).parameters()))
    for k, v in tree_flatten(model.parameters()):
        assert mx.array_equal(v, fresh[k]) == k.startswith("mtp.0."), k  # only the MTP depth keeps its init
    model.save_pretrained(tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["num_nextn_predict_layers"] == 1
    with pytest.raises(ValueError, match="missing_mtp='skip'; expected one of"):
        Model.from_pretrained(tmp_path / "hf", missing_mtp="skip")


def test_deepseek_release_shape_loads(tmp_path):
    ck, hf_dir, values = write_deepseek_checkpoint(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = Model.from_pretrained(ck, dtype=mx.float32)  # the unquantized tensors are stored in bf16
    main, mtp = to_hf(model)
    got = {**main, **mtp}
    assert sorted(got) == sorted(values)
    for name, v in values.items():  # FP8 dequantized in 128x128 blocks; the MTP layer in the MTP module
        assert torch.equal(to_torch(got[name]).float(), v), name
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(ids).logits
    err = assert_close(to_torch(model(to_mx(ids))), expected, torch.float32, what="runtime_mlx, DeepSeek-shaped FP8")
    print(f"\n[mlx checkpoint] DeepSeek-shaped FP8: rel err {err:.2e}")
