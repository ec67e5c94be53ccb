"""reference/compressor.py's `gated_pool` against transformers' DeepSeek-V4 compressors (``DeepseekV4CSACompressor``,
``DeepseekV4HCACompressor``), whose pooling step it is: the same random projections and position bias, their
``kv_norm`` and RoPE made the identity so that their output is the pooled entries; in one call without a cache
(window 0 of CSA has no predecessor) and in two calls through their cache (the second call's window 0 pools the
prior window that the cache kept). Also: the reference passes its own battery, and a long sequence pooled at once
equals it pooled in two calls with the prior rows."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from reference.compressor import gated_pool
from reference.testing import assert_close, get_spec
from reference.testing.pytest_plugin import cases, check_case

v4 = pytest.importorskip("transformers.models.deepseek_v4.modeling_deepseek_v4")
DeepseekV4Config = pytest.importorskip("transformers").DeepseekV4Config

HIDDEN, HEAD_DIM, CSA_RATE, HCA_RATE = 32, 16, 4, 8


@pytest.mark.parametrize("case", cases("gated_pool", dtypes=[torch.float32]))
def test_reference_passes_its_battery(case):
    check_case(case, get_spec("gated_pool").reference, "cpu")


class _NoIndexer(nn.Module):
    """Stands in for the CSA compressor's lightning indexer: every query picks entry 0 (unused here)."""

    def forward(self, hidden_states, *args):
        return torch.zeros(*hidden_states.shape[:2], 1, dtype=torch.long)


class _Cache:
    """The part of transformers' cache a compressor reads: ``layers[layer_idx]``."""

    def __init__(self, layer):
        self.layers = [layer]


def _compressor(overlap: bool, monkeypatch):
    """A transformers compressor with random weights (gates of O(2), a random position bias), its kv_norm and RoPE
    the identity; and its config."""
    cfg = DeepseekV4Config(hidden_size=HIDDEN, head_dim=HEAD_DIM, index_head_dim=8, num_attention_heads=2,
                           index_n_heads=2, compress_rates={"compressed_sparse_attention": CSA_RATE,
                                                            "heavily_compressed_attention": HCA_RATE})
    comp = (v4.DeepseekV4CSACompressor if overlap else v4.DeepseekV4HCACompressor)(cfg)
    g = torch.Generator().manual_seed(int(overlap))
    with torch.no_grad():
        comp.kv_proj.weight.copy_(torch.randn(comp.kv_proj.weight.shape, generator=g) * HIDDEN**-0.5)
        comp.gate_proj.weight.copy_(torch.randn(comp.gate_proj.weight.shape, generator=g) * 2 * HIDDEN**-0.5)
        comp.position_bias.copy_(torch.randn(comp.position_bias.shape, generator=g))
    comp.kv_norm = nn.Identity()
    if overlap:
        comp.indexer = _NoIndexer()
    monkeypatch.setattr(v4, "apply_rotary_pos_emb", lambda x, cos, sin, unsqueeze_dim=1: x)
    return comp, cfg


def _run(comp, x, start, cache=None) -> torch.Tensor:
    pos = torch.arange(start, start + x.shape[1])[None].expand(x.shape[0], -1)
    with torch.no_grad():
        return comp(x, None, pos, cache, 0)[0][:, 0]  # (B, entries, head_dim)


@pytest.mark.parametrize("overlap", [False, True], ids=["hca", "csa"])
def test_gated_pool_equals_transformers(overlap, monkeypatch):
    comp, _ = _compressor(overlap, monkeypatch)
    m = CSA_RATE if overlap else HCA_RATE
    x = torch.randn(2, 3 * m + 2, HIDDEN)  # two tokens past the last full window: dropped
    theirs = _run(comp, x, 0)
    with torch.no_grad():
        kv, gate = comp.kv_proj(x[:, : 3 * m]), comp.gate_proj(x[:, : 3 * m])
    ours = gated_pool(kv.double(), gate.double(), comp.position_bias.double(), overlap)
    assert theirs.shape == ours.shape == (2, 3, HEAD_DIM)
    assert theirs.std() > 0.1
    assert_close(theirs, ours, what="pooled entries")


@pytest.mark.parametrize("overlap", [False, True], ids=["hca", "csa"])
def test_gated_pool_with_prior_rows_equals_transformers_cache(overlap, monkeypatch):
    """Two calls through transformers' cache (2 m + 2 tokens, then 2 m - 1: windows 0-1, then 2-3, CSA's window 2
    pooling the prior window the cache kept) against gated_pool on each call's windows, the second with the prior
    rows (first halves of window 1, bias added)."""
    comp, cfg = _compressor(overlap, monkeypatch)
    m = CSA_RATE if overlap else HCA_RATE
    cache = _Cache((v4.DeepseekV4CSACache if overlap else v4.DeepseekV4HCACache)(cfg))
    x = torch.randn(2, 4 * m + 1, HIDDEN)
    first, t1 = 2 * m + 2, 2 * m
    _run(comp, x[:, :first], 0, cache)
    theirs = _run(comp, x[:, first:], first, cache)  # every entry so far
    with torch.no_grad():
        kv, gate = comp.kv_proj(x).double(), comp.gate_proj(x).double()
    bias = comp.position_bias.double()
    one = gated_pool(kv[:, :t1], gate[:, :t1], bias, overlap)
    d = HEAD_DIM
    prior = (kv[:, t1 - m : t1, :d], gate[:, t1 - m : t1, :d] + bias[:, :d]) if overlap else (None, None)
    two = gated_pool(kv[:, t1 : 4 * m], gate[:, t1 : 4 * m], bias, overlap, *prior)
    assert theirs.shape == (2, 4, d)
    assert_close(theirs, torch.cat([one, two], 1), what="entries of both calls")
    assert_close(torch.cat([one, two], 1), gated_pool(kv[:, : 4 * m], gate[:, : 4 * m], bias, overlap),
                 torch.float64, what="two calls with the prior rows vs one call")
