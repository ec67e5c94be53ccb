"""reference/model.py (+ cache.py, checkpoint.py, rms_norm.py): decode with the KV cache, losses with MTP,
generation, Hugging Face checkpoints, input checks and float64 gradients."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from reference import Model
from reference.model import masked_cross_entropy, sample_next
from reference.moe import MoE, Router
from reference.rms_norm import rms_norm
from tests.reference_utils import (
    make_config,
    make_model,
    naive_experts,
    naive_rms,
    rand_ids,
    randomize_,
)
from tests.tolerance import assert_close, rel_err

ATTN = ["mla", "dsa", "mha", "mqa", "gqa"]


def _model(attention_type="mla", dtype=torch.float32, router_bias=0.05, **kw):
    return make_model(make_config(attention_type, **kw), dtype, router_bias=router_bias)


# ----------------------------------------------------------------------------- KV-cache decode


@pytest.mark.parametrize("attention_type", ATTN)
@pytest.mark.parametrize("prefill", [1, 5], ids=["token_by_token", "prefix"])
def test_decode_with_cache_equals_full_forward(attention_type, prefill):
    model = _model(attention_type, index_topk=3)
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
    model = _model("mla", q_lora_rank=12)
    ids = rand_ids(model.config, 3, 12)
    cache = model.new_cache()
    parts = [model(ids[:, a:b], cache) for a, b in [(0, 3), (3, 4), (4, 9), (9, 12)]]
    assert_close(torch.cat(parts, 1), model(ids), torch.float32)


@pytest.mark.parametrize("attention_type", ATTN)
def test_cache_bytes_per_token(attention_type):
    model = _model(attention_type)
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
    model = _model("mla")
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
    model = _model(attention_type, num_nextn_predict_layers=2).train()
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
    model = _model("mla", hidden_dropout=0.5)
    plain = _model("mla")
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
    model = _model("mla", num_nextn_predict_layers=2)
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
    model = _model("mla")
    ids = rand_ids(model.config, 3, 7)
    with pytest.raises(ValueError, match="targets"):
        model.loss(ids, ids[:, :-1])


# ----------------------------------------------------------------------------- generation


@pytest.mark.parametrize("attention_type", ["mla", "dsa", "gqa"])
def test_greedy_with_and_without_cache_identical(attention_type):
    model = _model(attention_type, index_topk=3)
    prompt = rand_ids(model.config, 2, 5)
    a = model.generate(prompt, 8, use_cache=True)
    b = model.generate(prompt, 8, use_cache=False)
    assert a.shape == (2, 13) and torch.equal(a[:, :5], prompt)
    assert torch.equal(a, b)
    seq = prompt  # and both equal an argmax loop over full forwards
    for _ in range(8):
        seq = torch.cat((seq, model(seq)[:, -1].argmax(-1, keepdim=True)), 1)
    assert torch.equal(a, seq)
    assert len(set(a[:, 5:].flatten().tolist())) > 2  # not a constant stream


def test_stop_tokens_end_a_sequence_and_pad_the_rest():
    model = _model("mla", pad_token_id=3)
    prompt = rand_ids(model.config, 2, 4)
    base = model.generate(prompt, 8)
    gen0, gen1 = base[0, 4:].tolist(), base[1, 4:].tolist()
    step = next((j for j in range(1, 6) if gen0[j] not in gen0[:j] and gen0[j] not in gen1 and gen0[j] != 3),
                None)
    assert step is not None, "no usable stop token in this draw"
    stop = gen0[step]
    out = model.generate(prompt, 8, stop_tokens=[stop])
    assert out.shape == base.shape  # sequence 1 never stops
    assert out[0, : 4 + step + 1].tolist() == base[0, : 4 + step + 1].tolist()
    assert out[0, 4 + step + 1 :].tolist() == [3] * (8 - step - 1)
    assert torch.equal(out[1], base[1])
    # when every sequence has stopped, generation ends early
    both = model.generate(prompt, 8, stop_tokens=[gen0[0], gen1[0]])
    assert both.shape == (2, 5) and torch.equal(both, base[:, :5])


def test_stop_without_pad_token_fills_with_stop_token():
    model = _model("mla", pad_token_id=None)
    prompt = rand_ids(model.config, 2, 4)
    base = model.generate(prompt, 6)
    stop = base[0, 4].item()
    if stop in base[1, 4:].tolist():
        pytest.skip("both sequences emit the stop token in this draw")
    out = model.generate(prompt, 6, stop_tokens=[stop])
    assert out[0, 5:].tolist() == [stop] * 5 and torch.equal(out[1], base[1])


def test_top_k_1_and_tiny_top_p_equal_greedy():
    model = _model("mla")
    prompt = rand_ids(model.config, 2, 5)
    greedy = model.generate(prompt, 8)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(model.generate(prompt, 8, temperature=0.8, top_k=1, generator=g), greedy)
    assert torch.equal(model.generate(prompt, 8, temperature=0.8, top_p=1e-6, generator=g), greedy)
    sampled = model.generate(prompt, 8, temperature=1.0, generator=g)
    assert not torch.equal(sampled, greedy)  # plain sampling does differ, so the two checks above can fail


def test_seeded_sampling_is_reproducible():
    model = _model("mla")
    prompt = rand_ids(model.config, 2, 5)

    def run(seed):
        return model.generate(prompt, 10, temperature=1.0, top_k=20, top_p=0.95,
                              generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


def test_sample_next_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(4000, 4)
    g = torch.Generator().manual_seed(0)

    def support(**kw):
        return set(sample_next(logits, 1.0, generator=g, **kw).tolist())

    assert support(top_p=0.75) == {0, 1}  # the smallest set reaching 0.75
    assert support(top_p=0.85) == {0, 1, 2}
    assert support(top_k=2) == {0, 1}
    assert support() == {0, 1, 2, 3}
    assert sample_next(logits[:2], 0.0).tolist() == [0, 0]


def test_generate_bad_arguments():
    model = _model("mla")
    prompt = rand_ids(model.config, 2, 3)
    for kw in (dict(temperature=-1.0), dict(temperature=1.0, top_p=0.0), dict(temperature=1.0, top_k=0)):
        with pytest.raises(ValueError):
            model.generate(prompt, 2, **kw)
    with pytest.raises(ValueError):
        model.generate(prompt, -1)
    assert torch.equal(model.generate(prompt, 0), prompt)


# ----------------------------------------------------------------------------- checkpoints


def _assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize(
    "attention_type, kw",
    [("mla", dict(q_lora_rank=12, num_nextn_predict_layers=1)),
     ("dsa", dict(num_nextn_predict_layers=1)),
     ("gqa", dict(moe_type="standard", tie_word_embeddings=True)),
     pytest.param("mla", dict(num_nextn_predict_layers=2), id="mla-mtp2"),
     pytest.param("mla", dict(num_nextn_predict_layers=1, tie_word_embeddings=True), id="mla-mtp1-tied")],
)
def test_save_load_round_trip(tmp_path, attention_type, kw):
    model = _model(attention_type, router_bias=0.1, **kw)
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    mtp = model.config.num_nextn_predict_layers
    expected = {"config.json", "model.safetensors"} | ({"mtp.safetensors"} if mtp else set())
    assert set(os.listdir(ckpt)) == expected
    assert os.listdir(tmp_path) == ["ckpt"], "temporary directory left behind"

    loaded = Model.from_pretrained(ckpt)
    assert not loaded.training  # as transformers: loaded for inference (no dropout, no load counting)
    _assert_same_state(model, loaded)
    ids = rand_ids(model.config, 3, 7)
    assert torch.equal(loaded(ids), model(ids))
    a, b = model.loss(ids, ids), loaded.loss(ids, ids)
    assert torch.equal(a.loss, b.loss) and len(a.mtp_losses) == mtp

    main = load_file(ckpt / "model.safetensors")
    n = model.config.num_hidden_layers
    assert not any(k.startswith(f"model.layers.{n}.") for k in main)
    if model.config.moe_type == "deepseek":
        assert "model.layers.1.mlp.experts.7.gate_proj.weight" in main
        assert "model.layers.1.mlp.gate.e_score_correction_bias" in main
    if attention_type == "dsa":
        assert "model.layers.0.self_attn.indexer.wk.weight" in main
        assert json.loads((ckpt / "config.json").read_text())["model_type"] == "deepseek_v32"
    if attention_type == "mla":
        assert "model.layers.0.self_attn.kv_a_proj_with_mqa.weight" in main
    if mtp:
        extra = load_file(ckpt / "mtp.safetensors")
        for k in range(mtp):
            for name in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
                         "embed_tokens.weight", "shared_head.head.weight"):
                assert f"model.layers.{n + k}.{name}" in extra
    if model.config.tie_word_embeddings:  # written as a copy (mlx_lm's deepseek_v3 needs it), tied again on load
        assert torch.equal(main["lm_head.weight"], main["model.embed_tokens.weight"])
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_save_over_existing_checkpoint_is_atomic(tmp_path, monkeypatch):
    ckpt = tmp_path / "ckpt"
    old = _model("mla", num_nextn_predict_layers=1)
    old.save_pretrained(ckpt)
    new = _model("mla", num_nextn_predict_layers=1)
    new.save_pretrained(ckpt)  # replaces it
    assert os.listdir(tmp_path) == ["ckpt"]
    _assert_same_state(Model.from_pretrained(ckpt), new)

    import reference.checkpoint as ckp

    real = ckp.save_file

    def crash_on_mtp(tensors, filename, metadata=None):
        if str(filename).endswith("mtp.safetensors"):
            raise OSError("disk full")
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(ckp, "save_file", crash_on_mtp)
    with pytest.raises(OSError, match="disk full"):
        old.save_pretrained(ckpt)
    assert os.listdir(tmp_path) == ["ckpt"], "a crashed save left files behind"
    _assert_same_state(Model.from_pretrained(ckpt), new)  # the previous checkpoint is intact


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_hf_name_mapping_takes_any_array_library(tie):
    """`to_hf_names` / `from_hf_names` map names only: numpy arrays (stack and unstack passed in) get the names the
    torch checkpoint writes, and map back to the reference's state_dict unchanged."""
    import numpy as np

    from reference.checkpoint import from_hf_names, to_hf_names, to_hf_state_dict

    model = _model("mla", num_nextn_predict_layers=1, tie_word_embeddings=tie)
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    main, mtp = to_hf_names(sd, model.config, unstack=list)
    assert [main.keys(), mtp.keys()] == [d.keys() for d in to_hf_state_dict(model)]
    back = from_hf_names({**main, **mtp}, model.config, stack=np.stack, dequant=None)
    want = {k for k in sd if not k.startswith("rotary.") and not (tie and k == "lm_head.weight")}
    assert back.keys() == want and all(np.array_equal(back[k], sd[k]) for k in want)


def test_save_copies_tokenizer(tmp_path):
    tok = tmp_path / "tokenizer.json"
    tok.write_text('{"model": {}}')
    _model("mla").save_pretrained(tmp_path / "ckpt", tokenizer_file=tok)
    assert (tmp_path / "ckpt" / "tokenizer.json").read_text() == '{"model": {}}'


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_safetensors_raises(tmp_path, damage):
    ckpt = tmp_path / "ckpt"
    _model("mla").save_pretrained(ckpt)
    f = ckpt / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(b"\x13\x00garbage" * 10 if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt"):
        Model.from_pretrained(ckpt)


@pytest.mark.parametrize(
    "edit, words",
    [(dict(hidden_size=48), ["shape", "config"]),
     (dict(n_routed_experts=16), ["experts"]),
     (dict(num_hidden_layers=3), ["does not match", "missing"]),
     (dict(q_lora_rank=12), ["missing", "q_a_proj"])],
)
def test_config_mismatch_raises(tmp_path, edit, words):
    ckpt = tmp_path / "ckpt"
    _model("mla", num_nextn_predict_layers=1).save_pretrained(ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg.update(edit)
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError) as ei:
        Model.from_pretrained(ckpt)
    for w in words:
        assert w in str(ei.value), str(ei.value)


def test_missing_checkpoint_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        Model.from_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    make_config().save_json(tmp_path / "empty" / "config.json")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        Model.from_pretrained(tmp_path / "empty")


# ----------------------------------------------------------------------------- bad input


def test_bad_input_ids():
    model = _model("mla", max_position_embeddings=16)
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
    model = _model("mla", max_position_embeddings=16)
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


def test_rms_norm_equals_formula():
    x = torch.randn(3, 5, 16) * 3
    w = 1 + 0.1 * torch.randn(16)
    assert_close(rms_norm(x, w, 1e-6), naive_rms(x.double(), w.double(), 1e-6), torch.float32)
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    assert_close(rms_norm(x64, w64, 1e-6), naive_rms(x64, w64, 1e-6), torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: rms_norm(a, b, 1e-6), (x64[:2, :2], w64))


def test_gradcheck_rms_norm_float64():
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    w = (1 + 0.1 * torch.randn(8, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: rms_norm(a, b, 1e-6), (x, w))


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
    model = _model("mla", torch.float64, hidden_size=16, num_attention_heads=2, kv_lora_rank=6,
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
