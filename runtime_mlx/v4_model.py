"""DeepSeek-V4 causal LM in MLX (mirrors `reference.v4_model`; V4 technical report, 2026-04-24, sections 2.1-2.3).

The same modules and parameter names as the reference (``model.layers.{i}.self_attn.compressor.indexer.q_b_proj``,
``attn_hc.fn``, ``mlp.experts.gate_up_proj`` ...), so weights map 1:1 by name and checkpoints go through
`reference.v4_checkpoint`'s name mapping. mHC residual streams (`mhc_pre`, `mhc_post`, `HyperHead`), the hybrid
attention (sliding window; CSA: gated pooling 4x + lightning-indexer top-k; HCA: dense over 128x entries) with a sink
per head, the V4 MoE (sqrt-softplus router, hash layers, clamped SwiGLU) and the MTP blocks.

The hot ops are `runtime_mlx.kernels`' (Metal kernels on Apple Silicon, their pure-MLX paths elsewhere), each called
from one place: `mhc_pre` (`HyperConnection`), `mhc_post` (`V4DecoderLayer`), `gated_pool` (`Compressor.compress`),
`sink_attention` (`V4Attention`), `compressed_topk` (`Indexer.select`). The indexer's scores are DSA's
`runtime_mlx.kernels.indexer_scores` (the reference calls `reference.dsa.indexer_scores`). The indexer is frozen: its
top-k carries no gradient (the reference runs it under ``no_grad``). Integer indices are int32 (the reference's are
int64).
"""

from __future__ import annotations

import os

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import torch
from mlx.utils import tree_flatten, tree_unflatten

from reference.checkpoint import (
    dtype_name,
    write_model_dir,
)
from reference.rope import rope_inv_freq
from reference.v4_checkpoint import read_v4, to_disk_names
from reference.v4_config import V4Config

from . import kernels
from .cache import KVCache
from .checkpoint import load_weights
from .model import IGNORE_INDEX, LossOutput, Model
from .moe import Experts, _loads
from .rms_norm import RMSNorm

F32 = mx.float32


# ---------------------------------------------------------------------------------------------------------- ops
def _unweighted_rms_norm(x: mx.array, eps: float) -> mx.array:
    """``x / sqrt(mean(x**2, -1) + eps)`` with the statistics in float32, in ``x.dtype``."""
    return x * mx.rsqrt(mx.mean(mx.square(x.astype(F32)), axis=-1, keepdims=True) + eps).astype(x.dtype)


def visible_entries(positions: mx.array, num_entries: int, compress_rate: int) -> mx.array:
    """Boolean (S, C): the query at position ``p`` sees entry ``w`` once its window closed, ``w < (p + 1) // m``."""
    return mx.arange(num_entries)[None, :] < ((positions + 1) // compress_rate)[:, None]


def window_indices(seq_len: int, offset: int, cached: int, window: int) -> mx.array:
    """`reference.sink_attention.window_indices`: (S, W) int32 rows of each new query's sliding window in [``cached``
    window rows; the new rows], oldest first, -1 before position 0 or outside the cached rows."""
    pos = offset + mx.arange(seq_len)
    keys = pos[:, None] - mx.arange(window - 1, -1, -1)[None, :]
    rows = keys - (offset - cached)
    return mx.where((keys >= 0) & (rows >= 0), rows, -1)


# ---------------------------------------------------------------------------------------------------------- rope
class TailRope:
    """Interleaved RoPE on the trailing ``dim`` features at any absolute positions (`reference.v4_model.TailRope`;
    YaRN for the ``compress`` set). Not a module: it holds no parameters."""

    def __init__(self, dim: int, params: dict):
        scaling = params if params.get("rope_type", "default") != "default" else None
        inv_freq, self.amplitude = rope_inv_freq(dim, float(params["rope_theta"]), scaling)
        self.inv_freq, self.dim = mx.array(inv_freq.numpy()), dim

    def __call__(self, x: mx.array, positions: mx.array, heads: bool = False, inverse: bool = False) -> mx.array:
        """Rotate ``x`` (B, P, dx) (or (B, P, H, dx) with ``heads``) at ``positions`` (P,); ``inverse`` by minus the
        angle. Same shape and dtype."""
        ang = positions.astype(F32)[:, None] * self.inv_freq
        cos, sin = mx.cos(ang) * self.amplitude, mx.sin(ang) * self.amplitude
        if inverse:
            sin = -sin
        if heads:
            cos, sin = cos[:, None], sin[:, None]
        r = x[..., -self.dim:].astype(F32)
        x1, x2 = r[..., 0::2], r[..., 1::2]
        rot = mx.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(r.shape).astype(x.dtype)
        return rot if self.dim == x.shape[-1] else mx.concatenate([x[..., :-self.dim], rot], axis=-1)


# ---------------------------------------------------------------------------------------------------------- cache
class CompressorState:
    """`reference.compressor.CompressorState`: ``pending_kv``/``pending_gate`` (B, r, C) rows of the open window,
    ``prior_kv``/``prior_gate`` (B, m, D) (CSA's overlap, bias added), ``entries`` (B, n, D), ``count`` = n."""

    def __init__(self):
        self.pending_kv = self.pending_gate = self.prior_kv = self.prior_gate = self.entries = None
        self.count = 0

    def nbytes(self) -> int:
        """Bytes held (one sequence of the batch)."""
        return sum(a.nbytes // a.shape[0] for a in (self.pending_kv, self.pending_gate, self.prior_kv,
                                                     self.prior_gate, self.entries) if a is not None)


class V4LayerCache:
    """One layer's cache: ``window`` (B, <= sliding_window - 1, D) and a `CompressorState` per compressor."""

    def __init__(self):
        self.window: mx.array | None = None
        self.states: dict[str, CompressorState] = {}

    def state(self, name: str) -> CompressorState:
        return self.states.setdefault(name, CompressorState())


class V4Cache(KVCache):
    """`reference.v4_model.V4Cache`: one `V4LayerCache` per decoder layer plus ``seq_len``; not croppable."""

    def __init__(self, num_layers: int):
        self.layers = [V4LayerCache() for _ in range(num_layers)]
        self.seq_len = 0

    def crop(self, seq_len: int) -> None:
        raise NotImplementedError("V4Cache: the compressors' running windows cannot be rolled back (no crop)")

    def nbytes(self) -> int:
        """Bytes held for one sequence: window rows, pending rows, overlap rows and compressed entries."""
        return sum((0 if la.window is None else la.window.nbytes // la.window.shape[0])
                   + sum(s.nbytes() for s in la.states.values()) for la in self.layers)

    def nbytes_per_token(self) -> int:
        """`nbytes` divided by the tokens seen (0 before any)."""
        return self.nbytes() // self.seq_len if self.seq_len else 0


# ---------------------------------------------------------------------------------------------------------- mHC
class HyperConnection(nn.Module):
    """`reference.mhc.HyperConnection`: ``fn`` ((2 + N) N, N D), ``base`` ((2 + N) N,), ``scale`` (3,);
    ``__call__(streams)`` -> ``(post, comb, collapsed)`` through `mhc_pre`."""

    def __init__(self, hidden_size: int, hc_mult: int, sinkhorn_iters: int, hc_eps: float, rms_norm_eps: float):
        super().__init__()
        self.sinkhorn_iters, self.hc_eps, self.rms_norm_eps = sinkhorn_iters, hc_eps, rms_norm_eps
        n = (2 + hc_mult) * hc_mult
        self.fn = mx.zeros((n, hc_mult * hidden_size))
        self.base = mx.zeros((n,))
        self.scale = mx.ones((3,))

    def __call__(self, streams: mx.array):
        collapsed, post, comb = kernels.mhc_pre(streams, self.fn, self.base, self.scale, self.sinkhorn_iters,
                                                self.hc_eps, self.rms_norm_eps)
        return post, comb, collapsed


class HyperHead(nn.Module):
    """`reference.mhc.HyperHead`: ``sum_j pre[j] streams[j]``, ``pre = sigmoid(hc_fn RMS(flat) hc_scale + hc_base)
    + hc_eps``; (B, S, N, D) -> (B, S, D) in the streams' dtype."""

    def __init__(self, hidden_size: int, hc_mult: int, hc_eps: float, rms_norm_eps: float):
        super().__init__()
        self.hc_eps, self.rms_norm_eps = hc_eps, rms_norm_eps
        self.hc_fn = mx.zeros((hc_mult, hc_mult * hidden_size))
        self.hc_base = mx.zeros((hc_mult,))
        self.hc_scale = mx.ones((1,))

    def __call__(self, streams: mx.array) -> mx.array:
        b, s = streams.shape[:2]
        flat = _unweighted_rms_norm(streams.reshape(b, s, -1).astype(F32), self.rms_norm_eps)
        pre = mx.sigmoid(flat @ self.hc_fn.astype(F32).T * self.hc_scale.astype(F32) + self.hc_base.astype(F32))
        return ((pre + self.hc_eps)[..., None] * streams).sum(axis=2).astype(streams.dtype)


# ---------------------------------------------------------------------------------------------------------- compressors
class Compressor(nn.Module):
    """`reference.compressor.Compressor`: ``kv_proj``, ``gate_proj`` (hidden -> C), ``position_bias`` (m, C),
    ``kv_norm`` (D); C = 2 D with ``overlap`` (CSA) else D (HCA)."""

    def __init__(self, hidden_size: int, head_dim: int, compress_rate: int, overlap: bool, rms_norm_eps: float):
        super().__init__()
        width = 2 * head_dim if overlap else head_dim
        self.head_dim, self.compress_rate, self.overlap = head_dim, compress_rate, overlap
        self.kv_proj = nn.Linear(hidden_size, width, bias=False)
        self.gate_proj = nn.Linear(hidden_size, width, bias=False)
        self.position_bias = mx.zeros((compress_rate, width))
        self.kv_norm = RMSNorm(head_dim, rms_norm_eps)

    def compress(self, x: mx.array, rope: TailRope, state: CompressorState | None = None) -> mx.array:
        """Entries (B, n, D) of every window closed so far (the state's plus those the tokens ``x`` (B, S, hidden)
        close); without a state ``x`` starts at position 0 and an unfinished last window is dropped."""
        kv, gate = self.kv_proj(x), self.gate_proj(x)
        first, prior_kv, prior_gate = 0, None, None
        if state is not None:
            if state.pending_kv is not None:
                kv = mx.concatenate([state.pending_kv, kv], axis=1)
                gate = mx.concatenate([state.pending_gate, gate], axis=1)
            first, prior_kv, prior_gate = state.count * self.compress_rate, state.prior_kv, state.prior_gate
        m = self.compress_rate
        usable = kv.shape[1] // m * m
        if usable:
            pooled = kernels.gated_pool(kv[:, :usable], gate[:, :usable], self.position_bias, self.overlap, prior_kv,
                                prior_gate)
            new = rope(self.kv_norm(pooled), first + m * mx.arange(usable // m))
        else:
            new = mx.zeros((kv.shape[0], 0, self.head_dim), dtype=kv.dtype)
        if state is None:
            return new
        if usable and self.overlap:
            d = self.head_dim
            state.prior_kv = kv[:, usable - m:usable, :d]
            state.prior_gate = gate[:, usable - m:usable, :d] + self.position_bias[:, :d]
        state.pending_kv, state.pending_gate = kv[:, usable:], gate[:, usable:]
        state.entries = new if state.entries is None else mx.concatenate([state.entries, new], axis=1)
        state.count += new.shape[1]
        return state.entries


class Indexer(Compressor):
    """`reference.compressor.Indexer`: a CSA compressor at ``index_head_dim`` (the keys), ``q_b_proj`` (queries from
    the attention's query latent), ``scorer.weights_proj`` (head weights times ``n_heads**-0.5``). Frozen."""

    def __init__(self, hidden_size: int, q_lora_rank: int, n_heads: int, head_dim: int, topk: int,
                 compress_rate: int, rms_norm_eps: float):
        super().__init__(hidden_size, head_dim, compress_rate, True, rms_norm_eps)
        self.n_heads, self.topk = n_heads, topk
        self.q_b_proj = nn.Linear(q_lora_rank, n_heads * head_dim, bias=False)
        self.scorer = nn.Module()
        self.scorer.weights_proj = nn.Linear(hidden_size, n_heads, bias=False)

    def scores(self, x: mx.array, q_latent: mx.array, positions: mx.array, rope: TailRope,
               state: CompressorState | None = None) -> mx.array:
        """Index scores (B, S, C) float32 of the new queries against every compressed key, unmasked
        (`runtime_mlx.kernels.indexer_scores`); (B, S, 0) before the first window closes."""
        keys = self.compress(x, rope, state)
        b, s, _ = x.shape
        if keys.shape[1] == 0:
            return mx.zeros((b, s, 0), dtype=F32)
        q = rope(self.q_b_proj(q_latent).reshape(b, s, self.n_heads, self.head_dim), positions, heads=True)
        w = self.scorer.weights_proj(x) * self.n_heads**-0.5
        return kernels.indexer_scores(q, keys, w, self.head_dim**-0.5)

    def select(self, scores: mx.array, positions: mx.array) -> mx.array:
        """Top-``index_topk`` visible entries (B, S, k) int32, -1 for unfilled slots (`compressed_topk`)."""
        visible = visible_entries(positions, scores.shape[-1], self.compress_rate)
        return kernels.compressed_topk(scores, visible, self.topk)


# ---------------------------------------------------------------------------------------------------------- attention
class V4Attention(nn.Module):
    """`reference.v4_model.V4Attention`: low-rank queries with a per-head unweighted RMSNorm, one shared key-value
    head, tail RoPE (``main`` on sliding layers, ``compress`` on CSA/HCA), `sink_attention` over the window plus the
    compressed entries, inverse RoPE on the output, grouped low-rank output projection."""

    def __init__(self, config: V4Config, layer_idx: int):
        super().__init__()
        c = config
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
        self.sinks = mx.zeros((c.num_attention_heads,))
        rate = c.compress_rate(layer_idx)
        if rate:
            csa = c.layer_type(layer_idx) == "compressed_sparse_attention"
            self.compressor = Compressor(c.hidden_size, c.head_dim, rate, csa, c.rms_norm_eps)
            if csa:
                self.compressor.indexer = Indexer(c.hidden_size, c.q_lora_rank, c.index_n_heads, c.index_head_dim,
                                                  c.index_topk, rate, c.rms_norm_eps)
                self.compressor.indexer.freeze()
        self.rope = TailRope(c.rope_dim, c.rope_parameters["main" if rate == 0 else "compress"])

    def grouped_out(self, o: mx.array) -> mx.array:
        """(B, S, H, D) -> (B, S, hidden): group g's heads through block g of ``o_a_proj``, then ``o_b_proj``."""
        b, s = o.shape[:2]
        g = self.o_groups
        w = self.o_a_proj.weight.reshape(g, -1, self.o_a_proj.weight.shape[1])  # (G, R, H D / G)
        y = o.reshape(b, s, g, 1, -1) @ w.swapaxes(-1, -2)  # (B, S, G, 1, R)
        return self.o_b_proj(y.reshape(b, s, -1))

    def __call__(self, x: mx.array, offset: int, cache: V4LayerCache | None = None) -> mx.array:
        """``x`` (B, S, hidden) at positions ``offset ..`` -> (B, S, hidden); with ``cache`` the tokens continue it."""
        b, s, _ = x.shape
        pos = offset + mx.arange(s)
        q_latent = self.q_a_norm(self.q_a_proj(x))
        q = self.q_b_proj(q_latent).reshape(b, s, self.num_heads, self.head_dim)
        q = self.rope(_unweighted_rms_norm(q, self.eps), pos, heads=True)
        kv = self.rope(self.kv_norm(self.kv_proj(x)), pos)
        cached = 0
        if cache is not None:
            if cache.window is not None:
                cached = cache.window.shape[1]
                kv = mx.concatenate([cache.window, kv], axis=1)
            cache.window = kv[:, kv.shape[1] - min(kv.shape[1], self.window - 1):]
        idx = mx.broadcast_to(window_indices(s, offset, cached, self.window), (b, s, self.window))
        if "compressor" in self:
            entries, sel = self.compressed(x, q_latent, pos, cache)
            idx = mx.concatenate([idx, mx.where(sel >= 0, sel + kv.shape[1], -1)], axis=-1)
            kv = mx.concatenate([kv, entries], axis=1)
        o = kernels.sink_attention(q, kv, self.sinks, idx, self.head_dim**-0.5)
        return self.grouped_out(self.rope(o, pos, heads=True, inverse=True))

    def compressed(self, x, q_latent, pos, cache):
        """Compressed entries (B, C, D) and each query's selection among them (B, S, K) int32, -1 = none: CSA's
        indexer top-k (no gradient), or (HCA) every entry whose window is complete."""
        comp = self.compressor
        entries = comp.compress(x, self.rope, cache.state("compressor") if cache is not None else None)
        if "indexer" not in comp:
            n = entries.shape[1]
            sel = mx.where(visible_entries(pos, n, comp.compress_rate), mx.arange(n), -1)
            return entries, mx.broadcast_to(sel, (x.shape[0], *sel.shape))
        indexer = comp.indexer
        scores = indexer.scores(mx.stop_gradient(x), mx.stop_gradient(q_latent), pos, self.rope,
                                cache.state("indexer") if cache is not None else None)
        return entries, indexer.select(scores, pos)


# ---------------------------------------------------------------------------------------------------------- MoE
def clamped_swiglu(gate: mx.array, up: mx.array, limit: float) -> mx.array:
    """``silu(min(gate, limit)) * clip(up, -limit, limit)`` (`reference.v4_moe.clamped_swiglu`)."""
    return kernels.swiglu(mx.minimum(gate, limit), mx.clip(up, -limit, limit))


class V4Router(nn.Module):
    """`reference.v4_moe.V4Router`: ``weight`` (E, hidden) and the frozen ``e_score_correction_bias`` (E,) or (hash
    layers) ``tid2eid`` (vocab, k). ``__call__(x, input_ids)`` -> ``(indices (T, k), weights (T, k) float32, scores
    (T, E) float32)``; ties to the lower expert (stable ``mx.argsort``)."""

    def __init__(self, config: V4Config, hash_layer: bool):
        super().__init__()
        self.hash_layer = hash_layer
        self.top_k, self.scoring_func = config.num_experts_per_tok, config.scoring_func
        self.routed_scaling_factor = config.routed_scaling_factor
        self.weight = mx.zeros((config.n_routed_experts, config.hidden_size))
        if hash_layer:
            self.tid2eid = mx.zeros((config.vocab_size, self.top_k), dtype=mx.int64)
            self.freeze(keys=["tid2eid"], recurse=False)
        else:
            self.e_score_correction_bias = mx.zeros((config.n_routed_experts,))
            self.freeze(keys=["e_score_correction_bias"], recurse=False)

    def __call__(self, x: mx.array, input_ids: mx.array | None):
        logits = x.astype(F32) @ self.weight.astype(F32).T
        scores = mx.sqrt(nn.softplus(logits)) if self.scoring_func == "sqrtsoftplus" else mx.sigmoid(logits)
        if self.hash_layer:
            if input_ids is None:
                raise ValueError("V4Router: a hash_moe layer needs the input_ids (tid2eid[input_ids] picks experts)")
            idx = self.tid2eid[input_ids.reshape(-1)].astype(mx.int32)
        else:
            biased = mx.stop_gradient(scores) + self.e_score_correction_bias.astype(F32)
            idx = mx.argsort(-biased, axis=-1)[:, :self.top_k].astype(mx.int32)
        w = mx.take_along_axis(scores, idx, axis=-1)
        w = w / (w.sum(axis=-1, keepdims=True) + 1e-20)
        return idx, w * self.routed_scaling_factor, scores


class V4Experts(Experts):
    """`reference.v4_moe.V4Experts`: ``gate_up_proj`` (E, 2 I, hidden), ``down_proj`` (E, hidden, I), the clamped
    SwiGLU between them; grouped matmuls over expert-sorted token copies as `runtime_mlx.moe.Experts`."""

    def __init__(self, config: V4Config):
        nn.Module.__init__(self)
        e, i, h = config.n_routed_experts, config.moe_intermediate_size, config.hidden_size
        self.num_experts, self.limit = e, config.swiglu_limit
        self.gate_up_proj = mx.zeros((e, 2 * i, h))
        self.down_proj = mx.zeros((e, h, i))

    def grouped_swiglu(self, xs: mx.array, idx: mx.array) -> mx.array:
        """Rows ``xs`` (M, hidden) sorted by expert, ``idx`` (M,) uint32 their experts -> (M, hidden)."""
        wide = xs.dtype != F32 and mx.default_device().type == mx.DeviceType.cpu  # CPU gather_mm: float32 only

        def mm(a, w):
            out = mx.gather_mm(a.astype(F32) if wide else a, (w.astype(F32) if wide else w).swapaxes(-1, -2),
                               rhs_indices=idx, sorted_indices=True)
            return out.astype(a.dtype)

        gate, up = mx.split(mm(xs[:, None], self.gate_up_proj), 2, axis=-1)
        return mm(clamped_swiglu(gate, up, self.limit), self.down_proj)[:, 0]


class V4MLP(nn.Module):
    """The shared expert: ``down_proj(clamped_swiglu(gate_proj(x), up_proj(x)))``."""

    def __init__(self, config: V4Config):
        super().__init__()
        h, i = config.hidden_size, config.moe_intermediate_size
        self.limit = config.swiglu_limit
        self.gate_proj = nn.Linear(h, i, bias=False)
        self.up_proj = nn.Linear(h, i, bias=False)
        self.down_proj = nn.Linear(i, h, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(clamped_swiglu(self.gate_proj(x), self.up_proj(x), self.limit))


class V4MoE(nn.Module):
    """`reference.v4_moe.V4MoE`: routed experts (hash or top-k) plus the shared expert, (B, S, hidden) -> same.
    ``stats``: a top-k layer appends its expert loads (E,) to ``stats["loads"]`` (`V4Model.update_moe_bias`)."""

    def __init__(self, config: V4Config, hash_layer: bool):
        super().__init__()
        self.n_routed = config.n_routed_experts
        self.gate = V4Router(config, hash_layer)
        self.experts = V4Experts(config)
        self.shared_experts = V4MLP(config)

    def __call__(self, x: mx.array, input_ids: mx.array | None = None, stats: dict | None = None) -> mx.array:
        b, s, h = x.shape
        flat = x.reshape(-1, h)
        idx, w, _ = self.gate(flat, input_ids)
        if stats is not None and not self.gate.hash_layer:
            stats["loads"].append(_loads(idx, self.n_routed))
        return (self.experts(flat, idx, w) + self.shared_experts(flat)).reshape(b, s, h)

    def update_bias(self, load: mx.array, gamma: float) -> None:
        """``b += gamma * sign(mean(load) - load)`` (no-op for a hash layer)."""
        if not self.gate.hash_layer:
            g = self.gate
            g.e_score_correction_bias = g.e_score_correction_bias + gamma * mx.sign(load.mean() - load)


# ---------------------------------------------------------------------------------------------------------- blocks
class V4DecoderLayer(nn.Module):
    """`reference.v4_model.V4DecoderLayer`: ``attn_hc`` -> ``input_layernorm`` -> attention -> `mhc_post`;
    ``ffn_hc`` -> ``post_attention_layernorm`` -> MoE -> `mhc_post`. Streams (B, S, N, D) in and out."""

    def __init__(self, config: V4Config, layer_idx: int):
        super().__init__()
        c = config
        self.self_attn = V4Attention(c, layer_idx)
        self.mlp = V4MoE(c, c.is_hash_layer(layer_idx))
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        hc = (c.hidden_size, c.hc_mult, c.hc_sinkhorn_iters, c.hc_eps, c.rms_norm_eps)
        self.attn_hc, self.ffn_hc = HyperConnection(*hc), HyperConnection(*hc)

    @staticmethod
    def sublayer(hc: HyperConnection, block, h: mx.array) -> mx.array:
        """One mHC-wrapped sublayer: `mhc_pre` (through ``hc``), ``block`` on the collapsed input, `mhc_post`."""
        post, comb, x = hc(h)
        return kernels.mhc_post(block(x), post, comb, h)

    def __call__(self, h: mx.array, input_ids: mx.array, offset: int = 0, cache=None, stats=None) -> mx.array:
        """Streams ``h`` (B, S, N, D) at positions ``offset ..``; ``input_ids`` (B, S) for the hash router."""
        h = self.sublayer(self.attn_hc, lambda x: self.self_attn(self.input_layernorm(x), offset, cache), h)
        return self.sublayer(self.ffn_hc, lambda x: self.mlp(self.post_attention_layernorm(x), input_ids, stats), h)


class V4MTPBlock(V4DecoderLayer):
    """`reference.v4_model.V4MTPBlock`: ``e_proj(enorm(Emb(t_{i+k}))) + h_proj(hnorm(h))`` on every stream, one
    decoder block (sliding, routed MoE), its own ``hc_head`` and ``norm``."""

    def __init__(self, config: V4Config, layer_idx: int):
        super().__init__(config, layer_idx)
        c = config
        self.e_proj = nn.Linear(c.hidden_size, c.hidden_size, bias=False)
        self.h_proj = nn.Linear(c.hidden_size, c.hidden_size, bias=False)
        self.enorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.hnorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.hc_head = HyperHead(c.hidden_size, c.hc_mult, c.hc_eps, c.rms_norm_eps)

    def streams(self, h: mx.array, emb: mx.array, input_ids: mx.array, stats=None) -> mx.array:
        """Previous depth's streams (B, S, N, D), embeddings (B, S, D) of the tokens k ahead -> this depth's."""
        x = self.e_proj(self.enorm(emb))[:, :, None] + self.h_proj(self.hnorm(h))
        return self(x, input_ids, 0, None, stats)

    def final(self, h: mx.array) -> mx.array:
        """Streams -> the normed hidden state (B, S, D) the shared head reads."""
        return self.norm(self.hc_head(h))


class V4Backbone(nn.Module):
    """``embed_tokens``, ``layers``, ``hc_head``, ``norm``: transformers' ``model.*``."""

    def __init__(self, config: V4Config):
        super().__init__()
        c = config
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = [V4DecoderLayer(c, i) for i in range(c.num_hidden_layers)]
        self.hc_head = HyperHead(c.hidden_size, c.hc_mult, c.hc_eps, c.rms_norm_eps)
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)


# ---------------------------------------------------------------------------------------------------------- model
class V4Model(nn.Module):
    """DeepSeek-V4 causal LM in MLX, as `reference.v4_model.V4Model`: ``model(input_ids, cache=None)`` (B, S)
    integer ids -> (B, S, vocab_size) logits; ``loss``, ``generate``, ``new_cache``, ``from_pretrained``,
    ``save_pretrained``. Raises ``TypeError``/``ValueError`` for bad ``input_ids`` and ``ValueError`` for a padding
    ``attention_mask`` (``supports_padding`` is False). With ``tie_word_embeddings`` there is no ``lm_head`` (the
    embedding is the head)."""

    supports_padding = False

    def __init__(self, config: V4Config):
        super().__init__()
        self.config = config
        self.model = V4Backbone(config)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        n = config.num_hidden_layers
        self.mtp = [V4MTPBlock(config, n + k) for k in range(config.num_nextn_predict_layers)]
        self.init_weights()

    def init_weights(self, std: float | None = None, seed: int | None = None) -> None:
        """As `reference.v4_model.V4Model.init_weights` (the draws differ): matrices normal(0, std) (default
        ``initializer_range``); norm gains and mHC scales 1; mHC biases, sinks, position biases and the correction
        bias 0; ``tid2eid`` ``num_experts_per_tok`` distinct random experts per token."""
        std = self.config.initializer_range if std is None else std
        if seed is not None:
            mx.random.seed(seed)
        new = []
        for name, p in tree_flatten(self.parameters()):
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "tid2eid":
                r = mx.random.uniform(shape=(p.shape[0], self.config.n_routed_experts))
                new.append((name, mx.argsort(r, axis=-1)[:, :p.shape[1]].astype(p.dtype)))
            elif leaf in ("sinks", "position_bias", "base", "hc_base", "e_score_correction_bias"):
                new.append((name, mx.zeros_like(p)))
            elif leaf in ("scale", "hc_scale") or (p.ndim == 1 and "norm" in name):
                new.append((name, mx.ones_like(p)))
            else:
                new.append((name, (mx.random.normal(p.shape) * std).astype(p.dtype)))
        self.update(tree_unflatten(new))

    def moe_layers(self) -> list[V4MoE]:
        """Every MoE FFN, main layers then MTP blocks."""
        return [layer.mlp for layer in [*self.model.layers, *self.mtp]]

    def update_moe_bias(self, loads: list[mx.array], gamma: float | None = None) -> None:
        """The auxiliary-loss-free bias update of every top-k (non-hash) MoE layer from ``loads`` (one (E,) count per
        such layer, `LossOutput.expert_loads`); after the optimizer step. Raises ``ValueError`` for a wrong count."""
        g = self.config.bias_update_speed if gamma is None else gamma
        layers = [m for m in self.moe_layers() if not m.gate.hash_layer]
        if len(loads) != len(layers):
            raise ValueError(f"update_moe_bias: {len(loads)} loads for {len(layers)} top-k routed MoE layers")
        for m, load in zip(layers, loads, strict=True):
            m.update_bias(load, g)

    _check_input_ids = Model._check_input_ids
    head = Model.head
    lm_loss = Model.lm_loss
    generate = Model.generate

    def streams(self, input_ids: mx.array, cache: V4Cache | None = None, stats: dict | None = None,
                check_values: bool = True) -> mx.array:
        """The last layer's streams (B, S, N, D), before the hyper-head. With ``cache`` the tokens continue it."""
        offset = cache.seq_len if cache is not None else 0
        self._check_input_ids(input_ids, offset, check_values)
        e = self.model.embed_tokens(input_ids)
        h = mx.broadcast_to(e[:, :, None], (*e.shape[:2], self.config.hc_mult, e.shape[-1]))
        for i, layer in enumerate(self.model.layers):
            h = layer(h, input_ids, offset, cache.layers[i] if cache is not None else None, stats)
        if cache is not None:
            cache.seq_len += input_ids.shape[1]
        return h

    def hidden_states(self, input_ids: mx.array, cache: V4Cache | None = None,
                      attention_mask: mx.array | None = None) -> mx.array:
        """Final-normed hidden states (B, S, hidden): ``norm(hc_head(streams))``."""
        if attention_mask is not None and not bool(attention_mask.astype(mx.bool_).all().item()):
            raise ValueError("DeepSeek-V4 takes no padded batches (an attention_mask with padding): the compressors "
                             "would pool the padding; give rows of one length")
        return self.model.norm(self.model.hc_head(self.streams(input_ids, cache)))

    def __call__(self, input_ids: mx.array, cache: V4Cache | None = None,
                 attention_mask: mx.array | None = None) -> mx.array:
        """(B, S) token ids -> (B, S, vocab_size) logits; ``cache`` from `new_cache` to continue."""
        return self.head(self.hidden_states(input_ids, cache, attention_mask))

    def new_cache(self) -> V4Cache:
        """An empty cache for the decoder layers."""
        return V4Cache(self.config.num_hidden_layers)

    def loss(self, input_ids: mx.array, targets: mx.array, mtp_weight: float = 0.3,
             check_values: bool = True) -> LossOutput:
        """Next-token loss plus MTP, as `reference.v4_model.V4Model.loss` (``targets`` already shifted, -100
        ignored; ``L = L_main + mtp_weight * mean_k L_k``; ``aux_loss`` 0). ``expert_loads``: one (E,) count per
        top-k routed layer (main layers, then MTP blocks) for `update_moe_bias`. Raises ``ValueError`` when
        ``targets`` and ``input_ids`` differ in shape."""
        if targets.shape != input_ids.shape:
            raise ValueError(f"targets: expected shape {input_ids.shape} like input_ids, got {targets.shape}")
        stats = {"loads": []}
        h = self.streams(input_ids, stats=stats, check_values=check_values)
        lm_loss = self.lm_loss(self.model.norm(self.model.hc_head(h)), targets)
        mtp_losses = []
        b, t = input_ids.shape
        for k, block in enumerate(self.mtp, start=1):
            pad = mx.zeros((b, min(k, t)), dtype=input_ids.dtype)
            ahead = mx.concatenate([input_ids[:, k:], pad], axis=1)
            tgt = mx.concatenate([targets[:, k:], mx.full(pad.shape, IGNORE_INDEX, dtype=targets.dtype)], axis=1)
            h = block.streams(h, self.model.embed_tokens(ahead), ahead, stats)
            mtp_losses.append(self.lm_loss(block.final(h), tgt))
        loss = lm_loss
        if mtp_losses:
            loss = loss + mtp_weight * mx.stack(mtp_losses).mean()
        return LossOutput(loss, lm_loss, mtp_losses, mx.array(0.0), (targets != IGNORE_INDEX).sum(), stats["loads"])

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: mx.Dtype | None = None, device=None) -> V4Model:
        """Load a ``deepseek_v4`` checkpoint directory (`load_v4`); ``device`` is ignored (MLX's default)."""
        return load_v4(cls, path, dtype)

    def save_pretrained(self, path: str | os.PathLike, tokenizer_file: str | os.PathLike | None = None) -> None:
        """Write the files `reference.v4_model.V4Model.save_pretrained` writes (`save_v4`)."""
        save_v4(self, path, tokenizer_file)


# ---------------------------------------------------------------------------------------------------------- checkpoints
def _to_torch(a: mx.array) -> torch.Tensor:
    if a.dtype == mx.bfloat16:
        return torch.from_numpy(np.array(a.astype(F32))).to(torch.bfloat16)
    return torch.from_numpy(np.array(a))


def _to_mx(t: torch.Tensor) -> mx.array:
    return mx.array(t.float().numpy()).astype(mx.bfloat16) if t.dtype == torch.bfloat16 else mx.array(t.numpy())


def load_v4(cls, path, dtype: mx.Dtype | None = None) -> V4Model:
    """Build ``cls(config)`` from the checkpoint directory ``path`` (transformers', DeepSeek's or our names, through
    `reference.v4_checkpoint.from_disk_names`) and load its weights strictly, in float32 unless ``dtype``, in eval
    mode. MTP depths that config.json asks for and the files lack are dropped with a `CheckpointWarning`, as
    `reference.v4_checkpoint.load_v4`. Raises ``FileNotFoundError`` / ``ValueError`` naming missing, unexpected,
    mis-shaped, non-finite or quantized tensors, or files that do not match ``checksums.json``."""
    cfg, sd = read_v4(path)
    weights = {k: _to_mx(v) for k, v in sd.items()}
    if cfg.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    model = cls(cfg)
    load_weights(model, weights, f"checkpoint {path!r}")
    model.set_dtype(mx.float32 if dtype is None else dtype)
    mx.eval(model.parameters())
    model.eval()
    return model


def save_v4(model: V4Model, path, tokenizer_file=None) -> None:
    """Write ``config.json``, ``model.safetensors`` (transformers' names) and ``mtp.safetensors`` (``mtp.{k}.*``),
    plus ``tokenizer.json`` when given, atomically: the same files as `reference.v4_checkpoint.save_v4`."""
    from safetensors.torch import save_file

    sd = {k: _to_torch(v) for k, v in tree_flatten(model.parameters())}
    disk = to_disk_names(sd, model.config)
    main = {k: v for k, v in disk.items() if not k.startswith("mtp.")}
    mtp = {k: v for k, v in disk.items() if k.startswith("mtp.")}
    write_model_dir(path, model.config, main, mtp,
                    lambda t, f: save_file({k: v.contiguous() for k, v in t.items()}, f, metadata={"format": "pt"}),
                    tokenizer_file, dtype=dtype_name(model.model.embed_tokens.weight.dtype))
