"""Shared by the MLX kernel tests and the Metal emulation tests: conversions between torch and MLX, and the
reference ops written out on given inputs (the same statements as `reference`, minus the projections)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import torch

from reference.attention import causal_mask


def to_mx(t: torch.Tensor) -> mx.array:
    if t.dtype == torch.bfloat16:
        return mx.array(t.float().numpy()).astype(mx.bfloat16)
    return mx.array(t.numpy())


def to_torch(a: mx.array) -> torch.Tensor:
    if a.dtype == mx.bfloat16:
        return torch.from_numpy(np.array(a.astype(mx.float32))).to(torch.bfloat16)
    return torch.from_numpy(np.array(a))


def ref_route(logits, bias, top_k, n_group, topk_group, norm, rsf):
    """reference.moe.Router.forward after its linear layer (the same statements, on given logits)."""
    scores = torch.sigmoid(logits)
    choice = scores.detach() + bias
    if n_group > 1:
        n, e = choice.shape
        grouped = choice.view(n, n_group, e // n_group)
        group_scores = grouped.topk(2, dim=-1).values.sum(-1)
        keep = torch.zeros_like(group_scores, dtype=torch.bool)
        keep.scatter_(1, group_scores.topk(topk_group, dim=-1).indices, True)
        choice = grouped.masked_fill(~keep[..., None], float("-inf")).view(n, e)
    idx = choice.topk(top_k, dim=-1).indices
    w = scores.gather(1, idx)
    if norm:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return idx, w * rsf, scores


def ref_indexer(q, k, w, scale, topk):
    """reference.dsa.Indexer.scores/select on given projections (the same statements)."""
    t, s = q.shape[2], k.shape[1]
    logits = torch.relu(torch.einsum("bhtd,bsd->bhts", q, k) * scale)
    scores = torch.einsum("bhts,bth->bts", logits, w)
    mask = causal_mask(t, s, s - t)
    masked = scores.masked_fill(~mask, float("-inf"))
    kk = min(topk, s)
    idx = masked.sort(dim=-1, descending=True, stable=True).indices[..., :kk]
    sel = torch.zeros_like(masked, dtype=torch.bool).scatter_(-1, idx, True) & mask
    return scores, sel


def spread(*shape):
    """randn scaled by a different power of ten per row, so tiles span many binades."""
    x = torch.randn(*shape)
    return x * 10.0 ** torch.randint(-3, 3, (*shape[:-1], 1)).float()


def ref_mla_decode(ql, qp, ckv, kpe, scale):
    """reference.mla.MLA.attend_absorbed before W_UV: one shared latent key/value head, causal to the end."""
    from reference.attention import attend

    t, s = ql.shape[2], ckv.shape[1]
    k = torch.cat((ckv, kpe), -1)[:, None]
    return attend(torch.cat((ql, qp), -1), k, ckv[:, None], causal_mask(t, s, s - t), scale)
