"""reference/model.py generation: `Model.generate` greedy with and without the KV cache, stop tokens and padding,
`sample_next`'s top-k / top-p filters, seeded sampling, bad arguments."""

from __future__ import annotations

import pytest
import torch

from reference.model import sample_next
from tests.reference_utils import rand_ids, tiny_model


@pytest.mark.parametrize("attention_type", ["mla", "dsa", "gqa"])
def test_greedy_with_and_without_cache_identical(attention_type):
    model = tiny_model(attention_type, index_topk=3)
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
    model = tiny_model("mla", pad_token_id=3)
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
    model = tiny_model("mla", pad_token_id=None)
    prompt = rand_ids(model.config, 2, 4)
    base = model.generate(prompt, 6)
    stop = base[0, 4].item()
    if stop in base[1, 4:].tolist():
        pytest.skip("both sequences emit the stop token in this draw")
    out = model.generate(prompt, 6, stop_tokens=[stop])
    assert out[0, 5:].tolist() == [stop] * 5 and torch.equal(out[1], base[1])


def test_top_k_1_and_tiny_top_p_equal_greedy():
    model = tiny_model("mla")
    prompt = rand_ids(model.config, 2, 5)
    greedy = model.generate(prompt, 8)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(model.generate(prompt, 8, temperature=0.8, top_k=1, generator=g), greedy)
    assert torch.equal(model.generate(prompt, 8, temperature=0.8, top_p=1e-6, generator=g), greedy)
    sampled = model.generate(prompt, 8, temperature=1.0, generator=g)
    assert not torch.equal(sampled, greedy)  # plain sampling does differ, so the two checks above can fail


def test_seeded_sampling_is_reproducible():
    model = tiny_model("mla")
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
    model = tiny_model("mla")
    prompt = rand_ids(model.config, 2, 3)
    for kw in (dict(temperature=-1.0), dict(temperature=1.0, top_p=0.0), dict(temperature=1.0, top_k=0)):
        with pytest.raises(ValueError):
            model.generate(prompt, 2, **kw)
    with pytest.raises(ValueError):
        model.generate(prompt, -1)
    assert torch.equal(model.generate(prompt, 0), prompt)
