"""runtime_mlx DSA: the batteries of the indexer scores and indexer_topk kernels (`reference.testing.dsa`, every
path: exact ties, NaN scores, -1 padding) and of sparse_attention (pure MLX), `indices_to_mask`, and the DSA
layer's selection, against the reference."""

from __future__ import annotations

import pytest
import torch
from mlx.utils import tree_flatten

from reference import dsa as ref_dsa
from reference.attention import causal_mask as ref_causal_mask
from reference.dsa import DSA as RefDSA
from reference.rope import RotaryEmbedding
from reference.testing.pytest_plugin import cases, check_case
from runtime_mlx import kernels as K
from runtime_mlx.dsa import DSA
from tests.mlx.utils import PATHS, layer_pair, to_mx, to_torch
from tests.reference_utils import make_config


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", cases("indexer_scores"))
def test_indexer_scores_battery(path, case):
    check_case(case, K.indexer_scores, "mlx")
    assert K.kernel_path("indexer_scores") == path


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", cases("indexer_topk"))
def test_indexer_topk_battery(path, case):
    """Exact ties to the earlier key, NaN first, -1 padding, as the reference (int32 indices: MLX's dtype)."""
    check_case(case, K.indexer_topk, "mlx")
    assert K.kernel_path("indexer_topk") == path


@pytest.mark.parametrize("case", cases("sparse_attention"))
def test_sparse_attention_battery(case):
    """Both MLA forms and grouped heads, -1 slots, a query selecting nothing (zero output and gradient): forward
    and the gradients of q, k and v through MLX autodiff (pure MLX, no Metal path)."""
    check_case(case, K.sparse_attention, "mlx")


def test_indices_to_mask_equals_reference():
    """`indices_to_mask` on MLX's int32 top-k (unfilled -1 slots included) is the reference's selection."""
    scores = torch.round(torch.randn(2, 5, 23) * 2) / 2
    ref_idx = ref_dsa.indexer_topk(scores, 7)
    idx = K.indexer_topk(to_mx(scores), 7)
    assert torch.equal(to_torch(idx).long(), ref_idx)
    assert torch.equal(to_torch(K.indices_to_mask(idx, 23)), ref_dsa.indices_to_mask(ref_idx, 23))


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
