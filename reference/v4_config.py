"""DeepSeek-V4's configuration, with the field names of ``transformers``' ``DeepseekV4Config`` (``model_type``
``deepseek_v4``), read from and written to a checkpoint's ``config.json``.

Per layer, ``layer_types`` picks the attention (``sliding_attention``; ``compressed_sparse_attention``, CSA;
``heavily_compressed_attention``, HCA) and ``mlp_layer_types`` the router (``hash_moe``: the frozen ``tid2eid`` table;
``moe``: learned top-k). ``rope_parameters`` has two sets, ``main`` (sliding layers, ``rope_theta``) and
``compress`` (CSA/HCA layers and their compressors, ``compress_rope_theta``, optionally YaRN); both rotate the
trailing ``head_dim * partial_rotary_factor`` features. Legacy keys of DeepSeek's own ``config.json`` are folded in as
transformers folds them (``compress_ratios`` per layer 0/4/128, ``compress_rate_csa``/``compress_rate_hca``,
``num_hash_layers``, ``qk_rope_head_dim``). Source: DeepSeek-V4 technical report (2026-04-24) sections 2.1-2.3.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

from .config import read_config_json

LAYER_TYPES = ("sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention")
MLP_LAYER_TYPES = ("hash_moe", "moe")
SCORING_FUNCS = ("sqrtsoftplus", "sigmoid")
_RATIO_TO_TYPE = {0: "sliding_attention", 4: "compressed_sparse_attention", 128: "heavily_compressed_attention"}
_PASSTHROUGH_KEYS = {
    "architectures", "transformers_version", "torch_dtype", "dtype", "use_cache", "output_router_logits",
    "router_aux_loss_coef", "router_jitter_noise", "attention_dropout", "qk_rope_head_dim", "auto_map",
}


@dataclass
class V4Config:
    """Hyper-parameters of a DeepSeek-V4 causal LM (defaults: a tiny model; V4-Flash's values in the comments).

    Attention: ``num_attention_heads`` query heads over one shared key-value head of ``head_dim`` (512), queries
    through the ``q_lora_rank`` (1024) latent, ``sliding_window`` (128) keys, output through ``o_groups`` (8) groups of
    ``o_lora_rank`` (1024). Compression: ``compress_rates`` per layer type (CSA 4, HCA 128); the CSA indexer has
    ``index_n_heads`` (64) heads of ``index_head_dim`` (128) and keeps ``index_topk`` (512) entries. MoE:
    ``n_routed_experts`` (256) of width ``moe_intermediate_size`` (2048), ``num_experts_per_tok`` (6), one shared
    expert, ``scoring_func`` 'sqrtsoftplus', weights renormalized and times ``routed_scaling_factor`` (1.5), SwiGLU
    pre-activations clamped at ``swiglu_limit`` (10). mHC: ``hc_mult`` (4) streams, ``hc_sinkhorn_iters`` (20),
    ``hc_eps``. MTP: ``num_nextn_predict_layers`` blocks (sliding attention, routed MoE, as DeepSeek's ``MTPBlock``).
    ``bias_update_speed`` (ours): gamma of the auxiliary-loss-free bias update of the ``moe`` layers in training.

    Raises ``ValueError`` naming the field (from ``validate``) for inconsistent values.
    """

    model_type: str = "deepseek_v4"
    vocab_size: int = 4096
    hidden_size: int = 256
    moe_intermediate_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 1
    head_dim: int = 64
    q_lora_rank: int = 128
    partial_rotary_factor: float = 0.25
    num_experts_per_tok: int = 2
    n_routed_experts: int = 8
    n_shared_experts: int = 1
    scoring_func: str = "sqrtsoftplus"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.5
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    rope_parameters: dict | None = None
    layer_types: list[str] | None = None
    compress_rates: dict | None = None
    mlp_layer_types: list[str] | None = None
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    swiglu_limit: float = 10.0
    sliding_window: int = 64
    o_groups: int = 2
    o_lora_rank: int = 64
    index_n_heads: int = 4
    index_head_dim: int = 32
    index_topk: int = 16
    num_nextn_predict_layers: int = 0
    hidden_act: str = "silu"
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    pad_token_id: int | None = None
    bias_update_speed: float = 1e-3
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        n = self.num_hidden_layers
        for name in ("compress_rates", "rope_parameters"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), dict):
                raise ValueError(f"V4Config: {name}={getattr(self, name)!r}; expected a dict (or null)")
        if self.compress_rates is None:
            self.compress_rates = {"compressed_sparse_attention": 4, "heavily_compressed_attention": 128}
        if self.layer_types is None:  # transformers' default: 2 HCA, then CSA / HCA alternating
            self.layer_types = (["heavily_compressed_attention"] * min(n, 2)
                                + ["compressed_sparse_attention" if i % 2 else "heavily_compressed_attention"
                                   for i in range(max(n - 2, 0))])
        if self.mlp_layer_types is None:
            self.mlp_layer_types = ["hash_moe"] * min(n, 3) + ["moe"] * max(0, n - 3)
        rp = self.rope_parameters or {}
        if not (isinstance(rp.get("main"), dict) and isinstance(rp.get("compress"), dict)):
            scaling = {k: v for k, v in rp.items() if k not in ("main", "compress")}
            compress = {**scaling, "rope_theta": self.compress_rope_theta,
                        "partial_rotary_factor": self.partial_rotary_factor}
            compress.setdefault("rope_type", "default")
            if compress["rope_type"] == "yarn":
                compress.setdefault("attention_factor", 1.0)  # V4 does not scale cos/sin by YaRN's mscale
            self.rope_parameters = {"main": {"rope_type": "default", "rope_theta": self.rope_theta,
                                             "partial_rotary_factor": self.partial_rotary_factor},
                                    "compress": compress}
        else:
            self.rope_parameters = {"main": dict(rp["main"]), "compress": dict(rp["compress"])}
        self.validate()

    # ------------------------------------------------------------------ derived
    @property
    def rope_dim(self) -> int:
        """Features RoPE rotates at the end of each head: ``head_dim * partial_rotary_factor``."""
        return int(self.head_dim * self.partial_rotary_factor)

    def compress_rate(self, layer_idx: int) -> int:
        """Tokens per compressed entry of layer ``layer_idx`` (0 for a sliding-only layer or an MTP block)."""
        if layer_idx >= self.num_hidden_layers or self.layer_types[layer_idx] == "sliding_attention":
            return 0
        return self.compress_rates[self.layer_types[layer_idx]]

    def layer_type(self, layer_idx: int) -> str:
        """Attention type of layer ``layer_idx``; MTP blocks (``layer_idx >= num_hidden_layers``) are sliding."""
        return self.layer_types[layer_idx] if layer_idx < self.num_hidden_layers else "sliding_attention"

    def is_hash_layer(self, layer_idx: int) -> bool:
        """Layer ``layer_idx`` routes by ``tid2eid`` (MTP blocks never do)."""
        return layer_idx < self.num_hidden_layers and self.mlp_layer_types[layer_idx] == "hash_moe"

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Raise ``ValueError`` naming the fields for inconsistent values."""

        def bad(msg: str):
            raise ValueError(f"V4Config: {msg}")

        if self.model_type != "deepseek_v4":
            bad(f"model_type={self.model_type!r}; expected 'deepseek_v4'")
        for name in ("vocab_size", "hidden_size", "moe_intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "head_dim", "q_lora_rank", "num_experts_per_tok", "n_routed_experts", "max_position_embeddings",
                     "hc_mult", "hc_sinkhorn_iters", "sliding_window", "o_groups", "o_lora_rank", "index_n_heads",
                     "index_head_dim", "index_topk"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                bad(f"{name}={v!r}; expected an integer >= 1")
        n = self.num_hidden_layers
        for name, types, allowed in (("layer_types", self.layer_types, LAYER_TYPES),
                                     ("mlp_layer_types", self.mlp_layer_types, MLP_LAYER_TYPES)):
            if not isinstance(types, list) or len(types) != n or any(t not in allowed for t in types):
                bad(f"{name}={types!r}; expected num_hidden_layers={n} entries, each one of {allowed}")
        for t in ("compressed_sparse_attention", "heavily_compressed_attention"):
            r = (self.compress_rates or {}).get(t)
            if t in self.layer_types and (not isinstance(r, int) or r < 1):
                bad(f"compress_rates[{t!r}]={r!r}; expected an integer >= 1")
        if self.num_key_value_heads != 1:
            bad(f"num_key_value_heads={self.num_key_value_heads}; V4 attention has one shared key-value head")
        rd = self.head_dim * self.partial_rotary_factor
        if rd != int(rd) or int(rd) % 2 or not 0 < rd <= self.head_dim:
            bad(f"head_dim * partial_rotary_factor = {rd}; expected an even width in (0, head_dim]")
        if (self.num_attention_heads * self.head_dim) % self.o_groups:
            bad(f"num_attention_heads * head_dim = {self.num_attention_heads * self.head_dim} is not divisible by "
                f"o_groups={self.o_groups}")
        if self.num_experts_per_tok > self.n_routed_experts:
            bad(f"num_experts_per_tok={self.num_experts_per_tok} > n_routed_experts={self.n_routed_experts}")
        if self.n_shared_experts != 1:
            bad(f"n_shared_experts={self.n_shared_experts}; V4 (and transformers' DeepseekV4) has one shared expert")
        if self.scoring_func not in SCORING_FUNCS:
            bad(f"scoring_func={self.scoring_func!r}; expected one of {SCORING_FUNCS}")
        if not self.norm_topk_prob:
            bad("norm_topk_prob=False; DeepSeek-V4's router always renormalizes the selected weights")
        if self.hidden_act != "silu":
            bad(f"hidden_act={self.hidden_act!r}; expected 'silu' (SwiGLU)")
        if self.attention_bias or self.mlp_bias:
            bad("attention_bias / mlp_bias: DeepSeek-V4 has no biases")
        if not isinstance(self.num_nextn_predict_layers, int) or self.num_nextn_predict_layers < 0:
            bad(f"num_nextn_predict_layers={self.num_nextn_predict_layers!r}; expected an integer >= 0")
        for key in ("main", "compress"):
            kind = self.rope_parameters[key].get("rope_type", "default")
            if kind not in ("default", "yarn") or (key == "main" and kind != "default"):
                bad(f"rope_parameters[{key!r}] rope_type={kind!r}; expected 'default' (main) or 'default'/'yarn' "
                    "(compress)")
            if kind == "yarn":
                need = [k for k in ("factor", "original_max_position_embeddings") if k not in self.rope_parameters[key]]
                if need:
                    bad(f"rope_parameters['compress'] of type 'yarn' needs {need}")

    # ------------------------------------------------------------------ I/O
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> V4Config:
        """Build from a ``config.json`` dict as transformers reads it (legacy keys folded in, see the module
        docstring); pass-through keys kept in ``extra``. Raises ``ValueError`` for unknown keys or bad values."""
        d = dict(d)
        if d.get("model_type", "deepseek_v4") != "deepseek_v4":
            raise ValueError(f"V4Config: model_type={d.get('model_type')!r}; expected 'deepseek_v4'")
        if "quantization_config" in d:
            raise ValueError("V4Config: quantization_config: quantized (FP8/FP4) DeepSeek-V4 checkpoints are not "
                             "supported; dequantize the weights first")
        if not isinstance(d.get("compress_rates") or {}, dict):
            raise ValueError(f"V4Config: compress_rates={d['compress_rates']!r}; expected a dict of layer type -> rate")
        n = d.get("num_hidden_layers", cls.num_hidden_layers)
        ratios = d.pop("compress_ratios", None)
        rates = dict(d.get("compress_rates") or {"compressed_sparse_attention": 4, "heavily_compressed_attention": 128})
        for legacy, t in (("compress_rate_csa", "compressed_sparse_attention"),
                          ("compress_rate_hca", "heavily_compressed_attention")):
            if legacy in d:
                rates[t] = d.pop(legacy)
        d["compress_rates"] = rates
        if d.get("layer_types") is None and ratios is not None:
            try:
                d["layer_types"] = [_RATIO_TO_TYPE[r] for r in ratios[:n]]
            except KeyError as e:
                raise ValueError(f"V4Config: compress_ratios={ratios}; expected entries 0, 4 or 128") from e
        hash_layers = d.pop("num_hash_layers", None)
        if d.get("mlp_layer_types") is None and hash_layers is not None:
            d["mlp_layer_types"] = ["hash_moe"] * min(n, hash_layers) + ["moe"] * max(0, n - hash_layers)
        if d.get("partial_rotary_factor") is None:
            qk_rope = d.get("qk_rope_head_dim")
            d["partial_rotary_factor"] = qk_rope / d.get("head_dim", cls.head_dim) if qk_rope else 64 / 512
        for key in ("layer_types", "mlp_layer_types"):
            if isinstance(d.get(key), list):
                d[key] = list(d[key][:n])
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        extra = {k: d.pop(k) for k in list(d) if k not in names}
        unknown = sorted(k for k in extra if k not in _PASSTHROUGH_KEYS)
        if unknown:
            raise ValueError(f"V4Config: unknown config keys {unknown}")
        for k in ("dtype", "torch_dtype", "qk_rope_head_dim"):
            extra.pop(k, None)
        return cls(**d, extra=extra)

    def to_dict(self, dtype: str | None = None) -> dict[str, Any]:
        """The ``config.json`` dict (``transformers.DeepseekV4Config`` reads it unchanged); ``dtype`` the stored
        weights' dtype (default 'float32')."""
        out = dict(self.extra)
        out.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"})
        out["qk_rope_head_dim"] = self.rope_dim
        out["architectures"] = ["DeepseekV4ForCausalLM"]
        out["torch_dtype"] = out["dtype"] = dtype or "float32"
        return out

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> V4Config:
        """Read ``config.json`` (a file or a directory holding one)."""
        return cls.from_dict(read_config_json(path))

    def save_json(self, path: str | os.PathLike, dtype: str | None = None) -> None:
        """Write ``config.json`` to the file ``path``."""
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(dtype), f, indent=2, sort_keys=True)
            f.write("\n")
