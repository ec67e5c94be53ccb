"""Knowledge distillation behind ``dsfs distill`` (Hinton et al. 2015; on-policy GKD, Agarwal et al. 2024, with TRL's
``GKDTrainer`` names): a student learns a teacher's next-token distributions.

The loss is the fused, chunked `reference.distill.distill` on the two models' final hidden states and LM heads: the
generalized JSD with ``beta`` (0: forward KL, 1: reverse KL) at ``temperature``, mixed with the hard-label
cross-entropy (``weight_hard_loss``; the soft loss gets ``1 - weight_hard_loss``). Neither model's (B, T, V)
logits are held at once. The teacher runs in eval mode under ``no_grad``; teacher and student must share the
tokenizer (the same tokenizer.json, or at least the same vocabulary size when only one holds one).

Data: the pretraining token shards of ``dsfs prepare`` (``--data``; random windows of ``seq_len + 1`` tokens, every
token a target, as ``dsfs train`` draws them). With ``lmbda`` > 0, each micro-batch is on-policy with that
probability (drawn from torch's generator, which checkpoints save): the student samples a continuation of the first
half of each window (temperature 1, ``max_new_tokens``) and the loss is the divergence on the sampled tokens, which
the teacher scores; the hard-label term is dropped there (its labels would be the student's own samples).

The student: ``--init-from`` a checkpoint, or a fresh model of ``--student-preset`` (`dsfs.presets.MODEL_PRESETS`)
with the teacher's vocabulary and special ids. Validation: the student's cross-entropy (``val_loss``) on held-out
data, comparable with ``dsfs train``'s.
"""

from __future__ import annotations

import importlib
import math
import os
from pathlib import Path

import torch
from torch import nn

from dsfs import data as data_mod
from dsfs.backend import resolve_backend
from dsfs.checkpointing import load_model_dir, resolve_model_dir
from dsfs.errors import ConfigError, DataError
from dsfs.evaluation import Batch, eval_batches
from dsfs.presets import MODEL_PRESETS
from dsfs.stage import ExampleOrder, StageStart, fill_options, run_stage, say_fn, stage_tokenizer, start_stage
from dsfs.train_config import TrainConfig
from dsfs.trainer import TorchTrainer
from reference import Model, ModelConfig

DISTILL_CONFIG = TrainConfig(batch_size=8, seq_len=256, lr=6e-3, min_lr_ratio=0.0, warmup_steps=60, max_steps=1300,
                             time_budget_s=None, weight_decay=1.0, grad_clip=1.0, grad_accum=1, eval_every=100,
                             eval_batches=12, mtp_weight=0.0, optimizer="muon")


class DistillTrainer(TorchTrainer):
    """A `dsfs.trainer.Trainer` that distills ``teacher`` into ``model`` (torch models of the ``reference.Model`` API).

    ``beta``, ``temperature``, ``lmbda`` (TRL's GKD names), ``weight_hard_loss`` (Liger's); ``max_new_tokens``: the
    length of on-policy samples; ``ops``: the module of the fused ``distill`` op (`reference.distill`, or
    ``kernels.triton.distill`` on CUDA). Eager forward; the optimizer, clipping and MoE bias update are
    `TorchTrainer`'s."""

    def __init__(self, model: nn.Module, teacher: nn.Module, device: torch.device, tc: TrainConfig, beta: float,
                 temperature: float, weight_hard_loss: float, lmbda: float, max_new_tokens: int, eos_id: int,
                 ops=None):
        super().__init__(model, device, tc.lr, tc.weight_decay, tc.grad_clip, 0.0, False, tc.optimizer,
                         deterministic=False)
        self.ops = ops or importlib.import_module("reference.distill")
        self.teacher = teacher.to(device).eval().requires_grad_(False)
        self.beta, self.temperature, self.weight_hard_loss = beta, temperature, weight_hard_loss
        self.lmbda, self.max_new_tokens, self.eos_id = lmbda, max_new_tokens, eos_id

    @torch.no_grad()
    def on_policy(self, batch: Batch) -> Batch:
        """The student's samples for the batch's prompts: ``batch["prompt_len"]`` leading tokens of each row are kept
        (pretraining windows: the first half), the rest is sampled (temperature 1) and becomes the targets."""
        x = batch["input_ids"]
        keep = int(batch.get("prompt_len", torch.tensor(x.shape[1] // 2)))
        was = self.model.training
        self.model.eval()
        try:
            seq = self.model.generate(x[:, :keep].to(self.device), self.max_new_tokens, temperature=1.0)
        finally:
            self.model.train(was)
        y = torch.full_like(seq, -100)
        y[:, keep - 1:-1] = seq[:, keep:]
        return {"input_ids": seq[:, :-1], "targets": y[:, :-1]}

    def _loss(self, batch: Batch, hard_weight: float):
        x, y = batch["input_ids"].to(self.device), batch["targets"].to(self.device)
        hs = self.model.hidden_states(x)
        with torch.no_grad():
            ht = self.teacher.hidden_states(x)
        return self.ops.distill(hs.flatten(0, 1), self.model.lm_head.weight, ht.flatten(0, 1),
                            self.teacher.lm_head.weight, y.flatten(), beta=self.beta, temperature=self.temperature,
                            weight_hard_loss=hard_weight, weight_soft_loss=1.0 - hard_weight)

    def micro_step(self, batch: Batch, accum: int) -> dict[str, float | None]:
        """Forward and backward of ``loss / accum``; returns ``loss``, ``soft_loss`` (the divergence), ``hard_loss``
        (the student's cross-entropy on the labels; ``None`` on an on-policy batch) and ``on_policy`` (0 or 1)."""
        on = self.lmbda > 0 and float(torch.rand(())) < self.lmbda
        if on:
            batch = self.on_policy(batch)
        loss, soft, hard = self._loss(batch, 0.0 if on else self.weight_hard_loss)
        (loss / accum).backward()
        return {"loss": loss.item(), "soft_loss": soft.item(), "hard_loss": None if on else hard.item(),
                "on_policy": float(on)}


def make_distill_trainer(be, model, teacher, tc: TrainConfig, beta: float, temperature: float,
                         weight_hard_loss: float, lmbda: float, max_new_tokens: int, eos_id: int):
    """The distillation trainer of backend ``be``: `DistillTrainer` with the reference's op, or the Triton op on
    ``runtime_cuda``, or ``runtime_mlx.posttrain.MLXDistillTrainer`` (``model`` and ``teacher``: reference models,
    converted) on the MLX runtime."""
    if be.name == "mlx":
        from runtime_mlx.posttrain import MLXDistillTrainer
        from runtime_mlx.train import from_reference

        return MLXDistillTrainer(from_reference(model), from_reference(teacher), tc.lr, tc.weight_decay, tc.grad_clip,
                                 tc.optimizer, beta, temperature, weight_hard_loss, lmbda, max_new_tokens, eos_id)
    ops = importlib.import_module("kernels.triton.distill" if be.name == "cuda" else "reference.distill")
    return DistillTrainer(model, teacher, be.device, tc, beta, temperature, weight_hard_loss, lmbda, max_new_tokens,
                          eos_id, ops)


def _student(start: StageStart, teacher_cfg: ModelConfig, preset: str | None, say) -> nn.Module:
    """The student a session starts from: the resumed checkpoint's, ``init_from``'s, or a fresh ``preset`` model."""
    if start.ckpt is not None or preset is None:
        return load_model_dir(start.model_dir, Model).train()
    if preset not in MODEL_PRESETS:
        raise ConfigError(f"--student-preset {preset}: expected one of {', '.join(MODEL_PRESETS)}")
    cfg = ModelConfig(**{**MODEL_PRESETS[preset], "vocab_size": teacher_cfg.vocab_size,
                         "bos_token_id": teacher_cfg.bos_token_id, "eos_token_id": teacher_cfg.eos_token_id,
                         "pad_token_id": teacher_cfg.pad_token_id})
    return Model(cfg).train()


def distill(teacher: str | os.PathLike | None = None, out_dir: str | os.PathLike | None = None, *,
            init_from=None, student_preset: str | None = None, resume=False, data_dir=None,
            backend: str = "auto", seed: int | None = None, beta: float | None = None,
            temperature: float | None = None, weight_hard_loss: float | None = None, lmbda: float | None = None,
            max_new_tokens: int | None = None, tokenizer: str | None = None, keep_last: int | None = None,
            save_every: int | None = None, overwrite: bool = False, verbose: bool = True, on_step=None,
            **overrides) -> dict:
    """Distill the model in ``teacher`` into a student (``init_from``, or a fresh ``student_preset`` model) on the
    prepared token shards of ``data_dir`` (default: `dsfs.data.prepare`'s default output); return the run summary.

    ``beta`` (default 0: forward KL), ``temperature`` (1.0), ``lmbda`` (0: off-policy only), ``max_new_tokens``
    (on-policy sample length, default ``seq_len // 2``) are TRL's GKD options; ``weight_hard_loss`` (0.5) Liger's.
    ``overrides``: `TrainConfig` fields over `DISTILL_CONFIG`. Raises `dsfs.errors.UserError` subclasses on bad
    input: among them a teacher whose tokenizer or vocabulary differs from the student's or the data's."""
    say = say_fn(verbose)
    if not resume and init_from is None and student_preset is None:
        raise ConfigError("dsfs distill needs the student: --init-from DIR (a checkpoint) or --student-preset NAME "
                          f"(a fresh model: {', '.join(MODEL_PRESETS)})")
    if init_from is not None and student_preset is not None:
        raise ConfigError("pass --init-from (a student checkpoint) or --student-preset (a fresh student), not both")
    options = {"teacher": str(resolve_model_dir(teacher).resolve()) if teacher is not None else None,
               "student_preset": student_preset, "beta": beta, "temperature": temperature,
               "weight_hard_loss": weight_hard_loss, "lmbda": lmbda, "max_new_tokens": max_new_tokens,
               "data_dir": str(Path(data_dir).resolve()) if data_dir is not None else None}
    start = start_stage("distill", out_dir=out_dir, resume=resume, init_from=None if resume else init_from or teacher,
                        overwrite=overwrite, seed=seed, keep_last=keep_last, save_every=save_every,
                        default_tc=DISTILL_CONFIG, overrides=overrides, options=options)
    tc = start.tc
    opt = fill_options(start, {"beta": 0.0, "temperature": 1.0, "weight_hard_loss": 0.5, "lmbda": 0.0,
                               "max_new_tokens": tc.seq_len // 2})
    if opt["teacher"] is None:
        raise ConfigError("dsfs distill needs --teacher DIR (the model to distill)")
    beta, temperature, hard, lmbda = opt["beta"], opt["temperature"], opt["weight_hard_loss"], opt["lmbda"]
    for name, v, lo, hi in (("beta", beta, 0, 1), ("weight-hard-loss", hard, 0, 1), ("lmbda", lmbda, 0, 1)):
        if not lo <= v <= hi:
            raise ConfigError(f"--{name} {v}: expected a number in [{lo}, {hi}]")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ConfigError(f"--temperature {temperature}: expected a finite number > 0")
    be = resolve_backend(backend)
    teacher_dir = resolve_model_dir(opt["teacher"])
    teacher_model = load_model_dir(teacher_dir, Model)
    tcfg = teacher_model.config
    tok_file, _ = stage_tokenizer(teacher_dir, tcfg, tokenizer)
    torch.manual_seed(start.seed)
    student = _student(start, tcfg, opt["student_preset"] if start.ckpt is None and init_from is None else None,
                       say)
    scfg = student.config
    if scfg.vocab_size != tcfg.vocab_size:
        raise DataError(f"the student's vocab_size {scfg.vocab_size} differs from the teacher's {tcfg.vocab_size}; "
                        "distillation needs a shared tokenizer")
    if init_from is not None:
        mine = resolve_model_dir(init_from) / "tokenizer.json"
        if mine.is_file() and data_mod.file_sha256(mine) != data_mod.file_sha256(tok_file):
            raise DataError(f"tokenizer mismatch: {mine} differs from the teacher's {tok_file}")
    ddir = opt["data_dir"]
    if ddir is None:
        ddir = str(data_mod.prepare(verbose=verbose))
        opt["data_dir"] = ddir
    meta = data_mod.load_meta(ddir)
    theirs = os.path.join(ddir, meta.get("tokenizer", "tokenizer.json"))
    if data_mod.file_sha256(theirs) != data_mod.file_sha256(tok_file):
        raise DataError(f"tokenizer mismatch: the data in {ddir} was prepared with another tokenizer than the "
                        f"teacher's {tok_file}")
    train_tokens, val_tokens = data_mod.load_tokens(ddir, "train"), data_mod.load_tokens(ddir, "val")
    positions = min(scfg.max_position_embeddings, tcfg.max_position_embeddings)
    tc.check_model(positions)
    if lmbda > 0 and tc.seq_len // 2 + opt["max_new_tokens"] > positions:
        raise ConfigError(f"on-policy samples continue the first {tc.seq_len // 2} tokens of a window by "
                          f"--max-new-tokens {opt['max_new_tokens']}: past max_position_embeddings {positions}; "
                          "lower one of them")
    eos = tcfg.eos_token_id[0] if isinstance(tcfg.eos_token_id, list) else tcfg.eos_token_id
    n_teacher = sum(p.numel() for p in teacher_model.parameters())
    trainer = make_distill_trainer(be, student, teacher_model, tc, beta, temperature, hard, lmbda,
                                   opt["max_new_tokens"], eos)
    say(f"teacher {teacher_dir}: {n_teacher / 1e6:.2f}M parameters; student {trainer.n_params / 1e6:.2f}M "
        f"({trainer.n_params / n_teacher:.0%}); beta {beta}, temperature {temperature}, weight_hard_loss {hard}, "
        f"lmbda {lmbda}; data {ddir}")
    gen = torch.Generator().manual_seed(start.seed)
    if start.state is not None:
        gen.set_state(start.state["data_generator"])
    order = ExampleOrder(1, start.seed)  # the windows are drawn by `gen`; the order only carries the position

    def next_batch() -> Batch:
        x, y = data_mod.get_batch(train_tokens, tc.batch_size, tc.seq_len, gen)
        return {"input_ids": x, "targets": y}

    summary = run_stage(start, trainer, next_batch=next_batch,
                        eval_batches=eval_batches(val_tokens, tc.batch_size, tc.seq_len, tc.eval_batches),
                        tokens_per_step=tc.batch_size * tc.seq_len * tc.grad_accum, order=order,
                        tokenizer_file=tok_file, overwrite=overwrite, say=say, verbose=verbose,
                        extra_state=lambda: {"data_generator": gen.get_state()}, plot_keys=("soft_loss", "hard_loss"),
                        on_step=on_step)
    return {**summary, "backend": be.name, "teacher_params": n_teacher, "student_params": trainer.n_params}


def add_distill(sub) -> None:
    """Register ``dsfs distill`` (`distill`)."""
    from dsfs.stage import add_stage_options

    p = sub.add_parser("distill", help="distill a teacher into a smaller student (KL / generalized JSD, GKD)",
                       description="Train a student on a teacher's next-token distributions over prepared token "
                       "shards: generalized JSD (beta 0: forward KL, 1: reverse KL) at a temperature, mixed with the "
                       "hard-label cross-entropy; optionally on the student's own samples (lmbda). The student is "
                       "--init-from a checkpoint or a fresh --student-preset model.")
    p.add_argument("--teacher", metavar="DIR", help="the teacher model (a model, run or checkpoints directory)")
    p.add_argument("--student-preset", choices=list(MODEL_PRESETS), help="a fresh student of this preset")
    p.add_argument("--data", metavar="DIR", help="prepared data dir, tokenized with the teacher's tokenizer "
                   "(default: dsfs prepare's default output)")
    p.add_argument("--beta", type=float, metavar="B", help="generalized JSD weight: 0 forward KL (Hinton's), 1 "
                   "reverse KL, between: the JSD (default: 0; TRL's GKD defaults to 0.5, which distilled the default "
                   "checkpoint worse here: docs/posttraining.md)")
    p.add_argument("--temperature", type=float, metavar="T", help="softmax temperature of both models (default: 1)")
    p.add_argument("--weight-hard-loss", type=float, metavar="W", help="weight of the cross-entropy on the data's "
                   "tokens; the divergence gets 1 - W (default: 0.5)")
    p.add_argument("--lmbda", type=float, metavar="L", help="share of on-policy micro-batches (student samples "
                   "scored by the teacher; default: 0)")
    p.add_argument("--max-new-tokens", type=int, metavar="N", help="on-policy sample length (default: seq-len / 2)")
    add_stage_options(p, "distill", DISTILL_CONFIG, init_help="the student's starting checkpoint (or use "
                      "--student-preset)")
    p.set_defaults(func=_run_distill)


def _run_distill(args) -> int:
    from dsfs.stage import print_summary, stage_kwargs

    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens {args.max_new_tokens}: expected an integer >= 1")
    s = distill(args.teacher, init_from=args.init_from, student_preset=args.student_preset, data_dir=args.data,
                beta=args.beta, temperature=args.temperature, weight_hard_loss=args.weight_hard_loss,
                lmbda=args.lmbda, max_new_tokens=args.max_new_tokens, **stage_kwargs(args))
    print_summary(s, [f"student {s['student_params'] / 1e6:.2f}M parameters, teacher "
                      f"{s['teacher_params'] / 1e6:.2f}M"])
    return 0
