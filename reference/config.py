"""Model configuration with the Hugging Face DeepSeek-V3 field names.

`ModelConfig` is read from and written to a checkpoint's ``config.json``. The DeepSeek-V3 fields keep
the names of ``transformers.DeepseekV3Config`` (and the official ``config.json`` of deepseek-ai/DeepSeek-V3);
V3.2 adds the lightning-indexer fields ``index_n_heads``, ``index_head_dim``, ``index_topk``. Two fields are
our own: ``attention_type`` (mha, mqa, gqa, mla, dsa) and ``moe_type`` (dense, standard, deepseek).

A ``config.json`` written by ``transformers`` or shipped by DeepSeek is read as ``transformers`` reads it
(`hf_to_fields`): values it accepts and reads in a defined way load the same way here; only what cannot be
built is refused, naming the field.

The dtype keys (``torch_dtype`` for transformers 4, ``dtype`` for transformers 5, which follows it when loading
with ``dtype="auto"``, its default) say how the weights next to the config are stored, not what the model is:
reading drops them, and the savers state the dtype they wrote (`ModelConfig.to_dict`, `ModelConfig.save_json`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from .fp8 import SCALE_FMTS

ATTENTION_TYPES = ("mha", "mqa", "gqa", "mla", "dsa")
MOE_TYPES = ("dense", "standard", "deepseek")
ROPE_TYPES = ("default", "linear", "llama3", "yarn")  # static frequency tables (reference.rope.rope_inv_freq)
_ROPE_SCALING_KEYS = {
    "type", "rope_type", "factor", "original_max_position_embeddings", "beta_fast", "beta_slow",
    "mscale", "mscale_all_dim", "attention_factor", "truncate", "rope_theta", "low_freq_factor", "high_freq_factor",
}
_ROPE_REQUIRED = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                                                     "original_max_position_embeddings"),
                  "yarn": ("factor", "original_max_position_embeddings")}
MLP_LAYER_TYPES = ("dense", "sparse")
# Keys other tools write into config.json that carry no meaning for the model math.
_PASSTHROUGH_KEYS = {
    "architectures", "transformers_version", "torch_dtype", "dtype", "auto_map", "use_cache",
    "pretraining_tp", "ep_size", "moe_layer_freq", "attention_dropout", "output_router_logits",
    "layer_types", "qk_head_dim", "mlp_bias",
    "indexer_rope_interleave", "rope_parameters", "aux_loss_alpha_is_seq",
}
FP8_QUANTIZATION = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
FP8_SCALE_FMTS = tuple(f for f in SCALE_FMTS if f)  # quantization_config "scale_fmt" values (absent: fp32 scales)


def hf_to_fields(d: dict[str, Any]) -> dict[str, Any]:
    """A ``config.json`` dict as ``transformers`` reads it -> a dict of `ModelConfig` field names (plus the
    pass-through keys), without validating the values. Returns a new dict; idempotent.

    - ``model_type`` 'deepseek_v32' implies ``attention_type`` 'dsa';
    - ``rope_parameters`` (transformers 5) gives ``rope_theta`` and, unless ``rope_scaling`` is set, its scaling;
    - ``num_mtp_layers`` (transformers' ``DeepseekV3Config`` alias) is ``num_nextn_predict_layers``;
    - V3.2's ``mlp_layer_types`` (a list of 'dense'/'sparse' per layer, which transformers' V3.2 model follows
      in place of ``first_k_dense_replace``) is kept: `ModelConfig.is_moe_layer` reads it. When it has the form
      dense... then sparse..., ``first_k_dense_replace`` is set to say the same. ``layer_types``
      ('indexed_attention') is checked and dropped: transformers rebuilds it. DeepSeek-V3's model never reads
      ``mlp_layer_types``, so for 'deepseek_v3' it is dropped;
    - V3.2's ``rope_interleave`` is read as True: transformers' ``DeepseekV32Attention`` always applies the
      interleaved RoPE (``apply_rotary_pos_emb_interleave``) and ignores the field;
    - ``quantization_config`` (DeepSeek's FP8: e4m3, 128x128 weight blocks, and from V3.1 on ``"scale_fmt":
      "ue8m0"``, power-of-two scales) is checked and dropped: the loaders dequantize the weights, so the model and
      what it saves are unquantized (`fp8_scale_fmt` reads it for the loaders that keep FP8 weights).

    Raises ``ValueError`` naming the field for a value that cannot be built: ``num_mtp_layers`` disagreeing
    with ``num_nextn_predict_layers``, ``layer_types`` other than 'indexed_attention', or a
    ``quantization_config`` other than FP8 e4m3 with ``weight_block_size`` [128, 128] and a ``scale_fmt`` absent
    or 'ue8m0' (``mlp_layer_types`` is checked by `ModelConfig.validate`).
    """
    d = dict(d)

    def bad(msg: str):
        raise ValueError(f"ModelConfig: {msg}")

    v32 = d.get("model_type") == "deepseek_v32"
    if v32:
        d.setdefault("attention_type", "dsa")
        if "rope_interleave" in d:
            d["rope_interleave"] = True  # transformers' V3.2 attention always interleaves
    rp = d.get("rope_parameters")
    if isinstance(rp, dict):
        d.setdefault("rope_theta", rp.get("rope_theta", 10000.0))
        if rp.get("rope_type", "default") != "default" and "rope_scaling" not in d:
            d["rope_scaling"] = {k: v for k, v in rp.items() if k != "rope_theta"}
    if "num_mtp_layers" in d:
        mtp = d.pop("num_mtp_layers")
        if d.setdefault("num_nextn_predict_layers", mtp) != mtp:
            bad(f"num_mtp_layers={mtp} and num_nextn_predict_layers={d['num_nextn_predict_layers']} disagree")
    types, n = d.get("mlp_layer_types"), d.get("num_hidden_layers")
    if not v32:
        d.pop("mlp_layer_types", None)  # transformers' DeepSeek-V3 never reads it
    elif isinstance(types, list) and len(types) == n and set(types) <= set(MLP_LAYER_TYPES):
        k = next((i for i, t in enumerate(types) if t != "dense"), len(types))
        fk = d.get("first_k_dense_replace")
        if all(t == "sparse" for t in types[k:]):  # dense then sparse: first_k_dense_replace says the same
            if not isinstance(fk, int) or min(max(fk, 0), n) != k:
                d["first_k_dense_replace"] = k
        elif not isinstance(fk, int):
            d["first_k_dense_replace"] = k  # read only by MTP layers, which transformers' V3.2 lacks
    if v32:
        layer_types = d.pop("layer_types", None)
        if layer_types is not None and set(layer_types) - {"indexed_attention"}:
            bad(f"layer_types={layer_types}; only 'indexed_attention' layers are supported")
    fp8_scale_fmt(d)  # checks quantization_config
    d.pop("quantization_config", None)
    return d


def fp8_quantization_config(scale_fmt: str | None = None) -> dict[str, Any]:
    """The ``quantization_config`` of a DeepSeek FP8 checkpoint (e4m3 weights in 128x128 blocks with float32
    ``weight_scale_inv``, activations quantized at run time per 1x128 tile), as DeepSeek-V3's ``config.json``
    states it, plus ``"scale_fmt": "ue8m0"`` (DeepSeek-V3.1's power-of-two scales) when asked. Raises
    ``ValueError`` for another ``scale_fmt``."""
    if scale_fmt is not None and scale_fmt not in FP8_SCALE_FMTS:
        raise ValueError(f"scale_fmt={scale_fmt!r}; expected None (float32 scales) or one of {FP8_SCALE_FMTS}")
    qc = {"activation_scheme": "dynamic", **FP8_QUANTIZATION}
    return qc if scale_fmt is None else {**qc, "scale_fmt": scale_fmt}


def fp8_scale_fmt(d: dict[str, Any]) -> str | None:
    """The scale format of the FP8 weights of a ``config.json`` dict ``d``: its ``quantization_config``'s
    ``scale_fmt`` ('ue8m0'), or None (no quantization_config, or one without ``scale_fmt``: scales are
    ``amax / 448`` in float32). Raises ``ValueError`` naming the field for a ``quantization_config`` that is not
    DeepSeek's FP8 layout (e4m3, ``weight_block_size`` [128, 128]) or a ``scale_fmt`` other than 'ue8m0'."""
    qc = d.get("quantization_config")
    if qc is None:
        return None
    if not isinstance(qc, dict) or any(qc.get(k) != v for k, v in FP8_QUANTIZATION.items()):
        raise ValueError(f"ModelConfig: quantization_config={qc}; expected DeepSeek's FP8 layout {FP8_QUANTIZATION}")
    fmt = qc.get("scale_fmt")
    if fmt is not None and fmt not in FP8_SCALE_FMTS:
        raise ValueError(f"ModelConfig: quantization_config scale_fmt={fmt!r}; expected one of {FP8_SCALE_FMTS} "
                         "(power-of-two scales, DeepSeek-V3.1) or no scale_fmt (float32 scales)")
    return fmt


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_ints(cfg, bad, ints: dict[str, int] | None = None) -> None:
    """``bad(...)`` for the first integer field that is null or not an integer (config.json ``"kv_lora_rank":
    null``), naming it and its lower bound. ``ints``: field -> bound; default: the fields every model of
    ``cfg.attention_type`` reads."""
    if ints is None:
        ints = {k: 1 for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads", "num_key_value_heads", "max_position_embeddings")}
        ints["num_nextn_predict_layers"] = 0
        if cfg.attention_type in ("mla", "dsa"):
            ints.update(kv_lora_rank=1, qk_nope_head_dim=1, qk_rope_head_dim=1, v_head_dim=1)
            if cfg.q_lora_rank is not None:
                ints["q_lora_rank"] = 1
        else:
            ints["head_dim"] = 2
        if cfg.attention_type == "dsa":
            ints.update(index_n_heads=1, index_head_dim=1, index_topk=1)
    for name, lo in ints.items():
        v = getattr(cfg, name)
        if not _is_int(v):
            bad(f"{name}={v!r}; expected an integer >= {lo}")


@dataclass
class ModelConfig:
    """Hyper-parameters of a DeepSeek-V3 / V3.2 style causal LM (and its MHA/GQA/dense/softmax-MoE variants).

    Field names follow ``transformers.DeepseekV3Config``; see DeepSeek-V3 technical report
    (arXiv 2412.19437) section 2 for MLA (2.1.1), DeepSeekMoE (2.1.2) and MTP (2.2), and the
    DeepSeek-V3.2-Exp report for DSA. Sizes are counts (heads, experts) or widths (features).

    ``hidden_act`` must be 'silu': transformers applies ``ACT2FN[hidden_act]`` inside the gated FFN, but every
    DeepSeek release uses SwiGLU and so do our kernels (the Triton and Metal swiglu ops fuse SiLU), so another
    activation is refused rather than run in the reference alone. ``mlp_layer_types`` (V3.2 only, as
    transformers' ``DeepseekV32Config``): 'dense' or 'sparse' per decoder layer, in place of
    ``first_k_dense_replace`` for those layers. ``rope_scaling`` types: ``ROPE_TYPES`` (static frequency tables);
    'dynamic' and 'longrope' change the frequencies with the sequence length and are refused.

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
    mlp_layer_types: list[str] | None = None  # V3.2: 'dense'/'sparse' per decoder layer (None: first_k_dense_replace)
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
        """Layer ``layer_idx`` uses a MoE FFN (not the dense SwiGLU): ``mlp_layer_types[layer_idx] == 'sparse'``
        for a decoder layer when the list is set (V3.2, as transformers' ``DeepseekV32DecoderLayer``), else
        ``layer_idx >= first_k_dense_replace``, as transformers reads it (``first_k_dense_replace >=
        num_hidden_layers``: every layer dense). MTP depth k is layer ``num_hidden_layers + k`` (read by
        ``first_k_dense_replace``)."""
        if self.moe_type == "dense":
            return False
        if self.mlp_layer_types is not None and layer_idx < len(self.mlp_layer_types):
            return self.mlp_layer_types[layer_idx] == "sparse"
        return layer_idx >= self.first_k_dense_replace

    @property
    def has_moe_layers(self) -> bool:
        """Some decoder or MTP layer uses a MoE FFN (the routing fields are read only then)."""
        return any(self.is_moe_layer(i) for i in range(self.num_hidden_layers + self.num_nextn_predict_layers))

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
        _check_ints(self, bad)
        if not 0.0 <= self.hidden_dropout < 1.0:
            bad(f"hidden_dropout={self.hidden_dropout}; expected a probability in [0, 1)")
        if self.hidden_act != "silu":
            bad(f"hidden_act={self.hidden_act!r}; expected 'silu' (the SwiGLU FFN of DeepSeek and of our kernels)")
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
            if not self.rope_interleave:
                bad("rope_interleave=False with attention_type='dsa'; V3.2's MLA always interleaves RoPE pairs "
                    "(transformers' DeepseekV32Attention ignores the field)")
            if self.q_lora_rank is None:
                bad("attention_type='dsa' needs q_lora_rank set (the indexer queries read the q latent)")
            if self.index_head_dim < self.qk_rope_head_dim:
                bad(f"index_head_dim={self.index_head_dim} < qk_rope_head_dim={self.qk_rope_head_dim}")
            if self.index_n_heads < 1 or self.index_topk < 1:
                bad(f"index_n_heads={self.index_n_heads}, index_topk={self.index_topk}; expected >= 1")
        fk = self.first_k_dense_replace
        if not isinstance(fk, int) or isinstance(fk, bool):
            bad(f"first_k_dense_replace={fk!r}; expected an integer (layers from it on are MoE layers)")
        types = self.mlp_layer_types
        if types is not None:
            if self.model_type != "deepseek_v32":
                bad(f"mlp_layer_types with model_type={self.model_type!r}; only 'deepseek_v32' reads it "
                    "(DeepSeek-V3 uses first_k_dense_replace)")
            if (not isinstance(types, list) or len(types) != self.num_hidden_layers
                    or any(t not in MLP_LAYER_TYPES for t in types)):
                bad(f"mlp_layer_types={types!r}; expected num_hidden_layers={self.num_hidden_layers} entries, "
                    f"each one of {MLP_LAYER_TYPES}")
        if not isinstance(self.num_nextn_predict_layers, int) or self.num_nextn_predict_layers < 0:
            bad(f"num_nextn_predict_layers={self.num_nextn_predict_layers!r}; expected an integer >= 0")
        if self.has_moe_layers:  # as transformers: routing fields of a model without MoE layers are never read
            _check_ints(self, bad, {"n_routed_experts": 1, "num_experts_per_tok": 1, "moe_intermediate_size": 1})
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
            if not _is_int(self.n_shared_experts) or self.n_shared_experts < 0:
                bad(f"n_shared_experts={self.n_shared_experts}; expected >= 0")
        if self.rope_scaling is not None:
            rs = self.rope_scaling
            kind = rs.get("rope_type", rs.get("type"))
            if kind not in (*ROPE_TYPES, None):
                bad(f"rope_scaling type {kind!r}; expected one of {ROPE_TYPES} (types whose frequencies change "
                    "with the sequence length, such as 'dynamic' and 'longrope', are not supported)")
            unknown = set(rs) - _ROPE_SCALING_KEYS
            if unknown:
                bad(f"rope_scaling has unknown keys {sorted(unknown)}")
            need = [k for k in _ROPE_REQUIRED.get(kind, ()) if k not in rs]
            if need:
                bad(f"rope_scaling of type {kind!r} needs {', '.join(repr(k) for k in need)}")

    # ------------------------------------------------------------------ I/O
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Build from a ``config.json`` dict, read as transformers reads it (`hf_to_fields`).

        Keys that other tools write (``architectures``, ``use_cache``, ...) are kept in ``extra`` and
        written back; ``dtype`` and ``torch_dtype`` (how the files were stored) are dropped. Raises
        ``ValueError`` for a key that is neither a field nor a known pass-through key, or for inconsistent values.
        """
        d = hf_to_fields(d)
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        d.pop("dtype", None), d.pop("torch_dtype", None)
        extra = {k: d.pop(k) for k in list(d) if k not in names}
        unknown = [k for k in extra if k not in _PASSTHROUGH_KEYS]
        if unknown:
            raise ValueError(f"ModelConfig: unknown config keys {sorted(unknown)}")
        return cls(**d, extra=extra)

    def to_dict(self, dtype: str | None = None) -> dict[str, Any]:
        """The ``config.json`` dict: our fields plus what ``transformers`` and ``mlx_lm`` need to load it.

        ``dtype``: how the weights saved next to it are stored ('float32', 'bfloat16', ...), written as both
        ``torch_dtype`` and ``dtype``; None: 'float32', the dtype a model built from this config has.
        ``mlp_layer_types`` is written when set."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        if d["mlp_layer_types"] is None:
            del d["mlp_layer_types"]
        out = dict(self.extra)
        out.pop("rope_parameters", None)
        out.update(d)
        arch = "DeepseekV32ForCausalLM" if self.model_type == "deepseek_v32" else "DeepseekV3ForCausalLM"
        out["architectures"] = [arch]
        out["torch_dtype"] = out["dtype"] = dtype or "float32"
        if self.attention_type == "dsa":
            out.setdefault("indexer_rope_interleave", False)
        return out

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> ModelConfig:
        """Read ``config.json`` (a file, or a directory that holds one; `read_config_json`). Raises
        ``FileNotFoundError``, ``ValueError`` (bad JSON or values)."""
        return cls.from_dict(read_config_json(path))

    def save_json(self, path: str | os.PathLike, dtype: str | None = None) -> None:
        """Write ``config.json`` to ``path`` (a file path); ``dtype``: the stored weights' dtype (`to_dict`)."""
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(dtype), f, indent=2, sort_keys=True)
            f.write("\n")


def config_from_dict(d: dict[str, Any]):
    """The config a ``config.json`` dict describes: `reference.v4_config.V4Config` for ``model_type``
    'deepseek_v4', else `ModelConfig` (V3, V3.2 and their variants). Raises ``ValueError`` as their ``from_dict``."""
    if d.get("model_type") == "deepseek_v4":
        from .v4_config import V4Config

        return V4Config.from_dict(d)
    return ModelConfig.from_dict(d)


def config_from_json(path: str | os.PathLike):
    """`config_from_dict` of the ``config.json`` at ``path`` (a file or a directory holding one)."""
    return config_from_dict(read_config_json(path))


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
