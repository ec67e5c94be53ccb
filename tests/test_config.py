"""reference/config.py: ModelConfig construction, validation messages, dict and JSON round trips."""

from __future__ import annotations

import json
import math

import pytest

from reference import ModelConfig
from tests.reference_utils import make_config

YARN = {"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 64, "beta_fast": 32,
        "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}


@pytest.mark.parametrize("attention_type", ["mla", "dsa", "mha", "mqa", "gqa"])
@pytest.mark.parametrize("moe_type", ["deepseek", "standard", "dense"])
def test_valid_configs_construct(attention_type, moe_type):
    c = make_config(attention_type, moe_type)
    assert c.attention_type == attention_type and c.moe_type == moe_type
    assert c.uses_mla == (attention_type in ("mla", "dsa"))
    if attention_type == "dsa":
        assert c.model_type == "deepseek_v32"
    if c.uses_mla:
        assert c.qk_head_dim == c.qk_nope_head_dim + c.qk_rope_head_dim == 12
        assert c.rope_dim == c.qk_rope_head_dim
    else:
        assert c.head_dim == c.hidden_size // c.num_attention_heads == 8
        assert c.rope_dim == c.head_dim
        expected_kv = {"mha": 4, "mqa": 1, "gqa": 2}[attention_type]
        assert c.num_key_value_heads == expected_kv
    # first_k_dense_replace=1: layer 0 dense, layer 1 MoE unless moe_type is dense
    assert not c.is_moe_layer(0)
    assert c.is_moe_layer(1) == (moe_type != "dense")


def test_defaults_mqa_mha_kv_heads():
    assert ModelConfig(attention_type="mqa", hidden_size=32, num_attention_heads=4).num_key_value_heads == 1
    assert ModelConfig(attention_type="mha", hidden_size=32, num_attention_heads=4).num_key_value_heads == 4


def test_group_limited_config_valid():
    c = make_config(n_routed_experts=256, n_group=8, topk_group=4, num_experts_per_tok=8)
    assert c.n_routed_experts // c.n_group == 32


@pytest.mark.parametrize(
    "overrides, words",
    [
        (dict(attention_type="gqa", num_attention_heads=6, num_key_value_heads=4, hidden_size=48),
         ["num_attention_heads", "num_key_value_heads"]),
        (dict(attention_type="mha", num_key_value_heads=2), ["num_key_value_heads", "mha"]),
        (dict(attention_type="mqa", num_key_value_heads=2), ["num_key_value_heads", "mqa"]),
        (dict(n_routed_experts=10, n_group=4, topk_group=2), ["n_routed_experts", "n_group"]),
        (dict(n_routed_experts=16, n_group=4, topk_group=5), ["topk_group", "n_group"]),
        (dict(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=9),
         ["num_experts_per_tok", "topk_group"]),
        (dict(num_experts_per_tok=9), ["num_experts_per_tok", "n_routed_experts"]),
        (dict(attention_type="sparse"), ["attention_type"]),
        (dict(moe_type="switch"), ["moe_type"]),
        (dict(rope_scaling={"type": "linear"}), ["rope_scaling", "linear", "'factor'"]),
        (dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
         ["rope_scaling", "dynamic", "'linear'", "'llama3'", "'yarn'"]),  # names the supported types
        (dict(rope_scaling={"rope_type": "longrope", "factor": 2.0}), ["rope_scaling", "longrope"]),
        (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), ["llama3", "'low_freq_factor'"]),
        (dict(rope_scaling={"type": "yarn", "factor": 2.0}), ["rope_scaling", "original_max_position_embeddings"]),
        (dict(rope_scaling={**YARN, "bogus": 1}), ["rope_scaling", "bogus"]),
        (dict(qk_rope_head_dim=5), ["qk_rope_head_dim"]),
        (dict(attention_type="dsa", model_type="deepseek_v32", q_lora_rank=None), ["dsa", "q_lora_rank"]),
        (dict(model_type="deepseek_v32"), ["model_type", "attention_type"]),
        (dict(hidden_size=0), ["hidden_size"]),
        (dict(num_nextn_predict_layers=-1), ["num_nextn_predict_layers"]),
        (dict(first_k_dense_replace=None), ["first_k_dense_replace"]),
        (dict(n_routed_experts=8, n_group=8, topk_group=4, first_k_dense_replace=2, num_nextn_predict_layers=1),
         ["n_routed_experts", "n_group"]),  # the MTP layer (layer 2) is a MoE layer
        (dict(hidden_act="gelu"), ["hidden_act='gelu'", "'silu'"]),
        (dict(attention_type="dsa", rope_interleave=False), ["rope_interleave", "dsa"]),
        (dict(mlp_layer_types=["sparse", "dense"]), ["mlp_layer_types", "deepseek_v32"]),
        (dict(attention_type="dsa", mlp_layer_types=["sparse"]), ["mlp_layer_types", "num_hidden_layers=2"]),
        (dict(attention_type="dsa", mlp_layer_types=["moe", "dense"]), ["mlp_layer_types", "'sparse'"]),
    ],
)
def test_inconsistent_values_raise_naming_fields(overrides, words):
    with pytest.raises(ValueError) as ei:
        make_config(**overrides)
    msg = str(ei.value)
    for w in words:
        assert w in msg, f"message {msg!r} does not name {w!r}"


def test_unknown_config_json_key_raises():
    d = make_config().to_dict()
    d["num_experts"] = 8  # a Mixtral-style name, not ours
    with pytest.raises(ValueError, match="num_experts"):
        ModelConfig.from_dict(d)


def test_softmax_scale_yarn():
    c = make_config(rope_scaling=YARN)
    m = 0.1 * 1.0 * math.log(40.0) + 1.0
    assert math.isclose(c.softmax_scale(c.qk_head_dim), c.qk_head_dim**-0.5 * m * m, rel_tol=1e-12)
    assert math.isclose(make_config().softmax_scale(12), 12**-0.5, rel_tol=1e-12)


def _fields(c: ModelConfig) -> dict:
    return {k: v for k, v in vars(c).items() if k != "extra"}


ROUND_TRIP = [
    dict(),
    dict(attention_type="dsa", rope_scaling=YARN, num_nextn_predict_layers=2),
    dict(attention_type="gqa", moe_type="standard", eos_token_id=[1, 2], pad_token_id=3, tie_word_embeddings=True),
    dict(attention_type="mqa", moe_type="dense", q_lora_rank=None),
    dict(q_lora_rank=12, n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4, norm_topk_prob=False),
]


@pytest.mark.parametrize("overrides", ROUND_TRIP)
def test_dict_round_trip(overrides):
    overrides = dict(overrides)
    c = make_config(overrides.pop("attention_type", "mla"), **overrides)
    d = c.to_dict()
    json.dumps(d)  # serializable
    assert d["model_type"] == c.model_type
    assert d["architectures"] == ["DeepseekV32ForCausalLM" if c.attention_type == "dsa" else "DeepseekV3ForCausalLM"]
    c2 = ModelConfig.from_dict(d)
    assert _fields(c2) == _fields(c)
    assert c2.to_dict() == d


def test_dict_keeps_passthrough_keys():
    d = make_config().to_dict()
    d.update(transformers_version="5.0.0", use_cache=True)
    c = ModelConfig.from_dict(d)
    assert c.extra["transformers_version"] == "5.0.0"
    assert c.to_dict()["transformers_version"] == "5.0.0" and c.to_dict()["use_cache"] is True


def test_from_dict_v32_implies_dsa():
    d = make_config("dsa").to_dict()
    del d["attention_type"]
    assert ModelConfig.from_dict(d).attention_type == "dsa"


@pytest.mark.parametrize("overrides", ROUND_TRIP)
def test_json_round_trip(tmp_path, overrides):
    overrides = dict(overrides)
    c = make_config(overrides.pop("attention_type", "mla"), **overrides)
    f = tmp_path / "config.json"
    c.save_json(f)
    assert json.loads(f.read_text()) == c.to_dict()
    for src in (f, tmp_path):  # a file, or the directory that holds it
        c2 = ModelConfig.from_json(src)
        assert _fields(c2) == _fields(c)


def test_from_json_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        ModelConfig.from_json(tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError):
        ModelConfig.from_json(tmp_path)  # a directory without config.json


@pytest.mark.parametrize("text", ['{"hidden_size": 32,', "[1, 2, 3]", "not json at all", ""])
def test_from_json_bad_json(tmp_path, text):
    f = tmp_path / "config.json"
    f.write_text(text)
    with pytest.raises(ValueError, match="config.json"):
        ModelConfig.from_json(f)


def test_from_json_bad_values(tmp_path):
    d = make_config().to_dict()
    d["topk_group"] = d["n_group"] + 1
    f = tmp_path / "config.json"
    f.write_text(json.dumps(d))
    with pytest.raises(ValueError, match="topk_group"):
        ModelConfig.from_json(f)


# ---------------------------------------------------------------- config.json from transformers and DeepSeek

SIZES = dict(vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
             num_attention_heads=4, q_lora_rank=24, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
             v_head_dim=16, n_routed_experts=8)


@pytest.mark.parametrize("family", ["DeepseekV3", "DeepseekV32"])
def test_transformers_default_configs_read_as_transformers_reads_them(family):
    """Defaults except sizes: first_k_dense_replace 3 > 2 layers is every layer dense, so n_group 8 (one expert
    per group) and num_experts_per_tok 8 are never read, as in transformers."""
    transformers = pytest.importorskip("transformers")
    d = json.loads(getattr(transformers, f"{family}Config")(**SIZES).to_json_string())
    c = ModelConfig.from_dict(d)
    assert (c.first_k_dense_replace, c.n_group, c.topk_group, c.num_experts_per_tok) == (3, 8, 4, 8)
    assert not c.has_moe_layers and not any(c.is_moe_layer(i) for i in range(3))
    assert c.num_nextn_predict_layers == (1 if family == "DeepseekV3" else 0)
    assert c.model_type == ("deepseek_v3" if family == "DeepseekV3" else "deepseek_v32")
    assert ModelConfig.from_dict(c.to_dict()).to_dict() == c.to_dict()
    assert "layer_types" not in c.to_dict()  # transformers rebuilds it
    assert c.to_dict().get("mlp_layer_types") == (None if family == "DeepseekV3" else ["dense", "dense"])


def test_first_k_dense_replace_reads_as_transformers():
    assert not make_config(first_k_dense_replace=5, n_group=8, topk_group=4).has_moe_layers  # all dense
    c = make_config(first_k_dense_replace=-1)
    assert c.is_moe_layer(0) and c.is_moe_layer(1)  # layer_idx >= -1: every layer routes
    c = make_config(first_k_dense_replace=2, num_nextn_predict_layers=1)
    assert not c.is_moe_layer(1) and c.is_moe_layer(2) and c.has_moe_layers  # the MTP layer is layer 2


def test_v32_mlp_layer_types_win_over_first_k_dense_replace():
    d = make_config("dsa", first_k_dense_replace=1).to_dict()
    c = ModelConfig.from_dict({**d, "first_k_dense_replace": 3, "mlp_layer_types": ["dense", "sparse"],
                               "layer_types": ["indexed_attention"] * 2})
    assert c.first_k_dense_replace == 1 and c.mlp_layer_types == ["dense", "sparse"]  # consistent where it can be
    same = ModelConfig.from_dict({**d, "first_k_dense_replace": 7, "mlp_layer_types": ["dense", "dense"]})
    assert same.first_k_dense_replace == 7  # the same reading: kept as written
    mixed = ModelConfig.from_dict({**d, "mlp_layer_types": ["sparse", "dense"]})  # any order, as transformers' V3.2
    assert [mixed.is_moe_layer(i) for i in range(2)] == [True, False] and mixed.has_moe_layers
    assert mixed.to_dict()["mlp_layer_types"] == ["sparse", "dense"]  # written back
    assert ModelConfig.from_dict(mixed.to_dict()) == mixed
    for key, value in [("mlp_layer_types", ["dense"]), ("layer_types", ["sliding_attention"] * 2)]:
        with pytest.raises(ValueError, match=key):
            ModelConfig.from_dict({**d, key: value})
    v3 = make_config().to_dict()  # DeepSeek-V3's model never reads the list: neither do we
    assert ModelConfig.from_dict({**v3, "mlp_layer_types": ["sparse", "sparse"]}) == ModelConfig.from_dict(v3)


def test_v32_rope_interleave_reads_as_transformers():
    """transformers' V3.2 attention always applies the interleaved RoPE, whatever ``rope_interleave`` says."""
    d = make_config("dsa").to_dict()
    assert ModelConfig.from_dict({**d, "rope_interleave": False}).rope_interleave is True
    assert ModelConfig.from_dict({**make_config().to_dict(), "rope_interleave": False}).rope_interleave is False


def test_to_dict_states_the_saved_dtype():
    """The dtype keys say how files were stored, not what the model is: dropped on reading, stated on writing."""
    c = ModelConfig.from_dict({**make_config().to_dict(), "dtype": "bfloat16", "torch_dtype": "bfloat16"})
    assert _fields(c) == _fields(make_config()) and "dtype" not in c.extra and "torch_dtype" not in c.extra
    assert (c.to_dict()["dtype"], c.to_dict()["torch_dtype"]) == ("float32", "float32")  # a model built from it
    assert (c.to_dict("bfloat16")["dtype"], c.to_dict("bfloat16")["torch_dtype"]) == ("bfloat16", "bfloat16")


def test_num_mtp_layers_alias():
    d = make_config().to_dict()
    del d["num_nextn_predict_layers"]
    assert ModelConfig.from_dict({**d, "num_mtp_layers": 2}).num_nextn_predict_layers == 2
    with pytest.raises(ValueError, match="num_mtp_layers=2 and num_nextn_predict_layers=1"):
        ModelConfig.from_dict({**d, "num_mtp_layers": 2, "num_nextn_predict_layers": 1})


def test_quantization_config_checked_and_dropped():
    fp8 = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}
    d = make_config().to_dict()
    assert "quantization_config" not in ModelConfig.from_dict({**d, "quantization_config": fp8}).to_dict()
    for bad in ({**fp8, "weight_block_size": [64, 64]}, {**fp8, "fmt": "e5m2"}, {"quant_method": "bitsandbytes"}):
        with pytest.raises(ValueError, match="quantization_config"):
            ModelConfig.from_dict({**d, "quantization_config": bad})
