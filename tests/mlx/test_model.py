"""runtime_mlx.Model against the reference on the same weights: logits, the loss and every parameter's gradient
of one training-loss evaluation (MTP, balance losses, ignored labels), KV-cache decode against the full forward,
generation, the MoE bias update, bad input. Float32, bound 1e-5 (DESIGN.md); measured errors are printed."""

from __future__ import annotations

import mlx.nn as nn
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten

from reference.testing import assert_close, rel_err
from runtime_mlx import Model
from tests.mlx.utils import model_pair, mx, to_mx, to_torch
from tests.reference_utils import make_config

CASES = {
    "mla_deepseek_mtp2_aux": dict(attention_type="mla", q_lora_rank=12, num_nextn_predict_layers=2,
                                  aux_loss_alpha=0.01),
    "mla_group_limited": dict(attention_type="mla", n_routed_experts=16, num_experts_per_tok=3, n_group=4,
                              topk_group=2, num_nextn_predict_layers=1),
    "dsa_softmax_moe": dict(attention_type="dsa", moe_type="standard", aux_loss_alpha=0.01,
                            num_nextn_predict_layers=1),
    "gqa_dense_tied": dict(attention_type="gqa", moe_type="dense", tie_word_embeddings=True),
    "mha_deepseek_dense0": dict(attention_type="mha", first_k_dense_replace=0),
}


def _config(case):
    kw = dict(CASES[case])
    return make_config(kw.pop("attention_type"), kw.pop("moe_type", "deepseek"), **kw)


@pytest.mark.parametrize("case", list(CASES))
def test_logits_loss_and_grads_match_reference(case):
    ref, model = model_pair(_config(case), train=True)
    ids = torch.randint(0, ref.config.vocab_size, (2, 11))
    tgt = torch.randint(0, ref.config.vocab_size, (2, 11))
    tgt[0, 2] = tgt[1, 7] = -100
    with torch.no_grad():
        ref_logits = ref(ids)
    logits = model(to_mx(ids))
    err = assert_close(to_torch(logits), ref_logits, what=f"logits [{case}]")
    out = ref.loss(ids, tgt)
    out.loss.backward()

    def f():
        return model.loss(to_mx(ids), to_mx(tgt)).loss

    loss, grads = nn.value_and_grad(model, f)()
    grads = dict(tree_flatten(grads))
    assert_close(to_torch(loss), out.loss, what=f"loss [{case}]")
    worst = 0.0
    for n, p in ref.named_parameters():
        if p.grad is None:  # DSA's indexer: no gradient from the LM loss; frozen in MLX
            assert n not in grads and ".indexer." in n
            continue
        worst = max(worst, assert_close(to_torch(grads[n]), p.grad, what=f"grad {n} [{case}]"))
    assert len(grads) == sum(p.grad is not None for p in ref.parameters())
    print(f"\n[mlx] {case}: logits rel err {err:.1e}, worst per-parameter grad rel err {worst:.1e}")


def test_hidden_dropout_only_in_training():
    """Residual dropout as the reference: eval mode equals the reference; train mode draws a new mask per call
    from MLX's key (reproducible under ``mx.random.seed``) and about ``p`` of a sublayer's units are dropped."""
    ref, model = model_pair(make_config("mla", hidden_dropout=0.5))
    ids = torch.randint(0, ref.config.vocab_size, (2, 9))
    with torch.no_grad():
        assert_close(to_torch(model(to_mx(ids))), ref(ids), what="eval logits with hidden_dropout")
    model.train()
    mx.random.seed(3)
    a = to_torch(model(to_mx(ids)))
    b = to_torch(model(to_mx(ids)))
    mx.random.seed(3)
    assert not torch.equal(a, b) and torch.equal(a, to_torch(model(to_mx(ids))))
    y = to_torch(model.model.layers[0].dropout(mx.ones((64, 64))))
    assert abs(float((y == 0).float().mean()) - 0.5) < 0.05 and set(y.unique().tolist()) == {0.0, 2.0}


def test_loss_parts_and_counts():
    ref, model = model_pair(_config("mla_deepseek_mtp2_aux"), train=True)
    ids = torch.randint(0, 97, (2, 9))
    tgt = ids.roll(-1, 1)
    tgt[:, -1] = -100
    o, m = ref.loss(ids, tgt), model.loss(to_mx(ids), to_mx(tgt))
    assert int(m.n_tokens.item()) == o.n_tokens == 16
    assert len(m.mtp_losses) == 2 and len(m.expert_loads) == 1 + 2  # layer 1 + both MTP layers
    for a, b in zip(m.mtp_losses, o.mtp_losses, strict=True):
        assert_close(to_torch(a), b, what="mtp loss")
    assert_close(to_torch(m.aux_loss), o.aux_loss, what="aux loss")
    nothing = mx.full((2, 9), -100, dtype=mx.int32)
    assert model.loss(to_mx(ids), nothing).lm_loss.item() == 0.0


@pytest.mark.parametrize("case", ["mla_deepseek_mtp2_aux", "dsa_softmax_moe", "gqa_dense_tied"])
def test_kv_cache_decode_equals_full_forward(case):
    """Prefill 4 tokens, then decode one at a time (MLA: absorbed over the latent cache) = the full forward."""
    _, model = model_pair(_config(case))
    ids = to_mx(torch.randint(0, 97, (2, 12)))
    full = model(ids)
    cache = model.new_cache()
    outs = [model(ids[:, :4], cache)] + [model(ids[:, t : t + 1], cache) for t in range(4, 12)]
    err = assert_close(to_torch(mx.concatenate(outs, axis=1)), to_torch(full), what=f"decode vs full [{case}]")
    assert cache.seq_len == 12
    if case.startswith("mla"):  # only the latent and the rope key: (16 + 4) floats per token and layer
        assert cache.nbytes_per_token() == 2 * (16 + 4) * 4
    print(f"\n[mlx] cache decode {case}: rel err {err:.1e}")


def test_generate_cached_equals_uncached_and_reference_greedy():
    ref, model = model_pair(_config("mla_deepseek_mtp2_aux"))
    prompt = torch.randint(0, 97, (2, 5))
    a = model.generate(to_mx(prompt), 8)
    b = model.generate(to_mx(prompt), 8, use_cache=False)
    assert a.shape == (2, 13) and (a == b).all().item()
    assert (np.array(a) == ref.generate(prompt, 8).numpy()).all()
    s1 = model.generate(to_mx(prompt), 6, temperature=1.0, top_k=5, top_p=0.9, generator=mx.random.key(3))
    s2 = model.generate(to_mx(prompt), 6, temperature=1.0, top_k=5, top_p=0.9, generator=mx.random.key(3))
    assert (s1 == s2).all().item()


def test_stop_tokens_pad_the_rest():
    _, model = model_pair(_config("gqa_dense_tied"))
    prompt = to_mx(torch.randint(0, 97, (2, 3)))
    first = model.generate(prompt, 1)[:, -1]
    stop = int(first[0].item())
    out = model.generate(prompt, 6, stop_tokens=[stop])
    row = np.array(out[0, 3:])
    assert row[0] == stop and (row[1:] == stop).all()  # no pad_token_id: filled with the stop token


def test_update_moe_bias_uses_loads_and_config_gamma():
    _, model = model_pair(_config("mla_group_limited"), train=True)
    ids = to_mx(torch.randint(0, 97, (2, 9)))
    out = model.loss(ids, ids)
    layers = [m for m in model.moe_layers()]
    before = [m.gate.e_score_correction_bias for m in layers]
    model.update_moe_bias(out.expert_loads)
    for m, b, load in zip(layers, before, out.expert_loads, strict=True):
        want = b + model.config.bias_update_speed * mx.sign(load.mean() - load)
        assert mx.array_equal(m.gate.e_score_correction_bias, want)
    with pytest.raises(ValueError, match="loads"):
        model.update_moe_bias([])


def test_bad_input_ids():
    _, model = model_pair(_config("gqa_dense_tied"))
    with pytest.raises(TypeError, match="mx.array"):
        model(np.zeros((1, 3), dtype=np.int32))
    with pytest.raises(TypeError, match="integer"):
        model(mx.zeros((1, 3)))
    with pytest.raises(ValueError, match="shape"):
        model(mx.zeros((3,), dtype=mx.int32))
    with pytest.raises(ValueError, match="range"):
        model(mx.array([[0, 97]]))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(mx.zeros((1, 65), dtype=mx.int32))
    with pytest.raises(ValueError, match="targets"):
        model.loss(mx.zeros((1, 3), dtype=mx.int32), mx.zeros((1, 4), dtype=mx.int32))
    prompt = mx.zeros((1, 3), dtype=mx.int32)
    for kw in (dict(temperature=float("nan")), dict(temperature=float("inf")), dict(temperature=-1.0),
               dict(temperature=1.0, top_p=float("nan")), dict(temperature=1.0, top_k=0)):
        with pytest.raises(ValueError, match="sampling: "):
            model.generate(prompt, 2, **kw)


def test_kernel_path_and_fresh_init():
    model = Model(_config("mla_deepseek_mtp2_aux"))
    assert model.kernel_path in ("metal", "mlx")
    p = dict(tree_flatten(model.parameters()))
    assert (p["model.norm.weight"] == 1).all().item()
    assert (p["model.layers.1.mlp.gate.e_score_correction_bias"] == 0).all().item()
    std = float(mx.sqrt(mx.mean(p["model.layers.0.self_attn.kv_b_proj.weight"] ** 2)).item())
    assert abs(std - model.config.initializer_range) < 0.003
    assert rel_err(to_torch(model(mx.zeros((1, 4), dtype=mx.int32))), torch.zeros(1, 4, 97)) < float("inf")
