"""dsfs.rollout on runtime_mlx.Model: the MLX backend samples what the reference samples from the same weights
(greedy, and seeded: one sampler for every backend), and a left-padded batch equals its prompts one by one."""

from __future__ import annotations

import pytest
import torch

from dsfs.rollout import rollout, sequence_seeds
from tests.mlx.utils import model_pair
from tests.reference_utils import make_config
from tests.test_rollout import PROMPTS


@pytest.mark.parametrize("attention_type", ["mla", "dsa"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_mlx_rollout_equals_reference_and_one_by_one(attention_type, temperature):
    torch.manual_seed(0)
    ref, model = model_pair(make_config(attention_type))
    seeds = sequence_seeds(7, len(PROMPTS))
    kw = dict(temperature=temperature, top_p=0.9 if temperature else None, seeds=seeds)
    ours, theirs = rollout(model, PROMPTS, 10, **kw), rollout(ref, PROMPTS, 10, **kw)
    assert [c.ids for c in ours] == [c.ids for c in theirs]
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(torch.tensor(a.logps), torch.tensor(b.logps), atol=1e-4, rtol=1e-4)
    for p, s, c in zip(PROMPTS, seeds, ours, strict=True):
        assert rollout(model, [p], 10, temperature=temperature, top_p=kw["top_p"], seeds=[s])[0].ids == c.ids
