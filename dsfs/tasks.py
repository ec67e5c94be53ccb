"""The built-in tasks with a checker (``arithmetic``, ``gsm8k``): their training and held-out problems, the
prompts the chat template renders for them, and greedy exact-match accuracy, shared by ``dsfs sft``, ``dsfs dpo``
and ``dsfs eval --task`` (and the GRPO stage after them).

A task's held-out problems never appear in its training problems: arithmetic holds out by a hash of the canonical
problem (`dsfs.arithmetic`), GSM8K by its own test split.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from dsfs import chat
from dsfs.errors import DataError

TASKS = ("arithmetic", "gsm8k")


@dataclass
class Check:
    """A held-out prompt with a checker: ``prompt_ids`` (the chat template's rendering up to the generation
    prompt), ``is_correct(completion_text) -> bool``, and the ``split`` it counts toward."""

    prompt_ids: list[int]
    is_correct: Callable[[str], bool]
    split: str


@dataclass
class Task:
    """A task's problems as conversations: ``train`` and ``held_out`` lists of items (`dsfs.arithmetic.Problem`s or
    `dsfs.gsm8k.Example`s), ``conversation(item)`` (messages ending in the reference reply), ``splits`` (the split of
    each held-out item), ``is_correct(completion, item)``, ``preference_pairs(items, seed)`` (DPO pairs), and
    ``max_new_tokens`` (enough for any reference reply)."""

    name: str
    train: list
    held_out: list
    splits: list[str]
    conversation: Callable
    is_correct: Callable[[str, object], bool]
    preference_pairs: Callable
    max_new_tokens: int

    def checks(self, tok) -> list[Check]:
        """One `Check` per held-out item, its prompt rendered with ``tok`` (a ``tokenizers.Tokenizer``)."""
        out = []
        for item, split in zip(self.held_out, self.splits, strict=True):
            prompt = chat.render(self.conversation(item)[:-1], tok, add_generation_prompt=True)[0]
            out.append(Check(prompt, lambda text, item=item: self.is_correct(text, item), split))
        return out


def load_task(name: str, *, num_train: int = 0, num_held_out: int = 200, seed: int = 0,
              splits: list[str] | None = None, at_most: bool = False, style: str = "plain") -> Task:
    """The task ``name`` with ``num_train`` training problems and up to ``num_held_out`` held-out problems per split.

    ``arithmetic``: training problems drawn over ``splits`` (default: the task's training mixture, by its weights;
    given names: equal weights), held-out ones from each split (capped at what its held-out side holds). ``gsm8k``:
    the first ``num_train`` rows of the shared train split (0: all), the first ``num_held_out`` of its test split.
    ``at_most``: ``num_train`` is a default, cut to what the arithmetic splits' training sides hold. Raises
    `DataError` for an unknown task or split, or more training problems than the splits hold (not ``at_most``).
    ``style``: the reference replies' format (``plain``; ``r1``: the answer in ``<answer>`` tags; arithmetic's ``tool``:
    the same with a calculator call), as `dsfs.arithmetic.conversation`; `DataError` for a style the task lacks."""
    styles = {"arithmetic": ("plain", "r1", "tool"), "gsm8k": ("plain", "r1")}.get(name, (style,))
    if style not in styles:
        raise DataError(f"{name} has no {style!r} format (expected one of {', '.join(styles)})")
    if name == "arithmetic":
        from dsfs import arithmetic as A

        names = splits or list(A.TRAIN_MIXTURE)
        unknown = [s for s in names if s not in A.SPLITS]
        if unknown:
            raise DataError(f"unknown arithmetic split {unknown[0]!r} (known: {', '.join(A.SPLITS)})")
        if at_most:
            num_train = min(num_train, sum(A.capacity(s) for s in names))
        train = A.mixture(splits or A.TRAIN_MIXTURE, num_train, seed) if num_train else []
        held, held_splits = [], []
        for s in names:
            got = A.problems(s, min(num_held_out, A.capacity(s, held_out=True)), seed, held_out=True)
            held += got
            held_splits += [s] * len(got)
        return Task("arithmetic", train, held, held_splits, lambda p: A.conversation(p, style),
                    _checker("arithmetic", style, lambda text, p: A.is_correct(text, p.answer)), A.preference_pairs,
                    A.max_completion_tokens(names, style))
    if name == "gsm8k":
        from dsfs import gsm8k as G

        if splits:
            raise DataError("gsm8k has no splits to choose (--splits is for arithmetic)")
        train = G.read(G.DEFAULT_TRAIN)[:num_train] if num_train else G.read(G.DEFAULT_TRAIN)
        held = G.read(G.DEFAULT_TEST)[:num_held_out]
        return Task("gsm8k", train, held, ["gsm8k"] * len(held), lambda e: G.conversation(e, style),
                    _checker("gsm8k", style, lambda text, e: G.is_correct(text, e.answer)), G.preference_pairs, 256)
    raise DataError(f"unknown task {name!r} (expected one of {', '.join(TASKS)})")


def answer_column(task: str, item) -> int | str:
    """The gold ``answer`` column a task gives the reward functions: arithmetic's exact integer, GSM8K's as a string
    (so `dsfs.rewards.accuracy` checks it with math-verify)."""
    return item.answer if task == "arithmetic" else str(item.answer)


def _checker(task: str, style: str, plain: Callable[[str, object], bool]) -> Callable[[str, object], bool]:
    """A task's check of a completion: in the R1 formats the accuracy reward itself (`dsfs.rewards.accuracy` on the
    last ``<answer>``), so what GRPO rewards and what it is measured by are one rule; else the task's own."""
    if style == "plain":
        return plain
    from dsfs.rewards import accuracy as reward

    return lambda text, item: reward(text, answer_column(task, item)) == 1.0


def accuracy(model, tok, checks: list[Check], eos_id: int, max_new_tokens: int, tools: dict | None = None,
             format_reward=None, batch_size: int = 64, max_tool_calls: int = 4) -> dict[str, float]:
    """Greedy exact-match accuracy of ``model`` on ``checks``: batched, left-padded greedy completions
    (`dsfs.rollout.rollout`, with ``tools`` when given: a calculator-using policy is measured with its calculator),
    decoded with their special tokens so the checker sees ``</think>`` and ``<answer>``. Returns ``{"val_accuracy":
    overall, "val_accuracy/<split>": per split}`` (with one split: the overall only), plus ``"val_format"``, the mean
    of ``format_reward(prompts, completions)`` when given (`dsfs.rewards.format_reward`). ``max_tool_calls``: as the
    rollout's. Raises ``ValueError`` for no checks."""
    from dsfs.rollout import completion_text, rollout

    if not checks:
        raise ValueError("accuracy: no held-out problems to check")
    outs = rollout(model, [c.prompt_ids for c in checks], max_new_tokens, temperature=0.0,
                   stop_token_ids=[eos_id], tokenizer=tok, tools=tools, batch_size=batch_size,
                   max_tool_calls=max_tool_calls)
    texts = [completion_text(tok, o.ids, [eos_id]) for o in outs]
    right: dict[str, list[bool]] = {}
    for c, text in zip(checks, texts, strict=True):
        right.setdefault(c.split, []).append(c.is_correct(text))
    every = [r for v in right.values() for r in v]
    res = {"val_accuracy": sum(every) / len(every)}
    if len(right) > 1:
        res.update({f"val_accuracy/{s}": sum(v) / len(v) for s, v in right.items()})
    if format_reward is not None:
        res["val_format"] = sum(format_reward([""] * len(texts), texts)) / len(texts)
    return res
