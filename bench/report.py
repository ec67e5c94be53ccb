"""Print the asv results of the latest benchmarked commit as a markdown table, and plot the sequence-length sweeps.

    uv run python -m bench.report                    # table of the latest commit on this machine + PNG
    uv run python -m bench.report --bench attention  # only benchmarks whose name matches a regex
    uv run python -m bench.report --commit 1a2b3c4d --png sweeps.png

Reads `.asv/results/<machine>/` through asv's own API (`asv.results`, `asv.benchmarks`). The latest commit is the
one with the newest commit date among the results of the machine; where that commit has results from several
environments (an `asv run` environment and a `--python=same` run), each benchmark's most recent run is used.

One table row per component (a benchmark and its parameters other than the backend); one column per backend with
its median (asv's value: the median of the samples), then in brackets its ratio to the reference's value (r) and
to the peer's (p): transformers for the torch backends, mlx-lm for runtime_mlx. Times: below 1 is faster;
tokens/s: above 1 is faster. "n/a": skipped on this machine (the backend cannot run here), "failed": an error.
"""

from __future__ import annotations

import argparse
import ast
import itertools
import math
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = ["reference", "compiled", "cuda", "mlx", "torch_builtin", "mlx_builtin", "transformers", "mlx_lm", "liger"]
PEER = {"reference": "transformers", "compiled": "transformers", "cuda": "transformers", "mlx": "mlx_lm",
        "torch_builtin": "transformers", "mlx_builtin": "mlx_lm"}  # compiled and the built-ins: ops.py only
SWEEPS = {  # benchmark -> swept parameter, for the PNG
    "attention.Prefill.time_forward": "seq_len",
    "attention.Prefill.time_forward_backward": "seq_len",
    "attention.Decode.time_decode": "cache_len",
}


def latest_results(machine: str | None = None, commit: str | None = None):
    """(asv Config, benchmarks metadata, commit hash, {benchmark key: (Results, param list)}) for the latest (or the
    given) commit of ``machine`` (default: the machine whose results were written last). Raises SystemExit with a
    one-line reason when there is nothing to report."""
    from asv import results as asv_results
    from asv.benchmarks import Benchmarks
    from asv.config import Config

    os.chdir(ROOT)  # asv.conf.json's paths are relative to the repository root
    conf = Config.load(str(ROOT / "asv.conf.json"))
    results_dir = Path(conf.results_dir)
    if machine is None:
        machines = [p.parent for p in results_dir.glob("*/machine.json")]
        if not machines:
            raise SystemExit(f"no asv results under {results_dir}: run `asv run` first (see bench/README.md)")
        machine = max(machines, key=lambda d: max(f.stat().st_mtime for f in d.iterdir())).name
    runs = list(asv_results.iter_results_for_machine(str(results_dir), machine))
    if commit is not None:
        runs = [r for r in runs if r.commit_hash.startswith(commit)]
    if not runs:
        raise SystemExit(f"no results for machine {machine!r}" + (f" and commit {commit}" if commit else ""))
    newest = max(runs, key=lambda r: r.date)
    runs = [r for r in runs if r.commit_hash == newest.commit_hash]
    benchmarks = Benchmarks.load(conf)
    chosen = {}
    for r in runs:
        for key in r.get_result_keys(benchmarks):
            if key not in chosen or r.started_at.get(key, 0) > chosen[key].started_at.get(key, 0):
                chosen[key] = r
    return machine, benchmarks, newest.commit_hash, chosen


def param_value(text: str):
    """asv stores parameter values as their repr: ``"'mla'"`` -> ``'mla'``, ``'512'`` -> ``512``."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def values(benchmarks, chosen) -> dict:
    """{benchmark key: {params tuple: value}}: value a float, NaN when skipped, None when it failed."""
    out = {}
    for key, r in sorted(chosen.items()):
        params = benchmarks[key]["params"]
        vals = r.get_result_value(key, params)
        if not params:
            vals, combos = [vals], [()]
        else:
            combos = itertools.product(*[[param_value(v) for v in p] for p in params])
        out[key] = dict(zip(combos, vals, strict=True))
    return out


def fmt(value, unit: str) -> str:
    """A value with its unit, scaled: seconds -> s/ms/us, bytes -> B/KiB/MiB/GiB, other units as they are."""
    if value is None:
        return "failed"
    if isinstance(value, float) and math.isnan(value):
        return "n/a"
    if unit == "seconds":
        for scale, name in ((1, "s"), (1e-3, "ms"), (1e-6, "us")):
            if value >= scale or name == "us":
                return f"{value / scale:.3g} {name}"
    if unit == "bytes":
        for scale, name in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB"), (1, "B")):
            if value >= scale or name == "B":
                return f"{value / scale:.3g} {name}"
    return f"{value:,.0f} {unit}" if value >= 100 else f"{value:.3g} {unit}"


def ok(v) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v)) and v != 0


def table(benchmarks, vals, regex: str | None = None) -> str:
    """The markdown table: one row per component, one column per backend that has a value (value, ratio to the
    reference and to the peer), then a line naming the backends that were skipped everywhere."""
    vals = {k: v for k, v in vals.items() if not regex or re.search(regex, k)}
    ran = {c[benchmarks[k]["param_names"].index("backend")] if "backend" in benchmarks[k]["param_names"]
           else "reference" for k, by in vals.items() for c, v in by.items() if ok(v)}
    backends = [b for b in BACKENDS if b in ran]
    lines = ["| component | " + " | ".join(backends) + " |", "|---" * (len(backends) + 1) + "|"]
    for key, by_params in vals.items():
        names = benchmarks[key]["param_names"]
        unit = benchmarks[key]["unit"]
        b_idx = names.index("backend") if "backend" in names else None
        rows = {}
        for combo, v in by_params.items():
            rest = tuple(x for i, x in enumerate(combo) if i != b_idx)
            rows.setdefault(rest, {})[combo[b_idx] if b_idx is not None else "reference"] = v
        name = re.sub(r"\.(time|track|peakmem)_", ".", key)
        for rest, by_backend in rows.items():
            if not any(ok(v) for v in by_backend.values()):
                continue
            label = " ".join([name] + [f"{n}={x}" for n, x in zip([n for n in names if n != "backend"], rest,
                                                                     strict=True)])
            cells = []
            for b in backends:
                v = by_backend.get(b, float("nan"))
                cell = fmt(v, unit)
                if ok(v):
                    ref, peer = by_backend.get("reference"), by_backend.get(PEER.get(b, ""))
                    ratios = [f"r {v / ref:.2f}" if ok(ref) and b != "reference" else "",
                              f"p {v / peer:.2f}" if ok(peer) else ""]
                    if any(ratios):
                        cell += " (" + ", ".join(r for r in ratios if r) + ")"
                cells.append(cell)
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    skipped = [b for b in BACKENDS if b not in ran]
    if skipped:
        lines.append(f"\nNo values (skipped on this machine): {', '.join(skipped)}.")
    return "\n".join(lines)


def plot(benchmarks, vals, path: Path) -> bool:
    """Write the sequence-length sweeps (`SWEEPS`) as one PNG: a row per benchmark, a column per attention kind,
    a line per backend, log-log axes. Returns False when there is nothing to plot."""
    keys = [k for k in SWEEPS if k in vals]
    if not keys:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    kinds = benchmarks[keys[0]]["params"][benchmarks[keys[0]]["param_names"].index("kind")]
    kinds = [param_value(k) for k in kinds]
    fig, axes = plt.subplots(len(keys), len(kinds), figsize=(3.2 * len(kinds), 2.8 * len(keys)), squeeze=False)
    for row, key in zip(axes, keys, strict=True):
        names = benchmarks[key]["param_names"]
        xi, bi, ki = names.index(SWEEPS[key]), names.index("backend"), names.index("kind")
        for ax, kind in zip(row, kinds, strict=True):
            for b in BACKENDS:
                pts = sorted((c[xi], v) for c, v in vals[key].items() if c[bi] == b and c[ki] == kind and ok(v))
                if pts:  # one colour per backend in every panel
                    ax.plot(*zip(*pts, strict=True), marker="o", label=b, color=f"C{BACKENDS.index(b)}")
            xs = sorted({c[xi] for c in vals[key]})
            ax.set(xscale="log", yscale="log", title=f"{kind}", xlabel=SWEEPS[key], xticks=xs, xticklabels=xs)
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.grid(True, which="both", alpha=0.3)
        row[0].set_ylabel(re.sub(r"^attention\.|time_", "", key) + " (s)")
    handles = {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(lab, h)
    labels = list(handles)
    fig.legend([handles[lab] for lab in labels], labels, loc="upper center", ncol=len(labels))
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--machine", help="asv machine name (default: the one with the newest results)")
    p.add_argument("--commit", help="commit hash or prefix (default: the newest commit with results)")
    p.add_argument("--bench", help="only benchmarks whose name matches this regular expression")
    p.add_argument("--png", default=str(ROOT / ".asv" / "report" / "seq_sweeps.png"),
                   help="where to write the sequence-length sweep plot (default: %(default)s)")
    args = p.parse_args(argv)
    machine, benchmarks, commit, chosen = latest_results(args.machine, args.commit)
    vals = values(benchmarks, chosen)
    print(f"asv results: machine {machine}, commit {commit[:8]}\n")
    print(table(benchmarks, vals, args.bench))
    if plot(benchmarks, vals, Path(args.png)):
        print(f"\nsequence-length sweeps: {args.png}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
