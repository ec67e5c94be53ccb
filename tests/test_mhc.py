"""mHC (`reference.mhc`) against transformers' DeepSeek-V4 modules (``DeepseekV4HyperConnection``,
``DeepseekV4HyperHead`` and the stream update of ``DeepseekV4DecoderLayer``) on the same random weights: outputs and
gradients, float32, fresh random inputs, ragged sizes, hc_mult 1 and 4."""

from __future__ import annotations

import pytest
import torch

from reference.mhc import HyperConnection, HyperHead, mhc_post, sinkhorn_knopp
from reference.testing.tolerance import assert_close

v4 = pytest.importorskip("transformers.models.deepseek_v4.modeling_deepseek_v4")
DeepseekV4Config = pytest.importorskip("transformers").DeepseekV4Config

EPS, RMS_EPS = 1e-6, 1e-6


def _pair(hidden: int, n: int, iters: int, seed: int):
    """(ours, theirs, theirs_head, ours_head) with the same random weights: mixes of O(1) so the sigmoids and the
    softmax are not saturated, random biases and scales."""
    g = torch.Generator().manual_seed(seed)
    cfg = DeepseekV4Config(hidden_size=hidden, hc_mult=n, hc_sinkhorn_iters=iters, hc_eps=EPS, rms_norm_eps=RMS_EPS)
    ours, theirs = HyperConnection(hidden, n, iters, EPS, RMS_EPS), v4.DeepseekV4HyperConnection(cfg)
    head, their_head = HyperHead(hidden, n, EPS, RMS_EPS), v4.DeepseekV4HyperHead(cfg)
    for mine, other in ((ours, theirs), (head, their_head)):
        with torch.no_grad():
            for name, p in mine.named_parameters():
                scale = (n * hidden) ** -0.5 if p.dim() == 2 else 1.0
                p.copy_(torch.randn(p.shape, generator=g) * scale + (1.0 if "scale" in name else 0.0))
        other.load_state_dict(mine.state_dict())
    return ours, theirs, head, their_head


@pytest.mark.parametrize("n,iters,hidden,b,s", [(4, 20, 64, 2, 7), (4, 3, 48, 1, 5), (1, 20, 32, 3, 4),
                                                (2, 1, 40, 2, 9)])
def test_hyper_connection_equals_transformers(n, iters, hidden, b, s):
    ours, theirs, head, their_head = _pair(hidden, n, iters, seed=n * 100 + iters)
    g = torch.Generator().manual_seed(1)
    streams = torch.randn(b, s, n, hidden, generator=g, requires_grad=True)
    block_out = torch.randn(b, s, hidden, generator=g, requires_grad=True)
    out = ours(streams)
    ref = theirs(streams)
    for what, x, y in zip(("post", "comb", "collapsed"), out, ref, strict=True):
        assert_close(x, y, what=what)
    assert 0.1 < out[0].std() and (n == 1 or 0.01 < out[1].std())  # not saturated: a wrong formula shows
    new = mhc_post(block_out, *out[:2], streams)
    want = ref[0].unsqueeze(-1) * block_out.unsqueeze(-2) + torch.matmul(ref[1].transpose(-1, -2), streams)
    assert_close(new, want, what="streams after the block")
    assert_close(head(new), their_head(want), what="hyper head")
    # gradients through the whole chain, to the streams, the block output and every parameter
    w = torch.randn(b, s, hidden, generator=g)
    (head(new) * w).sum().backward()
    mine = [streams.grad.clone(), block_out.grad.clone()] + [p.grad for p in [*ours.parameters(), *head.parameters()]]
    streams.grad = block_out.grad = None
    (their_head(want) * w).sum().backward()
    other = [streams.grad, block_out.grad] + [p.grad for p in [*theirs.parameters(), *their_head.parameters()]]
    for i, (x, y) in enumerate(zip(mine, other, strict=True)):
        assert_close(x, y, what=f"gradient {i}")


def test_comb_is_doubly_stochastic_and_the_mix_non_expansive():
    g = torch.Generator().manual_seed(0)
    m = torch.rand(5, 4, 4, generator=g) + 0.01
    c = sinkhorn_knopp(m, 50, 0.0)
    assert torch.allclose(c.sum(-1), torch.ones(5, 4), atol=1e-5) and torch.allclose(c.sum(-2), torch.ones(5, 4))
    x = torch.randn(5, 4, 8, generator=g)
    # a doubly-stochastic mix never grows the largest stream norm (convex combinations both ways)
    assert (c.transpose(-1, -2) @ x).norm(dim=-1).amax() <= x.norm(dim=-1).amax() + 1e-5


def test_bad_input():
    with pytest.raises(ValueError, match="iters=0"):
        sinkhorn_knopp(torch.ones(2, 2), 0, 1e-6)
    with pytest.raises(ValueError, match=r"expected \(\.\.\., N, N\)"):
        sinkhorn_knopp(torch.ones(2, 3), 3, 1e-6)
    with pytest.raises(ValueError, match="hc_mult=0"):
        HyperConnection(8, 0, 3, 1e-6, 1e-6)
    hc = HyperConnection(8, 4, 3, 1e-6, 1e-6)
    hc.reset_parameters()
    with pytest.raises(ValueError, match=r"expected \(B, S, 4, 8\)"):
        hc(torch.randn(1, 2, 2, 16))
