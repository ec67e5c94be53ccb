"""Rule-based rewards for GRPO, as DeepSeek-R1 trains with them (R1 §2.2.2: an accuracy reward on the final
answer and a format reward on the ``<think>`` / ``<answer>`` layout, no neural reward model), with TRL's calling
convention and open-r1's definitions.

A reward function is a plain callable ``f(prompts, completions, **columns) -> list[float | None]`` (TRL's
``reward_funcs``): ``prompts`` and ``completions`` are lists of N strings (the rendered prompt, and the completion
decoded with its special tokens kept, so the tags are visible); ``columns`` are the dataset's other fields, one list
of N values each (``answer``: the gold answer). It returns N numbers; ``None`` (or NaN) means "not applicable to this
example", which `combine_rewards` leaves out of the sum, as TRL does. Built in (`REWARDS`, by the names
``--reward_funcs`` takes):

- ``accuracy`` (`accuracy_reward`): 1.0 when the content of the completion's last ``<answer>...</answer>`` is
  right, else 0.0 (no answer tags: 0.0). The gold ``answer``'s type decides how: an ``int`` (the arithmetic task;
  a JSON integer) needs exactly that integer (``-85``, ``+85``, ``085``; not ``85.0``, ``85 apples`` nor
  ``47+38``, so a model cannot copy the question); anything else (a string such as GSM8K's ``"72"`` or
  ``"\\frac{1}{2}"``, a float) is compared by ``math-verify`` (``math_verify.parse`` / ``verify``), which accepts
  equivalent forms (``72.0``, ``$72``, ``1,000`` for ``"1000"``, ``\\boxed{72}``, ``1/2`` for ``0.5``). A gold
  answer that math-verify cannot parse gives ``None`` (open-r1 skips such examples).
- ``format`` (`format_reward`): 1.0 when the completion is exactly ``<think>...</think>`` then
  ``<answer>...</answer>`` (whitespace around and between them allowed; inside ``<think>``, complete
  ``<tool_call>...</tool_call>`` and ``<tool_response>...</tool_response>`` pairs allowed; a non-blank answer with
  no tag in it), with nothing after ``</answer>`` but whitespace, eos and padding; else 0.0 (open-r1's
  ``format_reward``, without its exact newlines).
- ``tag_count`` (`tag_count_reward`): 0.25 for each of ``<think>\\n``, ``\\n</think>\\n``, ``\\n<answer>\\n``,
  ``\\n</answer>`` that appears exactly once (open-r1's ``tag_count_reward``): partial credit on the way to the
  format.

`load_reward` imports a user's function from a ``module:function`` spec, `resolve_rewards` turns ``--reward_funcs``
names and specs into functions, and `combine_rewards` calls them and sums them weighted (TRL's ``reward_weights``).
"""

from __future__ import annotations

import importlib
import math
import numbers
import re
import threading
from collections.abc import Callable

from dsfs.data import EOS, PAD, SPECIAL_TOKENS
from dsfs.errors import ConfigError

ANSWER, END_ANSWER = "<answer>", "</answer>"
THINK, END_THINK = "<think>", "</think>"
MAX_ANSWER_CHARS = 1000  # a longer answer scores 0 (math-verify's work stays bounded where its timeout cannot run)
_INTEGER = re.compile(r"[-+]?[0-9]{1,100}")  # ASCII digits: int() would read "٨٥" too
_FORMAT = re.compile(r"\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*((?:<\|endoftext\|>|<\|pad\|>|\s)*)",
                     re.S)
_TOOL_PAIR = re.compile(r"<tool_call>((?:(?!<tool_call>|</tool_call>).)*)</tool_call>|"
                        r"<tool_response>((?:(?!<tool_response>|</tool_response>).)*)</tool_response>", re.S)


def answer_text(completion: str) -> str | None:
    """The content of the last ``<answer>...</answer>`` of ``completion`` (the text between the last
    ``</answer>`` and the ``<answer>`` before it), whitespace stripped; ``None`` when there is none."""
    if not isinstance(completion, str):
        return None
    end = completion.rfind(END_ANSWER)
    start = completion.rfind(ANSWER, 0, end) if end >= 0 else -1
    return completion[start + len(ANSWER):end].strip() if start >= 0 else None


def _parses(text: str, timeout: int | None) -> list[list]:
    """math-verify's readings of ``text`` that hold a parsed value: as written (numbers, ``$...$``, ``\\boxed``)
    and, unless it is delimited already, as LaTeX (``$text$``: ``3\\pi``, ``\\sqrt{2}``)."""
    from math_verify import parse

    tries = [text] if "$" in text or "\\boxed" in text else [text, f"${text}$"]
    out = [parse(t, parsing_timeout=timeout) for t in tries]
    return [p for p in out if p and not isinstance(p[0], str)]


def _math_verify(gold, text: str) -> float | None:
    """math-verify's judgement of ``text`` against ``gold`` (1.0 when a reading of ``text`` equals the gold's,
    its LaTeX reading where it has one, else 0.0),
    ``None`` for a gold answer it cannot read. Its timeouts use ``signal.alarm``, which works in the main thread
    only: elsewhere they are off (the answer's length is bounded by `MAX_ANSWER_CHARS` instead)."""
    from math_verify import verify

    t = 5 if threading.current_thread() is threading.main_thread() else None
    golds = _parses(str(gold), t)[-1:]  # the gold as LaTeX when it reads so (3\\pi is not 3)
    if not golds:
        return None
    try:
        return float(any(verify(golds[0], a, timeout_seconds=t) for a in _parses(text, t)))
    except Exception:  # math-verify raises on some sympy corner cases; a wrong answer, not a crash
        return 0.0


def accuracy(completion: str, gold) -> float | None:
    """The accuracy reward of one completion (module docstring): 1.0 or 0.0, ``None`` for a gold answer that
    math-verify cannot parse."""
    text = answer_text(completion)
    if text is None or len(text) > MAX_ANSWER_CHARS:
        return 0.0
    if isinstance(gold, int) and not isinstance(gold, bool):
        return float(_INTEGER.fullmatch(text) is not None and int(text) == gold)
    return _math_verify(gold, text) if text else 0.0


def accuracy_reward(prompts: list[str], completions: list[str], answer: list | None = None,
                    **columns) -> list[float | None]:
    """1.0 per completion whose last ``<answer>`` content is the gold ``answer`` (an ``int``: exactly that
    integer; otherwise math-verify), else 0.0 (module docstring; DeepSeek-R1 §2.2.2's accuracy reward). Raises
    `ConfigError` when the data has no ``answer`` column."""
    if answer is None:
        raise ConfigError("accuracy_reward needs an 'answer' column: the gold answer of each prompt (columns given: "
                          f"{', '.join(columns) or 'none'})")
    return [accuracy(c, a) for c, a in zip(completions, answer, strict=True)]


def _tags_outside_pairs(text: str) -> bool:
    """Whether ``text`` holds a special token once its complete tool call / response pairs are taken out."""
    rest = _TOOL_PAIR.sub("", text)
    return any(t in rest for t in SPECIAL_TOKENS)


def is_formatted(completion: str) -> bool:
    """Whether ``completion`` has the R1 layout of `format_reward`."""
    if not isinstance(completion, str):
        return False
    m = _FORMAT.fullmatch(completion)
    if m is None:
        return False
    think, answer, tail = m.groups()
    if _tags_outside_pairs(think) or any(t in answer for t in SPECIAL_TOKENS) or not answer.strip():
        return False
    return tail.replace(PAD, "").strip() in ("", EOS)  # at most one eos, and padding


def format_reward(prompts: list[str], completions: list[str], **columns) -> list[float]:
    """1.0 per completion that is ``<think>...</think>`` then ``<answer>...</answer>`` and nothing else (module
    docstring; tool calls and responses allowed inside the think part), else 0.0 (R1 §2.2.2's format reward;
    open-r1's ``format_reward``)."""
    return [float(is_formatted(c)) for c in completions]


def tag_count_reward(prompts: list[str], completions: list[str], **columns) -> list[float]:
    """0.25 per tag, with its newlines, that appears exactly once in the completion: ``<think>\\n``,
    ``\\n</think>\\n``, ``\\n<answer>\\n``, ``\\n</answer>`` (open-r1's ``tag_count_reward``); 0.0 to 1.0."""
    tags = (f"{THINK}\n", f"\n{END_THINK}\n", f"\n{ANSWER}\n", f"\n{END_ANSWER}")
    return [sum(0.25 for t in tags if isinstance(c, str) and c.count(t) == 1) for c in completions]


REWARDS: dict[str, Callable] = {"accuracy": accuracy_reward, "format": format_reward, "tag_count": tag_count_reward}


def load_reward(spec: str) -> Callable:
    """The reward function named by ``spec``, ``"module:function"`` (``"my_rewards:length_penalty"``; the module
    importable from the current directory or the environment). Raises `ConfigError` (one line) for a spec without
    one colon, a module that cannot be imported, a missing attribute, or one that is not callable."""
    mod_name, sep, attr = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    if not sep or not mod_name or not attr or ":" in attr:
        raise ConfigError(f"reward function {spec!r}: expected one of {', '.join(REWARDS)} or 'module:function'")
    import sys

    added = "" not in sys.path and "." not in sys.path
    if added:  # `python -m`-style: a module in the current directory imports
        sys.path.insert(0, "")
    try:
        module = importlib.import_module(mod_name)
    except Exception as e:  # ImportError, or the module's own error on import
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"reward function {spec!r}: cannot import module {mod_name!r} ({reason})") from None
    finally:
        if added:
            sys.path.remove("")
    fn = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise ConfigError(f"reward function {spec!r}: module {mod_name!r} has no {attr!r}")
        fn = getattr(fn, part)
    if not callable(fn):
        raise ConfigError(f"reward function {spec!r}: {attr} is a {type(fn).__name__}, not a function")
    return fn


def reward_name(fn: Callable) -> str:
    """The name a function's metrics are logged under (``rewards/<name>/mean``): its ``__name__``, as TRL."""
    return getattr(fn, "__name__", None) or type(fn).__name__


def resolve_rewards(specs, weights=None) -> tuple[list[str], list[Callable], list[float]]:
    """``(names, functions, weights)`` of ``--reward_funcs``: ``specs`` a list of names of `REWARDS` or
    ``module:function`` strings (`load_reward`), ``weights`` one number each (TRL's ``reward_weights``; default all
    1.0). Names are `reward_name`, with ``_2``, ``_3`` ... added to repeats. Raises `ConfigError` for no
    functions, a bad spec, or weights that are not one finite number per function."""
    specs = [specs] if isinstance(specs, str) else list(specs or [])
    if not specs:
        raise ConfigError(f"no reward functions; expected names among {', '.join(REWARDS)} or 'module:function'")
    funcs = [REWARDS[s] if isinstance(s, str) and s in REWARDS else s if callable(s) else load_reward(s)
             for s in specs]
    return _names(funcs), funcs, _weights(weights, len(funcs))


def _names(funcs: list[Callable]) -> list[str]:
    names: list[str] = []
    for f in funcs:
        base = name = reward_name(f)
        k = 2
        while name in names:
            name, k = f"{base}_{k}", k + 1
        names.append(name)
    return names


def _weights(weights, n: int) -> list[float]:
    if weights is None:
        return [1.0] * n
    weights = list(weights)
    if len(weights) != n or not all(isinstance(w, numbers.Real) and math.isfinite(w) for w in weights):
        raise ConfigError(f"reward weights {weights}: expected {n} finite number{'s' if n != 1 else ''}, one per "
                          "reward function")
    return [float(w) for w in weights]


def combine_rewards(funcs: list[Callable], weights, prompts: list[str], completions: list[str],
                    columns: dict[str, list] | None = None, names: list[str] | None = None,
                    ) -> tuple[list[float], dict[str, list[float]]]:
    """Call every reward function on the batch and sum them weighted, as TRL's ``GRPOTrainer``:
    ``total[i] = nansum_f(weights[f] * r_f[i])`` where a function's ``None`` or NaN (not applicable) is NaN and
    left out (a row where every function says NaN totals 0.0). ``funcs``: callables ``f(prompts, completions,
    **columns)``; ``weights``: one number per function or ``None`` (all 1.0); ``columns``: name -> list of N values;
    ``names``: the functions' names (default `resolve_rewards`' naming). Returns ``(total, per_function)``: N floats,
    and name -> the function's N rewards as floats (NaN where it gave ``None``). Raises `ConfigError` (one line,
    naming the function) when a function returns something other than N numbers or ``None`` values (including
    infinities), and for bad weights, names, or column lengths."""
    n = len(completions)
    if len(prompts) != n:
        raise ConfigError(f"combine_rewards: {len(prompts)} prompts for {n} completions")
    columns = dict(columns or {})
    for k, v in columns.items():
        if len(v) != n:
            raise ConfigError(f"combine_rewards: column {k!r} has {len(v)} values for {n} completions")
    w = _weights(weights, len(funcs))
    names = _names(funcs) if names is None else list(names)
    if len(names) != len(funcs):
        raise ConfigError(f"combine_rewards: {len(names)} names for {len(funcs)} reward functions")
    total, per = [0.0] * n, {}
    for name, f, wf in zip(names, funcs, w, strict=True):
        try:
            out = f(prompts, completions, **columns)
        except TypeError as e:
            if "argument" not in str(e):
                raise
            raise ConfigError(f"reward function {name} cannot take this data's columns ({', '.join(columns) or 'none'})"
                              f": {e}; define it as f(prompts, completions, **kwargs), as TRL calls it") from None
        try:
            vals = list(out)
        except TypeError:
            vals = None
        if vals is None or len(vals) != n:
            got = f"{len(vals)} values" if vals is not None else f"a {type(out).__name__}"
            raise ConfigError(f"reward function {name} returned {got} for {n} completions; expected a list of {n} "
                              "numbers")
        row = []
        for i, v in enumerate(vals):
            if v is None:
                v = math.nan
            elif isinstance(v, numbers.Real) or (hasattr(v, "item") and getattr(v, "ndim", 1) == 0):
                v = float(v)
            else:
                raise ConfigError(f"reward function {name} returned {type(v).__name__} {str(v)[:40]!r} for completion "
                                  f"{i}; expected a number (or None: not applicable)")
            if math.isinf(v):
                raise ConfigError(f"reward function {name} returned {v} for completion {i}; expected a finite number "
                                  "(or None: not applicable)")
            row.append(v)
            if not math.isnan(v):
                total[i] += wf * v
        per[name] = row
    return total, per
