"""DSA kernels (kernels/triton/dsa.py): the batteries of `indexer_scores`, `indexer_topk` and `sparse_attention`
(`reference.testing.dsa`: ragged sizes, exact ties, NaN, -1 slots, decode steps, V3.2 shapes; forward and
gradients), `kernels.triton.mla.mla_decode` over DSA's selection (sparse absorbed decode), the whole pipeline
against a DSA layer, and bad inputs. Outputs start as NaN (tests/cuda/conftest.py).
"""

import pytest
import torch

from kernels.triton.dsa import indexer_scores, indexer_topk, sparse_attention, sparse_attention_fwd
from kernels.triton.mla import mla_decode
from reference import dsa as ref_dsa
from reference.attention import causal_mask
from reference.dsa import DSA, indices_to_mask
from reference.mla import latent_qkv
from reference.rope import RotaryEmbedding
from reference.testing import assert_close
from reference.testing.dsa import random_indices
from reference.testing.pytest_plugin import cases, check_case
from tests.cuda.conftest import DEVICE
from tests.reference_utils import make_config, randomize_


def _random_indices(b, t, s, nk, seed=0):
    return random_indices(torch.Generator().manual_seed(seed), b, t, s, nk).to(DEVICE)


@pytest.mark.parametrize("case", cases("indexer_scores"))
def test_indexer_scores_battery(case):
    check_case(case, indexer_scores, DEVICE.type)


@pytest.mark.parametrize("case", cases("indexer_topk"))
def test_indexer_topk_battery(case):
    check_case(case, indexer_topk, DEVICE.type)


@pytest.mark.parametrize("case", cases("sparse_attention"))
def test_sparse_attention_battery(case):
    check_case(case, sparse_attention, DEVICE.type)


@pytest.mark.parametrize("dtype,splits", [(torch.float32, 1), (torch.float32, 2), (torch.bfloat16, 2)])
def test_sparse_mla_decode(dtype, splits):
    """`mla_decode` with DSA's selection (the absorbed decode path, beyond the op `mla_decode`): each query attends
    to its selected keys only (20 of them: two blocks; -1 slots), as the op `sparse_attention` in absorbed form."""
    b, h, t, s = 2, 5, 2, 40
    x = [torch.randn(*shape, device=DEVICE, dtype=dtype) for shape in ((b, h, t, 40), (b, h, t, 12), (b, s, 40),
                                                                       (b, s, 12))]
    idx = _random_indices(b, t, s, 20)
    idx[0, 0, 3:7] = -1
    out = mla_decode(*x, 0.3, splits=splits, indices=idx)
    ref = ref_dsa.sparse_attention(*latent_qkv(*(y.double() for y in x)), idx, 0.3)
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
        q_lat = torch.einsum("bhtd,hdr->bhtr", q_nope, wkv[:, : layer.dn]).contiguous()
        o_lat = sparse_attention(*(a.contiguous() for a in latent_qkv(q_lat, q_pe, c_kv, k_pe)), idx, layer.scale)
        ref = layer.attend_absorbed(q_nope, q_pe, c_kv, k_pe, mask)
        assert_close(torch.einsum("bhtr,hvr->bhtv", o_lat, wkv[:, layer.dn :]), ref, torch.float32, what="absorbed")
        o_lat = mla_decode(q_lat, q_pe.contiguous(), c_kv.contiguous(), k_pe.contiguous(), layer.scale, indices=idx)
        out = torch.einsum("bhtr,hvr->bhtv", o_lat, wkv[:, layer.dn :])
        assert_close(out, ref, torch.float32, what="mla_decode with indices")


# ----------------------------------------------------------------------------- bad input


def test_bad_inputs(monkeypatch):
    q, k, w = torch.randn(1, 3, 4, 16), torch.randn(1, 7, 16), torch.randn(1, 3, 4)
    q, k, w = q.to(DEVICE), k.to(DEVICE), w.to(DEVICE)
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
