"""DeepSeek-V4 causal LM in plain PyTorch (V4 technical report, 2026-04-24): mHC residual streams around every block,
the hybrid attention (sliding window; CSA; HCA) and the V4 MoE, an MTP block as DeepSeek's inference code has it.

Layer by layer (as ``transformers``' ``DeepseekV4ForCausalLM``, which in float32 follows DeepSeek's inference code):
the embedding is copied onto ``hc_mult`` streams (B, S, N, D); each decoder layer mixes them into the attention's
input with `reference.mhc.HyperConnection` (``attn_hc``), expands the output back (`reference.mhc.mhc_post`), and does
the same around the FFN (``ffn_hc``); `reference.mhc.HyperHead` collapses the streams before the final norm and the
head. Public API as `reference.model.Model`: ``V4Model.from_pretrained(dir)``, ``model(input_ids)`` -> logits,
``loss``, ``generate``, ``new_cache``, ``save_pretrained``.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from .cache import KVCache
from .compressor import Compressor, CompressorState, Indexer, visible_entries
from .cross_entropy import linear_cross_entropy
from .dsa import indexer_kl
from .mhc import HyperConnection, HyperHead, _unweighted_rms_norm, mhc_post
from .model import IGNORE_INDEX, LossOutput, Model, add_indexer_loss, count_valid
from .rms_norm import RMSNorm
from .rope import apply_rope, rope_inv_freq
from .sink_attention import sink_attention, sink_attention_probs, window_indices
from .v4_config import V4Config
from .v4_moe import V4MoE


class TailRope(nn.Module):
    """Interleaved RoPE on the trailing ``dim`` features (V4's partial RoPE, head layout ``[nope | rope]``), at any
    absolute positions. ``theta`` and ``rope_scaling`` (YaRN) as `reference.rope.rope_inv_freq`; V4 sets YaRN's
    ``attention_factor`` to 1, so cos/sin are not scaled."""

    def __init__(self, dim: int, params: dict):
        super().__init__()
        scaling = params if params.get("rope_type", "default") != "default" else None
        inv_freq, self.amplitude = rope_inv_freq(dim, float(params["rope_theta"]), scaling)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.dim = dim

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(P, dim/2) float32 cos and sin at ``positions`` (P,) int."""
        ang = positions.to(torch.float32)[:, None] * self.inv_freq.to(positions.device)
        return ang.cos() * self.amplitude, ang.sin() * self.amplitude

    def forward(self, x: torch.Tensor, positions: torch.Tensor, heads: bool = False, inverse: bool = False):
        """Rotate ``x`` (B, P, dim_x) (or (B, P, H, dim_x) with ``heads``) at ``positions`` (P,); ``inverse`` rotates
        by minus the angle (V4's de-rotation of the attention output)."""
        cos, sin = self.cos_sin(positions)
        if inverse:
            sin = -sin
        if heads:
            cos, sin = cos[:, None], sin[:, None]
        rot = apply_rope(x[..., -self.dim:].float(), cos, sin, interleaved=True).to(x.dtype)
        return torch.cat((x[..., :-self.dim], rot), dim=-1)


class V4LayerCache:
    """One layer's cache: ``window`` (B, <= sliding_window - 1, D), the last key-value rows; ``states`` per compressor
    ('compressor', and 'indexer' on CSA layers): `reference.compressor.CompressorState`."""

    def __init__(self):
        self.window: torch.Tensor | None = None
        self.states: dict[str, CompressorState] = {}

    def state(self, name: str) -> CompressorState:
        return self.states.setdefault(name, CompressorState())


class V4Cache(KVCache):
    """The whole model's cache: one `V4LayerCache` per decoder layer plus ``seq_len``. Not croppable: the
    compressors' running windows do not roll back (as transformers' V4, ``_is_stateful``)."""

    def __init__(self, num_layers: int):
        self.layers = [V4LayerCache() for _ in range(num_layers)]
        self.seq_len = 0

    def crop(self, seq_len: int) -> None:
        raise NotImplementedError("V4Cache: the compressors' running windows cannot be rolled back (no crop)")

    def nbytes(self) -> int:
        """Bytes held for one sequence: window rows, pending rows, overlap rows and compressed entries."""
        total = 0
        for layer in self.layers:
            if layer.window is not None:
                total += layer.window[0].numel() * layer.window.element_size()
            total += sum(s.nbytes() for s in layer.states.values())
        return total

    def nbytes_per_token(self) -> int:
        """`nbytes` divided by the tokens seen (0 before any)."""
        return self.nbytes() // self.seq_len if self.seq_len else 0


class V4Attention(nn.Module):
    """DeepSeek-V4 attention (report section 2.3) with ``transformers``' parameter names.

    Queries: ``q_a_proj`` -> ``q_a_norm`` (the latent, also the indexer's input) -> ``q_b_proj`` -> per-head unweighted
    RMSNorm -> RoPE. One key-value head: ``kv_norm(kv_proj(x))`` -> RoPE, both key and value. Attention with a sink
    per head (``sinks``) over the sliding window plus the compressed entries (`reference.sink_attention`), scale
    ``head_dim**-0.5``; the output's rope features rotated back by the query's angle; then the grouped output
    projection ``o_a_proj`` ((o_groups o_lora_rank, H D / o_groups): each group of heads to ``o_lora_rank``) and
    ``o_b_proj``. Sliding layers use the ``main`` RoPE, CSA/HCA layers the ``compress`` one.
    """

    def __init__(self, config: V4Config, layer_idx: int):
        super().__init__()
        c = config
        self.layer_type = c.layer_type(layer_idx)
        self.num_heads, self.head_dim, self.window = c.num_attention_heads, c.head_dim, c.sliding_window
        self.o_groups, self.eps = c.o_groups, c.rms_norm_eps
        self.q_a_proj = nn.Linear(c.hidden_size, c.q_lora_rank, bias=False)
        self.q_a_norm = RMSNorm(c.q_lora_rank, c.rms_norm_eps)
        self.q_b_proj = nn.Linear(c.q_lora_rank, c.num_attention_heads * c.head_dim, bias=False)
        self.kv_proj = nn.Linear(c.hidden_size, c.head_dim, bias=False)
        self.kv_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
        self.o_a_proj = nn.Linear(c.num_attention_heads * c.head_dim // c.o_groups, c.o_groups * c.o_lora_rank,
                                  bias=False)
        self.o_b_proj = nn.Linear(c.o_groups * c.o_lora_rank, c.hidden_size, bias=False)
        self.sinks = nn.Parameter(torch.zeros(c.num_attention_heads))
        rate = c.compress_rate(layer_idx)
        self.compressor = None
        if rate:
            csa = self.layer_type == "compressed_sparse_attention"
            self.compressor = Compressor(c.hidden_size, c.head_dim, rate, csa, c.rms_norm_eps)
            if csa:
                self.compressor.indexer = Indexer(c.hidden_size, c.q_lora_rank, c.index_n_heads, c.index_head_dim,
                                                  c.index_topk, rate, c.rms_norm_eps)
                # `reference.model.set_indexer_training`: None, "dense" or "sparse"; the KL in indexer_loss
                self.indexer_training: str | None = None
                self.indexer_loss: torch.Tensor | None = None
                self.index_topk = c.index_topk
                self._scores = self._keys = None
        self.rope = TailRope(c.rope_dim, c.rope_parameters["main" if rate == 0 else "compress"])

    def grouped_out(self, o: torch.Tensor) -> torch.Tensor:
        """(B, S, H, D) -> (B, S, hidden): group g's heads through block g of ``o_a_proj``, then ``o_b_proj``."""
        b, s = o.shape[:2]
        g = self.o_groups
        w = self.o_a_proj.weight.view(g, -1, self.o_a_proj.in_features)  # (G, R, H D / G)
        y = torch.einsum("bsgi,gri->bsgr", o.reshape(b, s, g, -1), w)
        return self.o_b_proj(y.reshape(b, s, -1))

    def forward(self, x: torch.Tensor, offset: int, cache: V4LayerCache | None = None) -> torch.Tensor:
        """``x`` (B, S, hidden) at positions ``offset .. offset + S - 1`` -> (B, S, hidden). With ``cache`` the
        tokens continue it (``offset`` = tokens already seen)."""
        b, s, _ = x.shape
        pos = offset + torch.arange(s, device=x.device)
        q_latent = self.q_a_norm(self.q_a_proj(x))
        q = self.q_b_proj(q_latent).view(b, s, self.num_heads, self.head_dim)
        q = self.rope(_unweighted_rms_norm(q, self.eps), pos, heads=True)
        kv = self.rope(self.kv_norm(self.kv_proj(x)), pos)
        cached = 0
        if cache is not None:
            if cache.window is not None:
                cached = cache.window.shape[1]
                kv = torch.cat((cache.window, kv), dim=1)
            cache.window = kv[:, kv.shape[1] - min(kv.shape[1], self.window - 1):].clone()  # not a view of kv
        idx = window_indices(s, offset, cached, self.window, x.device).expand(b, -1, -1)
        if self.compressor is not None:
            entries, sel = self.compressed(x, q_latent, pos, cache)
            idx = torch.cat((idx, torch.where(sel >= 0, sel + kv.shape[1], -1)), dim=-1)
            kv = torch.cat((kv, entries), dim=1)
            if getattr(self, "_keys", None) is not None:
                self.observe_attention(q, kv, idx, sel)
        o = self.attend(q, kv, idx)
        return self.grouped_out(self.rope(o, pos, heads=True, inverse=True))

    def attend(self, q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The hot op: `reference.sink_attention.sink_attention` with this layer's sinks and scale (a runtime
        overrides it with its kernel)."""
        return sink_attention(q, kv, self.sinks, idx, self.head_dim**-0.5)

    def compressed(self, x, q_latent, pos, cache):
        """Compressed entries (B, C, D) and each query's selection among them (B, S, K) int64, -1 = none: CSA's
        indexer top-k, or (HCA) every entry whose window is complete."""
        comp = self.compressor
        entries = comp.compress(x, self.rope, cache.state("compressor") if cache is not None else None)
        indexer = getattr(comp, "indexer", None)
        if indexer is None:
            visible = visible_entries(pos, entries.shape[1], comp.compress_rate)
            sel = torch.where(visible, torch.arange(entries.shape[1], device=x.device), -1)
            return entries, sel.expand(x.shape[0], -1, -1)
        state = cache.state("indexer") if cache is not None else None
        if getattr(self, "indexer_training", None) is not None:  # scores with a gradient, inputs detached
            self._scores = indexer.scores(x.detach(), q_latent.detach(), pos, self.rope, state)
            visible = visible_entries(pos, entries.shape[1], comp.compress_rate).expand(x.shape[0], -1, -1)
            if self.indexer_training == "dense":  # warm-up: every visible entry, as HCA
                self._keys = visible
                return entries, torch.where(visible, torch.arange(entries.shape[1], device=x.device), -1)
            sel = indexer.select(self._scores.detach(), pos)
            self._keys = torch.zeros_like(visible).scatter_(-1, sel.clamp(min=0), sel >= 0) & visible
            return entries, sel
        with torch.no_grad():  # the top-k is not differentiable; the indexer trains by its own loss
            return entries, indexer.select(indexer.scores(x, q_latent, pos, self.rope, state), pos)

    def observe_attention(self, q, kv, idx, sel) -> None:
        """The indexer's KL (`reference.dsa.indexer_kl`) against the main attention's weights on the compressed
        entries (summed over heads, over the entries in ``_keys``: every visible one in the warm-up, the selected
        ones in the sparse stage), in ``indexer_loss``. ``sel`` (B, S, Kc): the entries in the last Kc slots of
        ``idx``."""
        with torch.no_grad():
            probs, _ = sink_attention_probs(q, kv, self.sinks, idx, self.head_dim**-0.5)
            mass = probs[..., probs.shape[-1] - sel.shape[-1]:].sum(2)  # (B, S, Kc): summed over heads
            target = torch.zeros(self._keys.shape, dtype=mass.dtype, device=mass.device)
            target.scatter_add_(-1, sel.clamp(min=0), mass.masked_fill(sel < 0, 0.0))
        self.indexer_loss = indexer_kl(self._scores, target, self._keys)
        if getattr(self, "indexer_record", False):  # `reference.model.indexer_recall`
            self.indexer_observed = (self._scores.detach(), target, self._keys)
        self._scores = self._keys = None


class V4DecoderLayer(nn.Module):
    """One block: ``attn_hc`` -> ``input_layernorm`` -> `V4Attention` -> `mhc_post`; ``ffn_hc`` ->
    ``post_attention_layernorm`` -> `reference.v4_moe.V4MoE` -> `mhc_post`. Streams (B, S, N, D) in and out."""

    def __init__(self, config: V4Config, layer_idx: int):
        super().__init__()
        c = config
        self.self_attn = V4Attention(c, layer_idx)
        self.mlp = V4MoE(c, c.is_hash_layer(layer_idx))
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        hc = (c.hidden_size, c.hc_mult, c.hc_sinkhorn_iters, c.hc_eps, c.rms_norm_eps)
        self.attn_hc, self.ffn_hc = HyperConnection(*hc), HyperConnection(*hc)

    post = staticmethod(mhc_post)
    """The mHC op after each block (`reference.mhc.mhc_post`; a runtime overrides it with its kernel)."""

    def forward(self, h: torch.Tensor, input_ids: torch.Tensor, offset: int = 0, cache=None) -> torch.Tensor:
        post, comb, x = self.attn_hc(h)
        h = self.post(self.self_attn(self.input_layernorm(x), offset, cache), post, comb, h)
        post, comb, x = self.ffn_hc(h)
        return self.post(self.mlp(self.post_attention_layernorm(x), input_ids), post, comb, h)


class V4MTPBlock(V4DecoderLayer):
    """MTP depth k as DeepSeek-V4's ``MTPBlock``: ``x = e_proj(enorm(Emb(t_{i+k}))) + h_proj(hnorm(h))`` (the
    embedding added to every stream of the previous depth's streams h), one decoder block (sliding attention, routed
    MoE), then its own ``hc_head`` and ``norm`` before the shared head. Stored as ``mtp.{k-1}.*``."""

    def __init__(self, config: V4Config, layer_idx: int):
        super().__init__(config, layer_idx)
        c = config
        self.e_proj = nn.Linear(c.hidden_size, c.hidden_size, bias=False)
        self.h_proj = nn.Linear(c.hidden_size, c.hidden_size, bias=False)
        self.enorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.hnorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.hc_head = HyperHead(c.hidden_size, c.hc_mult, c.hc_eps, c.rms_norm_eps)

    def streams(self, h: torch.Tensor, emb: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """Previous depth's streams ``h`` (B, S, N, D) and embeddings ``emb`` (B, S, D) of the tokens k ahead (whose
        ids ``input_ids`` the block's router reads) -> this depth's streams (B, S, N, D)."""
        x = self.e_proj(self.enorm(emb)).unsqueeze(2) + self.h_proj(self.hnorm(h))
        return super().forward(x, input_ids)

    def final(self, h: torch.Tensor) -> torch.Tensor:
        """Streams -> the normed hidden state (B, S, D) the shared head reads."""
        return self.norm(self.hc_head(h))


class V4Backbone(nn.Module):
    """``embed_tokens``, ``layers``, ``hc_head``, ``norm``: transformers' ``model.*``."""

    def __init__(self, config: V4Config):
        super().__init__()
        c = config
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(V4DecoderLayer(c, i) for i in range(c.num_hidden_layers))
        self.hc_head = HyperHead(c.hidden_size, c.hc_mult, c.hc_eps, c.rms_norm_eps)
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)


class V4Model(nn.Module):
    """DeepSeek-V4 causal LM. ``forward(input_ids, cache=None)``: (B, S) int64 -> (B, S, vocab_size) logits in the
    parameter dtype. Raises ``TypeError``/``ValueError`` for bad ``input_ids`` (as `reference.model.Model`) and
    ``ValueError`` for an ``attention_mask`` with padding (``supports_padding`` is False)."""

    supports_padding = False

    def __init__(self, config: V4Config):
        super().__init__()
        self.config = config
        self.model = V4Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        n = config.num_hidden_layers
        self.mtp = nn.ModuleList(V4MTPBlock(config, n + k) for k in range(config.num_nextn_predict_layers))
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, std: float | None = None, seed: int = 0) -> None:
        """As transformers' ``_init_weights``: matrices, embeddings, experts, routers and the mHC projections normal(0,
        std) (default ``initializer_range``); norm gains and mHC scales 1; mHC biases, sinks, position biases and the
        correction bias 0. ``tid2eid`` (frozen) gets, per token, ``num_experts_per_tok`` distinct experts drawn from a
        generator seeded with ``seed``."""
        std = self.config.initializer_range if std is None else std
        for name, p in self.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("sinks", "position_bias", "base", "hc_base"):
                p.zero_()
            elif leaf in ("scale", "hc_scale") or (p.ndim == 1 and "norm" in name):
                p.fill_(1.0)
            else:
                p.normal_(0.0, std)
        g = torch.Generator().manual_seed(seed)
        for name, b in self.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.zero_()
            elif name.endswith("tid2eid"):
                b.copy_(torch.rand(b.shape[0], self.config.n_routed_experts, generator=g).argsort(-1)[:, : b.shape[1]])

    def moe_layers(self) -> list[V4MoE]:
        """Every MoE FFN, main layers then MTP blocks."""
        return [m for m in self.modules() if isinstance(m, V4MoE)]

    @torch.no_grad()
    def update_moe_bias(self, gamma: float | None = None) -> None:
        """The auxiliary-loss-free bias update of every routed (non-hash) MoE layer (after the optimizer step)."""
        g = self.config.bias_update_speed if gamma is None else gamma
        for m in self.moe_layers():
            m.update_bias(g)

    _check_input_ids = Model._check_input_ids

    def streams(self, input_ids: torch.Tensor, cache: V4Cache | None = None) -> torch.Tensor:
        """The last layer's streams (B, S, N, D), before the hyper-head. With ``cache`` the tokens continue it."""
        offset = cache.seq_len if cache is not None else 0
        self._check_input_ids(input_ids, offset)
        e = self.model.embed_tokens(input_ids)
        h = e.unsqueeze(2).expand(-1, -1, self.config.hc_mult, -1).contiguous()
        for i, layer in enumerate(self.model.layers):
            h = layer(h, input_ids, offset, cache.layers[i] if cache is not None else None)
        if cache is not None:
            cache.seq_len += input_ids.shape[1]
        return h

    def hidden_states(self, input_ids: torch.Tensor, cache: V4Cache | None = None,
                      attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Final-normed hidden states (B, S, hidden): ``norm(hc_head(streams))``."""
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise ValueError("DeepSeek-V4 takes no padded batches (an attention_mask with padding): the compressors "
                             "would pool the padding; give rows of one length")
        return self.model.norm(self.model.hc_head(self.streams(input_ids, cache)))

    def forward(self, input_ids: torch.Tensor, cache: V4Cache | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, S) token ids -> (B, S, vocab_size) logits; ``cache`` from `new_cache` to continue."""
        return self.lm_head(self.hidden_states(input_ids, cache, attention_mask))

    def new_cache(self) -> V4Cache:
        """An empty cache for the decoder layers."""
        return V4Cache(self.config.num_hidden_layers)

    cross_entropy = staticmethod(linear_cross_entropy)
    """The fused head + cross-entropy `lm_loss` calls (a runtime overrides it with its kernel)."""
    lm_loss = Model.lm_loss
    generate = Model.generate

    def loss(self, input_ids: torch.Tensor, targets: torch.Tensor, mtp_weight: float = 0.3) -> LossOutput:
        """Next-token loss plus MTP (as `reference.model.Model.loss`: ``targets`` (B, S) already shifted, -100
        ignored; depth k reads the embeddings of ``input_ids[:, t+k]`` and predicts ``targets[:, t+k]``, starting from
        the main model's last streams (depth 1) or the previous depth's streams; each depth's cross-entropy divided by
        its own count; ``L = L_main + mtp_weight * mean_k L_k``). No auxiliary loss (balancing is by bias)."""
        if targets.shape != input_ids.shape:
            raise ValueError(
                f"targets: expected shape {tuple(input_ids.shape)} like input_ids, got {tuple(targets.shape)}")
        h = self.streams(input_ids)
        lm_loss = self.lm_loss(self.model.norm(self.model.hc_head(h)), targets)
        mtp_losses = []
        b, t = input_ids.shape
        for k, block in enumerate(self.mtp, start=1):
            pad = input_ids.new_zeros(b, min(k, t))
            ahead = torch.cat((input_ids[:, k:], pad), dim=1)
            tgt = torch.cat((targets[:, k:], torch.full_like(pad, IGNORE_INDEX)), dim=1)
            h = block.streams(h, self.model.embed_tokens(ahead), ahead)
            mtp_losses.append(self.lm_loss(block.final(h), tgt))
        loss = lm_loss
        if mtp_losses:
            loss = loss + mtp_weight * torch.stack(mtp_losses).mean()
        out = LossOutput(loss, lm_loss, mtp_losses, lm_loss.new_zeros(()), count_valid(targets))
        return add_indexer_loss(self, out)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device=None, dtype: torch.dtype | None = None) -> V4Model:
        """Load a ``deepseek_v4`` checkpoint directory (`reference.v4_checkpoint.load_v4`)."""
        from .v4_checkpoint import load_v4

        return load_v4(cls, path, device=device, dtype=dtype)

    def save_pretrained(self, path: str | os.PathLike, tokenizer_file: str | os.PathLike | None = None) -> None:
        """Write ``config.json`` + ``model.safetensors`` (+ ``mtp.safetensors``) with the names transformers writes
        and reads (`reference.v4_checkpoint.save_v4`), atomically."""
        from .v4_checkpoint import save_v4

        save_v4(self, path, tokenizer_file=tokenizer_file)
