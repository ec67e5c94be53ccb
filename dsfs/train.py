"""Pretraining loop behind ``dsfs train``: Muon or AdamW (`make_optimizer`), warmup + cosine schedule, MTP loss,
bias-based MoE balancing, periodic validation, metrics, loss plot, atomic checkpoints and exact resume.

Writes into the run directory ``out`` (default ``runs/<preset>``)::

    metrics.jsonl           one JSON object per optimizer step (step, loss, lm_loss, mtp_loss, aux_loss, lr,
                            grad_norm, tokens, tokens_per_s, elapsed_s) and per evaluation (step, val_loss,
                            val_ppl); a fresh run evaluates once at step 0
    loss.png                train and validation loss against step (redrawn at each evaluation)
    checkpoints/step_N/     Hugging Face model directory + trainer_state.pt (see dsfs.checkpointing)
    final/                  the final model (Hugging Face directory, tokenizer.json included)

On CPU a run that is stopped (Ctrl-C, ``time_budget_s``) and resumed gives the same losses, bit for bit, as an
uninterrupted one: the checkpoint holds the weights (with the MoE correction biases), the optimizer state,
the step, the data generator state and the RNG states, and the learning rate is a function of the step.

`train` is the one loop for every backend; the per-step work goes through a trainer: `TorchTrainer` for torch
models (the reference, ``runtime_cuda``) and ``runtime_mlx.train.MLXTrainer`` (imported only for ``--backend
mlx``), both with ``micro_step``, ``optimizer_step``, ``evaluate``, ``state_dict`` and ``load_state_dict``.
Checkpoints store the optimizer state in the reference optimizer's layout, so a run continues on another
backend.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import platform
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from dsfs import data as data_mod
from dsfs.checkpointing import (
    CHECKPOINTS,
    FINAL,
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_model_dir,
    load_trainer_state,
    save_checkpoint,
    step_dir_name,
)
from dsfs.data import DataError
from dsfs.generate import autocast, eval_starts
from dsfs.presets import MODEL_PRESETS, TRAIN_PRESETS
from reference import Model, ModelConfig
from reference.muon import Muon

TRAIN_FIELDS = tuple(TRAIN_PRESETS["tiny"])
BETAS = (0.9, 0.95)
METRICS = "metrics.jsonl"
PLOT = "loss.png"
STATE_KEYS = {"step", "tokens", "elapsed_s", "optimizer", "rng_cpu", "data_generator", "train_config", "preset",
              "model_overrides", "seed", "data_dir", "meta_sha256"}


class BackendError(DataError):
    """A backend that cannot run on this machine (``--backend cuda`` without CUDA)."""


class TrainError(DataError):
    """Training cannot go on (a non-finite loss); the message says at which step and what to try."""


# ---------------------------------------------------------------- backend


@dataclass
class Backend:
    """What ``resolve_backend`` chose: ``name`` (reference, cuda, mlx), the model class (a ``torch.nn.Module``
    with the ``reference.Model`` API), the torch ``device``, and ``note``: one line to print when a requested
    runtime was replaced by the reference model (else ``None``)."""

    name: str
    model_cls: type
    device: torch.device
    note: str | None = None


def _runtime_model(package: str):
    """``<package>.Model`` when that runtime is built, else ``None``."""
    try:
        return getattr(importlib.import_module(package), "Model", None)
    except ImportError:
        return None


def resolve_backend(name: str = "auto") -> Backend:
    """Pick the model class and torch device for ``--backend``.

    ``auto``: ``mlx`` on Apple Silicon, ``cuda`` when ``torch.cuda.is_available()``, else ``reference``.
    ``reference``: the plain-PyTorch model on cpu (deterministic; the definition of correct).
    ``cuda``: ``runtime_cuda.Model`` on cuda; raises ``BackendError`` when CUDA is not available.
    ``mlx``: ``runtime_mlx.Model``. A runtime that is not built yet is replaced by the reference model (on cuda
    for ``cuda``, on mps when available for ``mlx``, else cpu) and ``note`` says so. The training loop drives
    torch model classes with the ``reference.Model`` API (``loss``, ``update_moe_bias``, ``save_pretrained``,
    ``from_pretrained``) through `TorchTrainer`, and ``runtime_mlx.Model`` through ``MLXTrainer`` (`make_trainer`).
    Raises ``BackendError`` for an unknown name.
    """
    if name == "auto":
        if sys.platform == "darwin" and platform.machine() == "arm64":
            name = "mlx"
        elif torch.cuda.is_available():
            name = "cuda"
        else:
            name = "reference"
    if name == "reference":
        return Backend("reference", Model, torch.device("cpu"))
    if name == "cuda":
        if not torch.cuda.is_available():
            raise BackendError("backend cuda requested but CUDA is not available (torch.cuda.is_available() is "
                               "False); use --backend auto or reference")
        device = torch.device("cuda")
    elif name == "mlx":
        device = torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    else:
        raise BackendError(f"unknown backend {name!r} (expected auto, reference, cuda or mlx)")
    package = f"runtime_{name}"
    cls = _runtime_model(package)
    if cls is not None:
        return Backend(name, cls, device)
    note = f"backend {name} requested: {package} not built yet, using the reference model on {device.type}"
    return Backend(name, Model, device, note)


# ---------------------------------------------------------------- optimization


def lr_at(step: int, lr: float, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup ``lr * (step + 1) / warmup_steps``,
    then cosine decay from ``lr`` to ``min_lr_ratio * lr`` at ``max_steps``."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    lo = min_lr_ratio * lr
    return lo + (lr - lo) * 0.5 * (1.0 + math.cos(math.pi * progress))


OPTIMIZERS = ("adamw", "muon")


def param_groups(model: nn.Module, weight_decay: float, optimizer: str = "adamw") -> list[dict]:
    """The optimizer's parameter groups. ``"adamw"``: two groups, matrices (parameters with ``ndim >= 2`` other
    than embeddings, so also stacked expert weights and the router) get ``weight_decay``; norms, biases and
    embeddings (and an LM head tied to them) get none. ``"muon"`` (`reference.muon.Muon`): the hidden matrices
    (attention and MLP projections, stacked experts, the MTP ``eh_proj``) form a first group with
    ``use_muon=True``; the LM head (AdamW with decay) and the no-decay group above stay with AdamW
    (``use_muon=False``), as in Moonlight (Liu et al. 2025, sec. 2.2). The routers stay with AdamW too, this
    project's choice: a router's (E, H) rows score experts one by one rather than form a hidden linear map.
    Raises ``ValueError`` for another ``optimizer``."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer={optimizer!r}: expected one of {', '.join(OPTIMIZERS)}")
    emb = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    adam_only = {id(model.lm_head.weight)} | {id(m.gate.weight) for m in model.moe_layers()}
    muon, decay, no_decay = [], [], []
    for p in model.parameters():  # shared (tied) parameters are listed once
        if not p.requires_grad:
            continue
        if p.ndim < 2 or id(p) in emb:
            no_decay.append(p)
        elif optimizer == "muon" and id(p) not in adam_only:
            muon.append(p)
        else:
            decay.append(p)
    if optimizer == "adamw":
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [{"params": muon, "weight_decay": weight_decay, "use_muon": True},
            {"params": decay, "weight_decay": weight_decay, "use_muon": False},
            {"params": no_decay, "weight_decay": 0.0, "use_muon": False}]


def compiled_loss(model: nn.Module) -> Callable:
    """``torch.compile(model.loss)``. On CPU the experts run through ``F.grouped_mm`` and the whole forward is one
    graph (the input check and the valid-token count stay outside it). Where the per-expert loop runs instead
    (CUDA, float64, autocast) it is a graph break with routing-dependent segment sizes, so each decoder-layer
    type is compiled on its own, more variants than Dynamo's default limit of 8 allows: the limits are raised."""
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, 1024)
    return torch.compile(model.loss)


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, optimizer: str = "adamw") -> torch.optim.Optimizer:
    """The training optimizer over `param_groups` (betas (0.9, 0.95)): ``"adamw"``, ``torch.optim.AdamW`` with
    decoupled weight decay on matrices only; ``"muon"``, `reference.muon.Muon` (Muon on the hidden matrices,
    AdamW on the rest, one learning rate). AdamW runs PyTorch's fused implementation (one kernel over all
    parameters) when they all live on CPU or CUDA. Raises ``ValueError`` for another ``optimizer``."""
    fused = all(p.device.type in ("cpu", "cuda") for p in model.parameters()) or None
    groups = param_groups(model, weight_decay, optimizer)
    if optimizer == "muon":
        return Muon(groups, lr=lr, betas=BETAS, fused=fused)
    return torch.optim.AdamW(groups, lr=lr, betas=BETAS, fused=fused)


def optimizer_groups(cfg: ModelConfig, lr: float, weight_decay: float, optimizer: str = "adamw") -> list[dict]:
    """The reference optimizer's ``state_dict()["param_groups"]`` for a model of ``cfg`` (hyperparameters of
    `make_optimizer`), with the parameters' ``named_parameters`` names in ``params`` in place of their indices:
    what a non-torch backend needs to read and write the optimizer state in the reference's layout. Built on
    the meta device (no memory, no RNG draws)."""
    with torch.device("meta"):
        ref = Model(cfg)
    names = {id(p): n for n, p in ref.named_parameters()}
    opt = make_optimizer(ref, lr, weight_decay, optimizer)
    return [{**g, "params": [names[id(p)] for p in pg["params"]]}
            for g, pg in zip(opt.state_dict()["param_groups"], opt.param_groups, strict=True)]


# ---------------------------------------------------------------- trainers


class TorchTrainer:
    """The per-step work of `train` for a torch model with the ``reference.Model`` API.

    ``model`` is moved to ``device`` in train mode; the ``optimizer`` of `make_optimizer` (``lr``,
    ``weight_decay``); the loss runs through `compiled_loss` when ``compile``, under bf16 autocast on CUDA;
    gradients are clipped to ``grad_clip`` (0: no clipping); ``mtp_weight`` weighs the MTP loss; the MoE
    correction biases are updated after each optimizer step. ``runtime_mlx.train.MLXTrainer`` has the same
    interface. Attributes for the loop: ``model`` (``save_pretrained``), ``device_type``, ``n_params``,
    ``label`` (for the start line), ``note`` (a line to print, or ``None``), ``summary`` (extra fields of the
    run summary).
    """

    def __init__(self, model: nn.Module, device: torch.device, lr: float, weight_decay: float, grad_clip: float,
                 mtp_weight: float, compile: bool, optimizer: str = "adamw"):
        self.model, self.device, self.mtp_weight = model.to(device).train(), device, mtp_weight
        self.opt = make_optimizer(self.model, lr, weight_decay, optimizer)
        self.loss_fn = compiled_loss(self.model) if compile else self.model.loss
        self.clip = grad_clip if grad_clip > 0 else float("inf")
        self.device_type, self.n_params = device.type, sum(p.numel() for p in self.model.parameters())
        self.label, self.note, self.summary = " (torch.compile)" if compile else "", None, {}

    def micro_step(self, x: torch.Tensor, y: torch.Tensor, accum: int) -> dict:
        """Forward and backward of ``loss / accum`` for one (B, T) int64 batch ``x`` with targets ``y`` (gradients
        accumulate in ``.grad``). Returns floats ``loss``, ``lm_loss``, ``aux_loss`` and ``mtp_loss`` (the mean
        over MTP depths; ``None`` without MTP)."""
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        with autocast(self.device):
            o = self.loss_fn(x, y, mtp_weight=self.mtp_weight)
        (o.loss / accum).backward()
        mtp = torch.stack(o.mtp_losses).mean().item() if o.mtp_losses else None
        return {"loss": o.loss.item(), "lm_loss": o.lm_loss.item(), "mtp_loss": mtp, "aux_loss": float(o.aux_loss)}

    def optimizer_step(self, lr: float) -> float:
        """Clip the accumulated gradients, step AdamW at learning rate ``lr``, clear the gradients and update the
        MoE correction biases. Returns the global gradient norm before clipping."""
        for g in self.opt.param_groups:
            g["lr"] = lr
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip))
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.model.update_moe_bias()
        return grad_norm

    @torch.no_grad()
    def evaluate(self, windows: np.ndarray) -> float:
        """Mean next-token cross-entropy (nats/token) of the main model over ``windows`` (n_batches, batch,
        seq_len + 1) int64 token ids, one batch at a time, in eval mode (train mode again after); as
        `dsfs.generate.evaluate` over the same windows."""
        self.model.eval()
        try:
            total = 0.0
            for w in windows:
                w = torch.from_numpy(w).to(self.device)
                with autocast(self.device):
                    logits = self.model(w[:, :-1])
                total += F.cross_entropy(logits.float().flatten(0, 1), w[:, 1:].flatten()).item()
        finally:
            self.model.train()
        return total / len(windows)

    def state_dict(self) -> dict:
        """The optimizer's ``state_dict()``."""
        return self.opt.state_dict()

    def load_state_dict(self, sd: dict) -> None:
        """Load an optimizer ``state_dict`` (``ValueError`` / ``KeyError`` when it does not fit this model). The
        implementation choice (fused or not) stays this optimizer's: the saved groups carry the writer's."""
        self.opt.load_state_dict(sd)
        fused = self.opt.defaults.get("fused")
        for g in self.opt.param_groups:
            g["fused"] = fused
            for p in g["params"] if fused else ():  # the fused kernel wants its step counts on the device
                st = self.opt.state.get(p, {})
                if "step" in st:
                    st["step"] = st["step"].to(p.device, torch.float32)


def make_trainer(be: Backend, cfg: ModelConfig, tc: dict, ckpt: Path | None, compile: bool | str):
    """The trainer of backend ``be`` for training config ``tc``: its model loaded from the checkpoint directory
    ``ckpt`` (``CheckpointError`` when it cannot be), or, when ``None``, the reference model of ``cfg`` drawn
    under the current torch RNG state (converted for the MLX runtime, so every backend starts from the same
    weights). ``compile``: ``torch.compile`` the loss ("auto": on cpu and cuda) or ``mx.compile`` the steps
    ("auto": on). Imports ``runtime_mlx.train`` only for the MLX runtime."""
    if be.name == "mlx" and be.note is None:
        from runtime_mlx.train import MLXTrainer, from_reference

        model = load_model_dir(ckpt, be.model_cls) if ckpt is not None else from_reference(Model(cfg))
        groups = optimizer_groups(cfg, tc["lr"], tc["weight_decay"], tc["optimizer"])
        return MLXTrainer(model, groups, tc["grad_clip"], tc["mtp_weight"], compile=bool(compile))
    if compile == "auto":
        compile = be.device.type in ("cpu", "cuda")
    model = load_model_dir(ckpt, be.model_cls) if ckpt is not None else be.model_cls(cfg)
    return TorchTrainer(model, be.device, tc["lr"], tc["weight_decay"], tc["grad_clip"], tc["mtp_weight"], compile,
                        tc["optimizer"])


def eval_windows(tokens: np.ndarray, batch_size: int, seq_len: int, n_batches: int) -> np.ndarray:
    """The validation windows of `dsfs.generate.evaluate`: (n_batches, batch_size, seq_len + 1) int64 token ids
    at `dsfs.generate.eval_starts`. Raises ``DataError`` when ``tokens`` is too short for ``seq_len``."""
    starts = eval_starts(len(tokens), n_batches * batch_size, seq_len)
    rows = np.stack([np.asarray(tokens[s : s + seq_len + 1]) for s in starts]).astype(np.int64)
    return rows.reshape(n_batches, batch_size, seq_len + 1)


# ---------------------------------------------------------------- configuration


def _check_train_config(tc: dict, max_pos: int) -> None:
    ints = {"batch_size": 1, "seq_len": 1, "max_steps": 1, "grad_accum": 1, "eval_every": 1, "eval_batches": 1,
            "warmup_steps": 0}
    for k, lo in ints.items():
        if not isinstance(tc[k], int) or tc[k] < lo:
            raise DataError(f"{k}={tc[k]!r}: expected an integer >= {lo}")
    for k in ("lr", "weight_decay", "grad_clip", "mtp_weight", "min_lr_ratio"):
        if not isinstance(tc[k], int | float) or not math.isfinite(tc[k]) or tc[k] < 0:
            raise DataError(f"{k}={tc[k]!r}: expected a finite number >= 0")
    if tc["optimizer"] not in OPTIMIZERS:
        raise DataError(f"optimizer={tc['optimizer']!r}: expected one of {', '.join(OPTIMIZERS)}")
    if tc["lr"] <= 0:
        raise DataError(f"lr={tc['lr']}: expected > 0")
    if tc["time_budget_s"] is not None and tc["time_budget_s"] < 0:
        raise DataError(f"time_budget_s={tc['time_budget_s']}: expected >= 0 seconds")
    if tc["seq_len"] > max_pos:
        raise DataError(f"seq_len={tc['seq_len']} exceeds the model's max_position_embeddings={max_pos}")


def model_config(preset: str, meta: dict, overrides: dict | None = None) -> ModelConfig:
    """``MODEL_PRESETS[preset]`` updated with ``overrides``, with ``vocab_size`` and the bos/eos/pad ids of the
    prepared data's ``meta``. Raises ``DataError`` for an unknown preset or an invalid configuration."""
    if preset not in MODEL_PRESETS:
        raise DataError(f"unknown preset {preset!r} (expected one of {', '.join(MODEL_PRESETS)})")
    d = {**MODEL_PRESETS[preset], **(overrides or {}), "vocab_size": meta["vocab_size"],
         "bos_token_id": meta["bos_id"], "eos_token_id": meta["eos_id"], "pad_token_id": meta["pad_id"]}
    try:
        return ModelConfig(**d)
    except (TypeError, ValueError) as e:
        raise DataError(f"preset {preset}: {e}") from e


def _config_diff(have: ModelConfig, want: ModelConfig) -> list[str]:
    a, b = have.to_dict(), want.to_dict()
    return [f"{k}: checkpoint {a.get(k)!r}, requested {b.get(k)!r}" for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k)]


# ---------------------------------------------------------------- logging


def _read_metrics(path: Path, upto: int) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            rec = json.loads(line)
            if isinstance(rec, dict) and rec.get("step", upto + 1) <= upto:
                out.append(rec)
    return out


def _write_metrics(path: Path, records: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, path)


def plot_losses(records: list[dict], path: str | os.PathLike) -> None:
    """Draw train loss (total and main-model CE) and validation loss against step from metrics records into
    a PNG (matplotlib Agg, written to a temporary file and renamed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    train = [(r["step"], r["loss"], r["lm_loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if train:
        steps, loss, lm = zip(*train, strict=True)
        ax.plot(steps, loss, lw=1, alpha=0.4, label="train loss (LM + MTP + aux)")
        ax.plot(steps, lm, lw=1, label="train LM loss (main model CE)")
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="val loss (main model CE)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, path)


class _SigintFlag:
    """While active, the first Ctrl-C sets ``hit`` (the loop finishes its step, saves and stops); a second one
    raises KeyboardInterrupt at once. Only in the main thread; elsewhere Ctrl-C behaves as usual."""

    def __init__(self, say):
        self.hit, self.say, self.old = False, say, None

    def _handler(self, signum, frame):
        if self.hit:
            raise KeyboardInterrupt
        self.hit = True
        self.say("Ctrl-C: finishing this step, then saving a checkpoint (Ctrl-C again to quit without saving)")

    def __enter__(self):
        with contextlib.suppress(ValueError):  # not the main thread
            self.old = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        if self.old is not None:
            signal.signal(signal.SIGINT, self.old)


# ---------------------------------------------------------------- training


def train(
    preset: str | None = None,
    data_dir: str | os.PathLike | None = None,
    out_dir: str | os.PathLike | None = None,
    *,
    resume: bool | str | os.PathLike = False,
    backend: str = "auto",
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
    """Train a model of ``preset`` (default ``tiny``, or the resumed checkpoint's) on a prepared data
    directory; return a summary dict.

    ``data_dir``: a ``dsfs prepare`` output; default: the one recorded in the resumed checkpoint when it still
    exists, else ``data.prepare()`` with its defaults (skipped when already done). ``out_dir``: the run
    directory (default ``runs/<preset>``); a fresh run refuses one that already holds a run unless
    ``overwrite`` (which deletes its checkpoints, final model and metrics). ``overrides``: values for the
    ``TRAIN_PRESETS`` fields (``batch_size``, ``seq_len``, ``lr``, ``min_lr_ratio``, ``warmup_steps``,
    ``max_steps``, ``time_budget_s``, ``weight_decay``, ``grad_clip``, ``grad_accum``, ``eval_every``,
    ``eval_batches``, ``mtp_weight``, ``optimizer``: ``"adamw"`` or ``"muon"``, see `make_optimizer`); ``None``
    values are ignored. On resume the checkpoint's training config is the base instead of the preset.
    ``model_overrides``: ``ModelConfig`` fields over the preset's (tests use a micro model; default on resume:
    the checkpoint's). ``vocab_size`` and bos/eos/pad ids always
    come from the data's meta.json.

    Each optimizer step consumes ``grad_accum`` batches of ``batch_size x seq_len`` tokens drawn by
    ``get_batch`` with a generator seeded by ``seed``. Validation (main-model CE on ``eval_batches`` fixed
    windows of the val split) runs at step 0 of a fresh run, every ``eval_every`` steps and at the end;
    checkpoints every ``save_every`` steps (default ``eval_every``), on Ctrl-C, at the end, keeping the newest
    ``keep_last``. ``time_budget_s``: stop (evaluate, checkpoint, write final/) once this session has trained
    that many wall-clock seconds; the summary's ``stopped`` is then ``"time_budget"``. ``resume``: ``True``
    for the newest checkpoint of ``out_dir``, or a path (step, checkpoints or run directory; without
    ``out_dir`` the run continues in that checkpoint's run directory). ``on_step``:
    called with each step's metrics record (tests). ``compile``: run the training loss through
    ``torch.compile`` (`compiled_loss`); ``"auto"`` compiles on cpu and cuda (on 2 CPU cores it trains the tiny
    preset about 25% faster after ~30 s of compilation), not on mps; on the MLX runtime, ``mx.compile`` the
    micro-step and the update (``"auto"``: on).

    Returns ``{"val_loss", "val_ppl", "steps", "tokens", "tokens_per_s", "elapsed_s", "stopped", "backend",
    "device", "out_dir", "final_dir", "checkpoint", "metrics", "plot"}``, plus ``"kernel_path"`` on the MLX
    runtime (tokens/s over optimizer steps only; elapsed includes earlier sessions of a resumed run). Exact
    resume assumes the same device and torch thread count in both sessions; a run continues on another backend
    within float tolerance. Raises ``DataError`` (or its subclasses
    ``CheckpointError``, ``BackendError``, ``TrainError``) for bad input: unknown preset or field, invalid
    values, a missing data directory, no or a corrupt checkpoint, a checkpoint whose model config or data does
    not match, an occupied ``out_dir``, a non-finite loss. Ctrl-C saves a checkpoint, prints where, and
    re-raises KeyboardInterrupt.
    """
    say = (lambda msg: tqdm.write(msg, file=sys.stderr)) if verbose else (lambda msg: None)
    unknown = set(overrides) - set(TRAIN_FIELDS)
    if unknown:
        raise TypeError(f"train() got unknown training fields {sorted(unknown)} (known: {', '.join(TRAIN_FIELDS)})")
    if preset is not None and preset not in TRAIN_PRESETS:
        raise DataError(f"unknown preset {preset!r} (expected one of {', '.join(TRAIN_PRESETS)})")
    be = resolve_backend(backend)

    # ---- checkpoint to resume
    state, ckpt = None, None
    if resume:
        where = Path(resume) if resume is not True else Path(out_dir or Path("runs") / (preset or "tiny"))
        ckpt = latest_checkpoint(where)
        if ckpt is None:
            raise CheckpointError(f"{where}: no checkpoint to resume (expected {CHECKPOINTS}/step_* directories)")
        state = load_trainer_state(ckpt)
        missing = sorted(STATE_KEYS - set(state))
        if missing:
            raise CheckpointError(f"{ckpt}: trainer state lacks {', '.join(missing)}")
        preset = preset or state["preset"]
        if model_overrides is None:
            model_overrides = state["model_overrides"] or None
    preset = preset or "tiny"
    if out_dir is None and ckpt is not None and ckpt.parent.name == CHECKPOINTS:
        out = ckpt.parent.parent  # resume PATH without --out: continue in that run directory
    else:
        out = Path(out_dir or Path("runs") / preset)
    ckpt_dir = out / CHECKPOINTS

    # ---- data
    if data_dir is None and state is not None and Path(state["data_dir"]).is_dir():
        data_dir = state["data_dir"]
    if data_dir is None:
        data_dir = data_mod.prepare(verbose=verbose)
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: no such data directory (run dsfs prepare first, or omit --data)")
    meta = data_mod.load_meta(data_dir)
    meta_sha = data_mod.file_sha256(data_dir / "meta.json")
    train_tokens = data_mod.load_tokens(data_dir, "train")
    val_tokens = data_mod.load_tokens(data_dir, "val")
    tokenizer_file = data_dir / meta.get("tokenizer", "tokenizer.json")

    # ---- configs
    # checkpoints written before the optimizer became a field were AdamW runs
    tc = dict({"optimizer": "adamw", **state["train_config"]} if state is not None else TRAIN_PRESETS[preset])
    if state is not None and overrides.get("optimizer") not in (None, tc["optimizer"]):
        raise CheckpointError(f"{ckpt} was trained with optimizer {tc['optimizer']}; it cannot continue with "
                              f"{overrides['optimizer']} (its optimizer state is {tc['optimizer']}'s)")
    tc.update({k: v for k, v in overrides.items() if v is not None})
    cfg = model_config(preset, meta, model_overrides)
    _check_train_config(tc, cfg.max_position_embeddings)
    save_every = save_every or tc["eval_every"]
    if state is not None:
        if state["meta_sha256"] != meta_sha:
            raise CheckpointError(
                f"{ckpt} was trained on other data ({state['data_dir']}, meta.json sha256 "
                f"{state['meta_sha256'][:12]}); {data_dir} has meta.json sha256 {meta_sha[:12]}")
        try:
            have = ModelConfig.from_json(ckpt)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{ckpt}: unreadable config.json ({e})") from e
        diff = _config_diff(have, cfg)
        if diff:
            raise CheckpointError(f"{ckpt} does not match the requested model (preset {preset}, data "
                                  f"{data_dir}): " + "; ".join(diff))
    elif list_checkpoints(ckpt_dir) or (out / METRICS).exists() or (out / FINAL).exists():
        if not overwrite:
            raise DataError(f"{out} already holds a run; pass --resume to continue it, --overwrite to start over, "
                            "or choose another --out")
        for p in (ckpt_dir, out / FINAL):
            shutil.rmtree(p, ignore_errors=True)
        for p in (out / METRICS, out / PLOT):
            p.unlink(missing_ok=True)

    # ---- model, optimizer
    torch.manual_seed(seed)
    trainer = make_trainer(be, cfg, tc, ckpt, compile)
    gen = torch.Generator().manual_seed(seed)
    step, tokens_seen, elapsed_before = 0, 0, 0.0
    if state is not None:
        try:
            trainer.load_state_dict(state["optimizer"])
            gen.set_state(state["data_generator"])
            torch.set_rng_state(state["rng_cpu"])
        except (KeyError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{ckpt}: trainer state does not fit this model ({e})") from e
        if state.get("rng_cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        step, tokens_seen, elapsed_before = state["step"], state["tokens"], state["elapsed_s"]
        seed = state["seed"]
    windows = eval_windows(val_tokens, tc["batch_size"], tc["seq_len"], tc["eval_batches"])

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
        v = trainer.evaluate(windows)
        log({"step": step, "val_loss": v, "val_ppl": math.exp(min(v, 700.0))})
        plot_losses(records, plot_path)
        return v

    def save() -> Path:
        st = {
            "step": step, "tokens": tokens_seen, "elapsed_s": elapsed(),
            "optimizer": trainer.state_dict(), "scheduler": {"step": step},
            "rng_cpu": torch.get_rng_state(), "data_generator": gen.get_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "train_config": tc, "preset": preset, "model_overrides": model_overrides or {}, "seed": seed,
            "data_dir": str(data_dir.resolve()), "meta_sha256": meta_sha, "backend": be.name,
        }
        return save_checkpoint(trainer.model, st, ckpt_dir, step, tokenizer_file, keep_last)

    if be.note:
        say(be.note)
    accum = tc["grad_accum"]
    tok_per_step = tc["batch_size"] * tc["seq_len"] * accum
    say(f"{'resuming ' + str(ckpt) + ' at step ' + str(step) if state else 'training'}: preset {preset}, "
        f"{trainer.n_params / 1e6:.2f}M parameters, {be.name} backend on {trainer.device_type}{trainer.label}; "
        f"{tok_per_step:,} tokens/step ({tc['batch_size']}x{tc['seq_len']}x{accum}), {tc['max_steps']} steps; "
        f"data {data_dir} ({len(train_tokens):,} train tokens); out {out}")
    if trainer.note:
        say(trainer.note)

    train_time = 0.0  # this session, optimizer steps only
    session_start = time.perf_counter()

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - session_start

    val_loss = None
    last_saved = step if state is not None else -1
    last_eval = -1
    stopped = "max_steps"
    try:
        with _SigintFlag(say) as sigint:
            if state is None:
                val_loss, last_eval = run_eval(), step
                say(f"step 0: val loss {val_loss:.4f}")
            bar = tqdm(total=tc["max_steps"], initial=step, unit="step", file=sys.stderr, disable=not verbose,
                       dynamic_ncols=True, desc=f"train {preset}")
            with bar:
                while step < tc["max_steps"]:
                    t0 = time.perf_counter()
                    lr = lr_at(step, tc["lr"], tc["warmup_steps"], tc["max_steps"], tc["min_lr_ratio"])
                    sums = dict.fromkeys(("loss", "lm_loss", "mtp_loss", "aux_loss"), 0.0)
                    for _ in range(accum):
                        x, y = data_mod.get_batch(train_tokens, tc["batch_size"], tc["seq_len"], gen)
                        o = trainer.micro_step(x, y, accum)
                        for k, v in o.items():
                            sums[k] += v if v is not None else 0.0
                    loss = sums["loss"] / accum
                    if not math.isfinite(loss):
                        raise TrainError(f"loss is {loss} at step {step + 1} (lr {lr:.3g}); try a lower --lr or "
                                         f"--grad-clip, or resume from an earlier checkpoint in {ckpt_dir}")
                    grad_norm = trainer.optimizer_step(lr)
                    step += 1
                    tokens_seen += tok_per_step
                    dt = time.perf_counter() - t0
                    train_time += dt
                    rec = {"step": step, "loss": loss, "lm_loss": sums["lm_loss"] / accum,
                           "mtp_loss": sums["mtp_loss"] / accum if o["mtp_loss"] is not None else None,
                           "aux_loss": sums["aux_loss"] / accum, "lr": lr, "grad_norm": grad_norm,
                           "tokens": tokens_seen, "tokens_per_s": tok_per_step / dt,
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
            trainer.model.save_pretrained(out / FINAL, tokenizer_file=tokenizer_file)
    finally:
        metrics_file.close()
    plot_losses(records, plot_path)
    return {
        "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 700.0)), "steps": step, "tokens": tokens_seen,
        "tokens_per_s": (step - (state["step"] if state else 0)) * tok_per_step / max(train_time, 1e-9),
        "elapsed_s": elapsed(), "stopped": stopped, "backend": be.name, "device": trainer.device_type,
        **trainer.summary, "out_dir": str(out), "final_dir": str(out / FINAL),
        "checkpoint": str(latest_checkpoint(out)), "metrics": str(metrics_path), "plot": str(plot_path),
    }
