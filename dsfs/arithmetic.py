"""The ``arithmetic`` task: seeded integer arithmetic problems with worked solutions, verifiable on a CPU.

Every post-training stage (SFT, DPO, distillation, GRPO) measures itself on it: the answer is an exact integer,
so accuracy is exact match (`is_correct`), and a tiny model learns the task in minutes on two CPU cores.

Problems. ``a op b`` or a short left-to-right chain ``a op b op c`` over ``+``, ``-`` and ``*``, operands drawn
uniformly from ``0 .. 10**digits - 1`` (1 to ``digits`` digits; ``mul_3x3``: exactly 3 digits, ``100 .. 999``),
exact integer answers (negative where a
subtraction goes below zero). Multiplication is written ``*``: ASCII, one byte and so one token under any
byte-level BPE (``×`` is two UTF-8 bytes, two tokens unless the BPE learned the pair, which TinyStories never
teaches), and valid Python, so a question's expression is what the calculator tool (`dsfs.tools.calculator`)
evaluates. ``*`` appears only in two-operand problems (`Split` checks), so precedence never matters.

Format. The user asks ``What is 47 + 38?``; the assistant writes a column-wise worked solution, then the answer::

    <think>
    47+38
    7+8=15
    4+3+1=8
    </think>
    85

One block per operation: a header ``x op y`` (for chains, ``x`` is the previous block's result), when the
signs need it a reduction line (``-(47-38)`` for ``38-47``, ``29-12`` for ``-12+29``), then one line per column
from the ones up. Addition: ``a+b[+carry]=sum``; the last column writes its whole sum, the others keep the ones
digit and carry the tens. Subtraction (larger minus smaller): ``a-b[-1]=d`` with ``-1`` the borrow, and
``1a-b[-1]=d`` when the column borrows ten (``17-8=9``); leading zeros of the result are dropped. Multiplication by
one digit: ``a*b[+carry]=product`` per digit of the first factor, assembled like addition. Long multiplication
(a multi-digit second factor, ``mul_3x3``): for each nonzero digit of the second factor, ones first, the short
multiplication by that digit, then its partial product shifted into place (``347*80=27760``); then the partial
products summed column by column under a header ``694+27760+173500`` (``6+7+5+1=19``), so every line with ``=``
is a true equation. The answer reads the column results backwards (``8`` then ``5``). The format is built for a
tiny model: every column line is a fact about single digits (digits are one token each:
`dsfs.data.train_tokenizer`), the carry is written where it is used, and an ``add_sub_2`` completion is under 40
tokens (`MAX_COMPLETION_TOKENS` bounds every split but ``mul_3x3``, whose completions take up to 215 tokens:
`max_completion_tokens`). Styles (`STYLES`): ``completion(problem, "r1")`` writes the DeepSeek-R1 format instead,
``<think>\\n...\\n</think>\\n<answer>\\n85\\n</answer>`` (for GRPO's format reward), and
``completion(problem, "tool")`` the cold-start trace of a solver that calls the calculator inside its reasoning
(`format_tool_completion`). Conversations have no system prompt unless asked (`R1_SYSTEM_PROMPT`,
`TOOL_SYSTEM_PROMPT`: the format instruction of R1-Zero's template, for a model that has not seen the format).

Splits (`SPLITS`): ``add_sub_1``, ``add_sub_2`` (the acceptance split: 2-digit addition and subtraction),
``add_sub_3``, ``mul_2x1`` (2-digit times 1-digit), ``chain_3`` (three 1-2 digit operands with + and -),
``mul_3x3`` (3-digit times 3-digit, not in the default mixture: the calculator's split);
`problems` draws from one. A mixture (`mixture`; named ones in `MIXTURES`, the default training mixture
`TRAIN_MIXTURE` = ``MIXTURES["mix"]``) draws from several by weight, never repeating a problem. Train and
held-out problems are disjoint by construction: the sha256 of the canonical problem (``47+38``) puts about 10%
(`HELD_OUT_FRACTION`) of all problems on the held-out side, the same in every split, mixture and seed
(`is_held_out`).

Preference pairs (DPO, `preference_pairs`): the prompt is the question as one user message, ``chosen`` the
correct worked solution, ``rejected`` a corrupted one (`corrupt`): the same procedure with one plausible slip,
followed through consistently to a wrong final answer. The slip is, with probability 1/2 when the problem has a
carry or borrow, a dropped carry/borrow (``4+3=7`` instead of ``4+3+1=8``), otherwise one column result off by one
(``7+8=16``; a subtraction digit changes modulo 10; in a long multiplication, any column line of a partial
product or of their sum, and the partial product's line states the slipped value). In a chain the slip may be in
any block, and the wrong intermediate result flows into the next block's header. The final answer always differs
from the true one.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import random
import re
from dataclasses import dataclass, field

from dsfs.errors import DataError
from dsfs.tools import calculator, tool_call_text, tool_response_text

OPS = ("+", "-", "*")
HELD_OUT_FRACTION = 0.1  # share of all problems on the held-out side (by hash of the canonical problem)
_HASH_BUCKETS = 1000
_ENUMERATE_LIMIT = 200_000  # splits with at most this many problems are enumerated, larger ones sampled
THINK, END_THINK = "<think>", "</think>"


@dataclass(frozen=True)
class Split:
    """A family of problems: ``operands`` numbers, each uniform in ``0 .. 10**digits - 1`` (the last one in
    ``0 .. 10**last_digits - 1`` when given; with ``exact``, every operand has exactly its digits: ``100 .. 999``
    for 3), joined by operators drawn uniformly from ``ops``. Raises ``ValueError`` for an unknown operator, fewer
    than 2 operands, digits below 1, or ``*`` in a split of more than two operands (so precedence never matters)."""

    digits: int
    ops: tuple[str, ...]
    operands: int = 2
    last_digits: int | None = None
    exact: bool = False

    def __post_init__(self):
        if self.digits < 1 or (self.last_digits is not None and self.last_digits < 1):
            raise ValueError(f"Split: digits {self.digits}, last_digits {self.last_digits}; expected >= 1")
        if self.operands < 2:
            raise ValueError(f"Split: operands {self.operands}; expected >= 2")
        if not self.ops or any(op not in OPS for op in self.ops) or len(set(self.ops)) != len(self.ops):
            raise ValueError(f"Split: ops {self.ops!r}; expected distinct operators among {OPS}")
        if "*" in self.ops and self.operands != 2:
            raise ValueError("Split: '*' needs two operands (a chain would need precedence)")

    def operand_digits(self, i: int) -> int:
        """Most digits of operand ``i``."""
        return self.last_digits if i == self.operands - 1 and self.last_digits is not None else self.digits

    def operand_range(self, i: int) -> range:
        """The values of operand ``i``: ``range(10**d)``, or ``range(10**(d-1), 10**d)`` with ``exact``."""
        d = self.operand_digits(i)
        return range(10 ** (d - 1) if self.exact else 0, 10**d)

    @property
    def size(self) -> int:
        """Number of distinct problems (train and held-out together)."""
        n = len(self.ops) ** (self.operands - 1)
        for i in range(self.operands):
            n *= len(self.operand_range(i))
        return n


SPLITS: dict[str, Split] = {
    "add_sub_1": Split(1, ("+", "-")),
    "add_sub_2": Split(2, ("+", "-")),  # the acceptance split
    "add_sub_3": Split(3, ("+", "-")),
    "mul_2x1": Split(2, ("*",), last_digits=1),
    "chain_3": Split(2, ("+", "-"), operands=3),
    "mul_3x3": Split(3, ("*",), exact=True),  # 100..999 times 100..999: long multiplication, or the calculator
}
# name -> {split: weight}; a mixture of n problems gives each split its weight's share (see `problems`)
MIXTURES: dict[str, dict[str, float]] = {
    "mix": {"add_sub_2": 0.5, "add_sub_3": 0.2, "mul_2x1": 0.1, "chain_3": 0.2},
}
DEFAULT_MIXTURE = "mix"
TRAIN_MIXTURE = MIXTURES[DEFAULT_MIXTURE]  # the default training mixture: split name -> weight
ACCEPTANCE_SPLIT = "add_sub_2"
STYLES = ("plain", "r1", "tool")
# Tokens of the longest completion of every split but mul_3x3, eos included, in every style: every ASCII character
# is at most one token of a byte-level BPE and every special token one (longest: chain_3 "19 - 82 - 39", 71 plain,
# 90 r1; tool style: mul_3x3 "999 * 999", 96). `max_completion_tokens` gives every split and style.
MAX_COMPLETION_TOKENS = 96
# The same bound where it is above MAX_COMPLETION_TOKENS, counted over all 810,000 problems of mul_3x3 (longest:
# "216 * 988", 211 plain, 215 r1; tests/test_arithmetic.py checks that one and a sample).
_LONG_COMPLETIONS = {("mul_3x3", "plain"): 211, ("mul_3x3", "r1"): 215}
# System prompts for a run whose model has not learned the format from SFT data (R1-Zero puts the instruction in
# its prompt template); `prompt` adds one on request. The built-in conversations carry none: a tiny model learns
# the format from its cold-start data, and these cost about 20 and 70 tokens of a 256-token sequence.
R1_SYSTEM_PROMPT = "Think in <think> </think>, then answer in <answer> </answer>."
TOOL_SYSTEM_PROMPT = ('Think in <think> </think>; compute with <tool_call>{"name": "calculator", "arguments": '
                      '{"expression": "..."}}</tool_call>; answer in <answer> </answer>.')


# ---------------------------------------------------------------- problems and their worked solutions


@dataclass(frozen=True)
class Problem:
    """One problem: ``operands`` (non-negative ints) joined by ``ops`` (one fewer), evaluated left to right.
    ``split``: the split it was drawn from (information only, not compared)."""

    operands: tuple[int, ...]
    ops: tuple[str, ...]
    split: str = field(default="", compare=False)

    @property
    def canonical(self) -> str:
        """``"47+38"``: the problem without spaces; decides its train/held-out side (`is_held_out`)."""
        return "".join(f"{o}{x}" for o, x in zip(("",) + self.ops, self.operands, strict=True))

    @property
    def expression(self) -> str:
        """``"47 + 38"``: valid Python whose value is `answer`."""
        return " ".join(f"{o} {x}" if o else str(x) for o, x in zip(("",) + self.ops, self.operands, strict=True))

    @property
    def question(self) -> str:
        """The user turn: ``"What is 47 + 38?"``."""
        return f"What is {self.expression}?"

    @property
    def answer(self) -> int:
        """The exact integer value (left to right; ``*`` only in two-operand problems)."""
        return _solve(self)[1]

    @property
    def solution(self) -> str:
        """The worked steps, one per line, without the ``<think>`` tags (module docstring)."""
        return "\n".join(_solve(self)[0])


def _digits(x: int, n: int) -> list[int]:
    """The ``n`` lowest decimal digits of ``x >= 0``, ones first."""
    return [(x // 10**i) % 10 for i in range(n)]


def _slip(v: int, fault: tuple | None, col: int) -> int:
    """``v`` off by the delta of a ``("digit", col, delta)`` fault at this column (never below 0)."""
    if fault is None or fault[:2] != ("digit", col):
        return v
    return v + fault[2] if v + fault[2] >= 0 else v + 1


def _assemble(written: list[int]) -> int:
    """The value of column results, ones first: every column keeps its ones digit, the last its whole value."""
    return int(str(written[-1]) + "".join(map(str, reversed(written[:-1]))))


def _add(x: int, y: int, fault: tuple | None) -> tuple[list[str], int, list[int]]:
    """Column addition of ``x, y >= 0``. ``fault``: ``("carry", col)`` drops the carry into ``col``; ``("digit",
    col, delta)`` writes ``col``'s sum off by ``delta``. Returns (lines, the value the lines give, the columns
    that take a carry)."""
    return _add_many([x, y], fault)


def _add_many(xs: list[int], fault: tuple | None) -> tuple[list[str], int, list[int]]:
    """Column addition of the numbers ``xs >= 0`` (two or more), one line ``a+b+c[+carry]=sum`` per column, ones
    first (the carry may exceed 1 with three or more numbers); ``fault`` and the result as in `_add`."""
    n = max(len(str(x)) for x in xs)
    ds = [_digits(x, n) for x in xs]
    lines, written, carried, carry = [], [], [], 0
    for i in range(n):
        carried += [i] if carry else []
        carry = 0 if fault == ("carry", i) else carry
        col = [d[i] for d in ds]
        s = _slip(sum(col) + carry, fault, i)
        lines.append("+".join(map(str, col)) + (f"+{carry}" if carry else "") + f"={s}")
        written.append(s if i == n - 1 else s % 10)
        carry = s // 10
    return lines, _assemble(written), carried


def _sub(x: int, y: int, fault: tuple | None) -> tuple[list[str], int, list[int]]:
    """Column subtraction ``x - y`` of ``x >= y >= 0`` with borrows; ``fault`` as in `_add` (a carry fault drops the
    borrow into ``col``; a digit fault changes the column's digit modulo 10). Leading zeros of the value drop."""
    n = len(str(x))
    xs, ys = _digits(x, n), _digits(y, n)
    lines, written, carried, borrow = [], [], [], 0
    for i in range(n):
        carried += [i] if borrow else []
        borrow = 0 if fault == ("carry", i) else borrow
        v = xs[i] - ys[i] - borrow
        ten = v < 0  # borrow ten from the next column (never in the last one: x >= y)
        v = v + 10 if ten else v
        if fault is not None and fault[:2] == ("digit", i):
            v = (v + fault[2]) % 10
        lines.append(("1" if ten else "") + f"{xs[i]}-{ys[i]}" + ("-1" if borrow else "") + f"={v}")
        written.append(v)
        borrow = int(ten)
    return lines, int("".join(map(str, reversed(written)))), carried


def _mul(x: int, y: int, fault: tuple | None) -> tuple[list[str], int, list[int]]:
    """Short multiplication of ``x >= 0`` by the digit ``y``, ones first; ``fault`` as in `_add`."""
    n = len(str(x))
    xs = _digits(x, n)
    lines, written, carried, carry = [], [], [], 0
    for i in range(n):
        carried += [i] if carry else []
        carry = 0 if fault == ("carry", i) else carry
        p = _slip(xs[i] * y + carry, fault, i)
        lines.append(f"{xs[i]}*{y}" + (f"+{carry}" if carry else "") + f"={p}")
        written.append(p if i == n - 1 else p % 10)
        carry = p // 10
    return lines, _assemble(written), carried


def _local(fault: tuple | None, offset: int, n: int) -> tuple | None:
    """The part of a fault at global column ``fault[1]`` that falls in the ``n`` columns from ``offset``, with its
    column made local; ``None`` when it falls elsewhere."""
    if fault is None or not offset <= fault[1] < offset + n:
        return None
    return (fault[0], fault[1] - offset, *fault[2:])


def _long_mul(x: int, y: int, fault: tuple | None) -> tuple[list[str], int, list[int], int]:
    """Long multiplication of ``x >= 0`` by ``y >= 10``: for each nonzero digit ``d`` of ``y`` (ones first, at
    place ``10**k``), the short multiplication ``x*d`` column by column (`_mul`), then the partial product shifted
    into place, ``x*d0..0=p``; then, with two partial products or more, their sum as a header ``p1+p2+p3`` and
    one line per column (`_add_many`). ``fault``: as in `_add`, its column counted over all column lines in order.
    Returns (lines, value, the columns taking a carry, the number of column lines)."""
    lines, partials, carried, offset, n = [], [], [], 0, len(str(x))
    for k, d in enumerate(_digits(y, len(str(y)))):
        if d == 0:
            continue
        body, v, c = _mul(x, d, _local(fault, offset, n))
        partials.append(v * 10**k)
        lines += body + [f"{x}*{d}{'0' * k}={partials[-1]}"]
        carried += [offset + i for i in c]
        offset += n
    if len(partials) == 1:
        return lines, partials[0], carried, offset
    n = max(len(str(p)) for p in partials)
    body, v, c = _add_many(partials, _local(fault, offset, n))
    lines += ["+".join(map(str, partials))] + body
    return lines, v, carried + [offset + i for i in c], offset + n


def _step(x: int, op: str, y: int, fault: tuple | None) -> tuple[list[str], int, int, list[int]]:
    """One block: the header ``x op y``, a reduction line when signs need one, the column lines. ``x`` may be
    negative (a chain's running value), ``y >= 0``. Returns (lines, value, columns, columns taking a carry)."""
    head = [f"{x}{op}{y}"]
    if op == "*" and y >= 10:
        body, v, carried, n_cols = _long_mul(x, y, fault)
        return head + body, v, n_cols, carried
    if op == "*":
        sign, (body, v, carried) = 1, _mul(x, y, fault)
    elif op == "+" and x >= 0:
        sign, (body, v, carried) = 1, _add(x, y, fault)
    elif op == "-" and x < 0:
        head.append(f"-({-x}+{y})")
        sign, (body, v, carried) = -1, _add(-x, y, fault)
    else:
        a, b = (x, y) if op == "-" else (y, -x)  # the value is a - b, both >= 0
        if a >= b:
            head += [f"{a}-{b}"] if op == "+" else []
            sign, (body, v, carried) = 1, _sub(a, b, fault)
        else:
            head.append(f"-({b}-{a})")
            sign, (body, v, carried) = -1, _sub(b, a, fault)
    return head + body, sign * v, len(body), carried


def _solve(problem: Problem, fault: tuple | None = None) -> tuple[list[str], int, list[tuple[int, list[int]]]]:
    """The worked lines, the answer they give, and per block (columns, columns taking a carry). ``fault``:
    ``(block, "carry", col)`` or ``(block, "digit", col, delta)`` puts one slip in that block (`_add`); it flows
    into later blocks through the running value."""
    value, lines, blocks = problem.operands[0], [], []
    for k, (op, y) in enumerate(zip(problem.ops, problem.operands[1:], strict=True)):
        f = fault[1:] if fault is not None and fault[0] == k else None
        block, value, n_cols, carried = _step(value, op, y, f)
        lines += block
        blocks.append((n_cols, carried))
    return lines, value, blocks


def _faults(problem: Problem) -> tuple[list[tuple], list[tuple]]:
    """(dropped-carry faults, off-by-one faults) that apply to ``problem``: one carry fault per column that takes a
    carry or borrow, two digit faults (+1, -1) per column."""
    carries, digits = [], []
    for k, (n_cols, carried) in enumerate(_solve(problem)[2]):
        carries += [(k, "carry", c) for c in carried]
        digits += [(k, "digit", c, d) for c in range(n_cols) for d in (1, -1)]
    return carries, digits


# ---------------------------------------------------------------- completions, answers


def completion(problem: Problem, style: str = "plain") -> str:
    """The assistant content for ``problem``: ``"<think>\\n{solution}\\n</think>\\n{answer}"`` (``style="plain"``),
    DeepSeek-R1's ``"<think>\\n{solution}\\n</think>\\n<answer>\\n{answer}\\n</answer>"`` (``style="r1"``), or
    the trace of a solver that calls the calculator (``style="tool"``, `format_tool_completion` of the canonical
    problem). Raises ``ValueError`` for another style."""
    if style == "tool":
        return format_tool_completion(problem.canonical, problem.answer)
    return format_completion(problem.solution, problem.answer, style)


def format_completion(solution: str, answer, style: str = "plain") -> str:
    """``"<think>\\n{solution}\\n</think>\\n{answer}"`` (``style="plain"``) or with the answer in DeepSeek-R1's
    ``<answer>\\n...\\n</answer>`` tags (``style="r1"``); shared with `dsfs.gsm8k`. ``ValueError`` for another
    style."""
    if style == "plain":
        return f"{THINK}\n{solution}\n{END_THINK}\n{answer}"
    if style == "r1":
        return f"{THINK}\n{solution}\n{END_THINK}\n<answer>\n{answer}\n</answer>"
    tool = " (tool traces of arithmetic problems: dsfs.arithmetic.completion)" if style == "tool" else ""
    raise ValueError(f"style {style!r}: expected 'plain' or 'r1'{tool}")


def format_tool_completion(expression: str, answer) -> str:
    """The cold-start trace of a tool-using solver, in the r1 layout: the expression, a calculator call on it
    answered by the calculator's own output (`dsfs.tools`), then the answer::

        <think>
        347*582
        <tool_call>{"name": "calculator", "arguments": {"expression": "347*582"}}</tool_call>
        <tool_response>201954</tool_response>
        </think>
        <answer>
        201954
        </answer>

    where ``<tool_response>`` follows ``</tool_call>`` with no newline (where the runtime appends the response),
    shown on two lines here.

    Raises ``ValueError`` when the calculator's output is not ``str(answer)`` (an error, or another value)."""
    result = calculator(expression)
    if result != str(answer):
        raise ValueError(f"calculator({expression!r}) gives {result!r}, not the answer {answer!r}")
    call = tool_call_text("calculator", {"expression": expression})
    return f"{THINK}\n{expression}\n{call}{tool_response_text(result)}\n{END_THINK}\n<answer>\n{answer}\n</answer>"


def prompt(problem: Problem, system: str | None = None) -> list[dict]:
    """The prompt messages: ``[{"role": "user", "content": problem.question}]``, after ``{"role": "system",
    "content": system}`` when ``system`` is given (`R1_SYSTEM_PROMPT`, `TOOL_SYSTEM_PROMPT`)."""
    head = [{"role": "system", "content": system}] if system is not None else []
    return head + [{"role": "user", "content": problem.question}]


def conversation(problem: Problem, style: str = "plain", system: str | None = None) -> list[dict]:
    """``prompt(problem, system) + [assistant completion(problem, style)]`` as ``{"role", "content"}`` messages (the
    input of `dsfs.chat.render` / `dsfs.chat.sft_features`)."""
    return prompt(problem, system) + [{"role": "assistant", "content": completion(problem, style)}]


def max_completion_tokens(splits=None, style: str = "plain") -> int:
    """Tokens enough for the longest completion of any of ``splits`` (names of `SPLITS`; default: every split) in
    ``style`` under any byte-level BPE tokenizer with the reserved special tokens, the closing eos included: the
    ``max_new_tokens`` of a generation that must finish every reference answer (`MAX_COMPLETION_TOKENS` for the
    splits of the training mixture; ``mul_3x3`` runs longer). Raises ``ValueError`` for an unknown style,
    ``DataError`` for an unknown split."""
    if style not in STYLES:
        raise ValueError(f"style {style!r}: expected one of {', '.join(STYLES)}")
    names = list(SPLITS) if splits is None else [splits] if isinstance(splits, str) else list(splits)
    for name in names:
        _resolve(name)
    return max([MAX_COMPLETION_TOKENS] + [_LONG_COMPLETIONS.get((n, style), 0) for n in names])


_ANSWER_TAGS = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.S)


def final_text(completion: str) -> str | None:
    """What a completion answers: the text after its last ``</think>``, whitespace stripped, a trailing
    ``<|endoftext|>`` dropped, and an ``<answer>...</answer>`` wrapper (R1 format) removed when it is the whole
    rest. ``None`` when there is no ``</think>``. Shared by `extract_answer` and `dsfs.gsm8k.extract_answer`."""
    if not isinstance(completion, str) or END_THINK not in completion:
        return None
    rest = completion.rsplit(END_THINK, 1)[1].strip()
    rest = rest.removesuffix("<|endoftext|>").strip()
    m = _ANSWER_TAGS.fullmatch(rest)
    return m.group(1) if m else rest


def extract_answer(completion: str) -> int | None:
    """The integer a completion answers (`final_text`: after the last ``</think>``, optionally inside
    ``<answer>`` tags, surrounding whitespace ignored): ``"...</think>\\n-85\\n"`` -> ``-85``. ``None`` when there is
    no ``</think>``, nothing after it, or anything but one integer (``85 apples``, ``8 5``, ``85.0``)."""
    text = final_text(completion)
    if text is None or not re.fullmatch(r"[-+]?\d+", text):
        return None
    return int(text)


def is_correct(completion: str, answer: int) -> bool:
    """Exact match: `extract_answer` of ``completion`` equals ``answer``."""
    got = extract_answer(completion)
    return got is not None and got == answer


def corrupt(problem: Problem, rng: random.Random, style: str = "plain") -> str:
    """A rejected completion for DPO: the worked solution with one plausible slip, followed through to a wrong
    final answer (module docstring): a dropped carry or borrow (half the time, when the problem has one), else one
    column result off by one. Its `extract_answer` never equals ``problem.answer``. ``rng``: a ``random.Random``
    (the choice is deterministic for its state); ``style``: ``"plain"`` or ``"r1"`` (a tool trace has no worked
    steps to slip in: ``ValueError``)."""
    carries, digits = _faults(problem)
    pool = carries if carries and rng.random() < 0.5 else digits
    for fault in rng.sample(pool, len(pool)) + digits:
        lines, value, _ = _solve(problem, fault)
        if value != problem.answer:
            return format_completion("\n".join(lines), value, style)
    raise AssertionError(f"no wrong solution found for {problem.canonical}")  # unreachable: a digit slip changes it


def preference_pairs(problems: list[Problem], seed: int = 0, style: str = "plain") -> list[dict]:
    """DPO pairs, one per problem: ``{"prompt": [user question], "chosen": completion(p, style), "rejected":
    corrupt(p, rng, style)}`` with ``rng = random.Random(seed)`` (module docstring: the construction)."""
    rng = random.Random(f"arithmetic-pairs:{seed}")
    return [{"prompt": prompt(p), "chosen": completion(p, style), "rejected": corrupt(p, rng, style)}
            for p in problems]


# ---------------------------------------------------------------- drawing problems


def is_held_out(canonical: str) -> bool:
    """Whether the canonical problem (``"47+38"``) is on the held-out side: the first 8 bytes of its sha256
    modulo 1000 below 100 (`HELD_OUT_FRACTION`), so the sides are disjoint in every split, mixture and seed."""
    h = int.from_bytes(hashlib.sha256(canonical.encode()).digest()[:8], "big")
    return h % _HASH_BUCKETS < HELD_OUT_FRACTION * _HASH_BUCKETS


def _resolve(split) -> tuple[str, Split]:
    if isinstance(split, Split):  # a registered one draws as its name does
        return next((k for k, v in SPLITS.items() if v == split), ""), split
    if isinstance(split, str) and split in SPLITS:
        return split, SPLITS[split]
    names = ", ".join([*SPLITS, *MIXTURES])
    raise DataError(f"unknown arithmetic split {split!r}; expected one of {names}")


def _side_size(spec: Split, held_out: bool) -> int:
    """Distinct problems on one side: exact for enumerated splits, half the expected count for sampled ones
    (sampling without repeats slows down near the whole side)."""
    if spec.size <= _ENUMERATE_LIMIT:
        return len(_enumerate(spec, held_out, ""))
    frac = HELD_OUT_FRACTION if held_out else 1 - HELD_OUT_FRACTION
    return int(spec.size * frac) // 2


def capacity(split: str | Split, held_out: bool = False) -> int:
    """The most problems `problems` gives for ``split`` (a name of `SPLITS` or `MIXTURES`, or a `Split`) on one
    side: every distinct problem of the side for a small split (``mul_2x1``: 901 train, 99 held-out), half the
    expected count for a large one, the sum over its splits for a mixture (a problem two of them share may make it a
    little less). Raises ``DataError`` for an unknown name."""
    if isinstance(split, str) and split in MIXTURES:
        return sum(_side_size(SPLITS[k], held_out) for k, w in MIXTURES[split].items() if w > 0)
    return _side_size(_resolve(split)[1], held_out)


@functools.lru_cache(maxsize=16)
def _enumerate(spec: Split, held_out: bool, name: str) -> tuple[Problem, ...]:
    """Every problem of a small split on one side, in a fixed order (cached: the hashes are the cost)."""
    ranges = [spec.operand_range(i) for i in range(spec.operands)]
    out = []
    for ops in itertools.product(spec.ops, repeat=spec.operands - 1):
        for xs in itertools.product(*ranges):
            p = Problem(xs, ops, name)
            if is_held_out(p.canonical) == held_out:
                out.append(p)
    return tuple(out)


def _draw(name: str, spec: Split, n: int, rng: random.Random, held_out: bool, exclude: set[str]) -> list[Problem]:
    side = "held-out" if held_out else "train"
    if spec.size <= _ENUMERATE_LIMIT:
        pool = [p for p in _enumerate(spec, held_out, name) if p.canonical not in exclude]
        if n > len(pool):
            raise DataError(f"arithmetic split {name or spec}: {n:,} problems asked but its {side} side holds only "
                            f"{len(pool):,} distinct ones; ask fewer (problems are never repeated)")
        return rng.sample(pool, n)
    limit = _side_size(spec, held_out)
    if n > limit:
        raise DataError(f"arithmetic split {name or spec}: {n:,} problems asked; at most {limit:,} are drawn from its "
                        f"{side} side (half of it); ask fewer")
    out, seen = [], set(exclude)
    while len(out) < n:
        xs = tuple(r.start + rng.randrange(len(r)) for r in map(spec.operand_range, range(spec.operands)))
        ops = tuple(rng.choice(spec.ops) for _ in range(spec.operands - 1))
        p = Problem(xs, ops, name)
        if p.canonical not in seen and is_held_out(p.canonical) == held_out:
            seen.add(p.canonical)
            out.append(p)
    return out


def _shares(n: int, weights: dict[str, float], caps: dict[str, int]) -> dict[str, int]:
    """Split ``n`` by ``weights`` (largest remainders), no share above its cap; what a capped split cannot take
    goes to the others by their weights."""
    shares = dict.fromkeys(weights, 0)
    left, open_ = n, [k for k in weights if caps[k] > 0]
    while left > 0 and open_:
        total = sum(weights[k] for k in open_)
        raw = {k: left * weights[k] / total for k in open_}
        add = {k: int(raw[k]) for k in open_}
        for k in sorted(open_, key=lambda k: raw[k] - add[k], reverse=True)[: left - sum(add.values())]:
            add[k] += 1
        for k in open_:
            take = min(add[k], caps[k] - shares[k])
            shares[k] += take
            left -= take
        open_ = [k for k in open_ if shares[k] < caps[k]]
    return shares


def mixture(splits: dict[str, float] | list[str] | tuple[str, ...], n: int, seed: int = 0,
            held_out: bool = False) -> list[Problem]:
    """``n`` distinct problems drawn over several splits of `SPLITS`: ``splits`` maps names to weights (a list or
    tuple of names: equal weights). Each split gets its weight's share of ``n`` (largest remainders); a split whose
    side holds fewer problems gives all it has and the rest goes to the others by weight; no problem appears twice
    (a problem two splits share counts once), and the result is shuffled. Deterministic for the arguments. Raises
    ``DataError`` for an unknown name, no splits, a negative weight, ``n < 0`` or ``n`` over what the splits hold."""
    weights = dict.fromkeys(splits, 1.0) if isinstance(splits, (list, tuple)) else dict(splits)
    if not weights or any(not isinstance(w, (int, float)) or w < 0 for w in weights.values()) or \
            not sum(weights.values()) > 0:
        raise DataError(f"arithmetic mixture {splits!r}: expected split names with weights >= 0, not all 0")
    for k in weights:
        _resolve(k)
    _check_n(n)
    side = "held" if held_out else "train"
    caps = {k: _side_size(SPLITS[k], held_out) if weights[k] > 0 else 0 for k in weights}
    if n > sum(caps.values()):
        raise DataError(f"arithmetic mixture of {', '.join(weights)}: {n:,} problems asked but its splits hold only "
                        f"{sum(caps.values()):,} distinct ones on the {side} side; ask fewer")
    shares = _shares(n, weights, caps)
    key = ",".join(f"{k}={weights[k]}" for k in weights)
    out: list[Problem] = []
    seen: set[str] = set()
    for k in weights:
        got = _draw(k, SPLITS[k], shares[k], random.Random(f"arithmetic:{key}:{k}:{seed}:{side}"), held_out, seen)
        seen.update(p.canonical for p in got)
        out += got
    random.Random(f"arithmetic:{key}:shuffle:{seed}:{side}").shuffle(out)
    return out


def _check_n(n) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise DataError(f"number of arithmetic problems {n!r}: expected an integer >= 0")


def problems(split: str | Split, n: int, seed: int = 0, held_out: bool = False) -> list[Problem]:
    """``n`` distinct problems of a split (a name of `SPLITS`, or a `Split`) or a mixture (a name of `MIXTURES`:
    `mixture` of its weights), from its train side or, with ``held_out``, its held-out side (disjoint:
    `is_held_out`).

    Deterministic for ``(split, n, seed, held_out)``; the order is random. Small splits (at most 200,000 problems)
    are enumerated and sampled without replacement; larger ones drawn at random without repeats. Raises
    ``DataError`` for an unknown name, ``n < 0``, or ``n`` over the distinct problems of the side (for a large
    split, over half of them), with the number available: problems are never repeated silently.
    """
    _check_n(n)
    if isinstance(split, str) and split in MIXTURES:
        return mixture(MIXTURES[split], n, seed, held_out)
    name, spec = _resolve(split)
    side = "held" if held_out else "train"
    rng = random.Random(f"arithmetic:{name or spec}:{seed}:{side}")
    return _draw(name, spec, n, rng, held_out, set())
