"""GGUF export for llama.cpp: one ``.gguf`` file that llama.cpp's ``deepseek2`` (V3) or ``deepseek32`` (V3.2, DSA)
architecture runs with the same logits as `reference.Model` (``dsfs export --format gguf``, `dsfs.export.export`).

Written with the ``gguf`` package (llama.cpp's own Python writer): architecture, metadata keys and tensor names come
from its constants (``gguf.Keys``, ``gguf.MODEL_TENSOR`` through ``gguf.get_tensor_name_map``). gguf 0.19.0 has no
``MODEL_ARCH.DEEPSEEK32`` yet, so that one architecture name is written as llama.cpp spells it (``src/llama-arch.cpp``)
and V3.2's tensors are named with the map of ``GLM_DSA``, which llama.cpp loads the same DSA tensors under.

What llama.cpp (as of llama-cpp-python 0.3.36) expects and how the model is written for it:

- MLA in its absorbed form: ``kv_b_proj`` (H*(dn+dv), r) is split into ``attn_k_b`` (H, r, dn), the key
  up-projection transposed, and ``attn_v_b`` (H, dv, r); ``q_lora_rank`` null is written as 0 (plain
  ``attn_q``, as DeepSeek-V2-Lite). Head sizes: key/value length ``kv_lora_rank + qk_rope_head_dim`` /
  ``kv_lora_rank`` (the latent cache, one KV head), key/value length MLA ``qk_nope_head_dim + qk_rope_head_dim`` /
  ``v_head_dim``. llama.cpp's DeepSeek RoPE rotates interleaved pairs; a checkpoint with ``rope_interleave`` false
  (NeoX pairs) gets its query and ``k_pe`` rows permuted to interleaved order (the dot products are unchanged).
- YaRN: factor, original context, ``rope_scaling.yarn_log_multiplier`` = 0.1 * ``mscale_all_dim`` (llama.cpp's
  deepseek2 convention), and ``rope.scaling.attn_factor`` chosen so that llama.cpp's softmax scale is ours,
  ``qk_head_dim**-0.5 * mscale(factor, mscale_all_dim)**2``, and its RoPE amplitude is 1; our cos/sin amplitude
  (1 for DeepSeek-V3's config) is folded into the RoPE rows of the queries (MLA and indexer) instead, which is the
  same math. llama.cpp's deepseek2 reads neither beta_fast/beta_slow (fixed 32 / 1) nor YaRN without truncation,
  and its softmax-scale formula is wrong for 'linear' scaling: those configs are refused.
- DeepSeekMoE: sigmoid gating (softmax for our 'standard' MoE), ``exp_probs_b`` (the correction bias, selection
  only), weights normalized (``norm_topk_prob``) and scaled by ``routed_scaling_factor``, group-limited routing
  (``n_group`` / ``topk_group``; llama.cpp needs ``topk_group < n_group``, and ``topk_group == n_group`` limits
  nothing, so no groups are written then), ``first_k_dense_replace`` leading dense layers (dense layers elsewhere
  are refused). llama.cpp always runs a shared expert: a MoE without one (``n_shared_experts`` 0, or the 'standard'
  MoE) gets one shared expert with zero weights, which adds exactly 0.
- DSA (``deepseek32``): indexer heads, head size, top-k, ``indexer.{attn_q_b, attn_k, k_norm (weight, bias),
  proj}``; llama.cpp applies a Hadamard rotation to the indexer queries and keys (orthogonal: the scores are
  unchanged) whose size must equal ``index_head_dim``, so it must be a power of two >= 64.
- MTP modules are not written: llama.cpp's converter skips them for DeepSeek-V3 (``skip_mtp``). Its deepseek2 MTP
  graph (GLM-4's ``nextn``: one depth, a q LoRA and a MoE FFN required) reads the same math as far as its source
  shows, but runs only in a separate MTP context that llama-cpp-python's ``Llama`` does not offer, so it could not be
  checked against ours.
- Tied embeddings: no ``output.weight`` (llama.cpp then uses ``token_embd``).
- Tokenizer: ``tokenizer.ggml.model`` 'gpt2' (byte-level BPE) with every token, its type (special tokens CONTROL,
  other added tokens USER_DEFINED, ids past the tokenizer up to ``vocab_size`` UNUSED ``[PAD{i}]``) and merges;
  ``tokenizer.ggml.pre`` 'smollm', whose regexes are exactly dsfs's pre-tokenizer (every digit alone, ``\\p{N}``,
  then the GPT-2 regex) and which keeps spaces on decode as our ``clean_up_tokenization_spaces`` false; bos / eos /
  pad ids and the chat template from ``tokenizer_config.json`` (``gguf.SpecialVocab``); add_bos and add_eos false:
  ``dsfs generate`` starts a plain prompt with the eos token, the document separator of the packed training stream,
  and a chat prompt with the template's bos, so a llama.cpp user writes the same start (``"<|endoftext|>Once upon a
  time"``: llama.cpp parses special tokens in prompts); an automatic bos would be wrong for one of the two.
  A checkpoint without ``tokenizer.json`` is refused (llama.cpp needs the vocabulary in the file), and so is one whose
  pre-tokenizer or model is not dsfs's (another split of the text).

Tensor types (``OUTTYPES``, ``outtype``): f32, f16, bf16, and llama.cpp's block quantizations that gguf's Python
quantizer implements, q8_0, q5_0 and q4_0 (blocks of 32 along a row). gguf 0.19.0 cannot quantize k-quants (Q4_K,
Q6_K, ...: dequantize only); make them from an f16 or f32 file with llama.cpp's ``llama-quantize``. As llama.cpp's
converter: 1-D tensors (norms, biases), the router ``ffn_gate_inp`` and the indexer ``proj`` stay f32, and a matrix
whose rows do not split into whole blocks falls back to f16. ``attn_k_b`` stays f32 as well (H * r * dn values a
layer, 0.3% of DeepSeek-V3): llama.cpp multiplies it by a permuted, non-contiguous query, and on x86 CPUs with AMX
it places an f16 / q8_0 / q4_0 ``attn_k_b`` in its AMX weight buffer, whose kernels then refuse that product
(``GGML_ASSERT(*cur_backend_id != -1)`` when the context is created; seen with llama-cpp-python 0.3.36 on a Xeon).
The same AMX buffer computes the other f16 matrices wrongly on that machine (garbage text from an f16 file) and its
q8_0 / q4_0 kernels die with SIGILL there: llama.cpp bugs that no file layout avoids; load with the extra buffers
off (``llama-cli --no-repack``, ``use_extra_bufts = False``), as the tests do.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

OUTTYPES = ("f32", "f16", "bf16", "q8_0", "q5_0", "q4_0")
PRE_TOKENIZER = "smollm"  # llama.cpp's pre-tokenizer (src/llama-vocab.cpp) with dsfs's regexes and no space cleanup
DEEPSEEK32 = "deepseek32"  # llama.cpp's V3.2 architecture; gguf 0.19.0 has no MODEL_ARCH constant for it
_YARN_BETAS = {"beta_fast": 32.0, "beta_slow": 1.0}  # the only values llama.cpp's deepseek2 runs


def _error(msg: str):
    from dsfs.export import ExportError

    return ExportError(msg)


def model_name(model_dir: str | os.PathLike) -> str:
    """The GGUF ``general.name``: the model directory's name, or its run's for a run's ``final/`` or
    ``checkpoints/step_N`` (``runs/tiny/final`` -> 'tiny')."""
    d = Path(model_dir).resolve()
    if d.name == "final":
        return d.parent.name
    if d.name.startswith("step_") and d.parent.name == "checkpoints":
        return d.parent.parent.name
    return d.name


def check_gguf(config) -> None:
    """Raise `dsfs.export.ExportError` (one line) for a `reference.ModelConfig` that llama.cpp's ``deepseek2`` /
    ``deepseek32`` cannot run with the same math, naming the field; return None otherwise.

    Refused: attention other than MLA/DSA (llama.cpp's DeepSeek architectures are MLA only), attention biases; MoE
    layers that do not all follow the leading dense ones; a 26/27-layer model (or 48 layers with a 128256
    vocabulary) with a q LoRA, which llama.cpp's deepseek2 reads as V2-Lite without one; rope scaling other than
    YaRN, or YaRN with a factor
    below 1, ``truncate`` false or betas other than 32 / 1; for V3.2 an ``index_head_dim`` that is not a power of two
    >= 64; more than llama.cpp's 1024 experts or 512 layers.
    """
    c = config
    if not c.uses_mla:
        raise _error(f"attention_type={c.attention_type!r}: llama.cpp's DeepSeek architectures (deepseek2, "
                     "deepseek32) run MLA only; export MHA/MQA/GQA models as --format hf")
    if c.attention_bias:
        raise _error("attention_bias=true: llama.cpp's deepseek2 has no biases on the MLA projections")
    layers = [c.is_moe_layer(i) for i in range(c.num_hidden_layers)]
    dense = layers.index(True) if any(layers) else len(layers)
    if any(not m for m in layers[dense:]):
        raise _error(f"dense FFN layers after MoE layers ({c.mlp_layer_types}): llama.cpp's deepseek2 takes dense "
                     "layers only before the first MoE layer (leading_dense_block_count)")
    if c.num_hidden_layers > 512 or (any(layers) and c.n_routed_experts > 1024):
        raise _error(f"num_hidden_layers={c.num_hidden_layers}, n_routed_experts={c.n_routed_experts}: llama.cpp "
                     "holds at most 512 layers and 1024 experts")
    lite = c.num_hidden_layers in (26, 27) or (c.num_hidden_layers == 48 and c.vocab_size == 128256)
    if c.attention_type == "mla" and lite and c.q_lora_rank is not None:
        raise _error(f"num_hidden_layers={c.num_hidden_layers} with q_lora_rank={c.q_lora_rank}: llama.cpp's "
                     "deepseek2 reads a model of that depth as DeepSeek-V2-Lite, without a q LoRA")
    rs = c.rope_scaling or {}
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind not in ("default", "yarn"):
        raise _error(f"rope_scaling type {kind!r}: llama.cpp's deepseek2 runs YaRN or no scaling (its softmax scale "
                     "assumes YaRN)")
    if kind == "yarn":
        if float(rs["factor"]) < 1:
            raise _error(f"rope_scaling factor={rs['factor']}: llama.cpp's YaRN needs a factor >= 1")
        if not rs.get("truncate", True):
            raise _error("rope_scaling truncate=false: llama.cpp's YaRN always rounds the correction dims")
        for key, value in _YARN_BETAS.items():
            if float(rs.get(key) or value) != value:
                raise _error(f"rope_scaling {key}={rs[key]}: llama.cpp's deepseek2 runs YaRN with {key} {value:g} "
                             "and does not read the field")
    if c.attention_type == "dsa":
        d = c.index_head_dim
        if d < 64 or d & (d - 1):
            raise _error(f"index_head_dim={d}: llama.cpp's deepseek32 rotates the indexer heads with a Hadamard "
                         "matrix of its own size, a power of two >= 64")


def gguf_arch(config) -> str:
    """llama.cpp's architecture name for ``config``: 'deepseek32' with the DSA indexer (V3.2), else 'deepseek2'."""
    import gguf

    return DEEPSEEK32 if config.attention_type == "dsa" else gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.DEEPSEEK2]


def _mscale(factor: float, m: float) -> float:
    """YaRN's ``0.1 * m * ln(factor) + 1`` (1 for factor <= 1), as transformers' ``get_mscale``."""
    return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0


def rope_attn_factor(config) -> float:
    """The ``rope.scaling.attn_factor`` under which llama.cpp's deepseek2 / deepseek32 graph (with its context's
    YaRN adjustment, ``llama_context`` and ``ggml_rope_ext``) rotates with amplitude 1 and scales the attention
    logits by ``qk_head_dim**-0.5 * mscale(factor, mscale_all_dim)**2``, ours (`ModelConfig.softmax_scale`): 1
    without YaRN. With ``L = mscale_all_dim`` (0 when absent): deepseek2 1 (L set) or ``1 / mscale(factor, 1)``;
    deepseek32 ``mscale(factor, L) / mscale(factor, 1)``."""
    rs = config.rope_scaling or {}
    if rs.get("rope_type", rs.get("type")) != "yarn":
        return 1.0
    f, L = float(rs["factor"]), float(rs.get("mscale_all_dim") or 0.0)
    if config.attention_type == "mla":
        return 1.0 if L else 1.0 / _mscale(f, 1.0)
    return _mscale(f, L) / _mscale(f, 1.0)


def _head_rows(n_heads: int, head: int, start: int, stop: int):
    """Row indices ``start..stop-1`` of each of ``n_heads`` heads of width ``head`` in a (n_heads*head, ...) matrix."""
    import torch

    return (torch.arange(n_heads)[:, None] * head + torch.arange(start, stop)).reshape(-1)


def _rope_rows(w, n_heads: int, head: int, start: int, dr: int, scale: float, to_interleaved: bool):
    """``w`` with the RoPE rows ``start..start+dr`` of each head scaled by ``scale`` and, when ``to_interleaved``,
    reordered from NeoX pairs (i, i + dr/2) to interleaved pairs (2i, 2i + 1)."""
    import torch

    w = w.clone()
    rows = _head_rows(n_heads, head, start, start + dr)
    order = torch.arange(dr).view(2, dr // 2).T.reshape(-1) if to_interleaved else torch.arange(dr)
    w[rows] = w[rows.view(n_heads, dr)[:, order].reshape(-1)] * scale
    return w


def gguf_tensors(model):
    """The model's tensors as llama.cpp's DeepSeek graph reads them, by Hugging Face-style name (float32 torch
    tensors, CPU): the main model only (no MTP, no tied ``lm_head``), experts stacked (E, I, H) / (E, H, I) under
    ``...mlp.experts.{gate,up,down}_proj``, ``kv_b_proj`` split into ``k_b_proj`` (H, r, dn) and ``v_b_proj``
    (H, dv, r), the RoPE rows of the queries times our YaRN amplitude squared (and, for ``rope_interleave`` false,
    query and ``k_pe`` rows in interleaved order), and a zero shared expert for a MoE without one."""
    import torch

    from reference.rope import rope_inv_freq

    c = model.config
    h, dn, dr, dv, r = c.num_attention_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank
    amp2 = rope_inv_freq(dr, c.rope_theta, c.rope_scaling)[1] ** 2
    neox = not c.rope_interleave
    out = {}
    for name, t in model.state_dict().items():
        if name.startswith(("rotary.", "mtp.")) or (c.tie_word_embeddings and name == "lm_head.weight"):
            continue
        t = t.detach().to("cpu", torch.float32)
        if name.endswith(("self_attn.q_proj.weight", "self_attn.q_b_proj.weight")):
            t = _rope_rows(t, h, dn + dr, dn, dr, amp2, neox)
        elif name.endswith("self_attn.kv_a_proj_with_mqa.weight"):
            t = _rope_rows(t, 1, r + dr, r, dr, 1.0, neox)
        elif name.endswith("self_attn.indexer.wq_b.weight"):
            t = _rope_rows(t, c.index_n_heads, c.index_head_dim, 0, dr, amp2, False)
        elif name.endswith("self_attn.kv_b_proj.weight"):
            kv = t.view(h, dn + dv, r)
            base = name[: -len("kv_b_proj.weight")]
            out[base + "k_b_proj.weight"] = kv[:, :dn].transpose(1, 2).contiguous()
            out[base + "v_b_proj.weight"] = kv[:, dn:].contiguous()
            continue
        out[name] = t
    if c.has_moe_layers and (c.moe_type != "deepseek" or c.n_shared_experts == 0):
        for i in range(c.num_hidden_layers):
            if c.is_moe_layer(i):
                p = f"model.layers.{i}.mlp.shared_experts."
                out[p + "gate_proj.weight"] = out[p + "up_proj.weight"] = torch.zeros(c.moe_intermediate_size,
                                                                                      c.hidden_size)
                out[p + "down_proj.weight"] = torch.zeros(c.hidden_size, c.moe_intermediate_size)
    return out


def _tensor_map(config):
    """gguf's name map for ``config``'s architecture. V3.2 uses GLM-DSA's: the same DSA tensor names (gguf 0.19.0
    has no DEEPSEEK32)."""
    import gguf

    arch = gguf.MODEL_ARCH.GLM_DSA if config.attention_type == "dsa" else gguf.MODEL_ARCH.DEEPSEEK2
    return gguf.get_tensor_name_map(arch, config.num_hidden_layers)


def gguf_name(config, name: str) -> str:
    """The GGUF tensor name (``blk.3.attn_k_b.weight``) of a `gguf_tensors` name (``model.layers.3.self_attn.
    k_b_proj.weight``) under ``config``. Raises ``KeyError`` for a name gguf cannot map."""
    return _gguf_name(_tensor_map(config), name)[1]


def _gguf_name(tmap, name: str):
    """(``gguf.MODEL_TENSOR``, GGUF name) of a Hugging Face-style tensor name: ``X.weight`` / ``X.bias`` /
    ``X_bias`` (the MoE correction bias) / a stacked ``X`` (experts: ``.weight`` added). Raises ``KeyError``."""
    for suffix, gguf_suffix in ((".weight", ".weight"), (".bias", ".bias"), ("_bias", ".bias"), ("", ".weight")):
        if name.endswith(suffix):
            found = tmap.get_type_and_name(name[: len(name) - len(suffix)])
            if found is not None:
                return found[0], found[1] + gguf_suffix
    raise KeyError(f"gguf has no tensor name for {name}")


def _encode(kind, data, qtype):
    """``data`` (float32 numpy) encoded in ``qtype`` as llama.cpp's converter does: 1-D tensors, the router and the
    indexer head weights in f32, and ``attn_k_b`` too (see the module docstring); a row that does not split into whole
    quantization blocks in f16. Returns (array, qtype)."""
    import gguf

    if data.ndim <= 1 or kind in (gguf.MODEL_TENSOR.FFN_GATE_INP, gguf.MODEL_TENSOR.INDEXER_PROJ,
                                  gguf.MODEL_TENSOR.ATTN_K_B):
        qtype = gguf.GGMLQuantizationType.F32
    try:
        return gguf.quants.quantize(data, qtype), qtype
    except gguf.QuantError:
        return gguf.quants.quantize(data, gguf.GGMLQuantizationType.F16), gguf.GGMLQuantizationType.F16


def _is_dsfs_tokenizer(spec: dict) -> bool:
    """``tokenizer.json`` ``spec`` is byte-level BPE with dsfs's pre-tokenizer: individual digits, then ByteLevel with
    the GPT-2 regex and no prefix space, and no normalizer (`dsfs.data.train_tokenizer`)."""
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
    if not steps or len(steps) != 2:
        return False
    digits, byte_level = steps
    return (spec.get("model", {}).get("type") == "BPE" and spec.get("normalizer") is None
            and digits == {"type": "Digits", "individual_digits": True}
            and byte_level.get("type") == "ByteLevel" and byte_level.get("use_regex", True)
            and not byte_level.get("add_prefix_space"))


def _add_tokenizer(writer, model_dir: Path, vocab_size: int) -> None:
    """Write the vocabulary of ``model_dir/tokenizer.json`` (and ``tokenizer_config.json``) to ``writer``; raise
    ExportError when there is none, it is not dsfs's byte-level BPE, or it holds ids >= ``vocab_size``."""
    import gguf

    from dsfs.data import read_tokenizer

    file = model_dir / "tokenizer.json"
    if not file.is_file():
        raise _error(f"{model_dir} has no tokenizer.json: llama.cpp needs the vocabulary inside the GGUF file; copy "
                     "the tokenizer.json (and tokenizer_config.json) the model was trained with into it")
    spec = json.loads(file.read_text(encoding="utf-8"))
    if not _is_dsfs_tokenizer(spec):
        raise _error(f"{file}: expected a dsfs tokenizer (byte-level BPE after Digits(individual_digits=True), as "
                     f"dsfs prepare writes), whose split llama.cpp's {PRE_TOKENIZER!r} pre-tokenizer reproduces")
    tok = read_tokenizer(file)
    vocab = tok.get_vocab(with_added_tokens=True)
    if max(vocab.values()) >= vocab_size:
        raise _error(f"{file} has ids up to {max(vocab.values())}, the model's vocab_size is {vocab_size}")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for text, i in vocab.items():
        tokens[i], types[i] = text, gguf.TokenType.NORMAL
    for i, added in tok.get_added_tokens_decoder().items():
        types[i] = gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(PRE_TOKENIZER)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=vocab_size)
    special.add_special_token.update(bos=False, eos=False)
    special.add_to_gguf(writer, quiet=True)


def _add_hparams(writer, c, name: str) -> None:
    """The architecture's metadata keys (``gguf.Keys``) for config ``c``."""
    import gguf

    writer.add_name(name)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_vocab_size(c.vocab_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(1)  # MLA's absorbed form: one latent KV head
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_q_lora_rank(c.q_lora_rank or 0)
    writer.add_kv_lora_rank(c.kv_lora_rank)
    writer.add_key_length(c.kv_lora_rank + c.qk_rope_head_dim)
    writer.add_value_length(c.kv_lora_rank)
    writer.add_key_length_mla(c.qk_head_dim)
    writer.add_value_length_mla(c.v_head_dim)
    writer.add_rope_dimension_count(c.qk_rope_head_dim)
    writer.add_rope_freq_base(c.rope_theta)
    rs = c.rope_scaling or {}
    if rs.get("rope_type", rs.get("type")) == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rs["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(rs["original_max_position_embeddings"]))
        writer.add_rope_scaling_yarn_beta_fast(_YARN_BETAS["beta_fast"])
        writer.add_rope_scaling_yarn_beta_slow(_YARN_BETAS["beta_slow"])
        if rs.get("mscale_all_dim"):
            writer.add_rope_scaling_yarn_log_mul(0.1 * float(rs["mscale_all_dim"]))
        writer.add_rope_scaling_attn_factors(rope_attn_factor(c))  # gguf.Keys.Rope.SCALING_ATTN_FACTOR
    else:
        writer.add_rope_scaling_type(gguf.RopeScalingType.NONE)
    moe = [c.is_moe_layer(i) for i in range(c.num_hidden_layers)]
    writer.add_leading_dense_block_count(moe.index(True) if any(moe) else c.num_hidden_layers)
    writer.add_expert_feed_forward_length(c.moe_intermediate_size)
    deepseek = c.moe_type == "deepseek"
    writer.add_expert_shared_count(max(c.n_shared_experts, 1) if any(moe) and deepseek else int(any(moe)))
    if any(moe):
        writer.add_expert_count(c.n_routed_experts)
        writer.add_expert_used_count(c.num_experts_per_tok)
        writer.add_expert_weights_norm(bool(c.norm_topk_prob))
        writer.add_expert_weights_scale(float(c.routed_scaling_factor) if deepseek else 1.0)
        writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID if deepseek
                                      else gguf.ExpertGatingFuncType.SOFTMAX)
        if deepseek and 1 < c.n_group and c.topk_group < c.n_group:
            writer.add_expert_group_count(c.n_group)
            writer.add_expert_group_used_count(c.topk_group)
    if c.attention_type == "dsa":
        writer.add_indexer_head_count(c.index_n_heads)
        writer.add_indexer_key_length(c.index_head_dim)
        writer.add_indexer_top_k(c.index_topk)


def write_gguf(model, model_dir: str | os.PathLike, path: str | os.PathLike, outtype: str) -> dict:
    """Write ``model`` (a float32 `reference.Model` loaded from ``model_dir``) as the GGUF file ``path`` for
    llama.cpp, matrices in ``outtype`` (one of `OUTTYPES`), with the tokenizer of ``model_dir`` (see the module
    docstring for what is written and how).

    Returns ``{"arch", "tensors", "outtype", "tensor_types"}``: the llama.cpp architecture, the number of tensors,
    ``outtype`` and the count of tensors per GGUF type (e.g. ``{"F32": 17, "Q8_0": 30, "F16": 6}``). Raises
    `dsfs.export.ExportError` for a config `check_gguf` refuses, an unknown ``outtype`` or an unusable tokenizer
    (before anything is written); ``OSError`` from the write.
    """
    import gguf

    check_gguf(model.config)
    if outtype not in OUTTYPES:
        raise _error(f"--outtype {outtype}: expected one of {', '.join(OUTTYPES)}")
    c, model_dir = model.config, Path(model_dir)
    arch = gguf_arch(c)
    writer = gguf.GGUFWriter(path, arch)
    _add_tokenizer(writer, model_dir, c.vocab_size)
    _add_hparams(writer, c, model_name(model_dir))
    qtype = gguf.GGMLQuantizationType[outtype.upper()]
    file_type = {"f32": "ALL_F32", "f16": "MOSTLY_F16"}.get(outtype, f"MOSTLY_{outtype.upper()}")
    writer.add_file_type(gguf.LlamaFileType[file_type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tmap = _tensor_map(c)
    types: dict[str, int] = {}
    for name, t in gguf_tensors(model).items():
        kind, gname = _gguf_name(tmap, name)
        data, used = _encode(kind, t.numpy(), qtype)
        writer.add_tensor(gname, data, raw_dtype=used)
        types[used.name] = types.get(used.name, 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"arch": arch, "tensors": sum(types.values()), "outtype": outtype, "tensor_types": types}
