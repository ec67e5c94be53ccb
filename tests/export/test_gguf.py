"""GGUF export (`dsfs.gguf_export`, ``dsfs export --format gguf``) checked by llama.cpp itself (llama-cpp-python).

Random tiny models (weights drawn by `randomize_`: logits with std near 1, so argmax is never a near-tie) with a
byte-level BPE tokenizer trained on a slice of the TinyStories sample are exported and run by llama.cpp on the same
token ids as `reference.Model`. Metric: ``err = max_t ||l_cpp[t] - l_ref[t]||_2 / ||l_ref[t]||_2``, the worst
position's relative L2 error of the logit row (`reference.testing.rel_err` per row), float64.

- f32 (llama.cpp with an f32 KV cache, no flash attention): err <= 1e-4 (measured 0.8e-6 to 2.3e-6: float32 sums in
  another order), and the greedy continuation of 32 tokens (ours: ``generate(temperature=0)`` through the KV cache;
  llama.cpp: one ``eval`` per token, argmax of its logits) is identical token for token. Four models: tiny-like
  (no q LoRA, tied embeddings, one dense layer then MoE, an MTP module that is not written), q LoRA + group-limited
  routing + routed_scaling_factor 2.5 + an untied head, YaRN (factor 8 over 16 original positions, a RoPE amplitude
  mscale/mscale_all_dim != 1 that the export folds into the queries, NeoX RoPE pairs permuted to llama.cpp's
  interleaved ones, our softmax 'standard' MoE with the zero shared expert llama.cpp needs), and V3.2 (deepseek32:
  40 tokens, index_topk 8, so the indexer's selection changes the logits: the dense model differs by far more),
  and a model without MoE layers.
- Other types, on the tiny-like model with every expert routed to every token (``num_experts_per_tok`` = 8 of 8:
  with a top-2 cut, a rounding that moves an expert across it changes that token's FFN, and such flips, not the
  arithmetic, made the errors of random models: up to 0.6 per row for q8_0), llama.cpp's default f16 KV cache.
  Metric: `rel_err` over the whole (T, V) logits (Frobenius). Two errors per type: ``err(llama.cpp, dequantized)``
  against our model with the weights llama.cpp reads (the file's tensors dequantized by gguf; what remains is
  llama.cpp's rounding of activations to f16 / bf16 / q8_0 and of the cache) and ``err(llama.cpp, reference)``.
  Measured over 6 seeds (max): f16 1.3e-3 / 1.8e-3; bf16 8.7e-3 / 1.5e-2; q8_0 2.9e-2 / 4.2e-2 (0.5% per weight and
  per activation, amplified about 6x by three random layers); q5_0 2.8e-2 / 2.7e-1; q4_0 2.9e-2 / 4.9e-1. Bounds
  are about twice those; the reference's argmax must be kept at >= 90% (f16), 85% (bf16), 80% (q8_0) of positions
  (measured >= 95%, 92.5%, 90%); q5_0 and q4_0, 5- and 4-bit weights of a random model, run within their bounds.
  The file's tensor types are checked against the rules (1-D, router, attn_k_b f32; rows that do not split into
  32-blocks f16).
- Tokenizer: llama.cpp's tokenize / detokenize (the 'smollm' pre-tokenizer) of digits, spaces, tabs, newlines,
  unicode, apostrophes and special-token text equal ours; the chat template in the file renders, through
  llama-cpp-python's Jinja formatter, the ids of `dsfs.chat.render`; bos / eos / pad ids, add_bos false, token
  types (special CONTROL, padding UNUSED).

llama.cpp runs one thread (`N_THREADS`; two spin-wait on each other, see the ``llama_cpp`` fixture). Its AMX weight
buffer (x86 CPUs that report AMX) killed the process with SIGILL for q8_0 / q4_0 weights on the development VM (a
Xeon); the quantized runs load with ``use_extra_bufts`` off (the generic CPU kernels, the same math).

Tests need ``llama-cpp-python``; they skip without it, and fail when ``DSFS_REQUIRE_LLAMA_CPP=1`` (CI).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import random

import numpy as np
import pytest
import torch

from bench.gguf_speed import llama_greedy
from dsfs import data
from dsfs.chat import render
from dsfs.export import ExportError, export
from dsfs.gguf_export import OUTTYPES, check_gguf, gguf_name, gguf_tensors
from reference import Model, ModelConfig
from reference.testing import rel_err
from tests.reference_utils import assert_o1, randomize_

VOCAB = 400  # the tokenizer's size (or less, for a short text); the models pad to MODEL_VOCAB
MODEL_VOCAB = 416  # ids 400..415: llama.cpp gets UNUSED [PAD] tokens
PROMPT, NEW = 40, 32
N_THREADS = 1  # llama.cpp threads: two spin-wait on each other on the busy 2-core CI machine (see `llama_cpp`)
BASE = dict(
    vocab_size=MODEL_VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
    num_attention_heads=4, q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
    v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
    tie_word_embeddings=True, num_nextn_predict_layers=1, max_position_embeddings=256, bos_token_id=1,
    eos_token_id=0, pad_token_id=2,
)
CONFIGS = {
    "tiny": {},
    "q_lora_groups": dict(q_lora_rank=48, n_group=4, topk_group=2, routed_scaling_factor=2.5,
                          tie_word_embeddings=False),
    "yarn": dict(rope_scaling={"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 16,
                               "mscale": 0.707, "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1},
                 rope_interleave=False, moe_type="standard", norm_topk_prob=False),
    "v32": dict(model_type="deepseek_v32", attention_type="dsa", q_lora_rank=48, index_n_heads=8,
                index_head_dim=64, index_topk=8),
    "dense": dict(moe_type="dense"),
}
ARCH = {"v32": "deepseek32"}
# (bound on err(llama.cpp, dequantized model), bound on err(llama.cpp, reference), min argmax agreement): see above
QUANT_BOUNDS = {"f16": (3e-3, 4e-3, 0.9), "bf16": (2e-2, 3e-2, 0.85), "q8_0": (6e-2, 0.1, 0.8),
                "q5_0": (6e-2, 0.5, 0.0), "q4_0": (6e-2, 1.0, 0.0)}
BLOCK = 32  # q8_0 / q5_0 / q4_0 block length along a row
STRINGS = [
    "Once upon a time, there was a little girl named Lily.", "12345 + 678 = 13023 and 3.14159, 007",
    "  two  spaces\tand\ttabs   ", "line one\n\nline two\r\n  indented\n", "café naïve 日本語 🙂 Ωμέγα ٣٤٥ ½ Ⅻ",
    "<|user|>What is 2+2?<|assistant|><think>4</think><answer>4</answer><|endoftext|>", " leading space",
    "don't you'll I'm we've", '<tool_call>{"name": "f", "arguments": {}}</tool_call>', "",
]


@pytest.fixture(scope="module")
def llama_cpp():
    """The llama_cpp module; skip without it, unless DSFS_REQUIRE_LLAMA_CPP=1 (then the import error fails).

    llama.cpp runs on torch's libgomp (the same soname, loaded first), whose OpenMP threads spin while they wait:
    with two llama.cpp threads on the busy 2-core machine, 32 one-token evals took 20 s instead of 0.8 s with one
    (`N_THREADS`). ``OMP_WAIT_POLICY=PASSIVE`` would fix it but is read when libgomp loads, before any test."""
    if os.environ.get("DSFS_REQUIRE_LLAMA_CPP") == "1":
        import llama_cpp

        return llama_cpp
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (the GGUF oracle); CI sets "
                               "DSFS_REQUIRE_LLAMA_CPP=1 to require it")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """tokenizer.json (trained on 20k characters of the TinyStories sample, synthetic words without it) and
    tokenizer_config.json, as ``dsfs prepare`` writes them."""
    d = tmp_path_factory.mktemp("tok")
    if data.DEFAULT_INPUT.is_file():
        text = data.DEFAULT_INPUT.read_text(encoding="utf-8")[:20_000]
    else:
        rng = random.Random(0)
        words = "the a cat dog sun ran saw big little happy sad tree ball mom said played went home 7 42".split()
        text = " ".join(rng.choices(words, k=4000))
    data.train_tokenizer([text], vocab_size=VOCAB).save(str(d / "tokenizer.json"))
    data.write_tokenizer_config(d)
    return d


def make_checkpoint(root, tokenizer_dir, seed: int = 0, router_bias: float = 0.1, **overrides):
    """A random model (`randomize_`, correction biases N(0, ``router_bias``)) saved with the tokenizer under
    ``root/ckpt``."""
    torch.manual_seed(seed)
    model = randomize_(Model(ModelConfig(**{**BASE, **overrides})), router_bias=router_bias).eval()
    model.save_pretrained(root / "ckpt", tokenizer_file=tokenizer_dir / "tokenizer.json")
    return model, root / "ckpt"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer_dir):
    """The tiny-like model, its checkpoint and its f32 GGUF."""
    root = tmp_path_factory.mktemp("tiny")
    model, ckpt = make_checkpoint(root, tokenizer_dir)
    export(ckpt, root / "f32.gguf", "gguf", outtype="f32")
    return model, ckpt, root / "f32.gguf"


@pytest.fixture(scope="module")
def all_experts(tmp_path_factory, tokenizer_dir):
    """The tiny-like model with every expert routed to every token (no top-k cut to flip) and its checkpoint."""
    return make_checkpoint(tmp_path_factory.mktemp("all_experts"), tokenizer_dir, num_experts_per_tok=8)


@contextlib.contextmanager
def llama(llama_cpp, path, exact: bool = True, **kw):
    """A llama.cpp model over ``path`` returning every position's logits; ``exact``: f32 KV cache, no flash
    attention (llama.cpp's default caches keys in f16). Closed on exit."""
    if exact:
        kw.update(type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, flash_attn=False)
    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=128, n_threads=N_THREADS, verbose=False, **kw)
    try:
        yield llm
    finally:
        llm.close()


def cpp_logits(llm, ids: list[int]) -> np.ndarray:
    """llama.cpp's logits (T, V) float64 of ``ids`` evaluated from an empty context."""
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float64)


def ref_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].double().numpy()


def row_err(out: np.ndarray, ref: np.ndarray) -> float:
    """The metric of the module docstring: the worst position's relative L2 error."""
    return max(rel_err(o, r) for o, r in zip(out, ref, strict=True))


def prompt_ids(seed: int, n: int = PROMPT) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def metadata(path) -> dict:
    import gguf

    return {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items()}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_f32_matches_the_reference(llama_cpp, tokenizer_dir, tiny, tmp_path, name):
    if name == "tiny":
        model, _, path = tiny
    else:
        model, ckpt = make_checkpoint(tmp_path, tokenizer_dir, seed=1, **CONFIGS[name])
        path = tmp_path / "m.gguf"
        r = export(ckpt, path, "gguf", outtype="f32")
        assert (r["arch"], r["outtype"], r["tensor_types"]) == (ARCH.get(name, "deepseek2"), "f32",
                                                                {"F32": r["tensors"]})
    assert metadata(path)["general.architecture"] == ARCH.get(name, "deepseek2")
    ids = prompt_ids(2)
    ours = ref_logits(model, ids)
    assert_o1(torch.from_numpy(ours))
    with llama(llama_cpp, path) as llm:
        err = row_err(cpp_logits(llm, ids), ours)
        assert err <= 1e-4, f"{name}: llama.cpp f32 logits differ from the reference by {err:.2e}"
        theirs = llama_greedy(llm, ids, NEW)
    with torch.no_grad():
        greedy = model.generate(torch.tensor([ids]), NEW, temperature=0.0)[0].tolist()
    assert theirs == greedy
    if name == "v32":  # the indexer's top-8 of 40 keys matters: the same weights attending densely differ by far more
        dense = Model(ModelConfig(**{**BASE, **CONFIGS[name], "index_topk": 4096})).eval()
        dense.load_state_dict(model.state_dict())
        assert row_err(ref_logits(dense, ids), ours) > 1e-2


def dequantized_model(model, path):
    """``model`` with the weights the GGUF file ``path`` holds, dequantized by gguf (the ``kv_b_proj`` halves
    joined again). Only for configs whose export does not scale or permute rows (no YaRN, interleaved RoPE)."""
    import gguf

    c = model.config
    assert c.rope_scaling is None and c.rope_interleave
    file = {t.name: torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).reshape(
        [int(n) for n in reversed(t.shape)]).astype(np.float32)) for t in gguf.GGUFReader(path).tensors}
    sd = {name: file[gguf_name(c, name)] for name in gguf_tensors(model)}
    for k_b in [n for n in sd if n.endswith("k_b_proj.weight")]:
        base = k_b[: -len("k_b_proj.weight")]
        kb, vb = sd.pop(k_b), sd.pop(base + "v_b_proj.weight")
        sd[base + "kv_b_proj.weight"] = torch.cat((kb.transpose(1, 2), vb), dim=1).reshape(-1, c.kv_lora_rank)
    out = copy.deepcopy(model)
    missing, unexpected = out.load_state_dict(sd, strict=False)
    assert not unexpected and all(k.startswith(("mtp.", "rotary.")) or k == "lm_head.weight" for k in missing)
    return out


def expected_type(name: str, shape: list[int], outtype: str) -> str:
    """The GGUF type the module's rules give tensor ``name`` of ggml shape ``shape`` (ne0 first)."""
    if len(shape) == 1 or name.endswith(("ffn_gate_inp.weight", "attn_k_b.weight")):
        return "F32"
    if outtype.startswith("q") and shape[0] % BLOCK:
        return "F16"
    return outtype.upper()


@pytest.mark.parametrize("outtype", [t for t in OUTTYPES if t != "f32"])
def test_quantized_types_load_and_stay_close(llama_cpp, all_experts, tmp_path, monkeypatch, outtype):
    import gguf

    model, ckpt = all_experts
    path = tmp_path / f"{outtype}.gguf"
    r = export(ckpt, path, "gguf", outtype=outtype)
    tensors = gguf.GGUFReader(path).tensors
    types = {t.name: (t.tensor_type.name, expected_type(t.name, [int(n) for n in t.shape], outtype))
             for t in tensors}
    assert {n: got for n, (got, _) in types.items()} == {n: want for n, (_, want) in types.items()}
    assert sum(got == outtype.upper() for got, _ in types.values()) >= 20 and r["tensors"] == len(tensors)
    defaults = llama_cpp.llama_cpp.llama_model_default_params

    def no_extra_buffers():  # the AMX buffer: SIGILL on a VM (module docstring)
        p = defaults()
        p.use_extra_bufts = False
        return p

    monkeypatch.setattr(llama_cpp.llama_cpp, "llama_model_default_params", no_extra_buffers)
    ids = prompt_ids(3)
    ours, deq = ref_logits(model, ids), ref_logits(dequantized_model(model, path), ids)
    with llama(llama_cpp, path, exact=False) as llm:
        theirs = cpp_logits(llm, ids)
    bound_deq, bound_ref, agree = QUANT_BOUNDS[outtype]
    assert rel_err(theirs, deq) <= bound_deq
    assert rel_err(theirs, ours) <= bound_ref
    assert (theirs.argmax(-1) == ours.argmax(-1)).mean() >= agree


def test_tokenizer_and_chat_template(llama_cpp, tokenizer_dir, tiny):
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    tok = data.read_tokenizer(tokenizer_dir / "tokenizer.json")
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    meta = metadata(tiny[2])
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "smollm"
    assert meta["tokenizer.chat_template"] == config["chat_template"]
    assert [meta[f"tokenizer.ggml.{k}_token_id"] for k in ("bos", "eos", "padding")] == [1, 0, 2]
    assert not meta["tokenizer.ggml.add_bos_token"] and not meta["tokenizer.ggml.add_eos_token"]
    types = meta["tokenizer.ggml.token_type"]
    n = tok.get_vocab_size()
    assert len(types) == MODEL_VOCAB and n < MODEL_VOCAB
    assert set(types[:len(data.SPECIAL_TOKENS)]) == {gguf_token_type("CONTROL")}
    assert set(types[len(data.SPECIAL_TOKENS):n]) == {gguf_token_type("NORMAL")}
    assert set(types[n:]) == {gguf_token_type("UNUSED")}
    with llama(llama_cpp, tiny[2], vocab_only=True) as llm:
        for s in STRINGS:
            ids = tok.encode(s).ids
            assert llm.tokenize(s.encode(), add_bos=False, special=True) == ids, s
            assert llm.detokenize(ids, special=True).decode() == tok.decode(ids, skip_special_tokens=False) == s
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 12+30?"},
                    {"role": "assistant", "content": "<think>12+30=42</think>42"}, {"role": "user", "content": "Ok"}]
        prompt = Jinja2ChatFormatter(meta["tokenizer.chat_template"], eos_token=data.EOS, bos_token=data.BOS,
                                     add_generation_prompt=True)(messages=messages).prompt
        assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == render(messages, tok, True)[0]


def gguf_token_type(name: str) -> int:
    import gguf

    return int(gguf.TokenType[name])


def test_bad_input(tiny, tokenizer_dir, tmp_path):
    _, ckpt, _ = tiny
    with pytest.raises(ExportError, match="expected one of f32, f16, bf16, q8_0"):
        export(ckpt, tmp_path / "x.gguf", "gguf", outtype="q4_k")
    (tmp_path / "there.gguf").write_bytes(b"GGUF")
    with pytest.raises(ExportError, match="already exists; pass --overwrite"):
        export(ckpt, tmp_path / "there.gguf", "gguf")
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ExportError, match="not a GGUF file"):
        export(ckpt, tmp_path / "notes.txt", "gguf", overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "not a model"
    _, gqa = make_checkpoint(tmp_path / "gqa", tokenizer_dir, attention_type="gqa", num_key_value_heads=2)
    with pytest.raises(ExportError, match="attention_type='gqa'.*MLA only"):
        export(gqa, tmp_path / "gqa.gguf", "gguf")
    model, _ = make_checkpoint(tmp_path / "notok", tokenizer_dir)
    model.save_pretrained(tmp_path / "notok" / "bare")
    with pytest.raises(ExportError, match="no tokenizer.json"):
        export(tmp_path / "notok" / "bare", tmp_path / "bare.gguf", "gguf")
    spec = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = spec["pre_tokenizer"]["pretokenizers"][1]  # ByteLevel alone: digits would merge
    (tmp_path / "notok" / "bare" / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ExportError, match="expected a dsfs tokenizer"):
        export(tmp_path / "notok" / "bare", tmp_path / "bare.gguf", "gguf")
    assert not (tmp_path / "gqa.gguf").exists() and not (tmp_path / "bare.gguf").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


@pytest.mark.parametrize("overrides, match", [
    (dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), "'linear'"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                        "beta_fast": 16}), "beta_fast=16"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                        "truncate": False}), "truncate"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(num_hidden_layers=27, q_lora_rank=32), "V2-Lite"),
    (dict(model_type="deepseek_v32", attention_type="dsa", q_lora_rank=32, index_head_dim=32), "index_head_dim=32"),
    (dict(model_type="deepseek_v32", attention_type="dsa", q_lora_rank=32, index_head_dim=64,
          mlp_layer_types=["dense", "sparse", "dense"]), "dense FFN layers after MoE"),
])
def test_check_gguf_refuses_what_llama_cpp_cannot_run(overrides, match):
    with pytest.raises(ExportError, match=match):
        check_gguf(ModelConfig(**{**BASE, **overrides}))
    check_gguf(ModelConfig(**BASE))
