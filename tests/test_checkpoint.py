"""reference/checkpoint.py: checkpoints from elsewhere.

- ``transformers``-saved DeepSeek-V3 / V3.2 checkpoints with default configs (except sizes) load, and the main
  model's logits equal transformers' within 1e-5 (float32). Their config asks for an MTP depth the files lack
  (``num_nextn_predict_layers`` 1), for more dense layers than there are layers (``first_k_dense_replace`` 3),
  and for routing groups that do not fit the experts (``n_group`` 8) where no layer routes.
- Missing MTP depths are dropped (the default) or initialized fresh from the caller's RNG, with a warning that
  names them; a gap in the depths is refused under "drop"; what the model saves matches its config.
- Config values transformers accepts and reads in a defined way (``n_shared_experts`` 0 with its zero-size
  tensors, 'linear' and 'llama3' RoPE scaling, V3.2's ``mlp_layer_types`` in any order, V3.2's ignored
  ``rope_interleave``) load as transformers reads them, and what we save opens in transformers the same way.
- Loading gives float32 whatever the files store (a bf16 checkpoint included) unless a dtype is asked for, and
  the saved config.json states the dtype of the saved weights (``dtype`` and ``torch_dtype``).
- A tiny checkpoint shaped like DeepSeek-V3's release (FP8 e4m3 weights + 128x128 ``weight_scale_inv``, YaRN,
  the MTP layer with its embedding and head copies, sharded files with an index) loads with the weights
  dequantized where the files say, the MTP weights in the MTP module, and transformers' logits on the
  dequantized weights.
"""

from __future__ import annotations

import json
import logging
import os
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from reference import Model, ModelConfig
from reference.checkpoint import CheckpointWarning, to_hf_state_dict
from reference.fp8 import weight_quant
from reference.testing import assert_close
from tests.reference_utils import make_config, rand_ids, randomize_, tiny_model
from tests.test_oracle import randomize

transformers = pytest.importorskip("transformers")

VOCAB, SEQ = 97, 11
SIZES = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=4, q_lora_rank=24, kv_lora_rank=32, qk_nope_head_dim=16,
             qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, max_position_embeddings=64)
INDEXER = dict(index_n_heads=8, index_head_dim=16, index_topk=4)  # sizes: index_topk 4 < SEQ, so it selects
MOE = dict(first_k_dense_replace=1, n_group=2, topk_group=1, num_experts_per_tok=2)  # routing transformers runs
CASES = {  # (transformers family, config values besides the defaults)
    "v3_defaults": ("DeepseekV3", {}),
    "v3_moe": ("DeepseekV3", MOE),
    "v3_mtp_would_route": ("DeepseekV3", dict(first_k_dense_replace=2)),  # only the absent MTP layer 2 routes
    "v32_defaults": ("DeepseekV32", INDEXER),
    "v32_moe": ("DeepseekV32", {**INDEXER, **MOE}),
}
LINEAR = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 3.0}
LLAMA3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}  # wavelengths 6, 63, 628, 6283: all 3 bands
VARIANTS = {  # config values transformers accepts and reads in a defined way (no MTP depth asked for)
    "v3_no_shared_experts": ("DeepseekV3", {**MOE, "n_shared_experts": 0, "num_nextn_predict_layers": 0}),
    "v3_linear_rope": ("DeepseekV3", {**MOE, "rope_parameters": LINEAR, "num_nextn_predict_layers": 0}),
    "v3_llama3_rope": ("DeepseekV3", {"rope_parameters": LLAMA3, "num_nextn_predict_layers": 0}),
    "v32_mlp_layer_types": ("DeepseekV32", {**INDEXER, **MOE, "mlp_layer_types": ["sparse", "dense"]}),
    "v32_rope_interleave_false": ("DeepseekV32", {**INDEXER, **MOE, "rope_interleave": False}),
}


class _NonEmpty:
    """``model`` as `tests.test_oracle.randomize` reads it, without its zero-size tensors (nothing to draw)."""

    def __init__(self, model):
        self.model, self.config = model, model.config

    def named_parameters(self):
        return ((n, p) for n, p in self.model.named_parameters() if p.numel())

    def named_buffers(self):
        return self.model.named_buffers()


def hf_checkpoint(case: str, path, seed: int = 0, dtype: torch.dtype | None = None):
    """Save ``transformers.<family>ForCausalLM(<family>Config(**SIZES, ...))`` (a case of `CASES` or `VARIANTS`)
    with O(1) random weights to ``path``, in ``dtype`` when given; return the transformers model (eval mode)."""
    logging.getLogger("transformers").setLevel(logging.ERROR)
    family, values = {**CASES, **VARIANTS}[case]
    config = getattr(transformers, f"{family}Config")(**SIZES, **values)
    hf = getattr(transformers, f"{family}ForCausalLM")(config).eval()
    randomize(_NonEmpty(hf), torch.Generator().manual_seed(seed))
    if dtype is not None:
        hf = hf.to(dtype)
    hf.save_pretrained(path)
    return hf


def hf_float32(path):
    """transformers' model of the checkpoint ``path``, loaded in float32 (eval mode)."""
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def draw_ids(model: Model, seed: int = 0) -> torch.Tensor:
    """(2, SEQ) token ids; for DSA, ids whose indexer top-k cuts have a relative margin > 1e-3 (DESIGN.md)."""
    from tests.test_oracle import topk_margin

    gen = torch.Generator().manual_seed(seed)
    for _ in range(20):
        ids = torch.randint(0, VOCAB, (2, SEQ), generator=gen)
        if model.config.attention_type != "dsa" or topk_margin(model, ids) > 1e-3:
            return ids
    raise AssertionError("could not draw indexer scores without near-ties")


@pytest.mark.parametrize("case", list(CASES))
def test_transformers_default_checkpoint_loads(case, tmp_path):
    hf = hf_checkpoint(case, tmp_path / "hf")
    raw = json.loads((tmp_path / "hf" / "config.json").read_text())
    if CASES[case][0] == "DeepseekV3":  # transformers' default asks for one MTP depth and writes none
        assert raw["num_nextn_predict_layers"] == 1
        with pytest.warns(CheckpointWarning, match=r"asks for 1 MTP depth but the weights hold none \(missing depth 0: "
                                             r"model\.layers\.2\.\*\); loading without it"):
            model = Model.from_pretrained(tmp_path / "hf")
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            model = Model.from_pretrained(tmp_path / "hf")
    c = model.config
    assert c.num_nextn_predict_layers == 0 and len(model.mtp) == 0
    assert c.first_k_dense_replace == raw["first_k_dense_replace"]
    assert [c.is_moe_layer(i) for i in range(2)] == ([False, True] if "moe" in case else [False, False])
    ids = draw_ids(model)
    with torch.no_grad():
        expected, got = hf(ids).logits, model(ids)
    assert 0.5 < expected.std().item() < 2.0, "weights too small to test"
    err = assert_close(got, expected, torch.float32, what=f"reference loading transformers' {case}")
    print(f"\n[checkpoint] transformers {case}: rel err {err:.2e}")

    model.save_pretrained(tmp_path / "ours")  # its config now matches its files: no warning on reload
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["num_nextn_predict_layers"] == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = Model.from_pretrained(tmp_path / "ours")
    with torch.no_grad():
        assert torch.equal(again(ids), got)


@pytest.mark.parametrize("case", list(VARIANTS))
def test_transformers_variant_loads_and_saves_as_transformers_reads_it(case, tmp_path):
    hf = hf_checkpoint(case, tmp_path / "hf")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = Model.from_pretrained(tmp_path / "hf")
    c = model.config
    if case == "v3_no_shared_experts":  # transformers' zero-width shared MLP adds 0; here there is none
        assert hf.model.layers[1].mlp.shared_experts.gate_proj.weight.shape == (0, SIZES["hidden_size"])
        assert c.n_shared_experts == 0 and model.model.layers[1].mlp.shared_experts is None
    if case == "v32_mlp_layer_types":
        assert [c.is_moe_layer(i) for i in range(2)] == [True, False] and c.mlp_layer_types == ["sparse", "dense"]
    if case == "v32_rope_interleave_false":
        assert c.rope_interleave  # transformers' V3.2 attention interleaves whatever the field says
    ids = draw_ids(model)
    with torch.no_grad():
        expected, got = hf(ids).logits, model(ids)
    assert 0.5 < expected.std().item() < 2.0, "weights too small to test"
    err = assert_close(got, expected, torch.float32, what=f"reference loading transformers' {case}")
    model.save_pretrained(tmp_path / "ours")  # and transformers reads what we write as we do
    with torch.no_grad():
        back = hf_float32(tmp_path / "ours")(ids).logits
    err_back = assert_close(back, got, torch.float32, what=f"transformers loading our {case}")
    print(f"\n[checkpoint] transformers {case}: rel err {err:.2e}; saved and read by transformers {err_back:.2e}")


def test_bf16_checkpoint_loads_in_float32_unless_asked(tmp_path):
    hf_checkpoint("v3_moe", tmp_path / "hf", dtype=torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CheckpointWarning)  # transformers' default MTP depth
        model = Model.from_pretrained(tmp_path / "hf")
        half = Model.from_pretrained(tmp_path / "hf", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    ids = draw_ids(model)
    with torch.no_grad():
        expected, got = hf_float32(tmp_path / "hf")(ids).logits, model(ids)
    err = assert_close(got, expected, torch.float32, what="reference loading transformers' bf16 checkpoint")
    print(f"\n[checkpoint] transformers bf16 checkpoint in float32: rel err {err:.2e}")


def _saved_dtype(path) -> tuple[str, str, torch.dtype]:
    """config.json's (``dtype``, ``torch_dtype``) and the dtype transformers loads by default (``dtype="auto"``)."""
    d = json.loads((path / "config.json").read_text())
    return d["dtype"], d.get("torch_dtype"), transformers.AutoModelForCausalLM.from_pretrained(path).dtype


def test_saved_config_states_the_saved_dtype(tmp_path):
    hf_checkpoint("v3_moe", tmp_path / "hf", dtype=torch.bfloat16)
    assert _saved_dtype(tmp_path / "hf")[::2] == ("bfloat16", torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CheckpointWarning)
        Model.from_pretrained(tmp_path / "hf").save_pretrained(tmp_path / "f32")  # float32 weights now
    assert _saved_dtype(tmp_path / "f32") == ("float32", "float32", torch.float32)
    tiny_model("mla").to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    assert load_file(tmp_path / "bf16" / "model.safetensors")["lm_head.weight"].dtype == torch.bfloat16
    assert _saved_dtype(tmp_path / "bf16") == ("bfloat16", "bfloat16", torch.bfloat16)


def test_missing_mtp_init_draws_from_the_callers_rng_and_saves(tmp_path):
    hf = hf_checkpoint("v3_moe", tmp_path / "hf")
    torch.manual_seed(5)
    with pytest.warns(UserWarning, match=r"missing depth 0: model\.layers\.2\.\*\); initialized fresh"):
        model = Model.from_pretrained(tmp_path / "hf", missing_mtp="init")
    assert model.config.num_nextn_predict_layers == 1 and len(model.mtp) == 1
    torch.manual_seed(5)
    fresh = Model(model.config).state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, fresh[k]) == k.startswith("mtp.0."), k  # only the MTP depth keeps its init
    ids = draw_ids(model)
    with torch.no_grad():
        assert_close(model(ids), hf(ids).logits, torch.float32, what="main model with a fresh MTP depth")
    model.save_pretrained(tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["num_nextn_predict_layers"] == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = Model.from_pretrained(tmp_path / "ours")
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())


def test_mtp_gap_and_bad_mode(tmp_path):
    """Depths 0 and 2 of three: "drop" cannot drop a middle depth and names it; "init" fills it in."""
    cfg = ModelConfig(**{**SIZES, **MOE}, num_nextn_predict_layers=3)
    torch.manual_seed(0)
    randomize_(Model(cfg)).save_pretrained(tmp_path / "ck")
    mtp = load_file(tmp_path / "ck" / "mtp.safetensors")
    kept = {k: v for k, v in mtp.items() if not k.startswith("model.layers.3.")}
    save_file(kept, tmp_path / "ck" / "mtp.safetensors")
    (tmp_path / "ck" / "checksums.json").unlink()  # edited on purpose: its checksum would refuse it
    with pytest.raises(ValueError, match=r"MTP depths \[0, 2\] are not consecutive from 0: depth 1 "
                                         r"\(model\.layers\.3\.\*\) is missing"):
        Model.from_pretrained(tmp_path / "ck")
    with pytest.warns(UserWarning, match=r"asks for 3 MTP depths but the weights hold depths \[0, 2\] \(missing "
                                         r"depth 1: model\.layers\.3\.\*\); initialized fresh"):
        model = Model.from_pretrained(tmp_path / "ck", missing_mtp="init")
    assert torch.equal(model.mtp[2].eh_proj.weight, mtp["model.layers.4.eh_proj.weight"])
    with pytest.raises(ValueError, match="missing_mtp='skip'; expected one of"):
        Model.from_pretrained(tmp_path / "ck", missing_mtp="skip")


# ---------------------------------------------------------------- a checkpoint shaped like DeepSeek-V3's release

# Sizes with quantized matrices 128 wide (kv_b_proj has 128 rows) and ragged ones (hidden 160 = 128 + 32).
DEEPSEEK_CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                 "AutoModel": "modeling_deepseek.DeepseekV3Model",
                 "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"},
    "aux_loss_alpha": 0.001, "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1, "first_k_dense_replace": 1,
    "hidden_act": "silu", "hidden_size": 160, "initializer_range": 0.02, "intermediate_size": 200,
    "kv_lora_rank": 64, "max_position_embeddings": 320, "model_type": "deepseek_v3", "moe_intermediate_size": 64,
    "moe_layer_freq": 1, "n_group": 2, "n_routed_experts": 8, "n_shared_experts": 1, "norm_topk_prob": True,
    "num_attention_heads": 2, "num_experts_per_tok": 2, "num_hidden_layers": 2, "num_key_value_heads": 2,
    "num_nextn_predict_layers": 1, "q_lora_rank": 136, "qk_nope_head_dim": 32, "qk_rope_head_dim": 16,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
    "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 8, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 1, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
    "transformers_version": "4.33.1", "use_cache": True, "v_head_dim": 32, "vocab_size": 131,
}
_QUANTIZED = ("_proj.weight",)  # attention and FFN matrices; not the router (gate), eh_proj, embeddings or head


def _dequant(w: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """128x128 block dequantization written out: every element times its block's scale."""
    s = scale_inv.repeat_interleave(128, 0).repeat_interleave(128, 1)[: w.shape[0], : w.shape[1]]
    return w.float() * s


def write_deepseek_checkpoint(root):
    """Under ``root``: the checkpoint directory as DeepSeek ships it (two shards + index, the MTP layer in the
    second shard) and a copy for transformers with the same values dequantized and no MTP layer. Returns
    ``(checkpoint dir, transformers' dir, {name: float32 value of every tensor of the checkpoint})``."""
    fields = {k: v for k, v in DEEPSEEK_CONFIG.items() if k != "quantization_config"}
    torch.manual_seed(0)
    randomize_(Model(ModelConfig.from_dict(fields)), router_bias=0.05).save_pretrained(root / "ours")
    tensors = {**load_file(root / "ours" / "model.safetensors"), **load_file(root / "ours" / "mtp.safetensors")}
    assert "model.layers.2.embed_tokens.weight" in tensors and "model.layers.2.shared_head.head.weight" in tensors
    stored, values = {}, {}
    for name, t in tensors.items():
        if name.endswith(_QUANTIZED) and "eh_proj" not in name:
            stored[name], stored[name + "_scale_inv"] = weight_quant(t)
            values[name] = _dequant(stored[name], stored[name + "_scale_inv"])
        elif name.endswith("e_score_correction_bias"):
            stored[name] = values[name] = t
        else:
            stored[name] = t.to(torch.bfloat16)
            values[name] = stored[name].float()
    assert {tuple(stored[n].shape) for n in stored if n.endswith("kv_b_proj.weight")} == {(128, 64)}
    assert stored["model.layers.2.mlp.experts.7.down_proj.weight_scale_inv"].shape == (2, 1)  # 160 rows: ragged
    ck = root / "deepseek"
    ck.mkdir()
    shards = {"model-00001-of-00002.safetensors": {k: v for k, v in stored.items() if ".layers.2." not in k},
              "model-00002-of-00002.safetensors": {k: v for k, v in stored.items() if ".layers.2." in k}}
    for file, part in shards.items():
        save_file(part, ck / file, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: f for f, part in shards.items() for k in part}}
    (ck / "model.safetensors.index.json").write_text(json.dumps(index))
    (ck / "config.json").write_text(json.dumps(DEEPSEEK_CONFIG))
    # transformers cannot open FP8 on a CPU without accelerate: it gets the same values, dequantized
    hf = root / "dequantized"
    hf.mkdir()
    save_file({k: v for k, v in values.items() if ".layers.2." not in k}, hf / "model.safetensors")
    (hf / "config.json").write_text(json.dumps(fields))
    return ck, hf, values


def test_deepseek_release_shape_loads(tmp_path):
    ck, hf_dir, values = write_deepseek_checkpoint(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the MTP layer is there: nothing to warn about
        model = Model.from_pretrained(ck)
    c = model.config
    assert c.num_nextn_predict_layers == 1 and c.first_k_dense_replace == 1 and c.rope_scaling["factor"] == 40
    assert "quantization_config" not in c.to_dict(), "the loaded weights are dequantized"
    main, mtp = to_hf_state_dict(model)
    got = {**main, **mtp}
    assert sorted(got) == sorted(values)
    for name, v in values.items():  # every tensor, the MTP layer's included, where the files put it
        assert torch.equal(got[name], v), name
    assert torch.equal(model.mtp[0].eh_proj.weight, values["model.layers.2.eh_proj.weight"])
    assert torch.equal(model.mtp[0].self_attn.kv_b_proj.weight, values["model.layers.2.self_attn.kv_b_proj.weight"])
    logging.getLogger("transformers").setLevel(logging.ERROR)
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids = torch.randint(0, c.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, out = hf(ids).logits, model(ids)
    assert 0.5 < expected.std().item() < 2.0, "weights too small to test"
    err = assert_close(out, expected, torch.float32, what="reference loading the DeepSeek-shaped FP8 checkpoint")
    print(f"\n[checkpoint] DeepSeek-shaped FP8: rel err {err:.2e} against transformers on the dequantized weights")


def _assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize(
    "attention_type, kw",
    [("mla", dict(q_lora_rank=12, num_nextn_predict_layers=1)),
     ("dsa", dict(num_nextn_predict_layers=1)),
     ("gqa", dict(moe_type="standard", tie_word_embeddings=True)),
     pytest.param("mla", dict(num_nextn_predict_layers=2), id="mla-mtp2"),
     pytest.param("mla", dict(num_nextn_predict_layers=1, tie_word_embeddings=True), id="mla-mtp1-tied")],
)
def test_save_load_round_trip(tmp_path, attention_type, kw):
    model = tiny_model(attention_type, router_bias=0.1, **kw)
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    mtp = model.config.num_nextn_predict_layers
    expected = {"config.json", "model.safetensors", "checksums.json"} | ({"mtp.safetensors"} if mtp else set())
    assert set(os.listdir(ckpt)) == expected
    assert os.listdir(tmp_path) == ["ckpt"], "temporary directory left behind"

    loaded = Model.from_pretrained(ckpt)
    assert not loaded.training  # as transformers: loaded for inference (no dropout, no load counting)
    _assert_same_state(model, loaded)
    ids = rand_ids(model.config, 3, 7)
    assert torch.equal(loaded(ids), model(ids))
    a, b = model.loss(ids, ids), loaded.loss(ids, ids)
    assert torch.equal(a.loss, b.loss) and len(a.mtp_losses) == mtp

    main = load_file(ckpt / "model.safetensors")
    n = model.config.num_hidden_layers
    assert not any(k.startswith(f"model.layers.{n}.") for k in main)
    if model.config.moe_type == "deepseek":
        assert "model.layers.1.mlp.experts.7.gate_proj.weight" in main
        assert "model.layers.1.mlp.gate.e_score_correction_bias" in main
    if attention_type == "dsa":
        assert "model.layers.0.self_attn.indexer.wk.weight" in main
        assert json.loads((ckpt / "config.json").read_text())["model_type"] == "deepseek_v32"
    if attention_type == "mla":
        assert "model.layers.0.self_attn.kv_a_proj_with_mqa.weight" in main
    if mtp:
        extra = load_file(ckpt / "mtp.safetensors")
        for k in range(mtp):
            for name in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
                         "embed_tokens.weight", "shared_head.head.weight"):
                assert f"model.layers.{n + k}.{name}" in extra
    if model.config.tie_word_embeddings:  # written as a copy (mlx_lm's deepseek_v3 needs it), tied again on load
        assert torch.equal(main["lm_head.weight"], main["model.embed_tokens.weight"])
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_save_over_existing_checkpoint_is_atomic(tmp_path, monkeypatch):
    ckpt = tmp_path / "ckpt"
    old = tiny_model("mla", num_nextn_predict_layers=1)
    old.save_pretrained(ckpt)
    new = tiny_model("mla", num_nextn_predict_layers=1)
    new.save_pretrained(ckpt)  # replaces it
    assert os.listdir(tmp_path) == ["ckpt"]
    _assert_same_state(Model.from_pretrained(ckpt), new)

    import reference.checkpoint as ckp

    real = ckp.save_file

    def crash_on_mtp(tensors, filename, metadata=None):
        if str(filename).endswith("mtp.safetensors"):
            raise OSError("disk full")
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(ckp, "save_file", crash_on_mtp)
    with pytest.raises(OSError, match="disk full"):
        old.save_pretrained(ckpt)
    assert os.listdir(tmp_path) == ["ckpt"], "a crashed save left files behind"
    _assert_same_state(Model.from_pretrained(ckpt), new)  # the previous checkpoint is intact


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_hf_name_mapping_takes_any_array_library(tie):
    """`to_hf_names` / `from_hf_names` map names only: numpy arrays (stack and unstack passed in) get the names the
    torch checkpoint writes, and map back to the reference's state_dict unchanged."""
    import numpy as np

    from reference.checkpoint import from_hf_names, to_hf_names, to_hf_state_dict

    model = tiny_model("mla", num_nextn_predict_layers=1, tie_word_embeddings=tie)
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    main, mtp = to_hf_names(sd, model.config, unstack=list)
    assert [main.keys(), mtp.keys()] == [d.keys() for d in to_hf_state_dict(model)]
    back = from_hf_names({**main, **mtp}, model.config, stack=np.stack, dequant=None)
    want = {k for k in sd if not k.startswith("rotary.") and not (tie and k == "lm_head.weight")}
    assert back.keys() == want and all(np.array_equal(back[k], sd[k]) for k in want)


def test_save_copies_tokenizer(tmp_path):
    tok = tmp_path / "tokenizer.json"
    tok.write_text('{"model": {}}')
    tiny_model("mla").save_pretrained(tmp_path / "ckpt", tokenizer_file=tok)
    assert (tmp_path / "ckpt" / "tokenizer.json").read_text() == '{"model": {}}'


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_safetensors_raises(tmp_path, damage):
    ckpt = tmp_path / "ckpt"
    tiny_model("mla").save_pretrained(ckpt)
    f = ckpt / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(b"\x13\x00garbage" * 10 if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt"):
        Model.from_pretrained(ckpt)


@pytest.mark.parametrize(
    "edit, words",
    [(dict(hidden_size=48), ["shape", "config"]),
     (dict(n_routed_experts=16), ["experts"]),
     (dict(num_hidden_layers=3), ["does not match", "unexpected", "eh_proj"]),  # layer 2 read as a main layer
     (dict(q_lora_rank=12), ["missing", "q_a_proj"]),
     (dict(n_shared_experts=0), ["does not match its config.json: unexpected", "shared_experts"])],
)
def test_config_mismatch_raises(tmp_path, edit, words):
    ckpt = tmp_path / "ckpt"
    tiny_model("mla", num_nextn_predict_layers=1).save_pretrained(ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg.update(edit)
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError) as ei:
        Model.from_pretrained(ckpt)
    for w in words:
        assert w in str(ei.value), str(ei.value)
    assert "missing []" not in str(ei.value) and "unexpected []" not in str(ei.value)


def test_missing_checkpoint_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        Model.from_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    make_config().save_json(tmp_path / "empty" / "config.json")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        Model.from_pretrained(tmp_path / "empty")
