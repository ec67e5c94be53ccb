"""Attention layers with Triton kernels: RoPE, flash attention, absorbed MLA decode and DSA's sparse attention.

`TritonAttentionOps` overrides the two hot ops of `reference.attention.AttentionOps` (``rotate``, ``attend``);
the layers below mix it into the reference classes, so parameters, projections and the cache stay the
reference's and only the kernels change. A padded batch (the model's ``attention_mask``) brings a (B, 1, T, S)
mask (`reference.attention.padding_mask`) that the flash-attention and absorbed-decode kernels do not take: dense
attention then runs the reference's `attend` (torch SDPA); DSA keeps its kernels, with the padding keys dropped
from its selection.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.triton.attention import attention
from kernels.triton.dsa import indexer_scores, indexer_topk, sparse_attention
from kernels.triton.mla import mla_decode
from kernels.triton.rope import rope
from reference import attention as ref_attention
from reference import dsa as ref_dsa
from reference import mla as ref_mla


@dataclass
class Selection:
    """DSA's choice of keys, passed where the reference passes a boolean mask: ``indices`` (B, T, k) int64 key
    positions per query (-1 = unused slot), shared by all heads."""

    indices: torch.Tensor


def is_padding_mask(mask) -> bool:
    """A padded batch's (B, 1, T, S) boolean mask (`reference.attention.padding_mask`), as opposed to None, the
    (T, S) causal mask of a cached step or a `Selection`."""
    return isinstance(mask, torch.Tensor) and mask.ndim == 4


class TritonAttentionOps(ref_attention.AttentionOps):
    """``rotate`` = `kernels.triton.rope.rope`; ``attend`` = flash attention (causal, queries aligned to the end
    of the keys), for a DSA `Selection` sparse attention over the selected keys, and under a padded batch's mask
    the reference's `attend` (the kernel takes no mask)."""

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return rope(x.contiguous(), cos.contiguous(), sin.contiguous(), self.interleaved)

    def attend(self, q, k, v, mask):
        """``q`` (B, H, T, Dk), ``k`` (B, Hk, S, Dk), ``v`` (B, Hk, S, Dv) -> (B, H, T, Dv). ``mask``: None
        (causal, T == S), the reference's (T, S) causal mask of a cached step (queries are the last T of the
        S keys), a `Selection`, or a padded batch's (B, 1, T, S) boolean mask (`is_padding_mask`: torch SDPA,
        `reference.attention.attend`). Raises ``ValueError`` for any other mask."""
        if is_padding_mask(mask):
            return ref_attention.attend(q, k, v, mask, self.scale)
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        if isinstance(mask, Selection):
            return sparse_attention(q, k, v, mask.indices, self.scale)
        if mask is not None and tuple(mask.shape) != (q.shape[2], k.shape[2]):
            raise ValueError(f"attend: expected no mask, the (T, S) causal mask of a cached step, a (B, 1, T, S) "
                             f"padding mask or a DSA Selection, got a mask of shape {tuple(mask.shape)}")
        return attention(q, k, v, self.scale, causal=True)


class Attention(TritonAttentionOps, ref_attention.Attention):
    """`reference.attention.Attention` (MHA/MQA/GQA) on the Triton RoPE and flash-attention kernels."""


class MLA(TritonAttentionOps, ref_mla.MLA):
    """`reference.mla.MLA` on Triton kernels: the naive form trains through flash attention (Dk != Dv); the
    absorbed form decodes over the latent cache with `kernels.triton.mla.mla_decode` when no gradient is needed
    (that kernel is forward only; it also takes DSA's selection), else, or under a padded batch's mask (which
    the kernel does not take), through `attend` over the latent (one shared key head)."""

    def attend_latent(self, q_lat, q_pe, c_kv, k_pe, mask):
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q_lat, q_pe, c_kv, k_pe))
        if needs_grad or is_padding_mask(mask):
            return super().attend_latent(q_lat, q_pe, c_kv, k_pe, mask)
        indices = mask.indices if isinstance(mask, Selection) else None  # DSA: sparse decode over the latent
        return mla_decode(q_lat.contiguous(), q_pe.contiguous(), c_kv.contiguous(), k_pe.contiguous(), self.scale,
                          indices=indices)


class DSA(MLA, ref_dsa.DSA):
    """`reference.dsa.DSA` (V3.2) on Triton kernels: indexer scores and the causal top-k are kernels, and
    attention runs over the selected keys only (`kernels.triton.dsa.sparse_attention`), in either MLA form.
    As in the reference, the selection carries no gradient to the indexer. In a padded batch the padding keys
    (other than a padding query's own) score -inf before the top-k and their slots become -1 (unused)."""

    def select_mask(self, x, q_latent, cos, sin, mask, cache):
        with torch.no_grad():
            q, k, w = self.indexer.project(x, q_latent, cos, sin, cache)
            scores = indexer_scores(q.contiguous(), k.contiguous(), w.contiguous(), self.indexer.scale)
            if not is_padding_mask(mask):
                return Selection(indexer_topk(scores, self.indexer.topk))
            visible = mask[:, 0]  # (B, T, S)
            idx = indexer_topk(scores.masked_fill(~visible, float("-inf")), self.indexer.topk)
            keep = (idx >= 0) & visible.gather(-1, idx.clamp(min=0))
            return Selection(idx.masked_fill(~keep, -1))
