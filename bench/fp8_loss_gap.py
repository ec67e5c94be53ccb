"""FP8 training's loss against full precision (DeepSeek-V3 report section 3.3: relative loss error under 0.25%
against BF16): the tiny preset on the TinyStories sample, the same seed, data and steps, once at ``--precision
fp32`` and once at ``--precision fp8``; the relative gap of the final validation losses, and both curves in one PNG.

    uv run python -m bench.fp8_loss_gap --out runs/fp8 --steps 300 --png docs/fp8_loss_gap.png

Runs that already finished in ``--out/<precision>`` are read, not retrained (``--retrain`` to redo them). Each run
is ``dsfs train --preset tiny --max-steps STEPS --eval-every EVAL`` with no time budget (the preset's schedule,
warmup and cosine, scaled to STEPS). FP8 runs eager; fp32 with torch.compile, as ``dsfs train`` defaults.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

PRECISIONS = ("fp32", "fp8")


def read_run(out: Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(train (step, lm_loss), val (step, val_loss)) of a run directory's metrics.jsonl."""
    train, val = [], []
    for line in (out / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "lm_loss" in r:
            train.append((r["step"], r["lm_loss"]))
        if "val_loss" in r:
            val.append((r["step"], r["val_loss"]))
    return train, val


def run(out: Path, precision: str, steps: int, eval_every: int) -> None:
    """Train the tiny preset at ``precision`` into ``out`` (quiet)."""
    from dsfs.train import train

    train("tiny", None, out, max_steps=steps, eval_every=eval_every, time_budget_s=1e9, precision=precision,
          overwrite=True, verbose=False)  # no time budget (None would keep the preset's)


def plot(curves: dict, path: Path, gap: float) -> None:
    """Top: train LM loss (20-step mean) and validation loss of each precision against step. Bottom: FP8's relative
    gap to fp32 in percent, validation and smoothed train loss, beside the report's 0.25% band. One PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def smooth(train):
        steps, loss = zip(*train, strict=True)
        return steps, [sum(loss[max(0, i - 19):i + 1]) / len(loss[max(0, i - 19):i + 1]) for i in range(len(loss))]

    fig = Figure(figsize=(7, 7))
    FigureCanvasAgg(fig)
    ax, ax2 = fig.add_subplot(2, 1, 1), fig.add_subplot(2, 1, 2)
    for (p, (train, val)), c in zip(curves.items(), ("C0", "C3"), strict=False):
        ax.plot(*smooth(train), c=c, lw=1, alpha=0.6, label=f"{p} train LM loss (20-step mean)")
        ax.plot(*zip(*val, strict=True), "o-", c=c, ms=4, label=f"{p} val loss")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(f"tiny preset, TinyStories sample: FP8 vs fp32, final val loss gap {100 * gap:+.3f}%")
    ax.grid(alpha=0.3)
    ax.legend()
    (s32, t32), (s8, t8) = smooth(curves["fp32"][0]), smooth(curves["fp8"][0])
    if s32 == s8:
        ax2.plot(s8[20:], [100 * (b - a) / a for a, b in zip(t32[20:], t8[20:], strict=True)], c="C3", lw=1,
                 alpha=0.6, label="train LM loss (20-step means)")
    v32, v8 = dict(curves["fp32"][1]), dict(curves["fp8"][1])
    common = sorted(set(v32) & set(v8))
    ax2.plot(common, [100 * (v8[k] - v32[k]) / v32[k] for k in common], "o-", c="C3", ms=4, label="val loss")
    for y in (-0.25, 0.25):
        ax2.axhline(y, c="k", ls="--", lw=0.8)
    ax2.axhline(0, c="k", lw=0.5)
    ax2.set_xlabel("step")
    ax2.set_ylabel("(fp8 - fp32) / fp32 (%)")
    ax2.grid(alpha=0.3)
    ax2.legend(title="dashed: the report's 0.25%")
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, path)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/fp8", help="where the two runs live (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=300, help="optimizer steps of each run (default: %(default)s)")
    ap.add_argument("--eval-every", type=int, default=50, help="default: %(default)s")
    ap.add_argument("--png", default="docs/fp8_loss_gap.png", help="default: %(default)s")
    ap.add_argument("--retrain", action="store_true", help="train again even where a finished run exists")
    a = ap.parse_args(argv)
    curves = {}
    for p in PRECISIONS:
        out = Path(a.out) / p
        if a.retrain or not (out / "final").is_dir():
            run(out, p, a.steps, a.eval_every)
        curves[p] = read_run(out)
    final = {p: curves[p][1][-1] for p in PRECISIONS}
    if final["fp32"][0] != final["fp8"][0]:
        raise SystemExit(f"the runs ended at different steps: {final}")
    gap = (final["fp8"][1] - final["fp32"][1]) / final["fp32"][1]
    plot(curves, Path(a.png), gap)
    for p in PRECISIONS:
        print(f"{p:5s} final val loss {final[p][1]:.4f} at step {final[p][0]}")
    print(f"relative gap (fp8 - fp32) / fp32: {100 * gap:+.3f}% (report's bound: 0.25%); plot {a.png}")


if __name__ == "__main__":
    main()
