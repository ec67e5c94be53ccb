"""reference/sink_attention.py: the op against a dense masked softmax-with-sink written here (outputs and the
gradients of q, kv and sinks), the sink's properties, and `window_indices`. The kernels' tests: tests/cuda,
tests/mlx and tests/metal_emulation (test_sink_attention.py each)."""

from __future__ import annotations

import torch

from reference.sink_attention import sink_attention, window_indices
from reference.testing import assert_close
from reference.testing.sink_attention import random_indices


def dense_sink_attention(q, kv, sinks, indices, scale):
    """The op over all L rows under a (B, S, L) selection mask, the sink's term added to the normalizer by hand."""
    n_rows = kv.shape[1]
    sel = torch.zeros(*indices.shape[:2], n_rows + 1, dtype=torch.bool)
    sel.scatter_(2, torch.where((indices >= 0) & (indices < n_rows), indices, n_rows), True)
    sel = sel[..., :n_rows, None].transpose(-1, -2)  # (B, S, 1, L)
    z = torch.einsum("bshd,bld->bshl", q, kv) * scale
    m = torch.maximum(z.masked_fill(~sel, float("-inf")).amax(-1), sinks)  # (B, S, H)
    e = torch.exp(z - m[..., None]) * sel
    p = e / (e.sum(-1) + torch.exp(sinks - m))[..., None]
    return torch.einsum("bshl,bld->bshd", p, kv)


def sink_inputs(b=2, s=4, h=3, d=16, n_rows=30, k=12, empty=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, kv, sinks = (torch.randn(*shape, generator=g, dtype=torch.float64) for shape in ((b, s, h, d), (b, n_rows, d),
                                                                                        (h,)))
    idx = random_indices(g, b, s, n_rows, k, empty)
    idx[0, 1] = -1  # no valid index
    idx[1, 0, 0] = n_rows + 5  # past the last row
    return q, kv, sinks, idx, d**-0.5


def test_reference_equals_dense_masked_softmax_with_sink():
    """Output and the gradients of q, kv and sinks; a query with no valid index gets zero output and dq."""
    q, kv, sinks, idx, scale = sink_inputs()
    for a in (q, kv, sinks):
        a.requires_grad_()
    out, dense = sink_attention(q, kv, sinks, idx, scale), dense_sink_attention(q, kv, sinks, idx, scale)
    assert_close(out, dense, torch.float64)
    cot = torch.randn(out.shape, dtype=torch.float64)
    grads = torch.autograd.grad(out, (q, kv, sinks), cot)
    for name, g, want in zip(("dq", "dkv", "dsinks"), grads, torch.autograd.grad(dense, (q, kv, sinks), cot),
                             strict=True):
        assert_close(g, want, torch.float64, what=name)
    assert (out[0, 1] == 0).all() and (grads[0][0, 1] == 0).all()
    assert grads[2].abs().min() > 0  # every head's sink is felt


def test_reference_sink_properties():
    """The weights of a query with a valid index sum to less than one, less as the sink grows, exactly one with a
    sink of -inf (plain softmax); the order of the indices and extra empty slots change nothing."""
    q, kv, sinks, idx, scale = sink_inputs()
    some = ((idx >= 0) & (idx < kv.shape[1])).any(-1)  # (B, S): queries with a valid index
    ones = torch.ones_like(kv)
    mass = sink_attention(q, ones, sinks, idx, scale)[..., 0][some]  # the sum of the weights per (query, head)
    assert (mass < 1).all() and (sink_attention(q, ones, sinks + 1, idx, scale)[..., 0][some] < mass).all()
    plain = sink_attention(q, ones, torch.full_like(sinks, float("-inf")), idx, scale)[..., 0][some]
    assert_close(plain, torch.ones_like(plain), torch.float64)
    padded = torch.cat((idx[..., torch.randperm(idx.shape[-1])], torch.full_like(idx[..., :3], -1)), -1)
    assert_close(sink_attention(q, kv, sinks, padded, scale), sink_attention(q, kv, sinks, idx, scale), torch.float64)


def test_window_indices():
    """Query i (position offset + i) sees positions within the window, as rows of [cached; new]."""
    offset, cached, window, s = 5, 3, 4, 3
    got = window_indices(s, offset, cached, window)
    want = [[p - (offset - cached) if p >= 0 and p >= offset - cached else -1 for p in range(pos - window + 1, pos + 1)]
            for pos in range(offset, offset + s)]
    assert got.tolist() == want
