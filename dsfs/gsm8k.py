"""GSM8K (grade-school math word problems; Cobbe et al. 2021, "Training Verifiers to Solve Math Word Problems",
``openai/grade-school-math``) as conversations for SFT, DPO and evaluation.

The shared files ``../shared/data/gsm8k_{train,test}.jsonl`` (7,473 and 1,319 rows; `DEFAULT_TRAIN`,
`DEFAULT_TEST`) hold ``{"question", "answer"}`` per line; an answer is the reference reasoning, with calculator
annotations ``<<48/2=24>>`` inline, and a last line ``#### <number>`` (an integer, sometimes with thousands
commas, sometimes negative). Each row becomes an `Example` and then a conversation: the user turn is the question,
the assistant turn ``<think>\\n{reasoning without the annotations}\\n</think>\\n{final number}`` (the number without
commas; ``style="r1"`` wraps it in DeepSeek-R1's ``<answer>`` tags, as `dsfs.arithmetic.completion`).

Answers are read back by `extract_answer` (the text after the last ``</think>``, `dsfs.arithmetic.final_text`),
which normalises numbers: thousands commas, a leading ``$``, a trailing ``.0`` / ``.00``, a trailing period.

Preference pairs (DPO, `preference_pairs`): ``chosen`` is the reference completion; ``rejected`` the same reasoning
with the final number replaced by a wrong one (off by 1 to 9, or a factor of 10 off; never negative where the true
answer is not), consistently: in the reasoning's last line, the last number equal to the final answer is replaced
too (8,766 of the 8,792 rows have one; the others keep that line and change only the final number).
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

from dsfs.arithmetic import final_text, format_completion
from dsfs.data import REPO_ROOT
from dsfs.errors import DataError

DEFAULT_TRAIN = REPO_ROOT.parent / "shared" / "data" / "gsm8k_train.jsonl"
DEFAULT_TEST = REPO_ROOT.parent / "shared" / "data" / "gsm8k_test.jsonl"
_ANNOTATION = re.compile(r"<<[^<>]*>>")
_NUMBER = re.compile(r"-?\$?-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


@dataclass(frozen=True)
class Example:
    """One GSM8K row: ``question``; ``reasoning``, the reference solution without its ``####`` line and without
    calculator annotations (lines right-stripped); ``answer``, the ``####`` number as an int; ``source``, where it
    came from (``file: line N``)."""

    question: str
    reasoning: str
    answer: int
    source: str = ""

    @property
    def messages(self) -> list[dict]:
        """`conversation` of this example (plain style): ``[user question, assistant completion]``."""
        return conversation(self)


def parse_number(text: str) -> int | float | None:
    """A number as GSM8K and model completions write it: ``"1,200"`` -> 1200, ``"$18"`` -> 18, ``"-7"`` -> -7,
    ``"18.00"`` -> 18, ``"0.5"`` -> 0.5, ``"72."`` -> 72 (a trailing sentence period). Integral values come back as
    ``int``. ``None`` for anything else (words, two numbers, an empty string)."""
    if not isinstance(text, str):
        return None
    t = text.strip().removesuffix(".").strip()
    if not _NUMBER.fullmatch(t) or t.count("-") > 1:
        return None
    neg = "-" in t
    t = t.replace("-", "").replace("$", "").replace(",", "")
    value = float(t) if "." in t else int(t)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return -value if neg else value


def clean_reasoning(text: str) -> str:
    """A GSM8K solution body without calculator annotations (``48/2 = <<48/2=24>>24`` -> ``48/2 = 24``), each line
    right-stripped, blank lines dropped."""
    lines = (_ANNOTATION.sub("", line).rstrip() for line in text.splitlines())
    return "\n".join(line for line in lines if line.strip())


def parse_row(obj, where: str) -> Example:
    """The `Example` of one parsed JSON line (``where``: ``"file: line N"`` for messages). Raises ``DataError``
    (prefixed by ``where``) when it is not an object with string ``question`` and ``answer``, the question is
    empty, or the answer has no last line ``#### <integer>``, or no reasoning before it."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object with question and answer, got {type(obj).__name__}")
    for key in ("question", "answer"):
        if not isinstance(obj.get(key), str):
            why = "no" if key not in obj else "a non-string"
            raise DataError(f"{where}: {why} {key!r} field; expected GSM8K's {{\"question\", \"answer\"}}")
    if not obj["question"].strip():
        raise DataError(f"{where}: empty question")
    body, sep, last = obj["answer"].rstrip().rpartition("\n")
    if not sep or not last.startswith("####"):
        raise DataError(f"{where}: the answer's last line is {last[:40]!r}; expected '#### <number>'")
    value = parse_number(last[4:])
    if not isinstance(value, int):
        raise DataError(f"{where}: the answer's last line {last[:40]!r} holds no integer; expected '#### <number>'")
    reasoning = clean_reasoning(body)
    if not reasoning:
        raise DataError(f"{where}: the answer has no reasoning before its '####' line")
    return Example(obj["question"].strip(), reasoning, value, where)


def read(path: str | os.PathLike = DEFAULT_TRAIN) -> list[Example]:
    """The `Example` of every non-blank line of a GSM8K JSONL file, in file order. Raises ``DataError`` naming the
    file and line for a line that is not JSON or not a well-formed row (`parse_row`), and for a missing or empty
    file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file (GSM8K JSONL expected; the shared copy is {DEFAULT_TRAIN})")
    out = []
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}: line {lineno}"
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{where}: not valid JSON ({e.msg})") from None
                out.append(parse_row(obj, where))
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text ({e.reason})") from None
    if not out:
        raise DataError(f"{path}: no GSM8K rows (the file is empty)")
    return out


def completion(example: Example, style: str = "plain") -> str:
    """The assistant content: ``"<think>\\n{reasoning}\\n</think>\\n{answer}"`` (``style="r1"``: the answer inside
    ``<answer>`` tags). Raises ``ValueError`` for another style."""
    return format_completion(example.reasoning, example.answer, style)


def prompt(example: Example) -> list[dict]:
    """``[{"role": "user", "content": example.question}]``."""
    return [{"role": "user", "content": example.question}]


def conversation(example: Example, style: str = "plain") -> list[dict]:
    """``[user question, assistant completion(example, style)]`` as ``{"role", "content"}`` messages."""
    return prompt(example) + [{"role": "assistant", "content": completion(example, style)}]


def conversations(path: str | os.PathLike = DEFAULT_TRAIN, style: str = "plain") -> list[list[dict]]:
    """`conversation` of every row of a GSM8K file (`read`; same errors)."""
    return [conversation(e, style) for e in read(path)]


def extract_answer(completion: str) -> int | float | None:
    """The number a completion answers: `dsfs.arithmetic.final_text` (after the last ``</think>``, optionally in
    ``<answer>`` tags) read by `parse_number` (commas, ``$``, ``.00`` normalised). ``None`` when absent or not one
    number."""
    text = final_text(completion)
    return None if text is None else parse_number(text)


def is_correct(completion: str, answer: int | float) -> bool:
    """Whether `extract_answer` of ``completion`` equals ``answer`` numerically (``"1,200.00"`` matches 1200)."""
    got = extract_answer(completion)
    return got is not None and got == answer


def wrong_answer(answer: int, rng: random.Random) -> int:
    """A plausible wrong final number: ``answer`` off by 1..9 or by a factor of 10 (never equal to ``answer``, and
    not negative unless ``answer`` is)."""
    choices = [answer + d for d in range(-9, 10) if d] + [answer * 10, answer // 10]
    choices = [c for c in choices if c != answer and (c >= 0 or answer < 0)]
    return rng.choice(choices)


def corrupt(example: Example, rng: random.Random, style: str = "plain") -> str:
    """A rejected completion: the reference reasoning with the final number replaced by `wrong_answer`, and in the
    reasoning's last line the last number equal to the answer replaced as well (module docstring). ``rng``: a
    ``random.Random``; ``style`` as in `completion`."""
    wrong = wrong_answer(example.answer, rng)
    head, _, last = example.reasoning.rpartition("\n")
    numbers = list(_NUMBER.finditer(last))
    for m in reversed(numbers):
        if parse_number(m.group()) == example.answer:
            text = m.group()
            new = ("$" if "$" in text else "") + (f"{wrong:,}" if "," in text else str(wrong))
            new += text[text.index("."):] if "." in text else ""  # "$207.00" keeps its cents
            last = last[: m.start()] + new + last[m.end():]
            break
    reasoning = f"{head}\n{last}" if head else last
    return format_completion(reasoning, wrong, style)


def preference_pairs(examples: list[Example], seed: int = 0, style: str = "plain") -> list[dict]:
    """DPO pairs, one per example: ``{"prompt": [user question], "chosen": completion(e, style), "rejected":
    corrupt(e, rng, style)}`` with a ``random.Random`` seeded by ``seed``."""
    rng = random.Random(f"gsm8k-pairs:{seed}")
    return [{"prompt": prompt(e), "chosen": completion(e, style), "rejected": corrupt(e, rng, style)}
            for e in examples]
