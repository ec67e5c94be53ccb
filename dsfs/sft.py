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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dsfs import chat
from dsfs.backend import resolve_backend
from dsfs.data import plural, read_tokenizer
from dsfs.errors import ConfigError, DataError
from dsfs.evaluation import greedy_completions
from dsfs.stage import ExampleOrder, load_model, run_stage, say_fn, start_stage, tokenizer_file_of
from dsfs.train_config import TrainConfig
from dsfs.trainer import make_trainer

IGNORE_INDEX = -100
PAD_MULTIPLE = 16

# Sized for the default `dsfs train` checkpoint on 2 CPU cores: the arithmetic task in about 10 minutes.
SFT_CONFIG = TrainConfig(batch_size=32, seq_len=256, lr=2e-3, min_lr_ratio=0.0, warmup_steps=30, max_steps=1000,
                         time_budget_s=None, weight_decay=0.0, grad_clip=1.0, grad_accum=1, eval_every=100,
                         eval_batches=4, mtp_weight=0.3, optimizer="muon")


@dataclass
class Check:
    """A held-out prompt with a checker: ``prompt_ids`` (the chat template's rendering up to the generation
    prompt), ``is_correct(completion_text) -> bool``, and the ``split`` it counts toward."""

    prompt_ids: list[int]
    is_correct: Callable[[str], bool]
    split: str


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


def _features(convs, tok, max_length: int, what: str) -> tuple[list, int]:
    out, cut = [], 0
    for i, messages in enumerate(convs):
        try:
            ids, labels, truncated = chat.sft_features(messages, tok, max_length)
        except DataError as e:
            raise DataError(f"{what}, conversation {i + 1}: {e}") from None
        out.append((ids, labels))
        cut += truncated
    return out, cut


def load_sft_data(dataset: str, tok, max_length: int, *, seed: int = 0, eval_dataset: str | None = None,
                  num_examples: int | None = None, eval_examples: int = 200, splits: list[str] | None = None,
                  eos_id: int = 0) -> SFTData:
    """Tokenize ``dataset`` for SFT with the ``tokenizers.Tokenizer`` ``tok``, sequences cut at ``max_length``.

    ``dataset``: ``"arithmetic"`` (``num_examples`` training problems, default 50,000, drawn over ``splits``,
    default the task's training mixture; ``eval_examples`` held-out problems per split, disjoint from training, for
    the loss and the accuracy), ``"gsm8k"`` (the shared train split; ``eval_examples`` of the test split), or a
    JSONL path of conversations (``eval_dataset``: another such file; default: a seeded 5% of the file, at least
    one, held out; no accuracy). Raises `DataError` for bad files (naming file and line), unknown splits, or data
    whose truncation leaves no assistant token.
    """
    from dsfs import arithmetic

    truncated: dict[str, int] = {}
    checks: list[Check] = []
    if dataset == "arithmetic":
        names = splits or list(arithmetic.TRAIN_MIXTURE)
        unknown = [s for s in names if s not in arithmetic.SPLITS]
        if unknown:
            raise DataError(f"unknown arithmetic split {unknown[0]!r} (known: {', '.join(arithmetic.SPLITS)})")
        n = num_examples or 50_000
        train_p = arithmetic.mixture(splits or arithmetic.TRAIN_MIXTURE, n, seed)
        convs = [arithmetic.conversation(p) for p in train_p]
        train, truncated["train"] = _features(convs, tok, max_length, "arithmetic train")
        eval_p = {s: arithmetic.problems(s, min(eval_examples, arithmetic.capacity(s, held_out=True)), seed,
                                          held_out=True) for s in names}
        ev_convs = [arithmetic.conversation(p) for s in names for p in eval_p[s]]
        ev, truncated["eval"] = _features(ev_convs, tok, max_length, "arithmetic held-out")
        for s in names:
            for p in eval_p[s]:
                prompt = chat.render(arithmetic.conversation(p)[:-1], tok, add_generation_prompt=True)[0]
                checks.append(Check(prompt, lambda text, a=p.answer: arithmetic.is_correct(text, a), s))
        source = f"arithmetic {','.join(names)}: {plural(len(train), 'problem')}"
        return SFTData(train, ev, checks, truncated, source, max_new_tokens=arithmetic.MAX_COMPLETION_TOKENS)
    if dataset == "gsm8k":
        from dsfs import gsm8k

        rows = gsm8k.read(gsm8k.DEFAULT_TRAIN)
        if num_examples:
            rows = rows[:num_examples]
        train, truncated["train"] = _features([r.messages for r in rows], tok, max_length, "gsm8k train")
        test = gsm8k.read(gsm8k.DEFAULT_TEST)[:eval_examples]
        ev, truncated["eval"] = _features([r.messages for r in test], tok, max_length, "gsm8k test")
        for r in test:
            prompt = chat.render(r.messages[:-1], tok, add_generation_prompt=True)[0]
            checks.append(Check(prompt, lambda text, a=r.answer: gsm8k.is_correct(text, a), "gsm8k"))
        return SFTData(train, ev, checks, truncated, f"gsm8k: {plural(len(train), 'problem')}", max_new_tokens=256)
    path = Path(dataset)
    if not path.is_file():
        raise DataError(f"--dataset {dataset}: expected arithmetic, gsm8k or a .jsonl file of conversations")
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
    train, truncated["train"] = _features(convs, tok, max_length, str(path))
    ev, truncated["eval"] = _features(ev_convs, tok, max_length, str(eval_dataset or path))
    return SFTData(train, ev, [], truncated, f"{path}: {plural(len(train), 'conversation')}")


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Shift and right-pad ``(input_ids, labels)`` examples into ``{"input_ids", "targets"}`` (B, L) int64:
    ``input_ids = ids[:-1]``, ``targets = labels[1:]`` (the label of the next token), padded with ``pad_id`` /
    -100 to the longest, rounded up to a multiple of `PAD_MULTIPLE`."""
    longest = max(len(ids) - 1 for ids, _ in examples)
    width = -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE
    x = torch.full((len(examples), width), pad_id, dtype=torch.long)
    y = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for r, (ids, labels) in enumerate(examples):
        n = len(ids) - 1
        x[r, :n] = torch.tensor(ids[:-1])
        y[r, :n] = torch.tensor(labels[1:])
    return {"input_ids": x, "targets": y}


def accuracy(model, tok, checks: list[Check], eos_id: int, max_new_tokens: int) -> dict[str, float]:
    """Greedy exact-match accuracy of ``model`` on ``checks``: ``{"val_accuracy": overall, "val_accuracy/<split>":
    per split}`` (one split: the overall only)."""
    outs = greedy_completions(model, [c.prompt_ids for c in checks], eos_id, max_new_tokens)
    right: dict[str, list[bool]] = {}
    for c, ids in zip(checks, outs, strict=True):
        right.setdefault(c.split, []).append(c.is_correct(tok.decode(ids, skip_special_tokens=False)))
    every = [r for v in right.values() for r in v]
    res = {"val_accuracy": sum(every) / len(every)}
    if len(right) > 1:
        res.update({f"val_accuracy/{s}": sum(v) / len(v) for s, v in right.items()})
    return res


def sft(dataset: str | None = None, out_dir: str | os.PathLike | None = None, *, init_from=None, resume=False,
        backend: str = "auto", seed: int | None = None, eval_dataset: str | None = None,
        num_examples: int | None = None, eval_examples: int | None = None, splits: list[str] | None = None,
        tokenizer: str | None = None, keep_last: int | None = None, save_every: int | None = None,
        overwrite: bool = False, compile: bool | str = "auto", verbose: bool = True, on_step=None,
        **overrides) -> dict:
    """Fine-tune the model of ``init_from`` on ``dataset`` (`load_sft_data`) and return the run summary.

    The run directory, checkpoints, ``resume`` and ``overrides`` (`TrainConfig` fields over `SFT_CONFIG`; ``seq_len``
    is the maximum sequence length) are as `dsfs.train.train`'s (`dsfs.stage`); the dataset, its sizes and splits
    are the run's options, which a resumed run keeps. Evaluation every ``eval_every`` steps: the held-out loss
    (``val_loss``) and, for arithmetic and gsm8k, greedy exact-match accuracy (`accuracy`). The summary adds
    ``"truncated"`` (sequences cut to ``seq_len``, per split), ``"val_accuracy"`` and ``"backend"``.
    Raises `dsfs.errors.UserError` subclasses on bad input (see `dsfs.stage.start_stage`, `load_sft_data`).
    """
    say = say_fn(verbose)
    options = {"dataset": dataset, "eval_dataset": eval_dataset, "num_examples": num_examples,
               "eval_examples": eval_examples, "splits": splits}
    start = start_stage("sft", out_dir=out_dir, resume=resume, init_from=init_from, overwrite=overwrite, seed=seed,
                        keep_last=keep_last, save_every=save_every, default_tc=SFT_CONFIG, overrides=overrides,
                        options=options)
    opt, tc = start.options, start.tc
    if opt["dataset"] is None:
        raise ConfigError("dsfs sft needs --dataset (arithmetic, gsm8k, or a .jsonl file of conversations)")
    be = resolve_backend(backend)
    tok_file = tokenizer_file_of(start.init_dir, tokenizer)
    tok = read_tokenizer(tok_file)
    model = load_model(be, start.model_dir, say)
    cfg = model.config
    if tok.get_vocab_size() > cfg.vocab_size:
        raise DataError(f"{tok_file} has {tok.get_vocab_size()} tokens, more than the model's vocab_size "
                        f"{cfg.vocab_size}; expected the tokenizer the model was trained with")
    tc.check_model(cfg.max_position_embeddings)
    eos = cfg.eos_token_id[0] if isinstance(cfg.eos_token_id, list) else cfg.eos_token_id
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else eos
    data = load_sft_data(opt["dataset"], tok, tc.seq_len, seed=start.seed, eval_dataset=opt["eval_dataset"],
                         num_examples=opt["num_examples"], eval_examples=opt["eval_examples"] or 200,
                         splits=opt["splits"], eos_id=eos)
    cut = sum(data.truncated.values())
    say(f"data: {data.source}; {plural(len(data.eval), 'held-out conversation')}"
        + (f"; {plural(cut, 'sequence')} cut to --seq-len {tc.seq_len} "
           f"({', '.join(f'{k} {v}' for k, v in data.truncated.items())})" if cut else ""))
    if be.note:
        say(be.note)
    torch.manual_seed(start.seed)
    trainer = make_trainer(be, model, tc, compile)
    order = ExampleOrder(len(data.train), start.seed, start.state["order"] if start.state else 0)
    counted = [0]

    def next_batch():
        batch = collate([data.train[i] for i in order.take(tc.batch_size)], pad)
        counted[0] += int((batch["input_ids"] != pad).sum())
        return batch

    def tokens_done() -> int:
        n, counted[0] = counted[0], 0
        return n

    n_eval = min(tc.eval_batches * tc.batch_size, len(data.eval))
    evals = [collate(data.eval[s:s + tc.batch_size], pad) for s in range(0, n_eval, tc.batch_size)]
    extra = (lambda: accuracy(trainer.model, tok, data.checks, eos, data.max_new_tokens)) if data.checks else None
    keys = ["val_accuracy"] + [f"val_accuracy/{s}" for s in dict.fromkeys(c.split for c in data.checks)]
    summary = run_stage(start, trainer, next_batch=next_batch, eval_batches=evals, tokens_per_step=tokens_done,
                        order=order, tokenizer_file=tok_file, overwrite=overwrite, say=say, verbose=verbose,
                        extra_eval=extra, plot_keys=keys if data.checks else (), on_step=on_step)
    last = _last_eval(start.out)
    return {**summary, "backend": be.name, "truncated": data.truncated,
            **{k: v for k, v in last.items() if k.startswith("val_accuracy")}}


def _last_eval(out: Path) -> dict:
    """The newest evaluation record of the run's metrics.jsonl."""
    import json

    last = {}
    path = out / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            if "val_loss" in rec:
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
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                   help="torch.compile the loss (auto: on for cpu and cuda; default: auto)")
    add_stage_options(p, "sft", SFT_CONFIG, mtp=True)
    p.set_defaults(func=_run_sft)


def _run_sft(args) -> int:
    from dsfs.stage import print_summary, stage_kwargs

    for name in ("num_examples", "eval_examples"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise ConfigError(f"--{name.replace('_', '-')} {v}: expected an integer >= 1")
    s = sft(args.dataset, init_from=args.init_from, eval_dataset=args.eval_dataset,
            splits=args.splits.split(",") if args.splits else None, num_examples=args.num_examples,
            eval_examples=args.eval_examples, compile={"auto": "auto", "on": True, "off": False}[args.compile],
            **stage_kwargs(args, mtp=True))
    acc = [f"{k} {v:.3f}" for k, v in s.items() if k.startswith("val_accuracy")]
    cut = sum(s["truncated"].values())
    print_summary(s, ([", ".join(acc)] if acc else []) + ([f"{cut} sequences cut to --seq-len"] if cut else []))
    return 0
