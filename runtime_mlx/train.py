"""The MLX training loop behind ``dsfs train --backend mlx``: the reference loop (`dsfs.train`) in MLX.

Same presets, schedule and outputs as `dsfs.train.train`: AdamW (betas (0.9, 0.95), bias-corrected, decoupled
weight decay on matrices only: none on norms, biases, embeddings) through ``mlx.optimizers.MultiOptimizer``,
linear warmup + cosine learning rate (`dsfs.train.lr_at`, set before each step), gradient accumulation,
``optim.clip_grad_norm``, the MTP loss weight, and the auxiliary-loss-free MoE bias update applied eagerly
after each optimizer step (the loads come out of the compiled step). The micro-step (``nn.value_and_grad`` of
`runtime_mlx.Model.loss`) and the update are each one ``mx.compile``d function: every shape in the model is
static (the experts' ``gather_mm`` runs over all N*K token copies), so the MoE compiles without graph breaks.

Carries over between backends (a run started with one continues with the other): the checkpoint directory
holds the Hugging Face model (`runtime_mlx.Model.save_pretrained`) and ``trainer_state.pt`` written by
`dsfs.checkpointing.save_checkpoint` with the reference's keys; the optimizer state is stored in the layout of
``torch.optim.AdamW.state_dict()`` of the reference's `dsfs.train.make_optimizer` (moments, step, groups), so
weights, correction biases, Adam moments, step, token count, data generator and torch RNG state all carry
over, both ways. A fresh run draws its initial weights with the reference model under ``torch.manual_seed(seed)``
and batches with the same torch generator, so both backends start from the same weights and see the same data.

On Linux, MLX's CPU wheel uses a slow bundled BLAS; preloading OpenBLAS speeds it up about 20x (DESIGN.md):
``LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0 dsfs train --backend mlx``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import torch
from mlx.utils import tree_flatten, tree_map, tree_unflatten
from tqdm import tqdm

from dsfs import data as data_mod
from dsfs.checkpointing import (
    CHECKPOINTS,
    FINAL,
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_trainer_state,
    save_checkpoint,
    step_dir_name,
)
from dsfs.data import DataError
from dsfs.generate import eval_starts
from dsfs.presets import TRAIN_PRESETS
from dsfs.train import (
    BETAS,
    METRICS,
    PLOT,
    STATE_KEYS,
    TRAIN_FIELDS,
    TrainError,
    _check_train_config,
    _config_diff,
    _read_metrics,
    _SigintFlag,
    _write_metrics,
    lr_at,
    make_optimizer,
    model_config,
    plot_losses,
)
from reference import Model as ReferenceModel
from reference import ModelConfig

from . import kernels
from .checkpoint import load_torch_state_dict
from .model import Model

# ---------------------------------------------------------------- weights and optimizer


def init_from_reference(cfg: ModelConfig, seed: int) -> Model:
    """A `runtime_mlx.Model` holding the reference model's initial weights under ``torch.manual_seed(seed)``
    (so a fresh run starts from the same weights on every backend)."""
    torch.manual_seed(seed)
    ref = ReferenceModel(cfg)
    model = Model(cfg)
    load_torch_state_dict(model, ref.state_dict())
    return model


def decays(path: str, a: mx.array) -> bool:
    """Weight-decay filter of `dsfs.train.param_groups`: matrices (ndim >= 2: also the stacked experts and the
    router) other than the embedding; norms, biases and the embedding (and a head tied to it) get none."""
    return a.ndim >= 2 and not path.endswith("embed_tokens.weight")


def make_mlx_optimizer(lr: float, weight_decay: float) -> optim.MultiOptimizer:
    """AdamW as the reference's: betas (0.9, 0.95), eps 1e-8, bias correction, decoupled decay on `decays`
    parameters only."""
    def adamw(wd):
        return optim.AdamW(learning_rate=lr, betas=list(BETAS), eps=1e-8, weight_decay=wd, bias_correction=True)

    return optim.MultiOptimizer([adamw(weight_decay), adamw(0.0)], filters=[decays])


def _torch_layout(cfg: ModelConfig, lr: float, weight_decay: float) -> tuple[dict, list[list[str]]]:
    """The reference optimizer's empty ``state_dict`` and, per group, the parameter names in index order."""
    with torch.device("meta"):
        ref = ReferenceModel(cfg)
    names = {id(p): n for n, p in ref.named_parameters()}
    topt = make_optimizer(ref, lr, weight_decay)
    return topt.state_dict(), [[names[id(p)] for p in g["params"]] for g in topt.param_groups]


def optimizer_state_to_torch(opt: optim.MultiOptimizer, cfg: ModelConfig, lr: float, weight_decay: float) -> dict:
    """The MLX AdamW state as ``torch.optim.AdamW.state_dict()`` of the reference's `make_optimizer`: one entry
    (``step``, ``exp_avg``, ``exp_avg_sq``) per parameter index that has moments, groups of the reference."""
    sd, groups = _torch_layout(cfg, lr, weight_decay)
    flat = {}
    for o in opt.optimizers:
        flat.update(tree_flatten(o.state))
    step = float(opt.optimizers[0].state["step"].item())
    state, i = {}, 0
    for names in groups:
        for n in names:
            if f"{n}.m" in flat:
                state[i] = {"step": torch.tensor(step), "exp_avg": torch.from_numpy(np.array(flat[f"{n}.m"])),
                            "exp_avg_sq": torch.from_numpy(np.array(flat[f"{n}.v"]))}
            i += 1
    return {"state": state, "param_groups": sd["param_groups"]}


def optimizer_state_from_torch(opt: optim.MultiOptimizer, sd: dict, cfg: ModelConfig, lr: float,
                               weight_decay: float) -> None:
    """Load a reference ``AdamW.state_dict()`` into ``opt`` (already initialized). Raises ``ValueError`` when it
    does not fit this model (group sizes or shapes)."""
    _, groups = _torch_layout(cfg, lr, weight_decay)
    if [len(g["params"]) for g in sd["param_groups"]] != [len(g) for g in groups]:
        raise ValueError("optimizer state has other parameter groups than this model")
    names = [n for g in groups for n in g]
    moments, step = {}, 0
    for i, s in sd["state"].items():
        moments[f"{names[int(i)]}.m"] = mx.array(s["exp_avg"].float().numpy())
        moments[f"{names[int(i)]}.v"] = mx.array(s["exp_avg_sq"].float().numpy())
        step = int(float(s["step"]))
    for o in opt.optimizers:
        flat = dict(tree_flatten(o.state))
        for k in flat:
            if k in moments:
                if moments[k].shape != flat[k].shape:
                    raise ValueError(f"optimizer state: {k} has shape {moments[k].shape}, expected {flat[k].shape}")
                flat[k] = moments[k]
        flat["step"] = mx.array(step, dtype=flat["step"].dtype)
        o.state = tree_unflatten(list(flat.items()))


# ---------------------------------------------------------------- evaluation


def evaluate(model: Model, tokens: np.ndarray, batch_size: int, seq_len: int, n_batches: int) -> float:
    """Mean next-token cross-entropy (nats/token) of the main model over the fixed windows of
    `dsfs.generate.eval_starts`, in eval mode (as `dsfs.generate.evaluate`); restores the mode."""
    starts = eval_starts(len(tokens), n_batches * batch_size, seq_len)
    was_training = model.training
    model.eval()
    total = 0.0
    try:
        for b in range(n_batches):
            rows = [np.asarray(tokens[s : s + seq_len + 1]) for s in starts[b * batch_size : (b + 1) * batch_size]]
            w = mx.array(np.stack(rows).astype(np.int32))
            logits = model(w[:, :-1])
            ce = kernels.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1))
            total += ce.mean().item()
    finally:
        model.train(was_training)
    return total / n_batches


# ---------------------------------------------------------------- training


def _to_mx(t: torch.Tensor) -> mx.array:
    return mx.array(t.numpy().astype(np.int32))


def train(
    preset: str | None = None,
    data_dir=None,
    out_dir=None,
    *,
    resume=False,
    seed: int = 0,
    keep_last: int = 3,
    save_every: int | None = None,
    overwrite: bool = False,
    model_overrides: dict | None = None,
    verbose: bool = True,
    on_step: Callable[[dict], None] | None = None,
    compile: bool | str = "auto",
    **overrides,
) -> dict:
    """`dsfs.train.train` on the MLX runtime: same arguments (``compile``: ``mx.compile`` the step, on for
    "auto"), same run directory, metrics, checkpoints and returned summary (``backend`` "mlx", ``device``
    "gpu" or "cpu", plus ``kernel_path``). Raises ``DataError`` (or ``CheckpointError``, ``TrainError``) for
    bad input, as the reference loop; Ctrl-C saves a checkpoint and re-raises KeyboardInterrupt.
    """
    say = (lambda msg: tqdm.write(msg, file=sys.stderr)) if verbose else (lambda msg: None)
    unknown = set(overrides) - set(TRAIN_FIELDS)
    if unknown:
        raise TypeError(f"train() got unknown training fields {sorted(unknown)} (known: {', '.join(TRAIN_FIELDS)})")
    if preset is not None and preset not in TRAIN_PRESETS:
        raise DataError(f"unknown preset {preset!r} (expected one of {', '.join(TRAIN_PRESETS)})")

    # ---- checkpoint, run directory, data, configs (the reference loop's rules)
    state = ckpt = None
    if resume:
        where = Path(resume) if resume is not True else Path(out_dir or Path("runs") / (preset or "tiny"))
        ckpt = latest_checkpoint(where)
        if ckpt is None:
            raise CheckpointError(f"{where}: no checkpoint to resume (expected {CHECKPOINTS}/step_* directories)")
        state = load_trainer_state(ckpt)
        if STATE_KEYS - set(state):
            raise CheckpointError(f"{ckpt}: trainer state lacks {', '.join(sorted(STATE_KEYS - set(state)))}")
        preset = preset or state["preset"]
        if model_overrides is None:
            model_overrides = state["model_overrides"] or None
    preset = preset or "tiny"
    resumed_here = out_dir is None and ckpt is not None and ckpt.parent.name == CHECKPOINTS
    out = ckpt.parent.parent if resumed_here else Path(out_dir or Path("runs") / preset)
    ckpt_dir = out / CHECKPOINTS
    if data_dir is None and state is not None and Path(state["data_dir"]).is_dir():
        data_dir = state["data_dir"]
    data_dir = Path(data_dir) if data_dir is not None else data_mod.prepare(verbose=verbose)
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: no such data directory (run dsfs prepare first, or omit --data)")
    meta, meta_sha = data_mod.load_meta(data_dir), data_mod.file_sha256(data_dir / "meta.json")
    train_tokens, val_tokens = data_mod.load_tokens(data_dir, "train"), data_mod.load_tokens(data_dir, "val")
    tokenizer_file = data_dir / meta.get("tokenizer", "tokenizer.json")
    tc = dict(state["train_config"] if state is not None else TRAIN_PRESETS[preset])
    tc.update({k: v for k, v in overrides.items() if v is not None})
    cfg = model_config(preset, meta, model_overrides)
    _check_train_config(tc, cfg.max_position_embeddings)
    save_every = save_every or tc["eval_every"]
    if state is not None:
        if state["meta_sha256"] != meta_sha:
            raise CheckpointError(f"{ckpt} was trained on other data ({state['data_dir']}); {data_dir} differs")
        try:
            diff = _config_diff(ModelConfig.from_json(ckpt), cfg)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{ckpt}: unreadable config.json ({e})") from e
        if diff:
            raise CheckpointError(f"{ckpt} does not match the requested model (preset {preset}): " + "; ".join(diff))
    elif list_checkpoints(ckpt_dir) or (out / METRICS).exists() or (out / FINAL).exists():
        if not overwrite:
            raise DataError(f"{out} already holds a run; pass --resume to continue it, --overwrite to start over, "
                            "or choose another --out")
        for p in (ckpt_dir, out / FINAL):
            shutil.rmtree(p, ignore_errors=True)
        for p in (out / METRICS, out / PLOT):
            p.unlink(missing_ok=True)

    # ---- model, optimizer, data order
    if state is not None:
        try:
            model = Model.from_pretrained(ckpt)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot load the model in {ckpt}: {str(e).splitlines()[0]}") from e
    else:
        model = init_from_reference(cfg, seed)
    model.train()
    opt = make_mlx_optimizer(tc["lr"], tc["weight_decay"])
    opt.init(model.trainable_parameters())
    gen = torch.Generator().manual_seed(seed)
    step, tokens_seen, elapsed_before = 0, 0, 0.0
    if state is not None:
        try:
            optimizer_state_from_torch(opt, state["optimizer"], cfg, tc["lr"], tc["weight_decay"])
            gen.set_state(state["data_generator"])
            torch.set_rng_state(state["rng_cpu"])
        except (KeyError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{ckpt}: trainer state does not fit this model ({e})") from e
        step, tokens_seen, elapsed_before, seed = state["step"], state["tokens"], state["elapsed_s"], state["seed"]
    mx.eval(model.parameters(), opt.state)

    # ---- the step: micro-batch loss + grads, and the clipped AdamW update, each one compiled function
    accum, clip = tc["grad_accum"], (tc["grad_clip"] if tc["grad_clip"] > 0 else float("inf"))

    n_mtp = len(model.mtp)

    def loss_fn(x, y):
        # the MTP losses go out one by one: returning a recomputed mean of them trips mx.compile (MLX 0.32:
        # IndexError _Map_base::at, the output's node merged away with its twin inside the loss)
        o = model.loss(x, y, mtp_weight=tc["mtp_weight"], check_values=False)
        return o.loss, o.lm_loss, o.aux_loss, *o.mtp_losses, *o.expert_loads

    loss_and_grad = nn.value_and_grad(model, loss_fn)

    def micro(x, y):
        outs, grads = loss_and_grad(x, y)
        return outs, grads

    def update(grads):
        grads, norm = optim.clip_grad_norm(grads, clip)
        opt.update(model, grads)
        return norm

    if compile == "auto" or compile:
        compiled_state = [model.state, opt.state]
        micro = partial(mx.compile, inputs=compiled_state, outputs=compiled_state)(micro)
        update = partial(mx.compile, inputs=compiled_state, outputs=compiled_state)(update)
        compile = True

    # ---- logging
    out.mkdir(parents=True, exist_ok=True)
    metrics_path, plot_path = out / METRICS, out / PLOT
    records = _read_metrics(metrics_path, step) if state is not None else []
    _write_metrics(metrics_path, records)
    metrics_file = open(metrics_path, "a")  # noqa: SIM115 (closed in finally)

    def log(rec: dict) -> None:
        records.append(rec)
        metrics_file.write(json.dumps(rec) + "\n")
        metrics_file.flush()

    def run_eval() -> float:
        v = evaluate(model, val_tokens, tc["batch_size"], tc["seq_len"], tc["eval_batches"])
        log({"step": step, "val_loss": v, "val_ppl": math.exp(min(v, 700.0))})
        plot_losses(records, plot_path)
        return v

    session_start = time.perf_counter()

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - session_start

    def save() -> Path:
        st = {
            "step": step, "tokens": tokens_seen, "elapsed_s": elapsed(),
            "optimizer": optimizer_state_to_torch(opt, cfg, tc["lr"], tc["weight_decay"]),
            "scheduler": {"step": step}, "rng_cpu": torch.get_rng_state(), "data_generator": gen.get_state(),
            "rng_cuda": None, "train_config": tc, "preset": preset, "model_overrides": model_overrides or {},
            "seed": seed, "data_dir": str(data_dir.resolve()), "meta_sha256": meta_sha, "backend": "mlx",
        }
        return save_checkpoint(model, st, ckpt_dir, step, tokenizer_file, keep_last)

    device = "gpu" if mx.default_device().type == mx.DeviceType.gpu else "cpu"
    n_params = sum(a.size for _, a in tree_flatten(model.parameters()))
    tok_per_step = tc["batch_size"] * tc["seq_len"] * accum
    say(f"{'resuming ' + str(ckpt) + ' at step ' + str(step) if state else 'training'}: preset {preset}, "
        f"{n_params / 1e6:.2f}M parameters, mlx backend on {device} ({model.kernel_path} kernels"
        f"{', mx.compile' if compile else ''}); {tok_per_step:,} tokens/step "
        f"({tc['batch_size']}x{tc['seq_len']}x{accum}), {tc['max_steps']} steps; data {data_dir}; out {out}")

    if sys.platform == "linux" and device == "cpu" and "openblas" not in os.environ.get("LD_PRELOAD", ""):
        say("note: MLX's Linux CPU wheel links a slow reference BLAS; about 20x faster with OpenBLAS: apt-get install "
            "libopenblas0-pthread, then LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0 dsfs train ...")
    train_time, val_loss, last_eval, stopped = 0.0, None, -1, "max_steps"
    last_saved = step if state is not None else -1
    try:
        with _SigintFlag(say) as sigint:
            if state is None:
                val_loss, last_eval = run_eval(), step
                say(f"step 0: val loss {val_loss:.4f}")
            bar = tqdm(total=tc["max_steps"], initial=step, unit="step", file=sys.stderr, disable=not verbose,
                       dynamic_ncols=True, desc=f"train {preset} (mlx)")
            with bar:
                while step < tc["max_steps"]:
                    t0 = time.perf_counter()
                    lr = lr_at(step, tc["lr"], tc["warmup_steps"], tc["max_steps"], tc["min_lr_ratio"])
                    opt.learning_rate = lr
                    sums, grads, loads = None, None, None
                    for _ in range(accum):
                        x, y = data_mod.get_batch(train_tokens, tc["batch_size"], tc["seq_len"], gen)
                        outs, g = micro(_to_mx(x), _to_mx(y))
                        g = tree_map(lambda a: a / accum, g) if accum > 1 else g
                        grads = g if grads is None else tree_map(mx.add, grads, g)
                        mtp = sum(outs[3 : 3 + n_mtp]) / n_mtp if n_mtp else mx.array(0.0)
                        vals, ls = [outs[0], outs[1], mtp, outs[2]], list(outs[3 + n_mtp :])
                        sums = vals if sums is None else [a + b for a, b in zip(sums, vals, strict=True)]
                        loads = ls if loads is None else [a + b for a, b in zip(loads, ls, strict=True)]
                        mx.eval(grads, sums, loads)
                    loss, lm_loss, mtp_loss, aux_loss = (v.item() / accum for v in sums)
                    if not math.isfinite(loss):
                        raise TrainError(f"loss is {loss} at step {step + 1} (lr {lr:.3g}); try a lower --lr or "
                                         f"--grad-clip, or resume from an earlier checkpoint in {ckpt_dir}")
                    grad_norm = update(grads)
                    if loads:
                        model.update_moe_bias(loads)
                    mx.eval(grad_norm, model.state, opt.state)
                    step += 1
                    tokens_seen += tok_per_step
                    dt = time.perf_counter() - t0
                    train_time += dt
                    rec = {"step": step, "loss": loss, "lm_loss": lm_loss,
                           "mtp_loss": mtp_loss if model.mtp else None, "aux_loss": aux_loss, "lr": lr,
                           "grad_norm": grad_norm.item(), "tokens": tokens_seen, "tokens_per_s": tok_per_step / dt,
                           "elapsed_s": elapsed()}
                    log(rec)
                    bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tok_per_step / dt:,.0f}", lr=f"{lr:.2e}",
                                    refresh=False)
                    bar.update(1)
                    if on_step is not None:
                        on_step(rec)
                    if step % tc["eval_every"] == 0 or step == tc["max_steps"]:
                        val_loss, last_eval = run_eval(), step
                        say(f"step {step}: val loss {val_loss:.4f} (ppl {math.exp(min(val_loss, 700.0)):.1f})")
                    if step % save_every == 0 and step < tc["max_steps"]:
                        save()
                        last_saved = step
                    if sigint.hit:
                        stopped = "interrupted"
                        break
                    budget = tc["time_budget_s"]
                    if budget is not None and time.perf_counter() - session_start >= budget \
                            and step < tc["max_steps"]:
                        stopped = "time_budget"
                        say(f"time budget of {budget:g} s reached at step {step}/{tc['max_steps']}; stopping "
                            f"(continue with dsfs train --resume --out {out})")
                        break
            if stopped == "interrupted":
                if last_saved != step:
                    save()
                plot_losses(records, plot_path)
                print(f"interrupted at step {step}: checkpoint saved in {ckpt_dir / step_dir_name(step)}; "
                      f"continue with dsfs train --resume --out {out}", file=sys.stderr)
                raise KeyboardInterrupt
            if last_eval != step:
                val_loss = run_eval()
            if last_saved != step:
                save()
            model.save_pretrained(out / FINAL, tokenizer_file=tokenizer_file)
    finally:
        metrics_file.close()
    plot_losses(records, plot_path)
    return {
        "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 700.0)), "steps": step, "tokens": tokens_seen,
        "tokens_per_s": (step - (state["step"] if state else 0)) * tok_per_step / max(train_time, 1e-9),
        "elapsed_s": elapsed(), "stopped": stopped, "backend": "mlx", "device": device,
        "kernel_path": model.kernel_path, "out_dir": str(out), "final_dir": str(out / FINAL),
        "checkpoint": str(latest_checkpoint(out)), "metrics": str(metrics_path), "plot": str(plot_path),
    }
