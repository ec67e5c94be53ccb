"""dsfs grpo's machinery: advantages (TRL's definitions), the rollout batch layout, option checks, and a tiny run
that trains, logs TRL's metrics, resumes exactly after an interrupt, and refuses bad input."""

from __future__ import annotations

import math

import pytest
import torch

from dsfs.errors import ConfigError
from dsfs.grpo import GRPO_CONFIG, GRPO_DEFAULTS, advantages, check_grpo_options, collate_rollouts, gather_positions
from dsfs.rollout import Completion


def test_advantages_match_trl_definition():
    torch.manual_seed(0)
    r = torch.randn(12)
    g = r.view(-1, 4)
    want = ((g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + 1e-4)).flatten()
    torch.testing.assert_close(advantages(r, 4, "group"), want)
    want_b = ((g - g.mean(1, keepdim=True)).flatten()) / (r.std() + 1e-4)
    torch.testing.assert_close(advantages(r, 4, "batch"), want_b)
    torch.testing.assert_close(advantages(r, 4, "none"), (g - g.mean(1, keepdim=True)).flatten())


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_equal_rewards_give_zero_advantage_and_stay_finite(scale):
    r = torch.tensor([0.1, 0.1, 0.1, 0.1, 1e30, -1e30, 0.0, 0.0, 3.0, 3.0, 3.0, 3.0])
    a = advantages(r, 4, scale)
    assert torch.isfinite(a).all()
    assert (a[:4] == 0).all() and (a[8:] == 0).all()
    assert advantages(torch.ones(8), 4, scale).abs().max() == 0
    with pytest.raises(ValueError, match="finite"):
        advantages(torch.tensor([1.0, float("nan")]), 2)
    with pytest.raises(ValueError, match="multiple"):
        advantages(torch.ones(5), 2)


def test_collate_rollouts_layout():
    comps = [Completion([1, 5, 6], [7, 8, 0], [-0.1, -0.2, -0.3], [1, 1, 1], "stop"),
             Completion([1, 4], [9, 10, 11, 12], [-1.0, 0.0, 0.0, -2.0], [1, 0, 0, 1], "length")]
    b = collate_rollouts(comps, torch.tensor([0.5, -0.5]), pad_id=2, max_width=64, mask_truncated=False)
    assert b["input_ids"][0, :5].tolist() == [1, 5, 6, 7, 8] and b["input_ids"][1, :5].tolist() == [1, 4, 9, 10, 11]
    assert b["positions"].tolist() == [[2, 3, 4, 0], [1, 2, 3, 4]]
    assert b["completion_ids"].tolist() == [[7, 8, 0, 0], [9, 10, 11, 12]]
    assert b["completion_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 1]]
    assert int(b["num_tokens"]) == 6 + 6
    # the gathered positions predict the completion tokens: input position p is followed by completion token c
    for r in range(2):
        for c in range(int(b["completion_mask"][r].sum())):
            p = int(b["positions"][r, c])
            seq = comps[r].prompt_ids + comps[r].ids
            assert seq[p + 1] == comps[r].ids[c]
    m = collate_rollouts(comps, torch.zeros(2), 2, 64, mask_truncated=True)["completion_mask"]
    assert m[1].sum() == 0 and m[0].sum() == 3
    h = torch.randn(2, b["input_ids"].shape[1], 3)
    assert torch.equal(gather_positions(h, b["positions"])[1, 2], h[1, 3])


def test_option_checks():
    ok = dict(GRPO_DEFAULTS)
    check_grpo_options(ok, GRPO_CONFIG)
    for k, v, msg in [("num_generations", 1, "num-generations"), ("num_generations", 5, "multiple"),
                      ("temperature", 0.0, "temperature"), ("beta", -1.0, "beta"), ("epsilon", math.nan, "epsilon"),
                      ("loss_type", "ppo", "loss-type"), ("scale_rewards", "x", "scale-rewards"),
                      ("top_p", 0.0, "top-p"), ("num_iterations", 0, "num-iterations"),
                      ("reward_weights", [1.0], "reward-weights"), ("temperature", "1.0", "expected a number"),
                      ("num_iterations", 2.0, "expected an integer"), ("tools", "no", "true or false"),
                      ("max_completion_length", 96.5, "expected an integer"), ("reward_weights", 1.0, "lists"),
                      ("style", "tool", "needs --tools")]:
        with pytest.raises(ConfigError, match=msg):
            check_grpo_options({**ok, k: v}, GRPO_CONFIG)


def test_a_reward_function_without_kwargs_is_a_one_line_error():
    from dsfs.rewards import combine_rewards

    def brevity(prompts, completions):
        return [0.0] * len(completions)

    with pytest.raises(ConfigError, match="reward function brevity cannot take this data's columns \\(answer\\)"):
        combine_rewards([brevity], None, ["p"], ["c"], {"answer": [1]})


def test_tool_responses_encode_special_token_text_literally():
    from dsfs.rollout import _Tools
    from dsfs.tools import TOOLS
    from tests.test_rollout import _Tok

    class Tok(_Tok):  # a tokenizer that honours encode_special_tokens, as tokenizers.Tokenizer does
        def encode(self, text, add_special_tokens=False):
            if self.encode_special_tokens:
                return super().encode(text)
            raise AssertionError("special-token text must be encoded literally")

    tok = Tok()
    tools = _Tools(TOOLS, tok, 2)
    ids = tools.literal("</tool_response><|endoftext|>")
    assert tok.token_to_id("</tool_response>") not in ids and 0 not in ids and tok.encode_special_tokens is False
