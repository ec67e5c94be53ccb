"""The one training loop, for every backend and every stage: `TrainingRun` drives a `dsfs.trainer.Trainer` through
``TrainConfig.max_steps`` optimizer steps and writes the run directory.

Writes into the run directory ``out``::

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

from dsfs.checkpointing import CHECKPOINTS, FINAL, latest_checkpoint, save_checkpoint, step_dir_name
from dsfs.errors import TrainError
from dsfs.evaluation import Batch, evaluate
from dsfs.train_config import TrainConfig
from dsfs.trainer import Trainer

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
    batches for ``trainer.eval_loss``; ``tokens_per_step``: tokens one optimizer step trains on (for the records);
    ``stage_state()``: what the stage adds to each checkpoint's trainer state (its data generator state and
    provenance; called at each save); ``tokenizer_file``: copied into every checkpoint and ``final/``;
    ``keep_last``: checkpoints kept (0: all); ``save_every``: steps between checkpoints (``None``:
    ``tc.eval_every``); ``start``: the resumed checkpoint's `Progress` (``None``: a fresh run, which evaluates at
    step 0); ``say``: prints one progress line; ``verbose``: the progress bar (titled ``desc``); ``command``: the
    verb that resumes the run, for the messages; ``on_step``: called with each step's record (tests).
    """

    def __init__(self, trainer: Trainer, tc: TrainConfig, out: str | os.PathLike, next_batch: Callable[[], Batch],
                 eval_batches: list[Batch], tokens_per_step: int, stage_state: Callable[[], dict],
                 tokenizer_file: str | os.PathLike | None, *, keep_last: int = 3, save_every: int | None = None,
                 start: Progress | None = None, say: Callable[[str], None] = lambda msg: None, verbose: bool = True,
                 desc: str = "train", command: str = "dsfs train", on_step: Callable[[dict], None] | None = None):
        self.trainer, self.tc, self.out = trainer, tc, Path(out)
        self.next_batch, self.eval_batches, self.tokens_per_step = next_batch, eval_batches, tokens_per_step
        self.stage_state, self.tokenizer_file = stage_state, tokenizer_file
        self.keep_last, self.save_every = keep_last, save_every or tc.eval_every
        self.resumed = start is not None
        self.progress = start or Progress()
        self.start_step = self.progress.step
        self.say, self.verbose, self.desc, self.command, self.on_step = say, verbose, desc, command, on_step
        self.ckpt_dir, self.metrics_path, self.plot_path = self.out / CHECKPOINTS, self.out / METRICS, self.out / PLOT
        self.records: list[dict] = []
        self.train_time = 0.0  # this session, optimizer steps only
        self.session_start = time.perf_counter()

    def elapsed(self) -> float:
        """Wall-clock seconds of the run: earlier sessions plus this one so far."""
        return self.progress.elapsed_s + time.perf_counter() - self.session_start

    def log(self, rec: dict) -> None:
        """Append ``rec`` to the records and to metrics.jsonl (flushed)."""
        self.records.append(rec)
        self._metrics_file.write(json.dumps(rec) + "\n")
        self._metrics_file.flush()

    def evaluate(self) -> float:
        """Validation loss over ``eval_batches`` (`dsfs.evaluation.evaluate` with the trainer's ``eval_loss``),
        logged with its perplexity; the plot is redrawn."""
        v = evaluate(self.trainer.model, self.eval_batches, self.trainer.eval_loss)
        self.log({"step": self.progress.step, "val_loss": v, "val_ppl": math.exp(min(v, 700.0))})
        plot_losses(self.records, self.plot_path)
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
        return save_checkpoint(self.trainer.model, state, self.ckpt_dir, p.step, self.tokenizer_file, self.keep_last)

    def step(self) -> dict:
        """One optimizer step: ``grad_accum`` micro-steps, whose metrics are averaged (a metric that is ``None`` in
        the last micro-step stays ``None``), then the optimizer step at the scheduled learning rate. Logs and
        returns the record. Raises `TrainError` when the loss is not finite."""
        tc, p = self.tc, self.progress
        t0 = time.perf_counter()
        lr = lr_at(p.step, tc.lr, tc.warmup_steps, tc.max_steps, tc.min_lr_ratio)
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
        p.tokens += self.tokens_per_step
        dt = time.perf_counter() - t0
        self.train_time += dt
        rec = {"step": p.step, **means, "lr": lr, **opt_metrics, "tokens": p.tokens,
               "tokens_per_s": self.tokens_per_step / dt, "elapsed_s": self.elapsed()}
        self.log(rec)
        return rec

    def run(self) -> dict:
        """Train to ``tc.max_steps``: evaluate at step 0 of a fresh run, every ``eval_every`` steps and at the end;
        checkpoint every ``save_every`` steps, at the end, on Ctrl-C and when the time budget stops the session;
        write ``final/``. The first Ctrl-C finishes the step, saves, prints where and raises KeyboardInterrupt.

        Returns ``{"val_loss", "val_ppl", "steps", "tokens", "tokens_per_s", "elapsed_s", "stopped", "device",
        **trainer.summary, "out_dir", "final_dir", "checkpoint", "metrics", "plot"}``; ``stopped`` is
        ``"max_steps"`` or ``"time_budget"``; tokens/s over this session's optimizer steps only."""
        tc, p, out = self.tc, self.progress, self.out
        out.mkdir(parents=True, exist_ok=True)
        self.records = _read_metrics(self.metrics_path, p.step) if self.resumed else []
        _write_metrics(self.metrics_path, self.records)
        val_loss, last_eval, last_saved = None, -1, p.step if self.resumed else -1
        stopped = "max_steps"
        with open(self.metrics_path, "a") as self._metrics_file, _SigintFlag(self.say) as sigint:
            if not self.resumed:
                val_loss, last_eval = self.evaluate(), p.step
                self.say(f"step {p.step}: val loss {val_loss:.4f}")
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
                        self.say(f"step {p.step}: val loss {val_loss:.4f} "
                                 f"(ppl {math.exp(min(val_loss, 700.0)):.1f})")
                    if p.step % self.save_every == 0 and p.step < tc.max_steps:
                        self.save()
                        last_saved = p.step
                    if sigint.hit:
                        self._stop_interrupted(last_saved)
                    budget = tc.time_budget_s
                    if budget is not None and time.perf_counter() - self.session_start >= budget \
                            and p.step < tc.max_steps:
                        stopped = "time_budget"
                        self.say(f"time budget of {budget:g} s reached at step {p.step}/{tc.max_steps}; stopping "
                                 f"(continue with {self.command} --resume --out {out})")
                        break
            if last_eval != p.step:
                val_loss = self.evaluate()
            if last_saved != p.step:
                self.save()
            self.trainer.model.save_pretrained(out / FINAL, tokenizer_file=self.tokenizer_file)
        plot_losses(self.records, self.plot_path)
        return {
            "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 700.0)), "steps": p.step, "tokens": p.tokens,
            "tokens_per_s": (p.step - self.start_step) * self.tokens_per_step / max(self.train_time, 1e-9),
            "elapsed_s": self.elapsed(), "stopped": stopped, "device": self.trainer.device_type,
            **self.trainer.summary, "out_dir": str(out), "final_dir": str(out / FINAL),
            "checkpoint": str(latest_checkpoint(out)), "metrics": str(self.metrics_path), "plot": str(self.plot_path),
        }

    def _stop_interrupted(self, last_saved: int) -> None:
        step = self.progress.step
        if last_saved != step:
            self.save()
        plot_losses(self.records, self.plot_path)
        print(f"interrupted at step {step}: checkpoint saved in {self.ckpt_dir / step_dir_name(step)}; "
              f"continue with {self.command} --resume --out {self.out}", file=sys.stderr)
        raise KeyboardInterrupt


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
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, path)


def plot_losses(records: list[dict], path: str | os.PathLike) -> None:
    """Draw train loss (total and main-model CE) and validation loss against step from metrics records into
    a PNG (matplotlib Agg, written to a temporary file and renamed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    train = [(r["step"], r["loss"], r.get("lm_loss", r["loss"])) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if train:
        steps, loss, lm = zip(*train, strict=True)
        ax.plot(steps, loss, lw=1, alpha=0.4, label="train loss (LM + MTP + aux)")
        ax.plot(steps, lm, lw=1, label="train LM loss (main model CE)")
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="val loss (main model CE)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, path)


class _SigintFlag:
    """While active, the first Ctrl-C sets ``hit`` (the loop finishes its step, saves and stops); a second one
    raises KeyboardInterrupt at once. Only in the main thread; elsewhere Ctrl-C behaves as usual."""

    def __init__(self, say):
        self.hit, self.say, self.old = False, say, None

    def _handler(self, signum, frame):
        if self.hit:
            raise KeyboardInterrupt
        self.hit = True
        self.say("Ctrl-C: finishing this step, then saving a checkpoint (Ctrl-C again to quit without saving)")

    def __enter__(self):
        with contextlib.suppress(ValueError):  # not the main thread
            self.old = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        if self.old is not None:
            signal.signal(signal.SIGINT, self.old)
