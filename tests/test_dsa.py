"""reference/dsa.py: DeepSeek Sparse Attention (V3.2): lightning indexer, causal top-k selection, sparse MLA."""

from __future__ import annotations

import pytest
import torch

from reference import Model
from reference.attention import attend, causal_mask
from reference.cache import LayerCache
from reference.dsa import DSA, indexer_topk, indices_to_mask, sparse_attention
from reference.mla import MLA
from reference.rope import RotaryEmbedding
from reference.testing import assert_close, rel_err
from tests.reference_utils import (
    gradcheck_module,
    make_config,
    make_model,
    naive_index_scores,
    naive_mla,
    rand_ids,
    randomize_,
)


def _dsa(index_topk, dtype=torch.float64, **kw):
    c = make_config("dsa", index_topk=index_topk, **kw)
    layer = randomize_(DSA(c, 0)).to(dtype)
    return c, layer, RotaryEmbedding(c.qk_rope_head_dim, c.rope_theta, c.rope_scaling)


def _dense_twin(c, layer):
    """An MLA layer with the DSA layer's weights (all but ``indexer.*``), loaded strictly."""
    mla = MLA(make_config("mla", q_lora_rank=c.q_lora_rank), 0).to(layer.o_proj.weight.dtype)
    sd = {k: v for k, v in layer.state_dict().items() if not k.startswith("indexer.")}
    mla.load_state_dict(sd, strict=True)
    return mla


def _selection(layer, x, cos, sin):
    """The DSA layer's (B, T, S) boolean selection for a full pass."""
    _, _, _, _, q_latent = layer.project(x, cos, sin)
    t = x.shape[1]
    scores = layer.indexer.scores(x, q_latent, cos, sin)
    return layer.indexer.select(scores, torch.ones(t, t, dtype=torch.bool).tril()), scores


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("index_topk", [9, 64])
def test_dsa_with_topk_ge_seq_equals_dense_mla(dtype, index_topk):
    c, layer, rot = _dsa(index_topk, dtype)
    x = torch.randn(3, 9, c.hidden_size, dtype=dtype)
    cos, sin = rot(9, 0, dtype=dtype)
    out = layer(x, cos, sin)
    assert out.std() > 0.1
    err = assert_close(out, _dense_twin(c, layer)(x, cos, sin), dtype, what="DSA vs MLA")
    print(f"DSA(topk={index_topk}) vs MLA {dtype}: {err:.2e}")


def test_dsa_model_with_topk_ge_seq_equals_mla_model():
    c = make_config("dsa", index_topk=64, num_nextn_predict_layers=1)
    dsa = make_model(c)
    mla = Model(make_config("mla", q_lora_rank=c.q_lora_rank, num_nextn_predict_layers=1)).eval()
    sd = {k: v for k, v in dsa.state_dict().items() if ".indexer." not in k}
    mla.load_state_dict(sd, strict=True)
    ids = rand_ids(c, 3, 11)
    out = dsa(ids)
    err = assert_close(out, mla(ids), torch.float32, what="DSA model vs MLA model")
    print(f"DSA model (topk 64 >= 11) vs MLA model: {err:.2e}")


def test_indexer_scores_equal_naive():
    c, layer, rot = _dsa(4)
    x = torch.randn(3, 9, c.hidden_size, dtype=torch.float64)
    cos, sin = rot(9, 0, dtype=torch.float64)
    q_latent = layer.project(x, cos, sin)[4]
    ref = naive_index_scores(layer.indexer, x, q_latent, cos, sin)
    assert ref.std() > 0.05 and (ref < 0).any() and (ref > 0).any()
    assert_close(layer.indexer.scores(x, q_latent, cos, sin), ref, torch.float32)  # scores run in float32
    assert_close(layer.indexer.scores(x, q_latent, cos, sin), ref, torch.float64)


@pytest.mark.parametrize("index_topk", [1, 3, 5])
def test_indexer_select_is_causal_top_k(index_topk):
    c, layer, rot = _dsa(index_topk)
    b, t = 3, 9
    x = torch.randn(b, t, c.hidden_size, dtype=torch.float64)
    sel, scores = _selection(layer, x, *rot(t, 0, dtype=torch.float64))
    assert sel.shape == (b, t, t) and sel.dtype == torch.bool
    counts = sel.sum(-1)
    expected = torch.clamp(torch.arange(t) + 1, max=index_topk).expand(b, t)
    assert torch.equal(counts, expected), counts
    assert not (sel & ~torch.ones(t, t, dtype=torch.bool).tril()).any(), "selection reaches a future key"
    for bb in range(b):
        for i in range(t):
            visible = scores[bb, i, : i + 1]
            chosen = sel[bb, i, : i + 1]
            if (~chosen).any():
                assert visible[chosen].min() >= visible[~chosen].max()


def naive_indexer_topk(scores, topk):
    """`indexer_topk` query by query: the visible keys ``j <= t + S - T`` ranked by (NaN first, higher score,
    earlier key), the first ``min(topk, S)`` of them, -1 padded."""
    b, t, s = scores.shape
    out = torch.full((b, t, min(topk, s)), -1, dtype=torch.int64)
    for bb in range(b):
        for i in range(t):
            row = scores[bb, i].tolist()
            keys = sorted(range(i + s - t + 1), key=lambda j: (row[j] == row[j], -row[j] if row[j] == row[j] else 0))
            keys = keys[: min(topk, s)]
            out[bb, i, : len(keys)] = torch.tensor(keys, dtype=torch.int64)
    return out


@pytest.mark.parametrize("b,t,s,topk", [(2, 5, 29, 5), (1, 4, 13, 20), (1, 1, 40, 8), (2, 7, 7, 3)],
                         ids=["offset", "topk>S", "decode", "full"])
def test_indexer_topk_equals_naive(b, t, s, topk):
    """Causal with the queries at the end of the keys, -1 for slots a query cannot fill, exact ties (scores
    from nine values, +0.0 and -0.0 among them) to the earlier key, NaN of either sign first, -inf kept."""
    torch.manual_seed(s + topk)
    scores = torch.randint(-4, 5, (b, t, s)).float() / 4
    scores[torch.rand(b, t, s) < 0.2] = -0.0
    scores[0, -1, 3] = float("nan")
    scores[0, 0, 0] = -float("nan")
    scores[-1, -1, 1] = -float("inf")
    for dtype in (torch.float32, torch.float64):
        idx = indexer_topk(scores.to(dtype), topk)
        assert idx.dtype == torch.int64 and idx.shape == (b, t, min(topk, s))
        assert torch.equal(idx, naive_indexer_topk(scores, topk))


def test_indexer_topk_rows_agree_between_full_and_cached_passes():
    """Query ``i`` of a full pass and the same query alone against its ``i + 1`` keys (a decode step, whose
    ``k = min(4, i + 1)``): the same keys in the same order, ties included."""
    scores = torch.randint(-2, 3, (2, 9, 9)).float()
    full = indexer_topk(scores, 4)
    for i in range(9):
        row = indexer_topk(scores[:, i : i + 1, : i + 1], 4)
        k = row.shape[-1]
        assert k == min(4, i + 1) and torch.equal(full[:, i : i + 1, :k], row) and (full[:, i, k:] == -1).all()


def test_indices_to_mask():
    idx = torch.tensor([[[2, 0, -1], [1, 3, 2]]])
    assert indices_to_mask(idx, 4).tolist() == [[[True, False, True, False], [False, True, True, True]]]


def test_indexer_topk_bad_arguments_raise():
    with pytest.raises(ValueError, match=r"scores must be \(B, T, S\)"):
        indexer_topk(torch.randn(3, 4), 2)
    with pytest.raises(ValueError, match="S=3 < T=4"):
        indexer_topk(torch.randn(1, 4, 3), 2)
    with pytest.raises(ValueError, match="topk must be at least 1, got 0"):
        indexer_topk(torch.randn(1, 4, 5), 0)


def test_indexer_select_respects_given_mask():
    """With a cache offset the mask is (T, S) with S > T: still min(topk, visible) keys, all visible."""
    c, layer, _ = _dsa(4)
    scores = torch.randn(3, 2, 7)
    mask = causal_mask(2, 7, 5)  # rows see 6 and 7 keys
    sel = layer.indexer.select(scores, mask)
    assert sel.sum(-1).tolist() == [[4, 4]] * 3
    assert not (sel & ~mask).any()


@pytest.mark.parametrize("q_len", [9, 12])
def test_dsa_sparse_equals_masked_naive_and_differs_from_dense(q_len):
    c, layer, rot = _dsa(3)
    x = torch.randn(3, q_len, c.hidden_size, dtype=torch.float64)
    cos, sin = rot(q_len, 0, dtype=torch.float64)
    q_latent = layer.project(x, cos, sin)[4]
    scores = naive_index_scores(layer.indexer, x, q_latent, cos, sin)
    select = indices_to_mask(indexer_topk(scores, 3), q_len)
    ref = naive_mla(layer, x, cos, sin, select=select)
    out = layer(x, cos, sin)
    dense = _dense_twin(c, layer)(x, cos, sin)
    assert_close(out, ref, torch.float64, what="DSA vs masked naive MLA")
    assert rel_err(out, dense) > 1e-2, "sparse selection had no effect"


@pytest.mark.parametrize("absorb", [None, False, True])
def test_dsa_cache_decode_equals_full(absorb):
    c, layer, rot = _dsa(3, torch.float32)
    layer.absorb = absorb
    b, t, pre = 3, 11, 5
    x = torch.randn(b, t, c.hidden_size)
    full = layer(x, *rot(t, 0))
    cache = LayerCache()
    outs = [layer(x[:, :pre], *rot(pre, 0), cache=cache)]
    for i in range(pre, t):
        outs.append(layer(x[:, i : i + 1], *rot(1, i), cache=cache, offset=i))
    err = assert_close(torch.cat(outs, 1), full, torch.float32, what="DSA decode vs full")
    print(f"DSA layer decode vs full (absorb={absorb}): {err:.2e}")
    assert set(cache.tensors) == {"c_kv", "k_pe", "index_k"}
    assert cache.tensors["index_k"].shape == (b, t, c.index_head_dim)
    assert cache.nbytes_per_token() == (c.kv_lora_rank + c.qk_rope_head_dim + c.index_head_dim) * 4


def test_gradcheck_dsa_with_fixed_selection():
    c, layer, rot = _dsa(2, torch.float64, hidden_size=16, num_attention_heads=2, q_lora_rank=6,
                         kv_lora_rank=6, qk_nope_head_dim=4, qk_rope_head_dim=2, v_head_dim=3,
                         index_n_heads=2, index_head_dim=4)
    x = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    cos, sin = rot(5, 0, dtype=torch.float64)
    names = ("q_a_proj.weight", "q_b_proj.weight", "kv_a_proj_with_mqa.weight", "kv_b_proj.weight")
    assert gradcheck_module(layer, lambda m, x: m(x, cos, sin), (x,), names, fast_mode=True)
    assert gradcheck_module(layer, lambda m, x: m(x, cos, sin), (x,), fast_mode=True)


def test_indexer_gets_no_gradient_from_attention():
    c, layer, rot = _dsa(3, torch.float32)
    x = torch.randn(3, 9, c.hidden_size, requires_grad=True)
    layer(x, *rot(9, 0)).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, p in layer.named_parameters():
        if name.startswith("indexer."):
            assert p.grad is None, name
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_select_ties_agree_between_full_and_cached_rows():
    c, layer, _ = _dsa(3)
    t = 6
    scores = torch.zeros(1, t, t)  # every score tied (all ReLU terms zero)
    full = layer.indexer.select(scores, causal_mask(t, t, 0))
    for i in range(t):  # what decode step i sees: one query against i + 1 cached keys
        row = layer.indexer.select(torch.zeros(1, 1, i + 1), causal_mask(1, i + 1, i))
        assert torch.equal(full[0, i, : i + 1], row[0, 0]), f"query {i}: full {full[0, i].tolist()} vs cached"


def test_sparse_attention_op():
    """The op `sparse_attention`: with every causal key selected it is causal attention; a query that selects
    nothing gets a zero output and sends no gradient; gradients in float64 by gradcheck; bad indices raise."""
    b, h, t, s = 2, 3, 4, 7
    q, k, v = (torch.randn(b, h, n, d, dtype=torch.float64) for n, d in ((t, 6), (s, 6), (s, 5)))
    everything = torch.arange(s).expand(b, t, s).masked_fill(~causal_mask(t, s, s - t), -1).flip(-1)
    assert_close(sparse_attention(q, k, v, everything, 0.4), attend(q, k, v, causal_mask(t, s, s - t), 0.4),
                 torch.float64)
    idx = torch.tensor([[3, 0, -1]]).expand(b, t, 3).clone()
    idx[1, 2] = -1  # selects nothing
    q.requires_grad_()
    out = sparse_attention(q, k, v, idx, 0.4)
    assert (out[1, :, 2] == 0).all() and out[1, :, 1].abs().sum() > 0
    (dq,) = torch.autograd.grad(out.sum(), q)
    assert (dq[1, :, 2] == 0).all()
    args = [x.detach()[:1, :2].clone().requires_grad_() for x in (q, k, v)]
    assert torch.autograd.gradcheck(lambda a, b_, c: sparse_attention(a, b_, c, idx[:1], 0.4), args)
    with pytest.raises(ValueError, match=r"indices must be \(B, T, NK\)"):
        sparse_attention(q, k, v, idx[:, :2], 0.4)
