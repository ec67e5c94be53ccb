"""Data-parallel training throughput: N processes (gloo on CPU, NCCL on GPUs) against one at the same global batch,
and the communication share of a step, in one run.

Every configuration trains the tiny preset's model (the one `uv run dsfs train` trains; MTP depth 1, Muon or
AdamW, eager) on the same global batches (``--batch-size`` x ``--seq-len`` random tokens, vocab 4096) for
``--steps`` timed steps after ``--warmup`` untimed ones:

- ``1 process``: `dsfs.trainer.TorchTrainer` with every CPU thread (``torch.get_num_threads()``);
- ``N processes``: `dsfs.parallel.trainer.ParallelTrainer` at ZeRO-3 (FSDP2) and at ZeRO-1 (DDP +
  ZeroRedundancyOptimizer), each rank with ``threads / N`` threads and ``batch / N`` rows;
- ``compute only``: one process doing one rank's share (``batch / N`` rows, ``threads / N`` threads) with no
  communication at all. The communication share of a parallel step is ``1 - compute_only / parallel``: the time a
  rank spends in collectives and waiting for the others (load imbalance included).

    uv run python -m bench.parallel_throughput                      # 2 processes, CPU; prints the table
    uv run python -m bench.parallel_throughput --nproc 2 --json bench/results/parallel_throughput.json

On a machine with GPUs it uses one GPU per process (NCCL) and the one-process baseline on GPU 0.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from dsfs.presets import MODEL_PRESETS, TRAIN_PRESETS
from dsfs.train_config import TrainConfig
from reference import Model, ModelConfig

VOCAB = 4096


def config() -> ModelConfig:
    """The tiny preset's model with a 4,096-token vocab (the prepared TinyStories sample's)."""
    return ModelConfig(**{**MODEL_PRESETS["tiny"], "vocab_size": VOCAB})


def train_config(args) -> TrainConfig:
    return TRAIN_PRESETS["tiny"].replace(batch_size=args.batch_size, seq_len=args.seq_len, optimizer=args.optimizer,
                                         max_steps=args.warmup + args.steps)


def batches(args, n: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (args.batch_size, args.seq_len + 1), generator=g)
        out.append({"input_ids": ids[:, :-1], "targets": ids[:, 1:]})
    return out


def timed(trainer, data: list[dict], warmup: int) -> float:
    """Seconds per step over ``data[warmup:]`` (each step: one micro-step and the optimizer step)."""
    for b in data[:warmup]:
        trainer.micro_step(b, 1)
        trainer.optimizer_step(1e-3)
    t0 = time.perf_counter()
    for b in data[warmup:]:
        trainer.micro_step(b, 1)
        trainer.optimizer_step(1e-3)
    return (time.perf_counter() - t0) / (len(data) - warmup)


def device_for(rank: int) -> torch.device:
    return torch.device("cuda", rank) if torch.cuda.is_available() else torch.device("cpu")


def one_process(args, rows: int, threads: int) -> float:
    """Seconds per step of `TorchTrainer` (eager) on ``rows``-row batches with ``threads`` threads."""
    from dsfs.trainer import TorchTrainer

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    tc = train_config(args)
    t = TorchTrainer(Model(config()), device_for(0), tc.lr, tc.weight_decay, tc.grad_clip, tc.mtp_weight,
                     compile=False, optimizer=args.optimizer)
    data = [{k: v[:rows] for k, v in b.items()} for b in batches(args, args.warmup + args.steps)]
    return timed(t, data, args.warmup)


def _worker(rank: int, nproc: int, port: int, out: str, args, threads: int) -> None:
    import torch.distributed as dist

    from dsfs.parallel.layout import Layout, ParallelDims
    from dsfs.parallel.trainer import ParallelTrainer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    device = device_for(rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=nproc)
    result = {}
    for zero in (3, 1):
        torch.manual_seed(0)
        layout = Layout.build(ParallelDims(world_size=nproc, zero=zero), device)
        trainer = ParallelTrainer(Model(config()), layout, train_config(args))
        result[f"zero{zero}"] = timed(trainer, batches(args, args.warmup + args.steps), args.warmup)
    if rank == 0:
        torch.save(result, Path(out) / "parallel.pt")
    dist.barrier()
    dist.destroy_process_group()


def parallel(args, threads: int) -> dict:
    """Seconds per step of `ParallelTrainer` on ``args.nproc`` processes at ZeRO-3 and ZeRO-1."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_worker, args=(args.nproc, port, out, args, threads), nprocs=args.nproc,
                           start_method="spawn")
        return torch.load(Path(out) / "parallel.pt")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8, help="global sequences per step (default: the tiny preset's)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--optimizer", default="muon", choices=["adamw", "muon"])
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    if args.batch_size % args.nproc:
        p.error(f"--batch-size {args.batch_size} must divide by --nproc {args.nproc}")
    threads = torch.get_num_threads()
    per_rank = max(1, threads // args.nproc)
    tokens = args.batch_size * args.seq_len
    one = one_process(args, args.batch_size, threads)
    alone = one_process(args, args.batch_size // args.nproc, per_rank)
    par = parallel(args, per_rank)
    rows = [("1 process", threads, one)] + [(f"{args.nproc} processes, ZeRO-{k[-1]}", per_rank, v)
                                           for k, v in par.items()]
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"{platform.processor() or 'CPU'}, " \
        f"{os.cpu_count()} cores"
    print(f"global batch {args.batch_size} x {args.seq_len} = {tokens:,} tokens/step, tiny preset "
          f"({args.optimizer}), {device}")
    print(f"{'configuration':28s} {'threads/proc':>12s} {'s/step':>8s} {'tokens/s':>9s} {'vs 1 process':>12s} "
          f"{'comm share':>10s}")
    out = {"nproc": args.nproc, "tokens_per_step": tokens, "device": device, "optimizer": args.optimizer,
           "compute_only_s": alone, "rows": []}
    for name, th, s in rows:
        share = "" if name == "1 process" else f"{1 - alone / s:10.0%}"
        print(f"{name:28s} {th:12d} {s:8.3f} {tokens / s:9,.0f} {one / s:11.2f}x {share}")
        out["rows"].append({"configuration": name, "threads": th, "s_per_step": s, "tokens_per_s": tokens / s,
                            "speedup": one / s, "comm_share": None if name == "1 process" else 1 - alone / s})
    print(f"{'compute only (one rank share)':28s} {per_rank:12d} {alone:8.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
