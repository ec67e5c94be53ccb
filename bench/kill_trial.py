"""The ``kill -9`` trial of issue 13: a run that checkpoints every step, killed at random moments, must always leave
directories that are complete and loadable, or hidden leftovers that readers ignore and the next start deletes,
and ``--resume`` must continue each time until the run reaches its last step.

Each round starts ``dsfs train`` (``--resume`` when a checkpoint exists, else a fresh ``--overwrite`` run) on a
micro model (the ``tiny`` preset shrunk to hidden 32, 2 layers: `MICRO_MODEL`) with ``--compile off --save-every 1
--keep-last 2``, and sends SIGKILL at a seeded random moment: most rounds a uniform time into training (after the
process holds the run directory and has rewritten metrics.jsonl), every fifth round a uniform time into start-up
(imports, loading, the clean-up). After each kill `check_run_dir` looks at everything left:

- every ``checkpoints/step_*`` and ``final/`` must be complete (`dsfs.checkpointing.checkpoint_problem`) and load:
  ``reference.Model.from_pretrained`` (checksums and finiteness verified) and, for steps, the trainer state, whose
  step must match the directory's name;
- hidden ``.tmp-*`` / ``.old-*`` entries are leftovers: no reader may return them, and they must be gone once the
  next session holds the run directory (checked at the next kill that came after it was ready);
- anything else is a failure.

After the kills one last session runs to the end: it must exit 0 with the newest checkpoint and final/ at
``--max-steps``. Prints the figures (kills, checkpoints left, loadable, leftovers ignored/cleaned, resumes OK) and
exits 1 on any failure::

    uv run python -m bench.kill_trial --kills 30            # seed 0; --workdir DIR keeps the run for a look
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

MICRO_MODEL = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, moe_intermediate_size=32,
    n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, n_group=1, topk_group=1,
    first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
    v_head_dim=8, num_nextn_predict_layers=1, max_position_embeddings=64,
)
RUN_FLAGS = ["--compile", "off", "--save-every", "1", "--keep-last", "2", "--threads", "1", "-q"]
TRAIN_FLAGS = ["--batch-size", "2", "--seq-len", "32", "--lr", "3e-3", "--warmup-steps", "2", "--eval-batches", "1",
               "--backend", "reference", *RUN_FLAGS]
# `dsfs train` with the tiny preset shrunk to MICRO_MODEL (argv: the overrides as JSON, then dsfs's arguments)
CLI_SCRIPT = """\
import json, sys
from dsfs import presets
presets.MODEL_PRESETS["tiny"] = {**presets.MODEL_PRESETS["tiny"], **json.loads(sys.argv[1])}
from dsfs.cli import main
sys.exit(main(sys.argv[2:]))
"""


def make_data(root: Path) -> Path:
    """A prepared data directory (vocabulary 384) of seeded synthetic stories under ``root``."""
    from dsfs import data

    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    words = "the a cat dog sun ran saw big little happy sad tree ball mom said played went home".split()
    text = "\n<|endoftext|>\n".join(" ".join(rng.choices(words, k=rng.randint(20, 200))) + "." for _ in range(150))
    (root / "stories.txt").write_text(text, encoding="utf-8")
    return data.prepare(root / "stories.txt", root / "data", vocab_size=384, val_fraction=0.1, verbose=False)


@dataclass
class Figures:
    """What the trial counted; ``failures`` lists what went wrong, one line each."""

    kills: int = 0
    checkpoints_left: int = 0  # step_* directories found after the kills, summed over kills
    loadable: int = 0  # of those (and final/), the ones that loaded
    leftovers: int = 0  # hidden .tmp-* / .old-* entries found after the kills
    cleaned: int = 0  # of those, the ones gone once the next session held the run directory
    resumes_ok: int = 0  # --resume sessions that did not fail before their kill (or the end)
    resumes: int = 0
    final_step: int | None = None
    failures: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (f"kills {self.kills} / checkpoints left {self.checkpoints_left} / loadable {self.loadable} / "
                f"leftovers ignored {self.leftovers}, cleaned {self.cleaned} / resumes OK {self.resumes_ok} of "
                f"{self.resumes} / final step {self.final_step} / failures {len(self.failures)}")


def check_run_dir(out: Path, figures: Figures) -> set[Path]:
    """Look at every entry of the run directory ``out`` and its ``checkpoints/`` (see the module docstring), count
    into ``figures`` and append failures; return the hidden leftovers found."""
    import torch

    from dsfs.checkpointing import (
        CHECKPOINTS,
        FINAL,
        HIDDEN,
        checkpoint_problem,
        latest_checkpoint,
        list_checkpoints,
        load_trainer_state,
        model_dir_problem,
        resolve_model_dir,
    )
    from reference import Model

    torch.set_num_threads(1)
    leftovers, ckpt_dir = set(), out / CHECKPOINTS
    expected = {".lock", "metrics.jsonl", "loss.png", CHECKPOINTS, FINAL}
    for d, names in ((out, expected), (ckpt_dir, set())):
        if not d.is_dir():
            continue
        for p in sorted(d.iterdir()):
            if p.name.startswith(HIDDEN) or (d == out and p.name.startswith((".metrics", ".loss"))):
                leftovers.add(p)
            elif d == ckpt_dir or p.name == FINAL:
                problem = checkpoint_problem(p) if d == ckpt_dir else model_dir_problem(p)
                figures.checkpoints_left += d == ckpt_dir
                if problem is not None:
                    figures.failures.append(f"{p}: visible but {problem}")
                    continue
                try:
                    Model.from_pretrained(p)
                    if d == ckpt_dir:
                        step = load_trainer_state(p)["step"]
                        if p.name != f"step_{step:06d}":
                            raise ValueError(f"trainer state says step {step}")
                    figures.loadable += 1
                except Exception as e:  # noqa: BLE001 - every way of failing to load is a finding
                    figures.failures.append(f"{p}: does not load: {type(e).__name__}: {str(e).splitlines()[0]}")
            elif p.name not in names:
                figures.failures.append(f"{p}: unexpected entry")
    readers = {*(list_checkpoints(ckpt_dir)), latest_checkpoint(out)}
    if (out / FINAL).exists() or list_checkpoints(ckpt_dir):
        readers.add(resolve_model_dir(out))
    for p in readers & leftovers:
        figures.failures.append(f"{p}: a leftover that a reader returned")
    figures.leftovers += len(leftovers)
    return leftovers


def _start(out: Path, data_dir: Path, max_steps: int, fresh: bool = False) -> tuple[subprocess.Popen, bool]:
    """Start one session: ``--resume`` when ``out`` holds a complete checkpoint before ``max_steps`` (and not
    ``fresh``), else a fresh ``--overwrite`` run. Returns the process and whether it resumes."""
    resume = not fresh and 0 < _newest_step(out) < max_steps
    how = ["--resume"] if resume else ["--overwrite", "--max-steps", str(max_steps), "--eval-every",
                                       str(max_steps), *TRAIN_FLAGS]
    argv = ["train", "--out", str(out), "--data", str(data_dir), *how]
    if resume:
        argv += [*RUN_FLAGS]  # run options: a resumed run does not keep them
    proc = subprocess.Popen([sys.executable, "-c", CLI_SCRIPT, json.dumps(MICRO_MODEL), *argv],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return proc, resume


def _ready(out: Path, since_ns: int) -> bool:
    """Whether the session started at ``since_ns`` holds the run directory: it has rewritten metrics.jsonl (after
    the lock and the clean-up)."""
    try:
        return (out / "metrics.jsonl").stat().st_mtime_ns >= since_ns
    except FileNotFoundError:
        return False


def trial(kills: int = 30, seed: int = 0, workdir: Path | None = None, max_steps: int | None = None,
          window_s: float = 3.0, startup_s: float = 4.0, say=print) -> Figures:
    """Run the trial (module docstring) in ``workdir`` (a temporary directory when ``None``) and return its figures.

    ``kills`` SIGKILLs; each falls ``uniform(0, window_s)`` seconds after the session holds the run directory, or
    (every fifth) ``uniform(0, startup_s)`` seconds after its start. ``max_steps`` (default ``25 * kills + 20``): the
    run's length, long enough that the kills come before its end (a run that ends early starts over)."""
    rng = random.Random(seed)
    tmp = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="kill-trial-")
        workdir = Path(tmp.name)
    workdir = Path(workdir)
    try:
        data_dir = make_data(workdir / "data")
        out, max_steps = workdir / "run", max_steps or 25 * kills + 20
        f, pending, ended, last_step = Figures(), set(), False, 0
        while f.kills < kills:
            proc, resume = _start(out, data_dir, max_steps, fresh=ended)
            t0_ns, t0 = time.time_ns() - 1, time.monotonic()
            early = f.kills % 5 == 4
            delay = rng.uniform(0, startup_s if early else window_s)
            ready_at = None
            while proc.poll() is None:
                now = time.monotonic()
                if ready_at is None and _ready(out, t0_ns):
                    ready_at = now
                if (early and now - t0 >= delay) or (ready_at is not None and now - ready_at >= delay):
                    break
                time.sleep(0.005)
            rc = proc.poll()
            if rc is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                f.kills += 1
            err = proc.stderr.read()
            proc.stderr.close()
            f.resumes += resume
            if rc not in (None, 0):
                f.failures.append(f"session {'--resume' if resume else 'fresh'} exited {rc}: "
                                  f"{err.strip().splitlines()[-1:]}")
                break
            f.resumes_ok += resume
            if ready_at is not None or rc == 0:  # it held the run directory: the earlier leftovers must be gone
                f.cleaned += sum(not p.exists() for p in pending)
                f.failures += [f"{p}: a leftover still there after the next start" for p in pending if p.exists()]
                pending = set()
            pending |= check_run_dir(out, f)
            step = _newest_step(out)
            if resume and step < last_step:
                f.failures.append(f"the newest checkpoint went back from step {last_step} to {step}")
            last_step = step
            ended = rc == 0
            if ended:
                say(f"the run ended before kill {f.kills + 1}; starting over")
                continue
            say(f"kill {f.kills}: {'early ' if ready_at is None else ''}at {time.monotonic() - t0:.2f} s, step "
                f"{step}, {len(pending)} leftovers; {f.line()}")
            if f.failures:
                break
        if not f.failures:  # the last session runs to the end
            proc, resume = _start(out, data_dir, max_steps)
            _, err = proc.communicate()
            f.resumes += resume
            if proc.returncode != 0:
                f.failures.append(f"the last session exited {proc.returncode}: {err.strip().splitlines()[-1:]}")
            else:
                f.resumes_ok += resume
                f.cleaned += sum(not p.exists() for p in pending)
                f.failures += [f"{p}: a leftover still there after the next start" for p in pending if p.exists()]
                check_run_dir(out, f)
                _check_end(out, max_steps, f)
        return f
    finally:
        if tmp is not None:
            tmp.cleanup()


def _newest_step(out: Path) -> int:
    from dsfs.checkpointing import latest_checkpoint, load_trainer_state

    ckpt = latest_checkpoint(out)
    return load_trainer_state(ckpt)["step"] if ckpt else 0


def _check_end(out: Path, max_steps: int, f: Figures) -> None:
    from dsfs.checkpointing import latest_checkpoint, load_trainer_state

    ckpt = latest_checkpoint(out)
    f.final_step = load_trainer_state(ckpt)["step"] if ckpt else None
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in recs if "loss" in r]
    if f.final_step != max_steps or not (out / "final").is_dir():
        f.failures.append(f"the run ended at step {f.final_step} (final/: {(out / 'final').is_dir()}), expected "
                          f"{max_steps}")
    if steps != list(range(1, max_steps + 1)):
        f.failures.append(f"metrics.jsonl holds train steps {steps[:5]}...{steps[-5:]}, expected 1..{max_steps}")


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.kill_trial``: run the trial, print its figures, exit 1 on a failure."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="python -m bench.kill_trial")
    p.add_argument("--kills", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, help="keep the data and the run here (default: a temporary directory)")
    p.add_argument("--max-steps", type=int, help="the run's length (default: 25 x kills + 20)")
    p.add_argument("--window", type=float, default=3.0, help="seconds of training a kill falls in (default 3)")
    args = p.parse_args(argv)
    f = trial(args.kills, args.seed, args.workdir, args.max_steps, args.window)
    for line in f.failures:
        print(f"FAIL {line}")
    print(f"kill trial (seed {args.seed}): {f.line()}")
    return 1 if f.failures else 0


if __name__ == "__main__":
    sys.exit(main())
