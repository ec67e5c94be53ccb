"""Context parallelism for training: the sequence is split over the ``cp`` ranks, and each MLA layer all-gathers
the small latent K/V (``c_kv`` and ``k_pe``) of the whole sequence before attending.

Why an all-gather of MLA's latent rather than ring attention: MLA caches ``kv_lora_rank + qk_rope_head_dim``
numbers per token (512 + 64 = 576 in DeepSeek-V3) where a per-head K/V holds ``heads x (qk_head_dim + v_head_dim)``
(128 x 320 = 40,960): gathering the latent moves 1/71 of what a ring pass of the up-projected keys and values would,
each rank up-projects the gathered latent itself (``kv_b_proj``, as the naive form does anyway), and the softmax
stays one exact softmax over all keys (no online-softmax merging of partial results, so the result equals one
process's to float rounding). Ring attention's strength, never holding the whole sequence's K/V, matters little when
the whole sequence's latent is that small; the attention scores of a rank's queries against all keys are computed in
one piece.

Causal load balancing: the sequence is cut into ``2 cp`` chunks and rank ``i`` holds chunks ``i`` and ``2 cp - 1 -
i`` (`positions`), so every rank has as many early (cheap) as late (expensive) queries under the causal mask. The
model computes only those positions (`reference.Model.loss` with ``positions``); each MLA layer gathers the latent of
every rank in one differentiable all-gather (its backward a reduce-scatter) and puts it back in sequence order.
"""

from __future__ import annotations

import torch
from torch import nn

from dsfs.errors import ConfigError
from reference.dsa import DSA
from reference.mla import MLA


def positions(seq_len: int, cp: int, rank: int, device=None) -> torch.Tensor:
    """The (seq_len / cp,) int64 positions rank ``rank`` of ``cp`` computes: chunks ``rank`` and ``2 cp - 1 - rank``
    of the ``2 cp`` chunks of the sequence (causal load balancing), in increasing order. ``seq_len`` must divide by
    ``2 cp`` (`dsfs.parallel.layout.ParallelDims.check_batch`)."""
    c = seq_len // (2 * cp)
    first = torch.arange(rank * c, (rank + 1) * c, device=device)
    second = torch.arange((2 * cp - 1 - rank) * c, (2 * cp - rank) * c, device=device)
    return torch.cat((first, second))


class ContextParallelMLA:
    """Mixed into an MLA layer's class by `apply_cp`: ``forward`` projects its own positions, all-gathers the
    latent (``c_kv``, ``k_pe``) over the ``cp`` group and attends its queries to every key under the (T', T) causal
    mask `reference.Model` builds from the positions. Training only (no cache)."""

    cp_group = None
    cp_size = 1

    def forward(self, x, cos, sin, cache=None, offset: int = 0, mask=None):
        if cache is not None or mask is None:
            raise ValueError("context-parallel MLA trains on positions of whole sequences (Model.loss with "
                             "positions): no cache, and the causal mask by position")
        from torch.distributed._functional_collectives import all_gather_single_autograd

        b, t, _ = x.shape
        q_nope, q_pe, c_kv, k_pe, _ = self.project(x, cos, sin)
        latent = torch.cat((c_kv, k_pe), dim=-1).transpose(0, 1).contiguous()  # (T', B, r + dr): gather dim 0
        gathered = all_gather_single_autograd(latent, gather_dim=0, group=self.cp_group)
        seq = t * self.cp_size  # the ranks' positions in rank order, back to sequence order
        order = torch.cat([positions(seq, self.cp_size, r, x.device) for r in range(self.cp_size)]).argsort()
        full = gathered[order].transpose(0, 1)
        c_all, k_pe_all = full.split([self.r, self.dr], dim=-1)
        o = self.attend_naive(q_nope, q_pe, c_all, k_pe_all, mask)
        return self.o_proj(o.transpose(1, 2).reshape(b, t, self.n_heads * self.dv))


def apply_cp(model: nn.Module, cp_mesh) -> None:
    """Make every MLA layer of ``model`` (decoder and MTP layers) context-parallel over the 1-D ``cp_mesh``
    (`ContextParallelMLA`), in place; parameter names unchanged. Raises `ConfigError` for a model with another
    attention (MHA/GQA, or DSA: its indexer's top-k over the whole sequence is not split here)."""
    group, size = cp_mesh.get_group(), cp_mesh.size()
    for m in model.modules():
        if isinstance(m, MLA) and not isinstance(m, ContextParallelMLA):
            if isinstance(m, DSA):
                raise ConfigError("--cp: context parallelism splits MLA attention; DSA's indexer is not supported")
            m.__class__ = type(f"ContextParallel{type(m).__name__}", (ContextParallelMLA, type(m)), {})
            m.cp_group, m.cp_size = group, size
    attn = [m for m in model.modules() if hasattr(m, "o_proj") and not isinstance(m, ContextParallelMLA)]
    if attn:
        raise ConfigError(f"--cp: context parallelism splits MLA attention; the model's {type(attn[0]).__name__} "
                          "layers are not supported")
