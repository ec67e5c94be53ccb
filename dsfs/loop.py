"""The one training loop, for every backend and every stage: `TrainingRun` drives a `dsfs.trainer.Trainer` through
``TrainConfig.max_steps`` optimizer steps and writes the run directory.

Writes into the run directory ``out``, which it holds for the whole session (`dsfs.rundir.lock_run_dir`: a second
process that tries to write it gets an error naming this one's pid)::

    .lock                   the lock file, holding the pid of the last process that held the directory
    metrics.jsonl           one JSON object per optimizer step (step, the trainer's averaged micro-step metrics,
                            lr, the optimizer step's metrics, tokens, tokens_per_s, elapsed_s) and per evaluation
                            (step, val_loss, val_ppl); a fresh run evaluates once at step 0
    loss.png                train and validation loss against step (redrawn at each evaluation)
    checkpoints/step_N/     Hugging Face model directory + trainer_state.pt (see dsfs.checkpointing)
    final/                  the final model (Hugging Face directory, tokenizer.json included)

A checkpoint's ``trainer_state.pt`` holds the counters (``step``, ``tokens``, ``elapsed_s``), the optimizer state,
the torch RNG states and the training config, plus what the stage adds (its data order, where its data came
from); the learning rate is a function of the step (`lr_at`), so a stopped run (Ctrl-C, ``time_budget_s``) that
resumes gives the same losses, bit for bit on CPU, as an uninterrupted one.

Ctrl-C (SIGINT) and SIGTERM (``timeout``, ``docker stop``, Slurm preemption) stop a run the same way: the step
finishes, a checkpoint is saved, one line says how to resume, and `Interrupted` (a KeyboardInterrupt carrying the
signal number; the CLI exits with 128 + it) is raised. A second signal raises `Interrupted` at once.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from dsfs.checkpointing import (
    CHECKPOINTS,
    FINAL,
    latest_checkpoint,
    list_checkpoints,
    save_checkpoint,
    save_model_dir,
    step_dir_name,
)
from dsfs.errors import DataError, TrainError
from dsfs.evaluation import Batch, evaluate
from dsfs.rundir import check_run_dir_free, lock_run_dir
from dsfs.train_config import TrainConfig
from dsfs.trainer import Trainer
from reference.checkpoint import remove_dir

METRICS = "metrics.jsonl"
PLOT = "loss.png"


def lr_at(step: int, lr: float, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup ``lr * (step + 1) / warmup_steps``,
    then cosine decay from ``lr`` to ``min_lr_ratio * lr`` at ``max_steps``."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    lo = min_lr_ratio * lr
    return lo + (lr - lo) * 0.5 * (1.0 + math.cos(math.pi * progress))


class LocalCheckpoints:
    """How a one-process run saves (`dsfs.checkpointing.save_checkpoint`: the Hugging Face model directory plus
    ``trainer_state.pt``; ``final/`` through ``save_pretrained``) and agrees with itself. A multi-process run uses
    `dsfs.parallel.trainer.ShardedCheckpoints` instead: ``main`` is rank 0 (the one that writes the run directory's
    files and prints), ``agree`` reduces a flag over every rank, so all stop at the same step."""

    main = True

    def save(self, trainer, state: dict, ckpt_dir: Path, step: int, tokenizer_file, keep_last: int) -> Path:
        return save_checkpoint(trainer.model, state, ckpt_dir, step, tokenizer_file, keep_last)

    def save_final(self, trainer, path: Path, tokenizer_file) -> Path:
        return save_model_dir(trainer.model, path, tokenizer_file)

    def agree(self, value: int) -> int:
        """The largest ``value`` over the processes of the run (here: ``value``)."""
        return value


@dataclass
class Progress:
    """Where a run stands: optimizer ``step``s done, ``tokens`` trained on, ``elapsed_s`` wall-clock seconds over
    all its sessions. A fresh run starts at zeros; a resumed one at its checkpoint's values."""

    step: int = 0
    tokens: int = 0
    elapsed_s: float = 0.0


class TrainingRun:
    """One session of a training run in the run directory ``out`` (module docstring).

    ``trainer``: a `Trainer`; ``tc``: its `TrainConfig` (schedule, accumulation, cadence, time budget);
    ``next_batch()``: the next micro-batch for ``trainer.micro_step``; ``eval_batches``: the fixed validation
    batches for ``trainer.eval_loss``; ``tokens_per_step``: tokens one optimizer step trains on (for the records),
    or a callable giving the tokens of the step just taken (post-training batches vary in length);
    ``stage_state()``: what the stage adds to each checkpoint's trainer state (its data generator state and
    provenance; called at each save); ``tokenizer_file``: copied into every checkpoint and ``final/``;
    ``keep_last``: checkpoints kept (0: all); ``save_every``: steps between checkpoints (``None``:
    ``tc.eval_every``); ``start``: the resumed checkpoint's `Progress` (``None``: a fresh run, which evaluates at
    step 0); ``overwrite``: a fresh run deletes the outputs of a run already in ``out`` (without it, it refuses
    such a directory); ``say``: prints one progress line; ``verbose``: the progress bar (titled ``desc``);
    ``command``: the verb that resumes the run, for the messages; ``on_step``: called with each step's record (tests);
    ``extra_eval()``: more metrics for each evaluation record (a stage's held-out accuracy); ``plot_keys``: metrics
    of the records drawn in a second panel of the plot; ``perplexity``: log ``val_ppl`` (the validation loss is a
    cross-entropy; a DPO loss is not); ``checkpoints``: how checkpoints are written and stops agreed
    (`LocalCheckpoints`; a multi-process run's: every rank runs the loop, only its ``main`` rank holds the run
    directory and writes metrics, plot and messages).
    """

    def __init__(self, trainer: Trainer, tc: TrainConfig, out: str | os.PathLike, next_batch: Callable[[], Batch],
                 eval_batches: list[Batch], tokens_per_step: int | Callable[[], int],
                 stage_state: Callable[[], dict],
                 tokenizer_file: str | os.PathLike | None, *, keep_last: int = 3, save_every: int | None = None,
                 start: Progress | None = None, overwrite: bool = False,
                 say: Callable[[str], None] = lambda msg: None, verbose: bool = True,
                 desc: str = "train", command: str = "dsfs train", on_step: Callable[[dict], None] | None = None,
                 extra_eval: Callable[[], dict] | None = None, plot_keys: tuple[str, ...] | list[str] = (),
                 perplexity: bool = True, checkpoints=None):
        self.trainer, self.tc, self.out = trainer, tc, Path(out)
        self.next_batch, self.eval_batches, self.tokens_per_step = next_batch, eval_batches, tokens_per_step
        self.stage_state, self.tokenizer_file = stage_state, tokenizer_file
        self.keep_last, self.save_every = keep_last, save_every or tc.eval_every
        self.resumed, self.overwrite = start is not None, overwrite
        self.progress = start or Progress()
        self.start_step = self.progress.step
        self.say, self.verbose, self.desc, self.command, self.on_step = say, verbose, desc, command, on_step
        self.extra_eval, self.plot_keys, self.perplexity = extra_eval, tuple(plot_keys), perplexity
        self.checkpoints = checkpoints or LocalCheckpoints()
        self.main = self.checkpoints.main
        if not self.main:
            self.say, self.verbose = (lambda msg: None), False
        self.ckpt_dir, self.metrics_path, self.plot_path = self.out / CHECKPOINTS, self.out / METRICS, self.out / PLOT
        self.records: list[dict] = []
        self.train_time = 0.0  # this session, optimizer steps only
        self.tokens_trained = 0  # this session
        self.session_start = time.perf_counter()

    def elapsed(self) -> float:
        """Wall-clock seconds of the run: earlier sessions plus this one so far."""
        return self.progress.elapsed_s + time.perf_counter() - self.session_start

    def log(self, rec: dict) -> None:
        """Append ``rec`` to the records and to metrics.jsonl (flushed)."""
        self.records.append(rec)
        self._metrics_file.write(json.dumps(rec) + "\n")
        self._metrics_file.flush()

    def evaluate(self) -> float | None:
        """Validation loss over ``eval_batches`` (`dsfs.evaluation.evaluate` with the trainer's ``eval_loss``),
        logged with its perplexity and ``extra_eval()``; the plot is redrawn and one line said. Without
        ``eval_batches`` (a stage whose data holds no reference completions) only ``extra_eval()`` is logged, and the
        loss is ``None``."""
        v = evaluate(self.trainer.model, self.eval_batches, self.trainer.eval_loss) if self.eval_batches else None
        extra = self.extra_eval() if self.extra_eval is not None else {}
        ppl = {"val_ppl": math.exp(min(v, 700.0))} if self.perplexity and v is not None else {}
        loss = {"val_loss": v} if v is not None else {}
        self.log({"step": self.progress.step, **loss, **ppl, **extra})
        self.plot()
        shown = [f"val loss {v:.4f}" + (f" (ppl {ppl['val_ppl']:.1f})" if ppl else "")] if v is not None else []
        shown += [f"{k} {x:.3f}" for k, x in extra.items() if k in ("val_accuracy", "val_format")]
        self.say(f"step {self.progress.step}: {', '.join(shown) or 'evaluated'}")
        return v

    def save(self) -> Path:
        """Write the checkpoint of the current step (`dsfs.checkpointing.save_checkpoint`); return its directory."""
        p = self.progress
        state = {
            "step": p.step, "tokens": p.tokens, "elapsed_s": self.elapsed(),
            "optimizer": self.trainer.state_dict(), "scheduler": {"step": p.step},
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "train_config": self.tc.to_dict(), **self.stage_state(),
        }
        return self.checkpoints.save(self.trainer, state, self.ckpt_dir, p.step, self.tokenizer_file, self.keep_last)

    def plot(self) -> None:
        """Redraw loss.png (the main process only)."""
        if self.main:
            plot_losses(self.records, self.plot_path, self.plot_keys)

    def step(self) -> dict:
        """One optimizer step: ``grad_accum`` micro-steps, whose metrics are averaged (a metric that is ``None`` in
        the last micro-step stays ``None``), then the optimizer step at the scheduled learning rate. Logs and
        returns the record. Raises `TrainError` when the loss is not finite."""
        tc, p = self.tc, self.progress
        t0 = time.perf_counter()
        lr = lr_at(p.step, tc.lr, tc.warmup_steps, tc.max_steps, tc.min_lr_ratio)
        if hasattr(self.trainer, "begin_step"):  # a trainer whose step depends on its index (indexer warm-up)
            self.trainer.begin_step(p.step)
        sums: dict[str, float] = {}
        for _ in range(tc.grad_accum):
            o = self.trainer.micro_step(self.next_batch(), tc.grad_accum)
            for k, v in o.items():
                sums[k] = sums.get(k, 0.0) + (v if v is not None else 0.0)
        means = {k: sums[k] / tc.grad_accum if o[k] is not None else None for k in o}
        loss = means["loss"]
        if not math.isfinite(loss):
            raise TrainError(f"loss is {loss} at step {p.step + 1} (lr {lr:.3g}); try a lower --lr or --grad-clip, "
                             f"or resume from an earlier checkpoint in {self.ckpt_dir}")
        opt_metrics = self.trainer.optimizer_step(lr)
        p.step += 1
        n = self.tokens_per_step() if callable(self.tokens_per_step) else self.tokens_per_step
        p.tokens += n
        self.tokens_trained += n
        dt = time.perf_counter() - t0
        self.train_time += dt
        rec = {"step": p.step, **means, "lr": lr, **opt_metrics, "tokens": p.tokens,
               "tokens_per_s": n / dt, "elapsed_s": self.elapsed()}
        self.log(rec)
        return rec

    def run(self) -> dict:
        """Train to ``tc.max_steps``: evaluate at step 0 of a fresh run, every ``eval_every`` steps and at the end;
        checkpoint every ``save_every`` steps, at the end, on Ctrl-C or SIGTERM and when the time budget stops the
        session; write ``final/``. The first Ctrl-C or SIGTERM finishes the step, saves, prints how to resume and
        raises `Interrupted`.

        Holds ``out`` (`dsfs.rundir.lock_run_dir`) from before it changes anything there until the end: raises
        `dsfs.rundir.RunDirBusy` when another process holds it, `DataError` when a fresh run finds a run there
        and not ``overwrite`` (see `check_out`).

        Returns ``{"val_loss", "val_ppl", "steps", "tokens", "tokens_per_s", "elapsed_s", "stopped", "device",
        **trainer.summary, "out_dir", "final_dir", "checkpoint", "metrics", "plot"}``; ``stopped`` is
        ``"max_steps"`` or ``"time_budget"``; tokens/s over this session's optimizer steps only."""
        if not self.main:  # the main process holds and prepares the run directory; the others only train
            self.checkpoints.agree(0)  # wait for it
            return self._train()
        with lock_run_dir(self.out):
            self._claim_out()
            self.checkpoints.agree(0)
            return self._train()

    def _claim_out(self) -> None:
        """Under the lock: refuse or clear a run already in ``out`` (a fresh run), drop leftover temporary metrics
        and plot files, and start metrics.jsonl (a resumed run keeps its records up to its step)."""
        out = self.out
        _check_fresh(out, not self.resumed, self.overwrite)
        if not self.resumed:
            clear_run(out)
        for tmp in [*out.glob(f".{METRICS}*.tmp"), *out.glob(f".{Path(PLOT).stem}*.tmp.png")]:
            tmp.unlink(missing_ok=True)
        self.records = _read_metrics(self.metrics_path, self.progress.step) if self.resumed else []
        _write_metrics(self.metrics_path, self.records)

    def _train(self) -> dict:
        """The loop of `run`, under the lock."""
        tc, p, out = self.tc, self.progress, self.out
        val_loss, last_eval, last_saved = None, -1, p.step if self.resumed else -1
        stopped = "max_steps"
        metrics = self.metrics_path if self.main else os.devnull
        with open(metrics, "a") as self._metrics_file, _StopSignals(self.say) as stop:
            if not self.resumed:
                val_loss, last_eval = self.evaluate(), p.step
            with tqdm(total=tc.max_steps, initial=p.step, unit="step", file=sys.stderr, disable=not self.verbose,
                      dynamic_ncols=True, desc=self.desc) as bar:
                while p.step < tc.max_steps:
                    rec = self.step()
                    bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tokens_per_s']:,.0f}",
                                    lr=f"{rec['lr']:.2e}", refresh=False)
                    bar.update(1)
                    if self.on_step is not None:
                        self.on_step(rec)
                    if p.step % tc.eval_every == 0 or p.step == tc.max_steps:
                        val_loss, last_eval = self.evaluate(), p.step
                    if p.step % self.save_every == 0 and p.step < tc.max_steps:
                        self.save()
                        last_saved = p.step
                    signum = self.checkpoints.agree(stop.signum or 0)  # every process stops at the same step
                    if signum:
                        self._stop_interrupted(last_saved, signum)
                    budget = tc.time_budget_s
                    over = budget is not None and time.perf_counter() - self.session_start >= budget
                    if self.checkpoints.agree(int(over)) and p.step < tc.max_steps:
                        stopped = "time_budget"
                        self.say(f"time budget of {budget:g} s reached at step {p.step}/{tc.max_steps}; stopping "
                                 f"(continue with {self.command} --resume --out {out})")
                        break
            if last_eval != p.step:
                val_loss = self.evaluate()
            if last_saved != p.step:
                self.save()
            self.checkpoints.save_final(self.trainer, out / FINAL, self.tokenizer_file)
        self.plot()
        return {
            "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 700.0)) if val_loss is not None else None,
            "steps": p.step, "tokens": p.tokens,
            "tokens_per_s": self.tokens_trained / max(self.train_time, 1e-9),
            "elapsed_s": self.elapsed(), "stopped": stopped, "device": self.trainer.device_type,
            **self.trainer.summary, "out_dir": str(out), "final_dir": str(out / FINAL),
            "checkpoint": str(latest_checkpoint(out)), "metrics": str(self.metrics_path), "plot": str(self.plot_path),
        }

    def _stop_interrupted(self, last_saved: int, signum: int) -> None:
        step = self.progress.step
        if last_saved != step:
            self.save()
        self.plot()
        what = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
        if self.main:
            print(f"{what} at step {step}: checkpoint saved in {self.ckpt_dir / step_dir_name(step)}; "
                  f"continue with {self.command} --resume --out {self.out}", file=sys.stderr)
        raise Interrupted(signum)


# ---------------------------------------------------------------- the run directory


def _trained_steps(path: Path) -> bool:
    """Whether a metrics.jsonl holds a training step's record (not only the step-0 evaluation of a run that stopped
    before its first step)."""
    if not path.is_file():
        return False
    with open(path) as f:
        return any('"loss"' in line for line in f)


def _holds_run(out: Path) -> bool:
    return bool(list_checkpoints(out / CHECKPOINTS)) or (out / FINAL).exists() or _trained_steps(out / METRICS)


def _check_fresh(out: Path, fresh: bool, overwrite: bool) -> None:
    if fresh and not overwrite and _holds_run(out):
        if not list_checkpoints(out / CHECKPOINTS) and not (out / FINAL).exists():
            raise DataError(f"{out} holds the metrics of a run that stopped before its first checkpoint (nothing to "
                            "resume); pass --overwrite to start over, or choose another --out")
        raise DataError(f"{out} already holds a run; pass --resume to continue it, --overwrite to start over, "
                        "or choose another --out")


def check_out(out: str | os.PathLike, fresh: bool, overwrite: bool) -> None:
    """Raise `dsfs.rundir.RunDirBusy` when another process holds the run directory ``out``, and, for a ``fresh``
    run, `DataError` when ``out`` already holds a run (checkpoints, final/, or the metrics of trained steps) and not
    ``overwrite``. Reads only: a verb calls it before its slow work, and `TrainingRun.run` checks again under the
    lock before it changes anything."""
    check_run_dir_free(out)
    _check_fresh(Path(out), fresh, overwrite)


def clear_run(out: str | os.PathLike) -> None:
    """Delete the outputs of a run in ``out`` (checkpoints, final/, metrics.jsonl, loss.png); the caller holds
    ``out`` (`dsfs.rundir.lock_run_dir`)."""
    out = Path(out)
    for p in (out / CHECKPOINTS, out / FINAL):
        if p.is_dir():
            remove_dir(p)  # renamed aside first: a kill midway leaves a hidden .old-* directory, never a partial one
    for p in (out / METRICS, out / PLOT):
        p.unlink(missing_ok=True)


# ---------------------------------------------------------------- metrics and plot


def _read_metrics(path: Path, upto: int) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            rec = json.loads(line)
            if isinstance(rec, dict) and rec.get("step", upto + 1) <= upto:
                out.append(rec)
    return out


def _write_metrics(path: Path, records: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, path)


def plot_losses(records: list[dict], path: str | os.PathLike, extra: tuple[str, ...] = ()) -> None:
    """Draw train loss (total and main-model CE) and validation loss against step from metrics records into
    a PNG (matplotlib Agg, written to a temporary file named with the pid, then renamed). ``extra``: metric names
    (``"rewards/margins"``, ``"val_accuracy"``, ...) drawn against step in a second panel, where records hold
    them."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    train = [(r["step"], r["loss"], r.get("lm_loss", r["loss"])) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    extra = [k for k in extra if any(r.get(k) is not None for r in records)]
    fig = Figure(figsize=(7, 7.5 if extra else 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(2, 1, 1) if extra else fig.add_subplot()
    if train:
        steps, loss, lm = zip(*train, strict=True)
        if any("lm_loss" in r for r in records):
            ax.plot(steps, loss, lw=1, alpha=0.4, label="train loss (LM + MTP + aux)")
            ax.plot(steps, lm, lw=1, label="train LM loss (main model CE)")
        else:  # a stage's own loss (DPO, GRPO, distillation)
            ax.plot(steps, loss, lw=1, label="train loss")
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="val loss (main model CE)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    if train or val:
        ax.legend()
    if extra:
        ax2 = fig.add_subplot(2, 1, 2)
        for k in extra:
            pts = [(r["step"], r[k]) for r in records if r.get(k) is not None]
            ax2.plot(*zip(*pts, strict=True), "o-" if len(pts) < 60 else "-", ms=3, lw=1, label=k)
        ax2.set_xlabel("step")
        ax2.grid(alpha=0.3)
        ax2.legend()
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, path)


class Interrupted(KeyboardInterrupt):
    """A run stopped by the signal ``signum`` (SIGINT: Ctrl-C, or SIGTERM); the CLI exits with ``128 + signum``."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)


class _StopSignals:
    """While active, the first Ctrl-C (SIGINT) or SIGTERM sets ``signum`` (the loop finishes its step, saves and
    stops); a second one, `REPEAT_S` or more later, raises `Interrupted` at once (``timeout -s INT`` around ``uv
    run`` delivers one SIGINT twice within milliseconds: that stays one). Only in the main thread; elsewhere the
    signals behave as usual."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)
    REPEAT_S = 0.5  # a second signal within this many seconds of the first is the same one, delivered twice

    def __init__(self, say):
        self.signum, self.say, self.old, self.first_at = None, say, {}, 0.0

    def _handler(self, signum, frame):
        if self.signum is not None:
            if time.monotonic() - self.first_at < self.REPEAT_S:
                return  # the same keypress or kill delivered twice (a launcher forwarding it to its child as well)
            raise Interrupted(signum)
        self.signum, self.first_at = signum, time.monotonic()
        if signum == signal.SIGINT:
            self.say("Ctrl-C: finishing this step, then saving a checkpoint (Ctrl-C again to quit without saving)")
        else:
            self.say(f"{signal.Signals(signum).name}: finishing this step, then saving a checkpoint (send it again "
                     "to quit without saving)")

    def __enter__(self):
        with contextlib.suppress(ValueError):  # not the main thread
            for sig in self.SIGNALS:
                self.old[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        for sig, old in self.old.items():
            signal.signal(sig, old)
