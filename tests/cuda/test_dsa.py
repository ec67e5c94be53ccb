"""DSA kernels (kernels/triton/dsa.py) against `reference.dsa` and `reference.attention.attend`.

Indexer scores against `Indexer.scores` (through a real indexer's weights) and a float64 einsum; the top-k
selection against `reference.dsa.indexer_topk` and `Indexer.select`, exactly, with causal offsets, ties (ReLU
zeros of both signs), NaN and ``index_topk > S``; sparse attention in the naive (Hk = H), grouped and absorbed
(MQA over the latent) forms, forward and gradients; `kernels.triton.mla.mla_decode` over the selection (sparse absorbed
decode); the whole pipeline against a DSA layer. Outputs start as NaN.
"""

import pytest
import torch

from kernels.triton.dsa import indexer_scores, indexer_topk, sparse_attention, sparse_attention_fwd
from kernels.triton.mla import mla_decode
from reference import dsa as ref_dsa
from reference.attention import attend, causal_mask
from reference.dsa import DSA, Indexer, indices_to_mask
from reference.rope import RotaryEmbedding
from tests.cuda.conftest import DEVICE
from tests.reference_utils import make_config, randomize_
from reference.testing import assert_close


def _random_indices(b, t, s, nk):
    """Distinct causal key indices in random order, -1 where a query has fewer than ``nk`` visible keys."""
    r = torch.rand(b, t, s, device=DEVICE).masked_fill(~causal_mask(t, s, s - t, DEVICE), -1.0)
    val, idx = r.topk(nk, dim=-1)
    return torch.where(val >= 0, idx, -1).contiguous()


# ----------------------------------------------------------------------------- indexer scores


def _indexer_inputs(b, t, s, hi, d, dtype):
    q = torch.randn(b, t, hi, d, device=DEVICE, dtype=dtype)
    k = torch.randn(b, s, d, device=DEVICE, dtype=dtype)
    w = torch.randn(b, t, hi, device=DEVICE, dtype=dtype) * hi**-0.5
    return q, k, w


def _scores_ref(q, k, w, scale):
    logits = torch.relu(torch.einsum("bthd,bsd->bhts", q.double(), k.double()) * scale)
    return torch.einsum("bhts,bth->bts", logits, w.double())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_indexer_scores(dtype):
    """Ragged S, head dim 24 and 6 heads (both padded), T = 5 and T = 1 (decode)."""
    for t in (5, 1):
        q, k, w = _indexer_inputs(2, t, 29, 6, 24, dtype)
        out = indexer_scores(q, k, w, 24**-0.5)
        assert out.dtype == torch.float32 and out.shape == (2, t, 29)
        assert_close(out, _scores_ref(q, k, w, 24**-0.5), dtype)


# ----------------------------------------------------------------------------- top-k selection


@pytest.mark.parametrize("b,t,s,topk", [(2, 5, 29, 5), (1, 4, 13, 20), (1, 1, 40, 8)],
                         ids=["chunks", "topk>S", "decode"])
def test_topk_equals_select(b, t, s, topk):
    scores = torch.randn(b, t, s, device=DEVICE)
    idx = indexer_topk(scores, topk)
    assert idx.dtype == torch.int64 and idx.shape == (b, t, min(topk, s))
    assert torch.equal(idx, ref_dsa.indexer_topk(scores, topk))
    indexer = Indexer(make_config("dsa", index_topk=topk))
    assert torch.equal(indices_to_mask(idx, s), indexer.select(scores, causal_mask(t, s, s - t, DEVICE)))


def test_topk_ties():
    """Exact ties, +0.0 and -0.0 among them, go to the earlier key, as in the stable sort."""
    b, t, s = 1, 6, 21
    scores = torch.relu(torch.randn(b, t, s, device=DEVICE)) * torch.randint(-1, 2, (b, t, s), device=DEVICE)
    assert ((scores == 0) & scores.signbit()).any() and ((scores == 0) & ~scores.signbit()).any()
    assert torch.equal(indexer_topk(scores, 9), ref_dsa.indexer_topk(scores, 9))


def test_topk_nan_scores_rank_first():
    """NaN scores of either sign rank first, as torch.sort puts them (a NaN made on a CPU carries the sign bit)."""
    scores = torch.randn(1, 3, 40, device=DEVICE)
    scores[0, 0, 3] = float("nan")
    scores[0, 1, [5, 20]] = -float("nan")
    scores[0, 2, 7] = -float("nan")
    assert scores[0, 1, 5].signbit() and not scores[0, 0, 3].signbit()
    for topk in (4, 50):
        assert torch.equal(indexer_topk(scores, topk), ref_dsa.indexer_topk(scores, topk)), f"topk={topk}"


# ----------------------------------------------------------------------------- sparse attention


def _check_sparse(b, h, hk, t, s, dk, dv, nk, dtype):
    q = torch.randn(b, h, t, dk, device=DEVICE, dtype=dtype, requires_grad=True)
    k = torch.randn(b, hk, s, dk, device=DEVICE, dtype=dtype, requires_grad=True)
    v = torch.randn(b, hk, s, dv, device=DEVICE, dtype=dtype, requires_grad=True)
    idx = _random_indices(b, t, s, nk)
    assert (idx < 0).any()
    out = sparse_attention(q, k, v, idx, 0.2)
    do = torch.randn_like(out)
    out.backward(do)
    ref_in = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref = attend(*ref_in, indices_to_mask(idx, s)[:, None], 0.2)
    ref.backward(do.double())
    assert out.dtype == dtype
    assert_close(out, ref, dtype, what="out")
    for name, x, r in zip("qkv", (q, k, v), ref_in, strict=True):
        assert_close(x.grad, r.grad, dtype, what=f"d{name}")


@pytest.mark.parametrize("h,hk,dk,dv", [(3, 3, 40, 24), (4, 2, 20, 12), (5, 1, 30, 24)],
                         ids=["naive", "gqa", "absorbed"])
def test_sparse_attention_fp32(h, hk, dk, dv):
    """20 indices per query (two blocks of 16), early queries padded with -1."""
    _check_sparse(2, h, hk, 6, 21, dk, dv, 20, torch.float32)


def test_sparse_attention_bf16():
    _check_sparse(1, 5, 1, 5, 14, 30, 24, 12, torch.bfloat16)


@pytest.mark.parametrize("dtype,splits", [(torch.float32, 1), (torch.float32, 2), (torch.bfloat16, 2)])
def test_sparse_mla_decode(dtype, splits):
    """`mla_decode` with DSA's selection (the absorbed decode path): each query attends to its selected keys
    only (20 of them: two blocks; -1 slots)."""
    b, h, t, s = 2, 5, 2, 40
    x = [torch.randn(*shape, device=DEVICE, dtype=dtype) for shape in ((b, h, t, 40), (b, h, t, 12), (b, s, 40),
                                                                       (b, s, 12))]
    idx = _random_indices(b, t, s, 20)
    idx[0, 0, 3:7] = -1
    out = mla_decode(*x, 0.3, splits=splits, indices=idx)
    q_latent, q_pe, c_kv, k_pe = (y.double() for y in x)
    k = torch.cat((c_kv, k_pe), -1)[:, None]
    ref = attend(torch.cat((q_latent, q_pe), -1), k, c_kv[:, None], indices_to_mask(idx, s)[:, None], 0.3)
    assert_close(out, ref, dtype)


# ----------------------------------------------------------------------------- the pipeline against a DSA layer


def test_pipeline_equals_dsa_layer():
    """Indexer scores -> top-k -> sparse attention, naive and absorbed, against the DSA layer's own path."""
    c = make_config("dsa", index_topk=4)
    layer = randomize_(DSA(c, 0)).to(DEVICE)
    b, t = 2, 9
    x = torch.randn(b, t, c.hidden_size, device=DEVICE)
    cos, sin = RotaryEmbedding(c.qk_rope_head_dim, c.rope_theta, c.rope_scaling)(t, 0, device=DEVICE)
    ix = layer.indexer
    with torch.no_grad():
        q_nope, q_pe, c_kv, k_pe, q_latent = layer.project(x, cos, sin)
        qi = ix._rope(ix.wq_b(q_latent).view(b, t, ix.n_heads, ix.head_dim).transpose(1, 2), cos, sin)
        ki = ix._rope(ix.k_norm(ix.wk(x)), cos, sin)
        w = ix.weights_proj(x) * ix.n_heads**-0.5
        scores = indexer_scores(qi.transpose(1, 2).contiguous(), ki.contiguous(), w.contiguous(), ix.scale)
        assert_close(scores, ix.scores(x, q_latent, cos, sin), torch.float32, what="scores")
        idx = indexer_topk(scores, ix.topk)
        mask = ix.select(scores, causal_mask(t, t, 0, DEVICE))[:, None]
        assert torch.equal(indices_to_mask(idx, t)[:, None], mask)

        kv = layer.kv_b_proj(c_kv).view(b, t, layer.n_heads, layer.dn + layer.dv).transpose(1, 2)
        k_nope, v = kv.split([layer.dn, layer.dv], dim=-1)
        q = torch.cat((q_nope, q_pe), dim=-1).contiguous()
        k = torch.cat((k_nope, k_pe[:, None].expand(b, layer.n_heads, t, layer.dr)), dim=-1).contiguous()
        out = sparse_attention(q, k, v.contiguous(), idx, layer.scale)
        assert_close(out, layer.attend_naive(q_nope, q_pe, c_kv, k_pe, mask), torch.float32, what="naive")

        wkv = layer.kv_b_proj.weight.view(layer.n_heads, layer.dn + layer.dv, layer.r)
        q = torch.cat((torch.einsum("bhtd,hdr->bhtr", q_nope, wkv[:, : layer.dn]), q_pe), dim=-1).contiguous()
        k = torch.cat((c_kv, k_pe), dim=-1)[:, None].contiguous()
        o_lat = sparse_attention(q, k, c_kv[:, None].contiguous(), idx, layer.scale)
        ref = layer.attend_absorbed(q_nope, q_pe, c_kv, k_pe, mask)
        assert_close(torch.einsum("bhtr,hvr->bhtv", o_lat, wkv[:, layer.dn :]), ref, torch.float32, what="absorbed")
        q_lat = q[..., : layer.r].contiguous()
        o_lat = mla_decode(q_lat, q_pe.contiguous(), c_kv.contiguous(), k_pe.contiguous(), layer.scale, indices=idx)
        out = torch.einsum("bhtr,hvr->bhtv", o_lat, wkv[:, layer.dn :])
        assert_close(out, ref, torch.float32, what="mla_decode with indices")


# ----------------------------------------------------------------------------- bad input


def test_bad_inputs(monkeypatch):
    q, k, w = _indexer_inputs(1, 3, 7, 4, 16, torch.float32)
    with pytest.raises(TypeError, match="k: expected dtype"):
        indexer_scores(q, k.half(), w, 1.0)
    with pytest.raises(ValueError, match="w: expected shape"):
        indexer_scores(q, k, w[:, :2].contiguous(), 1.0)
    with pytest.raises(ValueError, match="k: expected shape"):
        indexer_scores(q, k[..., :8].contiguous(), w, 1.0)
    scores = torch.randn(1, 3, 7, device=DEVICE)
    with pytest.raises(TypeError, match="scores: expected dtype"):
        indexer_topk(scores.double(), 4)
    with pytest.raises(ValueError, match="topk must be at least 1"):
        indexer_topk(scores, 0)
    with pytest.raises(ValueError, match="S=2 < T=3"):
        indexer_topk(scores[..., :2].contiguous(), 4)
    with pytest.raises(ValueError, match="contiguous"):
        indexer_topk(scores.transpose(1, 2).contiguous().transpose(1, 2), 4)
    qa, ka, va = torch.randn(1, 4, 3, 16), torch.randn(1, 2, 7, 16), torch.randn(1, 2, 7, 8)
    qa, ka, va = qa.to(DEVICE), ka.to(DEVICE), va.to(DEVICE)
    idx = _random_indices(1, 3, 7, 4)
    with pytest.raises(TypeError, match="indices: expected dtype"):
        sparse_attention_fwd(qa, ka, va, idx.int(), 1.0)
    with pytest.raises(ValueError, match="indices: expected shape"):
        sparse_attention_fwd(qa, ka, va, idx[:, :2].contiguous(), 1.0)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        sparse_attention_fwd(qa[:, :3].contiguous(), ka, va, idx, 1.0)
    with pytest.raises(ValueError, match="v: expected shape"):
        sparse_attention_fwd(qa, ka, va[:, :1].contiguous(), idx, 1.0)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="need a CUDA tensor"):
        indexer_scores(q.cpu(), k.cpu(), w.cpu(), 1.0)
