"""Supervised fine-tuning behind ``dsfs sft`` (DeepSeek-V3 report section 5.1; TRL's ``SFTTrainer``): next-token
cross-entropy on the assistant tokens of conversations, starting from a checkpoint's weights.

Data (`load_sft_data`): the built-in ``arithmetic`` task (`dsfs.arithmetic`), ``gsm8k`` (`dsfs.gsm8k`), or a JSONL
file of conversations (`dsfs.chat.read_conversations`: ``{"messages": [...]}`` or ``{"prompt", "completion"}``).
Each conversation is rendered with the chat template (`dsfs.chat.render`); its labels are the token itself on the
assistant turns (their content and closing eos) and -100 everywhere else, so the loss is on assistant tokens only.
Sequences longer than ``--seq-len`` are cut to it and counted; the count is printed and stored in the summary.

Batches are padded, not packed: each micro-batch holds ``batch_size`` conversations right-padded with the pad id to
the longest of them (rounded up to a multiple of 16, which bounds the shapes ``torch.compile`` sees), the padding
labelled -100. Packing would need attention that does not cross documents, which our causal attention kernels (MLA,
DSA, flash) do not take; the conversations of these tasks are short and of similar length, so padding wastes little.

Evaluation: the loss on held-out conversations and, for tasks with a checker, greedy exact-match accuracy on
held-out prompts (``val_accuracy``, and ``val_accuracy/<split>`` per arithmetic split).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dsfs import chat
from dsfs.backend import resolve_backend
from dsfs.data import plural
from dsfs.errors import ConfigError, DataError
from dsfs.stage import (
    ExampleOrder,
    dataset_option,
    fill_options,
    load_model,
    run_stage,
    say_fn,
    stage_tokenizer,
    start_stage,
)
from dsfs.tasks import TASKS, Check, accuracy, load_task
from dsfs.train_config import TrainConfig
from dsfs.trainer import make_trainer

IGNORE_INDEX = -100
PAD_MULTIPLE = 16

# Sized for the default `dsfs train` checkpoint on 2 CPU cores: the arithmetic task in about 10 minutes.
SFT_CONFIG = TrainConfig(batch_size=32, seq_len=256, lr=3e-3, min_lr_ratio=0.0, warmup_steps=50, max_steps=1200,
                         time_budget_s=None, weight_decay=0.0, grad_clip=1.0, grad_accum=1, eval_every=300,
                         eval_batches=4, mtp_weight=0.3, optimizer="muon")


@dataclass
class SFTData:
    """Tokenized SFT data: ``train`` and ``eval`` examples as ``(input_ids, labels)`` (unshifted, labels -100 off
    the assistant tokens), ``checks`` for exact-match accuracy, ``truncated`` counts per split, a ``source``
    description, and ``max_new_tokens`` for the checks' generations."""

    train: list[tuple[list[int], list[int]]]
    eval: list[tuple[list[int], list[int]]]
    checks: list[Check] = field(default_factory=list)
    truncated: dict[str, int] = field(default_factory=dict)
    source: str = ""
    max_new_tokens: int = 64


def _features(convs, tok, max_length: int, what: str, counts: dict) -> list:
    """`dsfs.chat.sft_features` of each conversation (the readers have validated them). One cut to ``max_length``
    counts in ``counts["truncated"]``; one whose assistant tokens all lie past ``max_length`` is dropped and counted in
    ``counts["dropped"]``. Raises `DataError` when every conversation is dropped."""
    out = []
    for messages in convs:
        try:
            ids, labels, truncated = chat.sft_features(messages, tok, max_length)
        except DataError:
            counts["dropped"] = counts.get("dropped", 0) + 1
            continue
        out.append((ids, labels))
        counts["truncated"] = counts.get("truncated", 0) + truncated
    if convs and not out:
        raise DataError(f"{what}: every conversation's assistant tokens lie past --seq-len {max_length}; raise it")
    return out


def load_sft_data(dataset: str, tok, max_length: int, *, seed: int = 0, eval_dataset: str | None = None,
                  num_examples: int | None = None, eval_examples: int = 200, splits: list[str] | None = None,
                  eos_id: int = 0, style: str = "plain") -> SFTData:
    """Tokenize ``dataset`` for SFT with the ``tokenizers.Tokenizer`` ``tok``, sequences cut at ``max_length``.

    ``dataset``: ``"arithmetic"`` (``num_examples`` training problems, default 50,000, drawn over ``splits``,
    default the task's training mixture; ``eval_examples`` held-out problems per split, disjoint from training, for
    the loss and the accuracy), ``"gsm8k"`` (the shared train split; ``eval_examples`` of the test split), or a
    JSONL path of conversations (``eval_dataset``: another such file; default: a seeded 5% of the file, at least
    one, held out; no accuracy). ``style``: a task's reply format (`dsfs.tasks.load_task`: ``plain``, ``r1``, or
    arithmetic's ``tool``, the cold start of a calculator-using policy). Raises `DataError` for bad files (naming file
    and line), unknown splits, a style on a file, or data whose truncation leaves no assistant token.
    """
    truncated: dict[str, dict] = {"train": {}, "eval": {}}
    if dataset in TASKS:
        task = load_task(dataset, num_train=num_examples or (50_000 if dataset == "arithmetic" else 0),
                         num_held_out=eval_examples, seed=seed, splits=splits, at_most=num_examples is None,
                         style=style)
        train = _features([task.conversation(p) for p in task.train], tok, max_length, f"{dataset} train",
                          truncated["train"])
        ev = _features([task.conversation(p) for p in task.held_out], tok, max_length, f"{dataset} held-out",
                       truncated["eval"])
        what = f"{dataset}{' ' + ','.join(dict.fromkeys(task.splits)) if dataset == 'arithmetic' else ''}"
        what += f" ({style} format)" if style != "plain" else ""
        return SFTData(train, ev, task.checks(tok), truncated, f"{what}: {plural(len(train), 'problem')}",
                       max_new_tokens=task.max_new_tokens)
    path = Path(dataset)
    if not path.is_file():
        raise DataError(f"--dataset {dataset}: expected arithmetic, gsm8k or a .jsonl file of conversations")
    if style != "plain":
        raise DataError(f"--style {style} applies to --dataset arithmetic or gsm8k; a file's conversations keep "
                        "their own format")
    convs = chat.read_conversations(path)
    if num_examples:
        convs = convs[:num_examples]
    if eval_dataset is not None:
        ev_convs = chat.read_conversations(eval_dataset)
    else:
        if len(convs) < 2:
            raise DataError(f"{path}: {plural(len(convs), 'conversation')}; need at least 2 to hold one out "
                            "(or pass --eval-dataset)")
        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(len(convs), generator=g).tolist()
        k = max(1, round(0.05 * len(convs)))
        ev_convs, convs = [convs[i] for i in perm[:k]], [convs[i] for i in perm[k:]]
    train = _features(convs, tok, max_length, str(path), truncated["train"])
    ev = _features(ev_convs, tok, max_length, str(eval_dataset or path), truncated["eval"])
    return SFTData(train, ev, [], truncated, f"{path}: {plural(len(train), 'conversation')}")


def padded_width(longest: int, max_width: int | None) -> int:
    """``longest`` rounded up to a multiple of `PAD_MULTIPLE`, at most ``max_width`` (and at least ``longest``)."""
    width = -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE
    return max(longest, min(width, max_width)) if max_width is not None else width


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int,
            max_width: int | None = None) -> dict[str, torch.Tensor]:
    """Shift and right-pad ``(input_ids, labels)`` examples into ``{"input_ids", "targets"}`` (B, L) int64:
    ``input_ids = ids[:-1]``, ``targets = labels[1:]`` (the label of the next token), padded with ``pad_id`` /
    -100 to the longest, rounded up to a multiple of `PAD_MULTIPLE` but not past ``max_width`` (the model's
    positions)."""
    width = padded_width(max(len(ids) - 1 for ids, _ in examples), max_width)
    x = torch.full((len(examples), width), pad_id, dtype=torch.long)
    y = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for r, (ids, labels) in enumerate(examples):
        n = len(ids) - 1
        x[r, :n] = torch.tensor(ids[:-1])
        y[r, :n] = torch.tensor(labels[1:])
    return {"input_ids": x, "targets": y}


def sft(dataset: str | None = None, out_dir: str | os.PathLike | None = None, *, init_from=None, resume=False,
        backend: str = "auto", seed: int | None = None, eval_dataset: str | None = None,
        num_examples: int | None = None, eval_examples: int | None = None, splits: list[str] | None = None,
        style: str | None = None, tokenizer: str | None = None, keep_last: int | None = None,
        save_every: int | None = None, overwrite: bool = False, compile: bool | str = False, verbose: bool = True,
        on_step=None, **overrides) -> dict:
    """Fine-tune the model of ``init_from`` on ``dataset`` (`load_sft_data`) and return the run summary.

    The run directory, checkpoints, ``resume`` and ``overrides`` (`TrainConfig` fields over `SFT_CONFIG`; ``seq_len``
    is the maximum sequence length) are as `dsfs.train.train`'s (`dsfs.stage`); the dataset, its sizes and splits
    are the run's options, which a resumed run keeps. Evaluation every ``eval_every`` steps: the held-out loss
    (``val_loss``) and, for arithmetic and gsm8k, greedy exact-match accuracy (`accuracy`). The summary adds
    ``"truncated"`` (sequences cut to ``seq_len``, per split), ``"val_accuracy"`` and ``"backend"``.
    Raises `dsfs.errors.UserError` subclasses on bad input (see `dsfs.stage.start_stage`, `load_sft_data`).
    """
    say = say_fn(verbose)
    options = {"dataset": dataset_option(dataset, TASKS, splits, eval_dataset, "conversations"),
               "eval_dataset": str(Path(eval_dataset).resolve()) if eval_dataset is not None else None,
               "num_examples": num_examples, "eval_examples": eval_examples, "splits": splits, "style": style}
    start = start_stage("sft", out_dir=out_dir, resume=resume, init_from=init_from, overwrite=overwrite, seed=seed,
                        keep_last=keep_last, save_every=save_every, default_tc=SFT_CONFIG, overrides=overrides,
                        options=options)
    opt, tc = fill_options(start, {"eval_examples": 200, "style": "plain"}), start.tc
    if opt["dataset"] is None:
        raise ConfigError("dsfs sft needs --dataset (arithmetic, gsm8k, or a .jsonl file of conversations)")
    be = resolve_backend(backend)
    model = load_model(be, start.model_dir)
    cfg = model.config
    tok_file, tok = stage_tokenizer(start.model_dir, cfg, tokenizer)
    tc.check_model(cfg.max_position_embeddings)
    eos = cfg.eos_token_id[0] if isinstance(cfg.eos_token_id, list) else cfg.eos_token_id
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else eos
    data = load_sft_data(opt["dataset"], tok, tc.seq_len, seed=start.seed, eval_dataset=opt["eval_dataset"],
                         num_examples=opt["num_examples"], eval_examples=opt["eval_examples"],
                         splits=opt["splits"], eos_id=eos, style=opt["style"])
    say(f"data: {data.source}; {plural(len(data.eval), 'held-out conversation')}{cut_note(data.truncated, tc.seq_len)}")
    if be.note:
        say(be.note)
    torch.manual_seed(start.seed)
    trainer = make_trainer(be, model, tc, compile)
    order = ExampleOrder(len(data.train), start.seed, start.state["order"] if start.state else 0)
    counted = [0]

    def next_batch():
        batch = collate([data.train[i] for i in order.take(tc.batch_size)], pad, tc.seq_len)
        counted[0] += int((batch["input_ids"] != pad).sum())
        return batch

    def tokens_done() -> int:
        n, counted[0] = counted[0], 0
        return n

    n_eval = min(tc.eval_batches * tc.batch_size, len(data.eval))
    evals = [collate(data.eval[s:s + tc.batch_size], pad, tc.seq_len) for s in range(0, n_eval, tc.batch_size)]
    tools = None
    if opt["style"] == "tool":
        from dsfs.tools import TOOLS as tools
    extra = (lambda: accuracy(trainer.model, tok, data.checks, eos, data.max_new_tokens, tools=tools)) \
        if data.checks else None
    keys = ["val_accuracy"] + [f"val_accuracy/{s}" for s in dict.fromkeys(c.split for c in data.checks)]
    summary = run_stage(start, trainer, next_batch=next_batch, eval_batches=evals, tokens_per_step=tokens_done,
                        order=order, tokenizer_file=tok_file, overwrite=overwrite, say=say, verbose=verbose,
                        extra_eval=extra, plot_keys=keys if data.checks else (), on_step=on_step,
                        extra_state=lambda: {"truncated": data.truncated})
    last = last_eval(start.out)
    return {**summary, "backend": be.name, "truncated": data.truncated, "seq_len": tc.seq_len,
            **{k: v for k, v in last.items() if k.startswith("val_accuracy")}}


def cut_note(counts: dict[str, dict], seq_len: int) -> str:
    """``"; 12 sequences cut to --seq-len 256 (train 10, eval 2); ..."`` for the data line, or ``""``: the counts of
    `_features` per split."""
    out = ""
    for key, what in (("truncated", "cut to"), ("dropped", "dropped: nothing to learn within")):
        per = {split: c.get(key, 0) for split, c in counts.items() if c.get(key)}
        if per:
            out += (f"; {plural(sum(per.values()), 'sequence')} {what} --seq-len {seq_len} "
                    f"({', '.join(f'{k} {v}' for k, v in per.items())})")
    return out


def last_eval(out: Path) -> dict:
    """The newest evaluation record of the run's metrics.jsonl."""
    import json

    last = {}
    path = out / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            if "loss" not in rec:  # an evaluation record (train records hold the step's loss)
                last = rec
    return last



def add_sft(sub) -> None:
    """Register ``dsfs sft`` (`sft`)."""
    from dsfs.stage import add_stage_options

    p = sub.add_parser("sft", help="supervised fine-tuning on conversations (loss on assistant tokens only)",
                       description="Fine-tune a checkpoint on chat data with the chat template: the arithmetic task, "
                       "GSM8K, or a JSONL file of {\"messages\": [...]} or {\"prompt\", \"completion\"} rows. "
                       "Evaluates the held-out loss and, for arithmetic and gsm8k, greedy exact-match accuracy. "
                       "Writes the same run directory as dsfs train; Ctrl-C checkpoints, --resume continues exactly.")
    p.add_argument("--dataset", metavar="NAME|PATH", help="arithmetic, gsm8k, or a .jsonl file of conversations")
    p.add_argument("--eval-dataset", metavar="PATH", help="held-out conversations (default for a file: 5%% of it)")
    p.add_argument("--splits", metavar="A,B", help="arithmetic splits to train and evaluate on (default: the task's "
                   "training mixture)")
    p.add_argument("--num-examples", type=int, metavar="N", help="training examples (arithmetic default: 50000; "
                   "files: all)")
    p.add_argument("--eval-examples", type=int, metavar="N", help="held-out problems per split for the accuracy "
                   "(default: 200)")
    p.add_argument("--style", choices=["plain", "r1", "tool"], help="the task's reply format: <think>...</think> "
                   "then the answer (plain), the answer in <answer> tags (r1, DeepSeek-R1's), or r1 with a calculator "
                   "call (tool: the cold start of a tool-using policy; accuracy is measured with the calculator) "
                   "(default: plain)")
    p.add_argument("--compile", choices=["auto", "on", "off"], default="off",
                   help="torch.compile the loss (auto: on for cpu and cuda). Default: off: batches are padded to their "
                   "longest conversation, so each new width would compile again")
    add_stage_options(p, "sft", SFT_CONFIG, mtp=True)
    p.set_defaults(func=_run_sft)


def _run_sft(args) -> int:
    from dsfs.stage import print_summary, stage_kwargs

    s = sft(init_from=args.init_from, compile={"auto": "auto", "on": True, "off": False}[args.compile],
            style=args.style, **stage_kwargs(args, mtp=True))
    acc = [f"{k} {v:.3f}" for k, v in s.items() if k.startswith("val_accuracy")]
    cut = cut_note(s["truncated"], s["seq_len"])
    print_summary(s, ([", ".join(acc)] if acc else []) + ([cut.lstrip("; ")] if cut else []))
    return 0
