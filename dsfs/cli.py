"""The ``dsfs`` command line: ``dsfs <verb> [options]``.

Each verb is one ``add_<verb>(subparsers)`` function that registers its subparser and sets ``func`` (called
with the parsed namespace, returns an exit code); listing it in ``COMMANDS`` adds the verb. Bad input (a
``DataError`` raised by the verb, an ``OSError``, a bad option) exits non-zero with one line on stderr,
``dsfs: error: <reason>``, and no traceback; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys

from dsfs import data
from dsfs.data import DataError


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors become one ``dsfs: error:`` line instead of usage + exit."""

    def error(self, message):
        raise _UsageError(f"{message} (see '{self.prog} --help')")


def add_prepare(sub) -> None:
    """Register ``dsfs prepare``: train a tokenizer and write packed token shards (``dsfs.data.prepare``)."""

    p = sub.add_parser(
        "prepare",
        help="train a byte-level BPE tokenizer and write train/val token shards",
        description=(
            "Read documents from a text file (<|endoftext|>-separated) or a .jsonl file, train a "
            "byte-level BPE tokenizer, hold out whole documents for validation, and write tokenizer.json, "
            "train.bin, val.bin and meta.json to the output directory. Skipped when the output already "
            "matches (use --force)."
        ),
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--input",
        metavar="PATH",
        help=f"source .txt or .jsonl file (default: {data.DEFAULT_INPUT}, when it exists)",
    )
    src.add_argument(
        "--dataset",
        choices=["tinystories"],
        help="download roneneldan/TinyStories from the Hugging Face hub (train + its own valid split)",
    )
    p.add_argument("--val-input", metavar="PATH", help="separate validation file (--val-fraction unused)")
    p.add_argument("--out", metavar="DIR", help="output dir (default: data_cache/<input stem>-v<vocab>)")
    dflt = " (default: %(default)s)"
    p.add_argument("--vocab-size", type=int, metavar="N", default=data.DEFAULT_VOCAB, help="vocab" + dflt)
    p.add_argument(
        "--val-fraction",
        type=float,
        metavar="F",
        default=0.05,
        help="fraction of documents held out for validation, at least one" + dflt,
    )
    p.add_argument("--seed", type=int, metavar="N", default=0, help="seed of the val split" + dflt)
    p.add_argument("--text-field", metavar="NAME", default="text", help="jsonl text field" + dflt)
    p.add_argument("--force", action="store_true", help="redo even if the output already matches")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=_run_prepare)


def _run_prepare(args) -> int:
    data.prepare(
        args.input,
        args.out,
        vocab_size=args.vocab_size,
        val_fraction=args.val_fraction,
        seed=args.seed,
        text_field=args.text_field,
        val_input=args.val_input,
        dataset=args.dataset,
        force=args.force,
        verbose=not args.quiet,
    )
    return 0


COMMANDS = [add_prepare]  # one add_<verb> function per verb, in --help order


def build_parser() -> argparse.ArgumentParser:
    """The ``dsfs`` parser with one subparser per entry of ``COMMANDS``."""
    parser = _Parser(prog="dsfs", description="DeepSeek-V3 kernels, benchmarks and training.")
    sub = parser.add_subparsers(dest="verb", metavar="<verb>")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``dsfs`` with ``argv`` (default ``sys.argv[1:]``); return the exit code.

    0 on success (and for ``--help``), 1 on bad input or an OS error, 2 on a bad command line, 130 on Ctrl-C.
    Errors print one line to stderr: ``dsfs: error: <reason>``.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.verb is None:
            parser.print_help(sys.stderr)
            return 2
        return int(args.func(args) or 0)
    except _UsageError as e:
        print(f"dsfs: error: {e}", file=sys.stderr)
        return 2
    except (DataError, OSError) as e:
        print(f"dsfs: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("dsfs: interrupted", file=sys.stderr)
        return 130
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
