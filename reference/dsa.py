"""DeepSeek Sparse Attention (DSA), DeepSeek-V3.2-Exp: a lightning indexer picks, for each query, the top-k
previous tokens, and MLA attends to those only.

Indexer score (V3.2 report eq. 1): ``I[t, s] = sum_h w[t, h] * ReLU(q[t, h] . k[s])`` with one shared key
head ``k = LayerNorm(wk h_s)``, queries ``wq_b`` of MLA's query latent, weights ``weights_proj(h_t) * H**-0.5``,
scale ``index_head_dim**-0.5``; RoPE with NeoX pairing on the first ``qk_rope_head_dim`` features. The index
set is ``top-k`` with ``k = min(index_topk, valid)``, causal, shared by all heads: the pure function
`indexer_topk` (the same signature as `kernels.triton.dsa.indexer_topk`); attention over a selection given as
indices is the op `sparse_attention` (the layer passes the same selection as a mask). The Hadamard rotation and
FP8 of the official kernel are orthogonal / precision details and are not applied here (as in transformers).
"""

from __future__ import annotations

import torch
from torch import nn

from .attention import attend, causal_mask
from .config import ModelConfig
from .mla import MLA
from .rms_norm import at_least_fp32
from .rope import apply_rope


def indexer_scores(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, scale: float) -> torch.Tensor:
    """Lightning-indexer scores ``I[b, t, s] = sum_h w[b, t, h] * relu(scale * q[b, t, h] . k[b, s])`` (V3.2
    report eq. 1), (B, T, S) in at least float32, unmasked.

    ``q`` (B, T, H, D), ``k`` (B, S, D) (one key head shared by all indexer heads), ``w`` (B, T, H).
    """
    logits = torch.relu(torch.einsum("bthd,bsd->bths", at_least_fp32(q), at_least_fp32(k)) * scale)
    return torch.einsum("bths,bth->bts", logits, at_least_fp32(w))


def indexer_topk(scores: torch.Tensor, topk: int) -> torch.Tensor:
    """Causal top-k selection of the eq. 1 scores (V3.2 report section 2.1): int64 (B, T, k) key indices,
    ``k = min(topk, S)``, best first, -1 for slots a query cannot fill.

    ``scores`` (B, T, S) float (`indexer_scores`); the T queries are the last T of the S keys, so query ``t``
    picks among keys ``j <= t + S - T``, and a query with fewer than ``k`` visible keys keeps all of them. Ties
    go to the earlier key (-0.0 equals 0.0) and a NaN of either sign ranks above every number: the order of a
    stable descending sort (DESIGN.md: "Ties in any top-k"), the same in a full pass and in cached decode steps.
    The same contract as `kernels.triton.dsa.indexer_topk`. Raises ``ValueError`` for scores that are not 3-D,
    ``S < T`` or ``topk < 1``.
    """
    if scores.ndim != 3:
        raise ValueError(f"indexer_topk: scores must be (B, T, S), got shape {tuple(scores.shape)}")
    _, t, s = scores.shape
    if s < t:
        raise ValueError(f"indexer_topk: causal needs at least as many keys as queries, got S={s} < T={t}")
    if topk < 1:
        raise ValueError(f"indexer_topk: topk must be at least 1, got {topk}")
    visible = causal_mask(t, s, s - t, scores.device)
    masked = scores.masked_fill(~visible, float("-inf"))
    # stable: among equal scores (-inf of hidden keys included) the earlier key first, so visible keys lead
    idx = masked.sort(dim=-1, descending=True, stable=True).indices[..., : min(topk, s)]
    last = torch.arange(t, device=scores.device) + (s - t)  # the last key each query sees
    return idx.masked_fill(idx > last[:, None], -1)


def indexer_kl(scores: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The lightning indexer's training loss (V3.2 report section 2.1; V4 report's indexer warm-up): per query,
    ``KL(p || softmax(I))`` over the keys in ``mask``, with ``p`` the main attention's probabilities summed over heads
    and L1-normalized over those keys; the mean over the queries that have a key with mass.

    ``scores`` (B, T, S) float, the index scores I (the only input that carries a gradient); ``target`` (B, T, S)
    float >= 0, the main attention's mass per key summed over heads (need not be normalized; detached here);
    ``mask`` (B, T, S) boolean: every visible key in the dense warm-up, the selected ones in the sparse stage.
    Returns a float32 scalar (0 when no query has a key). Raises ``ValueError`` for mismatched shapes."""
    if scores.shape != target.shape or scores.shape != mask.shape:
        raise ValueError(f"indexer_kl: scores, target and mask must have one shape (B, T, S), got "
                         f"{tuple(scores.shape)}, {tuple(target.shape)}, {tuple(mask.shape)}")
    p = target.detach().float().masked_fill(~mask, 0.0)
    total = p.sum(-1, keepdim=True)
    has = total[..., 0] > 0
    p = p / total.clamp_min(torch.finfo(torch.float32).tiny)
    log_q = torch.log_softmax(scores.float().masked_fill(~mask, float("-inf")), dim=-1)
    terms = torch.where(p > 0, p * (torch.log(p.clamp_min(torch.finfo(torch.float32).tiny)) - log_q), 0.0)
    kl = terms.sum(-1)
    return (kl * has).sum() / has.sum().clamp(min=1)  # no data-dependent shapes: one graph under torch.compile


def topk_recall(scores: torch.Tensor, target: torch.Tensor, visible: torch.Tensor, k: int) -> float:
    """Mean fraction of each query's top-``k`` keys by ``target`` (the main attention's mass, summed over heads) that
    the top-``k`` by ``scores`` (the indexer's) also holds, over queries with more than ``k`` visible keys (where
    the choice matters). ``scores``/``target`` (B, T, S), ``visible`` (B, T, S) boolean. NaN when no query
    qualifies. The indexer's quality measure (V3.2 report section 2.1: the indexer learns to pick the keys the
    dense attention weighs)."""
    rows = visible.sum(-1) > k
    if not bool(rows.any()):
        return float("nan")
    ninf = float("-inf")
    mine = scores.float().masked_fill(~visible, ninf).topk(k, -1).indices[rows]
    want = target.float().masked_fill(~visible, ninf).topk(k, -1).indices[rows]
    hit = (mine[:, :, None] == want[:, None, :]).any(-1).float()
    return float(hit.mean())


def indices_to_mask(indices: torch.Tensor, num_keys: int) -> torch.Tensor:
    """Boolean (B, T, S) selection, ``S = num_keys``, True at the keys listed in ``indices`` (B, T, k) int64;
    entries outside [0, S) (-1: an unfilled slot) select nothing."""
    b, t, _ = indices.shape
    ok = (indices >= 0) & (indices < num_keys)
    sel = torch.zeros(b, t, num_keys + 1, dtype=torch.bool, device=indices.device)
    return sel.scatter_(-1, torch.where(ok, indices, num_keys), True)[..., :num_keys]


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, indices: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """Attention of every query head over the keys its query selected (V3.2 report section 2.1: MLA attends to
    the indexer's top-k only), the op of `kernels.triton.dsa.sparse_attention`: `attend` under the mask
    `indices_to_mask` makes of ``indices``, differentiable in ``q``, ``k`` and ``v``.

    ``q`` (B, H, T, Dk), ``k`` (B, Hk, S, Dk), ``v`` (B, Hk, S, Dv) with ``H % Hk == 0``: the naive MLA form
    (Hk = H, Dk = dn + dr, Dv = dv) or the absorbed one (Hk = 1, ``k = [c_kv, k_pe]``, ``v = c_kv``); one float
    dtype. ``indices`` (B, T, NK) integer: the keys query ``t`` attends to, shared by all heads, distinct within a
    query, in any order; entries outside [0, S) (-1: an unfilled slot of `indexer_topk`) select nothing, and a
    query that selects nothing gets a zero output (and no gradient). Returns (B, H, T, Dv) in ``q.dtype``.
    Raises ``ValueError`` when ``indices`` is not (B, T, NK).
    """
    b, _, t, _ = q.shape
    if indices.ndim != 3 or tuple(indices.shape[:2]) != (b, t):
        raise ValueError(f"sparse_attention: indices must be (B, T, NK) = ({b}, {t}, NK), got "
                         f"{tuple(indices.shape)}")
    sel = indices_to_mask(indices, k.shape[2])
    empty = ~sel.any(-1, keepdim=True)  # (B, T, 1): a query that selected nothing
    sel = sel | (empty & (torch.arange(k.shape[2], device=sel.device) == 0))  # sees key 0, output zeroed below
    return attend(q, k, v, sel[:, None], scale).masked_fill(empty[:, None], 0.0)


class Indexer(nn.Module):
    """Lightning indexer. Parameters: ``wq_b`` (q_lora_rank -> H*D), ``wk`` (hidden -> D), ``k_norm``
    (LayerNorm D), ``weights_proj`` (hidden -> H), with H = index_n_heads, D = index_head_dim."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.n_heads, self.head_dim = c.index_n_heads, c.index_head_dim
        self.dr, self.topk = c.qk_rope_head_dim, c.index_topk
        self.wq_b = nn.Linear(c.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(c.hidden_size, self.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.weights_proj = nn.Linear(c.hidden_size, self.n_heads, bias=False)
        self.scale = self.head_dim**-0.5

    def _rope(self, x, cos, sin):
        pe, rest = x.split([self.dr, self.head_dim - self.dr], dim=-1)
        return torch.cat((apply_rope(pe, cos, sin, interleaved=False), rest), dim=-1)

    def project(self, x, q_latent, cos, sin, cache=None):
        """Indexer queries ``q`` (B, T, H, D), keys ``k`` (B, S, D) (cached + new, NeoX RoPE on the first
        ``qk_rope_head_dim`` dims of both) and head weights ``w`` (B, T, H) (``weights_proj(x) * H**-0.5``).

        ``x`` (B, T, hidden), ``q_latent`` (B, T, q_lora_rank). Appends the new keys to ``cache['index_k']``.
        """
        b, t, _ = x.shape
        q = self.wq_b(q_latent).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        q = self._rope(q, cos, sin).transpose(1, 2)
        k = self._rope(self.k_norm(self.wk(x)), cos, sin)  # (B, T, D)
        if cache is not None:
            (k,) = cache.update(index_k=k)
        return q, k, self.weights_proj(x) * self.n_heads**-0.5

    def scores(self, x, q_latent, cos, sin, cache=None) -> torch.Tensor:
        """Index scores (B, T, S) (at least float32) of the T new queries against all S cached + new keys
        (unmasked): `indexer_scores` of `project`."""
        return indexer_scores(*self.project(x, q_latent, cos, sin, cache), self.scale)

    def select(self, scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Boolean (B, T, S) selection from ``scores`` (B, T, S): `indexer_topk` (the causal top-``min(index_topk,
        S)`` keys of each query) restricted to ``mask`` ((T, S) or (B, T, S) boolean, True = visible), which also
        hides its False keys from the ranking. The DSA layer passes the causal mask (queries at the end of the
        keys), where the restriction changes nothing, or a padded batch's mask (`reference.attention.padding_mask`),
        where it does: a padding key never takes a slot from a real one, and a query with fewer real visible keys
        than ``index_topk`` selects all of them."""
        idx = indexer_topk(scores.masked_fill(~mask, float("-inf")), self.topk)
        return indices_to_mask(idx, scores.shape[-1]) & mask


class DSA(MLA):
    """MLA whose attention mask is restricted to the indexer's top-k selection (V3.2). Same parameters as
    MLA plus ``indexer.*``. With ``index_topk >= seq_len`` it equals MLA. The indexer's top-k is not
    differentiable; its parameters get no gradient from the LM loss (V3.2 trains them by a separate KL loss)."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.indexer = Indexer(config)
        self.indexer_training: str | None = None  # None, "dense" (warm-up) or "sparse" (`Model.set_indexer_training`)
        self.indexer_loss: torch.Tensor | None = None
        self.index_topk = config.index_topk
        self._scores: torch.Tensor | None = None

    def select_mask(self, x, q_latent, cos, sin, mask, cache):
        if mask is None:
            mask = causal_mask(x.shape[1], x.shape[1], 0, x.device)
        elif mask.ndim == 4:  # a padded batch's (B, 1, T, S) mask
            mask = mask[:, 0]
        if self.indexer_training is not None:  # scores with a gradient, from inputs detached from the LM graph
            self._scores = self.indexer.scores(x.detach(), q_latent.detach(), cos, sin, cache)
            if self.indexer_training == "dense":  # warm-up: the main attention stays dense
                return mask.expand(x.shape[0], *mask.shape[-2:])[:, None]
            return self.indexer.select(self._scores.detach(), mask)[:, None]
        with torch.no_grad():
            scores = self.indexer.scores(x, q_latent, cos, sin, cache)
            return self.indexer.select(scores, mask)[:, None]  # (B, 1, T, S)

    def observe_attention(self, q_nope, q_pe, c_kv, k_pe, mask):
        """With ``indexer_training`` set: `indexer_kl` of the scores `select_mask` kept against the main attention's
        probabilities (summed over heads) over the keys this layer attends to (``mask`` (B, 1, T, S)), in
        ``indexer_loss``."""
        if self.indexer_training is None or self._scores is None:
            return
        with torch.no_grad():
            w = self.kv_b_proj.weight.view(self.n_heads, self.dn + self.dv, self.r)[:, : self.dn]
            q_lat = torch.einsum("bhtd,hdr->bhtr", q_nope, w.to(q_nope.dtype))
            logits = (torch.einsum("bhtr,bsr->bhts", q_lat, c_kv) + torch.einsum("bhtd,bsd->bhts", q_pe, k_pe))
            probs = torch.softmax((logits.float() * self.scale).masked_fill(~mask, float("-inf")), dim=-1)
            target = probs.nan_to_num(0.0).sum(1)
        keys = mask[:, 0].expand_as(target)
        self.indexer_loss = indexer_kl(self._scores, target, keys)
        if getattr(self, "indexer_record", False):  # `reference.model.indexer_recall`
            self.indexer_observed = (self._scores.detach(), target, keys)
        self._scores = None
