"""runtime_mlx DSA: the indexer scores and indexer_topk kernels (every path, exact ties, NaN scores) against
reference.dsa, and the DSA layer's selection."""

from __future__ import annotations

import mlx.core as mx
import pytest
import torch
from mlx.utils import tree_flatten

from reference import dsa as ref_dsa
from reference.attention import causal_mask as ref_causal_mask
from reference.dsa import DSA as RefDSA
from reference.rope import RotaryEmbedding
from runtime_mlx import kernels as K
from runtime_mlx.dsa import DSA
from tests.mlx.utils import PATHS, layer_pair, to_mx, to_torch
from tests.reference_utils import make_config
from reference.testing import assert_close


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape", [(2, 4, 5, 23, 16, 7), (1, 3, 9, 9, 8, 4), (1, 2, 2, 40, 12, 64)])
def test_indexer(path, shape):
    b, h, t, s, d, topk = shape
    q, k = torch.randn(b, t, h, d, dtype=torch.float64), torch.randn(b, s, d, dtype=torch.float64)
    w = torch.randn(b, t, h, dtype=torch.float64) * h**-0.5
    q[0, 0] = 0.0  # a query whose scores are all exact zeros: ties go to the earlier key
    scale = d**-0.5
    ref_scores = ref_dsa.indexer_scores(q, k, w, scale)
    qm, km, wm = (to_mx(a.float()) for a in (q, k, w))
    scores = K.indexer_scores(qm, km, wm, scale)
    assert_close(to_torch(scores), ref_scores)
    idx = K.indexer_topk(scores, topk)
    assert idx.shape == (b, t, min(topk, s)) and idx.dtype == mx.int32
    ref_idx = ref_dsa.indexer_topk(ref_scores, topk)
    assert torch.equal(to_torch(idx).long(), ref_idx)
    assert torch.equal(to_torch(K.indices_to_mask(idx, s)), ref_dsa.indices_to_mask(ref_idx, s))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("topk", [5, 40, 200])
def test_indexer_topk_exact_ties(path, topk):
    """Equal scores rank the earlier key first (DESIGN.md), as the reference: scores are multiples of 0.5, so
    every row ties; -1 pads the slots past a query's visible keys."""
    scores = torch.round(torch.randn(2, 6, 150) * 2) / 2
    idx = K.indexer_topk(to_mx(scores), topk)
    assert torch.equal(to_torch(idx).long(), ref_dsa.indexer_topk(scores, topk))


@pytest.mark.parametrize("path", PATHS)
def test_indexer_topk_nan_scores(path):
    """NaN scores (a diverged model) rank first, as the reference (a stable sort puts NaN first)."""
    scores = torch.randn(1, 3, 30)
    scores[0, :, [4, 9]] = float("nan")
    scores[0, 2] = float("nan")  # a whole row
    idx = K.indexer_topk(to_mx(scores), 6)
    assert torch.equal(to_torch(idx).long(), ref_dsa.indexer_topk(scores, 6))


def test_dsa_selection_equals_reference():
    c = make_config("dsa", index_topk=3)
    ref, layer = layer_pair(RefDSA, DSA, c)
    x, q_lat = torch.randn(2, 10, c.hidden_size), torch.randn(2, 10, c.q_lora_rank)
    rot = RotaryEmbedding(c.rope_dim)
    cos, sin = rot(10)
    with torch.no_grad():
        expected = ref.indexer.select(ref.indexer.scores(x, q_lat, cos, sin), ref_causal_mask(10, 10, 0))
    got = layer.indexer.select(to_mx(x), to_mx(q_lat))
    assert (torch.from_numpy(__import__("numpy").array(got)) == expected).all()
    assert "indexer" not in dict(tree_flatten(layer.trainable_parameters())).get("", {})
    assert not any(n.startswith("indexer.") for n, _ in tree_flatten(layer.trainable_parameters()))
