"""``dsfs check OP --impl module:function``: run an op's whole battery (`reference.testing`) on a candidate.

Every sample of the op's spec at every dtype, forward and (where the op has one) backward, against the float64
reference; one table row per check (case, shape, dtype, check, error, bound, result); exit status 1 when any
check fails. Without ``--impl`` the candidate is our own implementation for the device: the Triton kernel on
``cuda`` (and on ``cpu`` under Triton's interpreter), the MLX op on ``mlx``. ``dsfs check all`` checks every op.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys

from dsfs.bench import DEVICES, DTYPES
from dsfs.errors import KernelError


def add_check(sub) -> None:
    """Register ``dsfs check``."""
    p = sub.add_parser(
        "check",
        help="test a kernel against the reference on the op's whole battery",
        description="Run the op's battery (reference.testing: ragged sizes, edge cases, a decode step, real models' "
        "shapes; every dtype; outputs, gradients, inputs left unchanged, NaN-poisoned outputs) on a candidate "
        "function and print one row per check. Exit status 1 if any check fails.",
    )
    p.add_argument("op", nargs="?", metavar="OP", help="the op (see --list), or 'all' for every op")
    p.add_argument("--impl", metavar="MODULE:FUNCTION",
                   help="the candidate: package.module:function or path/to/file.py:function (default: ours for "
                        "--device: kernels.triton on cpu/cuda, runtime_mlx.kernels on mlx)")
    p.add_argument("--device", default="auto", choices=["auto", *DEVICES],
                   help="where the candidate runs: torch tensors on cpu/cuda/mps, mx arrays on mlx (default: cuda "
                        "when available, else cpu; Triton kernels run on cpu under TRITON_INTERPRET=1)")
    p.add_argument("--dtype", action="append", choices=DTYPES, help="only these dtypes (repeatable; default: all "
                                                                    "the op's)")
    p.add_argument("--cases", action="append", metavar="TAG", choices=["ragged", "edge", "decode", "model"],
                   help="only samples with this tag (repeatable)")
    p.add_argument("--forward-only", action="store_true", help="skip the gradient checks")
    p.add_argument("--failures-only", action="store_true", help="print only the rows that fail")
    p.add_argument("--json", action="store_true",
                   help="print a JSON list on stdout instead of the tables: per op {op, impl, device, signature, rows, "
                        "checks, failed}, each row {case, shape, dtype, check, error, bound, passed, note} (error "
                        "null when not a number or infinite)")
    p.add_argument("--list", action="store_true", help="print the ops, their signatures, dtypes and gradients")
    p.set_defaults(func=run_check)


def resolve_device(device: str, argv: list[str] | None = None) -> str:
    """``auto`` -> cuda when torch sees a GPU, else cpu.

    On a CPU without CUDA, Triton kernels need ``TRITON_INTERPRET=1``, which triton reads when it is imported (its
    own ``tl.sum`` and friends are decorated then) and `reference` imports it through ``torch._dynamo``. So the
    variable is set here, and if triton was imported already, the command re-executes itself with it
    (``argv``: this process's own command line; in-process callers set the variable themselves, as the test
    session does)."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ:
        os.environ["TRITON_INTERPRET"] = "1"
        if "triton" in sys.modules and argv is not None and argv == sys.argv[1:]:
            sys.stdout.flush()
            sys.stderr.flush()
            os.execv(sys.executable, [sys.executable, "-m", "dsfs.cli", *argv])
    return device


def default_impl(spec, device: str) -> str:
    """Our implementation of ``spec`` for ``device``; raises `KernelError` where we have none."""
    backend = "mlx" if device == "mlx" else "cuda"
    if backend not in spec.ours:
        have = ", ".join(f"{k}: {v}" for k, v in spec.ours.items()) or "none"
        raise KernelError(f"{spec.name}: no implementation of ours for --device {device} (ours: {have}); "
                          f"pass --impl module:function")
    return spec.ours[backend]


def list_ops() -> str:
    """One line per op: signature, dtypes, gradients, number of samples, our implementations."""
    from reference.testing import all_specs

    lines = []
    for spec in all_specs().values():
        dts = ", ".join(str(d).replace("torch.", "") for d in spec.dtypes)
        grads = ", ".join(f"d{g}" for g in spec.grads) or "forward only"
        ours = ", ".join(f"{k} {v}" for k, v in spec.ours.items()) or "-"
        n = len(spec.samples(spec.rng()))
        lines.append(f"{spec.signature}\n    dtypes {dts}; gradients {grads}; {n} samples; ours: {ours}")
    return "\n".join(lines)


def run_check(args) -> int:
    """The verb: returns 0 when every check of every selected op passes, 1 otherwise."""
    if args.list:
        print(list_ops())
        return 0
    if not args.op:
        raise KernelError("expected an op (dsfs check OP --impl module:function); see dsfs check --list")
    device = resolve_device(args.device, getattr(args, "argv", None))
    import torch

    from reference.testing import ImplError, all_specs, arrays_for, failures, format_rows, load_impl, run

    specs = all_specs()
    if args.op != "all" and args.op not in specs:
        raise KernelError(f"unknown op {args.op!r}; expected one of {', '.join(specs)} (or all)")
    if args.impl is not None and not args.impl.strip():
        raise KernelError("--impl is empty: expected module:function (for example kernels.triton.rms_norm:rms_norm)")
    if args.op == "all" and args.impl:
        raise KernelError("--impl needs one op (dsfs check OP --impl module:function), not all")
    selected = list(specs.values()) if args.op == "all" else [specs[args.op]]
    dtypes = [getattr(torch, d) for d in args.dtype] if args.dtype else None
    try:
        arrays_for(device)
    except ValueError as e:
        raise KernelError(str(e)) from None

    report, failed, total, checked = [], 0, 0, 0
    for spec in selected:
        if args.op == "all" and not args.impl and ("mlx" if device == "mlx" else "cuda") not in spec.ours:
            print(f"{spec.name}: skipped, no implementation of ours for --device {device}", file=sys.stderr)
            continue
        target = args.impl or default_impl(spec, device)
        op_dtypes = [d for d in dtypes if d in spec.dtypes] if dtypes and args.op == "all" else dtypes
        if args.op == "all" and (op_dtypes == [] or not any(not args.cases or set(args.cases) & set(s.tags)
                                                            for s, _ in spec.cases(op_dtypes))):
            print(f"{spec.name}: skipped, no case with these dtypes and tags", file=sys.stderr)
            continue
        try:
            # the candidate's own prints go to stderr, so that --json's stdout stays one JSON document
            with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
                fn = load_impl(target)
                rows = run(spec, fn, device, op_dtypes, args.cases, backward=not args.forward_only,
                           progress=_progress(spec, target, device, op_dtypes, args.cases))
        except (ImplError, ValueError) as e:
            raise KernelError(str(e).splitlines()[0]) from None
        bad = failures(rows)
        failed, total, checked = failed + len(bad), total + len(rows), checked + 1
        if args.json:
            report.append({"op": spec.name, "impl": target, "device": device, "signature": spec.signature,
                           "rows": [_json_row(r) for r in (bad if args.failures_only else rows)],
                           "checks": len(rows), "failed": len(bad)})
            continue
        cases = len({(r.case, r.dtype) for r in rows})
        shown = bad if args.failures_only else rows
        if shown:
            print(format_rows(shown))
        print(f"{spec.name}: {target} on {device}: {len(rows)} checks in {cases} cases, "
              f"{len(bad)} failed\n")
    if args.json:
        print(json.dumps(report, indent=1))
    elif len(selected) > 1:
        print(f"{checked} ops: {total} checks, {failed} failed")
    return 1 if failed else 0


def _json_row(r) -> dict:
    """A row as a JSON object; an infinite error (NaN or Inf in the output) becomes null (JSON has no inf)."""
    d = dict(r.__dict__)
    if d["error"] is not None and d["error"] == float("inf"):
        d["error"] = None
    return d


def _progress(spec, target, device, dtypes, tags):
    """A tqdm bar on stderr over the op's cases (silent when stderr is not a terminal)."""
    from tqdm import tqdm

    total = sum(1 for s, _ in spec.cases(dtypes) if not tags or set(tags) & set(s.tags))
    bar = tqdm(total=total, desc=f"{spec.name} {target}", unit="case", leave=False, file=sys.stderr,
               disable=not sys.stderr.isatty())

    def step(rows):
        bar.update(1)
        if bar.n >= bar.total:
            bar.close()

    return step
