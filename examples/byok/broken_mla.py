"""A deliberately broken absorbed-MLA decode, to see what `dsfs check` / `reference.testing.run` report for it.

``mla_decode(q_latent, q_pe, c_kv, k_pe, scale)`` has the op's signature, but its causal offset is one too small.
The op (`reference.mla.mla_decode`) lets query ``t`` of the T new tokens see the cached keys ``s <= t + S - T``
(the T queries are the last T of the S cached positions, so a one-step decode sees every key, its own included);
this one compares against ``t + S - T - 1``, so each query sees one key fewer: the newest one, the token's own.
Nothing crashes, the shape and dtype are right and the output looks plausible, yet every sample fails at every
dtype, with an ``o`` row far above the bound (a relative error of 0.04 to 0.13; ``one decode step, S=45`` reads
1.29e-01 against 1.0e-05 in float32), and where a query should see exactly one key (``one decode step, one
cached key``; the first query of ``prefill through the absorbed form``) it sees none and the row says "NaN or Inf
in the output":

    dsfs check mla_decode --impl examples/byok/broken_mla.py:mla_decode
"""

from __future__ import annotations

import torch


def mla_decode(q_latent: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor,
               scale: float) -> torch.Tensor:
    """``q_latent`` (B, H, T, r), ``q_pe`` (B, H, T, dr), ``c_kv`` (B, S, r), ``k_pe`` (B, S, dr) -> (B, H, T, r),
    in float32 internally. BUG (on purpose): the causal offset is one too small."""
    t, s = q_latent.shape[2], c_kv.shape[1]
    scores = (torch.einsum("bhtr,bsr->bhts", q_latent.float(), c_kv.float())
              + torch.einsum("bhtd,bsd->bhts", q_pe.float(), k_pe.float())) * scale
    query = torch.arange(t, device=scores.device)[:, None]
    key = torch.arange(s, device=scores.device)[None, :]
    visible = key <= query + (s - t) - 1  # correct: key <= query + (s - t)
    p = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    return torch.einsum("bhts,bsr->bhtr", p, c_kv.float()).to(q_latent.dtype)
