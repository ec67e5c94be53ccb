"""`dsfs.gsm8k`: every row of the shared GSM8K files converts (answer = the ``####`` number, annotations gone), the
number parser, preference pairs, and one-line errors naming file and line."""

from __future__ import annotations

import json
import random
import re

import pytest

from dsfs import gsm8k as G
from dsfs.errors import DataError

needs_data = pytest.mark.skipif(not (G.DEFAULT_TRAIN.is_file() and G.DEFAULT_TEST.is_file()),
                                reason="the shared GSM8K files (../shared/data) are absent")


@pytest.fixture(scope="module")
def rows():
    return {"train": G.read(G.DEFAULT_TRAIN), "test": G.read(G.DEFAULT_TEST)}


@needs_data
def test_every_row_converts(rows):
    assert (len(rows["train"]), len(rows["test"])) == (7473, 1319)
    for split, path in (("train", G.DEFAULT_TRAIN), ("test", G.DEFAULT_TEST)):
        raw = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        for obj, e in zip(raw, rows[split], strict=True):
            final = obj["answer"].rstrip().splitlines()[-1]
            assert final.startswith("#### ") and e.answer == int(final[5:].replace(",", ""))
            assert "<<" not in e.reasoning and ">>" not in e.reasoning and "####" not in e.reasoning
            assert e.question == obj["question"].strip() and e.reasoning
            c = G.completion(e)
            assert c == f"<think>\n{e.reasoning}\n</think>\n{e.answer}"
            assert G.extract_answer(c) == e.answer and G.is_correct(c, e.answer)
            assert G.extract_answer(G.completion(e, "r1")) == e.answer
            assert e.messages == [{"role": "user", "content": e.question}, {"role": "assistant", "content": c}]
    assert any(e.answer < 0 for e in rows["train"] + rows["test"])  # five negative answers
    assert any(e.answer >= 1000 for e in rows["train"])  # written with commas after ####


@needs_data
def test_first_row(rows):
    e = rows["train"][0]
    assert e.answer == 72 and e.source == f"{G.DEFAULT_TRAIN}: line 1"
    assert e.reasoning == ("Natalia sold 48/2 = 24 clips in May.\n"
                           "Natalia sold 48+24 = 72 clips altogether in April and May.")
    assert G.conversation(e, "r1")[1]["content"].endswith("</think>\n<answer>\n72\n</answer>")
    assert G.conversations(G.DEFAULT_TEST)[0] == rows["test"][0].messages


@pytest.mark.parametrize(("text", "want"), [
    ("72", 72), ("1,200", 1200), ("$18", 18), ("-7", -7), ("18.00", 18), ("0.5", 0.5), ("72.", 72),
    ("$1,234.50", 1234.5), ("-$5", -5), ("$-5", -5), (" 40,000 ", 40000), ("1,2345", None), ("", None),
    ("abc", None), ("--5", None), ("12 13", None), ("1,200 dollars", None), ("$", None), (None, None),
])
def test_parse_number(text, want):
    got = G.parse_number(text)
    assert got == want and type(got) is type(want)


@pytest.mark.parametrize(("text", "answer", "ok"), [
    ("<think>x</think>\n1200", 1200, True),
    ("<think>x</think>\n$1,200.00", 1200, True),
    ("<think>x</think>\n<answer>\n-3\n</answer>", -3, True),
    ("<think>x</think>\n1201", 1200, False),
    ("<think>x</think>\nThe answer is 1200", 1200, False),
    ("1200", 1200, False),
])
def test_extract_answer(text, answer, ok):
    assert G.is_correct(text, answer) == ok


def test_annotations_removed():
    assert G.clean_reasoning("He pays 15 * 2 = $<<15*2=30>>30.\n\nSo <<a=b>>x  \n") == "He pays 15 * 2 = $30.\nSo x"


@needs_data
def test_preference_pairs(rows):
    examples = rows["train"][:300]
    pairs = G.preference_pairs(examples, seed=0)
    assert pairs == G.preference_pairs(examples, seed=0)
    consistent = 0
    for e, pair in zip(examples, pairs, strict=True):
        assert pair["prompt"] == [{"role": "user", "content": e.question}]
        assert pair["chosen"] == G.completion(e) and G.is_correct(pair["chosen"], e.answer)
        wrong = G.extract_answer(pair["rejected"])
        assert isinstance(wrong, int) and wrong != e.answer and (wrong >= 0 or e.answer < 0)
        chosen_lines, rejected_lines = pair["chosen"].splitlines(), pair["rejected"].splitlines()
        assert len(chosen_lines) == len(rejected_lines)
        assert chosen_lines[:-4] == rejected_lines[:-4]  # only the reasoning's last line and the answer change
        last = rejected_lines[-3]  # the reasoning's last line (then </think>, answer)
        consistent += str(wrong) in last.replace(",", "") and last != chosen_lines[-3]
    assert consistent >= 290
    e = examples[0]
    r = G.corrupt(e, random.Random(1))
    wrong = G.extract_answer(r)
    assert r == (f"<think>\nNatalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = {wrong} clips altogether in "
                 f"April and May.\n</think>\n{wrong}")


def test_corrupt_keeps_formatting():
    e = G.Example("q?", "Total: $<<1+1=2>>1,200.00 in all.".replace("<<1+1=2>>", ""), 1200)
    r = G.corrupt(e, random.Random(0))
    wrong = G.extract_answer(r)
    assert re.fullmatch(rf"<think>\nTotal: \${wrong:,}\.00 in all\.\n</think>\n{wrong}", r), r


BAD_ROWS = [
    ("{oops", "not valid JSON"),
    ("[1]", "expected a JSON object with question and answer, got list"),
    (json.dumps({"answer": "x\n#### 1"}), "no 'question' field"),
    (json.dumps({"question": "q", "answer": 5}), "a non-string 'answer' field"),
    (json.dumps({"question": " ", "answer": "x\n#### 1"}), "empty question"),
    (json.dumps({"question": "q", "answer": "x = 1"}), "the answer's last line is 'x = 1'; expected '#### <number>'"),
    (json.dumps({"question": "q", "answer": "x\n#### many"}), "holds no integer"),
    (json.dumps({"question": "q", "answer": "x\n#### 2.5"}), "holds no integer"),
    (json.dumps({"question": "q", "answer": "<<1+1=2>>\n#### 2"}), "no reasoning before its '####' line"),
]


@pytest.mark.parametrize(("line", "match"), BAD_ROWS, ids=[m[:30] for _, m in BAD_ROWS])
def test_bad_rows(tmp_path, line, match):
    good = json.dumps({"question": "q?", "answer": "1+1 = <<1+1=2>>2\n#### 2"})
    path = tmp_path / "g.jsonl"
    path.write_text(f"{good}\n\n{line}\n", encoding="utf-8")
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}: line 3: .*{match}"):
        G.read(path)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        G.read(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no GSM8K rows"):
        G.read(tmp_path / "empty.jsonl")
    (tmp_path / "bytes.jsonl").write_bytes(b'{"question": "\xff"}\n')
    with pytest.raises(DataError, match="not UTF-8 text"):
        G.read(tmp_path / "bytes.jsonl")
