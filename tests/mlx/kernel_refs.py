"""Shared by the MLX kernel tests and the Metal emulation tests: inputs that span many binades, and the absorbed MLA
decode written with the reference's `attend` on given latents (the reference computes it inside `MLA`)."""

from __future__ import annotations

import torch

from reference.attention import attend, causal_mask


def spread(*shape):
    """randn scaled by a different power of ten per row, so tiles span many binades."""
    x = torch.randn(*shape)
    return x * 10.0 ** torch.randint(-3, 3, (*shape[:-1], 1)).float()


def ref_mla_decode(ql, qp, ckv, kpe, scale):
    """reference.mla.MLA.attend_absorbed before W_UV: one shared latent key/value head, causal to the end."""
    t, s = ql.shape[2], ckv.shape[1]
    k = torch.cat((ckv, kpe), -1)[:, None]
    return attend(torch.cat((ql, qp), -1), k, ckv[:, None], causal_mask(t, s, s - t), scale)
