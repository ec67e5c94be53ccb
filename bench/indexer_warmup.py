"""The lightning indexer's dense warm-up on TinyStories (DeepSeek-V3.2 report section 2.1; the V4 report's indexer
warm-up), for DSA and CSA: the indexer's top-k recall of the dense attention's top-k keys, for a random indexer and
after the warm-up.

``python -m bench.indexer_warmup --checkpoint DIR --data DIR [--steps N]``: a trained checkpoint with lightning
indexers (``dsfs train --preset tiny-v32`` for DSA, ``--preset tiny-v4`` for CSA; their ``final/``). Its indexers are
re-drawn at random (the model's own initialization), their recall measured on held-out validation sequences
(`reference.model.indexer_recall`: per query with more than ``index_topk`` visible keys, the share of the dense
attention's top-``index_topk`` keys, by mass summed over heads, that the indexer's top-``index_topk`` holds), then the
warm-up runs ``--steps`` steps on training batches (main model frozen, dense attention, the indexers trained by
`reference.dsa.indexer_kl`: `dsfs.trainer.TorchTrainer` with ``indexer_warmup_steps``), and the recall is measured
again. Prints one line per indexer layer and the means; ``--json`` writes them.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from dsfs import data as data_mod
from dsfs.trainer import TorchTrainer
from reference import Model
from reference.model import indexer_layers, indexer_recall


@torch.no_grad()
def reset_indexers(model: torch.nn.Module, seed: int = 0) -> None:
    """Re-draw every indexer parameter as the model initializes them (normal(0, initializer_range) matrices, unit norm
    gains, zero position biases), from a generator seeded with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    std = model.config.initializer_range
    for name, p in model.named_parameters():
        if ".indexer." not in name:
            continue
        if name.endswith("position_bias") or name.endswith(".bias"):
            p.zero_()
        elif p.ndim == 1:
            p.fill_(1.0)
        else:
            p.copy_(torch.randn(p.shape, generator=g) * std)


def warmup(checkpoint: str, data_dir: str, steps: int, lr: float, batch_size: int, seq_len: int,
           eval_batches: int, seed: int = 0, threads: int | None = None) -> dict:
    """Recall of a random indexer and after ``steps`` warm-up steps (see the module docstring). Returns a dict with
    ``random``/``warmed`` (per layer), their means, the KL at the first and last step and the seconds taken."""
    if threads:
        torch.set_num_threads(threads)
    model = Model.from_pretrained(checkpoint)
    if not indexer_layers(model):
        raise SystemExit(f"{checkpoint}: the model has no lightning indexer (expected DSA or CSA layers)")
    reset_indexers(model, seed)
    meta = data_mod.load_meta(data_dir)
    train_tokens, val_tokens = data_mod.load_tokens(data_dir, "train"), data_mod.load_tokens(data_dir, "val")
    g_val = torch.Generator().manual_seed(seed + 1)
    held = [data_mod.get_batch(val_tokens, batch_size, seq_len, g_val)[0] for _ in range(eval_batches)]

    def recall() -> list[float]:
        per = [indexer_recall(model, x) for x in held]
        return [sum(r[i] for r in per) / len(per) for i in range(len(per[0]))]

    model.eval()
    before = recall()
    trainer = TorchTrainer(model, torch.device("cpu"), lr, 0.0, 1.0, 0.0, False, "adamw", indexer_warmup_steps=steps)
    g = torch.Generator().manual_seed(seed)
    kls, t0 = [], time.perf_counter()
    for step in range(steps):
        trainer.begin_step(step)
        x, y = data_mod.get_batch(train_tokens, batch_size, seq_len, g)
        kls.append(trainer.micro_step({"input_ids": x, "targets": y}, 1)["indexer_loss"])
        trainer.optimizer_step(lr)
    seconds = time.perf_counter() - t0
    model.eval()
    after = recall()
    return {"checkpoint": checkpoint, "model_type": model.config.model_type, "vocab": meta["vocab_size"],
            "steps": steps, "lr": lr, "batch_size": batch_size, "seq_len": seq_len,
            "index_topk": [m.index_topk for m in indexer_layers(model)][: len(after)], "random": before,
            "warmed": after,
            "random_mean": sum(before) / len(before), "warmed_mean": sum(after) / len(after),
            "kl_first": kls[0], "kl_last": kls[-1], "seconds": seconds}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a trained model directory with DSA or CSA layers")
    p.add_argument("--data", required=True, help="prepared data directory (dsfs prepare)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--eval-batches", type=int, default=4)
    p.add_argument("--threads", type=int)
    p.add_argument("--json", help="write the results here")
    a = p.parse_args(argv)
    r = warmup(a.checkpoint, a.data, a.steps, a.lr, a.batch_size, a.seq_len, a.eval_batches, threads=a.threads)
    for i, (b, w) in enumerate(zip(r["random"], r["warmed"], strict=True)):
        print(f"indexer layer {i}: top-{r['index_topk'][i]} recall {b:.3f} random -> {w:.3f} after {a.steps} steps")
    print(f"{r['model_type']}: mean recall {r['random_mean']:.3f} -> {r['warmed_mean']:.3f}; KL {r['kl_first']:.3f} "
          f"-> {r['kl_last']:.3f}; {r['seconds']:.0f} s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(r, f, indent=2)


if __name__ == "__main__":
    main()
