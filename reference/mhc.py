"""Manifold-Constrained Hyper-Connections (mHC): DeepSeek-V4's residual stream (V4 report section 2.2; Xie et al.
2026, arXiv 2512.24880, building on Hyper-Connections, Zhu et al. 2024).

The residual is ``hc_mult`` = N parallel streams, (B, S, N, D) instead of (B, S, D). Around each block (attention or
FFN) a `HyperConnection` reads the streams and computes, per token, with a one-layer perceptron over the RMS-normed,
flattened streams (weights ``fn`` ((2 + N) N, N D), ``base`` ((2 + N) N), ``scale`` (3,): pre, post, comb):

- ``pre`` (B, S, N) = sigmoid(.) + eps: the weights that collapse the N streams into the block's input (B, S, D);
- ``post`` (B, S, N) = 2 sigmoid(.): the weights that expand the block's output back onto the N streams;
- ``comb`` (B, S, N, N) = softmax(.) + eps projected onto the doubly-stochastic matrices by Sinkhorn-Knopp
  (`sinkhorn_knopp`): the residual mix of the streams. Rows and columns summing to 1 make the mix a convex combination
  both ways, so repeated mixing across layers is non-expansive (the "manifold constraint" of mHC).

The block's new streams are `mhc_post`: ``out[k] = post[k] * block(x) + sum_j comb[j, k] * streams[j]``. At the top of
the model `HyperHead` collapses the streams once more (sigmoid weights, no comb) before the final norm. Parameter
names and math follow ``transformers``' ``DeepseekV4HyperConnection`` / ``DeepseekV4HyperHead`` (its V4 oracle),
which follow DeepSeek's inference code; the weights are computed in float32 whatever the streams' dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _unweighted_rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps).to(x.dtype)


def sinkhorn_knopp(m: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """Project positive matrices ``m`` (..., N, N) towards the doubly-stochastic ones by Sinkhorn-Knopp (Sinkhorn and
    Knopp 1967; mHC section 3): normalize the columns, then ``iters - 1`` times the rows and the columns (``eps``
    added to every sum, as DeepSeek-V4's code). Returns the same shape and dtype; after enough iterations every row
    and column sums to 1 (up to ``eps``). Raises ``ValueError`` for ``iters`` < 1 or a non-square last pair of dims."""
    if iters < 1:
        raise ValueError(f"sinkhorn_knopp: iters={iters}; expected >= 1")
    if m.dim() < 2 or m.shape[-1] != m.shape[-2]:
        raise ValueError(f"sinkhorn_knopp: expected (..., N, N) matrices, got shape {tuple(m.shape)}")
    m = m / (m.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        m = m / (m.sum(dim=-1, keepdim=True) + eps)
        m = m / (m.sum(dim=-2, keepdim=True) + eps)
    return m


class HyperConnection(nn.Module):
    """The mHC mapping around one block (module docstring). ``hidden_size`` D, ``hc_mult`` N streams,
    ``sinkhorn_iters`` Sinkhorn-Knopp iterations, ``hc_eps`` added to pre, comb and the Sinkhorn sums, ``rms_norm_eps``
    of the unweighted RMSNorm over the flattened streams. Parameters ``fn`` ((2 + N) N, N D), ``base`` ((2 + N) N),
    ``scale`` (3,), float32 (left uninitialized: `reset_parameters`)."""

    def __init__(self, hidden_size: int, hc_mult: int, sinkhorn_iters: int, hc_eps: float, rms_norm_eps: float):
        super().__init__()
        if hc_mult < 1 or sinkhorn_iters < 1:
            raise ValueError(f"hc_mult={hc_mult}, hc_sinkhorn_iters={sinkhorn_iters}: expected integers >= 1")
        self.hc_mult, self.sinkhorn_iters = hc_mult, sinkhorn_iters
        self.hc_eps, self.rms_norm_eps = hc_eps, rms_norm_eps
        n = (2 + hc_mult) * hc_mult
        self.fn = nn.Parameter(torch.empty(n, hc_mult * hidden_size))
        self.base = nn.Parameter(torch.empty(n))
        self.scale = nn.Parameter(torch.empty(3))

    def reset_parameters(self, std: float = 0.02) -> None:
        """``fn`` normal(0, ``std``), ``base`` 0, ``scale`` 1."""
        nn.init.normal_(self.fn, std=std)
        nn.init.zeros_(self.base)
        nn.init.ones_(self.scale)

    def forward(self, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``streams`` (B, S, N, D) -> ``(post, comb, collapsed)``: post (B, S, N) and comb (B, S, N, N) float32, and
        the block input ``sum_j pre[j] * streams[j]`` (B, S, D) in the streams' dtype. Raises ``ValueError`` for
        streams whose last two dims are not (N, D)."""
        if streams.dim() != 4 or streams.shape[2] != self.hc_mult or streams[0, 0].numel() != self.fn.shape[1]:
            raise ValueError(f"HyperConnection: streams of shape {tuple(streams.shape)}; expected (B, S, "
                             f"{self.hc_mult}, {self.fn.shape[1] // self.hc_mult})")
        collapsed, post, comb = self.pre(streams)
        return post, comb, collapsed

    def pre(self, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The hot op: `mhc_pre` with this module's parameters (a runtime overrides it with its kernel)."""
        return mhc_pre(streams, self.fn, self.base, self.scale, self.sinkhorn_iters, self.hc_eps, self.rms_norm_eps)


def mhc_pre(streams: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, sinkhorn_iters: int,
            hc_eps: float, rms_norm_eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The mHC op before a block (mHC section 3; DeepSeek-V4's ``hc_pre``): the three mixes of the N streams and the
    block input.

    ``streams`` (B, S, N, D) float; ``fn`` ((2 + N) N, N D), ``base`` ((2 + N) N,), ``scale`` (3,) float32.
    ``mixes = fn @ RMS(flatten(streams))`` (unweighted RMSNorm, ``rms_norm_eps``, in float32), split into pre (N),
    post (N) and comb (N x N): ``pre = sigmoid(mix * scale[0] + base) + hc_eps``, ``post = 2 sigmoid(mix * scale[1] +
    base)``, ``comb = sinkhorn_knopp(softmax_rows(mix * scale[2] + base) + hc_eps, sinkhorn_iters, hc_eps)``.
    Returns ``(collapsed, post, comb)``: ``collapsed = sum_j pre[j] streams[j]`` (B, S, D) in the streams' dtype,
    post (B, S, N) and comb (B, S, N, N) float32. Differentiable in every tensor. The signature of
    `kernels.triton.mhc.mhc_pre`."""
    b, s, n, d = streams.shape
    mixes = F.linear(_unweighted_rms_norm(streams.reshape(b, s, n * d).float(), rms_norm_eps), fn.float())
    pre_w, post_w, comb_w = mixes.split([n, n, n * n], dim=-1)
    pre_b, post_b, comb_b = base.float().split([n, n, n * n])
    pre_s, post_s, comb_s = scale.float().unbind(0)
    pre = torch.sigmoid(pre_w * pre_s + pre_b) + hc_eps
    post = 2 * torch.sigmoid(post_w * post_s + post_b)
    comb = torch.softmax(comb_w.unflatten(-1, (n, n)) * comb_s + comb_b.view(n, n), dim=-1) + hc_eps
    comb = sinkhorn_knopp(comb, sinkhorn_iters, hc_eps)
    collapsed = (pre.unsqueeze(-1) * streams).sum(dim=2).to(streams.dtype)
    return collapsed, post, comb


def mhc_post(block_out: torch.Tensor, post: torch.Tensor, comb: torch.Tensor, streams: torch.Tensor) -> torch.Tensor:
    """The mHC op after a block (DeepSeek-V4's ``hc_post``): ``out[k] = post[k] * block_out + sum_j comb[j, k] *
    streams[j]``. ``block_out`` (B, S, D), ``post`` (B, S, N), ``comb`` (B, S, N, N), ``streams`` (B, S, N, D) ->
    (B, S, N, D) in the streams' dtype (post and comb cast to it first, as DeepSeek-V4's code). comb is applied
    transposed: it is doubly stochastic but not symmetric, so the direction matters. Differentiable in every tensor;
    the signature of `kernels.triton.mhc.mhc_post`."""
    dtype = streams.dtype
    return post.to(dtype).unsqueeze(-1) * block_out.unsqueeze(-2) + comb.to(dtype).transpose(-1, -2) @ streams


class HyperHead(nn.Module):
    """The last collapse of the N streams before the final norm: ``sum_j pre[j] * streams[j]`` with ``pre =
    sigmoid(hc_fn RMS(flat) * hc_scale + hc_base) + hc_eps``. Parameters ``hc_fn`` (N, N D), ``hc_base`` (N,),
    ``hc_scale`` (1,), float32 (uninitialized: `reset_parameters`)."""

    def __init__(self, hidden_size: int, hc_mult: int, hc_eps: float, rms_norm_eps: float):
        super().__init__()
        self.hc_mult, self.hc_eps, self.rms_norm_eps = hc_mult, hc_eps, rms_norm_eps
        self.hc_fn = nn.Parameter(torch.empty(hc_mult, hc_mult * hidden_size))
        self.hc_base = nn.Parameter(torch.empty(hc_mult))
        self.hc_scale = nn.Parameter(torch.empty(1))

    def reset_parameters(self, std: float = 0.02) -> None:
        """``hc_fn`` normal(0, ``std``), ``hc_base`` 0, ``hc_scale`` 1."""
        nn.init.normal_(self.hc_fn, std=std)
        nn.init.zeros_(self.hc_base)
        nn.init.ones_(self.hc_scale)

    def forward(self, streams: torch.Tensor) -> torch.Tensor:
        """``streams`` (B, S, N, D) -> (B, S, D) in their dtype."""
        flat = _unweighted_rms_norm(streams.flatten(2).float(), self.rms_norm_eps)
        pre = torch.sigmoid(F.linear(flat, self.hc_fn.float()) * self.hc_scale.float() + self.hc_base.float())
        return ((pre + self.hc_eps).unsqueeze(-1) * streams).sum(dim=2).to(streams.dtype)
