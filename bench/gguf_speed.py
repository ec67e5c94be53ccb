"""Batch-1 greedy generation speed of dsfs against llama.cpp on the same checkpoint, in one run (not an asv suite).

The checkpoint is exported to GGUF once per ``--outtype`` (`dsfs.export.export`, into a temporary directory), then
both generate ``--tokens`` new tokens greedily from the same prompt ids: dsfs with `reference.Model.generate`
(float32, KV cache, ``temperature=0``), llama.cpp through llama-cpp-python (one ``eval`` per new token through its
KV cache, argmax of the logits; default f16 KV cache). Both run ``--threads`` CPU threads (torch intra-op threads;
llama.cpp ``n_threads``). The prompt is eos + "Once upon a time" encoded by the checkpoint's tokenizer (as ``dsfs
generate`` starts a prompt), or 8 random ids without one. Each side runs once to warm up, then ``--repeats`` times;
the best run counts. tokens/s = new tokens / wall time of the whole generation, the prompt's prefill included (the
prompt is short). The table gives tokens/s, llama.cpp / dsfs, and whether the greedy tokens agree (else the first
new token that differs: quantized weights change the logits, f32 should agree), and the relative error of llama.cpp's
logits over dsfs's whole greedy sequence (Frobenius over all positions, llama.cpp's KV cache in f32: `logits_error`).

llama.cpp's extra weight buffers (the repacked and AMX layouts) are off unless ``--extra-bufts``: on the 2-core CI
VM, a CPU that reports AMX, their AMX kernels kill the process with SIGILL for q8_0 / q4_0 weights. Its OpenMP
threads wait passively (``OMP_WAIT_POLICY=PASSIVE``, set before torch loads libgomp, which llama.cpp shares): spinning
waits made each llama.cpp token cost about 0.6 s on a busy 2-core machine.

    uv run python -m bench.gguf_speed --checkpoint runs/tiny/final
    uv run python -m bench.gguf_speed --checkpoint runs/tiny/final --outtype f32 q8_0 --tokens 128 --threads 2
"""

from __future__ import annotations

import os

if __name__ == "__main__":  # run as a script: before torch loads libgomp, which llama.cpp shares (not on import)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

PROMPT = "Once upon a time"


def prompt_ids(model_dir: Path, config) -> list[int]:
    """eos + the encoded `PROMPT` with the checkpoint's tokenizer, or 8 seeded random ids without one."""
    file = model_dir / "tokenizer.json"
    if not file.is_file():
        return torch.randint(0, config.vocab_size, (8,), generator=torch.Generator().manual_seed(0)).tolist()
    from dsfs.data import read_tokenizer

    eos = config.eos_token_id[0] if isinstance(config.eos_token_id, list) else config.eos_token_id
    return [eos] + read_tokenizer(file).encode(PROMPT, add_special_tokens=False).ids


def best_of(repeats: int, run) -> tuple[float, list[int]]:
    """(the shortest wall time in seconds of ``repeats`` calls of ``run()`` after one warm-up call, its tokens)."""
    tokens = run()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        tokens = run()
        times.append(time.perf_counter() - t0)
    return min(times), tokens


def dsfs_greedy(model, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        return model.generate(torch.tensor([ids]), n, temperature=0.0)[0].tolist()


def llama_greedy(llm, ids: list[int], n: int) -> list[int]:
    """``ids`` then ``n`` greedy tokens, one llama.cpp decode step each."""
    llm.reset()
    llm.eval(ids)
    out = list(ids)
    for _ in range(n):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval(out[-1:])
    return out


def open_llama(path: Path, n_ctx: int, threads: int, extra_bufts: bool, **kw):
    """llama-cpp-python's ``Llama`` over ``path`` (``kw``: more of its arguments); llama.cpp's extra weight buffers
    only with ``extra_bufts``."""
    import llama_cpp
    from llama_cpp import llama_cpp as lib

    defaults = lib.llama_model_default_params

    def params():
        p = defaults()
        p.use_extra_bufts = extra_bufts
        return p

    lib.llama_model_default_params = params
    try:
        return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                               logits_all=True, verbose=False, **kw)  # scores: kept only with logits_all
    finally:
        lib.llama_model_default_params = defaults


def logits_error(model, path: Path, ids: list[int], threads: int, extra_bufts: bool) -> float:
    """The relative error (Frobenius, `reference.testing.rel_err`) of llama.cpp's logits of ``ids`` against
    ``model``'s, with llama.cpp's KV cache in f32 and no flash attention (its defaults cache keys in f16)."""
    import llama_cpp

    from reference.testing import rel_err

    llm = open_llama(path, len(ids), threads, extra_bufts, type_k=llama_cpp.GGML_TYPE_F32,
                     type_v=llama_cpp.GGML_TYPE_F32, flash_attn=False)
    try:
        llm.eval(ids)
        theirs = np.array(llm.scores[:len(ids)], dtype=np.float64)
    finally:
        llm.close()
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0].double().numpy()
    return rel_err(theirs, ours)


def agreement(ours: list[int], theirs: list[int], start: int) -> str:
    """'yes', or the index (from 0) of the first new token where the two differ."""
    diff = next((i for i, (a, b) in enumerate(zip(ours[start:], theirs[start:], strict=True)) if a != b), None)
    return "yes" if diff is None else f"no (new token {diff})"


def main(argv=None) -> None:
    from dsfs.checkpointing import load_model_dir, resolve_model_dir
    from dsfs.export import export
    from dsfs.gguf_export import OUTTYPES

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="model, run or checkpoints directory")
    p.add_argument("--outtype", nargs="+", default=["f32", "q8_0"], choices=OUTTYPES, help="GGUF tensor types")
    p.add_argument("--tokens", type=int, default=128, help="new tokens per generation (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads of both (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs after a warm-up; the best counts")
    p.add_argument("--extra-bufts", action="store_true", help="let llama.cpp use its repacked / AMX weight buffers")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model_dir = resolve_model_dir(args.checkpoint)
    model = load_model_dir(model_dir)
    ids = prompt_ids(model_dir, model.config)
    n = min(args.tokens, model.config.max_position_embeddings - len(ids))
    t_dsfs, ours = best_of(args.repeats, lambda: dsfs_greedy(model, ids, n))
    rows = [("dsfs (reference, f32)", n / t_dsfs, 1.0, "-", "-")]
    with tempfile.TemporaryDirectory() as tmp:
        for outtype in args.outtype:
            path = Path(tmp) / f"model-{outtype}.gguf"
            export(model_dir, path, "gguf", outtype=outtype)
            llm = open_llama(path, len(ids) + n + 1, args.threads, args.extra_bufts)
            try:
                t, theirs = best_of(args.repeats, lambda llm=llm: llama_greedy(llm, ids, n))
            finally:
                llm.close()
            err = logits_error(model, path, ours[:-1], args.threads, args.extra_bufts)
            rows.append((f"llama.cpp {outtype}", n / t, t_dsfs / t, agreement(ours, theirs, len(ids)), f"{err:.1e}"))
    print(f"{model_dir}: {len(ids)} prompt tokens, {n} new tokens, batch 1, greedy, {args.threads} threads, "
          f"best of {args.repeats}")
    print(f"| {'runtime':<22} | {'tokens/s':>9} | {'vs dsfs':>7} | {'greedy tokens agree':<20} | logits rel. err |")
    print(f"|{'-' * 24}|{'-' * 10}:|{'-' * 8}:|{'-' * 22}|{'-' * 16}:|")
    for name, tps, ratio, agree, err in rows:
        print(f"| {name:<22} | {tps:>9.1f} | {ratio:>6.2f}x | {agree:<20} | {err:>15} |")


if __name__ == "__main__":
    main()
