"""`dsfs.arithmetic`: deterministic, disjoint train / held-out problems, correct answers and worked steps, wrong
corruptions, the answer parser, and one token per digit under the project's tokenizer."""

from __future__ import annotations

import random
import re

import pytest

from dsfs import arithmetic as A
from dsfs import chat, data
from dsfs.errors import DataError
from dsfs.tools import calculator


def _eval(expression: str) -> int:
    """Python's own integer arithmetic on a question's expression (digits, spaces, + - * only)."""
    assert re.fullmatch(r"[\d +*-]+", expression), expression
    return eval(expression)  # noqa: S307 (checked above: only digits and operators)


def _some(split: str, n: int = 1500, seed: int = 0, held_out: bool = False) -> list[A.Problem]:
    return A.problems(split, min(n, A.capacity(split, held_out)), seed, held_out)


EDGES = [A.Problem(xs, ops) for xs, ops in [
    ((0, 0), ("+",)), ((0, 0), ("-",)), ((99, 99), ("+",)), ((5, 95), ("+",)), ((100, 1), ("-",)), ((1, 100), ("-",)),
    ((999, 999), ("-",)), ((0, 999), ("-",)), ((99, 9), ("*",)), ((0, 7), ("*",)), ((10, 0), ("*",)),
    ((0, 99, 99), ("-", "-")), ((5, 34, 12), ("-", "+")), ((5, 34, 40), ("-", "+")), ((99, 99, 99), ("+", "+")),
    ((10, 10, 0), ("-", "-")), ((3, 3, 3), ("-", "+")),
]]


def test_splits_and_format_examples():
    assert {"add_sub_2", "add_sub_3", "mul_2x1", "chain_3"} <= set(A.SPLITS)
    assert A.SPLITS["add_sub_2"] == A.Split(2, ("+", "-")) and A.SPLITS["add_sub_2"].size == 20_000
    assert A.SPLITS["mul_2x1"].size == 1000 and A.SPLITS["chain_3"].operands == 3
    assert A.SPLITS["mul_3x3"].size == 900 * 900 and "mul_3x3" not in A.TRAIN_MIXTURE
    assert all(100 <= x <= 999 for p in A.problems("mul_3x3", 300) for x in p.operands)
    assert set(A.MIXTURES[A.DEFAULT_MIXTURE]) <= set(A.SPLITS) and A.TRAIN_MIXTURE == A.MIXTURES["mix"]
    p = A.Problem((47, 38), ("+",))
    assert p.question == "What is 47 + 38?" and p.canonical == "47+38" and p.answer == 85
    assert A.completion(p) == "<think>\n47+38\n7+8=15\n4+3+1=8\n</think>\n85"
    assert A.completion(p, "r1") == "<think>\n47+38\n7+8=15\n4+3+1=8\n</think>\n<answer>\n85\n</answer>"
    assert A.completion(A.Problem((38, 47), ("-",))) == "<think>\n38-47\n-(47-38)\n17-8=9\n4-3-1=0\n</think>\n-9"
    assert A.completion(A.Problem((47, 6), ("*",))) == "<think>\n47*6\n7*6=42\n4*6+4=28\n</think>\n282"
    assert A.completion(A.Problem((5, 34, 12), ("-", "+"))) == (
        "<think>\n5-34\n-(34-5)\n14-5=9\n3-0-1=2\n-29+12\n-(29-12)\n9-2=7\n2-1=1\n</think>\n-17")
    assert A.conversation(p) == [{"role": "user", "content": "What is 47 + 38?"},
                                 {"role": "assistant", "content": A.completion(p)}]
    with pytest.raises(ValueError, match="style 'xml'"):
        A.completion(p, "xml")
    with pytest.raises(ValueError, match="style 'tool': expected 'plain' or 'r1' \\(tool traces of arithmetic"):
        A.format_completion("x", 1, "tool")


def test_long_multiplication_and_tool_formats():
    p = A.Problem((347, 582), ("*",), "mul_3x3")
    assert p.answer == 201954
    assert A.completion(p) == "\n".join([
        "<think>", "347*582",
        "7*2=14", "4*2+1=9", "3*2=6", "347*2=694",
        "7*8=56", "4*8+5=37", "3*8+3=27", "347*80=27760",
        "7*5=35", "4*5+3=23", "3*5+2=17", "347*500=173500",
        "694+27760+173500", "4+0+0=4", "9+6+0=15", "6+7+5+1=19", "0+7+3+1=11", "0+2+7+1=10", "0+0+1+1=2",
        "</think>", "201954"])
    # a zero digit of the multiplier has no partial product; one nonzero digit needs no sum
    assert A.completion(A.Problem((123, 405), ("*",))).split("\n")[1:9] == [
        "123*405", "3*5=15", "2*5+1=11", "1*5+1=6", "123*5=615", "3*4=12", "2*4+1=9", "1*4=4"]
    assert A.completion(A.Problem((123, 400), ("*",))) == (
        "<think>\n123*400\n3*4=12\n2*4+1=9\n1*4=4\n123*400=49200\n</think>\n49200")
    tool = A.completion(p, "tool")
    assert tool == ('<think>\n347*582\n<tool_call>{"name": "calculator", "arguments": {"expression": "347*582"}}'
                    '</tool_call><tool_response>201954</tool_response>\n</think>\n<answer>\n201954\n</answer>')
    assert tool.split("</think>")[1] == A.completion(p, "r1").split("</think>")[1]  # the r1 layout after </think>
    assert A.completion(A.Problem((5, 34, 12), ("-", "+")), "tool").endswith(
        '"5-34+12"}}</tool_call><tool_response>-17</tool_response>\n</think>\n<answer>\n-17\n</answer>')
    with pytest.raises(ValueError, match="calculator\\('1/0'\\) gives 'error: division by zero', not the answer 3"):
        A.format_tool_completion("1/0", 3)
    assert A.prompt(p) == [{"role": "user", "content": "What is 347 * 582?"}]
    assert A.conversation(p, "tool", system=A.TOOL_SYSTEM_PROMPT)[0] == {"role": "system",
                                                                        "content": A.TOOL_SYSTEM_PROMPT}
    assert A.max_completion_tokens() == 211 and A.max_completion_tokens(style="r1") == 215
    assert A.max_completion_tokens(["add_sub_2", "chain_3"], "r1") == 96
    assert A.max_completion_tokens("mul_3x3") == 211 and A.max_completion_tokens(style="tool") == 96
    with pytest.raises(ValueError, match="style 'xml': expected one of plain, r1, tool"):
        A.max_completion_tokens(style="xml")
    with pytest.raises(DataError, match="unknown arithmetic split 'mul_9x9'"):
        A.max_completion_tokens(["mul_9x9"])


def _char_bound(text: str) -> int:
    """Tokens of ``text`` + eos under any byte-level BPE at most: one per ASCII character, one per special token."""
    return len(re.sub("|".join(map(re.escape, data.SPECIAL_TOKENS)), "#", text)) + 1


def test_max_completion_tokens_bound_the_longest_completions():
    longest = A.Problem((216, 988), ("*",))  # the longest of all 810,000 mul_3x3 problems, counted once
    for style in ("plain", "r1"):
        assert _char_bound(A.completion(longest, style)) == A.max_completion_tokens("mul_3x3", style)
        assert max(_char_bound(A.completion(p, style)) for p in _some("mul_3x3", 3000)) <= \
            A.max_completion_tokens("mul_3x3", style)
    assert _char_bound(A.completion(A.Problem((999, 999), ("*",)), "tool")) == 96  # the longest expression + answer
    for split in A.SPLITS:
        for p in _some(split, 300) + EDGES:
            assert _char_bound(A.completion(p, "tool")) <= A.max_completion_tokens(split, "tool")


def test_split_validation():
    with pytest.raises(ValueError, match="'\\*' needs two operands"):
        A.Split(2, ("+", "*"), operands=3)
    assert A.Split(2, ("*",)).size == 10_000 and A.Split(2, ("*",), exact=True).size == 90 * 90
    with pytest.raises(ValueError, match="expected distinct operators"):
        A.Split(2, ("/",))
    with pytest.raises(ValueError, match="operands 1"):
        A.Split(2, ("+",), operands=1)


def test_problems_are_deterministic():
    for split in ("add_sub_2", "add_sub_3", "chain_3", "mix"):
        a, b = A.problems(split, 300, seed=1), A.problems(split, 300, seed=1)
        assert a == b and len({p.canonical for p in a}) == 300
        assert A.problems(split, 300, seed=2) != a
        assert A.problems(split, 50, seed=1, held_out=True) == A.problems(split, 50, seed=1, held_out=True)
    assert A.problems(A.SPLITS["mul_2x1"], 20, 3) == A.problems("mul_2x1", 20, 3)  # a Split or its name
    assert A.problems("add_sub_2", 0) == []


def test_train_and_held_out_are_disjoint():
    # small splits: the two whole sides partition the split
    for split in ("add_sub_1", "add_sub_2", "mul_2x1"):
        spec = A.SPLITS[split]
        train = {p.canonical for p in A.problems(split, A.capacity(split), 0)}
        held = {p.canonical for p in A.problems(split, A.capacity(split, True), 0, held_out=True)}
        assert not train & held and len(train) + len(held) == spec.size
        assert spec.size < 1000 or 0.08 < len(held) / spec.size < 0.12, (split, len(held))
    # large splits and mixtures: the hash decides, whatever the seed
    held = {p.canonical for s in ("add_sub_3", "chain_3", "mix", "mul_3x3")
            for p in A.problems(s, 2000, 5, held_out=True)}
    train = {p.canonical for s in ("add_sub_3", "chain_3", "mix", "add_sub_2", "mul_3x3") for seed in (0, 5)
             for p in A.problems(s, 2000, seed)}
    assert not train & held
    assert all(A.is_held_out(c) for c in held) and not any(A.is_held_out(c) for c in train)


def test_too_many_problems_is_an_error():
    with pytest.raises(DataError, match="add_sub_1: 500 problems asked but its train side holds only 17\\d distinct"):
        A.problems("add_sub_1", 500)
    assert (A.capacity("mul_2x1"), A.capacity("mul_2x1", held_out=True)) == (901, 99)
    assert A.capacity("add_sub_2", held_out=True) == 2051 and A.capacity(A.SPLITS["add_sub_3"]) == 900_000
    assert (A.capacity("mul_3x3"), A.capacity("mul_3x3", held_out=True)) == (364_500, 40_500)
    with pytest.raises(DataError, match="mul_2x1: 200 problems asked but its held-out side holds only 99 distinct"):
        A.problems("mul_2x1", 200, held_out=True)
    with pytest.raises(DataError, match="at most 900,000 are drawn from its train side"):
        A.problems("add_sub_3", 900_001)
    with pytest.raises(DataError, match="unknown arithmetic split 'add_sub_9'; expected one of add_sub_1"):
        A.problems("add_sub_9", 5)
    with pytest.raises(DataError, match="expected an integer >= 0"):
        A.problems("add_sub_2", -1)
    with pytest.raises(DataError, match="mixture of add_sub_1, mul_2x1: 2,000 problems asked"):
        A.mixture(["add_sub_1", "mul_2x1"], 2000)


def test_mixture_shares_and_caps():
    got = A.problems("mix", 4000, 0)
    counts = {s: sum(p.split == s for p in got) for s in A.TRAIN_MIXTURE}
    assert counts == {s: round(4000 * w) for s, w in A.TRAIN_MIXTURE.items()}
    big = A.mixture({"add_sub_2": 1, "mul_2x1": 1}, 10_000, 0)  # mul_2x1 gives all its ~900, add_sub_2 the rest
    n_mul = sum(p.split == "mul_2x1" for p in big)
    assert n_mul == A.capacity("mul_2x1") == 901 and len({p.canonical for p in big}) == 10_000
    assert A.mixture(["add_sub_2", "add_sub_3"], 10, 1) == A.mixture({"add_sub_2": 1.0, "add_sub_3": 1.0}, 10, 1)


def _check_steps(text: str) -> list[str]:
    """The lines of a worked solution whose ``lhs=rhs`` is false (``17-8=9`` reads as Python: 17 - 8)."""
    body = text.split("<think>\n", 1)[1].split("\n</think>", 1)[0]
    return [line for line in body.splitlines() if "=" in line and _eval(line.split("=")[0]) != int(line.split("=")[1])]


def test_answers_and_worked_steps_are_right():
    for split in A.SPLITS:
        for p in _some(split) + _some(split, 100, held_out=True) + EDGES:
            assert p.answer == _eval(p.expression), p
            c = A.completion(p)
            head = f"<think>\n{p.operands[0]}{p.ops[0]}{p.operands[1]}\n"  # the first block's header
            assert c.endswith(f"\n</think>\n{p.answer}") and c.startswith(head)
            assert A.extract_answer(c) == p.answer and A.is_correct(c, p.answer)
            assert A.extract_answer(A.completion(p, "r1")) == p.answer
            assert not _check_steps(c), (p, c)
            tool = A.completion(p, "tool")
            assert A.is_correct(tool, p.answer) and f"<tool_response>{p.answer}</tool_response>" in tool
            assert calculator(p.canonical) == str(p.answer)
            assert p.question == f"What is {p.expression}?"


def test_corrupt_is_always_wrong_and_plausible():
    rng = random.Random(0)
    kinds = {"carry": 0, "digit": 0}
    for split in A.SPLITS:
        for p in _some(split, 800) + EDGES:
            r = A.corrupt(p, rng)
            got = A.extract_answer(r)
            assert got is not None and got != p.answer, (p, r)
            assert r.startswith(f"<think>\n{p.operands[0]}{p.ops[0]}{p.operands[1]}\n") and "\n</think>\n" in r
            wrong_lines = _check_steps(r)
            # one slip: an off-by-one line, or none (a dropped carry); in a long multiplication the partial
            # product's line states the slipped value too
            assert len(wrong_lines) <= (2 if p.split == "mul_3x3" else 1), (p, r)
            kinds["digit" if wrong_lines else "carry"] += 1
    assert min(kinds.values()) > 500, kinds
    p = A.Problem((47, 38), ("+",))
    assert A.corrupt(p, random.Random(3)) == A.corrupt(p, random.Random(3))


def test_preference_pairs():
    ps = A.problems("add_sub_2", 50, 0)
    pairs = A.preference_pairs(ps, seed=0)
    assert pairs == A.preference_pairs(ps, seed=0) and len(pairs) == 50
    for p, pair in zip(ps, pairs, strict=True):
        assert set(pair) == {"prompt", "chosen", "rejected"}
        assert pair["prompt"] == [{"role": "user", "content": p.question}]
        assert A.is_correct(pair["chosen"], p.answer) and not A.is_correct(pair["rejected"], p.answer)
        assert A.extract_answer(pair["rejected"]) is not None
    r1 = A.preference_pairs(ps[:5], seed=0, style="r1")
    assert all("<answer>" in x["chosen"] and "<answer>" in x["rejected"] for x in r1)


@pytest.mark.parametrize(("text", "want"), [
    ("<think>\n1+1=2\n</think>\n2", 2),
    ("<think>x</think>   -85  \n", -85),
    ("<think>x</think>\n+7", 7),
    ("<think>x</think>\n007", 7),
    ("<think>a</think>\n9\n<think>b</think>\n12", 12),  # the last </think> counts
    ("<think>x</think>\n<answer>\n85\n</answer>", 85),
    ("<think>x</think><answer>-3</answer>\n", -3),
    ("<think>x</think>\n85<|endoftext|>", 85),
    ("85", None),  # no </think>
    ("<think>\n85\n", None),
    ("<think>x</think>", None),
    ("<think>x</think>\n  \n", None),
    ("<think>x</think>\n85 apples", None),
    ("<think>x</think>\n8 5", None),
    ("<think>x</think>\n85.0", None),
    ("<think>x</think>\n--5", None),
    ("<think>x</think>\n<answer>\n85\n</answer>\n86", None),
    ("<think>x</think>\n<answer></answer>", None),
    (None, None),
])
def test_extract_answer(text, want):
    assert A.extract_answer(text) == want
    assert A.is_correct(text, 85) == (want == 85)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """`dsfs prepare` of a TinyStories slice, vocab 500: the tokenizer and the tokenizer_config.json it writes."""
    from tests.test_chat import stories_slice

    root = tmp_path_factory.mktemp("arith")
    return data.prepare(stories_slice(root), root / "data", vocab_size=500, verbose=False)


@pytest.fixture(scope="module")
def tok(prepared):
    return data.read_tokenizer(prepared / "tokenizer.json")


def test_digits_are_one_token_each_and_completions_are_short(tok):
    ids = tok.encode("12345 + 678 = 13023", add_special_tokens=False)
    digit_tokens = [t for t in ids.tokens if any(c.isdigit() for c in t)]
    assert digit_tokens == list("12345678") + list("13023")
    tags = {t: tok.token_to_id(t) for t in data.R1_TOKENS + data.TOOL_TOKENS}
    for split in A.SPLITS:
        for p in _some(split, 300) + EDGES:
            for style in A.STYLES:
                c = A.completion(p, style)
                enc = tok.encode(c, add_special_tokens=False)
                assert all(len(t) == 1 for t in enc.tokens if any(ch.isdigit() for ch in t)), enc.tokens
                for t, i in tags.items():  # every tag is its one reserved id, once (r1 and tool styles)
                    assert enc.ids.count(i) == c.count(t) == (style != "plain" or t in ("<think>", "</think>")
                                                              if t in data.R1_TOKENS else style == "tool"), (t, c)
                ids, mask = chat.render(A.conversation(p, style), tok)
                assert sum(mask) == len(enc.ids) + 1 <= A.max_completion_tokens(split, style)  # content + eos


def test_format_token_counts(tok):
    """One example per split and style with its token count (assistant content + eos), as listed in the report."""
    counts = {}
    for split in A.SPLITS:
        p = A.problems(split, 1, seed=0)[0]
        for style in A.STYLES:
            counts[split, style] = sum(chat.render(A.conversation(p, style), tok)[1])
    assert counts["add_sub_2", "plain"] <= 40
    assert all(n <= A.max_completion_tokens(split, style) for (split, style), n in counts.items())
    p = A.Problem((347, 582), ("*",))
    prompt = len(chat.render(A.prompt(p), tok, add_generation_prompt=True)[0])
    system = len(chat.render(A.prompt(p, A.TOOL_SYSTEM_PROMPT), tok, add_generation_prompt=True)[0]) - prompt
    print({"prompt": prompt, "tool system prompt": system,
           **{s: sum(chat.render(A.conversation(p, s), tok)[1]) for s in A.STYLES}}, counts)
    assert prompt + A.max_completion_tokens(style="r1") <= 256  # the longest conversation fits a 256-token window
    assert system < 80 and prompt + system + A.max_completion_tokens(style="tool") <= 256


def test_tool_conversation_matches_transformers(prepared, tok):
    """The tool trace, with the tool system prompt, renders the ids and mask of transformers' apply_chat_template;
    every literal tag in it is its reserved id."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(prepared))
    p = A.Problem((347, 582), ("*",))
    for messages in (A.conversation(p, "tool", system=A.TOOL_SYSTEM_PROMPT), A.conversation(p, "r1")):
        ids, mask = chat.render(messages, tok)
        out = hf.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        assert out["input_ids"] == ids and [bool(m) for m in out["assistant_masks"]] == mask
    for t in data.SPECIAL_TOKENS:
        assert tok.encode(t, add_special_tokens=False).ids == [data.SPECIAL_TOKENS.index(t)]
        assert hf.convert_tokens_to_ids(t) == data.SPECIAL_TOKENS.index(t)
