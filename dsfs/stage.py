"""What every post-training verb (``dsfs sft``, ``dpo``, ``distill``) shares: where a run starts (a checkpoint's
weights with ``--init-from``, or a run's newest checkpoint with ``--resume``), its training config and options, the
order of its examples, and the hand-over to the one training loop (`dsfs.loop.TrainingRun`).

A stage run writes the same run directory as ``dsfs train`` (metrics.jsonl, loss.png, checkpoints/step_N with
trainer_state.pt, final/), so Ctrl-C, SIGTERM, ``--time-budget`` and ``--resume`` behave the same. Its trainer
state adds ``stage`` (the verb), ``stage_options`` (the verb's own options, such as DPO's ``beta``: a resumed run
keeps them and refuses others), ``order`` (the position in the example order, `ExampleOrder`), ``init_from`` and
``seed``. A resumed run continues exactly: the same examples in the same order, the same RNG states.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from dsfs.backend import Backend
from dsfs.checkpointing import CHECKPOINTS, latest_checkpoint, load_model_dir, load_trainer_state, resolve_model_dir
from dsfs.data import check_out_dir
from dsfs.errors import CheckpointError, ConfigError, DataError
from dsfs.evaluation import Batch
from dsfs.loop import Progress, TrainingRun, check_out
from dsfs.train import check_run_options
from dsfs.train_config import TrainConfig

STAGE_KEYS = {"step", "tokens", "elapsed_s", "optimizer", "rng_cpu", "train_config", "stage", "stage_options",
              "order", "init_from", "seed"}


def say_fn(verbose: bool) -> Callable[[str], None]:
    """One progress line on stderr through tqdm (so it does not break a progress bar); nothing when not verbose."""
    return (lambda msg: tqdm.write(msg, file=sys.stderr)) if verbose else (lambda msg: None)


@dataclass
class StageStart:
    """Where a stage run starts. ``out``: the run directory; ``init_dir``: the model directory the run started from
    (for a resumed run, the one recorded in its checkpoint); ``ckpt`` and ``state``: the resumed checkpoint and its
    trainer state (``None`` for a fresh run); ``tc``: the training config; ``options``: the stage's own options;
    ``seed``, ``keep_last``, ``save_every``: as ``dsfs train``'s."""

    verb: str
    out: Path
    init_dir: Path
    ckpt: Path | None
    state: dict | None
    tc: TrainConfig
    options: dict
    seed: int
    keep_last: int
    save_every: int | None

    @property
    def model_dir(self) -> Path:
        """The weights this session loads: the resumed checkpoint's, or ``init_dir``'s."""
        return self.ckpt if self.ckpt is not None else self.init_dir


def start_stage(verb: str, *, out_dir, resume, init_from, overwrite: bool, seed: int | None, keep_last: int | None,
                save_every: int | None, default_tc: TrainConfig, overrides: dict, options: dict) -> StageStart:
    """Resolve the start of a ``verb`` run (``"sft"``, ``"dpo"``, ``"distill"``).

    A fresh run needs ``init_from`` (a model, run or checkpoints directory, `resolve_model_dir`; a distillation with a
    fresh student passes its teacher, the run's recorded start); it takes ``default_tc`` with ``overrides`` (a dict of
    `TrainConfig` fields, ``None`` values ignored) and ``options``. ``resume`` (``True``: the newest checkpoint of
    ``out_dir``; or a path) continues a run of the same verb: its training config (``overrides`` still apply, as
    in ``dsfs train``), its options (a given option that differs is refused: ``None`` means not given), its seed and
    its example order. ``out_dir`` defaults to ``runs/<verb>`` (for ``resume=PATH`` without it, that checkpoint's
    run directory).

    Raises `ConfigError` / `CheckpointError` / `DataError` (one line each) for: both or neither of ``resume`` and
    ``init_from`` where one is required, ``resume`` with ``overwrite``, a checkpoint of another verb, a finished
    run, a changed option or seed, an out directory that is a file or already holds a run (without
    ``overwrite``), or another process holding it (`dsfs.rundir.RunDirBusy`).
    """
    if resume and init_from is not None:
        raise ConfigError("pass --resume (continue a run exactly) or --init-from (start from a checkpoint's "
                          "weights), not both")
    check_run_options(resume, overwrite, keep_last, save_every)
    state = ckpt = None
    if resume:
        where = Path(resume) if resume is not True else Path(out_dir or Path("runs") / verb)
        ckpt = latest_checkpoint(where)
        if ckpt is None:
            raise CheckpointError(f"{where}: no checkpoint to resume (expected a run, {CHECKPOINTS} or step_* "
                                  "directory holding a complete checkpoint)")
        state = load_trainer_state(ckpt)
        if state.get("stage") != verb:
            what = f"a dsfs {state['stage']} run" if state.get("stage") else "a dsfs train run"
            raise CheckpointError(f"{ckpt} is {what}; resume it with that verb, or start dsfs {verb} from its "
                                  f"weights with --init-from")
        missing = sorted(STAGE_KEYS - set(state))
        if missing:
            raise CheckpointError(f"{ckpt}: trainer state lacks {', '.join(missing)}")
        changed = [k for k, v in options.items() if v is not None and state["stage_options"].get(k) != v]
        if changed:
            k = changed[0]
            raise CheckpointError(f"{ckpt} was trained with --{k.replace('_', '-')} {state['stage_options'].get(k)}; "
                                  f"a resumed run keeps its options (got {options[k]})")
        if seed not in (None, state["seed"]):
            raise CheckpointError(f"{ckpt} is a run of --seed {state['seed']}; a resumed run keeps it")
        options, seed = dict(state["stage_options"]), state["seed"]
        keep_last = state.get("keep_last", 3) if keep_last is None else keep_last
        save_every = state.get("save_every") if save_every is None else save_every
        init_dir = Path(state["init_from"]) if state["init_from"] else ckpt
        tc = TrainConfig.from_dict(state["train_config"])
        if overrides.get("optimizer") not in (None, tc.optimizer):
            raise CheckpointError(f"{ckpt} was trained with optimizer {tc.optimizer}; it cannot continue with "
                                  f"{overrides['optimizer']}")
    else:
        if init_from is None:
            raise ConfigError(f"dsfs {verb} needs --init-from DIR (the model to start from: a dsfs train run or "
                              "final/ directory, or a transformers DeepSeek-V3 checkpoint) or --resume")
        init_dir = resolve_model_dir(init_from)
        tc = default_tc
        options = {k: v for k, v in options.items()}
    tc = tc.replace(**overrides)
    if state is not None and state["step"] >= tc.max_steps:
        raise CheckpointError(f"{ckpt} is at step {state['step']} of --max-steps {tc.max_steps}: the run is "
                              f"finished; pass a --max-steps above {state['step']} to train on")
    if out_dir is None and ckpt is not None and ckpt.parent.name == CHECKPOINTS:
        out = ckpt.parent.parent
    else:
        out = Path(out_dir or Path("runs") / verb)
    check_out_dir(out)
    check_out(out, fresh=state is None, overwrite=overwrite)
    return StageStart(verb, out, init_dir, ckpt, state, tc, options, 0 if seed is None else seed,
                      3 if keep_last is None else keep_last, save_every)


def load_model(be: Backend, path: Path, train: bool = True):
    """The model in ``path`` as backend ``be``'s torch class (the reference model for the MLX runtime, which
    `dsfs.trainer.make_trainer` converts), in train mode (``train``) or eval mode. Raises `CheckpointError`."""
    from reference import Model

    cls = Model if be.name == "mlx" else be.model_cls
    model = load_model_dir(path, cls)
    return model.train(train)


def stage_tokenizer(model_dir: Path, cfg, tokenizer: str | os.PathLike | None = None):
    """``(path, tokenizers.Tokenizer)`` a stage trains with: ``tokenizer`` (a file or a directory holding one), else
    the model directory's ``tokenizer.json``. Raises `DataError` / `CheckpointError` when there is none, when
    ``tokenizer`` differs from the one the model directory holds, or when it has more tokens than the model's
    ``cfg.vocab_size``."""
    from dsfs.data import file_sha256, read_tokenizer
    from dsfs.generate import tokenizer_file

    path = tokenizer_file(model_dir, tokenizer)
    own = Path(model_dir) / "tokenizer.json"
    if tokenizer is not None and own.is_file() and file_sha256(own) != file_sha256(path):
        raise DataError(f"--tokenizer {tokenizer} differs from the tokenizer.json of {model_dir}, which the model was "
                        "trained with; drop --tokenizer")
    tok = read_tokenizer(path)
    if tok.get_vocab_size() > cfg.vocab_size:
        raise DataError(f"{path} has {tok.get_vocab_size()} tokens, more than the model's vocab_size "
                        f"{cfg.vocab_size}; expected the tokenizer the model was trained with")
    return path, tok


def dataset_option(dataset: str | None, tasks: tuple[str, ...], splits: list[str] | None, eval_dataset,
                   what: str) -> str | None:
    """The ``--dataset`` a stage stores: a task name as given, a file as its absolute path (so a resumed run finds it
    from any directory). Raises `ConfigError` for options the dataset does not use: ``--splits`` off arithmetic,
    ``--eval-dataset`` with a built-in task, an empty split name."""
    if dataset is None:
        return None
    if splits is not None and (not splits or any(not s for s in splits)):
        raise ConfigError(f"--splits {','.join(splits)!r}: expected comma-separated split names")
    if dataset in tasks:
        if splits and dataset != "arithmetic":
            raise ConfigError(f"--splits applies to --dataset arithmetic, not {dataset}")
        if eval_dataset is not None:
            raise ConfigError(f"--eval-dataset applies to a file of {what}; --dataset {dataset} holds out its own "
                              "problems (size them with --eval-examples)")
        return dataset
    if splits:
        raise ConfigError(f"--splits applies to --dataset arithmetic, not a file of {what}")
    return str(Path(dataset).resolve())


def fill_options(start: StageStart, defaults: dict) -> dict:
    """``start.options`` with ``defaults`` where an option was not given, in place: the checkpoints store the
    values the run used, so a resumed run given the same values explicitly is not refused."""
    for k, v in defaults.items():
        if start.options.get(k) is None:
            start.options[k] = v
    return start.options


class ExampleOrder:
    """The order in which a stage visits its ``n`` examples: epoch ``e`` is a permutation drawn from a generator
    seeded with ``seed + e``, and ``pos`` counts the examples handed out so far, so the order is a pure function of
    ``(n, seed, pos)``: a resumed run continues it exactly from the ``pos`` its checkpoint stored."""

    def __init__(self, n: int, seed: int, pos: int = 0):
        if n < 1:
            raise DataError("no training examples")
        self.n, self.seed, self.pos = n, seed, pos
        self._epoch, self._perm = -1, None

    def take(self, k: int) -> list[int]:
        """The next ``k`` example indices (crossing into the next epoch's permutation when one runs out)."""
        out = []
        for _ in range(k):
            epoch, i = divmod(self.pos, self.n)
            if epoch != self._epoch:
                g = torch.Generator().manual_seed(self.seed + epoch)
                self._perm, self._epoch = torch.randperm(self.n, generator=g).tolist(), epoch
            out.append(self._perm[i])
            self.pos += 1
        return out


def restore(trainer, start: StageStart) -> Progress | None:
    """Load a resumed run's optimizer and RNG states into ``trainer`` and torch; return its `Progress` (``None`` for
    a fresh run). Raises `CheckpointError` when the state does not fit the model."""
    state = start.state
    if state is None:
        return None
    try:
        trainer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng_cpu"])
    except (KeyError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{start.ckpt}: trainer state does not fit this model ({e})") from e
    if state.get("rng_cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    return Progress(state["step"], state["tokens"], state["elapsed_s"])


def run_stage(start: StageStart, trainer, *, next_batch: Callable[[], Batch], eval_batches: list[Batch],
              tokens_per_step: Callable[[], int] | int, order: ExampleOrder, tokenizer_file: Path,
              overwrite: bool, say: Callable[[str], None], verbose: bool, perplexity: bool = True,
              extra_state: Callable[[], dict] | None = None,
              extra_eval: Callable[[], dict] | None = None, plot_keys: Sequence[str] = (),
              on_step: Callable[[dict], None] | None = None) -> dict:
    """Hand a stage to `dsfs.loop.TrainingRun` and return its summary. ``order``'s position and ``extra_state()``
    (more of the stage's state, such as a data generator's) go into every checkpoint with the stage's options;
    ``extra_eval`` adds metrics to each evaluation record; ``plot_keys``: metrics drawn in loss.png's second
    panel; ``perplexity``: whether ``val_loss`` is a cross-entropy (``val_ppl`` is logged) or another loss."""
    progress = restore(trainer, start)

    def stage_state() -> dict:
        return {"stage": start.verb, "stage_options": start.options, "order": order.pos, "seed": start.seed,
                "init_from": str(start.init_dir.resolve()), "keep_last": start.keep_last,
                "save_every": start.save_every, **(extra_state() if extra_state is not None else {})}

    what = f"resuming {start.ckpt} at step {progress.step}" if progress else f"dsfs {start.verb}"
    tc = start.tc
    say(f"{what}: from {start.init_dir}, {trainer.n_params / 1e6:.2f}M parameters on {trainer.device_type}"
        f"{trainer.label}; {tc.batch_size}x{tc.grad_accum} examples/step, max length {tc.seq_len}, "
        f"{tc.max_steps} steps; out {start.out}")
    if trainer.note:
        say(trainer.note)
    run = TrainingRun(trainer, tc, start.out, next_batch, eval_batches, tokens_per_step, stage_state,
                      tokenizer_file, keep_last=start.keep_last, save_every=start.save_every, start=progress,
                      overwrite=overwrite, say=say, verbose=verbose, desc=start.verb, command=f"dsfs {start.verb}",
                      on_step=on_step, extra_eval=extra_eval, plot_keys=plot_keys, perplexity=perplexity)
    return run.run()


TRAIN_OPTIONS = [
    ("max-steps", int, "optimizer steps"), ("batch-size", int, "examples per micro-batch"),
    ("seq-len", int, "maximum sequence length in tokens (longer ones are cut and counted)"),
    ("lr", float, "peak learning rate"), ("min-lr-ratio", float, "final lr / peak lr"),
    ("warmup-steps", int, "linear warmup steps"), ("grad-accum", int, "micro-batches per step"),
    ("eval-every", int, "steps between evaluations"), ("eval-batches", int, "held-out batches per evaluation"),
    ("weight-decay", float, "decoupled decay on matrices"), ("grad-clip", float, "max grad norm (0: off)"),
]


def add_stage_options(p, verb: str, tc: TrainConfig, init_help: str | None = None, mtp: bool = False) -> None:
    """Register the options every post-training verb shares on the subparser ``p``: the start (``--init-from`` /
    ``--resume``), the run directory, backend, seed, checkpoint cadence, tokenizer, and the `TrainConfig` options
    with ``tc``'s values as defaults (``mtp``: also ``--mtp-weight``)."""
    start = p.add_mutually_exclusive_group()
    start.add_argument("--init-from", metavar="DIR", help=init_help or "the model to start from: a model dir (ours, or "
                       "a transformers DeepSeek-V3/V3.2 checkpoint), a run's final/ or checkpoints/step_N, or a run")
    start.add_argument("--resume", nargs="?", const=True, default=False, metavar="PATH",
                       help=f"continue the newest checkpoint of --out, or of PATH, exactly (a dsfs {verb} run)")
    p.add_argument("--out", metavar="DIR", help=f"run directory (default: runs/{verb})")
    p.add_argument("--overwrite", action="store_true", help="start over in an --out that already holds a run")
    p.add_argument("--backend", default="auto", choices=["auto", "reference", "cuda", "mlx"],
                   help="auto: mlx on Apple Silicon, cuda when available, else reference (default: %(default)s)")
    p.add_argument("--seed", type=int, metavar="N", help="data order and sampling (default: 0; on --resume the run's)")
    p.add_argument("--keep-last", type=int, metavar="K", help="checkpoints kept (default: 3; 0: all)")
    p.add_argument("--save-every", type=int, metavar="N", help="checkpoint every N steps (default: --eval-every)")
    p.add_argument("--tokenizer", metavar="PATH", help="tokenizer.json or a directory holding one (default: the "
                   "start model's)")
    g = p.add_argument_group(f"training options (default: dsfs {verb}'s; on --resume the run's)")
    for name, typ, help_ in TRAIN_OPTIONS + ([("mtp-weight", float, "MTP loss weight")] if mtp else []):
        default = getattr(tc, name.replace("-", "_"))
        g.add_argument(f"--{name}", type=typ, metavar="X", help=f"{help_} (default: {default})")
    g.add_argument("--optimizer", choices=["adamw", "muon"], help=f"default: {tc.optimizer}")
    g.add_argument("--time-budget", type=float, metavar="S", help="stop after S seconds of training, checkpoint "
                   "and write final/ (continue with --resume)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")


def stage_kwargs(args, mtp: bool = False) -> dict:
    """The keyword arguments the shared options of `add_stage_options` (and the data options ``--dataset``,
    ``--eval-dataset``, ``--splits``, ``--num-examples``, ``--eval-examples`` where the verb has them) give a stage
    function, values checked (`dsfs.train_config.check_value`, naming the option)."""
    from dsfs.train_config import check_value

    for name in ("num_examples", "eval_examples"):
        v = getattr(args, name, None)
        if v is not None and v < 1:
            raise ConfigError(f"--{name.replace('_', '-')} {v}: expected an integer >= 1")
    data = {k: getattr(args, k) for k in ("dataset", "eval_dataset", "num_examples", "eval_examples")
            if hasattr(args, k)}
    if hasattr(args, "splits"):
        data["splits"] = args.splits.split(",") if args.splits is not None else None
    fields = [n.replace("-", "_") for n, _, _ in TRAIN_OPTIONS] + ["optimizer"] + (["mtp_weight"] if mtp else [])
    kw = {f: getattr(args, f) for f in fields}
    kw["time_budget_s"] = args.time_budget
    for f, v in kw.items():
        if v is not None:
            check_value(f, v, cli=True)
    return {**kw, "out_dir": args.out, "resume": args.resume, "overwrite": args.overwrite, "backend": args.backend,
            "seed": args.seed, "keep_last": args.keep_last, "save_every": args.save_every,
            "tokenizer": args.tokenizer, "verbose": not args.quiet, **data}


def print_summary(s: dict, extra: list[str] = ()) -> None:
    """The lines a post-training verb prints at the end of a run."""
    note = " (stopped by the time budget; continue with --resume)" if s["stopped"] == "time_budget" else ""
    print(f"steps {s['steps']}{note}, {s['tokens']:,} tokens, {s['tokens_per_s']:,.0f} tokens/s, "
          f"{s['elapsed_s']:.1f} s, backend {s['backend']} on {s['device']}")
    if s["val_loss"] is not None:
        print(f"val loss {s['val_loss']:.4f}")
    for line in extra:
        print(line)
    print(f"final model: {s['final_dir']}\ncheckpoint: {s['checkpoint']}\nmetrics: {s['metrics']}\nplot: {s['plot']}")
