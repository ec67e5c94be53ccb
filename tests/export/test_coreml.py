"""Core ML export (`dsfs.coreml_export`, ``dsfs export --format coreml``).

- `CoreMLLM`, the static-shape network that is converted, equals `reference.Model` in torch with a float32 cache
  (bound 1e-5, DESIGN.md "Tolerance"): a prompt in two prefill calls (the second right-padded) and decode steps,
  against ``model(ids)`` and against the reference's own cached decode, over stale cache contents, for a tiny-like
  config (q_lora null, tied head, 1 dense + 1 MoE layer, n_group 1), one with q_lora_rank, group-limited routing
  (n_group 4, topk_group 2), routed_scaling_factor 2.5, no renormalization and YaRN, and V3.2's DSA with
  index_topk 4 below the prompt length. `rank_select` keeps the indices `reference.moe.topk_indices` keeps, ties
  included.
- With the float16 cache that Core ML state holds (the float32 latents rounded to float16 once, when stored), the
  same calls stay within float16's bound 1.6e-2 of the reference for the exported model, with equal greedy tokens.
- The package `dsfs.export.export` writes: functions, inputs, outputs, states, shapes, default function, metadata,
  weights stored once for both functions.
- macOS 15+ only (Core ML model states; elsewhere skipped with the reason, a failure under DSFS_REQUIRE_COREML=1):
  the package's prefill + decode steps with one shared state on the CPU against the float16-cache emulation
  (bound 1e-3: the same float16 rounding of the cache; float32 kernels differ in rounding and can put a latent on
  the other float16 neighbour, 2^-11 relative) and against the reference (1.6e-2, greedy tokens equal).
- Bad input: lengths out of range, an out path without .mlpackage, configs the export cannot express.
"""

from __future__ import annotations

import os
import platform
import sys

import numpy as np
import pytest
import torch

from dsfs.coreml_export import CoreMLLM, check_coreml, rank_select, resolve_lengths, write_coreml
from dsfs.export import ExportError, export
from reference.moe import topk_indices
from reference.testing import assert_close
from tests.reference_utils import assert_o1, make_config, make_model

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:coremltools")  # its own, hundreds of them

YARN = dict(type="yarn", factor=4.0, original_max_position_embeddings=16, beta_fast=32, beta_slow=1, mscale=1.0,
            mscale_all_dim=0.8)
CASES = {  # name: (attention_type, config overrides)
    "tiny_like": ("mla", dict(tie_word_embeddings=True)),
    "q_lora_groups_yarn": ("mla", dict(q_lora_rank=12, n_group=4, topk_group=2, num_experts_per_tok=3,
                                       routed_scaling_factor=2.5, norm_topk_prob=False, first_k_dense_replace=0,
                                       rope_scaling=YARN)),
    "v32_dsa": ("dsa", dict()),
}
PREFILL, CONTEXT, STEPS = 6, 24, 4
EXPORT = dict(prefill_len=8, context_len=40)  # the exported package (max_position_embeddings 64)


def case_model(name: str):
    attention_type, overrides = CASES[name]
    return make_model(make_config(attention_type, **overrides), router_bias=0.05)


def lm_step(lm: CoreMLLM):
    """``step(ids, position) -> logits`` of the torch network."""
    return lambda ids, pos: lm(ids.to(torch.int32), torch.tensor([pos], dtype=torch.int32))


def run_calls(step, seq: torch.Tensor, chunks: list[int], prefill_len: int) -> torch.Tensor:
    """Logits (1, n, V) of ``seq`` (1, n) fed as prefill calls of ``chunks`` real tokens each (right-padded with
    random ids to ``prefill_len``), then one decode call per remaining token."""
    out, pos = [], 0
    for real in chunks:
        pad = torch.randint(0, int(seq.max()) + 1, (1, prefill_len - real))
        out.append(step(torch.cat((seq[:, pos:pos + real], pad), dim=1), pos)[:, :real])
        pos += real
    out += [step(seq[:, j:j + 1], j) for j in range(pos, seq.shape[1])]
    return torch.cat(out, dim=1)


@torch.no_grad()
def reference_cached(model, seq: torch.Tensor, prompt: int) -> torch.Tensor:
    """The reference's prefill of ``seq[:, :prompt]`` then cached decode of the rest, one token a step."""
    cache = model.new_cache()
    out = [model(seq[:, :prompt], cache)]
    out += [model(seq[:, j:j + 1], cache) for j in range(prompt, seq.shape[1])]
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("case", list(CASES))
@torch.no_grad()
def test_network_equals_reference(case):
    model = case_model(case)
    prompt = 2 * PREFILL - 2
    seq = torch.randint(0, model.config.vocab_size, (1, prompt + STEPS))
    ref = model(seq)
    assert_o1(ref)
    lm = CoreMLLM(model, CONTEXT, cache_dtype=torch.float32).eval()
    for name in lm.state_shapes():  # stale slots from an earlier sequence must stay hidden
        getattr(lm, name).normal_()
    got = run_calls(lm_step(lm), seq, [PREFILL, prompt - PREFILL], PREFILL)
    assert_close(got, ref, what=f"CoreMLLM vs model(ids) [{case}]")
    assert_close(got, reference_cached(model, seq, prompt), what=f"CoreMLLM vs cached decode [{case}]")
    # the cache holds the last layer's latent of every position (the decode steps overwrote the padding's slots)
    last = model.config.num_hidden_layers - 1
    cache = model.new_cache()
    model(seq, cache)
    assert_close(getattr(lm, f"c_kv_{last}")[0, : seq.shape[1]], cache.layers[last].tensors["c_kv"][0],
                 what=f"cached latent [{case}]")


def test_rank_select_is_topk_with_ties_to_the_lower_index():
    x = torch.randint(0, 4, (50, 9)).float()  # many ties
    for k in (1, 3, 9, 12):
        expected = torch.zeros_like(x, dtype=torch.bool).scatter_(1, topk_indices(x, min(k, 9)), True)
        assert torch.equal(rank_select(x, k), expected)


# ----------------------------------------------------------------------------- the exported package


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny-like model (q_lora null, tied head, 1 dense + 1 MoE layer) saved as a checkpoint and exported."""
    torch.manual_seed(1234)
    model = case_model("tiny_like")
    root = tmp_path_factory.mktemp("coreml")
    model.save_pretrained(root / "src")
    result = export(root / "src", root / "model.mlpackage", fmt="coreml", **EXPORT)
    return model, root / "model.mlpackage", result


def greedy_sequence(model, prompt: int) -> torch.Tensor:
    """A random prompt of ``prompt`` tokens and the reference's greedy continuation: (1, prompt + STEPS)."""
    ids = torch.randint(0, model.config.vocab_size, (1, prompt))
    return model.generate(ids, STEPS)


def check_against_reference(model, seq, got, prompt: int, what: str) -> float:
    """``got`` (1, n, V) within float16's bound of ``model(seq)``, and its greedy tokens after the prompt are the
    reference's (``seq`` is the reference's greedy continuation)."""
    with torch.no_grad():
        ref = model(seq)
    err = assert_close(got, ref, bound=1.6e-2, what=what)
    assert torch.equal(got[0, prompt - 1:-1].argmax(-1), seq[0, prompt:]), f"{what}: greedy tokens differ"
    return err


def test_float16_cache_stays_within_float16_bound(exported):
    model, _, _ = exported
    prompt = EXPORT["prefill_len"] - 3
    seq = greedy_sequence(model, prompt)
    lm = CoreMLLM(model, EXPORT["context_len"]).eval()  # float16 cache, as the package's state
    with torch.no_grad():
        got = run_calls(lm_step(lm), seq, [prompt], EXPORT["prefill_len"])
    check_against_reference(model, seq, got, prompt, "float16-cache CoreMLLM vs reference")


def test_package_spec(exported):
    ct = pytest.importorskip("coremltools")
    model, path, result = exported
    c = model.config
    assert result["format"] == "coreml" and result["prefill_len"] == 8 and result["context_len"] == 40
    assert result["functions"] == ["prefill", "decode"] and result["states"] == 2 * c.num_hidden_layers
    spec = ct.models.MLModel(str(path), skip_model_load=True).get_spec()
    desc = spec.description
    assert desc.defaultFunctionName == "decode"
    assert desc.metadata.userDefined["dsfs.prefill_len"] == "8"
    assert desc.metadata.userDefined["dsfs.context_len"] == "40"
    functions = {f.name: f for f in desc.functions}
    assert sorted(functions) == ["decode", "prefill"]
    states = {f"c_kv_{i}": [1, 40, c.kv_lora_rank] for i in range(c.num_hidden_layers)}
    states.update({f"k_pe_{i}": [1, 40, c.qk_rope_head_dim] for i in range(c.num_hidden_layers)})
    int32, fp32, fp16 = (ct.proto.FeatureTypes_pb2.ArrayFeatureType.ArrayDataType.Value(n)
                         for n in ("INT32", "FLOAT32", "FLOAT16"))
    for name, tokens in (("prefill", 8), ("decode", 1)):
        f = functions[name]
        inputs = {i.name: (list(i.type.multiArrayType.shape), i.type.multiArrayType.dataType) for i in f.input}
        assert inputs == {"input_ids": ([1, tokens], int32), "position": ([1], int32)}
        outputs = {o.name: (list(o.type.multiArrayType.shape), o.type.multiArrayType.dataType) for o in f.output}
        assert outputs == {"logits": ([1, tokens, c.vocab_size], fp32)}
        got = {s.name: (list(s.type.stateType.arrayType.shape), s.type.stateType.arrayType.dataType) for s in f.state}
        assert got == {k: (v, fp16) for k, v in states.items()}
    assert spec.specificationVersion >= 9  # iOS 18 / macOS 15: states
    weights = sum(f.stat().st_size for f in path.rglob("weight.bin"))
    params = sum(p.numel() * 4 for p in model.parameters())  # tied: counted once
    assert params <= weights < 1.2 * params, "the two functions' weights are stored once"
    assert all(f.stat().st_mode & 0o044 == path.stat().st_mode & 0o044 for f in path.rglob("*")), "permissions"


def coreml_runtime_reason() -> str | None:
    """Why Core ML predictions cannot run here, or None."""
    if sys.platform != "darwin":
        return f"Core ML predictions need macOS 15+ (this is {sys.platform})"
    version = tuple(int(v) for v in platform.mac_ver()[0].split(".")[:1] if v.isdigit())
    if version < (15,):
        return f"Core ML model states need macOS 15+ (this is macOS {platform.mac_ver()[0]})"
    return None


def test_package_predicts_like_the_reference(exported):
    reason = coreml_runtime_reason()
    if reason is not None:
        if os.environ.get("DSFS_REQUIRE_COREML") == "1":
            pytest.fail(f"DSFS_REQUIRE_COREML=1: {reason}")
        pytest.skip(reason)
    ct = pytest.importorskip("coremltools")
    model, path, _ = exported
    prefill_len = EXPORT["prefill_len"]
    fns = {n: ct.models.MLModel(str(path), function_name=n, compute_units=ct.ComputeUnit.CPU_ONLY)
           for n in ("prefill", "decode")}
    state = fns["prefill"].make_state()  # one state, shared by both functions

    def step(ids, pos):
        fn = fns["prefill" if ids.shape[1] == prefill_len else "decode"]
        feed = {"input_ids": ids.numpy().astype(np.int32), "position": np.array([pos], dtype=np.int32)}
        return torch.from_numpy(np.asarray(fn.predict(feed, state=state)["logits"]))

    prompt = prefill_len - 3
    seq = greedy_sequence(model, prompt)
    pads = torch.get_rng_state()
    got = run_calls(step, seq, [prompt], prefill_len)
    torch.set_rng_state(pads)  # the same padding ids
    lm = CoreMLLM(model, EXPORT["context_len"]).eval()
    with torch.no_grad():
        emulated = run_calls(lm_step(lm), seq, [prompt], prefill_len)
    err = assert_close(got, emulated, bound=1e-3, what="Core ML vs float16-cache CoreMLLM")
    err_ref = check_against_reference(model, seq, got, prompt, "Core ML vs reference")
    print(f"\n[coreml] vs emulation {err:.2e}, vs reference {err_ref:.2e}")


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("prefill_len, context_len, words", [
    (0, None, "--prefill-len 0: expected an integer in 1..64"),
    (65, 100, "--context-len 100: expected an integer in 1..64"),
    (33, 32, "--prefill-len 33: expected an integer in 1..32"),
    (None, 0, "--context-len 0"),
    (True, None, "--prefill-len True"),
    (8.0, None, "--prefill-len 8.0"),
])
def test_lengths_out_of_range(prefill_len, context_len, words):
    with pytest.raises(ExportError, match=words.replace(".", r"\.")):
        check_coreml(make_config("mla"), prefill_len, context_len)


def test_default_lengths():
    assert resolve_lengths(make_config("mla", max_position_embeddings=2048), None, None) == (64, 512)
    assert resolve_lengths(make_config("mla", max_position_embeddings=40), None, None) == (40, 40)
    assert resolve_lengths(make_config("mla"), 5, None) == (5, 64)


@pytest.mark.parametrize("attention_type, moe_type, words", [
    ("mha", "deepseek", "attention_type='mha' is not supported"),
    ("gqa", "deepseek", "attention_type='gqa' is not supported"),
    ("mla", "standard", "moe_type='standard' is not supported"),
])
def test_unsupported_configs(attention_type, moe_type, words):
    with pytest.raises(ExportError, match=words):
        check_coreml(make_config(attention_type, moe_type), None, None)


def test_bad_export_input(tmp_path):
    mha = make_model(make_config("mha"))
    mha.save_pretrained(tmp_path / "mha")
    with pytest.raises(ExportError, match="expected a path ending in .mlpackage"):
        export(tmp_path / "mha", tmp_path / "model.mlmodel", fmt="coreml")
    with pytest.raises(ExportError, match="float32 model on the CPU, got parameters in torch.bfloat16 on cpu"):
        write_coreml(case_model("tiny_like").to(torch.bfloat16), tmp_path / "x.mlpackage")
    with pytest.raises(ExportError, match="attention_type='mha' is not supported"):
        export(tmp_path / "mha", tmp_path / "mha.mlpackage", fmt="coreml")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mha"]  # nothing written, no temporary left
