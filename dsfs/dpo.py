"""Direct preference optimization behind ``dsfs dpo`` (Rafailov et al. 2023; TRL's ``DPOTrainer`` names and metrics).

The policy and a frozen reference model start from the same checkpoint. Each micro-batch holds ``batch_size``
preference pairs as ``2 * batch_size`` rows, the chosen sequences first (prompt + chosen completion), then the
rejected ones, right-padded; the targets are -100 off the completion tokens. The loss is the fused, chunked
`reference.preference.preference` on the policy's final hidden states and LM head: log-probs summed over the
completion tokens (averaged for ``ipo``) against the reference model's, ``loss_type`` ``sigmoid`` / ``ipo`` /
``hinge``, ``beta``, ``label_smoothing`` (cDPO). The reference model runs in eval mode under ``no_grad``; with
``precompute_ref_log_probs`` its log-probs of every pair are computed once before training and it is dropped.

Dropout is off in both models (TRL's ``disable_dropout``), so at initialization policy and reference agree and the
``sigmoid`` loss is ``ln 2`` exactly. Logged per step as TRL does: ``rewards/chosen``, ``rewards/rejected``
(``beta * (logp - ref_logp)``, batch means), ``rewards/accuracies`` (share of pairs with chosen reward > rejected),
``rewards/margins``, ``logps/chosen``, ``logps/rejected``; per evaluation the held-out DPO loss (``val_loss``), the
same reward metrics on held-out pairs (``val_rewards/...``) and, for tasks with a checker, greedy accuracy.

Pairs (`load_pairs`): ``arithmetic`` and ``gsm8k`` build them with `dsfs.arithmetic.preference_pairs` /
`dsfs.gsm8k.preference_pairs` (chosen: a correct worked solution; rejected: the same solution corrupted to a wrong
answer), or a JSONL file of ``{"prompt", "chosen", "rejected"}`` (`dsfs.chat.read_preferences`).
"""

from __future__ import annotations

import importlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from dsfs import chat
from dsfs.backend import resolve_backend
from dsfs.checkpointing import model_dir_problem
from dsfs.data import plural
from dsfs.errors import CheckpointError, ConfigError, DataError
from dsfs.evaluation import Batch
from dsfs.sft import IGNORE_INDEX, cut_note, last_eval, padded_width
from dsfs.stage import (
    ExampleOrder,
    dataset_option,
    fill_options,
    load_model,
    run_stage,
    say_fn,
    stage_tokenizer,
    start_stage,
)
from dsfs.tasks import TASKS, Check, accuracy, load_task
from dsfs.train_config import TrainConfig
from dsfs.trainer import TorchTrainer
from reference.preference import LOSS_TYPES

DPO_CONFIG = TrainConfig(batch_size=16, seq_len=256, lr=5e-4, min_lr_ratio=0.0, warmup_steps=10, max_steps=200,
                         time_budget_s=None, weight_decay=0.0, grad_clip=1.0, grad_accum=1, eval_every=50,
                         eval_batches=4, mtp_weight=0.0, optimizer="adamw")


def disable_dropout(model: nn.Module) -> nn.Module:
    """Set every dropout probability of ``model`` to 0 (``nn.Dropout`` modules and ``config.hidden_dropout``), as TRL's
    ``disable_dropout``; returns ``model``."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if hasattr(m, "hidden_dropout"):
            m.hidden_dropout = 0.0
    return model


@dataclass
class PairData:
    """Tokenized preference pairs: ``train`` / ``eval`` lists of ``(prompt_ids, chosen_ids, rejected_ids)``,
    ``checks`` for accuracy, ``truncated`` counts, a ``source`` description."""

    train: list[tuple[list[int], list[int], list[int]]]
    eval: list[tuple[list[int], list[int], list[int]]]
    checks: list[Check] = field(default_factory=list)
    truncated: dict[str, int] = field(default_factory=dict)
    source: str = ""
    max_new_tokens: int = 64


def _pair_features(pairs: list[dict], tok, max_length: int, what: str, counts: dict) -> list:
    """`dsfs.chat.preference_features` of each pair (the readers have validated them). A pair cut to ``max_length``
    counts in ``counts["truncated"]``; one whose prompt alone fills ``max_length`` is dropped and counted in
    ``counts["dropped"]``. Raises `DataError` when every pair is dropped."""
    out = []
    for p in pairs:
        try:
            f = chat.preference_features(p["prompt"], p["chosen"], p["rejected"], tok, max_length)
        except DataError:
            counts["dropped"] = counts.get("dropped", 0) + 1
            continue
        out.append((f["prompt_ids"], f["chosen_ids"], f["rejected_ids"]))
        counts["truncated"] = counts.get("truncated", 0) + f["truncated"]
    if pairs and not out:
        raise DataError(f"{what}: every pair's prompt fills --seq-len {max_length}; raise it")
    return out


def load_pairs(dataset: str, tok, max_length: int, *, seed: int = 0, eval_dataset: str | None = None,
               num_examples: int | None = None, eval_examples: int = 200, splits: list[str] | None = None) -> PairData:
    """Tokenize preference pairs for DPO (module docstring); sizes and errors as `dsfs.sft.load_sft_data`'s."""
    checks: list[Check] = []
    if dataset in TASKS:
        task = load_task(dataset, num_train=num_examples or (5_000 if dataset == "arithmetic" else 0),
                         num_held_out=eval_examples, seed=seed, splits=splits, at_most=num_examples is None)
        train_pairs = task.preference_pairs(task.train, seed)
        eval_pairs = task.preference_pairs(task.held_out, seed + 1)
        checks, max_new = task.checks(tok), task.max_new_tokens
        source = f"{dataset}{' ' + ','.join(dict.fromkeys(task.splits)) if dataset == 'arithmetic' else ''}"
    else:
        if not os.path.isfile(dataset):
            raise DataError(f"--dataset {dataset}: expected arithmetic, gsm8k or a .jsonl file of preference pairs")
        train_pairs = chat.read_preferences(dataset)[:num_examples or None]
        if eval_dataset is not None:
            eval_pairs = chat.read_preferences(eval_dataset)
        else:
            if len(train_pairs) < 2:
                raise DataError(f"{dataset}: {plural(len(train_pairs), 'pair')}; need at least 2 to hold one out "
                                "(or pass --eval-dataset)")
            perm = torch.randperm(len(train_pairs), generator=torch.Generator().manual_seed(seed)).tolist()
            k = max(1, round(0.05 * len(train_pairs)))
            eval_pairs, train_pairs = [train_pairs[i] for i in perm[:k]], [train_pairs[i] for i in perm[k:]]
        source, max_new = str(dataset), 64
    counts: dict[str, dict] = {"train": {}, "eval": {}}
    train = _pair_features(train_pairs, tok, max_length, f"{source} train", counts["train"])
    ev = _pair_features(eval_pairs, tok, max_length, f"{source} held-out", counts["eval"])
    return PairData(train, ev, checks, counts, f"{source}: {plural(len(train), 'pair')}", max_new)


def collate_pairs(pairs: list[tuple[list[int], list[int], list[int]]], pad_id: int,
                  max_width: int | None = None) -> dict[str, torch.Tensor]:
    """``B`` pairs -> ``{"input_ids", "targets"}`` (2B, L) int64: rows ``[0, B)`` prompt + chosen, rows ``[B, 2B)``
    prompt + rejected, shifted (inputs drop the last token, targets the first), targets -100 on the prompt and the
    padding; right-padded with ``pad_id`` to the longest row rounded up to a multiple of 16, not past ``max_width``
    (`dsfs.sft.padded_width`)."""
    rows = [(p, c) for p, c, _ in pairs] + [(p, r) for p, _, r in pairs]
    width = padded_width(max(len(p) + len(c) - 1 for p, c in rows), max_width)
    x = torch.full((len(rows), width), pad_id, dtype=torch.long)
    y = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, (p, c) in enumerate(rows):
        seq = torch.tensor(p + c)
        x[i, :len(seq) - 1] = seq[:-1]
        y[i, len(p) - 1:len(seq) - 1] = seq[len(p):]
    return {"input_ids": x, "targets": y}


class DPOTrainer(TorchTrainer):
    """A `dsfs.trainer.Trainer` for DPO on torch models of the ``reference.Model`` API (the reference, runtime_cuda).

    ``ref_model``: the frozen reference (eval mode, no gradients), or ``None`` when every batch carries
    ``ref_chosen_logps`` / ``ref_rejected_logps``. ``beta``, ``loss_type``, ``label_smoothing``, ``rpo_alpha``: TRL's
    (``rpo_alpha``: add that times the chosen completions' mean token NLL, RPO, Pang et al. 2024). ``ops``: the
    module of the fused ``preference`` op and its ``sequence_logps`` (`reference.preference`, or
    ``kernels.triton.preference`` on CUDA). The optimizer, clipping and MoE bias update are `TorchTrainer`'s; the
    forward runs eagerly (the policy and the reference take the same code path, so their log-probs agree bit for
    bit at initialization)."""

    def __init__(self, model: nn.Module, ref_model: nn.Module | None, device: torch.device, tc: TrainConfig,
                 beta: float, loss_type: str, label_smoothing: float, ops=None, rpo_alpha: float | None = None):
        super().__init__(disable_dropout(model), device, tc.lr, tc.weight_decay, tc.grad_clip, 0.0, False,
                         tc.optimizer, deterministic=False)
        self.ref = None if ref_model is None else disable_dropout(ref_model).to(device).eval().requires_grad_(False)
        self.beta, self.loss_type, self.label_smoothing, self.rpo_alpha = beta, loss_type, label_smoothing, rpo_alpha
        self.ops = ops or importlib.import_module("reference.preference")

    @torch.no_grad()
    def ref_logps(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference model's (chosen, rejected) log-probs (B,) of a batch (precomputed ones when it has them)."""
        if "ref_chosen_logps" in batch:
            return batch["ref_chosen_logps"].to(self.device), batch["ref_rejected_logps"].to(self.device)
        if self.ref is None:
            raise ValueError("batch has no ref_chosen_logps and the trainer no reference model")
        x, y = batch["input_ids"].to(self.device), batch["targets"].to(self.device)
        lp = self.ops.sequence_logps(self.ref.hidden_states(x), self.ref.lm_head.weight, y,
                                     average=self.loss_type == "ipo")
        return lp.chunk(2)

    def _loss(self, batch: Batch):
        ref_c, ref_r = self.ref_logps(batch)
        x, y = batch["input_ids"].to(self.device), batch["targets"].to(self.device)
        h = self.model.hidden_states(x)
        loss, c, r = self.ops.preference(h, self.model.lm_head.weight, y, ref_c, ref_r, beta=self.beta,
                                         loss_type=self.loss_type, label_smoothing=self.label_smoothing)
        if self.rpo_alpha:
            n = (y[: c.shape[0]] != IGNORE_INDEX).sum(-1)
            self.nll = -(c * n if self.loss_type == "ipo" else c).sum() / n.sum().clamp(min=1)
            loss = loss + self.rpo_alpha * self.nll
        return loss, c, r, ref_c, ref_r

    def _metrics(self, loss, c, r, ref_c, ref_r, prefix: str = "") -> dict[str, float]:
        rc, rr = self.beta * (c.detach() - ref_c), self.beta * (r.detach() - ref_r)
        return {f"{prefix}rewards/chosen": rc.mean().item(), f"{prefix}rewards/rejected": rr.mean().item(),
                f"{prefix}rewards/accuracies": (rc > rr).float().mean().item(),
                f"{prefix}rewards/margins": (rc - rr).mean().item(),
                f"{prefix}logps/chosen": c.detach().mean().item(), f"{prefix}logps/rejected": r.detach().mean().item()}

    def micro_step(self, batch: Batch, accum: int) -> dict[str, float | None]:
        """Forward and backward of ``loss / accum`` for a batch of `collate_pairs`; returns ``loss`` and TRL's reward
        and log-prob metrics."""
        loss, c, r, ref_c, ref_r = self._loss(batch)
        (loss / accum).backward()
        nll = {"nll_loss": self.nll.item()} if self.rpo_alpha else {}
        return {"loss": loss.item(), **self._metrics(loss, c, r, ref_c, ref_r), **nll}

    @torch.no_grad()
    def eval_loss(self, batch: Batch) -> float:
        """The DPO loss of a held-out batch (the models in eval mode)."""
        return self._loss(batch)[0].item()

    @torch.no_grad()
    def eval_metrics(self, batches: list[Batch]) -> dict[str, float]:
        """TRL's reward metrics averaged over held-out ``batches``, named ``val_rewards/...``."""
        was = self.model.training
        self.model.eval()
        try:
            ms = [self._metrics(*self._loss(b), prefix="val_") for b in batches]
        finally:
            self.model.train(was)
        return {k: sum(m[k] for m in ms) / len(ms) for k in ms[0] if "rewards" in k}


def make_dpo_trainer(be, model, ref_model, tc: TrainConfig, beta: float, loss_type: str, label_smoothing: float,
                     rpo_alpha: float | None = None):
    """The DPO trainer of backend ``be``: `DPOTrainer` with the reference's ops, or with the Triton ops on
    ``runtime_cuda``, or ``runtime_mlx.posttrain.MLXDPOTrainer`` (``model`` and ``ref_model``: reference models,
    converted) on the MLX runtime."""
    if be.name == "mlx":
        from runtime_mlx.posttrain import MLXDPOTrainer
        from runtime_mlx.train import from_reference

        return MLXDPOTrainer(from_reference(disable_dropout(model)), from_reference(disable_dropout(ref_model)), tc.lr,
                             tc.weight_decay, tc.grad_clip, tc.optimizer, beta, loss_type, label_smoothing, rpo_alpha)
    ops = importlib.import_module("kernels.triton.preference" if be.name == "cuda" else "reference.preference")
    return DPOTrainer(model, ref_model, be.device, tc, beta, loss_type, label_smoothing, ops, rpo_alpha)


def dpo(dataset: str | None = None, out_dir: str | os.PathLike | None = None, *, init_from=None, resume=False,
        backend: str = "auto", seed: int | None = None, beta: float | None = None, loss_type: str | None = None,
        label_smoothing: float | None = None, rpo_alpha: float | None = None,
        precompute_ref_log_probs: bool | None = None,
        eval_dataset: str | None = None, num_examples: int | None = None, eval_examples: int | None = None,
        splits: list[str] | None = None, tokenizer: str | None = None, keep_last: int | None = None,
        save_every: int | None = None, overwrite: bool = False, verbose: bool = True, on_step=None,
        **overrides) -> dict:
    """Align the model of ``init_from`` with DPO on ``dataset``'s preference pairs (`load_pairs`); return the run
    summary (as `dsfs.sft.sft`'s). ``beta`` (default 0.1), ``loss_type`` (``sigmoid``), ``label_smoothing`` (0),
    ``rpo_alpha`` (0), ``precompute_ref_log_probs`` (False) are TRL's ``DPOConfig`` options; ``overrides``:
    `TrainConfig` fields over `DPO_CONFIG` (``batch_size`` counts pairs). Raises `dsfs.errors.UserError`
    subclasses on bad input."""
    say = say_fn(verbose)
    options = {"dataset": dataset_option(dataset, TASKS, splits, eval_dataset, "preference pairs"), "beta": beta,
               "loss_type": loss_type, "label_smoothing": label_smoothing, "rpo_alpha": rpo_alpha,
               "precompute_ref_log_probs": precompute_ref_log_probs,
               "eval_dataset": str(Path(eval_dataset).resolve()) if eval_dataset is not None else None,
               "num_examples": num_examples, "eval_examples": eval_examples, "splits": splits}
    start = start_stage("dpo", out_dir=out_dir, resume=resume, init_from=init_from, overwrite=overwrite, seed=seed,
                        keep_last=keep_last, save_every=save_every, default_tc=DPO_CONFIG, overrides=overrides,
                        options=options)
    opt = fill_options(start, {"beta": 0.1, "loss_type": "sigmoid", "label_smoothing": 0.0, "rpo_alpha": 0.0,
                               "precompute_ref_log_probs": False, "eval_examples": 200})
    tc, beta, loss_type, smoothing = start.tc, opt["beta"], opt["loss_type"], opt["label_smoothing"]
    if opt["dataset"] is None:
        raise ConfigError("dsfs dpo needs --dataset (arithmetic, gsm8k, or a .jsonl file of preference pairs)")
    if loss_type not in LOSS_TYPES:
        raise ConfigError(f"--loss-type {loss_type}: expected one of {', '.join(LOSS_TYPES)}")
    if not (math.isfinite(beta) and beta > 0):
        raise ConfigError(f"--beta {beta}: expected a finite number > 0")
    if not 0 <= smoothing <= 0.5:
        raise ConfigError(f"--label-smoothing {smoothing}: expected a number in [0, 0.5]")
    if not (math.isfinite(opt["rpo_alpha"]) and opt["rpo_alpha"] >= 0):
        raise ConfigError(f"--rpo-alpha {opt['rpo_alpha']}: expected a finite number >= 0")
    if smoothing and loss_type != "sigmoid":
        raise ConfigError(f"--label-smoothing applies to --loss-type sigmoid (cDPO), not {loss_type}")
    be = resolve_backend(backend)
    if start.ckpt is not None and model_dir_problem(start.init_dir) is not None:
        raise CheckpointError(f"the run's reference model, its --init-from {start.init_dir}, is gone "
                              f"({model_dir_problem(start.init_dir)}); DPO needs it to continue")
    model = load_model(be, start.model_dir)
    cfg = model.config
    tok_file, tok = stage_tokenizer(start.model_dir, cfg, tokenizer)
    tc.check_model(cfg.max_position_embeddings)
    eos = cfg.eos_token_id[0] if isinstance(cfg.eos_token_id, list) else cfg.eos_token_id
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else eos
    data = load_pairs(opt["dataset"], tok, tc.seq_len, seed=start.seed, eval_dataset=opt["eval_dataset"],
                      num_examples=opt["num_examples"], eval_examples=opt["eval_examples"], splits=opt["splits"])
    say(f"data: {data.source}; {plural(len(data.eval), 'held-out pair')}; beta {beta}, loss_type {loss_type}"
        + (f", label_smoothing {smoothing}" if smoothing else "") + cut_note(data.truncated, tc.seq_len))
    torch.manual_seed(start.seed)
    ref_model = load_model(be, start.init_dir, train=False)  # the run's start: the frozen reference, also on resume
    trainer = make_dpo_trainer(be, model, ref_model, tc, beta, loss_type, smoothing, opt["rpo_alpha"])
    ref_lp = None
    if opt["precompute_ref_log_probs"]:
        say(f"precomputing the reference log-probs of {plural(len(data.train), 'pair')}")
        ref_lp = []
        for s in range(0, len(data.train), tc.batch_size):
            b = collate_pairs(data.train[s:s + tc.batch_size], pad, tc.seq_len)
            ref_lp.extend(zip(*(t.tolist() for t in trainer.ref_logps(b)), strict=True))
    order = ExampleOrder(len(data.train), start.seed, start.state["order"] if start.state else 0)
    counted = [0]

    def next_batch() -> Batch:
        idx = order.take(tc.batch_size)
        batch = collate_pairs([data.train[i] for i in idx], pad, tc.seq_len)
        if ref_lp is not None:
            batch["ref_chosen_logps"] = torch.tensor([ref_lp[i][0] for i in idx])
            batch["ref_rejected_logps"] = torch.tensor([ref_lp[i][1] for i in idx])
        counted[0] += int((batch["input_ids"] != pad).sum())
        return batch

    def tokens_done() -> int:
        n, counted[0] = counted[0], 0
        return n

    n_eval = min(tc.eval_batches * tc.batch_size, len(data.eval))
    evals = [collate_pairs(data.eval[s:s + tc.batch_size], pad, tc.seq_len) for s in range(0, n_eval, tc.batch_size)]

    def extra() -> dict:
        m = trainer.eval_metrics(evals)
        if data.checks:
            m.update(accuracy(trainer.model, tok, data.checks, eos, data.max_new_tokens))
        return m

    keys = ["rewards/margins", "rewards/accuracies", "val_rewards/margins"]
    if data.checks:
        keys += ["val_accuracy"] + [f"val_accuracy/{s}" for s in dict.fromkeys(c.split for c in data.checks)]
    summary = run_stage(start, trainer, next_batch=next_batch, eval_batches=evals, tokens_per_step=tokens_done,
                        order=order, tokenizer_file=tok_file, overwrite=overwrite, say=say, verbose=verbose,
                        extra_eval=extra, plot_keys=keys, on_step=on_step, perplexity=False,
                        extra_state=lambda: {"truncated": data.truncated})
    last = last_eval(start.out)
    return {**summary, "backend": be.name, "truncated": data.truncated, "seq_len": tc.seq_len,
            **{k: v for k, v in last.items() if k.startswith(("val_accuracy", "val_rewards"))}}


def add_dpo(sub) -> None:
    """Register ``dsfs dpo`` (`dpo`)."""
    from dsfs.stage import add_stage_options

    p = sub.add_parser("dpo", help="direct preference optimization against a frozen reference model",
                       description="Align a checkpoint (usually a dsfs sft run) with DPO on preference pairs: "
                       "arithmetic or gsm8k (chosen: a correct solution, rejected: a corrupted one with a wrong "
                       "answer) or a JSONL file of {\"prompt\", \"chosen\", \"rejected\"} rows. The reference model "
                       "is the --init-from checkpoint, frozen. Logs TRL's rewards/chosen, rewards/rejected, "
                       "rewards/accuracies and rewards/margins.")
    p.add_argument("--dataset", metavar="NAME|PATH", help="arithmetic, gsm8k, or a .jsonl file of preference pairs")
    p.add_argument("--eval-dataset", metavar="PATH", help="held-out pairs (default for a file: 5%% of it)")
    p.add_argument("--splits", metavar="A,B", help="arithmetic splits (default: the task's training mixture)")
    p.add_argument("--num-examples", type=int, metavar="N", help="training pairs (arithmetic default: 5000)")
    p.add_argument("--eval-examples", type=int, metavar="N", help="held-out problems per split (default: 200)")
    p.add_argument("--beta", type=float, metavar="B", help="the KL penalty's inverse temperature (default: 0.1)")
    p.add_argument("--loss-type", choices=list(LOSS_TYPES), help="default: sigmoid")
    p.add_argument("--label-smoothing", type=float, metavar="E", help="cDPO's label noise, sigmoid only (default: 0)")
    p.add_argument("--rpo-alpha", type=float, metavar="A", help="add A times the chosen completions' token NLL (RPO, "
                   "Pang et al. 2024; keeps the chosen likelihood from falling; default: 0)")
    p.add_argument("--precompute-ref-log-probs", action="store_true", default=None,
                   help="compute the reference model's log-probs once before training, then drop it")
    add_stage_options(p, "dpo", DPO_CONFIG)
    p.set_defaults(func=_run_dpo)


def _run_dpo(args) -> int:
    from dsfs.stage import print_summary, stage_kwargs

    s = dpo(init_from=args.init_from, beta=args.beta, loss_type=args.loss_type,
            label_smoothing=args.label_smoothing, rpo_alpha=args.rpo_alpha,
            precompute_ref_log_probs=args.precompute_ref_log_probs, **stage_kwargs(args))
    cut = cut_note(s["truncated"], s["seq_len"])
    print_summary(s, [", ".join(f"{k} {v:.3f}" for k, v in s.items() if k.startswith(("val_accuracy", "val_rewards")))]
                  + ([cut.lstrip("; ")] if cut else []))
    return 0
