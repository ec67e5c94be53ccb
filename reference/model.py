"""The causal LM: embedding, decoder layers (attention + FFN, pre-norm residual), final norm, LM head, and
the Multi-Token Prediction modules (DeepSeek-V3 report section 2.2).

Public API (DESIGN.md): ``Model.from_pretrained(dir)``, ``model(input_ids) -> logits``, ``save_pretrained(dir)``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention, padding_mask
from .cache import KVCache
from .config import ModelConfig
from .cross_entropy import linear_cross_entropy
from .dsa import DSA, topk_recall
from .mla import MLA
from .moe import DeepSeekMoE, MoE
from .rms_norm import RMSNorm, at_least_fp32
from .rope import RotaryEmbedding
from .swiglu import MLP

IGNORE_INDEX = -100


class DecoderLayer(nn.Module):
    """Pre-norm block: ``h = x + attn(input_layernorm(x))``; ``h + mlp(post_attention_layernorm(h))``.

    Attention is `Attention` (mha/mqa/gqa), `MLA` or `DSA`; the FFN is the dense `MLP` for the first
    ``first_k_dense_replace`` layers (or ``moe_type='dense'``), else `DeepSeekMoE` or the standard `MoE`.
    In training mode with ``config.hidden_dropout > 0``, each sublayer's output goes through dropout before its
    residual add (the residual dropout of Vaswani et al. 2017, section 5.4); eval mode is unaffected.
    """

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        c = config
        attn_cls = {"mla": MLA, "dsa": DSA}.get(c.attention_type, Attention)
        self.self_attn = attn_cls(c, layer_idx)
        if c.is_moe_layer(layer_idx):
            self.mlp = DeepSeekMoE(c) if c.moe_type == "deepseek" else MoE(c)
        else:
            self.mlp = MLP(c.hidden_size, c.intermediate_size)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.hidden_dropout = c.hidden_dropout

    def forward(self, x, cos, sin, cache=None, offset: int = 0, mask=None):
        """``x`` (B, T, hidden) -> (B, T, hidden); ``mask`` a padded batch's (B, 1, T, S) boolean mask
        (`reference.attention.padding_mask`) or None."""
        x = x + self.dropout(self.self_attn(self.input_layernorm(x), cos, sin, cache, offset, mask))
        return x + self.dropout(self.mlp(self.post_attention_layernorm(x)))

    def dropout(self, y: torch.Tensor) -> torch.Tensor:
        """Residual dropout of a sublayer output (identity in eval mode or at ``hidden_dropout`` 0)."""
        if self.training and self.hidden_dropout > 0:
            return F.dropout(y, self.hidden_dropout, training=True)
        return y


class SharedHead(nn.Module):
    """The MTP module's output norm; the head matrix itself is the main model's ``lm_head`` (shared)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class MTPLayer(DecoderLayer):
    """MTP module k (report eq. 21-23): ``h' = eh_proj([enorm(Emb(t_{i+k})); hnorm(h^{k-1}_i)])``, one
    decoder block, then ``shared_head.norm`` and the shared LM head predict ``t_{i+k+1}``. Stored in the
    checkpoint as layer ``num_hidden_layers + k - 1``. The concatenation order (embedding first) is that of
    the released DeepSeek-V3 MTP weights as served by vLLM/SGLang."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        h = config.hidden_size
        self.enorm = RMSNorm(h, config.rms_norm_eps)
        self.hnorm = RMSNorm(h, config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * h, h, bias=False)
        self.shared_head = SharedHead(config)

    def combine(self, h_prev: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """(B, T, H) previous-depth hidden and (B, T, H) embeddings of the tokens k ahead -> (B, T, H)."""
        return self.eh_proj(torch.cat((self.enorm(emb), self.hnorm(h_prev)), dim=-1))


class Backbone(nn.Module):
    """``embed_tokens``, ``layers``, ``norm``: named as Hugging Face's ``model.*``."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


@dataclass
class LossOutput:
    """``loss`` = ``lm_loss + mtp_weight * mean(mtp_losses) + aux_loss`` (all scalars) plus, when the indexers train
    (`set_indexer_training`), ``indexer_loss`` (or ``indexer_loss`` alone in the dense warm-up); ``n_tokens`` = valid
    main-model labels."""

    loss: torch.Tensor
    lm_loss: torch.Tensor
    mtp_losses: list[torch.Tensor]
    aux_loss: torch.Tensor
    n_tokens: int
    indexer_loss: torch.Tensor | None = None


INDEXER_MODES = ("dense", "sparse")


def indexer_layers(model: nn.Module) -> list[nn.Module]:
    """The attention layers with a lightning indexer (V3.2's DSA, V4's CSA): modules with ``indexer_training``."""
    return [m for m in model.modules() if hasattr(m, "indexer_training")]


def set_indexer_training(model: nn.Module, mode: str | None) -> None:
    """Train the lightning indexers by their KL loss (`reference.dsa.indexer_kl`; V3.2 report section 2.1): ``"dense"``
    is the warm-up (attention stays dense, the loss covers every visible key, the main model is frozen by the
    trainer), ``"sparse"`` the sparse stage (attention over the indexer's top-k, the loss over the selected keys,
    added to the LM loss; the indexer's inputs are detached, so the KL trains the indexer only and the LM loss never
    reaches it), None stops. Raises ``ValueError`` for another mode."""
    if mode not in (None, *INDEXER_MODES):
        raise ValueError(f"indexer training mode={mode!r}; expected None, 'dense' or 'sparse'")
    for m in indexer_layers(model):
        m.indexer_training, m.indexer_loss = mode, None


@torch.no_grad()
def indexer_recall(model: nn.Module, input_ids: torch.Tensor, k: int | None = None) -> list[float]:
    """Per indexer layer of the main model (MTP layers do not run in a forward), the indexer's top-``k`` recall of the
    dense attention's top-``k`` keys (`reference.dsa.topk_recall`) on ``input_ids`` (B, T): a forward in the dense
    warm-up mode, restored afterwards.
    ``k`` defaults to the layer's ``index_topk``. The measure of how well an indexer stands in for the attention."""
    layers = indexer_layers(model)
    before = [m.indexer_training for m in layers]
    set_indexer_training(model, "dense")
    for m in layers:
        m.indexer_record, m.indexer_observed = True, None
    try:
        model(input_ids)
        return [topk_recall(*m.indexer_observed, k or m.index_topk) for m in layers if m.indexer_observed is not None]
    finally:
        for m, mode in zip(layers, before, strict=True):
            m.indexer_training, m.indexer_record, m.indexer_loss, m.indexer_observed = mode, False, None, None


def add_indexer_loss(model: nn.Module, out: LossOutput) -> LossOutput:
    """``out`` with the indexers' losses of the forward just run (their sum over layers) in ``indexer_loss`` and in
    ``loss`` (which is the indexer loss alone in the dense warm-up); unchanged when no indexer trains."""
    layers = [m for m in indexer_layers(model) if m.indexer_training is not None and m.indexer_loss is not None]
    if not layers:
        return out
    total = torch.stack([m.indexer_loss for m in layers]).sum()
    for m in layers:
        m.indexer_loss = None
    out.indexer_loss = total
    out.loss = total if layers[0].indexer_training == "dense" else out.loss + total
    return out


def masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over targets != -100. ``logits`` (..., V) float, ``targets`` (...) int64.
    With no valid target it returns 0 (a graph-connected zero, so every gradient is exactly 0)."""
    total = F.cross_entropy(at_least_fp32(logits.reshape(-1, logits.shape[-1])), targets.reshape(-1),
                            ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (targets != IGNORE_INDEX).sum().clamp(min=1)


@torch.compiler.disable  # a host read: a silent graph break under torch.compile, not a traced .item()
def count_valid(targets: torch.Tensor) -> int:
    """Number of targets != -100 (``IGNORE_INDEX``), as a Python int."""
    return int((targets != IGNORE_INDEX).sum())


class Model(nn.Module):
    """DeepSeek-V3 / V3.2 causal LM (and its MHA/GQA/dense/softmax-MoE variants) in plain PyTorch.

    ``forward(input_ids)``: (B, T) integer token ids -> (B, T, vocab_size) logits in the parameter dtype.
    Raises ``TypeError``/``ValueError`` on a non-integer, wrongly shaped or out-of-range ``input_ids`` and on a
    sequence longer than ``max_position_embeddings``.
    """

    v4_class: type | None = None
    """This runtime's DeepSeek-V4 model (`reference.v4_model.V4Model` unless a runtime sets its own): what
    `for_config` builds and `from_pretrained` loads for a ``deepseek_v4`` config."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        n = config.num_hidden_layers
        self.mtp = nn.ModuleList(MTPLayer(config, n + k) for k in range(config.num_nextn_predict_layers))
        self.rotary = RotaryEmbedding(config.rope_dim, config.rope_theta, config.rope_scaling)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.init_weights()

    @classmethod
    def for_config(cls, config) -> nn.Module:
        """A fresh model of ``config``: ``cls(config)`` for a `ModelConfig`, this runtime's `v4_class` for a
        `reference.v4_config.V4Config`."""
        from .v4_config import V4Config

        return cls.v4_class(config) if isinstance(config, V4Config) else cls(config)

    # ---------------------------------------------------------------- weights
    @torch.no_grad()
    def init_weights(self, std: float | None = None) -> None:
        """Normal(0, std) for every matrix and embedding (std defaults to ``initializer_range``), zeros for
        biases and the routing correction bias, ones for norm gains."""
        std = self.config.initializer_range if std is None else std
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif "norm" in name.rsplit(".", 2)[-2] and p.ndim == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, std)
        for name, b in self.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.zero_()

    def moe_layers(self) -> list[DeepSeekMoE | MoE]:
        """All MoE FFNs, main layers then MTP layers."""
        return [m for m in self.modules() if isinstance(m, (DeepSeekMoE, MoE))]

    @torch.no_grad()
    def update_moe_bias(self, gamma: float | None = None) -> None:
        """Apply the auxiliary-loss-free bias update to every DeepSeekMoE layer (training only; call after the
        optimizer step). ``gamma`` defaults to ``config.bias_update_speed``."""
        g = self.config.bias_update_speed if gamma is None else gamma
        for m in self.moe_layers():
            if isinstance(m, DeepSeekMoE):
                m.update_bias(g)

    # ---------------------------------------------------------------- forward
    @torch.compiler.disable  # host-side validation (reads min/max): a silent graph break, not a traced .item()
    def _check_input_ids(self, input_ids: torch.Tensor, offset: int) -> None:
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(
                f"input_ids: expected a torch.Tensor of shape (batch, seq), got {type(input_ids).__name__}")
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
            raise TypeError(f"input_ids: expected an integer dtype (torch.long), got {input_ids.dtype}")
        if input_ids.ndim != 2 or input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
            raise ValueError(
                f"input_ids: expected shape (batch, seq) with batch, seq >= 1, got {tuple(input_ids.shape)}")
        end = offset + input_ids.shape[1]
        if end > self.config.max_position_embeddings:
            raise ValueError(f"input_ids: sequence reaches position {end} (cache {offset} + {input_ids.shape[1]} new), "
                             f"longer than max_position_embeddings={self.config.max_position_embeddings}")
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= self.config.vocab_size:
            raise ValueError(f"input_ids: token ids must lie in [0, {self.config.vocab_size}), got range [{lo}, {hi}]")

    @staticmethod
    def _check_attention_mask(attention_mask, input_ids: torch.Tensor, offset: int) -> None:
        b, t = input_ids.shape
        if not isinstance(attention_mask, torch.Tensor):
            raise ValueError(f"attention_mask: expected a torch.Tensor of shape (batch, cache + new) = ({b}, "
                             f"{offset + t}), got {type(attention_mask).__name__}")
        if attention_mask.dtype.is_floating_point or attention_mask.dtype.is_complex:
            raise ValueError(f"attention_mask: expected a bool or integer dtype (1 = real token, 0 = padding), "
                             f"got {attention_mask.dtype}")
        if tuple(attention_mask.shape) != (b, offset + t):
            raise ValueError(f"attention_mask: expected shape (batch, cache + new) = ({b}, {offset} + {t}), got "
                             f"{tuple(attention_mask.shape)}")

    def hidden_states(self, input_ids: torch.Tensor, cache: KVCache | None = None,
                      attention_mask: torch.Tensor | None = None, positions: torch.Tensor | None = None
                      ) -> torch.Tensor:
        """Final-normed hidden states (B, T, hidden_size). With a ``cache`` the tokens continue it.

        ``attention_mask``: None (no padding), or (B, S) bool or integer over the cached and the new tokens
        (S = ``cache.seq_len`` + T, transformers' ``attention_mask`` with a cache), 1/True = a real token,
        0/False = padding (a left-padded batch of prompts, decoded together). No query attends to a padding key
        except a padding query to itself (`reference.attention.padding_mask`), and DSA's indexer selects among
        real keys only. Positions are not shifted: token ``j`` sits at position ``j`` whatever the padding; RoPE
        is relative, so every real position's output equals that of the unpadded sequence (up to float rounding
        of the rotation angles); outputs at padding positions are finite and meaningless. Raises ``ValueError``
        for a padded batch's mask that is not a tensor, has a float dtype or a shape other than (B, S).

        ``positions`` (context parallelism, `dsfs.parallel.cp`): (T',) int64 positions of the sequence ``input_ids``
        (B, T) this process computes; returns (B, T', hidden_size), each query attending causally to every position
        before it: the attention layers must supply the other positions' keys (`dsfs.parallel.cp` gathers them from
        the other processes; a plain layer holds only the T' given and fails). No cache or padding mask here.
        """
        if positions is not None:
            return self._hidden_states_at(input_ids, positions)
        offset = cache.seq_len if cache is not None else 0
        self._check_input_ids(input_ids, offset)
        mask = None
        if attention_mask is not None:
            self._check_attention_mask(attention_mask, input_ids, offset)
            mask = padding_mask(attention_mask.to(input_ids.device), input_ids.shape[1], offset)
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rotary(input_ids.shape[1], offset, x.device, x.dtype)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, cache.layers[i] if cache is not None else None, offset, mask)
        if cache is not None:
            cache.seq_len += input_ids.shape[1]
        return self.model.norm(x)

    def _hidden_states_at(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        self._check_input_ids(input_ids, 0)
        t = input_ids.shape[1]
        x = self.model.embed_tokens(input_ids[:, positions])
        cos, sin = self.rotary(t, 0, x.device, x.dtype)
        cos, sin = cos[positions], sin[positions]
        mask = positions[:, None] >= torch.arange(t, device=positions.device)[None, :]  # (T', T) causal by position
        for layer in self.model.layers:
            x = layer(x, cos, sin, None, 0, mask)
        return self.model.norm(x)

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) token ids -> (B, T, vocab_size) logits. ``cache``: a `KVCache` from `new_cache` to continue;
        ``attention_mask``: (B, cache.seq_len + T) padding mask, 1 = real token, or None (see `hidden_states`)."""
        return self.lm_head(self.hidden_states(input_ids, cache, attention_mask))

    def new_cache(self) -> KVCache:
        """An empty KV cache for this model's decoder layers."""
        return KVCache(self.config.num_hidden_layers)

    def loss(self, input_ids: torch.Tensor, targets: torch.Tensor, mtp_weight: float = 0.3,
             positions: torch.Tensor | None = None) -> LossOutput:
        """Next-token loss with MTP and balance losses.

        ``input_ids`` (B, T) int; ``targets`` (B, T) int64, ``targets[:, t]`` the token after position t
        (already shifted), -100 where ignored. MTP depth k at position t reads the embedding of
        ``input_ids[:, t+k]`` and predicts ``targets[:, t+k]``; depth 1 starts from the main model's final-normed
        hidden state (as vLLM and SGLang feed the released MTP weights), depth k > 1 from depth k-1's block;
        each depth's cross-entropy is divided by its own
        count of valid targets, and ``L_MTP = mtp_weight / D * sum_k L_k`` (report eq. 24-25). Raises
        ``ValueError`` when ``targets`` does not match ``input_ids`` in shape.

        ``positions`` (context parallelism, `dsfs.parallel.cp`; see `hidden_states`): compute only the tokens at
        these (T',) positions of the (B, T) sequences; each loss is then this slice's share of the whole sequences'
        loss (its sum over the valid targets at ``positions`` divided by the count of all valid targets), so the
        shares of slices that cover the sequences add up to the loss without ``positions``. The sequence-wise
        balance loss needs whole sequences: ``ValueError`` with ``aux_loss_alpha > 0``.
        """
        if targets.shape != input_ids.shape:
            raise ValueError(
                f"targets: expected shape {tuple(input_ids.shape)} like input_ids, got {tuple(targets.shape)}")
        if positions is not None and self.config.aux_loss_alpha > 0:
            raise ValueError("positions: the sequence-wise balance loss (aux_loss_alpha > 0) needs whole sequences")
        h = self.hidden_states(input_ids, positions=positions)
        at = (lambda y: y) if positions is None else (lambda y: y[:, positions])
        lm_loss = self.lm_loss(h, at(targets), count_of=None if positions is None else targets)
        mtp_losses = []
        b, t = input_ids.shape
        cos, sin = self.rotary(t, 0, h.device, h.dtype)
        mask = None
        if positions is not None:
            cos, sin = cos[positions], sin[positions]
            mask = positions[:, None] >= torch.arange(t, device=positions.device)[None, :]
        for k, layer in enumerate(self.mtp, start=1):
            pad = input_ids.new_zeros(b, min(k, t))
            ahead = torch.cat((input_ids[:, k:], pad), dim=1)
            tgt = torch.cat((targets[:, k:], torch.full_like(pad, IGNORE_INDEX)), dim=1)
            h = layer(layer.combine(h, self.model.embed_tokens(at(ahead))), cos, sin, None, 0, mask)
            mtp_losses.append(self.lm_loss(layer.shared_head.norm(h), at(tgt),
                                           count_of=None if positions is None else tgt))
        aux = sum((m.aux_loss for m in self.moe_layers() if m.aux_loss is not None), h.new_zeros(()))
        loss = lm_loss + aux
        if mtp_losses:
            loss = loss + mtp_weight * torch.stack(mtp_losses).mean()
        return add_indexer_loss(self, LossOutput(loss, lm_loss, mtp_losses, aux, count_valid(at(targets))))

    cross_entropy = staticmethod(linear_cross_entropy)
    """The fused head + cross-entropy `lm_loss` calls (a runtime overrides it with its kernel)."""

    def lm_loss(self, h: torch.Tensor, targets: torch.Tensor, count_of: torch.Tensor | None = None) -> torch.Tensor:
        """Mean cross-entropy of the output head on ``h`` (B, T, hidden) against ``targets`` (B, T) int64
        (-100 ignored; 0 with gradient 0 when none is valid): `masked_cross_entropy` of ``lm_head(h)``, fused
        with the head and chunked (`reference.cross_entropy.linear_cross_entropy`), so training never holds
        the (B, T, vocab) logits. Under autocast the head's operands are rounded to the autocast dtype, as
        ``lm_head``'s would be; the reference then multiplies them and takes the softmax in float32 (``forward``
        returns the autocast dtype's logits). ``count_of``: divide by the valid targets of these targets instead
        (a slice's share of a whole sequence's loss: `loss` with ``positions``)."""
        flat, weight = h.reshape(-1, h.shape[-1]), self.lm_head.weight
        if torch.is_autocast_enabled(h.device.type):
            dtype = torch.get_autocast_dtype(h.device.type)
            flat, weight = flat.to(dtype), weight.to(dtype)
        total = self.cross_entropy(flat.contiguous(), weight, targets.reshape(-1).contiguous(),
                                   ignore_index=IGNORE_INDEX, reduction="sum")
        counted = targets if count_of is None else count_of
        return total / (counted != IGNORE_INDEX).sum().clamp(min=1)

    # ---------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, stop_tokens=None,
                 use_cache: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
        """Autoregressive sampling. ``input_ids`` (B, T) -> (B, T + n) with n <= ``max_new_tokens``.

        ``temperature`` 0 is greedy; otherwise logits / temperature, then keep the ``top_k`` largest and the
        smallest set whose probability reaches ``top_p`` (nucleus, Holtzman et al. 2019), and sample with
        ``generator``. A sequence that emits one of ``stop_tokens`` is finished; later positions are filled
        with ``pad_token_id`` (or the stop token). Generation ends when all are finished. With ``use_cache``
        each step feeds one token through the KV cache; without, it reruns the whole prefix. Raises ``ValueError``
        for bad options (`check_sampling`) and for non-finite logits (broken weights: argmax of NaN is a token).
        """
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens: expected >= 0, got {max_new_tokens}")
        check_sampling(temperature, top_k, top_p)
        stops = torch.tensor(sorted(set(stop_tokens or [])), dtype=torch.long, device=input_ids.device)
        fill = self.config.pad_token_id if self.config.pad_token_id is not None else (
            int(stops[0]) if stops.numel() else 0)
        cache = self.new_cache() if use_cache else None
        seq, step_in = input_ids, input_ids
        done = torch.zeros(seq.shape[0], dtype=torch.bool, device=seq.device)
        for _ in range(max_new_tokens):
            logits = self(step_in if use_cache else seq, cache)[:, -1].float()
            if not bool(torch.isfinite(logits).all()):
                raise ValueError(f"generate: non-finite logits for the token at position {seq.shape[1]}")
            nxt = sample_next(logits, temperature, top_k, top_p, generator).masked_fill(done, fill)
            seq = torch.cat((seq, nxt[:, None]), dim=1)
            step_in = nxt[:, None]
            if stops.numel():
                done |= torch.isin(nxt, stops)
                if bool(done.all()):
                    break
        return seq

    # ---------------------------------------------------------------- checkpoints
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device=None, dtype: torch.dtype | None = None,
                        missing_mtp: str = "drop", keep_fp8: bool = False, ops=None) -> Model:
        """Load a Hugging Face checkpoint directory (``config.json`` + ``*.safetensors``) in float32, or in ``dtype``
        when given, whatever dtype the files store; see `reference.checkpoint.load_model`. MTP depths that config.json
        asks for and the files lack (as in every checkpoint ``transformers`` saves) are dropped (``missing_mtp="drop"``)
        or initialized fresh (``"init"``), with a warning naming them. ``keep_fp8``: an FP8 checkpoint's FP8 weights
        stay FP8 for inference (`reference.fp8_checkpoint`), run by ``ops`` (default: the class's ``fp8_ops``, else
        `reference.fp8`). Raises ``FileNotFoundError`` or ``ValueError`` naming the problem."""
        from .checkpoint import load_model

        return load_model(cls, path, device=device, dtype=dtype, missing_mtp=missing_mtp, keep_fp8=keep_fp8, ops=ops)

    def save_pretrained(self, path: str | os.PathLike, tokenizer_file: str | os.PathLike | None = None) -> None:
        """Write ``config.json`` (its ``dtype`` and ``torch_dtype`` state the parameters' dtype) and
        ``model.safetensors`` (Hugging Face names, MTP as layers ``num_hidden_layers + k``), plus ``tokenizer.json``
        when given, atomically (temp dir, then rename)."""
        from .checkpoint import save_model

        save_model(self, path, tokenizer_file=tokenizer_file)


def check_sampling(temperature: float, top_k: int | None = None, top_p: float | None = None) -> None:
    """Raise ``ValueError`` naming the option unless ``temperature`` is a finite number >= 0, ``top_k`` None or an
    integer >= 1, ``top_p`` None or in (0, 1] (NaN and inf fail, instead of reaching ``torch.multinomial``)."""
    if not (isinstance(temperature, int | float) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"sampling: temperature={temperature}; expected a finite number >= 0 (0: greedy)")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"sampling: top_k={top_k}; expected None or an integer >= 1")
    if top_p is not None and not (isinstance(top_p, int | float) and 0 < top_p <= 1):
        raise ValueError(f"sampling: top_p={top_p}; expected None or a number in (0, 1]")


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick the next token from (B, V) logits: argmax when ``temperature == 0``, else sample from the
    temperature-scaled, top-k and top-p filtered distribution. Returns (B,) int64. Raises ``ValueError`` for an
    option out of range (`check_sampling`)."""
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(-1)
    return torch.multinomial(sampling_probs(logits, temperature, top_k, top_p), 1, generator=generator).squeeze(-1)


def sampling_probs(logits: torch.Tensor, temperature: float, top_k: int | None = None,
                   top_p: float | None = None) -> torch.Tensor:
    """The distribution `sample_next` draws from: ``softmax(logits / temperature)`` restricted to the ``top_k``
    largest logits and then to the smallest set whose probability reaches ``top_p`` (nucleus, Holtzman et al.
    2019), renormalized. ``logits`` (..., V) float -> (..., V) probabilities, exactly 0 outside the kept set (the
    target and draft distributions of speculative sampling, `reference.speculative`). Raises ``ValueError`` for an
    option out of range (`check_sampling`) and for ``temperature`` 0 (greedy: no distribution)."""
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        raise ValueError("sampling_probs: temperature 0 is greedy (argmax); expected a temperature > 0")
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # drop a token once the mass before it reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits.softmax(-1)
