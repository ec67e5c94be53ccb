"""DeepSeek-V4's KV compressors (V4 report section 2.3): every ``m`` tokens become one compressed entry by a learned
gated pooling, and CSA's lightning indexer picks, per query, the top-k compressed entries.

- Heavily Compressed Attention (HCA, section 2.3.2, eqs. 20-23): ``m' = 128``, non-overlapping windows:
  ``C_w = sum_{j in window w} softmax_j(Z_j + B) * C_j`` with ``C = H W^KV`` and ``Z = H W^Z`` (``kv_proj``,
  ``gate_proj``), ``B`` the learned position bias (``position_bias``, DeepSeek's ``ape``), the softmax over the
  window's tokens per feature.
- Compressed Sparse Attention (CSA, section 2.3.1, eqs. 9-12): ``m = 4`` with overlapping windows: each token gives
  two series (``kv_proj`` is 2 D wide), ``Ca = [..., :D]`` and ``Cb = [..., D:]``; entry ``w`` pools window ``w``'s
  ``Cb`` with window ``w - 1``'s ``Ca`` over ``2 m`` slots (width 2m, stride m). The first window of a sequence has
  no predecessor (its slots get weight 0); with a cache, the last window's ``Ca`` waits for the next call.
- Then RMSNorm (``kv_norm``) and RoPE at the window's first position (the ``compress`` rotary) on the trailing dims.
- The CSA indexer (eqs. 13-17) runs its own compressor at ``index_head_dim`` and scores queries against its entries
  with DSA's ``sum_h w_h relu(q_h . k)`` (`reference.dsa.indexer_scores`); query ``t`` sees entry ``w`` only once the
  window is complete, ``w < (t + 1) // m``.

Names and layout follow ``transformers``' ``DeepseekV4HCACompressor`` / ``DeepseekV4CSACompressor`` /
``DeepseekV4Indexer`` (its V4 oracle), which follow DeepSeek-V4's inference code.
"""

from __future__ import annotations

import torch
from torch import nn

from .dsa import indexer_scores
from .rms_norm import RMSNorm


def gated_pool(kv: torch.Tensor, gate: torch.Tensor, position_bias: torch.Tensor, overlap: bool,
               prior_kv: torch.Tensor | None = None, prior_gate: torch.Tensor | None = None) -> torch.Tensor:
    """The compressor's gated pooling (the op of `kernels.triton.compressor.gated_pool`).

    ``kv``, ``gate`` (B, T, C) float, the projections of T = n m window-aligned tokens; ``position_bias`` (m, C)
    float32 added to the gates of each window's m slots (m = ``position_bias.shape[0]``). Without ``overlap``
    (HCA) C = D and entry ``w = sum_r softmax_r(gate + bias)[w, r] * kv[w, r]``. With ``overlap`` (CSA) C = 2 D and
    entry ``w`` pools 2 m slots: window ``w - 1``'s first halves ``[..., :D]`` then window ``w``'s second halves
    ``[..., D:]``; for ``w = 0`` the predecessor is ``prior_kv``/``prior_gate`` (B, m, D) (the previous call's last
    window, bias already added, from the cache) or, when None, nothing (weight 0). The softmax is per feature, in
    float32. Returns (B, n, D) in ``kv.dtype``. Differentiable in ``kv``, ``gate``, ``position_bias``.
    Raises ``ValueError`` when T is not a multiple of m or the widths disagree.
    """
    b, t, c = kv.shape
    m = position_bias.shape[0]
    if gate.shape != kv.shape or position_bias.shape != (m, c) or t % m:
        raise ValueError(f"gated_pool: kv and gate (B, T, C) with T a multiple of m and position_bias (m, C); got "
                         f"{tuple(kv.shape)}, {tuple(gate.shape)}, {tuple(position_bias.shape)}")
    n = t // m
    kv = kv.view(b, n, m, c)
    gate = gate.view(b, n, m, c) + position_bias
    if overlap:
        if c % 2:
            raise ValueError(f"gated_pool: overlap needs an even width C = 2 D, got C={c}")
        d = c // 2
        if prior_kv is None:
            first_kv = kv.new_zeros(b, 1, m, d)
            first_gate = gate.new_full((b, 1, m, d), float("-inf"))
        else:
            first_kv, first_gate = prior_kv[:, None].to(kv.dtype), prior_gate[:, None].to(gate.dtype)
        ca_kv = torch.cat((first_kv, kv[:, :-1, :, :d]), dim=1)
        ca_gate = torch.cat((first_gate, gate[:, :-1, :, :d]), dim=1)
        kv = torch.cat((ca_kv, kv[..., d:]), dim=2)  # (B, n, 2m, D)
        gate = torch.cat((ca_gate, gate[..., d:]), dim=2)
    weights = torch.softmax(gate, dim=2, dtype=torch.float32).to(kv.dtype)
    return (kv * weights).sum(dim=2)


def visible_entries(positions: torch.Tensor, num_entries: int, compress_rate: int) -> torch.Tensor:
    """Boolean (..., C): the query at absolute position ``p`` (``positions`` (...,) int) sees compressed entry ``w``
    once its window is complete, ``w < (p + 1) // compress_rate``; C = ``num_entries``."""
    return torch.arange(num_entries, device=positions.device) < ((positions + 1) // compress_rate)[..., None]


def compressed_topk(scores: torch.Tensor, visible: torch.Tensor, topk: int) -> torch.Tensor:
    """CSA's top-k of the indexer scores (V4 report eq. 17): int64 (B, S, k) entry indices, ``k = min(topk, C)``,
    best first, -1 for slots a query cannot fill (fewer visible entries than k).

    ``scores`` (B, S, C) float; ``visible`` (S, C) or (B, S, C) boolean (`visible_entries`): hidden entries never
    take a slot. Ties go to the earlier entry (a stable descending sort, DESIGN.md "Ties in any top-k"). Differs from
    DSA's `reference.dsa.indexer_topk` only in the causal rule (a compressed entry becomes visible when its window
    closes, not at its own position)."""
    c = scores.shape[-1]
    masked = scores.masked_fill(~visible, float("-inf"))
    order = masked.sort(dim=-1, descending=True, stable=True).indices[..., : min(topk, c)]
    ok = torch.gather(visible.expand_as(scores), -1, order)
    return order.masked_fill(~ok, -1)


class CompressorState:
    """What a compressor keeps between calls (one per compressor in a layer's cache): ``pending_kv``/``pending_gate``
    (B, r, C), the r < m projected rows of the window still open; ``prior_kv``/``prior_gate`` (B, m, D), the last
    closed window's first halves (CSA's overlap; bias added), or None; ``entries`` (B, n, D), every compressed entry
    so far (after norm and RoPE); ``count`` = n."""

    def __init__(self):
        self.pending_kv = self.pending_gate = self.prior_kv = self.prior_gate = self.entries = None
        self.count = 0

    def nbytes(self) -> int:
        """Bytes held (one sequence of the batch)."""
        return sum(t[0].numel() * t.element_size() for t in (self.pending_kv, self.pending_gate, self.prior_kv,
                                                             self.prior_gate, self.entries) if t is not None)


class Compressor(nn.Module):
    """One KV compressor: ``kv_proj``, ``gate_proj`` (hidden -> C), ``position_bias`` (m, C, float32), ``kv_norm``
    (RMSNorm over D), with C = 2 D when ``overlap`` (CSA) else D (HCA). ``rope(x, positions)`` rotates the trailing
    features of the entries (the layer's ``compress`` RoPE). See the module docstring."""

    def __init__(self, hidden_size: int, head_dim: int, compress_rate: int, overlap: bool, rms_norm_eps: float):
        super().__init__()
        width = 2 * head_dim if overlap else head_dim
        self.head_dim, self.compress_rate, self.overlap = head_dim, compress_rate, overlap
        self.kv_proj = nn.Linear(hidden_size, width, bias=False)
        self.gate_proj = nn.Linear(hidden_size, width, bias=False)
        self.position_bias = nn.Parameter(torch.zeros(compress_rate, width))
        self.kv_norm = RMSNorm(head_dim, rms_norm_eps)

    pool = staticmethod(gated_pool)
    """The hot op: `gated_pool` (a runtime overrides it with its kernel)."""

    def compress(self, x: torch.Tensor, rope, state: CompressorState | None = None) -> torch.Tensor:
        """Entries (B, n, D) of every window closed so far: those of ``state`` (the cache) plus the windows that the
        new tokens ``x`` (B, S, hidden) close. Without a state the S tokens start at position 0 and an unfinished
        last window is dropped; with one, its rows wait in the state for the next call."""
        kv, gate = self.kv_proj(x), self.gate_proj(x)
        first, prior_kv, prior_gate = 0, None, None
        if state is not None:
            if state.pending_kv is not None:
                kv, gate = torch.cat((state.pending_kv, kv), 1), torch.cat((state.pending_gate, gate), 1)
            first, prior_kv, prior_gate = state.count * self.compress_rate, state.prior_kv, state.prior_gate
        m = self.compress_rate
        usable = kv.shape[1] // m * m
        if usable:
            pooled = self.pool(kv[:, :usable], gate[:, :usable], self.position_bias, self.overlap, prior_kv,
                               prior_gate)
            pos = first + m * torch.arange(usable // m, device=x.device)
            new = rope(self.kv_norm(pooled), pos)
        else:
            new = kv.new_zeros(kv.shape[0], 0, self.head_dim)
        if state is None:
            return new
        if usable and self.overlap:
            d = self.head_dim
            state.prior_kv = kv[:, usable - m:usable, :d].clone()  # copies: a view would keep the prefill alive
            state.prior_gate = gate[:, usable - m:usable, :d] + self.position_bias[:, :d]
        state.pending_kv, state.pending_gate = kv[:, usable:].clone(), gate[:, usable:].clone()
        state.entries = new if state.entries is None else torch.cat((state.entries, new), 1)
        state.count += new.shape[1]
        return state.entries


class Indexer(Compressor):
    """CSA's lightning indexer (V4 report eqs. 13-17): a CSA compressor at ``index_head_dim`` (its keys), queries
    ``q_b_proj`` of the attention's query latent (``index_n_heads`` heads, ``compress`` RoPE), head weights
    ``scorer.weights_proj(x) * index_n_heads**-0.5``; ``select`` returns the top-``index_topk`` visible entries."""

    def __init__(self, hidden_size: int, q_lora_rank: int, n_heads: int, head_dim: int, topk: int,
                 compress_rate: int, rms_norm_eps: float):
        super().__init__(hidden_size, head_dim, compress_rate, True, rms_norm_eps)
        self.n_heads, self.topk = n_heads, topk
        self.q_b_proj = nn.Linear(q_lora_rank, n_heads * head_dim, bias=False)
        self.scorer = nn.Module()
        self.scorer.weights_proj = nn.Linear(hidden_size, n_heads, bias=False)

    def scores(self, x: torch.Tensor, q_latent: torch.Tensor, positions: torch.Tensor, rope,
               state: CompressorState | None = None) -> torch.Tensor:
        """Index scores (B, S, C) float32 of the S new queries (absolute ``positions`` (S,)) against every compressed
        key (`reference.dsa.indexer_scores`), unmasked."""
        keys = self.compress(x, rope, state)
        b, s, _ = x.shape
        q = rope(self.q_b_proj(q_latent).view(b, s, self.n_heads, self.head_dim), positions, heads=True)
        w = self.scorer.weights_proj(x) * self.n_heads**-0.5
        return indexer_scores(q, keys, w, self.head_dim**-0.5)

    def select(self, scores: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Top-``index_topk`` visible entries (B, S, k) int64, -1 for unfilled slots (`compressed_topk`)."""
        visible = visible_entries(positions, scores.shape[-1], self.compress_rate)
        return compressed_topk(scores, visible, self.topk)
