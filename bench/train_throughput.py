"""Training throughput of the reference model vs transformers' DeepseekV3ForCausalLM, in one run.

Both models get the same configuration (``--shape tiny``: the model `uv run dsfs train` trains by default;
``--shape issue``: hidden 256, 4 layers, MLA, 8 routed experts top-2 + 1 shared, the first layer dense; vocab
4096 in both), the same batches (16 x 256 tokens of the prepared TinyStories sample, or random tokens) and the
same optimizer, and train the same number of steps. ``--optimizer adamw`` (default): AdamW lr 2e-3, PyTorch's
fused implementation; ``--optimizer muon``: `reference.muon.Muon` (what `dsfs train` uses for the tiny preset) on
the hidden matrices of both models, AdamW on embeddings, LM head, routers and vectors. The reference is compiled
as `dsfs train` does it (`dsfs.trainer.compiled_loss`); warm-up steps absorb the compilation. MTP is off for the
like-for-like comparison (transformers does not train MTP); the reference with MTP depth 1 is timed as well.

The models train interleaved: the timed steps are cut into rounds and every model runs each round in turn, so a
change in the machine's load (runs here spread by +-15% from one minute to the next) falls on all of them alike.
Besides each model's tokens/s over all rounds, the table gives the range of its per-round ratios.

    uv run python bench/train_throughput.py                 # prints the table, writes bench/results/*.json
    uv run python bench/train_throughput.py --shape issue
    uv run python bench/train_throughput.py --optimizer muon
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time

import torch

from dsfs.presets import MODEL_PRESETS
from dsfs.trainer import compiled_loss
from reference import Model, ModelConfig
from reference.muon import Muon

SHAPES = {
    # the model `uv run dsfs train` trains by default (MTP set per row below)
    "tiny": {**MODEL_PRESETS["tiny"], "vocab_size": 4096},
    # the transformers example of issue 3: hidden 256, 4 layers, 8 routed experts top-2 (8.5M parameters)
    "issue": dict(vocab_size=4096, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                  intermediate_size=768, moe_intermediate_size=256, n_routed_experts=8, num_experts_per_tok=2,
                  n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=64,
                  qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, max_position_embeddings=1024,
                  n_group=1, topk_group=1, routed_scaling_factor=1.0),
}
SHAPE = dict(SHAPES["tiny"])  # the shape being timed (main sets it from --shape)
OPTIMIZER = ["adamw"]  # the optimizer of every model (main sets it from --optimizer)


def make_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    """``OPTIMIZER[0]`` at lr 2e-3 over ``model``: fused AdamW on everything, or Muon on the matrices other than
    embeddings, LM head and routers (found by name, the same in both models: ``embed_tokens``, ``lm_head``,
    ``mlp.gate.weight``) with fused AdamW on those and on vectors."""
    if OPTIMIZER[0] == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=2e-3, fused=True)
    muon, adam = [], []
    for name, p in model.named_parameters():
        aux = p.ndim < 2 or "embed_tokens" in name or "lm_head" in name or name.endswith("mlp.gate.weight")
        (adam if aux else muon).append(p)
    return Muon([{"params": muon}, {"params": adam, "use_muon": False}], lr=2e-3, fused=True)


def batches(n: int, b: int, t: int, seed: int = 0):
    """``n`` (input_ids, targets) pairs of shape (b, t), from the prepared sample when present."""
    g = torch.Generator().manual_seed(seed)
    try:
        from dsfs import data

        tokens = data.load_tokens(data.prepare(verbose=False), "train")
        return [data.get_batch(tokens, b, t, g) for _ in range(n)]
    except Exception:  # no data: random tokens time the same work
        ids = [torch.randint(0, SHAPE["vocab_size"], (b, t + 1), generator=g) for _ in range(n)]
        return [(x[:, :-1].contiguous(), x[:, 1:].contiguous()) for x in ids]


def reference_step(mtp: int, compile: bool):
    torch.manual_seed(0)
    model = Model(ModelConfig(**{**SHAPE, "num_nextn_predict_layers": mtp})).train()
    opt = make_optimizer(model)
    loss_fn = compiled_loss(model) if compile else model.loss

    def step(x, y):
        loss_fn(x, y).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.update_moe_bias()

    return step


def transformers_step(compile: bool):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    logging.getLogger("transformers").setLevel(logging.ERROR)
    torch.manual_seed(0)
    cfg = DeepseekV3Config(**{**SHAPE, "num_nextn_predict_layers": 0, "num_mtp_layers": 0},
                           num_key_value_heads=SHAPE["num_attention_heads"], rope_interleave=True)
    model = DeepseekV3ForCausalLM(cfg).train()
    opt = make_optimizer(model)
    fwd = torch.compile(model) if compile else model

    def step(x, y):
        logits = fwd(input_ids=x).logits
        torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), y.view(-1)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def interleaved(steppers: dict, data, warmup: int, rounds: int) -> tuple[dict, dict]:
    """Train every model of ``steppers`` (name -> step function) on the same batches, interleaved: after
    ``warmup`` untimed steps each, the timed batches are cut into ``rounds`` slices and every model runs each
    slice in turn (the order rotating per round), so a change in the machine's load falls on all of them alike.
    Returns tokens/s per model over all timed steps, and each model's per-round times (s)."""
    for step in steppers.values():
        for x, y in data[:warmup]:
            step(x, y)
    timed = data[warmup:]
    rounds = max(1, min(rounds, len(timed)))  # no empty round (its time would be 0)
    per = len(timed) // rounds
    names = list(steppers)
    times = {n: [] for n in names}
    for r in range(rounds):
        chunk = timed[r * per:(r + 1) * per]
        for n in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            for x, y in chunk:
                steppers[n](x, y)
            times[n].append(time.perf_counter() - t0)
    tokens = sum(x.numel() for x, _ in timed[:per * rounds])
    return {n: tokens / sum(ts) for n, ts in times.items()}, times


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=40, help="timed steps per model")
    p.add_argument("--rounds", type=int, default=8, help="interleaving rounds the timed steps are cut into")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--shape", choices=sorted(SHAPES), default="tiny",
                   help="tiny: the default dsfs train model; issue: hidden 256 as issue 3's transformers example")
    p.add_argument("--optimizer", choices=["adamw", "muon"], default="adamw", help="the optimizer of every model")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    p.add_argument("--out", default=None, help="JSON results (default: bench/results/train_throughput_<shape>.json)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    SHAPE.clear()
    SHAPE.update(SHAPES[args.shape])
    OPTIMIZER[0] = args.optimizer
    data = batches(args.warmup + args.steps, args.batch_size, args.seq_len)
    rows = [
        ("transformers DeepseekV3ForCausalLM (eager)", lambda: transformers_step(False)),
        ("reference, MTP 0 (eager)", lambda: reference_step(0, False)),
        ("reference, MTP 1 (eager)", lambda: reference_step(1, False)),
    ]
    if not args.no_compile:
        rows += [
            ("reference, MTP 0 (torch.compile)", lambda: reference_step(0, True)),
            ("reference, MTP 1 (torch.compile)", lambda: reference_step(1, True)),
        ]
    t0 = time.perf_counter()
    steppers = {name: make() for name, make in rows}
    results, times = interleaved(steppers, data, args.warmup, args.rounds)
    base = rows[0][0]
    print(f"{len(times[base])} rounds of {args.steps // len(times[base])} steps per model, interleaved "
          f"({time.perf_counter() - t0:.0f} s in all)\n")
    print(f"{'model':45s} {'tokens/s':>9s}  {'ratio':>6s}  {'per-round ratio, min..max':>25s}")
    for name, tps in results.items():
        per_round = sorted(b / a for a, b in zip(times[name], times[base], strict=True))
        print(f"{name:45s} {tps:9.0f}  {tps / results[base]:5.2f}x  {per_round[0]:11.2f}x .. {per_round[-1]:.2f}x")
    suffix = "" if args.optimizer == "adamw" else f"_{args.optimizer}"
    out = args.out or os.path.join(os.path.dirname(__file__), "results",
                                   f"train_throughput_{args.shape}{suffix}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"tokens_per_s": results, "round_times_s": times, "args": vars(args), "torch": torch.__version__,
                   "machine": platform.processor() or platform.machine(), "threads": args.threads}, f, indent=2)


if __name__ == "__main__":
    main()
