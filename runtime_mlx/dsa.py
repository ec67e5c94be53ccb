"""DeepSeek Sparse Attention (DSA, DeepSeek-V3.2-Exp) in MLX (mirrors `reference.dsa`): the lightning indexer
picks each query's top-k previous tokens and MLA attends to those only.

Index score ``I[t, s] = sum_h w[t, h] * ReLU(q[t, h] . k[s] * D**-0.5)`` with one shared key head
``k = LayerNorm(wk h_s)``, queries ``wq_b`` of MLA's query latent, ``w = weights_proj(h_t) * H**-0.5``, NeoX RoPE
on the first ``qk_rope_head_dim`` features; ``k = min(index_topk, visible)`` keys per query, causal, shared by all
heads. Scores, top-k and the attention over the selected keys are `runtime_mlx.kernels.indexer_scores`,
`indexer_topk` and `sparse_attention` (the op `reference.dsa.sparse_attention`; the reference layer passes the
same selection as a boolean mask); the selection carries no gradient, so the indexer's parameters are frozen (the
reference's get no gradient from the LM loss either).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from reference.config import ModelConfig

from . import kernels
from .mla import MLA
from .rope import RoPE


class Indexer(nn.Module):
    """Lightning indexer: ``wq_b`` (q_lora_rank -> H*D), ``wk`` (hidden -> D), ``k_norm`` (LayerNorm D, eps 1e-6),
    ``weights_proj`` (hidden -> H), H = index_n_heads, D = index_head_dim."""

    def __init__(self, config: ModelConfig, rope: RoPE):
        super().__init__()
        c = config
        self.n_heads, self.head_dim, self.topk = c.index_n_heads, c.index_head_dim, c.index_topk
        self.rope = rope
        self.wq_b = nn.Linear(c.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(c.hidden_size, self.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.weights_proj = nn.Linear(c.hidden_size, self.n_heads, bias=False)
        self.scale = self.head_dim**-0.5

    def project(self, x: mx.array, q_latent: mx.array, offset: int = 0, cache=None):
        """``q`` (B, T, H, D) and ``k`` (B, S, D) rotated (``k`` holds the cached keys too; the new ones are appended
        to ``cache['index_k']``), ``w`` (B, T, H) float32. ``x`` (B, T, hidden), ``q_latent`` (B, T, q_lora_rank)."""
        b, t, _ = x.shape
        q = self.wq_b(q_latent).reshape(b, t, self.n_heads, self.head_dim).transpose(0, 2, 1, 3)
        q = self.rope(q, offset, traditional=False).swapaxes(1, 2)  # rotated as (B, H, T, D)
        k = self.rope(self.k_norm(self.wk(x)), offset, traditional=False)
        if cache is not None:
            (k,) = cache.update(index_k=k)
        w = self.weights_proj(x).astype(mx.float32) * self.n_heads**-0.5
        return q, k, w

    def scores(self, x: mx.array, q_latent: mx.array, offset: int = 0, cache=None) -> mx.array:
        """Index scores (B, T, S) float32 of the T new queries against all S cached + new keys (unmasked):
        `runtime_mlx.kernels.indexer_scores` of `project`."""
        return kernels.indexer_scores(*self.project(x, q_latent, offset, cache), self.scale)

    def indices(self, x: mx.array, q_latent: mx.array, offset: int = 0, cache=None,
                mask: mx.array | None = None) -> mx.array:
        """int32 (B, T, min(index_topk, S)) key indices: each query's causal top-k keys, best first (exact ties to
        the earlier key), -1 for slots a query cannot fill (`runtime_mlx.kernels.indexer_topk`). ``mask``: None,
        or a padded batch's (B, 1, T, S) boolean mask (`runtime_mlx.attention.padding_mask`): its hidden keys
        score -inf before the top-k, so a padding key never takes a slot from a real one, and their slots are -1."""
        scores = self.scores(x, q_latent, offset, cache)
        if mask is None:
            return kernels.indexer_topk(scores, self.topk)
        visible = mask[:, 0]  # (B, T, S)
        idx = kernels.indexer_topk(mx.where(visible, scores, -mx.inf), self.topk)
        keep = (idx >= 0) & mx.take_along_axis(visible, mx.maximum(idx, 0), axis=-1)
        return mx.where(keep, idx, -1)

    def select(self, x: mx.array, q_latent: mx.array, offset: int = 0, cache=None) -> mx.array:
        """Boolean (B, T, S) selection: `indices` as a mask (`runtime_mlx.kernels.indices_to_mask`)."""
        scores = self.scores(x, q_latent, offset, cache)
        return kernels.indices_to_mask(kernels.indexer_topk(scores, self.topk), scores.shape[-1])


class DSA(MLA):
    """MLA whose attention is restricted to the indexer's top-k selection (V3.2), in either MLA form, through
    `runtime_mlx.kernels.sparse_attention`; parameters of MLA plus ``indexer.*`` (frozen). With ``index_topk >=
    seq_len`` it equals MLA."""

    def __init__(self, config: ModelConfig, layer_idx: int, rope: RoPE):
        super().__init__(config, layer_idx, rope)
        self.indexer = Indexer(config, rope)
        self.indexer.freeze()

    def select_mask(self, x, q_latent, cache, offset, mask=None):
        """The indexer's selection as int32 key indices (B, T, k) (-1: unused slot), shared by all heads, among the
        keys ``mask`` (None, or a padded batch's (B, 1, T, S) mask) leaves visible."""
        return self.indexer.indices(mx.stop_gradient(x), mx.stop_gradient(q_latent), offset, cache, mask)

    def attend(self, q, k, v, mask):
        """Attention over the selected keys: `runtime_mlx.kernels.sparse_attention` with ``mask`` the indices of
        `select_mask`."""
        return kernels.sparse_attention(q, k, v, mask, self.scale)
