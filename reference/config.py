"""Model configuration with the Hugging Face DeepSeek-V3 field names.

`ModelConfig` is read from and written to a checkpoint's ``config.json``. The DeepSeek-V3 fields keep
the names of ``transformers.DeepseekV3Config`` (and the official ``config.json`` of deepseek-ai/DeepSeek-V3);
V3.2 adds the lightning-indexer fields ``index_n_heads``, ``index_head_dim``, ``index_topk``. Two fields are
our own: ``attention_type`` (mha, mqa, gqa, mla, dsa) and ``moe_type`` (dense, standard, deepseek).

A ``config.json`` written by ``transformers`` or shipped by DeepSeek is read as ``transformers`` reads it
(`hf_to_fields`): values it accepts and reads in a defined way load the same way here; only what cannot be
built is refused, naming the field.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

ATTENTION_TYPES = ("mha", "mqa", "gqa", "mla", "dsa")
MOE_TYPES = ("dense", "standard", "deepseek")
_ROPE_SCALING_KEYS = {
    "type", "rope_type", "factor", "original_max_position_embeddings", "beta_fast", "beta_slow",
    "mscale", "mscale_all_dim", "attention_factor", "truncate", "rope_theta",
}
# Keys other tools write into config.json that carry no meaning for the model math.
_PASSTHROUGH_KEYS = {
    "architectures", "transformers_version", "torch_dtype", "dtype", "auto_map", "use_cache",
    "pretraining_tp", "ep_size", "moe_layer_freq", "attention_dropout", "output_router_logits",
    "mlp_layer_types", "layer_types", "qk_head_dim", "mlp_bias",
    "indexer_rope_interleave", "rope_parameters", "aux_loss_alpha_is_seq",
}
FP8_QUANTIZATION = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}


def hf_to_fields(d: dict[str, Any]) -> dict[str, Any]:
    """A ``config.json`` dict as ``transformers`` reads it -> a dict of `ModelConfig` field names (plus the
    pass-through keys), without validating the values. Returns a new dict; idempotent.

    - ``model_type`` 'deepseek_v32' implies ``attention_type`` 'dsa';
    - ``rope_parameters`` (transformers 5) gives ``rope_theta`` and, unless ``rope_scaling`` is set, its scaling;
    - ``num_mtp_layers`` (transformers' ``DeepseekV3Config`` alias) is ``num_nextn_predict_layers``;
    - V3.2's ``mlp_layer_types`` (a list of 'dense'/'sparse' per layer, which transformers' V3.2 model follows
      in place of ``first_k_dense_replace``) and ``layer_types`` ('indexed_attention') are checked and dropped:
      ``first_k_dense_replace`` then says the same, and transformers rebuilds both lists from it;
    - ``quantization_config`` (DeepSeek's FP8: e4m3, 128x128 weight blocks) is checked and dropped: the
      loaders dequantize the weights, so the model and what it saves are unquantized.

    Raises ``ValueError`` naming the field for a value that cannot be built: ``num_mtp_layers`` disagreeing
    with ``num_nextn_predict_layers``, ``mlp_layer_types`` not of the form dense... then sparse... over
    ``num_hidden_layers`` entries, ``layer_types`` other than 'indexed_attention', or a ``quantization_config``
    other than FP8 e4m3 with ``weight_block_size`` [128, 128].
    """
    d = dict(d)

    def bad(msg: str):
        raise ValueError(f"ModelConfig: {msg}")

    if d.get("model_type") == "deepseek_v32":
        d.setdefault("attention_type", "dsa")
    rp = d.get("rope_parameters")
    if isinstance(rp, dict):
        d.setdefault("rope_theta", rp.get("rope_theta", 10000.0))
        if rp.get("rope_type", "default") != "default" and "rope_scaling" not in d:
            d["rope_scaling"] = {k: v for k, v in rp.items() if k != "rope_theta"}
    if "num_mtp_layers" in d:
        mtp = d.pop("num_mtp_layers")
        if d.setdefault("num_nextn_predict_layers", mtp) != mtp:
            bad(f"num_mtp_layers={mtp} and num_nextn_predict_layers={d['num_nextn_predict_layers']} disagree")
    if d.get("model_type") == "deepseek_v32":
        types, n = d.pop("mlp_layer_types", None), d.get("num_hidden_layers")
        if types is not None:
            k = next((i for i, t in enumerate(types) if t != "dense"), len(types))
            if len(types) != n or any(t != "sparse" for t in types[k:]):
                bad(f"mlp_layer_types={types}; expected num_hidden_layers={n} entries, 'dense' ones first, "
                    "then 'sparse'")
            fk = d.get("first_k_dense_replace")
            if not isinstance(fk, int) or min(max(fk, 0), n) != k:
                d["first_k_dense_replace"] = k  # transformers' V3.2 follows mlp_layer_types
        layer_types = d.pop("layer_types", None)
        if layer_types is not None and set(layer_types) - {"indexed_attention"}:
            bad(f"layer_types={layer_types}; only 'indexed_attention' layers are supported")
    qc = d.pop("quantization_config", None)
    if qc is not None and any(qc.get(k) != v for k, v in FP8_QUANTIZATION.items()):
        bad(f"quantization_config={qc}; expected DeepSeek's FP8 layout {FP8_QUANTIZATION}")
    return d


@dataclass
class ModelConfig:
    """Hyper-parameters of a DeepSeek-V3 / V3.2 style causal LM (and its MHA/GQA/dense/softmax-MoE variants).

    Field names follow ``transformers.DeepseekV3Config``; see DeepSeek-V3 technical report
    (arXiv 2412.19437) section 2 for MLA (2.1.1), DeepSeekMoE (2.1.2) and MTP (2.2), and the
    DeepSeek-V3.2-Exp report for DSA. Sizes are counts (heads, experts) or widths (features).

    Raises:
        ValueError: from ``validate()`` (called by ``__post_init__``) when values are inconsistent; the
            message names the fields involved.
    """

    model_type: str = "deepseek_v3"
    attention_type: str = "mla"
    moe_type: str = "deepseek"
    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 512
    moe_intermediate_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None
    head_dim: int | None = None  # mha/mqa/gqa: per-head width, default hidden_size // num_attention_heads;
    # mla/dsa: always qk_rope_head_dim (the rotary width, as transformers sets it)
    # MLA
    q_lora_rank: int | None = None
    kv_lora_rank: int = 64
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    # DeepSeekMoE / standard MoE
    n_routed_experts: int = 8
    n_shared_experts: int = 1
    num_experts_per_tok: int = 2
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    first_k_dense_replace: int = 1
    aux_loss_alpha: float = 0.0  # weight of the sequence-wise (deepseek) or Switch (standard) balance loss
    seq_aux: bool = True
    bias_update_speed: float = 1e-3  # gamma of the auxiliary-loss-free bias update
    # Misc
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    rope_interleave: bool = True
    rms_norm_eps: float = 1e-6
    attention_bias: bool = False
    initializer_range: float = 0.02
    hidden_dropout: float = 0.0  # training only: dropout on each attention / FFN output before its residual add
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    pad_token_id: int | None = None
    # MTP
    num_nextn_predict_layers: int = 0
    # V3.2 DSA lightning indexer
    index_n_heads: int = 4
    index_head_dim: int = 32
    index_topk: int = 2048
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = {"mqa": 1}.get(self.attention_type, self.num_attention_heads)
        if self.attention_type in ("mla", "dsa"):
            self.head_dim = self.qk_rope_head_dim  # as transformers: the width its rotary embedding reads
        elif self.head_dim is None and self.num_attention_heads:
            self.head_dim = self.hidden_size // self.num_attention_heads
        self.validate()

    # ------------------------------------------------------------------ derived
    @property
    def qk_head_dim(self) -> int:
        """Query/key width per head for MLA: ``qk_nope_head_dim + qk_rope_head_dim``."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def rope_dim(self) -> int:
        """Width that RoPE rotates: ``qk_rope_head_dim`` for MLA/DSA, ``head_dim`` otherwise."""
        return self.qk_rope_head_dim if self.attention_type in ("mla", "dsa") else self.head_dim

    @property
    def uses_mla(self) -> bool:
        return self.attention_type in ("mla", "dsa")

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Layer ``layer_idx`` uses a MoE FFN (not the dense SwiGLU): ``layer_idx >= first_k_dense_replace``, as
        transformers reads it (``first_k_dense_replace >= num_hidden_layers``: every layer dense). MTP depth k is
        layer ``num_hidden_layers + k``."""
        return self.moe_type != "dense" and layer_idx >= self.first_k_dense_replace

    @property
    def has_moe_layers(self) -> bool:
        """Some decoder or MTP layer uses a MoE FFN (the routing fields are read only then)."""
        return self.is_moe_layer(self.num_hidden_layers + self.num_nextn_predict_layers - 1)

    def softmax_scale(self, head_dim: int) -> float:
        """Attention softmax scale ``head_dim**-0.5 * mscale**2`` (YaRN, DeepSeek-V3 ``mscale_all_dim``)."""
        scale = head_dim**-0.5
        rs = self.rope_scaling
        if rs and rs.get("mscale_all_dim"):
            factor = float(rs["factor"])
            if factor > 1:
                m = 0.1 * float(rs["mscale_all_dim"]) * math.log(factor) + 1.0
                scale *= m * m
        return scale

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Check consistency; raise ``ValueError`` naming the offending fields."""

        def bad(msg: str):
            raise ValueError(f"ModelConfig: {msg}")

        if self.attention_type not in ATTENTION_TYPES:
            bad(f"attention_type={self.attention_type!r}; expected one of {ATTENTION_TYPES}")
        if self.moe_type not in MOE_TYPES:
            bad(f"moe_type={self.moe_type!r}; expected one of {MOE_TYPES}")
        if self.model_type not in ("deepseek_v3", "deepseek_v32"):
            bad(f"model_type={self.model_type!r}; expected 'deepseek_v3' or 'deepseek_v32'")
        if (self.model_type == "deepseek_v32") != (self.attention_type == "dsa"):
            bad(f"model_type={self.model_type!r} with attention_type={self.attention_type!r}: "
                "'deepseek_v32' goes with 'dsa' and only with it")
        if not 0.0 <= self.hidden_dropout < 1.0:
            bad(f"hidden_dropout={self.hidden_dropout}; expected a probability in [0, 1)")
        if self.hidden_act != "silu":
            bad(f"hidden_act={self.hidden_act!r}; only 'silu' (SwiGLU) is supported")
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "max_position_embeddings", "intermediate_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                bad(f"{name}={getattr(self, name)!r}; expected a positive integer")
        h, kvh = self.num_attention_heads, self.num_key_value_heads
        if self.attention_type in ("mha", "mqa", "gqa"):
            if self.head_dim is None or self.head_dim < 2 or self.head_dim % 2:
                bad(f"head_dim={self.head_dim}; expected an even width >= 2 (RoPE rotates pairs)")
            if kvh < 1 or h % kvh:
                bad(f"num_attention_heads={h} is not divisible by num_key_value_heads={kvh}")
            if self.attention_type == "mha" and kvh != h:
                bad(f"attention_type='mha' needs num_key_value_heads == num_attention_heads ({kvh} != {h})")
            if self.attention_type == "mqa" and kvh != 1:
                bad(f"attention_type='mqa' needs num_key_value_heads == 1 (got {kvh})")
        else:
            for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
                if getattr(self, name) < 1:
                    bad(f"{name}={getattr(self, name)}; expected >= 1 for MLA")
            if self.qk_rope_head_dim % 2:
                bad(f"qk_rope_head_dim={self.qk_rope_head_dim}; expected an even width (RoPE pairs)")
            if self.q_lora_rank is not None and self.q_lora_rank < 1:
                bad(f"q_lora_rank={self.q_lora_rank}; expected null or >= 1")
        if self.attention_type == "dsa":
            if self.q_lora_rank is None:
                bad("attention_type='dsa' needs q_lora_rank set (the indexer queries read the q latent)")
            if self.index_head_dim < self.qk_rope_head_dim:
                bad(f"index_head_dim={self.index_head_dim} < qk_rope_head_dim={self.qk_rope_head_dim}")
            if self.index_n_heads < 1 or self.index_topk < 1:
                bad(f"index_n_heads={self.index_n_heads}, index_topk={self.index_topk}; expected >= 1")
        fk = self.first_k_dense_replace
        if not isinstance(fk, int) or isinstance(fk, bool):
            bad(f"first_k_dense_replace={fk!r}; expected an integer (layers from it on are MoE layers)")
        if not isinstance(self.num_nextn_predict_layers, int) or self.num_nextn_predict_layers < 0:
            bad(f"num_nextn_predict_layers={self.num_nextn_predict_layers!r}; expected an integer >= 0")
        if self.has_moe_layers:  # as transformers: routing fields of a model without MoE layers are never read
            e, g, tg, k = self.n_routed_experts, self.n_group, self.topk_group, self.num_experts_per_tok
            if e < 1 or k < 1 or k > e:
                bad(f"num_experts_per_tok={k} with n_routed_experts={e}; expected 1 <= k <= n_routed_experts")
            if self.moe_intermediate_size < 1:
                bad(f"moe_intermediate_size={self.moe_intermediate_size}; expected >= 1")
        if self.has_moe_layers and self.moe_type == "deepseek":
            if self.scoring_func != "sigmoid":
                bad(f"scoring_func={self.scoring_func!r}; DeepSeekMoE uses 'sigmoid'")
            if self.topk_method not in ("noaux_tc", "greedy", "group_limited_greedy"):
                bad(f"topk_method={self.topk_method!r}; expected 'noaux_tc'")
            if not isinstance(g, int) or g < 1 or e % g:
                bad(f"n_routed_experts={e} is not divisible by n_group={g} (n_routed_experts % n_group != 0)")
            if not isinstance(tg, int) or not 1 <= tg <= g:
                bad(f"topk_group={tg} must be in 1..n_group={g} (topk_group > n_group)")
            if g > 1 and e // g < 2:
                bad(f"n_routed_experts // n_group = {e // g}; group scores sum each group's top-2, need >= 2")
            if k > tg * (e // g):
                bad(f"num_experts_per_tok={k} exceeds the {tg * (e // g)} experts that topk_group={tg} "
                    f"groups of n_routed_experts/n_group={e // g} hold")
            if self.n_shared_experts < 0:
                bad(f"n_shared_experts={self.n_shared_experts}; expected >= 0")
        if self.rope_scaling is not None:
            rs = self.rope_scaling
            kind = rs.get("rope_type", rs.get("type"))
            if kind not in ("yarn", "default", None):
                bad(f"rope_scaling type {kind!r}; expected 'yarn'")
            unknown = set(rs) - _ROPE_SCALING_KEYS
            if unknown:
                bad(f"rope_scaling has unknown keys {sorted(unknown)}")
            if kind == "yarn" and ("factor" not in rs or "original_max_position_embeddings" not in rs):
                bad("rope_scaling of type 'yarn' needs 'factor' and 'original_max_position_embeddings'")

    # ------------------------------------------------------------------ I/O
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Build from a ``config.json`` dict, read as transformers reads it (`hf_to_fields`).

        Keys that other tools write (``architectures``, ``torch_dtype``, ...) are kept in ``extra`` and
        written back. Raises ``ValueError`` for a key that is neither a field nor a known pass-through key,
        or for inconsistent values.
        """
        d = hf_to_fields(d)
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        extra = {k: d.pop(k) for k in list(d) if k not in names}
        unknown = [k for k in extra if k not in _PASSTHROUGH_KEYS]
        if unknown:
            raise ValueError(f"ModelConfig: unknown config keys {sorted(unknown)}")
        return cls(**d, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        """The ``config.json`` dict: our fields plus what ``transformers`` and ``mlx_lm`` need to load it."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        out = dict(self.extra)
        out.pop("rope_parameters", None)
        out.update(d)
        arch = "DeepseekV32ForCausalLM" if self.model_type == "deepseek_v32" else "DeepseekV3ForCausalLM"
        out["architectures"] = [arch]
        out.setdefault("torch_dtype", "float32")
        if self.attention_type == "dsa":
            out.setdefault("indexer_rope_interleave", False)
        return out

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> ModelConfig:
        """Read ``config.json`` (a file, or a directory that holds one; `read_config_json`). Raises
        ``FileNotFoundError``, ``ValueError`` (bad JSON or values)."""
        return cls.from_dict(read_config_json(path))

    def save_json(self, path: str | os.PathLike) -> None:
        """Write ``config.json`` to ``path`` (a file path)."""
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")


def read_config_json(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON object of ``config.json`` (``path`` is the file, or a directory that holds one), unvalidated.
    Raises ``FileNotFoundError`` when absent, ``ValueError`` when it is not a JSON object."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config.json at {path!r}")
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return d
