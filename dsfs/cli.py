"""The ``dsfs`` command line: ``dsfs <verb> [options]``.

Each verb is one ``add_<verb>(subparsers)`` function that registers its subparser and sets ``func`` (called
with the parsed namespace, returns an exit code); listing it in ``COMMANDS`` adds the verb. Bad input (a
`dsfs.errors.UserError` raised by the verb, an ``OSError``, a bad option) exits non-zero with one line on stderr,
``dsfs: error: <reason>``, and no traceback; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import signal
import sys
import warnings
from pathlib import Path

from dsfs import data
from dsfs.bench import add_bench
from dsfs.check import add_check
from dsfs.data import DataError
from dsfs.errors import ConfigError, UserError
from dsfs.parallel.plan import add_plan


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors become one ``dsfs: error:`` line instead of usage + exit.

    A value that looks like a negative number (``-1``, ``-1e-3``, ``-.5``, ``-inf``) is a value, not an option, so
    ``--lr -1e-3`` reaches the option's own check; argparse's default pattern knows only ``-1`` and ``-0.5`` (Python
    3.14 widens it the same way). No dsfs option name looks like a number."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|infinity|nan)$", re.I)

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
        help=f"source .txt or .jsonl file (default: {data.DEFAULT_INPUT}, when it exists, else the same first "
        f"2 MiB of {data.TINYSTORIES_REPO}'s train file, fetched from the Hugging Face hub and cached)",
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


def add_train(sub) -> None:
    """Register ``dsfs train``: pretrain a preset model on prepared data (``dsfs.train.train``)."""
    from dsfs.presets import TRAIN_PRESETS

    p = sub.add_parser(
        "train",
        help="pretrain a DeepSeek-V3-style model (MLA + DeepSeekMoE + MTP) on prepared token shards",
        description=(
            "Train a preset model, or start from any checkpoint's weights (--init-from), with AdamW or Muon "
            "(warmup + cosine), the MTP loss and bias-based MoE balancing. Writes metrics.jsonl, loss.png, "
            "checkpoints/step_N (Hugging Face model + trainer_state.pt) and final/ to --out. Ctrl-C saves a "
            "checkpoint; --resume continues exactly. Training options default to the preset's values (on "
            "--resume: the checkpoint's)."
        ),
    )
    p.add_argument("--preset", choices=list(TRAIN_PRESETS), help="model + training preset (default: tiny, "
                   "or the resumed checkpoint's)")
    p.add_argument("--data", metavar="DIR", help="prepared data dir (default: run dsfs prepare's defaults, "
                   f"{data.default_out_dir(data.DEFAULT_INPUT, data.DEFAULT_VOCAB)})")
    p.add_argument("--out", metavar="DIR", help="run directory (default: runs/<preset>)")
    p.add_argument("--backend", default="auto", choices=["auto", "reference", "cuda", "mlx"],
                   help="auto: mlx on Apple Silicon, cuda when available, else reference (the plain-PyTorch "
                   "model on CPU); default: %(default)s")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--resume", nargs="?", const=True, default=False, metavar="PATH",
                       help="continue the newest checkpoint of --out, or of PATH (a step, checkpoints or run dir) "
                       "exactly: its weights, optimizer state, step and data order")
    start.add_argument("--init-from", metavar="DIR",
                       help="start a new run (step 0, fresh optimizer and data order) from the weights and model "
                       "config of a checkpoint: a model dir (ours, or a DeepseekV3ForCausalLM or "
                       "DeepseekV32ForCausalLM saved by transformers), a run's final/ or checkpoints/step_N, or a "
                       "run dir; the preset gives the training options")
    p.add_argument("--num-nextn-predict-layers", type=int, metavar="N",
                   help="MTP depths (0: no MTP); default: the preset's, or with --init-from the checkpoint "
                   "config's, those its files lack initialized fresh")
    p.add_argument("--overwrite", action="store_true", help="start over in an --out that already holds a run")
    p.add_argument("--seed", type=int, metavar="N", help="model init and data order (default: 0; on --resume the "
                   "checkpoint's, which it cannot change)")
    p.add_argument("--keep-last", type=int, metavar="K", help="checkpoints kept (default: 3, or on --resume the "
                   "run's; 0: all)")
    p.add_argument("--save-every", type=int, metavar="N", help="checkpoint every N steps (default: --eval-every, "
                   "or on --resume the run's)")
    g = p.add_argument_group("training options (default: the preset's)")
    for name, typ, help_ in [
        ("max-steps", int, "optimizer steps"), ("batch-size", int, "sequences per micro-batch"),
        ("seq-len", int, "tokens per sequence"), ("lr", float, "peak learning rate"),
        ("min-lr-ratio", float, "final lr / peak lr"), ("warmup-steps", int, "linear warmup steps"),
        ("grad-accum", int, "micro-batches per step"), ("eval-every", int, "steps between evaluations"),
        ("eval-batches", int, "validation batches per evaluation"), ("mtp-weight", float, "MTP loss weight"),
        ("weight-decay", float, "decoupled decay on matrices"), ("grad-clip", float, "max grad norm (0: off)"),
        ("indexer-warmup-steps", int, "models with lightning indexers (V3.2 DSA, V4 CSA): steps of the dense "
         "warm-up (main model frozen, indexers trained by KL to the dense attention) before the sparse stage "
         "(LM loss + the indexers' KL over their top-k); default 0"),
    ]:
        g.add_argument(f"--{name}", type=typ, metavar="X", help=help_)
    g.add_argument("--optimizer", choices=["adamw", "muon"], help="adamw, or muon: Muon on the hidden matrices "
                   "with AdamW on embeddings, head, routers and norms (Moonlight)")
    g.add_argument("--time-budget", type=float, metavar="S", help="stop after S seconds of training, evaluate, "
                   "checkpoint and write final/ (resume later with --resume)")
    g.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp8"], help="auto (bf16 autocast on CUDA, fp32 "
                   "elsewhere), fp32, bf16 (autocast, bf16 optimizer moments) or fp8: DeepSeek-V3's FP8 mixed "
                   "precision (FP8 GEMMs for attention projections, MLPs and experts; fp32 master weights; bf16 "
                   "moments; eager); the checkpoint format is the same")
    g.add_argument("--scale-fmt", choices=["ue8m0"], help="with --precision fp8: power-of-two FP8 scales "
                   "(DeepSeek-V3.1's UE8M0) instead of float32 ones")
    p.add_argument("--threads", type=int, metavar="N", help="CPU threads for torch (default: torch's choice; "
                   "on a busy machine 1 can be faster)")
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                   help="torch.compile the training loss (auto: on for cpu and cuda; default: auto)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    add_parallel_options(p)
    p.set_defaults(func=_run_train)


def add_parallel_options(p) -> None:
    """``dsfs train``'s multi-process options (`dsfs.parallel.layout.ParallelDims`)."""
    from dsfs.parallel.layout import PP_SCHEDULES

    g = p.add_argument_group("several processes (torch.distributed; dsfs/parallel)")
    g.add_argument("--nproc", type=int, metavar="N", help="worker processes on this machine (torch's elastic "
                   "launcher; gloo on CPU, NCCL on GPUs: one GPU each; with --backend mlx: data parallel over "
                   "MLX's ring backend); default: the product of the degrees below, else 1. Across machines: "
                   "torchrun ... -m dsfs train, or mlx.launch --hosts ... dsfs train --backend mlx")
    for name, what in [("dp-replicate", "data-parallel replicas (HSDP's replicate dimension)"),
                       ("dp-shard", "fully sharded data parallelism (FSDP2; default: the processes the other "
                        "degrees leave)"),
                       ("cp", "context parallelism: the sequence split over processes"),
                       ("tp", "tensor parallelism (attention heads, MLPs; sequence-parallel norms)"),
                       ("pp", "pipeline stages"),
                       ("ep", "expert parallelism (routed experts split; ranks borrowed from dp-shard x cp)")]:
        g.add_argument(f"--{name}", type=int, metavar="N", help=what)
    g.add_argument("--zero", type=int, choices=[1, 2, 3], help="ZeRO stage of the data-parallel dimensions: 3 "
                   "(default; parameters, gradients and optimizer state sharded), 2 (parameters kept gathered "
                   "from forward to backward), 1 (only the optimizer state sharded; data parallelism alone)")
    g.add_argument("--pp-schedule", choices=list(PP_SCHEDULES), help="pipeline schedule (default: 1F1B)")
    g.add_argument("--pp-microbatches", type=int, metavar="N", help="pipeline microbatches per micro-batch "
                   "(default: pp, or 2 x pp for the two-stages-per-rank schedules)")


def _auto_backend() -> str:
    """The backend ``--backend auto`` picks here (``"mlx"`` on Apple Silicon)."""
    from dsfs.backend import resolve_backend

    return resolve_backend("auto").name


PARALLEL_OPTIONS = ("dp_replicate", "dp_shard", "cp", "tp", "pp", "ep", "zero", "pp_schedule", "pp_microbatches")


def parallel_args(args) -> tuple[int, dict]:
    """The number of processes and the layout (`ParallelDims` fields) of ``dsfs train``'s options. Raises
    `ConfigError` for ``--nproc`` below 1."""
    dims = {k: getattr(args, k) for k in PARALLEL_OPTIONS if getattr(args, k) is not None}
    nproc = args.nproc
    if nproc is None:
        nproc = 1
        for k in ("dp_replicate", "dp_shard", "cp", "tp", "pp"):
            nproc *= max(1, dims.get(k, 1))
        if nproc == 1 and dims.get("ep", 1) > 1:  # EP borrows data ranks: --ep N alone means N of them
            nproc = dims["ep"]
    if nproc < 1:
        raise ConfigError(f"--nproc {nproc}: expected an integer >= 1")
    return nproc, dims


def _run_train(args) -> int:
    import torch

    from dsfs.train import dist_rank, train
    from dsfs.train_config import check_value

    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError(f"--threads {args.threads}: expected >= 1")
        torch.set_num_threads(args.threads)
    depths = args.num_nextn_predict_layers
    if depths is not None and depths < 0:
        raise ConfigError(f"--num-nextn-predict-layers {depths}: expected >= 0")
    fields = ("max_steps", "batch_size", "seq_len", "lr", "min_lr_ratio", "warmup_steps", "grad_accum",
              "eval_every", "eval_batches", "mtp_weight", "weight_decay", "grad_clip", "optimizer", "precision",
              "scale_fmt", "indexer_warmup_steps")
    for f in (*fields, "time_budget_s"):  # name the option, not the TrainConfig field
        v = getattr(args, "time_budget" if f == "time_budget_s" else f)
        if v is not None:
            check_value(f, v, cli=True)
    if args.keep_last is not None and args.keep_last < 0:
        raise ConfigError(f"--keep-last {args.keep_last}: expected an integer >= 0 (0 keeps every checkpoint)")
    if args.save_every is not None and args.save_every < 1:
        raise ConfigError(f"--save-every {args.save_every}: expected an integer >= 1")
    from dsfs.parallel.launch import finish, launch, launched_world_size

    nproc, dims = parallel_args(args)
    run_dir = args.out or (args.resume if isinstance(args.resume, str) else None) or f"runs/{args.preset or 'tiny'}"
    mlx = args.backend == "mlx" or (nproc > 1 and args.backend == "auto" and _auto_backend() == "mlx")
    if mlx and nproc > 1:  # data parallel over MLX's collectives (runtime_mlx.distributed)
        from dsfs.backend import resolve_backend
        from dsfs.parallel.layout import DEGREES

        if any(dims.get(k, 1) > 1 for k in DEGREES):
            raise ConfigError("--backend mlx trains data parallel only: pass --nproc N without --dp-shard, "
                              "--dp-replicate, --cp, --tp, --pp or --ep")
        if args.batch_size is not None and args.batch_size % nproc:  # once, before any start
            raise ConfigError(f"--batch-size {args.batch_size}: expected a multiple of the {nproc} processes (each "
                              "takes an equal share of the rows)")
        resolve_backend("mlx")  # BackendError where MLX cannot run
        from runtime_mlx.distributed import launch_mlx, launched

        if not launched():  # start the processes; each runs this command again
            from dsfs.parallel.launch import resume_hint

            return launch_mlx(args.argv, nproc, hint=lambda: resume_hint(run_dir))
    elif nproc > 1 and launched_world_size() == 1:  # start the workers; each runs this command again
        from dsfs.parallel.layout import ParallelDims

        ParallelDims(world_size=nproc, **dims)  # a layout that cannot fit fails here, once, before any start
        return launch(args.argv, nproc, run_dir)
    try:
        s = train(
            args.preset, args.data, args.out, resume=args.resume, init_from=args.init_from, backend=args.backend,
            seed=args.seed, model_overrides={"num_nextn_predict_layers": depths} if depths is not None else None,
            compile={"auto": "auto", "on": True, "off": False}[args.compile],
            keep_last=args.keep_last, save_every=args.save_every, overwrite=args.overwrite, verbose=not args.quiet,
            time_budget_s=args.time_budget, parallel=dims, **{f: getattr(args, f) for f in fields},
        )
        rank = dist_rank()
    finally:
        finish()
    if rank != 0:  # a worker other than rank 0: rank 0 prints the summary
        return 0
    note = " (stopped by the time budget; continue with --resume)" if s["stopped"] == "time_budget" else ""
    print(f"steps {s['steps']}{note}, {data.plural(s['tokens'], 'token')}, {s['tokens_per_s']:,.0f} tokens/s, "
          f"{s['elapsed_s']:.1f} s, backend {s['backend']} on {s['device']}")
    print(f"val loss {s['val_loss']:.4f} nats/token, perplexity {s['val_ppl']:.2f}")
    print(f"final model: {s['final_dir']}\ncheckpoint: {s['checkpoint']}\nmetrics: {s['metrics']}\n"
          f"plot: {s['plot']}")
    return 0


TOKENIZER_HELP = ("a tokenizer.json file, or a directory that holds one (default: the model directory's; "
                  "checkpoints from elsewhere may have none)")


def add_generate(sub) -> None:
    """Register ``dsfs generate``: sample a continuation of a prompt from a checkpoint."""
    p = sub.add_parser(
        "generate",
        help="continue a prompt with a trained model",
        description="Load a model (a Hugging Face model dir, or a run/checkpoints dir: its newest model), "
        "continue the prompt until eos or --max-new-tokens, print the text, then tokens/s on stderr. With --chat, "
        "the prompt is a user message of the chat template and only the assistant's reply is printed.",
    )
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="model, run or checkpoints directory")
    p.add_argument("--prompt", action="append", metavar="TEXT", help="text to continue; repeat for a batch "
                   "(default: 'Once upon a time')")
    p.add_argument("--prompt-file", metavar="PATH", help="more prompts, one per line (UTF-8), generated in one batch")
    p.add_argument("--num-return-sequences", type=int, default=1, metavar="N", help="completions per prompt "
                   "(default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=200, metavar="N", help="default: %(default)s")
    p.add_argument("--temperature", type=float, default=0.8, metavar="T", help="0: greedy (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=None, metavar="K", help="keep the K most likely tokens")
    p.add_argument("--top-p", type=float, default=None, metavar="P", help="nucleus sampling mass")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="sampling seed (default: %(default)s)")
    p.add_argument("--no-cache", action="store_true", help="rerun the whole prefix each token (no KV cache)")
    p.add_argument("--chat", action="store_true",
                   help="render --prompt as one user message of the chat template (bos, <|user|>, prompt, "
                   "<|assistant|>) and print only the reply, with <think>/</think> kept (for SFT/DPO/GRPO models)")
    p.add_argument("--tools", action="store_true", help="with --chat: give the model the calculator tool (a "
                   "<tool_call> runs it and appends the <tool_response>)")
    p.add_argument("--speculative", choices=["mtp"], help="speculative decoding: the model's MTP modules draft "
                   "tokens and one forward of the main model verifies them (DeepSeek-V3 report 5.4.3; greedy gives "
                   "the same text, sampling the same distribution); prints the acceptance per draft depth")
    p.add_argument("--num-speculative-tokens", type=int, metavar="N", help="with --speculative: drafts per step "
                   "(default: the MTP depth; more reuses the MTP modules in turn)")
    p.add_argument("--tokenizer", metavar="PATH", help=TOKENIZER_HELP)
    p.add_argument("--backend", default="reference", choices=["auto", "reference", "cuda", "mlx"],
                   help="reference: the plain-PyTorch model on --device (default); cuda: runtime_cuda (Triton "
                   "kernels); mlx: runtime_mlx; auto: mlx on Apple Silicon, cuda when available, else reference")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                   help="with --backend reference: default cuda when available, else cpu")
    p.set_defaults(func=_run_generate)


def _run_generate(args) -> int:
    from dsfs import generate as G
    from dsfs.checkpointing import resolve_model_dir

    if args.max_new_tokens < 0:
        raise DataError(f"--max-new-tokens {args.max_new_tokens}: expected >= 0")
    t, k, p = args.temperature, args.top_k, args.top_p
    if not (math.isfinite(t) and t >= 0):
        raise DataError(f"--temperature {t}: expected a finite number >= 0 (0: greedy)")
    if k is not None and k < 1:
        raise DataError(f"--top-k {k}: expected an integer >= 1")
    if p is not None and not 0 < p <= 1:
        raise DataError(f"--top-p {p}: expected a number in (0, 1]")
    if args.num_return_sequences < 1:
        raise DataError(f"--num-return-sequences {args.num_return_sequences}: expected an integer >= 1")
    prompts = list(args.prompt or [])
    if args.prompt_file is not None:
        try:
            prompts += [line for line in Path(args.prompt_file).read_text(encoding="utf-8").splitlines() if line]
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"--prompt-file {args.prompt_file}: cannot read it as UTF-8 text ({e})") from None
    if args.prompt_file is not None and len(prompts) == len(args.prompt or []):
        raise DataError(f"--prompt-file {args.prompt_file}: no prompts (expected one per line)")
    prompts = prompts or ["Once upon a time"]
    for prompt in prompts:
        G.check_prompt(prompt)
    if args.tools and not args.chat:
        raise DataError("--tools needs --chat (the tool-call format is the chat model's)")
    if args.num_speculative_tokens is not None and args.speculative is None:
        raise DataError("--num-speculative-tokens needs --speculative mtp")
    if args.speculative is not None:
        G.check_speculative(None, args.speculative, args.num_speculative_tokens, args.tools, not args.no_cache)
    model_dir = resolve_model_dir(args.checkpoint)
    tok = G.load_tokenizer(model_dir, args.tokenizer)
    if args.chat:  # before the model loads: fail fast on a tokenizer without the chat tokens
        from dsfs.chat import render

        render([{"role": "user", "content": prompts[0]}], tok, add_generation_prompt=True)
    model = _generate_model(model_dir, args.backend, args.device)
    gens = G.generate_texts(model, tok, prompts, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                            args.seed, use_cache=not args.no_cache, chat=args.chat,
                            num_return_sequences=args.num_return_sequences, tools=args.tools,
                            speculative=args.speculative, num_speculative_tokens=args.num_speculative_tokens)
    many = len(gens) > 1
    for i, g in enumerate(gens):
        print(f"--- {i}" if many else "", end="\n" if many else "")
        print(g.text)
    n = sum(g.new_tokens for g in gens)
    seconds = gens[0].seconds
    print(f"{data.plural(n, 'token')} in {seconds:.2f} s: {n / max(seconds, 1e-9):,.1f} tokens/s "
          f"({'no ' if args.no_cache else ''}KV cache, {data.plural(len(gens), 'sequence')}, {model_dir})",
          file=sys.stderr)
    st = gens[0].speculative
    if st is not None and st.steps:
        rates = ", ".join(f"depth {j} {a:.1%} ({n}/{d})" for j, (a, n, d) in
                          enumerate(zip(st.acceptance, st.accepted, st.drafted, strict=True), start=1) if d)
        per_seq = st.tokens_per_step / len(gens)
        print(f"speculative mtp: acceptance {rates}; {per_seq:.2f} tokens per verification step per sequence "
              f"({st.steps} steps over {data.plural(len(gens), 'sequence')})", file=sys.stderr)
    elif st is not None:
        print("speculative mtp: no verification step (nothing to draft for)", file=sys.stderr)
    return 0


def _generate_model(model_dir, backend: str, device: str):
    """The model ``dsfs generate`` runs: ``--backend`` resolved by `dsfs.backend.resolve_backend` (``reference``
    runs on ``--device``; ``cuda`` and ``mlx`` pick their own device, so another ``--device`` is a `DataError`)."""
    from dsfs import generate as G
    from dsfs.backend import resolve_backend
    from dsfs.checkpointing import load_model_dir

    if backend == "reference":
        return load_model_dir(model_dir, device=G.pick_device(device))
    be = resolve_backend(backend)
    if be.note:
        print(be.note, file=sys.stderr)
    if be.name == "reference":  # auto without a runtime: the reference on --device
        return load_model_dir(model_dir, device=G.pick_device(device))
    if device not in ({"auto", "cuda"} if be.name == "cuda" else {"auto"}):
        raise DataError(f"--device {device} applies to --backend reference; backend {be.name} runs on "
                        f"{'cuda' if be.name == 'cuda' else 'the MLX default device'}")
    return load_model_dir(model_dir, be.model_cls, device=be.device if be.name == "cuda" else None)


def add_eval(sub) -> None:
    """Register ``dsfs eval``: validation loss and perplexity of a checkpoint."""
    default_data = data.default_out_dir(data.DEFAULT_INPUT, data.DEFAULT_VOCAB)
    p = sub.add_parser(
        "eval",
        help="validation loss (nats/token) and perplexity of a model, or its accuracy on a task",
        description="Mean next-token cross-entropy of the main model (no MTP) over fixed, evenly spaced "
        "windows of a split, as the trainer's evaluations; with --task, greedy exact-match accuracy on the task's "
        "held-out problems (as dsfs sft and dpo evaluate), per split.",
    )
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="model, run or checkpoints directory")
    p.add_argument("--data", metavar="DIR", help=f"prepared data dir (default: {default_data})")
    p.add_argument("--split", default="val", choices=list(data.SPLITS), help="default: %(default)s")
    p.add_argument("--batches", type=int, default=16, metavar="N", help="default: %(default)s")
    p.add_argument("--batch-size", type=int, default=16, metavar="B", help="default: %(default)s")
    p.add_argument("--seq-len", type=int, default=256, metavar="T",
                   help="capped at the model's max_position_embeddings (default: %(default)s)")
    p.add_argument("--tokenizer", metavar="PATH", help=TOKENIZER_HELP + "; it must be the one --data was "
                   "prepared with")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                   help="default: cuda when available, else cpu")
    t = p.add_argument_group("task accuracy (instead of the loss)")
    t.add_argument("--task", choices=["arithmetic", "gsm8k"], help="greedy exact-match accuracy on its held-out "
                   "problems, with the chat template")
    t.add_argument("--splits", metavar="A,B", help="arithmetic splits (default: the training mixture's)")
    t.add_argument("--examples", type=int, default=200, metavar="N", help="held-out problems per split "
                   "(default: %(default)s)")
    t.add_argument("--seed", type=int, default=0, metavar="N", help="which held-out problems (default: %(default)s)")
    t.add_argument("--tools", action="store_true", help="give the model the calculator (a <tool_call> runs it and "
                   "appends the <tool_response>), as dsfs grpo --tools evaluates")
    p.set_defaults(func=_run_eval)


def _run_task_eval(args) -> int:
    from dsfs import generate as G
    from dsfs.checkpointing import load_model_dir, resolve_model_dir
    from dsfs.tasks import accuracy, load_task

    if args.examples < 1:
        raise DataError(f"--examples {args.examples}: expected >= 1")
    model_dir = resolve_model_dir(args.checkpoint)
    tok = G.load_tokenizer(model_dir, args.tokenizer)
    model = load_model_dir(model_dir, device=G.pick_device(args.device))
    task = load_task(args.task, num_held_out=args.examples, seed=args.seed,
                     splits=args.splits.split(",") if args.splits is not None else None)
    eos = model.config.eos_token_id[0] if isinstance(model.config.eos_token_id, list) else model.config.eos_token_id
    tools = None
    if args.tools:
        from dsfs.tools import TOOLS as tools

        data.require_special_tokens(tok, data.TOOL_TOKENS, "--tools (tool calls)", model_dir)
    acc = accuracy(model, tok, task.checks(tok), eos, task.max_new_tokens, tools=tools)
    for split in dict.fromkeys(task.splits):
        n = task.splits.count(split)
        v = acc.get(f"val_accuracy/{split}", acc["val_accuracy"])
        print(f"{args.task} {split}: accuracy {v:.4f} ({round(v * n)}/{n}, greedy exact match"
              f"{', with the calculator' if tools else ''})")
    if len(set(task.splits)) > 1:
        print(f"{args.task} all: accuracy {acc['val_accuracy']:.4f} ({len(task.splits)} problems, {model_dir})")
    return 0


def _run_eval(args) -> int:
    from dsfs.generate import evaluate_checkpoint

    if args.task is not None:
        return _run_task_eval(args)
    if args.tools:
        raise DataError("--tools applies to --task accuracy")

    for name in ("batches", "batch_size", "seq_len"):
        if getattr(args, name) < 1:
            raise DataError(f"--{name.replace('_', '-')} {getattr(args, name)}: expected >= 1")
    if args.data is None:
        args.data = data.default_out_dir(data.DEFAULT_INPUT, data.DEFAULT_VOCAB)
        if not args.data.is_dir():
            raise DataError(f"{args.data}: no such data directory (the default: run dsfs prepare first, or pass "
                            "--data DIR)")
    elif Path(args.data).is_file():
        raise DataError(f"--data {args.data} is a file; expected a dsfs prepare output directory")
    elif not Path(args.data).is_dir():
        raise DataError(f"--data {args.data}: no such data directory (expected a dsfs prepare output)")
    r = evaluate_checkpoint(args.checkpoint, args.data, args.split, args.batches, args.batch_size, args.seq_len,
                            args.device, args.tokenizer)
    print(f"{r['split']} loss {r['loss']:.4f} nats/token, perplexity {r['ppl']:.2f} "
          f"({data.plural(r['tokens'], 'token')}, {r['model_dir']})")
    return 0


def add_export(sub) -> None:
    """Register ``dsfs export``: write a checkpoint as a Hugging Face directory (optionally in DeepSeek's FP8
    layout), a GGUF file for llama.cpp or a Core ML package (`dsfs.export.export`)."""
    from dsfs.export import FORMATS
    from dsfs.gguf_export import OUTTYPES

    p = sub.add_parser(
        "export",
        help="write a checkpoint for other tools: a Hugging Face directory (optionally FP8), GGUF, Core ML",
        description="Read a model (a Hugging Face model dir, or a run/checkpoints dir: its newest model) and write "
        "it to --out, atomically. --format hf: config.json, model.safetensors (mtp.safetensors with MTP layers) and "
        "the tokenizer files; with --fp8 the attention and FFN matrices are stored as float8_e4m3fn with float32 "
        "weight_scale_inv per 128x128 block, as DeepSeek-V3's released checkpoint, and config.json gets its "
        "quantization_config; transformers, mlx_lm and dsfs open it as it is. --format gguf: one .gguf file that "
        "llama.cpp runs (architecture deepseek2, or deepseek32 for V3.2), with the tokenizer and chat template, "
        "tensors in --outtype. --format coreml: an .mlpackage with a fixed-length prefill and a KV-cache decode step.",
    )
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="model, run or checkpoints directory")
    p.add_argument("--out", required=True, metavar="PATH", help="output directory (hf), .gguf file (gguf) or "
                   ".mlpackage (coreml); must not exist, or --overwrite")
    p.add_argument("--format", default="hf", choices=list(FORMATS), help="output format (default: %(default)s)")
    p.add_argument("--outtype", choices=list(OUTTYPES), help="gguf: tensor type of the matrices (default: f16, as "
                   "llama.cpp's converter; norms and small vectors stay f32)")
    p.add_argument("--prefill-len", type=int, metavar="N", help="coreml: tokens per prefill call (default: 64)")
    p.add_argument("--context-len", type=int, metavar="N", help="coreml: positions the KV cache holds "
                   "(default: min(512, max_position_embeddings))")
    p.add_argument("--fp8", action="store_true", help="FP8 e4m3 weights in 128x128 blocks (DeepSeek's layout)")
    p.add_argument("--scale-fmt", choices=["ue8m0"], help="with --fp8: power-of-two scales (as DeepSeek-V3.1); "
                   "default: float32 scales amax/448")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out that holds a model directory "
                   "(or nothing)")
    p.add_argument("-q", "--quiet", action="store_true", help="no summary line (nor coremltools' progress bars)")
    p.set_defaults(func=_run_export)


def _run_export(args) -> int:
    import contextlib
    import io

    from dsfs.export import export

    # coremltools draws tqdm progress bars on stderr while it converts; errors still arrive as exceptions
    quiet = contextlib.redirect_stderr(io.StringIO()) if args.quiet else contextlib.nullcontext()
    with quiet:
        r = export(args.checkpoint, args.out, args.format, args.fp8, args.scale_fmt, args.overwrite, args.outtype,
                   args.prefill_len, args.context_len)
    if not args.quiet:
        if args.format == "gguf":
            what = f"GGUF {r['arch']}, {r['tensors']} tensors, {r['outtype']}"
        elif args.format == "coreml":
            what = f"Core ML package, prefill {r['prefill_len']} tokens, cache {r['context_len']} positions"
        else:
            what = (f"{r['fp8_tensors']} of {r['tensors']} tensors in FP8 e4m3"
                    f"{' (ue8m0 scales)' if args.scale_fmt else ''}" if args.fp8 else f"{r['tensors']} tensors")
        print(f"exported {r['model_dir']} to {r['out']}: {what}, {r['bytes'] / 2**20:,.1f} MiB")
    return 0


# one add_<verb> function per verb, in --help order
def add_sft(sub) -> None:
    """Register ``dsfs sft`` (`dsfs.sft.add_sft`)."""
    from dsfs.sft import add_sft as add

    add(sub)


def add_dpo(sub) -> None:
    """Register ``dsfs dpo`` (`dsfs.dpo.add_dpo`)."""
    from dsfs.dpo import add_dpo as add

    add(sub)


def add_distill(sub) -> None:
    """Register ``dsfs distill`` (`dsfs.distill.add_distill`)."""
    from dsfs.distill import add_distill as add

    add(sub)


def add_grpo(sub) -> None:
    """Register ``dsfs grpo`` (`dsfs.grpo.add_grpo`)."""
    from dsfs.grpo import add_grpo as add

    add(sub)


def add_pipeline(sub) -> None:
    """Register ``dsfs pipeline`` (`dsfs.pipeline.add_pipeline`)."""
    from dsfs.pipeline import add_pipeline as add

    add(sub)


COMMANDS = [add_prepare, add_train, add_plan, add_generate, add_eval, add_sft, add_dpo, add_distill, add_grpo,
            add_pipeline, add_export, add_check, add_bench]


def build_parser() -> argparse.ArgumentParser:
    """The ``dsfs`` parser with one subparser per entry of ``COMMANDS``."""
    parser = _Parser(prog="dsfs", description="DeepSeek-V3 kernels, benchmarks and training.")
    sub = parser.add_subparsers(dest="verb", metavar="<verb>")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``dsfs`` with ``argv`` (default ``sys.argv[1:]``); return the exit code.

    0 on success (and for ``--help``), 1 on bad input or an OS error, 2 on a bad command line, 130 on Ctrl-C,
    143 on SIGTERM (a training run checkpoints first: `dsfs.loop.Interrupted`).
    Errors print one line to stderr: ``dsfs: error: <reason>``.
    """
    parser = build_parser()
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        return _main(parser, argv)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings (a checkpoint's missing MTP depths, a Metal fallback, ...) as one ``dsfs: warning:`` line (rank 0
    only in a multi-process run)."""
    if _quiet_rank():
        return
    print(f"dsfs: warning: {message}", file=sys.stderr)


def _quiet_rank() -> bool:
    """Whether this process is a worker of a multi-process run other than rank 0 (torchrun's ``RANK`` or MLX's
    ``MLX_RANK``): its errors and warnings are rank 0's too, printed once there."""
    return os.environ.get("RANK", os.environ.get("MLX_RANK", "0")) != "0"


def _main(parser: argparse.ArgumentParser, argv: list[str] | None) -> int:
    try:
        args = parser.parse_args(argv)
        args.argv = list(sys.argv[1:] if argv is None else argv)
        if args.verb is None:
            parser.print_help(sys.stderr)
            return 2
        return int(args.func(args) or 0)
    except _UsageError as e:
        if not _quiet_rank():
            print(f"dsfs: error: {e}", file=sys.stderr)
        return 2
    except (UserError, OSError) as e:
        if not _quiet_rank():
            print(f"dsfs: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # Ctrl-C, or dsfs.loop.Interrupted carrying the signal (SIGTERM: 143)
        signum = getattr(e, "signum", signal.SIGINT)
        print("dsfs: interrupted" if signum == signal.SIGINT else f"dsfs: stopped by {signal.Signals(signum).name}",
              file=sys.stderr)
        return 128 + signum
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
