"""Group relative policy optimization behind ``dsfs grpo`` (DeepSeekMath §4.1; DeepSeek-R1 §2.2; TRL's
``GRPOTrainer`` argument names, definitions and logged metrics).

Each optimizer step trains on one *generation*: ``batch_size * grad_accum / num_generations`` prompts, each sampled
``num_generations`` times by the policy (`dsfs.rollout.rollout`: batched, left-padded, with the KV cache, tools
optional), scored by the reward functions (`dsfs.rewards`), turned into advantages within each group of a prompt's
samples (`advantages`), and cut into ``grad_accum`` micro-batches. With ``num_iterations`` > 1 the same generation
serves that many optimizer steps, the ratio taken against the log-probs the policy gave before the first of them
(``old_logps``); with ``num_iterations`` 1 the ratio is 1 and ``old_logps`` is the detached current log-prob, as TRL.
With ``beta`` > 0 a frozen copy of the start model gives the reference log-probs of the k3 KL penalty.

The loss is the fused, chunked `reference.grpo.grpo` op (the Triton op on ``runtime_cuda``, the MLX op on
``runtime_mlx``) on the policy's final hidden states at the completion positions and its LM head: the clipped
surrogate with ``epsilon`` / ``epsilon_high`` (DAPO's clip-higher), the k3 KL, aggregated by ``loss_type``
(``grpo``, ``bnpo``, ``dr_grpo``, ``dapo``). Tool-response tokens are masked out of it (their ``loss_mask`` is 0); the
reward is on the final answer.

Batches are right-padded ``prompt + completion`` rows (no attention mask needed: padding follows the real tokens);
the completion positions are gathered per row. Optional DAPO dynamic sampling (``dynamic_sampling``) drops the
groups whose rewards are all equal (they carry no advantage) and samples more prompts, up to
``max_resample`` extra rounds, to fill the generation.

Logged per step (TRL's names): ``reward``, ``reward_std``, ``rewards/<name>/mean``, ``rewards/<name>/std``,
``frac_reward_zero_std``, ``completions/mean_length``, ``completions/min_length``, ``completions/max_length``,
``completions/clipped_ratio`` (share that hit ``max_completion_length``), ``kl`` (with beta > 0), ``entropy``,
``clip_ratio/low_mean``, ``clip_ratio/high_mean``, ``clip_ratio/region_mean``, ``num_tokens``; with tools
``tools/calls_mean``; with dynamic sampling ``dynamic_sampling/dropped_groups``. Per evaluation: ``val_loss`` (the
held-out reference completions' cross-entropy, as SFT's), greedy ``val_accuracy`` (with the tools when the run uses
them) and ``val_format`` (the format reward of those greedy completions).
"""

from __future__ import annotations

import importlib
import math
import os
from dataclasses import dataclass, field

import torch
from torch import nn

from dsfs import chat
from dsfs.backend import resolve_backend
from dsfs.checkpointing import model_dir_problem
from dsfs.data import EOS, TOOL_TOKENS, plural, require_special_tokens
from dsfs.errors import CheckpointError, ConfigError, DataError
from dsfs.evaluation import Batch, autocast
from dsfs.rollout import Completion, completion_text, rollout, sequence_seeds
from dsfs.sft import collate, padded_width
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
from dsfs.tasks import TASKS, accuracy, answer_column, load_task
from dsfs.train_config import TrainConfig
from dsfs.trainer import TorchTrainer

SCALE_REWARDS = ("group", "batch", "none")
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
ADVANTAGE_EPS = 1e-4  # TRL's: (r - mean) / (std + 1e-4)

# batch_size counts completions (a multiple of num_generations), as TRL's per_device_train_batch_size. AdamW at a
# constant lr 2e-5: the measured arithmetic recipe (README), 1.4 s a step on 2 CPU cores for the tiny preset
GRPO_CONFIG = TrainConfig(batch_size=64, seq_len=256, lr=2e-5, min_lr_ratio=1.0, warmup_steps=0, max_steps=500,
                          time_budget_s=None, weight_decay=0.0, grad_clip=1.0, grad_accum=1, eval_every=100,
                          eval_batches=4, mtp_weight=0.0, optimizer="adamw")

GRPO_DEFAULTS = {"num_generations": 8, "max_completion_length": 96, "temperature": 1.0, "top_p": 1.0, "top_k": None,
                 "beta": 0.0, "epsilon": 0.2, "epsilon_high": None, "loss_type": "dapo", "scale_rewards": "group",
                 "num_iterations": 1, "reward_funcs": ["accuracy", "format"], "reward_weights": None,
                 "mask_truncated_completions": False, "dynamic_sampling": False, "max_resample": 3,
                 "tools": False, "max_tool_calls": 2, "style": "r1"}


def advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: str = "group") -> torch.Tensor:
    """GRPO's advantages (DeepSeekMath §4.1.2, outcome supervision; TRL's ``scale_rewards``).

    ``rewards`` (N,) float, N a multiple of ``num_generations``, each prompt's samples consecutive. Returns (N,)
    float32 ``(r - mean_group) / (std + eps)`` with ``eps`` = `ADVANTAGE_EPS` and ``std`` the group's (``"group"``),
    the whole batch's (``"batch"``), or 1 without the eps (``"none"``: Dr. GRPO's unscaled advantages); standard
    deviations unbiased, as ``torch.std``. A group whose rewards are all equal gets advantage 0 exactly; a group of
    one sample has std NaN in torch, taken as 0. Non-finite rewards raise ``ValueError``."""
    r = rewards.to(torch.float32)
    if r.ndim != 1 or r.numel() % num_generations:
        raise ValueError(f"rewards: expected (N,) with N a multiple of num_generations={num_generations}, got "
                         f"{tuple(r.shape)}")
    if not bool(torch.isfinite(r).all()):
        raise ValueError("rewards: expected finite numbers, got NaN or inf")
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards={scale_rewards!r}: expected one of {', '.join(SCALE_REWARDS)}")
    groups = r.view(-1, num_generations)
    mean = groups.mean(dim=1, keepdim=True)
    centered = (groups - mean).flatten()
    centered = torch.where(groups.eq(groups[:, :1]).all(dim=1, keepdim=True).expand_as(groups).flatten(),
                           torch.zeros_like(centered), centered)
    if scale_rewards == "none":
        return centered
    if scale_rewards == "group":
        std = groups.std(dim=1, keepdim=True).expand_as(groups).flatten() if num_generations > 1 \
            else torch.zeros_like(r)
    else:
        std = r.std().expand_as(r) if r.numel() > 1 else torch.zeros_like(r)
    return centered / (torch.nan_to_num(std, nan=0.0) + ADVANTAGE_EPS)


@dataclass
class PromptData:
    """GRPO's prompts: ``train``, a list of ``(prompt_messages, columns)`` (columns: the extra fields the reward
    functions receive, such as ``answer``), the held-out ``checks`` of a built-in task, ``eval_sft`` (held-out
    reference completions for ``val_loss``, as SFT features), a ``source`` description."""

    train: list[tuple[list[dict], dict]]
    checks: list = field(default_factory=list)
    eval_sft: list = field(default_factory=list)
    source: str = ""


def load_prompts(dataset: str, tok, max_length: int, *, seed: int = 0, num_examples: int | None = None,
                 eval_examples: int = 200, splits: list[str] | None = None, style: str = "r1") -> PromptData:
    """The prompts of ``dataset``: ``arithmetic`` / ``gsm8k`` (their training problems; columns ``answer``; held-out
    checks and reference completions in ``style``), or a JSONL file of ``{"prompt": str | messages, ...}`` rows,
    whose other fields become the reward functions' columns (TRL passes a dataset's extra columns to them). Raises
    `DataError` for a bad file or row."""
    if dataset in TASKS:
        task = load_task(dataset, num_train=num_examples or (20_000 if dataset == "arithmetic" else 0),
                         num_held_out=eval_examples, seed=seed, splits=splits, at_most=num_examples is None,
                         style=style)
        train = [(task.conversation(p)[:-1], {"answer": answer_column(dataset, p)}) for p in task.train]
        eval_sft = []
        for p in task.held_out:
            ids, labels, _ = chat.sft_features(task.conversation(p), tok, max_length)
            eval_sft.append((ids, labels))
        name = f"{dataset}{' ' + ','.join(dict.fromkeys(task.splits)) if dataset == 'arithmetic' else ''}"
        return PromptData(train, task.checks(tok), eval_sft, f"{name} ({style} format)")
    if not os.path.isfile(dataset):
        raise DataError(f"--dataset {dataset}: expected arithmetic, gsm8k or a .jsonl file of prompts")
    rows = chat.read_prompts(dataset)
    return PromptData(rows[:num_examples or None], source=dataset)


def collate_rollouts(comps: list[Completion], advantages_: torch.Tensor, pad_id: int, max_width: int,
                     mask_truncated: bool = False) -> Batch:
    """Right-padded rows of ``prompt + completion`` for the GRPO loss.

    Returns ``input_ids`` (N, L) int64 (each row's tokens but its last, padded with ``pad_id``), ``positions``
    (N, C) int64 (the input positions whose next token is completion token ``c``; 0 on padding), ``completion_ids``
    (N, C) int64 (0 on padding), ``completion_mask`` (N, C) float32 (1 on the tokens the model sampled; 0 on padding,
    tool responses, and with ``mask_truncated`` on every token of a completion that hit the length limit, TRL's
    ``mask_truncated_completions``), ``advantages`` (N,) float32, ``rollout_logps`` (N, C) float32 (the sampler's;
    for checks and metrics), ``num_tokens`` () int64 (non-pad tokens). L is rounded up as SFT's `padded_width`, at
    most ``max_width``."""
    n, c = len(comps), max(1, max(len(x.ids) for x in comps))
    width = padded_width(max(len(x.prompt_ids) + len(x.ids) - 1 for x in comps), max_width)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    pos = torch.zeros((n, c), dtype=torch.long)
    cids = torch.zeros((n, c), dtype=torch.long)
    mask = torch.zeros((n, c), dtype=torch.float32)
    lps = torch.zeros((n, c), dtype=torch.float32)
    for r, x in enumerate(comps):
        seq = x.prompt_ids + x.ids
        ids[r, :len(seq) - 1] = torch.tensor(seq[:-1])
        k, p = len(x.ids), len(x.prompt_ids)
        if k:
            pos[r, :k] = torch.arange(p - 1, p - 1 + k)
            cids[r, :k] = torch.tensor(x.ids)
            lps[r, :k] = torch.tensor(x.logps)
            if not (mask_truncated and x.finish_reason == "length"):
                mask[r, :k] = torch.tensor(x.loss_mask, dtype=torch.float32)
    used = sum(len(x.prompt_ids) + len(x.ids) for x in comps)
    return {"input_ids": ids, "positions": pos, "completion_ids": cids, "completion_mask": mask,
            "advantages": advantages_.to(torch.float32), "rollout_logps": lps, "num_tokens": torch.tensor(used)}


def gather_positions(h: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``h`` (N, L, H) at ``positions`` (N, C) int64 -> (N, C, H), differentiable in ``h``."""
    return h.gather(1, positions[..., None].expand(-1, -1, h.shape[-1]))


class GRPOTrainer(TorchTrainer):
    """A `dsfs.trainer.Trainer` for GRPO with torch models of the ``reference.Model`` API (module docstring).

    ``ref_model``: the frozen reference (``None`` when ``beta`` is 0); ``opts``: the run's GRPO options
    (`GRPO_DEFAULTS` keys); ``ops``: the module of the fused ``grpo`` op (`reference.grpo`, or
    ``kernels.triton.grpo`` on CUDA). Eager forward under bf16 autocast on CUDA; the optimizer, clipping and MoE bias
    update are `TorchTrainer`'s."""

    def __init__(self, model: nn.Module, ref_model: nn.Module | None, device: torch.device, tc: TrainConfig,
                 opts: dict, ops=None):
        super().__init__(model, device, tc.lr, tc.weight_decay, tc.grad_clip, 0.0, False, tc.optimizer,
                         deterministic=False)
        self.ops = ops or importlib.import_module("reference.grpo")
        self.ref_model = ref_model.to(device).eval().requires_grad_(False) if ref_model is not None else None
        self.opts = opts

    def _hidden(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        x = batch["input_ids"].to(self.device)
        with autocast(self.device):
            h = model.hidden_states(x)
        return gather_positions(h, batch["positions"].to(self.device))

    @torch.no_grad()
    def token_logps(self, batch: Batch, ref: bool = False) -> torch.Tensor:
        """Per-token log-probs (N, C) float32 CPU of the completion tokens at the run's temperature, by the policy
        (eval mode) or, with ``ref``, the reference model: the ``old_logps`` / ``ref_logps`` of the loss."""
        model = self.ref_model if ref else self.model
        was = model.training
        model.eval()
        try:
            h = self._hidden(model, batch)
            out = self.ops.token_logps(h, model.lm_head.weight, batch["completion_ids"].to(self.device),
                                       temperature=self.opts["temperature"])
        finally:
            model.train(was)
        return out.float().cpu()

    def micro_step(self, batch: Batch, accum: int) -> dict[str, float | None]:
        """Forward and backward of ``loss / accum`` (`grpo_loss`); returns the loss, the op's metrics and the
        generation's (the batch's ``"metrics"``)."""
        h = self._hidden(self.model, batch)
        loss, metrics = grpo_loss(self.ops, h, self.model.lm_head.weight, batch, self.opts, self.device)
        (loss * float(batch.get("loss_scale", 1.0)) / accum).backward()
        return {"loss": loss.item(), **metrics, **batch.get("metrics", {})}


def grpo_loss(ops, h, weight, batch: Batch, opts: dict, device=None):
    """The ``grpo`` op of ``ops`` on gathered hidden states ``h`` (N, C, H) and the head ``weight`` (V, H) with the
    batch's targets, mask, advantages and old / reference log-probs; returns ``(loss, metrics as floats)``."""
    def get(k):
        v = batch.get(k)
        return v.to(device) if v is not None and device is not None else v

    from reference.grpo import METRICS

    eps = opts["epsilon"]
    loss, *values = ops.grpo(h, weight, get("completion_ids"), get("completion_mask"), get("advantages"),
                             old_logps=get("old_logps"), ref_logps=get("ref_logps"), beta=opts["beta"],
                             epsilon_low=eps, epsilon_high=opts["epsilon_high"] if opts["epsilon_high"] is not None
                             else eps, temperature=opts["temperature"], loss_type=opts["loss_type"],
                             max_completion_length=opts["max_completion_length"])
    metrics = {k: float(v) for k, v in zip(METRICS, values, strict=True) if opts["beta"] > 0 or k != "kl"}
    return loss, metrics


class Generations:
    """Samples, scores and serves the generations of a GRPO run (module docstring); its state (the current
    generation's micro-batches, how many were served, how many completions were sampled: the next seeds) goes into
    every checkpoint, so a resumed run continues exactly, in the middle of ``num_iterations`` too.

    ``trainer``: the backend's GRPO trainer (``model``, ``token_logps``); ``prompts``: the rendered prompt ids of
    ``data.train``; ``rewards``: ``(names, functions, weights)``; ``order``: the run's `ExampleOrder` over prompts."""

    def __init__(self, trainer, data: PromptData, prompts: list[list[int]], tok, tc: TrainConfig, opts: dict,
                 rewards, order: ExampleOrder, seed: int, eos: int, pad: int, state: dict | None = None):
        self.trainer, self.data, self.prompts, self.tok, self.tc, self.opts = trainer, data, prompts, tok, tc, opts
        self.names, self.funcs, self.weights = rewards
        self.order, self.seed, self.eos, self.pad = order, seed, eos, pad
        self.drop = [t for t in (eos, pad, tok.token_to_id(chat.BOS)) if t is not None]
        self.buffer: list[Batch] = list(state["buffer"]) if state else []
        self.served = state["served"] if state else 0
        self.sampled = state["sampled"] if state else 0
        self.tokens = 0
        self.tools = None
        if opts["tools"]:
            from dsfs.tools import TOOLS

            self.tools = TOOLS

    def state(self) -> dict:
        """What a checkpoint stores: ``{"buffer", "served", "sampled"}``."""
        return {"buffer": self.buffer, "served": self.served, "sampled": self.sampled}

    def next_batch(self) -> Batch:
        """The next micro-batch: from the current generation while it has ``num_iterations`` passes left, else from a
        new one."""
        if self.served >= len(self.buffer) * self.opts["num_iterations"]:
            self.buffer, self.served = self.generate(), 0
        b = self.buffer[self.served % len(self.buffer)]
        self.served += 1
        self.tokens += int(b["num_tokens"])
        return b

    def tokens_done(self) -> int:
        n, self.tokens = self.tokens, 0
        return n

    def sample(self, idx: list[int]) -> tuple[list[Completion], torch.Tensor, dict[str, list[float]]]:
        """``num_generations`` completions of each prompt in ``idx``, their total rewards (N,) and each function's."""
        from dsfs.rewards import combine_rewards

        o, g = self.opts, self.opts["num_generations"]
        comps = rollout(self.trainer.model, [self.prompts[i] for i in idx], o["max_completion_length"],
                        temperature=o["temperature"], top_k=o["top_k"],
                        top_p=o["top_p"] if o["top_p"] < 1 else None, num_generations=g,
                        seeds=sequence_seeds(self.seed, len(idx) * g, start=self.sampled),
                        stop_token_ids=[self.eos], tokenizer=self.tok, tools=self.tools,
                        max_tool_calls=o["max_tool_calls"], pad_token_id=self.pad)
        self.sampled += len(comps)
        texts = [completion_text(self.tok, c.ids, self.drop) for c in comps]
        prompts = [chat.render_text(self.data.train[i][0], add_generation_prompt=True) for i in idx for _ in range(g)]
        keys = dict.fromkeys(k for i in idx for k in self.data.train[i][1])  # a row may lack a column: None
        columns = {k: [self.data.train[i][1].get(k) for i in idx for _ in range(g)] for k in keys}
        total, per = combine_rewards(self.funcs, self.weights, prompts, texts, columns, names=self.names)
        return comps, torch.as_tensor(total, dtype=torch.float32), per

    def generate(self) -> list[Batch]:
        """Sample one generation (with dynamic sampling, refill dropped groups up to ``max_resample`` times), score
        it, compute advantages, old and reference log-probs, and cut it into ``grad_accum`` micro-batches."""
        o, tc, g = self.opts, self.tc, self.opts["num_generations"]
        want = tc.batch_size * tc.grad_accum // g
        comps, rewards, per, kept, dropped = [], [], {n: [] for n in self.names}, [], 0
        for _ in range(1 + (o["max_resample"] if o["dynamic_sampling"] else 0)):
            c, r, p = self.sample(self.order.take(want - len(kept) // g if o["dynamic_sampling"] else want))
            start = len(comps)
            comps += c
            rewards.append(r)
            for n in self.names:
                per[n] += p[n]
            for j in range(0, len(c), g):
                grp = r[j:j + g]
                if o["dynamic_sampling"] and bool((grp == grp[0]).all()):
                    dropped += 1
                else:
                    kept += range(start + j, start + j + g)
            if not o["dynamic_sampling"] or len(kept) >= want * g:
                break
        rewards = torch.cat(rewards)
        if not kept:  # every group was uniform: train on the last round (advantage 0: the KL term only)
            kept = list(range(len(comps) - want * g, len(comps)))
        kept = kept[:want * g]
        adv = advantages(rewards[kept], g, o["scale_rewards"])
        sel = [comps[i] for i in kept]
        metrics = self.metrics(comps, rewards, per, dropped)
        batches = []
        groups = len(sel) // g
        n_micro = min(tc.grad_accum, groups)
        bounds = [g * (groups * k // n_micro) for k in range(n_micro + 1)]  # n_micro chunks of whole groups
        for s, e in zip(bounds[:-1], bounds[1:], strict=True):
            b = collate_rollouts(sel[s:e], adv[s:e], self.pad, tc.seq_len, o["mask_truncated_completions"])
            if o["num_iterations"] > 1:
                b["old_logps"] = self.trainer.token_logps(b)
            if o["beta"] > 0:
                b["ref_logps"] = self.trainer.token_logps(b, ref=True)
            b["metrics"] = metrics
            batches.append(b)
        while len(batches) < tc.grad_accum:  # fewer kept groups than micro-batches: serve them again
            batches.append(batches[len(batches) % n_micro])  # n_micro batches exist: see bounds
        if o["loss_type"] == "dapo":  # TRL's dapo: normalized by the completion tokens of the whole generation
            counts = [float(b["completion_mask"].sum()) for b in batches]
            total = max(sum(counts), 1.0)
            for b, c in zip(batches, counts, strict=True):
                b["loss_scale"] = torch.tensor(c * len(batches) / total if c else 1.0)
        return batches

    def metrics(self, comps: list[Completion], rewards: torch.Tensor, per: dict[str, list[float]],
                dropped: int) -> dict[str, float]:
        """TRL's generation metrics over every completion sampled for the step (module docstring)."""
        g = self.opts["num_generations"]
        lengths = torch.tensor([len(c.ids) for c in comps], dtype=torch.float32)
        groups = rewards.view(-1, g)
        m = {"reward": float(rewards.mean()), "reward_std": float(groups.std(dim=1).nan_to_num(0.0).mean()),
             "frac_reward_zero_std": float((groups == groups[:, :1]).all(dim=1).float().mean()),
             "completions/mean_length": float(lengths.mean()), "completions/min_length": float(lengths.min()),
             "completions/max_length": float(lengths.max()),
             "completions/clipped_ratio": sum(c.finish_reason == "length" for c in comps) / len(comps)}
        for n in self.names:
            v = torch.tensor(per[n], dtype=torch.float32)
            ok = v[torch.isfinite(v)]
            m[f"rewards/{n}/mean"] = float(ok.mean()) if ok.numel() else math.nan
            m[f"rewards/{n}/std"] = float(ok.std()) if ok.numel() > 1 else 0.0
        if self.tools is not None:
            m["tools/calls_mean"] = sum(c.tool_calls for c in comps) / len(comps)
        if self.opts["dynamic_sampling"]:
            m["dynamic_sampling/dropped_groups"] = float(dropped)
        return m


def make_grpo_trainer(be, model, ref_model, tc: TrainConfig, opts: dict):
    """The GRPO trainer of backend ``be``: `GRPOTrainer` with the reference's op, or the Triton op on
    ``runtime_cuda``, or ``runtime_mlx.posttrain.MLXGRPOTrainer`` (``model`` and ``ref_model``: reference models,
    converted) on the MLX runtime.

    Dropout is off (TRL's ``disable_dropout``) and the MoE routing biases are held (no auxiliary-loss-free update),
    so the sampler, the old and the current log-probs are one distribution and only the gradient moves the policy.
    The bias update is pretraining's load balancer (DeepSeek-V3 section 2.1.2, which turns it off for the last 500B
    tokens); in GRPO it would count the padding and prompt tokens of every batch and, at its fixed speed, moved the
    tiny preset's layer-1 biases by up to 0.1 in 100 steps while the largest weight moved by 0.001."""
    from dsfs.dpo import disable_dropout

    disable_dropout(model)
    if ref_model is not None:
        disable_dropout(ref_model)
    if be.name == "mlx":
        from runtime_mlx.posttrain import MLXGRPOTrainer
        from runtime_mlx.train import from_reference

        trainer = MLXGRPOTrainer(from_reference(model), from_reference(ref_model) if ref_model is not None else None,
                                 tc.lr, tc.weight_decay, tc.grad_clip, tc.optimizer, opts)
    else:
        ops = importlib.import_module("kernels.triton.grpo" if be.name == "cuda" else "reference.grpo")
        trainer = GRPOTrainer(model, ref_model, be.device, tc, opts, ops)
    trainer.update_bias = False
    return trainer


def check_grpo_options(o: dict, tc: TrainConfig) -> None:
    """Raise `ConfigError` naming the option for a GRPO option of the wrong type (a TOML file can give any) or out of
    range (TRL's constraints), and for ``style`` ``tool`` without ``tools`` (the policy would write the calculator's
    answers itself, and be trained on them)."""
    def bad(k: str, what: str) -> ConfigError:
        return ConfigError(f"--{k.replace('_', '-')} {o[k]!r}: expected {what}")

    for k in ("num_generations", "max_completion_length", "num_iterations", "max_resample", "max_tool_calls",
              "top_k"):
        if not (isinstance(o[k], int) and not isinstance(o[k], bool) or (k == "top_k" and o[k] is None)):
            raise bad(k, "an integer")
    for k in ("temperature", "top_p", "beta", "epsilon", "epsilon_high"):
        if not (isinstance(o[k], int | float) and not isinstance(o[k], bool) or (k == "epsilon_high" and o[k] is None)):
            raise bad(k, "a number")
    for k in ("mask_truncated_completions", "dynamic_sampling", "tools"):
        if not isinstance(o[k], bool):
            raise bad(k, "true or false")
    if not isinstance(o["reward_funcs"], list | tuple) or (o["reward_weights"] is not None
                                                           and not isinstance(o["reward_weights"], list | tuple)):
        raise ConfigError("reward_funcs and reward_weights: expected lists (--reward-funcs A,B --reward-weights 1,0.5)")
    if o["style"] == "tool" and not o["tools"]:
        raise ConfigError("--style tool needs --tools: without the calculator the policy would write its responses "
                          "itself and be trained on them")
    g = o["num_generations"]
    if not isinstance(g, int) or g < 2:
        raise ConfigError(f"--num-generations {g}: expected an integer >= 2 (advantages compare samples of a prompt)")
    if tc.batch_size % g:
        raise ConfigError(f"--batch-size {tc.batch_size} counts completions: expected a multiple of "
                          f"--num-generations {g}")
    if o["max_completion_length"] < 1:
        raise ConfigError(f"--max-completion-length {o['max_completion_length']}: expected an integer >= 1")
    for k, lo in (("temperature", 0.0), ("beta", 0.0), ("epsilon", 0.0)):
        v = o[k]
        if not (math.isfinite(v) and v >= lo) or (k == "temperature" and v == 0):
            op = ">" if k == "temperature" else ">="
            raise ConfigError(f"--{k} {v}: expected a finite number {op} {lo:g}")
    if o["epsilon_high"] is not None and not (math.isfinite(o["epsilon_high"]) and o["epsilon_high"] >= 0):
        raise ConfigError(f"--epsilon-high {o['epsilon_high']}: expected a finite number >= 0")
    if not 0 < o["top_p"] <= 1:
        raise ConfigError(f"--top-p {o['top_p']}: expected a number in (0, 1]")
    if o["top_k"] is not None and o["top_k"] < 1:
        raise ConfigError(f"--top-k {o['top_k']}: expected an integer >= 1")
    if o["loss_type"] not in LOSS_TYPES:
        raise ConfigError(f"--loss-type {o['loss_type']}: expected one of {', '.join(LOSS_TYPES)}")
    if o["scale_rewards"] not in SCALE_REWARDS:
        raise ConfigError(f"--scale-rewards {o['scale_rewards']}: expected one of {', '.join(SCALE_REWARDS)}")
    for k in ("num_iterations", "max_resample", "max_tool_calls"):
        if o[k] < (1 if k == "num_iterations" else 0):
            raise ConfigError(f"--{k.replace('_', '-')} {o[k]}: expected an integer >= "
                              f"{1 if k == 'num_iterations' else 0}")
    w = o["reward_weights"]
    if w is not None and (len(w) != len(o["reward_funcs"]) or not all(math.isfinite(x) for x in w)):
        raise ConfigError(f"--reward-weights {','.join(map(str, w))}: expected {len(o['reward_funcs'])} finite "
                          f"numbers, one per reward function ({', '.join(o['reward_funcs'])})")


def grpo(dataset: str | None = None, out_dir: str | os.PathLike | None = None, *, init_from=None, resume=False,
         backend: str = "auto", seed: int | None = None, num_examples: int | None = None,
         eval_examples: int | None = None, splits: list[str] | None = None, eval_dataset: str | None = None,
         tokenizer: str | None = None, keep_last: int | None = None, save_every: int | None = None,
         overwrite: bool = False, verbose: bool = True, on_step=None, grpo_options: dict | None = None,
         **overrides) -> dict:
    """Train the model of ``init_from`` with GRPO on ``dataset``'s prompts (`load_prompts`); return the run summary
    (as `dsfs.sft.sft`'s, plus the last evaluation's ``val_accuracy*`` and ``val_format``).

    ``grpo_options``: TRL's ``GRPOConfig`` names (`GRPO_DEFAULTS` gives every key and default; ``style``: the
    arithmetic format, ``r1`` or ``tool``; ``tools``: give the policy the calculator; ``reward_funcs``: names of
    `dsfs.rewards.REWARDS` or ``module:function`` specs). ``overrides``: `TrainConfig` fields over `GRPO_CONFIG`
    (``batch_size`` counts completions). Raises `dsfs.errors.UserError` subclasses on bad input."""
    from dsfs.rewards import resolve_rewards

    say = say_fn(verbose)
    given = dict(grpo_options or {})
    unknown = sorted(set(given) - set(GRPO_DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown GRPO option {unknown[0]!r} (known: {', '.join(GRPO_DEFAULTS)})")
    if eval_dataset is not None:
        raise ConfigError("dsfs grpo holds out its own prompts (a task's held-out problems); --eval-dataset is not "
                          "used")
    options = {"dataset": dataset_option(dataset, TASKS, splits, None, "prompts"), "num_examples": num_examples,
               "splits": splits, **{k: given.get(k) for k in GRPO_DEFAULTS}}
    if eval_examples is not None:
        options["eval_examples"] = eval_examples
    start = start_stage("grpo", out_dir=out_dir, resume=resume, init_from=init_from, overwrite=overwrite, seed=seed,
                        keep_last=keep_last, save_every=save_every, default_tc=GRPO_CONFIG, overrides=overrides,
                        options=options)
    o, tc = fill_options(start, {**GRPO_DEFAULTS, "eval_examples": 200}), start.tc
    if o["dataset"] is None:
        raise ConfigError("dsfs grpo needs --dataset (arithmetic, gsm8k, or a .jsonl file of prompts)")
    check_grpo_options(o, tc)
    rewards = resolve_rewards(o["reward_funcs"], o["reward_weights"])
    be = resolve_backend(backend)
    if start.ckpt is not None and o["beta"] > 0 and model_dir_problem(start.init_dir) is not None:
        raise CheckpointError(f"the run's reference model, its --init-from {start.init_dir}, is gone "
                              f"({model_dir_problem(start.init_dir)}); --beta > 0 needs it to continue")
    model = load_model(be, start.model_dir)
    cfg = model.config
    tok_file, tok = stage_tokenizer(start.model_dir, cfg, tokenizer)
    tc.check_model(cfg.max_position_embeddings)
    eos = tok.token_to_id(EOS)
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else eos
    data = load_prompts(o["dataset"], tok, tc.seq_len, seed=start.seed, num_examples=o["num_examples"],
                        eval_examples=o["eval_examples"], splits=o["splits"], style=o["style"])
    prompts = [chat.render(m, tok, add_generation_prompt=True)[0] for m, _ in data.train]
    longest = max(len(p) for p in prompts)
    if longest + o["max_completion_length"] > tc.seq_len:
        raise ConfigError(f"the longest prompt ({longest} tokens) plus --max-completion-length "
                          f"{o['max_completion_length']} passes --seq-len {tc.seq_len}; raise --seq-len or lower "
                          "--max-completion-length")
    if o["tools"]:
        require_special_tokens(tok, TOOL_TOKENS, "--tools (tool calls)", tok_file)
    say(f"data: {data.source}; {plural(len(data.train), 'prompt')}, {o['num_generations']} completions each; "
        f"rewards {', '.join(f'{n} x{w:g}' for n, w in zip(rewards[0], rewards[2], strict=True))}; "
        f"loss_type {o['loss_type']}, beta {o['beta']}, epsilon {o['epsilon']}"
        + (f"/{o['epsilon_high']}" if o["epsilon_high"] is not None else "")
        + (", calculator tool" if o["tools"] else ""))
    torch.manual_seed(start.seed)
    ref_model = load_model(be, start.init_dir, train=False) if o["beta"] > 0 else None
    trainer = make_grpo_trainer(be, model, ref_model, tc, o)
    order = ExampleOrder(len(prompts), start.seed, start.state["order"] if start.state else 0)
    gens = Generations(trainer, data, prompts, tok, tc, o, rewards, order, start.seed, eos, pad,
                       start.state.get("generation") if start.state else None)
    evals = [collate(data.eval_sft[s:s + tc.batch_size], pad, tc.seq_len)
             for s in range(0, min(tc.eval_batches * tc.batch_size, len(data.eval_sft)), tc.batch_size)]

    def extra() -> dict:
        if not data.checks:
            return {}
        from dsfs.rewards import format_reward

        return accuracy(trainer.model, tok, data.checks, eos, o["max_completion_length"], tools=gens.tools,
                        format_reward=format_reward, max_tool_calls=o["max_tool_calls"])

    keys = ["reward", "val_accuracy", "val_format"] + [f"rewards/{n}/mean" for n in rewards[0]]
    summary = run_stage(start, trainer, next_batch=gens.next_batch, eval_batches=evals,
                        tokens_per_step=gens.tokens_done, order=order, tokenizer_file=tok_file, overwrite=overwrite,
                        say=say, verbose=verbose, extra_eval=extra, plot_keys=keys, on_step=on_step,
                        extra_state=lambda: {"generation": gens.state()})
    from dsfs.sft import last_eval

    last = last_eval(start.out)
    return {**summary, "backend": be.name, "seq_len": tc.seq_len,
            **{k: v for k, v in last.items() if k.startswith(("val_accuracy", "val_format"))}}


def add_grpo(sub) -> None:
    """Register ``dsfs grpo`` (`grpo`)."""
    from dsfs.stage import add_stage_options

    d = GRPO_DEFAULTS
    p = sub.add_parser("grpo", help="GRPO with verifiable rewards (DeepSeek-R1's reinforcement learning)",
                       description="Train a checkpoint (usually a dsfs sft cold start) with GRPO: sample "
                       "--num-generations completions per prompt, score them with rule-based rewards (accuracy, "
                       "format, tag_count, or your own module:function), and push the policy toward the better ones "
                       "of each group. Options and logged metrics carry TRL's GRPOConfig names.")
    p.add_argument("--dataset", metavar="NAME|PATH", help="arithmetic, gsm8k, or a .jsonl file of {\"prompt\", ...} "
                   "rows (the other fields go to the reward functions)")
    p.add_argument("--splits", metavar="A,B", help="arithmetic splits (default: the task's training mixture)")
    p.add_argument("--num-examples", type=int, metavar="N", help="training prompts (arithmetic default: 20000)")
    p.add_argument("--eval-examples", type=int, metavar="N", help="held-out problems per split (default: 200)")
    p.add_argument("--style", choices=["r1", "tool"], help="the task's answer format: <think>...</think><answer>..."
                   "</answer> (r1), the same with calculator calls (tool) (default: r1)")
    p.add_argument("--tools", action="store_true", default=None, help="give the policy the calculator tool: a "
                   "<tool_call> pauses its rollout, runs the tool and appends the <tool_response>")
    p.add_argument("--max-tool-calls", type=int, metavar="N", help=f"tool calls per completion (default: "
                   f"{d['max_tool_calls']})")
    p.add_argument("--num-generations", type=int, metavar="G", help=f"completions per prompt (default: "
                   f"{d['num_generations']})")
    p.add_argument("--max-completion-length", type=int, metavar="N", help=f"tokens per completion (default: "
                   f"{d['max_completion_length']})")
    p.add_argument("--temperature", type=float, metavar="T", help=f"sampling temperature (default: "
                   f"{d['temperature']})")
    p.add_argument("--top-p", type=float, metavar="P", help="nucleus sampling (default: 1.0, off)")
    p.add_argument("--top-k", type=int, metavar="K", help="top-k sampling (default: off)")
    p.add_argument("--beta", type=float, metavar="B", help=f"KL coefficient (k3 estimator; default: {d['beta']}: no "
                   "reference model)")
    p.add_argument("--epsilon", type=float, metavar="E", help=f"clip range (default: {d['epsilon']})")
    p.add_argument("--epsilon-high", type=float, metavar="E", help="upper clip range (DAPO's clip-higher; default: "
                   "--epsilon)")
    p.add_argument("--loss-type", choices=list(LOSS_TYPES), help=f"default: {d['loss_type']}")
    p.add_argument("--scale-rewards", choices=list(SCALE_REWARDS), help=f"default: {d['scale_rewards']}")
    p.add_argument("--num-iterations", type=int, metavar="N", help="optimizer steps per generation (default: 1)")
    p.add_argument("--reward-funcs", metavar="A,B", help="reward functions: accuracy, format, tag_count or "
                   "module:function (default: accuracy,format)")
    p.add_argument("--reward-weights", metavar="W1,W2", help="one weight per reward function (default: all 1)")
    p.add_argument("--mask-truncated-completions", action="store_true", default=None,
                   help="leave completions that hit --max-completion-length out of the loss")
    p.add_argument("--dynamic-sampling", action="store_true", default=None, help="DAPO: drop groups whose rewards are "
                   "all equal and sample more prompts")
    p.add_argument("--max-resample", type=int, metavar="N", help=f"extra sampling rounds of --dynamic-sampling "
                   f"(default: {d['max_resample']})")
    add_stage_options(p, "grpo", GRPO_CONFIG)
    p.set_defaults(func=_run_grpo)


def _run_grpo(args) -> int:
    from dsfs.stage import print_summary, stage_kwargs

    opts = {k: getattr(args, k) for k in GRPO_DEFAULTS if hasattr(args, k) and getattr(args, k) is not None}
    if args.reward_funcs is not None:
        opts["reward_funcs"] = [s.strip() for s in args.reward_funcs.split(",")]
    if args.reward_weights is not None:
        try:
            opts["reward_weights"] = [float(s) for s in args.reward_weights.split(",")]
        except ValueError:
            raise ConfigError(f"--reward-weights {args.reward_weights}: expected comma-separated numbers") from None
    s = grpo(init_from=args.init_from, grpo_options=opts, **stage_kwargs(args))
    print_summary(s, [", ".join(f"{k} {v:.3f}" for k, v in s.items() if k.startswith(("val_accuracy", "val_format")))])
    return 0
