"""`dsfs.rewards`: R1's rule-based rewards on completions the task generators write (arithmetic r1 and tool
traces, GSM8K), their corruptions and adversarial strings; loading a user's reward function; TRL's weighted sum
with None / NaN left out, and one-line errors naming the function."""

from __future__ import annotations

import math
import random
import re
import sys
import threading

import pytest

from dsfs import arithmetic as A
from dsfs import gsm8k as G
from dsfs import rewards as R
from dsfs.errors import ConfigError

needs_gsm8k = pytest.mark.skipif(not G.DEFAULT_TEST.is_file(), reason="the shared GSM8K files (../shared/data) are "
                                 "absent")


def _problems() -> list[A.Problem]:
    return [p for s in A.SPLITS for p in A.problems(s, 40, seed=3)] + [A.Problem((347, 582), ("*",)),
                                                                      A.Problem((38, 47), ("-",))]


def _score(func, completions, **columns):
    return func([""] * len(completions), completions, **columns)


def test_arithmetic_r1_and_tool_traces_score_1():
    ps = _problems()
    gold = [p.answer for p in ps]
    for style in ("r1", "tool"):
        cs = [A.completion(p, style) for p in ps]
        assert _score(R.accuracy_reward, cs, answer=gold) == [1.0] * len(ps)
        assert _score(R.format_reward, cs) == [1.0] * len(ps)
        assert _score(R.tag_count_reward, cs) == [1.0] * len(ps)
        ended = [c + "<|endoftext|>" for c in cs]  # as decoded with the closing eos
        assert _score(R.format_reward, ended) == _score(R.accuracy_reward, ended, answer=gold) == [1.0] * len(ps)
    plain = [A.completion(p) for p in ps]  # no answer tags: the plain style earns neither
    assert _score(R.accuracy_reward, plain, answer=gold) == _score(R.format_reward, plain) == [0.0] * len(ps)
    assert _score(R.tag_count_reward, plain) == [0.5] * len(ps)  # <think>\n and \n</think>\n


def test_corrupted_answers_score_0():
    ps, rng = _problems(), random.Random(0)
    for style in ("r1",):
        bad = [A.corrupt(p, rng, style) for p in ps]
        assert _score(R.accuracy_reward, bad, answer=[p.answer for p in ps]) == [0.0] * len(ps)
        assert _score(R.format_reward, bad) == [1.0] * len(ps)  # wrong, but well formed
    p = A.Problem((347, 582), ("*",))
    tool = A.completion(p, "tool")
    wrong = tool.replace("<answer>\n201954", "<answer>\n201953")
    assert _score(R.accuracy_reward, [wrong], answer=[p.answer]) == [0.0]


ADVERSARIAL = {  # completion -> (accuracy for gold 85, format)
    "<think>\nx\n</think>\n<answer>\n85\n</answer>": (1.0, 1.0),
    "<think>x</think><answer>85</answer>": (1.0, 1.0),  # whitespace is free
    "  <think>x</think>  \n <answer> 85 </answer>\n<|endoftext|><|pad|><|pad|>": (1.0, 1.0),
    "<think></think><answer>85</answer>": (1.0, 1.0),
    "<think>a <tool_call>{}</tool_call><tool_response>error: x</tool_response> b</think><answer>85</answer>":
        (1.0, 1.0),
    "<answer>85</answer>": (1.0, 0.0),  # no think
    "<think>x</think>\n85": (0.0, 0.0),  # no answer tags
    "<think>x</think><answer>85</answer> and more": (1.0, 0.0),
    "<think>x</think><answer>85</answer><|endoftext|><|endoftext|>": (1.0, 0.0),
    "<think>x</think><answer>85</answer><|endoftext|>x": (1.0, 0.0),
    "<think>x</think><answer>84</answer><answer>85</answer>": (1.0, 0.0),  # the last answer counts
    "<think>x</think><answer>85</answer><answer>84</answer>": (0.0, 0.0),
    "<think>x</think><answer></answer>": (0.0, 0.0),
    "<think>x</think><answer>  </answer>": (0.0, 0.0),
    "<think>x</think><answer>85.0</answer>": (0.0, 1.0),  # an integer gold needs exactly the integer
    "<think>x</think><answer>+85</answer>": (1.0, 1.0),
    "<think>x</think><answer>085</answer>": (1.0, 1.0),
    "<think>x</think><answer>84 or 85</answer>": (0.0, 1.0),
    "<think>x</think><answer>47+38</answer>": (0.0, 1.0),  # copying the question earns nothing
    "<think>x</think><answer>٨٥</answer>": (0.0, 1.0),  # Arabic-Indic digits are not "85"
    "<think>x</think><answer>" + "8" * 500 + "</answer>": (0.0, 1.0),
    "<think>x</think><answer>" + "8" * 5000 + "</answer>": (0.0, 1.0),
    "<think>x<think>y</think><answer>85</answer>": (1.0, 0.0),
    "<think>x</think>y</think><answer>85</answer>": (1.0, 0.0),
    "<think>x</think><think>y</think><answer>85</answer>": (1.0, 0.0),
    "<think>x</think><answer><think>85</answer>": (0.0, 0.0),
    "<think>x<answer>1</answer></think><answer>85</answer>": (1.0, 0.0),
    "<think>x <tool_call>{}</think><answer>85</answer>": (1.0, 0.0),  # an unclosed call
    "<think>x </tool_response></think><answer>85</answer>": (1.0, 0.0),
    "<think>x <tool_call><tool_call></tool_call></tool_call></think><answer>85</answer>": (1.0, 0.0),
    "<think>x</think><answer>85</answer><|user|>": (1.0, 0.0),
    "<think>x<|assistant|></think><answer>85</answer>": (1.0, 0.0),
    "<think>x</think><answer>85<|endoftext|></answer>": (0.0, 0.0),
    "</answer>85<answer>": (0.0, 0.0),
    "<answer>85": (0.0, 0.0),
    "": (0.0, 0.0),
}


@pytest.mark.parametrize("text", list(ADVERSARIAL))
def test_adversarial_completions(text):
    acc, fmt = ADVERSARIAL[text]
    assert _score(R.accuracy_reward, [text], answer=[85]) == [acc]
    assert _score(R.format_reward, [text]) == [fmt]


def test_tag_count_is_open_r1s():
    r1 = "<think>\nx\n</think>\n<answer>\n85\n</answer>"
    assert _score(R.tag_count_reward, [r1, r1 + r1, "<think>x</think><answer>85</answer>", "<think>\nx", "", None]) \
        == [1.0, 0.0, 0.0, 0.25, 0.0, 0.0]
    assert _score(R.tag_count_reward, ["<think>\nx\n</think>\n<answer>\n8\n</answer>\n</answer>"]) == [0.75]


def test_answer_text():
    assert R.answer_text("<answer> 1 </answer> <answer>\n2\n</answer>") == "2"
    assert R.answer_text("<answer><answer>5</answer>") == "5"
    assert R.answer_text("</answer><answer>") is None and R.answer_text(None) is None


def test_math_verify_equivalences():
    cases = [("72", "72", 1.0), ("72", "72.0", 1.0), ("72", "$72", 1.0), ("1000", "1,000", 1.0),
             ("1,000", "1000", 1.0), ("18", "18.00", 1.0), ("0.5", "1/2", 1.0), ("\\frac{1}{2}", "0.5", 1.0),
             ("72", "\\boxed{72}", 1.0), ("72", "73", 0.0), ("72", "72.5", 0.0), ("-7", "-7", 1.0), ("-7", "7", 0.0),
             ("72", "seventy-two", 0.0), (72.0, "72", 1.0), ("72", "", 0.0), ("3\\pi", "3\\pi", 1.0),
             ("3\\pi", "3", 0.0), ("\\sqrt{2}", "2^{1/2}", 1.0), ("$\\frac{3}{4}$", "0.75", 1.0),
             ("72", "72 apples", 1.0)]  # math-verify is lenient: it reads the number
    comps = [f"<think>x</think><answer>{a}</answer>" for _, a, _ in cases]
    assert _score(R.accuracy_reward, comps, answer=[g for g, _, _ in cases]) == [w for _, _, w in cases]
    assert _score(R.accuracy_reward, ["<think>x</think><answer>1</answer>"], answer=["\\frac{"]) == [None]


def test_math_verify_off_the_main_thread():
    """math-verify's timeouts need the main thread's signals; elsewhere the reward still works."""
    out = []
    t = threading.Thread(target=lambda: out.append(_score(R.accuracy_reward, ["<answer>$72</answer>"], answer=["72"])))
    t.start()
    t.join()
    assert out == [[1.0]]


@needs_gsm8k
def test_gsm8k_completions():
    rows = G.read(G.DEFAULT_TEST)[:150]
    assert any(e.answer >= 1000 for e in rows)
    gold = [str(e.answer) for e in rows]  # GSM8K's gold as a string: math-verify decides
    r1 = [G.completion(e, "r1") for e in rows]
    assert _score(R.accuracy_reward, r1, answer=gold) == [1.0] * len(rows)
    assert _score(R.format_reward, r1) == _score(R.tag_count_reward, r1) == [1.0] * len(rows)
    forms = [G.completion(e, "r1").replace(f"<answer>\n{e.answer}\n", f"<answer>\n{form}\n")
             for e in rows for form in (f"{e.answer}.0", f"${e.answer}", f"{e.answer:,}", f"\\boxed{{{e.answer}}}")]
    assert _score(R.accuracy_reward, forms, answer=[g for g in gold for _ in range(4)]) == [1.0] * len(forms)
    rng = random.Random(0)
    bad = [G.corrupt(e, rng, "r1") for e in rows]
    assert _score(R.accuracy_reward, bad, answer=gold) == [0.0] * len(rows)
    assert _score(R.accuracy_reward, r1, answer=[e.answer for e in rows]) == [1.0] * len(rows)  # int gold: exact


def test_accuracy_needs_the_answer_column():
    with pytest.raises(ConfigError, match=r"accuracy_reward needs an 'answer' column: .*\(columns given: solution\)"):
        R.accuracy_reward(["p"], ["c"], solution=["1"])


def test_rewards_registry_and_resolve(tmp_path, monkeypatch):
    assert R.REWARDS == {"accuracy": R.accuracy_reward, "format": R.format_reward, "tag_count": R.tag_count_reward}
    names, funcs, weights = R.resolve_rewards(["accuracy", "format"], [1, 0.5])
    assert names == ["accuracy_reward", "format_reward"] and funcs == [R.accuracy_reward, R.format_reward]
    assert weights == [1.0, 0.5]
    assert R.resolve_rewards("format")[0] == ["format_reward"]
    assert R.resolve_rewards(["format", "format"])[0] == ["format_reward", "format_reward_2"]

    (tmp_path / "my_rewards.py").write_text("def brevity(prompts, completions, **kw):\n"
                                            "    return [-len(c) / 100 for c in completions]\n"
                                            "LIMIT = 3\n"
                                            "class Scorer:\n"
                                            "    def score(self, prompts, completions, **kw):\n"
                                            "        return [1.0] * len(completions)\n"
                                            "scorer = Scorer()\n")
    (tmp_path / "broken_rewards.py").write_text("import no_such_module_xyz\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".")])
    fn = R.load_reward("my_rewards:brevity")
    assert fn(["p"], ["abc"]) == [-0.03] and "" not in sys.path
    assert R.resolve_rewards(["accuracy", "my_rewards:brevity"])[0] == ["accuracy_reward", "brevity"]
    assert R.load_reward("my_rewards:scorer.score")([], ["a"]) == [1.0]
    bad = {
        "accuracy_reward": "expected one of accuracy, format, tag_count or 'module:function'",
        "my_rewards:": "expected one of",
        ":brevity": "expected one of",
        "a:b:c": "expected one of",
        "no_such_mod_xyz:f": "cannot import module 'no_such_mod_xyz' (No module named 'no_such_mod_xyz')",
        "broken_rewards:f": "cannot import module 'broken_rewards' (No module named 'no_such_module_xyz')",
        "my_rewards:nope": "module 'my_rewards' has no 'nope'",
        "my_rewards:LIMIT": "LIMIT is a int, not a function",
    }
    for spec, msg in bad.items():
        with pytest.raises(ConfigError, match=re.escape(f"reward function '{spec}': {msg}")):
            R.resolve_rewards([spec])
    with pytest.raises(ConfigError, match="no reward functions"):
        R.resolve_rewards([])
    with pytest.raises(ConfigError, match=r"reward weights \[1.0\]: expected 2 finite numbers, one per reward"):
        R.resolve_rewards(["accuracy", "format"], [1.0])
    with pytest.raises(ConfigError, match="expected 1 finite number, one per"):
        R.resolve_rewards(["accuracy"], [math.inf])


def test_combine_rewards_weighted_with_none_left_out():
    def half(prompts, completions, **kw):
        return [0.5] * len(completions)

    def sometimes(prompts, completions, answer, **kw):
        return [None if a is None else float(a) for a in answer]

    completions = [A.completion(A.Problem((47, 38), ("+",)), "r1"), "junk", "<think>x</think><answer>9</answer>"]
    total, per = R.combine_rewards([R.accuracy_reward, R.format_reward, half], [2.0, 1.0, -1.0], ["p"] * 3,
                                   completions, {"answer": [85, 85, 9]})
    assert per == {"accuracy_reward": [1.0, 0.0, 1.0], "format_reward": [1.0, 0.0, 1.0], "half": [0.5] * 3}
    assert total == [2.5, -0.5, 2.5]
    total, per = R.combine_rewards([sometimes, half], None, ["p"] * 3, ["a", "b", "c"], {"answer": [1, None, None]},
                                   names=["s", "h"])
    assert total == [1.5, 0.5, 0.5] and math.isnan(per["s"][1]) and per["h"] == [0.5] * 3
    total, per = R.combine_rewards([sometimes], [3.0], ["p"], ["a"], {"answer": [None]})
    assert total == [0.0] and math.isnan(per["sometimes"][0])  # every function NaN: 0, as TRL's nansum
    np = pytest.importorskip("numpy")
    total, _ = R.combine_rewards([lambda p, c, **k: np.array([1.0, 2.0]), lambda p, c, **k: [True, np.float32(1)]],
                                 None, ["p", "q"], ["a", "b"])
    assert total == [2.0, 3.0]


def test_combine_rewards_errors_name_the_function():
    def short(prompts, completions, **kw):
        return [1.0]

    def words(prompts, completions, **kw):
        return ["good"] * len(completions)

    def infinite(prompts, completions, **kw):
        return [math.inf] * len(completions)

    def scalar(prompts, completions, **kw):
        return 1.0

    cases = [(short, "reward function short returned 1 values for 2 completions; expected a list of 2 numbers"),
             (words, "reward function words returned str 'good' for completion 0; expected a number"),
             (infinite, "reward function infinite returned inf for completion 0; expected a finite number"),
             (scalar, "reward function scalar returned a float for 2 completions")]
    for f, msg in cases:
        with pytest.raises(ConfigError, match=msg.replace("(", r"\(")):
            R.combine_rewards([R.format_reward, f], None, ["p", "q"], ["a", "b"])
    with pytest.raises(ConfigError, match="column 'answer' has 1 values for 2 completions"):
        R.combine_rewards([R.format_reward], None, ["p", "q"], ["a", "b"], {"answer": [1]})
    with pytest.raises(ConfigError, match="1 prompts for 2 completions"):
        R.combine_rewards([R.format_reward], None, ["p"], ["a", "b"])
    with pytest.raises(ConfigError, match="expected 1 finite number"):
        R.combine_rewards([R.format_reward], [1, 2], ["p"], ["a"])
