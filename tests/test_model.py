"""reference/model.py (+ cache.py): decode with the KV cache, losses with MTP, input checks and float64 gradients.
Generation is in test_sampling.py, checkpoints in test_checkpoint.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from reference.model import masked_cross_entropy
from reference.moe import MoE, Router
from reference.rms_norm import rms_norm
from reference.testing import assert_close, rel_err
from tests.reference_utils import (
    make_config,
    naive_experts,
    naive_rms,
    rand_ids,
    randomize_,
    tiny_model,
)

ATTN = ["mla", "dsa", "mha", "mqa", "gqa"]


# ----------------------------------------------------------------------------- KV-cache decode


@pytest.mark.parametrize("attention_type", ATTN)
@pytest.mark.parametrize("prefill", [1, 5], ids=["token_by_token", "prefix"])
def test_decode_with_cache_equals_full_forward(attention_type, prefill):
    model = tiny_model(attention_type, index_topk=3)
    ids = rand_ids(model.config, 3, 11)
    full = model(ids)
    cache = model.new_cache()
    steps = [model(ids[:, :prefill], cache)]
    for i in range(prefill, 11):
        steps.append(model(ids[:, i : i + 1], cache))
    assert cache.seq_len == 11
    err = assert_close(torch.cat(steps, 1), full, torch.float32, what=f"{attention_type} decode vs full")
    print(f"{attention_type} decode (prefill {prefill}) vs full: {err:.2e}")


def test_decode_in_chunks_equals_full_forward():
    model = tiny_model("mla", q_lora_rank=12)
    ids = rand_ids(model.config, 3, 12)
    cache = model.new_cache()
    parts = [model(ids[:, a:b], cache) for a, b in [(0, 3), (3, 4), (4, 9), (9, 12)]]
    assert_close(torch.cat(parts, 1), model(ids), torch.float32)


@pytest.mark.parametrize("attention_type", ATTN)
def test_cache_bytes_per_token(attention_type):
    model = tiny_model(attention_type)
    c = model.config
    cache = model.new_cache()
    model(rand_ids(c, 3, 5), cache)
    per_layer = {
        "mla": (c.kv_lora_rank + c.qk_rope_head_dim) * 4,
        "dsa": (c.kv_lora_rank + c.qk_rope_head_dim + c.index_head_dim) * 4,
    }.get(attention_type, 2 * c.num_key_value_heads * c.head_dim * 4)
    assert cache.nbytes_per_token() == per_layer * c.num_hidden_layers
    if attention_type == "mla":
        for layer in cache.layers:
            assert set(layer.tensors) == {"c_kv", "k_pe"}
            assert layer.tensors["c_kv"].shape == (3, 5, c.kv_lora_rank)
            assert layer.tensors["k_pe"].shape == (3, 5, c.qk_rope_head_dim)


# ----------------------------------------------------------------------------- losses


def _manual_ce(logits, targets):
    lp = torch.log_softmax(logits.double(), -1)
    valid = targets != -100
    return -lp[valid].gather(-1, targets[valid][:, None]).sum() / valid.sum()


def _holes(targets, frac=0.3):
    t = targets.clone()
    t[torch.rand(t.shape) < frac] = -100
    return t


def test_loss_ignore_index_equals_manual_ce():
    model = tiny_model("mla")
    ids = rand_ids(model.config, 3, 9)
    targets = _holes(rand_ids(model.config, 3, 9))
    assert (targets == -100).any() and (targets != -100).any()
    out = model.loss(ids, targets)
    logits = model(ids)
    ref = _manual_ce(logits, targets)
    assert_close(out.lm_loss, ref, torch.float32)
    assert out.n_tokens == int((targets != -100).sum())
    assert rel_err(out.lm_loss, _manual_ce(logits, targets.clamp(min=0))) > 1e-3  # the holes matter
    assert_close(out.loss, out.lm_loss, torch.float32)  # no MTP, no aux


@pytest.mark.parametrize("attention_type", ["mla", "dsa"])
def test_all_labels_ignored_gives_zero_loss_and_zero_grads(attention_type):
    model = tiny_model(attention_type, num_nextn_predict_layers=2).train()
    ids = rand_ids(model.config, 3, 7)
    out = model.loss(ids, torch.full_like(ids, -100))
    assert out.loss.item() == 0.0 and out.lm_loss.item() == 0.0
    assert all(m.item() == 0.0 for m in out.mtp_losses) and out.n_tokens == 0
    out.loss.backward()
    for name, p in model.named_parameters():
        if ".indexer." in name:  # the indexer is outside the LM-loss graph (V3.2 trains it by a KL loss)
            assert p.grad is None, name
            continue
        assert p.grad is not None, f"{name}: grad is None but the parameter took part"
        assert torch.equal(p.grad, torch.zeros_like(p)), f"{name}: nonzero grad"


def test_hidden_dropout_only_in_training():
    """Residual dropout: train-mode outputs change with the mask, eval mode equals the same weights without
    dropout; the gradient flows through the kept units only. An out-of-range probability is refused."""
    model = tiny_model("mla", hidden_dropout=0.5)
    plain = tiny_model("mla")
    plain.load_state_dict(model.state_dict())
    ids = rand_ids(model.config, 2, 9)
    model.eval()
    assert torch.equal(model(ids), plain.eval()(ids))
    model.train()
    torch.manual_seed(0)
    a = model(ids)
    b = model(ids)
    torch.manual_seed(0)
    assert not torch.equal(a, b) and torch.equal(a, model(ids))  # a new mask per call, drawn from torch's RNG
    assert rel_err(a, plain.train()(ids)) > 1e-2
    with pytest.raises(ValueError, match="hidden_dropout"):
        make_config("mla", hidden_dropout=1.0)


def test_mtp_loss_divided_by_its_own_count():
    model = tiny_model("mla", num_nextn_predict_layers=2)
    c = model.config
    b, t = 3, 10
    ids = rand_ids(c, b, t)
    targets = torch.cat((ids[:, 1:], rand_ids(c, b, 1)), 1)
    targets[:, 2] = -100  # holes that fall differently on each depth's shifted targets
    targets[0, 7:] = -100
    targets[1, 4] = -100
    out = model.loss(ids, targets)
    assert len(out.mtp_losses) == 2

    h = model.hidden_states(ids)
    cos, sin = model.rotary(t, 0, dtype=h.dtype)
    counts = []
    for k, layer in enumerate(model.mtp, start=1):
        ahead = torch.cat((ids[:, k:], torch.zeros(b, k, dtype=ids.dtype)), 1)  # t_{i+k} (pad: never scored)
        tgt = torch.cat((targets[:, k:], torch.full((b, k), -100)), 1)  # predicts t_{i+k+1}
        emb = model.model.embed_tokens(ahead)
        mixed = layer.eh_proj(torch.cat((naive_rms(emb, layer.enorm.weight, c.rms_norm_eps),
                                         naive_rms(h, layer.hnorm.weight, c.rms_norm_eps)), -1))
        h = layer(mixed, cos, sin)
        logits = model.lm_head(naive_rms(h, layer.shared_head.norm.weight, c.rms_norm_eps))
        ref = _manual_ce(logits, tgt)
        counts.append(int((tgt != -100).sum()))
        assert_close(out.mtp_losses[k - 1], ref, torch.float32, what=f"MTP depth {k}")
        wrong = ref * counts[-1] / out.n_tokens  # the same sum over the main model's count
        assert rel_err(wrong, ref) > 1e-2
    assert counts[0] != counts[1] != out.n_tokens
    assert_close(out.loss, out.lm_loss + 0.3 * (out.mtp_losses[0] + out.mtp_losses[1]) / 2, torch.float32)
    assert_close(model.loss(ids, targets, mtp_weight=1.0).loss,
                 out.lm_loss + (out.mtp_losses[0] + out.mtp_losses[1]) / 2, torch.float32)


def test_loss_targets_shape_mismatch_raises():
    model = tiny_model("mla")
    ids = rand_ids(model.config, 3, 7)
    with pytest.raises(ValueError, match="targets"):
        model.loss(ids, ids[:, :-1])


# ----------------------------------------------------------------------------- generation


# ----------------------------------------------------------------------------- checkpoints


# ----------------------------------------------------------------------------- bad input


def test_bad_input_ids():
    model = tiny_model("mla", max_position_embeddings=16)
    ids = rand_ids(model.config, 2, 5)
    with pytest.raises(TypeError, match="integer"):
        model(ids.float())
    with pytest.raises(TypeError, match="integer"):
        model(ids > 3)
    with pytest.raises(TypeError):
        model(ids.tolist())
    for bad in (ids[0], ids[None], torch.zeros(0, 5, dtype=torch.long)):
        with pytest.raises(ValueError, match=r"\(batch, seq\)"):
            model(bad)
    for v in (97, 1000, -1):
        bad = ids.clone()
        bad[1, 2] = v
        with pytest.raises(ValueError, match=r"\[0, 97\)"):
            model(bad)
    model(torch.randint(0, 97, (2, 16)))  # exactly max_position_embeddings is fine
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.randint(0, 97, (2, 17)))


def test_too_long_through_cache_offset():
    model = tiny_model("mla", max_position_embeddings=16)
    ids = rand_ids(model.config, 2, 16)
    cache = model.new_cache()
    model(ids[:, :14], cache)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(ids[:, 14:16].repeat(1, 2), cache)  # 14 + 4 > 16
    assert cache.seq_len == 14 and cache.layers[0].tensors["c_kv"].shape[1] == 14  # untouched
    last = model(ids[:, 14:16], cache)  # and it still continues correctly
    assert_close(last, model(ids)[:, 14:], torch.float32)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(ids[:, :1], cache)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.generate(ids[:, :14], 5)


# ----------------------------------------------------------------------------- float64 and gradients


def _f64_site(site):
    """(out, exact float64 reference) for one of the places that upcast half precision to float32."""
    if site == "rms_norm":
        x, w = torch.randn(4, 16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
        return rms_norm(x, w, 1e-6), naive_rms(x, w, 1e-6)
    if site == "router":
        c = make_config()
        r = randomize_(Router(c)).double()
        x = torch.randn(7, c.hidden_size, dtype=torch.float64)
        idx, w, _ = r(x)
        s = torch.sigmoid(x @ r.weight.T).gather(1, idx)
        return w, s / s.sum(-1, keepdim=True) * c.routed_scaling_factor
    if site == "softmax_moe":
        c = make_config(moe_type="standard")
        m = randomize_(MoE(c)).double()
        x = torch.randn(1, 5, c.hidden_size, dtype=torch.float64)
        w, idx = torch.softmax(x[0] @ m.gate.weight.T, -1).topk(c.num_experts_per_tok, dim=-1)
        return m(x)[0], naive_experts(m.experts, x[0], idx, w / w.sum(-1, keepdim=True))
    logits = torch.randn(6, 97, dtype=torch.float64)
    t = torch.randint(0, 97, (6,))
    return masked_cross_entropy(logits, t), F.cross_entropy(logits, t)


@pytest.mark.parametrize("site", ["rms_norm", "router", "softmax_moe", "cross_entropy"])
def test_float64_stays_float64(site):
    out, ref = _f64_site(site)
    assert out.dtype == torch.float64
    assert_close(out, ref, torch.float64)


def test_gradcheck_model_loss_with_mtp_wrt_embedding_perturbation():
    model = tiny_model("mla", torch.float64, hidden_size=16, num_attention_heads=2, kv_lora_rank=6,
                   qk_nope_head_dim=4, qk_rope_head_dim=2, v_head_dim=4, q_lora_rank=6, intermediate_size=16,
                   moe_intermediate_size=8, num_nextn_predict_layers=2, vocab_size=31)
    b, t = 2, 5
    ids = rand_ids(model.config, b, t)
    targets = torch.cat((ids[:, 1:], torch.full((b, 1), -100)), 1)
    targets[0, 1] = -100
    delta = (0.1 * torch.randn(b, t, 16, dtype=torch.float64)).requires_grad_()
    current = {}
    # add delta to every embedding lookup of shape (b, t) (the main input and each MTP depth's shifted input)
    hook = model.model.embed_tokens.register_forward_hook(lambda m, i, o: o + current["d"])

    def loss(d):
        current["d"] = d
        return model.loss(ids, targets).loss

    try:
        assert loss(delta).item() > 0
        assert torch.autograd.gradcheck(loss, (delta,), fast_mode=True)
        assert torch.autograd.gradcheck(loss, (delta,))
    finally:
        hook.remove()
