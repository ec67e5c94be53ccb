"""runtime_mlx.speculative (MTP drafts verified by the main model, DeepSeek-V3 report section 5.4.3) and the MLX
cache's ``crop``.

- Greedy speculative decoding emits exactly `runtime_mlx.Model.generate`'s tokens: MTP depth 1 and 2, more drafts
  than modules (reused in turn), MLA / DSA / GQA caches, left-padded batches (against each prompt alone), stop
  tokens, the end of ``max_position_embeddings``; at low acceptance (random MTP modules) and at high acceptance (an
  MTP that copies the main model's next-token rule: ``agreeing_pair``).
- The same greedy tokens and the same statistics as `reference.speculative` on the same weights, converted through
  the checkpoint directory (saved by the reference, loaded by MLX).
- Sampling: the rejection rule (`_reject`) on a 5-token vocabulary over 200,000 rows, and whole generations of 4
  tokens from a 4-token vocabulary (8,000 rows, one batch) against the exact distribution the reference model gives
  (each bound derived from its sample size in the test).
- ``KVCache.crop`` equals never having fed the dropped tokens.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from reference import Model as ReferenceModel
from reference.model import sampling_probs as ref_sampling_probs
from reference.speculative import speculative_generate as ref_speculative_generate
from reference.testing import assert_close
from runtime_mlx import Model
from runtime_mlx.speculative import _Keys, _reject, speculative_generate
from tests.mlx.utils import PATHS, copy_weights, model_pair, mx, to_mx, to_torch
from tests.reference_utils import make_config, randomize_

DELTA = 1e-6  # false-failure probability allowed to each statistical bound (the draws are seeded: reruns agree)


def agreeing_pair(config, scale: float) -> tuple[ReferenceModel, Model]:
    """A reference model and the MLX model with its weights, whose MTP modules predict what the main model does
    when every block's output projections (attention ``o_proj``, FFN ``down_proj``) are scaled by ``scale``: the
    main model then predicts ``f(t_i)`` from the current token plus an O(``scale``) effect of the context, and MTP
    module k reads only its embedding input (``eh_proj = [I, 0]``, unit norm gains) so it predicts
    ``f(t_{i+k})``: acceptance near 1 for a small ``scale``, exactly 1 (up to rounding) at 0."""
    ref = randomize_(ReferenceModel(config), router_bias=0.05).eval()
    h = config.hidden_size
    with torch.no_grad():
        for layer in [*ref.model.layers, *ref.mtp]:
            layer.self_attn.o_proj.weight.mul_(scale)
            for name, p in layer.mlp.named_parameters():
                if "down_proj" in name:
                    p.mul_(scale)
        ref.model.norm.weight.fill_(1.0)
        for m in ref.mtp:
            m.enorm.weight.fill_(1.0)
            m.shared_head.norm.weight.fill_(1.0)
            m.eh_proj.weight.zero_()
            m.eh_proj.weight[:, :h] = torch.eye(h)
    model = Model(config)
    copy_weights(model, ref)
    model.eval()
    return ref, model


def _ids(config, b: int, t: int) -> mx.array:
    return to_mx(torch.randint(0, config.vocab_size, (b, t))).astype(mx.int32)


# ----------------------------------------------------------------------------- greedy: exactly plain greedy

GREEDY = {  # attention, MTP depth, drafts per step, scale of agreeing_pair (None: random MTP, low acceptance)
    "mla_d1_k1_low": ("mla", 1, 1, None),
    "mla_d2_k3_low": ("mla", 2, 3, None),
    "mla_d1_k3_high": ("mla", 1, 3, 0.02),
    "mla_d2_k2_high": ("mla", 2, 2, 0.02),
    "dsa_d2_k3_high": ("dsa", 2, 3, 0.02),
    "gqa_d2_k3_low": ("gqa", 2, 3, None),
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", list(GREEDY))
def test_greedy_equals_generate(case, path):
    attention, depth, k, scale = GREEDY[case]
    cfg = make_config(attention, num_nextn_predict_layers=depth)
    _, model = model_pair(cfg) if scale is None else agreeing_pair(cfg, scale)
    ids = _ids(cfg, 2, 7)
    n_new = cfg.max_position_embeddings - 7  # the last step reaches the end of the positions
    out, stats = speculative_generate(model, ids, n_new, num_speculative_tokens=k)
    plain = model.generate(ids, n_new)
    assert out.dtype == ids.dtype and out.shape == plain.shape
    assert (out == plain).all().item()
    assert len(stats.drafted) == len(stats.accepted) == k
    assert stats.tokens == 2 * (n_new - 1)  # every token but the first (the prompt's forward samples it)
    assert all(a <= d for a, d in zip(stats.accepted, stats.drafted, strict=True))
    assert all(a2 <= a1 for a1, a2 in zip(stats.accepted[:-1], stats.accepted[1:], strict=True))  # after j - 1
    if scale is not None:  # the MTP agrees: most drafts accepted, so steps emit several tokens
        assert stats.acceptance[0] > 0.3 and stats.steps < n_new - 1
    print(f"\n[mlx speculative] {case}: acceptance {[round(a, 2) for a in stats.acceptance]}, "
          f"{stats.tokens_per_step:.2f} tokens/step")


@pytest.mark.parametrize("k", [1, 3])
def test_exact_agreement_accepts_every_draft(k):
    """An MTP equal to the main model's rule (``agreeing_pair`` at 0, modules reused for k > D) is always accepted:
    every step emits k + 1 tokens per row (the bonus token included)."""
    cfg = make_config("mla", num_nextn_predict_layers=1)
    _, model = agreeing_pair(cfg, 0.0)
    ids = _ids(cfg, 3, 5)
    out, stats = speculative_generate(model, ids, 1 + 4 * (k + 1), num_speculative_tokens=k)
    assert (out == model.generate(ids, 1 + 4 * (k + 1))).all().item()
    assert stats.acceptance == [1.0] * k and stats.steps == 4 and stats.tokens_per_step == 3 * (k + 1)


@pytest.mark.parametrize("scale", [None, 0.02])
def test_padded_batch_with_stops_equals_each_prompt_alone(scale):
    """Left-padded prompts of lengths 7, 4, 2 with stop tokens: each row's tokens are its prompt's plain greedy
    tokens alone, then the filler once it stopped; the batch ends when the last row stops."""
    cfg = make_config("mla", num_nextn_predict_layers=2)
    _, model = model_pair(cfg) if scale is None else agreeing_pair(cfg, scale)
    lens, width, n_new = [7, 4, 2], 7, 30
    prompts = [_ids(cfg, 1, n) for n in lens]
    alone = [np.array(model.generate(p, n_new))[0, p.shape[1]:] for p in prompts]
    stops = sorted({int(alone[0][5]), int(alone[2][12])})  # row 0 stops by token 6, row 2 by token 13
    fill = stops[0]  # no pad_token_id: the first stop token
    ids = mx.concatenate([mx.concatenate([mx.zeros((1, width - p.shape[1]), mx.int32), p], axis=1)
                          for p in prompts])
    mask = mx.array([[0] * (width - n) + [1] * n for n in lens])
    out, stats = speculative_generate(model, ids, n_new, stop_tokens=stops, num_speculative_tokens=3,
                                      attention_mask=mask)
    got = np.array(out)[:, width:]
    expect_len = 0
    for r, a in enumerate(alone):
        hit = [i for i, tok in enumerate(a) if tok in stops]
        n = hit[0] + 1 if hit else n_new
        expect_len = max(expect_len, n)
        assert got[r, :n].tolist() == a[:n].tolist(), f"row {r}"
        assert (got[r, n:] == fill).all(), f"row {r}: filler after its stop"
    assert got.shape[1] == expect_len
    assert (np.array(out)[:, :width] == np.array(ids)).all()


# ----------------------------------------------------------------------------- against the reference


@pytest.mark.parametrize("attention", ["mla", "dsa"])
def test_same_tokens_and_stats_as_reference(tmp_path, attention):
    """The reference's checkpoint loaded by MLX: the same greedy tokens and statistics as
    `reference.speculative.speculative_generate` for a left-padded batch with a stop token, 3 drafts from 2
    modules."""
    cfg = make_config(attention, num_nextn_predict_layers=2)
    ref = randomize_(ReferenceModel(cfg), router_bias=0.05).eval()
    ref.save_pretrained(tmp_path / "ckpt")
    model = Model.from_pretrained(tmp_path / "ckpt")
    ids = torch.randint(0, cfg.vocab_size, (3, 6))
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[1, :2] = mask[2, :4] = 0
    ids[mask == 0] = 0
    plain = ref.generate(ids[:1], 20)
    stops = [int(plain[0, 6 + 9])]
    kw = dict(stop_tokens=stops, num_speculative_tokens=3)
    want, want_stats = ref_speculative_generate(ref, ids, 20, attention_mask=mask, **kw)
    got, stats = speculative_generate(model, to_mx(ids).astype(mx.int32), 20, attention_mask=to_mx(mask), **kw)
    assert torch.equal(to_torch(got).long(), want)
    assert stats == want_stats


# ----------------------------------------------------------------------------- sampling: the rejection rule


def _tv_bound(p: np.ndarray, n: int) -> float:
    """A bound on the total variation between ``p`` and the empirical distribution of ``n`` draws from it that
    holds with probability >= 1 - `DELTA`: E[TV] <= 1/2 sum_x sqrt(p(x) (1 - p(x)) / n) (Jensen), and TV moves by
    at most 1/n per draw, so McDiarmid adds sqrt(ln(1/DELTA) / (2 n))."""
    return 0.5 * np.sqrt(p * (1 - p)).sum() / math.sqrt(n) + math.sqrt(math.log(1 / DELTA) / (2 * n))


def _tv(samples: np.ndarray, p: np.ndarray) -> float:
    return 0.5 * np.abs(np.bincount(samples, minlength=len(p)) / len(samples) - p).sum()


def test_rejection_rule_distribution():
    """`_reject` over N = 200,000 rows, k = 2 drafts, V = 5 (zeros in p and q where top-k / top-p would cut):
    draft 1 is accepted with probability sum_x min(p, q) (Leviathan et al. 2023, Theorem 3.5); at its first
    rejection a row draws from norm(max(0, p - q)); the token of every row that reaches position i is distributed
    as p_i (the accepted drafts, the corrections and, after k acceptances, the bonus token from p_{k+1}).
    Bounds: Hoeffding sqrt(ln(2/DELTA) / (2N)) for the rate, `_tv_bound` for each distribution."""
    n_rows, k, v = 200_000, 2, 5
    g = torch.Generator().manual_seed(0)
    p = torch.rand(k + 1, v, generator=g, dtype=torch.float64) + 0.05
    q = torch.rand(k, v, generator=g, dtype=torch.float64) + 0.05
    p[0, 4] = p[1, 0] = q[0, 3] = q[1, 1] = 0.0  # tokens outside one of the two kept sets
    p, q = p / p.sum(-1, keepdim=True), q / q.sum(-1, keepdim=True)
    keys = _Keys(mx.random.key(1))
    qs = [mx.broadcast_to(to_mx(q[i].float()), (n_rows, v)) for i in range(k)]
    d = mx.stack([mx.random.categorical(mx.log(qi), key=keys()) for qi in qs], axis=1).astype(mx.int32)
    cand, ok = _reject(mx.broadcast_to(to_mx(p.float()), (n_rows, k + 1, v)), qs, d, keys)
    cand, ok, d = np.array(cand), np.array(ok), np.array(d)
    n_acc = np.cumprod(ok, axis=1).sum(1)
    p, q = p.numpy(), q.numpy()
    rate = np.minimum(p[0], q[0]).sum()
    assert abs(ok[:, 0].mean() - rate) < math.sqrt(math.log(2 / DELTA) / (2 * n_rows))
    for i in range(k + 1):
        reach = n_acc >= i
        assert _tv(cand[reach, i], p[i]) < _tv_bound(p[i], int(reach.sum())), f"token at position {i + 1}"
        if i < k:
            assert (cand[n_acc > i, i] == d[n_acc > i, i]).all()  # accepted: the draft itself
            rejected = n_acc == i
            resid = np.maximum(p[i] - q[i], 0)
            resid /= resid.sum()
            assert _tv(cand[rejected, i], resid) < _tv_bound(resid, int(rejected.sum())), f"correction at {i + 1}"


@pytest.mark.parametrize("mtp", ["random", "agreeing"])
def test_sampled_generations_follow_the_model(mtp):
    """Four sampled tokens (temperature 0.8, top-k 3) after one prompt, 8,000 rows in one batch, 2 drafts from one
    MTP module: the empirical distribution of the 4^4 continuations against the exact one, the product of the
    reference model's `reference.model.sampling_probs` along each continuation, within `_tv_bound`; tokens outside
    the top-k never appear. ``random``: the rows reject often (each step is cut to one token by the batch minimum:
    a row's own accepted draft or its correction); ``agreeing``: q = p, every step emits its drafts and the bonus."""
    n_rows, n_new, v, temperature, top_k = 8000, 4, 4, 0.8, 3
    cfg = make_config("mla", "dense", vocab_size=v, num_hidden_layers=1, num_nextn_predict_layers=1)
    ref, model = model_pair(cfg) if mtp == "random" else agreeing_pair(cfg, 0.0)
    prompt = torch.randint(0, v, (1, 3))
    ids = mx.broadcast_to(to_mx(prompt).astype(mx.int32), (n_rows, 3))
    out, stats = speculative_generate(model, ids, n_new, temperature=temperature, top_k=top_k,
                                      generator=mx.random.key(2), num_speculative_tokens=2)
    codes = (np.array(out)[:, 3:] * v ** np.arange(n_new)[::-1]).sum(1)
    exact = np.ones(1)  # probabilities of the continuations so far, in base-v order
    for j in range(n_new):
        prefixes = torch.tensor(list(itertools.product(range(v), repeat=j)), dtype=torch.long).reshape(v**j, j)
        seqs = torch.cat((prompt.expand(len(exact), -1), prefixes), dim=1)
        with torch.no_grad():
            p = ref_sampling_probs(ref(seqs)[:, -1].double(), temperature, top_k).numpy()  # (v^j, v)
        exact = (exact[:, None] * p).reshape(-1)
    assert _tv(codes, exact) < _tv_bound(exact, n_rows)
    assert not np.isin(codes, np.flatnonzero(exact == 0)).any()
    if mtp == "agreeing":
        assert stats.steps == 1 and stats.acceptance[0] > 0.999  # 2 drafts + the bonus after the first token
    print(f"\n[mlx speculative] sampling, {mtp} MTP: TV {_tv(codes, exact):.4f} < {_tv_bound(exact, n_rows):.4f}, "
          f"acceptance {[round(a, 3) for a in stats.acceptance]}")


def test_sampling_is_reproducible_from_its_key():
    """The same PRNG key gives the same tokens; the first token (sampled from the prompt's forward) is the one
    `runtime_mlx.Model.generate` draws with that key."""
    cfg = make_config("mla", num_nextn_predict_layers=1)
    _, model = model_pair(cfg)
    ids = _ids(cfg, 2, 5)
    kw = dict(temperature=1.0, top_p=0.9)
    a, _ = speculative_generate(model, ids, 12, generator=mx.random.key(5), **kw)
    b, _ = speculative_generate(model, ids, 12, generator=mx.random.key(5), **kw)
    c, _ = speculative_generate(model, ids, 12, generator=mx.random.key(6), **kw)
    assert (a == b).all().item() and not (a == c).all().item()
    assert (a[:, :6] == model.generate(ids, 1, generator=mx.random.key(5), **kw)).all().item()


# ----------------------------------------------------------------------------- cache rollback and bad input


@pytest.mark.parametrize("attention", ["mla", "dsa", "gqa"])
def test_crop_equals_never_fed(attention):
    """Feeding A + B, cropping to len(A) and feeding C gives the logits of feeding A then C (the MLA latent, the DSA
    indexer keys, the GQA keys and values all rolled back)."""
    cfg = make_config(attention)
    _, model = model_pair(cfg)
    a, b, c = _ids(cfg, 2, 6), _ids(cfg, 2, 3), _ids(cfg, 2, 2)
    cache = model.new_cache()
    model(mx.concatenate([a, b], axis=1), cache)
    cache.crop(6)
    assert cache.seq_len == 6 and all(x.shape[-2] == 6 for layer in cache.layers for x in layer.arrays.values())
    fresh = model.new_cache()
    model(a, fresh)
    assert_close(to_torch(model(c, cache)), to_torch(model(c, fresh)), what=f"logits after crop [{attention}]")
    for bad in (-1, 9, 2.0):
        with pytest.raises(ValueError, match="crop: seq_len"):
            cache.crop(bad)


def test_bad_input():
    cfg = make_config("mla", num_nextn_predict_layers=1)
    _, model = model_pair(cfg)
    ids = _ids(cfg, 1, 4)
    with pytest.raises(ValueError, match="no MTP modules"):
        speculative_generate(model_pair(make_config("mla"))[1], ids, 3)
    for k in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="num_speculative_tokens"):
            speculative_generate(model, ids, 3, num_speculative_tokens=k)
    with pytest.raises(ValueError, match="max_new_tokens"):
        speculative_generate(model, ids, -1)
    with pytest.raises(ValueError, match="top_p"):
        speculative_generate(model, ids, 3, temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="attention_mask"):
        speculative_generate(model, ids, 3, attention_mask=mx.ones((1, 3)))
    out, stats = speculative_generate(model, ids, 0)
    assert out is ids and stats.steps == 0 and stats.drafted == [0]
