"""Batched rollouts (dsfs.rollout): a left-padded batch equals its prompts generated one by one, greedy and sampled;
stops, log-probs, tool calls through the cache, and the MLX backend."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dsfs.rollout import Completion, rollout, sequence_seeds
from dsfs.tools import TOOLS
from reference import Model
from tests.reference_utils import make_config, randomize_


def _model(attention_type: str = "mla", **kw) -> Model:
    torch.manual_seed(0)
    return randomize_(Model(make_config(attention_type, **kw))).eval()


PROMPTS = [[1, 5, 9, 2, 7, 3], [1, 4], [1, 8, 8, 6, 2, 2, 5, 9, 4, 3], [1]]


@pytest.mark.parametrize("attention_type", ["mla", "gqa", "dsa"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_batch_equals_one_by_one(attention_type, temperature):
    model = _model(attention_type)
    seeds = sequence_seeds(3, len(PROMPTS))
    kw = dict(temperature=temperature, top_k=40 if temperature else None, top_p=0.95 if temperature else None)
    batch = rollout(model, PROMPTS, 12, seeds=seeds, **kw)
    for p, s, b in zip(PROMPTS, seeds, batch, strict=True):
        alone = rollout(model, [p], 12, seeds=[s], **kw)[0]
        assert b.ids == alone.ids and b.prompt_ids == p
        torch.testing.assert_close(torch.tensor(b.logps), torch.tensor(alone.logps), atol=1e-5, rtol=1e-5)
    # the batch size splits the work only
    again = rollout(model, PROMPTS, 12, seeds=seeds, batch_size=3, **kw)
    assert [c.ids for c in again] == [c.ids for c in batch]


def test_greedy_equals_model_generate_and_logps_are_the_models():
    model = _model()
    out = rollout(model, PROMPTS, 10, temperature=0.0)
    for p, c in zip(PROMPTS, out, strict=True):
        want = model.generate(torch.tensor([p]), 10)[0, len(p):].tolist()
        assert c.ids == want and c.finish_reason == "length" and c.loss_mask == [1] * 10
        seq = torch.tensor([p + c.ids])
        logp = F.log_softmax(model(seq)[0, len(p) - 1:-1].float(), dim=-1)
        torch.testing.assert_close(torch.tensor(c.logps), logp.gather(1, torch.tensor(c.ids)[:, None])[:, 0],
                                   atol=1e-5, rtol=1e-5)


def test_logps_at_temperature_and_no_cache():
    model = _model()
    a = rollout(model, PROMPTS, 8, temperature=0.7, seed=1)
    b = rollout(model, PROMPTS, 8, temperature=0.7, seed=1, use_cache=False)
    assert [c.ids for c in a] == [c.ids for c in b]
    c = a[0]
    seq = torch.tensor([PROMPTS[0] + c.ids])
    logp = F.log_softmax(model(seq)[0, len(PROMPTS[0]) - 1:-1].float() / 0.7, dim=-1)
    torch.testing.assert_close(torch.tensor(c.logps), logp.gather(1, torch.tensor(c.ids)[:, None])[:, 0],
                               atol=1e-5, rtol=1e-5)


def test_each_sequence_stops_on_its_own():
    model = _model()
    free = rollout(model, PROMPTS, 12, temperature=0.0)
    stop = free[0].ids[3]
    out = rollout(model, PROMPTS, 12, temperature=0.0, stop_token_ids=[stop])
    for f, o in zip(free, out, strict=True):
        if stop in f.ids:
            k = f.ids.index(stop)
            assert o.ids == f.ids[:k + 1] and o.finish_reason == "stop"
        else:
            assert o.ids == f.ids and o.finish_reason == "length"


def test_num_generations_and_seeds():
    model = _model()
    out = rollout(model, PROMPTS[:2], 6, temperature=1.0, num_generations=3, seed=5)
    assert [c.prompt_ids for c in out] == [PROMPTS[0]] * 3 + [PROMPTS[1]] * 3
    assert len({tuple(c.ids) for c in out[:3]}) > 1  # distinct seeds: distinct samples
    assert sequence_seeds(5, 6)[2:] == sequence_seeds(5, 4, start=2)


def test_max_position_embeddings_caps_the_budget():
    model = _model(max_position_embeddings=16)
    out = rollout(model, PROMPTS, 50, temperature=0.0)
    assert all(len(c.ids) == 16 - 10 for c in out)  # the longest prompt (10) sets the batch's room


def test_bad_options():
    model = _model()
    with pytest.raises(ValueError, match="temperature"):
        rollout(model, PROMPTS, 4, temperature=-1.0)
    with pytest.raises(ValueError, match="at least one token"):
        rollout(model, [[]], 4)
    with pytest.raises(ValueError, match="seeds"):
        rollout(model, PROMPTS, 4, seeds=[1])
    with pytest.raises(ValueError, match="tokenizer"):
        rollout(model, PROMPTS, 4, stop_strings=["x"])


class _Tok:
    """A character tokenizer: ids 0..12 are the special tokens of dsfs.data, then one id per character."""

    encode_special_tokens = False

    def __init__(self):
        from dsfs.data import SPECIAL_TOKENS

        self.special = list(SPECIAL_TOKENS)
        self.chars = [chr(c) for c in range(32, 127)]

    def token_to_id(self, t):
        return self.special.index(t) if t in self.special else None

    def encode(self, text, add_special_tokens=False):
        class E:
            ids = [len(self.special) + self.chars.index(ch) for ch in text]
        return E()

    def decode(self, ids, skip_special_tokens=False):
        return "".join(self.special[i] if i < len(self.special) else self.chars[i - len(self.special)] for i in ids)


class _Scripted(torch.nn.Module):
    """A model that writes a fixed script after its prompt (one token per position, whatever came before) and
    records what it was fed: the rollout's tool responses must reach it through the cache."""

    def __init__(self, script: list[int], vocab: int):
        super().__init__()
        self.script, self.vocab, self.fed = script, vocab, []
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.config = make_config(vocab_size=vocab, max_position_embeddings=128)

    def new_cache(self):
        return {"n": 0}

    def forward(self, ids, cache, attention_mask=None):
        self.fed.append(ids.clone())
        n = cache["n"] if cache is not None else 0
        cache_n = n + ids.shape[1]
        if cache is not None:
            cache["n"] = cache_n
        logits = torch.full((ids.shape[0], ids.shape[1], self.vocab), -10.0)
        step = cache_n - self.prompt_len
        if 0 <= step < len(self.script):
            logits[:, -1, self.script[step]] = 10.0
        return logits


def test_tool_call_pauses_runs_and_resumes():
    tok = _Tok()
    call = '{"name": "calculator", "arguments": {"expression": "12*34"}}'
    t = tok.token_to_id
    script = [t("<think>"), t("<tool_call>"), *tok.encode(call).ids, t("</tool_call>")]
    vocab = len(tok.special) + len(tok.chars)
    model = _Scripted(script + [t("</think>")] * 40 + [0], vocab)
    model.prompt_len = 1
    out = rollout(model, [[1]], 80, temperature=0.0, tokenizer=tok, tools=TOOLS, stop_token_ids=[0])[0]
    text = tok.decode(out.ids)
    assert text.startswith("<think><tool_call>" + call + "</tool_call><tool_response>408</tool_response>")
    k = out.ids.index(t("<tool_response>"))
    n = len(tok.encode("408").ids) + 2
    assert out.loss_mask[:k] == [1] * k and out.loss_mask[k:k + n] == [0] * n and out.tool_calls == 1
    assert all(lp == 0.0 for lp in out.logps[k:k + n])
    assert isinstance(out, Completion)
