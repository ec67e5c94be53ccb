"""The causal LM in MLX (mirrors `reference.model`): embedding, decoder layers (pre-norm attention + FFN),
final norm, LM head, and the Multi-Token Prediction modules (DeepSeek-V3 report section 2.2).

Public API (DESIGN.md): ``Model.from_pretrained(dir)``, ``model(input_ids) -> logits``, ``save_pretrained(dir)``,
plus ``loss`` and ``generate`` with the reference's signatures. Parameter names equal the reference's
``state_dict`` names (``model.layers.{i}.self_attn.kv_b_proj.weight``, ``mlp.experts.gate_proj`` stacked (E, I, H),
``mtp.{k}.eh_proj.weight``), so `runtime_mlx.checkpoint` maps the Hugging Face directory as the reference does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from reference.config import ModelConfig
from reference.model import check_sampling

from . import kernels
from .attention import Attention, padding_mask
from .cache import KVCache
from .dsa import DSA
from .mla import MLA
from .moe import DeepSeekMoE, MoE
from .rms_norm import RMSNorm
from .rope import RoPE
from .swiglu import MLP

IGNORE_INDEX = -100


class DecoderLayer(nn.Module):
    """Pre-norm block: ``h = x + attn(input_layernorm(x))``; ``h + mlp(post_attention_layernorm(h))``.
    Attention is `Attention` (mha/mqa/gqa), `MLA` or `DSA`; the FFN the dense `MLP` for the first
    ``first_k_dense_replace`` layers (or ``moe_type='dense'``), else `DeepSeekMoE` or the standard `MoE`.
    In training mode, ``config.hidden_dropout`` > 0 drops each sublayer output before its residual add."""

    def __init__(self, config: ModelConfig, layer_idx: int, rope: RoPE):
        super().__init__()
        c = config
        attn_cls = {"mla": MLA, "dsa": DSA}.get(c.attention_type, Attention)
        self.self_attn = attn_cls(c, layer_idx, rope)
        if c.is_moe_layer(layer_idx):
            self.mlp = DeepSeekMoE(c) if c.moe_type == "deepseek" else MoE(c)
        else:
            self.mlp = MLP(c.hidden_size, c.intermediate_size)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.dropout = nn.Dropout(c.hidden_dropout)  # identity in eval mode and at p = 0

    def __call__(self, x: mx.array, cache=None, offset: int = 0, stats: dict | None = None,
                 mask: mx.array | None = None) -> mx.array:
        """``x`` (B, T, hidden) -> (B, T, hidden); ``stats``: MoE loads and balance losses go there; ``mask`` a
        padded batch's (B, 1, T, S) boolean mask (`runtime_mlx.attention.padding_mask`) or None."""
        x = x + self.dropout(self.self_attn(self.input_layernorm(x), cache, offset, mask))
        h = self.post_attention_layernorm(x)
        return x + self.dropout(self.mlp(h) if isinstance(self.mlp, MLP) else self.mlp(h, stats))


class SharedHead(nn.Module):
    """The MTP module's output norm; the head matrix is the main model's ``lm_head`` (shared)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class MTPLayer(DecoderLayer):
    """MTP module k (report eq. 21-23): ``eh_proj([enorm(Emb(t_{i+k})); hnorm(h^{k-1}_i)])``, one decoder
    block, ``shared_head.norm`` and the shared LM head. Stored as layer ``num_hidden_layers + k - 1``."""

    def __init__(self, config: ModelConfig, layer_idx: int, rope: RoPE):
        super().__init__(config, layer_idx, rope)
        h = config.hidden_size
        self.enorm = RMSNorm(h, config.rms_norm_eps)
        self.hnorm = RMSNorm(h, config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * h, h, bias=False)
        self.shared_head = SharedHead(config)

    def combine(self, h_prev: mx.array, emb: mx.array) -> mx.array:
        """(B, T, H) previous-depth hidden and (B, T, H) embeddings of the tokens k ahead -> (B, T, H)."""
        return self.eh_proj(mx.concatenate([self.enorm(emb), self.hnorm(h_prev)], axis=-1))


class Backbone(nn.Module):
    """``embed_tokens``, ``layers``, ``norm``: Hugging Face's ``model.*``."""

    def __init__(self, config: ModelConfig, rope: RoPE):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = [DecoderLayer(config, i, rope) for i in range(config.num_hidden_layers)]
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


@dataclass
class LossOutput:
    """``loss = lm_loss + mtp_weight * mean(mtp_losses) + aux_loss`` (scalar arrays); ``n_tokens`` the valid
    main-model labels (a scalar int32 array, so no evaluation is forced); ``expert_loads`` one (E,) float32
    count per DeepSeekMoE layer, in `Model.moe_layers` order, for `Model.update_moe_bias`."""

    loss: mx.array
    lm_loss: mx.array
    mtp_losses: list[mx.array]
    aux_loss: mx.array
    n_tokens: mx.array
    expert_loads: list[mx.array]


def masked_cross_entropy(logits: mx.array, targets: mx.array) -> mx.array:
    """Mean cross-entropy over targets != -100 of given logits; 0 when none is valid (every gradient then exactly
    0). ``logits`` (..., V) float, ``targets`` (...) int; per-token losses from `runtime_mlx.kernels.cross_entropy`.
    `Model.lm_loss` computes the same from hidden states without forming the logits."""
    t = targets.reshape(-1)
    total = kernels.cross_entropy(logits.reshape(-1, logits.shape[-1]), t, ignore_index=IGNORE_INDEX).sum()
    return total / mx.maximum((t != IGNORE_INDEX).sum(), 1).astype(mx.float32)


class Model(nn.Module):
    """DeepSeek-V3 / V3.2 causal LM (and its MHA/GQA/dense/softmax-MoE variants) in MLX.

    ``model(input_ids)``: (B, T) integer ids -> (B, T, vocab_size) logits in the parameter dtype. Raises
    ``TypeError``/``ValueError`` on a non-integer, wrongly shaped or out-of-range ``input_ids`` and on a
    sequence longer than ``max_position_embeddings``. ``kernel_path`` says which op path runs: "metal" (Metal
    kernels through ``mx.fast.metal_kernel``) or "mlx" (pure MLX, e.g. Linux CPU or MLX's CUDA back end).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        c = config
        self.rope = RoPE(c.rope_dim, c.rope_theta, c.rope_scaling)
        self.model = Backbone(c, self.rope)
        if not c.tie_word_embeddings:
            self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        n = c.num_hidden_layers
        self.mtp = [MTPLayer(c, n + k, self.rope) for k in range(c.num_nextn_predict_layers)]
        self.init_weights()

    @property
    def kernel_path(self) -> str:
        """``"metal"`` when the hot ops run Metal kernels, else ``"mlx"`` (`runtime_mlx.kernels.metal_available`).
        An op whose kernel failed its one-time self-check runs pure MLX even on Metal (`runtime_mlx.kernels.fallbacks`
        names them; `runtime_mlx.kernels.kernel_path` gives each op's path)."""
        return "metal" if kernels.metal_available() else "mlx"

    # ---------------------------------------------------------------- weights
    def init_weights(self, std: float | None = None, seed: int | None = None) -> None:
        """Normal(0, std) for every matrix and embedding (std defaults to ``initializer_range``), zeros for
        biases and the routing correction bias, ones for norm gains (as the reference; the draws differ)."""
        std = self.config.initializer_range if std is None else std
        if seed is not None:
            mx.random.seed(seed)
        new = []
        for name, p in tree_flatten(self.parameters()):
            parts = name.split(".")
            if parts[-1] in ("bias", "e_score_correction_bias"):
                new.append((name, mx.zeros_like(p)))
            elif len(parts) > 1 and "norm" in parts[-2] and p.ndim == 1:
                new.append((name, mx.ones_like(p)))
            else:
                new.append((name, (mx.random.normal(p.shape) * std).astype(p.dtype)))
        self.update(tree_unflatten(new))

    def moe_layers(self) -> list[DeepSeekMoE | MoE]:
        """All MoE FFNs, main layers then MTP layers."""
        return [layer.mlp for layer in [*self.model.layers, *self.mtp] if isinstance(layer.mlp, (DeepSeekMoE, MoE))]

    def update_moe_bias(self, loads: list[mx.array], gamma: float | None = None) -> None:
        """Auxiliary-loss-free bias update of every DeepSeekMoE layer from ``loads`` (one (E,) count per
        DeepSeekMoE layer, `LossOutput.expert_loads`, summed over the micro-batches of the step). Training only,
        after the optimizer step. ``gamma`` defaults to ``config.bias_update_speed``. Raises ``ValueError`` when
        the number of loads does not match."""
        g = self.config.bias_update_speed if gamma is None else gamma
        layers = [m for m in self.moe_layers() if isinstance(m, DeepSeekMoE)]
        if len(loads) != len(layers):
            raise ValueError(f"update_moe_bias: {len(loads)} loads for {len(layers)} DeepSeekMoE layers")
        for m, load in zip(layers, loads, strict=True):
            m.update_bias(load, g)

    # ---------------------------------------------------------------- forward
    def _check_input_ids(self, input_ids, offset: int, values: bool = True) -> None:
        if not isinstance(input_ids, mx.array):
            raise TypeError(f"input_ids: expected an mx.array of shape (batch, seq), got {type(input_ids).__name__}")
        if not mx.issubdtype(input_ids.dtype, mx.integer):
            raise TypeError(f"input_ids: expected an integer dtype, got {input_ids.dtype}")
        if input_ids.ndim != 2 or input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids: expected shape (batch, seq) with batch, seq >= 1, got {input_ids.shape}")
        end = offset + input_ids.shape[1]
        if end > self.config.max_position_embeddings:
            raise ValueError(f"input_ids: sequence reaches position {end} (cache {offset} + {input_ids.shape[1]} new), "
                             f"longer than max_position_embeddings={self.config.max_position_embeddings}")
        if values:
            lo, hi = input_ids.min().item(), input_ids.max().item()
            if lo < 0 or hi >= self.config.vocab_size:
                raise ValueError(
                    f"input_ids: token ids must lie in [0, {self.config.vocab_size}), got range [{lo}, {hi}]")

    def head(self, h: mx.array) -> mx.array:
        """LM head: (..., hidden) -> (..., vocab) (the embedding matrix when ``tie_word_embeddings``)."""
        return self.model.embed_tokens.as_linear(h) if self.config.tie_word_embeddings else self.lm_head(h)

    def lm_loss(self, h: mx.array, targets: mx.array) -> mx.array:
        """Mean cross-entropy of the output head on ``h`` (B, T, hidden) against ``targets`` (B, T) int (-100
        ignored; 0 with gradient 0 when none is valid), as `reference.model.Model.lm_loss`: `masked_cross_entropy`
        of ``head(h)``, fused with the head and chunked (`runtime_mlx.kernels.linear_cross_entropy`), so training
        never holds the (B, T, vocab) logits."""
        weight = self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight
        t = targets.reshape(-1)
        total = kernels.linear_cross_entropy(h.reshape(-1, h.shape[-1]).astype(weight.dtype), weight, t,
                                             ignore_index=IGNORE_INDEX, reduction="sum")
        return total / mx.maximum((t != IGNORE_INDEX).sum(), 1).astype(mx.float32)

    @staticmethod
    def _check_attention_mask(attention_mask, input_ids: mx.array, offset: int) -> None:
        b, t = input_ids.shape
        if not isinstance(attention_mask, mx.array):
            raise ValueError(f"attention_mask: expected an mx.array of shape (batch, cache + new) = ({b}, "
                             f"{offset + t}), got {type(attention_mask).__name__}")
        if attention_mask.dtype != mx.bool_ and not mx.issubdtype(attention_mask.dtype, mx.integer):
            raise ValueError(f"attention_mask: expected a bool or integer dtype (1 = real token, 0 = padding), "
                             f"got {attention_mask.dtype}")
        if tuple(attention_mask.shape) != (b, offset + t):
            raise ValueError(f"attention_mask: expected shape (batch, cache + new) = ({b}, {offset} + {t}), got "
                             f"{tuple(attention_mask.shape)}")

    def hidden_states(self, input_ids: mx.array, cache: KVCache | None = None, attention_mask: mx.array | None = None,
                      stats: dict | None = None, check_values: bool = True) -> mx.array:
        """Final-normed hidden states (B, T, hidden). With a ``cache`` the tokens continue it. ``check_values``:
        check the id range (forces an evaluation of ``input_ids``; not possible inside ``mx.compile``).

        ``attention_mask``: None (no padding), or (B, S) bool or integer over the cached and the new tokens
        (S = ``cache.seq_len`` + T), 1/True = a real token, 0/False = padding, as
        `reference.model.Model.hidden_states`: no query attends to a padding key except a padding query to itself
        (`runtime_mlx.attention.padding_mask`), DSA's indexer selects among real keys only, positions are not
        shifted (RoPE is relative: real positions equal the unpadded sequence's up to rounding), outputs at padding
        positions are finite and meaningless. Raises ``ValueError`` for a mask that is not an ``mx.array``, has a
        float dtype or a shape other than (B, S).
        """
        offset = cache.seq_len if cache is not None else 0
        self._check_input_ids(input_ids, offset, check_values)
        mask = None
        if attention_mask is not None:
            self._check_attention_mask(attention_mask, input_ids, offset)
            mask = padding_mask(attention_mask, input_ids.shape[1], offset)
        x = self.model.embed_tokens(input_ids)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cache.layers[i] if cache is not None else None, offset, stats, mask)
        if cache is not None:
            cache.seq_len += input_ids.shape[1]
        return self.model.norm(x)

    def __call__(self, input_ids: mx.array, cache: KVCache | None = None,
                 attention_mask: mx.array | None = None) -> mx.array:
        """(B, T) token ids -> (B, T, vocab_size) logits. ``cache``: a `KVCache` from `new_cache` to continue;
        ``attention_mask``: (B, cache.seq_len + T) padding mask, 1 = real token, or None (see `hidden_states`)."""
        return self.head(self.hidden_states(input_ids, cache, attention_mask))

    def new_cache(self) -> KVCache:
        """An empty KV cache for this model's decoder layers."""
        return KVCache(self.config.num_hidden_layers)

    def loss(self, input_ids: mx.array, targets: mx.array, mtp_weight: float = 0.3,
             check_values: bool = True) -> LossOutput:
        """Next-token loss with MTP and balance losses, as `reference.model.Model.loss`.

        ``input_ids`` (B, T) int; ``targets`` (B, T) int, already shifted, -100 where ignored. MTP depth k at
        position t reads the embedding of ``input_ids[:, t+k]`` and predicts ``targets[:, t+k]``; each depth's
        cross-entropy is divided by its own count of valid targets; ``L_MTP = mtp_weight / D * sum_k L_k``.
        ``check_values=False`` skips the id range check (needed under ``mx.compile``). Raises ``ValueError``
        when ``targets`` does not match ``input_ids`` in shape.
        """
        if targets.shape != input_ids.shape:
            raise ValueError(f"targets: expected shape {input_ids.shape} like input_ids, got {targets.shape}")
        stats = {"loads": [], "aux": []}
        h = self.hidden_states(input_ids, stats=stats, check_values=check_values)
        lm_loss = self.lm_loss(h, targets)
        mtp_losses = []
        b, t = input_ids.shape
        for k, layer in enumerate(self.mtp, start=1):
            pad = mx.zeros((b, min(k, t)), dtype=input_ids.dtype)
            ahead = mx.concatenate([input_ids[:, k:], pad], axis=1)
            tgt = mx.concatenate([targets[:, k:], mx.full(pad.shape, IGNORE_INDEX, dtype=targets.dtype)], axis=1)
            h = layer(layer.combine(h, self.model.embed_tokens(ahead)), None, 0, stats)
            mtp_losses.append(self.lm_loss(layer.shared_head.norm(h), tgt))
        aux = sum(stats["aux"], mx.array(0.0))
        loss = lm_loss + aux
        if mtp_losses:
            loss = loss + mtp_weight * mx.stack(mtp_losses).mean()
        n_tokens = (targets != IGNORE_INDEX).sum()
        return LossOutput(loss, lm_loss, mtp_losses, aux, n_tokens, stats["loads"])

    # ---------------------------------------------------------------- generation
    def generate(self, input_ids: mx.array, max_new_tokens: int, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, stop_tokens=None,
                 use_cache: bool = True, generator: mx.array | None = None) -> mx.array:
        """Autoregressive sampling, as `reference.model.Model.generate`: (B, T) -> (B, T + n), n <=
        ``max_new_tokens``. ``temperature`` 0 is greedy; otherwise temperature, top-k and top-p (nucleus)
        filtering, sampled with the PRNG key ``generator`` (``mx.random.key``; split at every step) or MLX's
        global PRNG. A sequence that emits one of ``stop_tokens`` is finished and padded with ``pad_token_id``
        (or the first stop token). Raises ``ValueError`` on bad arguments."""
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens: expected >= 0, got {max_new_tokens}")
        check_sampling(temperature, top_k, top_p)
        stops = sorted(set(stop_tokens or []))
        fill = self.config.pad_token_id if self.config.pad_token_id is not None else (stops[0] if stops else 0)
        stop_arr = mx.array(stops or [-1])
        cache = self.new_cache() if use_cache else None
        seq, step_in = input_ids, input_ids
        done = mx.zeros((seq.shape[0],), dtype=mx.bool_)
        for _ in range(max_new_tokens):
            logits = self(step_in if use_cache else seq, cache)[:, -1].astype(mx.float32)
            key = None
            if generator is not None:
                generator, key = mx.random.split(generator)
            nxt = sample_next(logits, temperature, top_k, top_p, key)
            nxt = mx.where(done, mx.array(fill, dtype=nxt.dtype), nxt).astype(seq.dtype)
            seq = mx.concatenate([seq, nxt[:, None]], axis=1)
            step_in = nxt[:, None]
            if stops:
                done = done | (nxt[:, None] == stop_arr[None]).any(axis=1)
                if done.all().item():
                    break
            mx.eval(seq)
        return seq

    # ---------------------------------------------------------------- checkpoints
    @classmethod
    def for_config(cls, config) -> nn.Module:
        """A fresh model of ``config``: ``cls(config)``, or `runtime_mlx.v4_model.V4Model` for a DeepSeek-V4
        `reference.v4_config.V4Config` (as `reference.model.Model.for_config`)."""
        from reference.v4_config import V4Config

        if isinstance(config, V4Config):
            from .v4_model import V4Model

            return V4Model(config)
        return cls(config)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: mx.Dtype | None = None, device=None,
                        missing_mtp: str = "drop", keep_fp8: bool = False) -> Model:
        """Load a Hugging Face checkpoint directory (`runtime_mlx.checkpoint.load_model`) in float32, or in ``dtype``
        when given (whatever dtype the files store, as the reference). ``device`` is accepted for the reference's
        signature and ignored (MLX uses its default device). MTP depths that config.json asks for and the files lack are
        dropped (``missing_mtp="drop"``) or initialized fresh (``"init"``), with a warning naming them. ``keep_fp8``:
        an FP8 checkpoint's FP8 weights stay FP8 for inference (`runtime_mlx.checkpoint.keep_fp8_weights`). Raises
        ``FileNotFoundError`` or ``ValueError`` naming the problem. A ``deepseek_v4`` checkpoint gives a
        `runtime_mlx.v4_model.V4Model`."""
        from .checkpoint import load_model

        return load_model(cls, path, dtype=dtype, missing_mtp=missing_mtp, keep_fp8=keep_fp8)

    def save_pretrained(self, path: str | os.PathLike, tokenizer_file: str | os.PathLike | None = None) -> None:
        """Write ``config.json`` (its ``dtype`` and ``torch_dtype`` state the parameters' dtype),
        ``model.safetensors`` and (MTP) ``mtp.safetensors`` with Hugging Face names, plus ``tokenizer.json`` when
        given, atomically (`runtime_mlx.checkpoint.save_model`)."""
        from .checkpoint import save_model

        save_model(self, path, tokenizer_file=tokenizer_file)


def sample_next(logits: mx.array, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None, key: mx.array | None = None) -> mx.array:
    """Next token from (B, V) logits: argmax when ``temperature == 0``, else a draw from the temperature-scaled,
    top-k and top-p filtered distribution (`sampling_probs`). Returns (B,) int32. Raises ``ValueError`` for an
    option out of range (`reference.model.check_sampling`)."""
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(-1)
    return mx.random.categorical(_filtered_logits(logits, temperature, top_k, top_p), axis=-1, key=key)


def sampling_probs(logits: mx.array, temperature: float, top_k: int | None = None,
                   top_p: float | None = None) -> mx.array:
    """The distribution `sample_next` draws from, as `reference.model.sampling_probs`: ``softmax(logits /
    temperature)`` restricted to the ``top_k`` largest logits and then to the smallest set whose probability
    reaches ``top_p`` (nucleus, Holtzman et al. 2019), renormalized. ``logits`` (..., V) float -> (..., V)
    probabilities, exactly 0 outside the kept set (the target and draft distributions of speculative sampling,
    `runtime_mlx.speculative`). Raises ``ValueError`` for an option out of range and for ``temperature`` 0."""
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        raise ValueError("sampling_probs: temperature 0 is greedy (argmax); expected a temperature > 0")
    return mx.softmax(_filtered_logits(logits, temperature, top_k, top_p), axis=-1)


def _filtered_logits(logits: mx.array, temperature: float, top_k: int | None, top_p: float | None) -> mx.array:
    """(..., V) ``logits / temperature`` with -inf outside the top-k and the top-p sets (`sampling_probs`)."""
    logits = logits / temperature
    neg = mx.array(-float("inf"), dtype=logits.dtype)
    if top_k is not None and top_k < logits.shape[-1]:
        kth = mx.sort(logits, axis=-1)[..., -top_k][..., None]
        logits = mx.where(logits < kth, neg, logits)
    if top_p is not None and top_p < 1.0:
        order = mx.argsort(-logits, axis=-1)
        sorted_logits = mx.take_along_axis(logits, order, axis=-1)
        probs = mx.softmax(sorted_logits, axis=-1)
        drop = mx.cumsum(probs, axis=-1) - probs >= top_p
        sorted_logits = mx.where(drop, neg, sorted_logits)
        logits = mx.put_along_axis(mx.full(logits.shape, neg), order, sorted_logits, axis=-1)
    return logits
