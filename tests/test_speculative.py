"""reference/speculative.py: MTP speculative decoding against plain decoding (`Model.generate`: greedy token for
token, sampling in distribution), `KVCache.crop`, runtime_cuda under Triton's interpreter, and
``dsfs generate --speculative mtp``."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from reference import speculative
from reference.cache import KVCache
from reference.model import sampling_probs
from reference.speculative import SpeculativeStats, speculative_generate
from reference.testing import assert_close
from tests.reference_utils import make_config, make_model, rand_ids, tiny_model


@torch.no_grad()
def agreeing_(model, eps: float):
    """Make the MTP modules predict what the main model will, up to ``eps``: every main layer's output projections
    (attention ``o_proj``, FFN ``down_proj``) are scaled by ``eps``, so at ``eps`` 0 the main model is the bigram
    model ``lm_head(norm(Emb(t)))``; each MTP module passes ``enorm(Emb(t_{i+k}))`` through (``eh_proj = [I, 0]``,
    unit ``enorm``, its own block's output projections 0) and its head norm is the main ``norm``, so its draft is the
    bigram prediction from the previous (drafted) token: exactly the main model's at ``eps`` 0 (all drafts
    accepted), close to it for small ``eps``. Returns ``model``."""
    h = model.config.hidden_size
    for name, p in model.named_parameters():
        if name.endswith(("o_proj.weight", "down_proj.weight", "experts.down_proj")):
            p.mul_(0.0 if name.startswith("mtp.") else eps)
    for mtp in model.mtp:
        mtp.eh_proj.weight.zero_()
        mtp.eh_proj.weight[:, :h] = torch.eye(h)
        mtp.enorm.weight.fill_(1.0)
        mtp.shared_head.norm.weight.copy_(model.model.norm.weight)
    return model


def stop_token(base: torch.Tensor, t: int) -> int:
    """A token that row 0 of ``base`` (prompt length ``t``) emits a few steps in and row 1 never emits."""
    row0, row1 = base[0, t:].tolist(), base[1, t:].tolist()
    tok = next((x for x in row0[2:-1] if x not in row1), None)
    assert tok is not None, "no usable stop token in this draw"
    return tok


# ---------------------------------------------------------------- KVCache.crop


@pytest.mark.parametrize("attention_type", ["mla", "gqa", "dsa"])
def test_crop_then_decode_equals_a_fresh_forward(attention_type):
    """Decode 8 tokens, crop to 5, feed 4 others: the logits equal one forward of the 9-token sequence (DSA: the
    indexer keys are cropped with the latent)."""
    model = tiny_model(attention_type, num_nextn_predict_layers=1)
    ids, other = rand_ids(model.config, 2, 8), rand_ids(model.config, 2, 4)
    cache = model.new_cache()
    with torch.no_grad():
        model(ids[:, :6], cache)
        model(ids[:, 6:], cache)
        cache.crop(5)
        assert cache.seq_len == 5
        names = {"mla": {"c_kv", "k_pe"}, "gqa": {"k", "v"}, "dsa": {"c_kv", "k_pe", "index_k"}}[attention_type]
        for layer in cache.layers:
            assert set(layer.tensors) == names and all(t.shape[-2] == 5 for t in layer.tensors.values())
        got = torch.cat((model(other[:, :1], cache), model(other[:, 1:], cache)), dim=1)
        want = model(torch.cat((ids[:, :5], other), dim=1))[:, 5:]
    assert cache.seq_len == 9
    assert_close(got, want, what="decode after crop")


def test_crop_bounds():
    cache = KVCache(2)
    cache.layers[0].update(k=torch.randn(1, 2, 4, 3))
    cache.seq_len = 4
    for bad in (-1, 5, 2.0, True):
        with pytest.raises(ValueError, match=r"crop: seq_len=.*expected an integer in \[0, 4\]"):
            cache.crop(bad)
    cache.crop(4)
    assert cache.layers[0].tensors["k"].shape == (1, 2, 4, 3)
    cache.crop(0)
    assert cache.seq_len == 0 and cache.layers[0].tensors["k"].shape == (1, 2, 0, 3)


# ---------------------------------------------------------------- greedy: the tokens of Model.generate


@pytest.mark.parametrize("attention_type,depth,k", [("mla", 1, None), ("mla", 2, None), ("mla", 1, 3),
                                                    ("dsa", 2, None), ("gqa", 2, 3)])
def test_greedy_equals_generate_with_random_mtp(attention_type, depth, k):
    """A random MTP: almost every draft is rejected, and every step rolls back the main and MTP caches. The output,
    stop tokens and the early end when every row stopped included, is `Model.generate`'s."""
    model = tiny_model(attention_type, num_nextn_predict_layers=depth, pad_token_id=5)
    prompt = rand_ids(model.config, 3, 6)
    base = model.generate(prompt, 14)
    out, stats = speculative_generate(model, prompt, 14, num_speculative_tokens=k)
    assert torch.equal(out, base)
    n = k or depth
    assert len(stats.drafted) == n and stats.steps <= 13 and stats.tokens == 3 * 13
    assert stats.drafted[0] >= 3 * (stats.steps - 1) and stats.acceptance[0] < 0.3  # rejections: rollbacks ran
    stop = stop_token(base, 6)
    want = model.generate(prompt, 14, stop_tokens=[stop])
    got, _ = speculative_generate(model, prompt, 14, stop_tokens=[stop], num_speculative_tokens=k)
    assert torch.equal(got, want) and (got[0, 6:] == 5).any()
    every = [base[0, 6].item(), base[1, 6].item(), base[2, 8].item()]  # all rows stop: generation ends early
    want = model.generate(prompt, 14, stop_tokens=every)
    got, _ = speculative_generate(model, prompt, 14, stop_tokens=every, num_speculative_tokens=k)
    assert got.shape[1] < 20 and torch.equal(got, want)


@pytest.mark.parametrize("depth,k", [(1, 1), (1, 3), (2, 2), (2, 3)])
def test_greedy_with_an_mtp_that_agrees(depth, k):
    """`agreeing_` at eps 0: every draft is accepted (``k + 1`` tokens per step); at eps 0.05 some are: the output is
    `Model.generate`'s either way."""
    model = agreeing_(tiny_model("mla", num_nextn_predict_layers=depth), 0.0)
    prompt = rand_ids(model.config, 2, 5)
    out, stats = speculative_generate(model, prompt, 17, num_speculative_tokens=k)
    assert torch.equal(out, model.generate(prompt, 17))
    assert stats.acceptance == [1.0] * k and stats.steps == math.ceil(16 / (k + 1))
    assert stats.tokens == 2 * 16 and stats.tokens_per_step == 2 * 16 / stats.steps
    model = agreeing_(tiny_model("mla", num_nextn_predict_layers=depth), 0.05)
    out, stats = speculative_generate(model, prompt, 17, num_speculative_tokens=k)
    assert torch.equal(out, model.generate(prompt, 17))
    assert 0.15 < stats.acceptance[0] < 0.95, stats  # both accepted and rejected drafts


@pytest.mark.parametrize("attention_type", ["mla", "dsa"])
def test_left_padded_batch(attention_type):
    """Prompts of 3, 7 and 5 tokens, left-padded with an attention mask (as dsfs.rollout pads them), each row with
    its own acceptance (the batch emits 1 + the minimum): each row equals `Model.generate` of its prompt alone, up to
    its stop token, then the fill."""
    model = agreeing_(tiny_model(attention_type, num_nextn_predict_layers=2, pad_token_id=0), 0.05)
    lens = [3, 7, 5]
    prompts = [rand_ids(model.config, 1, n) for n in lens]
    alone = [model.generate(p, 12)[0, p.shape[1]:] for p in prompts]
    first = {}
    for i, x in enumerate(alone[1].tolist()):
        first.setdefault(x, i)
    usable = {x: i for x, i in first.items() if 2 <= i <= 9}
    assert usable, "no usable stop token in this draw"
    stop = max(usable, key=usable.get)  # of the tokens row 1 first emits at steps 2 .. 9, the latest
    ends = [w.tolist().index(stop) + 1 if stop in w.tolist() else 12 for w in alone]
    ids = torch.zeros(3, 7, dtype=torch.long)
    mask = torch.zeros(3, 7, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, 7 - p.shape[1]:], mask[i, 7 - p.shape[1]:] = p[0], 1
    out, stats = speculative_generate(model, ids, 12, stop_tokens=[stop], attention_mask=mask)
    assert out.shape == (3, 7 + max(ends))
    for row, want, end in zip(out[:, 7:], alone, ends, strict=True):
        assert row[:end].tolist() == want[:end].tolist() and (row[end:] == 0).all()
    assert 0.15 < stats.acceptance[0] < 0.95, stats
    with pytest.raises(ValueError, match="attention_mask"):
        speculative_generate(model, ids, 4, attention_mask=mask[:, 1:])


def test_bad_arguments():
    with pytest.raises(ValueError, match="no MTP modules"):
        speculative_generate(tiny_model("mla"), torch.zeros(1, 3, dtype=torch.long), 4)
    model = tiny_model("mla", num_nextn_predict_layers=1)
    ids = rand_ids(model.config, 1, 3)
    for kw, msg in [({"num_speculative_tokens": 0}, "num_speculative_tokens"), ({"temperature": -1.0}, "temperature"),
                    ({"top_p": 1.5}, "top_p"), ({"max_new_tokens": -1}, "max_new_tokens")]:
        with pytest.raises(ValueError, match=msg):
            speculative_generate(model, ids, **{"max_new_tokens": 4, **kw})
    out, stats = speculative_generate(model, ids, 0)
    assert torch.equal(out, ids) and stats == SpeculativeStats([0], [0], 0, 0) and math.isnan(stats.tokens_per_step)
    want = model.generate(ids, 6)
    with torch.no_grad():
        model.mtp[0].eh_proj.weight.fill_(float("nan"))  # broken drafts: all rejected, the output stays exact
    assert torch.equal(speculative_generate(model, ids, 6)[0], want)
    assert speculative_generate(model, ids, 6, temperature=1.0)[0].shape == (1, 9)
    first = want[0, 3].item()
    if first in ids[0].tolist():
        pytest.skip("the first generated token is in the prompt in this draw")
    with torch.no_grad():
        model.model.embed_tokens.weight[first] = float("nan")  # the logits after it are NaN: found in a step
    for temperature in (0.0, 1.0):
        with pytest.raises(ValueError, match="non-finite logits for the tokens at positions 4"):
            speculative_generate(model, ids, 6, temperature=temperature, top_k=1)
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))
    with pytest.raises(ValueError, match="non-finite logits for the token at position 3"):
        speculative_generate(model, ids, 4)


# ---------------------------------------------------------------- sampling: the distribution of plain sampling


def _resample_from_p(p, q, d, generator):
    """A classic bug, for the test's power: on rejection, draw from ``p`` instead of ``norm(max(0, p - q))``."""
    b, k = d.shape
    qs = torch.stack(q, dim=1) if q else p.new_zeros(b, 0, p.shape[-1])
    u = torch.rand((b, k), generator=generator)
    ok = u * qs.gather(-1, d[..., None])[..., 0] < p[:, :k].gather(-1, d[..., None])[..., 0]
    n = ok.long().cumprod(-1).sum(-1)
    x = torch.multinomial(p[torch.arange(b), n], 1, generator=generator)
    return torch.where(torch.arange(k + 1) < n[:, None], torch.cat((d, x), dim=1), x), ok


def test_sampling_matches_the_distribution_of_plain_sampling(monkeypatch):
    """Vocabulary 8, temperature 1, top-k 3, top-p 0.9, 2 MTP depths, 4 new tokens: the joint distribution of the
    4 tokens is computed exactly from the model (the product of `sampling_probs` over every prefix), and samples of
    `speculative_generate` are tested against it with Pearson's chi-square (cells of expected count < 5 merged).

    Bound: the test fails when P(chi2_df >= X) < 1e-6, which a correct sampler reaches with probability 1e-6; the
    seeds are fixed, so the outcome is the same on every run (no flakes). Two samples: one batch of 3000 rows (the
    batch's minimum acceptance is then 0: it tests the residual draw) and 250 batches of 4 rows (whole chains: two
    accepted drafts and the bonus token; 1000 samples). Power: on the batch of 3000, the same test rejects the classic
    bug of drawing from ``p`` after a rejection with P < 1e-10 (measured here: 1e-125; on the chains 1e-33).
    """
    v, top_k, top_p = 8, 3, 0.9
    model = agreeing_(make_model(make_config("mla", vocab_size=v, num_nextn_predict_layers=2,
                                             max_position_embeddings=16)), 0.03)
    prompt = rand_ids(model.config, 1, 3)
    with torch.no_grad():
        xs = torch.tensor(list(itertools.product(range(v), repeat=3)))
        p = sampling_probs(model(torch.cat((prompt.expand(len(xs), 3), xs), 1))[:, 2:].double(), 1.0, top_k, top_p)
    p = p.view(v, v, v, 4, v)  # [x1, x2, x3, position, token]: p(. | prompt, x_1 .. x_position)
    joint = (p[0, 0, 0, 0][:, None, None, None] * p[:, 0, 0, 1][:, :, None, None] * p[:, :, 0, 2][..., None]
             * p[:, :, :, 3]).flatten()

    def p_value(batch: int, calls: int) -> tuple[float, list[float]]:
        gen = torch.Generator().manual_seed(1234)
        outs, stats = [], []
        for _ in range(calls):
            out, st = speculative_generate(model, prompt.expand(batch, 3), 4, temperature=1.0, top_k=top_k,
                                           top_p=top_p, generator=gen)
            outs.append(out[:, 3:])
            stats.append(st)
        x = torch.cat(outs)
        counts = torch.bincount(((x[:, 0] * v + x[:, 1]) * v + x[:, 2]) * v + x[:, 3], minlength=v**4).double()
        expected = joint * len(x)
        assert counts[expected == 0].sum() == 0, "a sample outside top-k/top-p"
        small = (expected > 0) & (expected < 5)
        big = expected >= 5
        c = torch.cat((counts[big], counts[small].sum()[None]))
        e = torch.cat((expected[big], expected[small].sum()[None]))
        chi2, df = float(((c - e) ** 2 / e).sum()), len(e) - 1
        acceptance = [sum(s.accepted[j] for s in stats) / sum(s.drafted[j] for s in stats) for j in range(2)]
        tail = torch.special.gammaincc(torch.tensor(df / 2.0, dtype=torch.float64), torch.tensor(chi2 / 2.0))
        return float(tail), acceptance

    big_batch, acc = p_value(3000, 1)
    chains, acc_chains = p_value(4, 250)
    assert big_batch > 1e-6 and chains > 1e-6, (big_batch, chains)
    assert 0.5 < acc[0] < 0.95 and 0.3 < acc[1] < 0.9 and 0.5 < acc_chains[0] < 0.95, (acc, acc_chains)
    monkeypatch.setattr(speculative, "_reject", _resample_from_p)
    assert p_value(3000, 1)[0] < 1e-10


# ---------------------------------------------------------------- runtime_cuda under Triton's interpreter


@pytest.mark.parametrize("attention_type,padded", [("mla", False), ("dsa", True)])
def test_runtime_cuda(attention_type, padded):
    """runtime_cuda.Model (Triton kernels; on CPU under TRITON_INTERPRET=1) with the reference's weights: the
    speculative tokens equal the reference's `Model.generate`, DSA in a left-padded batch (its padded row against the
    row alone) included; tiny, as the interpreter is slow."""
    from tests.cuda.conftest import DEVICE, interpreter_unusable

    if DEVICE.type == "cpu" and interpreter_unusable():
        pytest.skip(interpreter_unusable())
    import runtime_cuda

    cfg = make_config(attention_type, num_nextn_predict_layers=1, num_hidden_layers=1, first_k_dense_replace=9)
    ref = agreeing_(make_model(cfg), 0.02)
    fast = runtime_cuda.Model(cfg).to(DEVICE).eval()
    fast.load_state_dict(ref.state_dict())
    prompt = rand_ids(cfg, 2, 5)
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, :2] = 0 if padded else 1
    out, stats = speculative_generate(fast, prompt.to(DEVICE), 7, num_speculative_tokens=2,
                                      attention_mask=mask.to(DEVICE) if padded else None)
    want = ref.generate(prompt, 7)
    if padded:
        want[1, 2:] = ref.generate(prompt[1:, 2:], 7)[0]
    assert torch.equal(out.cpu()[:, 5:], want[:, 5:]) and stats.steps < 6, stats


# ---------------------------------------------------------------- dsfs generate --speculative mtp


@pytest.fixture(scope="module")
def model_dirs(data_dir, tmp_path_factory):
    """Two random micro models with the prepared data's tokenizer: ``mtp`` (MTP depth 1, drafts that mostly agree)
    and ``plain`` (no MTP)."""
    from dsfs import data
    from dsfs.checkpointing import save_model_dir
    from tests.test_train import MICRO_MODEL

    tok = data.read_tokenizer(data_dir / "tokenizer.json")
    root = tmp_path_factory.mktemp("spec")
    out = {}
    for name, depth in (("mtp", 1), ("plain", 0)):
        cfg = make_config("mla", **{**MICRO_MODEL, "vocab_size": tok.get_vocab_size(),
                                    "num_nextn_predict_layers": depth, "eos_token_id": tok.token_to_id(data.EOS),
                                    "max_position_embeddings": 128})
        model = agreeing_(make_model(cfg), 0.05)
        out[name] = save_model_dir(model, root / name, tokenizer_file=data_dir / "tokenizer.json")
        (root / name / "tokenizer_config.json").write_text((data_dir / "tokenizer_config.json").read_text())
    return out


def test_cli_generate_speculative(capsys, model_dirs):
    from tests.test_train import _cli

    base = ("generate", "--checkpoint", model_dirs["mtp"], "--prompt", "Once upon a time", "--prompt", "The dog",
            "--max-new-tokens", 24, "--temperature", 0, "--device", "cpu")
    rc, want, _ = _cli(capsys, *base)
    assert rc == 0 and want.count("--- ") == 2
    rc, out, err = _cli(capsys, *base, "--speculative", "mtp")
    assert rc == 0 and out == want, err
    assert "tokens/s" in err and "speculative mtp: acceptance depth 1 " in err and "tokens per verification" in err
    rc, out, err = _cli(capsys, *base, "--speculative", "mtp", "--num-speculative-tokens", 3)
    assert rc == 0 and out == want and "depth 3 " in err, err
    chat = ("generate", "--checkpoint", model_dirs["mtp"], "--chat", "--prompt", "Hi", "--max-new-tokens", 16,
            "--temperature", 0, "--device", "cpu")
    rc, want, _ = _cli(capsys, *chat)
    rc2, out, err = _cli(capsys, *chat, "--speculative", "mtp")
    assert rc == rc2 == 0 and out == want, err
    rc, out, err = _cli(capsys, *base[:-4], "--temperature", 0.8, "--top-k", 20, "--speculative", "mtp")
    assert rc == 0 and out.count("--- ") == 2 and "acceptance" in err
    rc, out, err = _cli(capsys, *base[:-4], "--max-new-tokens", 1, "--speculative", "mtp")  # no step: no nan
    assert rc == 0 and "no verification step" in err and "nan" not in err, err


def test_cli_generate_speculative_mlx(capsys, model_dirs):
    """--backend mlx: `runtime_mlx.speculative.speculative_generate` through the same CLI path, the same greedy text
    and acceptance as the reference's."""
    pytest.importorskip("mlx.core")
    from tests.test_train import _cli

    base = ("generate", "--checkpoint", model_dirs["mtp"], "--prompt", "Once upon a time", "--prompt", "The dog",
            "--max-new-tokens", 16, "--temperature", 0, "--speculative", "mtp", "--num-speculative-tokens", 2)
    rc, want, err_ref = _cli(capsys, *base, "--device", "cpu")
    rc2, out, err = _cli(capsys, *base, "--backend", "mlx")
    assert rc == rc2 == 0 and out == want, err
    assert err.splitlines()[-1] == err_ref.splitlines()[-1]  # the same acceptance line


@pytest.mark.parametrize("argv,msg", [
    (("--speculative", "mtp"), "needs MTP layers and this model has none"),
    (("--num-speculative-tokens", 2), "--num-speculative-tokens needs --speculative mtp"),
    (("--speculative", "mtp", "--num-speculative-tokens", 0), "expected an integer in 1..16"),
    (("--speculative", "mtp", "--num-speculative-tokens", 2000), "expected an integer in 1..16"),
    (("--speculative", "mtp", "--chat", "--tools"), "does not support --tools"),
    (("--speculative", "mtp", "--no-cache"), "needs the KV cache"),
])
def test_cli_generate_speculative_errors(capsys, model_dirs, argv, msg):
    from tests.test_train import _cli

    rc, out, err = _cli(capsys, "generate", "--checkpoint", model_dirs["plain"], "--max-new-tokens", 4,
                        "--device", "cpu", *argv)
    assert rc == 1 and out == "" and err.count("\n") == 1 and msg in err, err
