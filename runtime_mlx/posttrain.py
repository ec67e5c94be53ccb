"""The MLX backend of ``dsfs dpo``, ``dsfs distill`` and ``dsfs grpo`` (``--backend mlx``): `MLXDPOTrainer`,
`MLXDistillTrainer` and `MLXGRPOTrainer`, the MLX twins of `dsfs.dpo.DPOTrainer`, `dsfs.distill.DistillTrainer` and
`dsfs.grpo.GRPOTrainer`: the same batches (dicts of torch
tensors), the same metrics, the same extra methods, driven by the one training loop through the
`dsfs.trainer.Trainer` protocol.

The losses are the fused, chunked MLX ops on the final hidden states and the LM head (`head_weight`: the
embedding matrix when ``tie_word_embeddings``): `runtime_mlx.kernels.preference` for the policy, against the
reference model's `runtime_mlx.kernels.sequence_logps`, and `runtime_mlx.kernels.distill` for a student against a
teacher. The frozen model (reference, teacher) runs in eval mode outside the differentiated function, its outputs
under ``mx.stop_gradient``. No MTP loss: the MTP modules of the trained model are frozen (no optimizer state, never
updated, as torch's optimizers skip parameters without a gradient). The MoE correction biases are updated after
each optimizer step from the trained model's expert loads, which come out of its differentiated forward
(``hidden_states(..., stats=...)``), as in `runtime_mlx.train.MLXTrainer`. Optimizer, accumulation, clipping and
the optimizer state in the reference layout (so a run continues on another backend): `MLXTrainerBase`.

Compilation: the update (clipping and the optimizer; every shape static) is one ``mx.compile``d function; the
micro-step runs eagerly. DPO batches are padded to the longest pair rounded up to 16 and on-policy distillation
batches have other lengths again, so a compiled step would trace and compile once per width; and the policy and
the reference must take the same code path, so that at initialization their log-probabilities agree bit for bit
and the first DPO loss is ln 2 exactly (a compiled policy forward fuses elementwise ops the eager reference forward
does not, rounding differently).

Randomness comes from torch's global generator, which the training loop checkpoints, so a resumed run continues
exactly: the on-policy coin (``torch.rand``, as the torch trainer), the MLX key of the student's samples and of its
dropout masks (``torch.randint``). Dropout is off in DPO (TRL's ``disable_dropout``), on as configured for a
distillation student.

No ``dsfs`` import: what the loop knows (hyperparameters, batches as dicts of torch tensors) is passed in.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import torch
from mlx.utils import tree_map

from . import kernels
from .kernels.grpo import METRICS as GRPO_METRICS
from .model import IGNORE_INDEX, Model
from .moe import DeepSeekMoE
from .train import MLXTrainerBase, _to_mx, eval_cross_entropy


def head_weight(model: Model) -> mx.array:
    """The LM head matrix (vocab, hidden) of ``model``: ``lm_head.weight``, or the embedding matrix when
    ``tie_word_embeddings`` (the MLX model then has no ``lm_head``)."""
    return model.model.embed_tokens.weight if model.config.tie_word_embeddings else model.lm_head.weight


def disable_dropout(model: Model) -> Model:
    """Set every dropout probability of ``model`` to 0 (TRL's ``disable_dropout``, as `dsfs.dpo.disable_dropout`
    for torch models: ``config.hidden_dropout`` is left as the checkpoint has it); returns ``model``."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m._p_1 = 1.0
    return model


def has_dropout(model: Model) -> bool:
    """Whether a forward of ``model`` in training mode draws dropout masks."""
    return any(isinstance(m, nn.Dropout) and m._p_1 < 1.0 for m in model.modules())


def _torch_seed() -> int:
    """A seed drawn from torch's global generator (checkpointed by the training loop)."""
    return int(torch.randint(0, 2**31 - 1, ()))


def _floats(t: torch.Tensor) -> mx.array:
    return mx.array(t.detach().cpu().float().numpy())


class _PostTrainer(MLXTrainerBase):
    """`MLXTrainerBase` for a model trained without its MTP modules: they are frozen before the optimizer is built,
    and their MoE layers count zero loads (their correction biases stay: ``sign(mean - load)`` is 0, as the
    reference's update of a layer that saw no token)."""

    def __init__(self, model: Model, lr: float, weight_decay: float, grad_clip: float, optimizer: str):
        for layer in model.mtp:
            layer.freeze()
        self._mtp_loads = [mx.zeros((layer.mlp.n_routed,), dtype=mx.float32) for layer in model.mtp
                           if isinstance(layer.mlp, DeepSeekMoE)]
        super().__init__(model, lr, weight_decay, grad_clip, optimizer, compile=True,
                         label=", mx.compile update, eager step")

    def _accumulate(self, grads, loads: list[mx.array], accum: int, outs=()) -> None:
        """`MLXTrainerBase._accumulate` with the MTP layers' zero loads after the main layers'."""
        super()._accumulate(grads, [*loads, *self._mtp_loads], accum, outs)


class MLXDPOTrainer(_PostTrainer):
    """A `dsfs.trainer.Trainer` for DPO with `runtime_mlx.Model` s, the MLX twin of `dsfs.dpo.DPOTrainer`.

    ``model``: the policy (dropout disabled, train mode); ``ref_model``: the frozen reference (dropout disabled, eval
    mode, no gradients), or ``None`` when every batch carries ``ref_chosen_logps`` / ``ref_rejected_logps``.
    ``lr``, ``weight_decay``, ``grad_clip``, ``optimizer`` (``"adamw"`` or ``"muon"``): `MLXTrainerBase`'s.
    ``beta``, ``loss_type`` (``"sigmoid"``, ``"hinge"``, ``"ipo"``), ``label_smoothing``: TRL's, passed to
    `runtime_mlx.kernels.preference`. Attributes: `MLXTrainerBase`'s, plus ``ref`` (the reference model).
    """

    def __init__(self, model: Model, ref_model: Model | None, lr: float, weight_decay: float, grad_clip: float,
                 optimizer: str, beta: float, loss_type: str, label_smoothing: float, rpo_alpha: float | None = None):
        super().__init__(disable_dropout(model), lr, weight_decay, grad_clip, optimizer)
        self.ref = None if ref_model is None else disable_dropout(ref_model)
        if self.ref is not None:
            self.ref.eval()
        self.beta, self.loss_type, self.label_smoothing, self.rpo_alpha = beta, loss_type, label_smoothing, rpo_alpha

        def loss_fn(x, y, ref_c, ref_r):
            stats = {"loads": [], "aux": []}
            h = model.hidden_states(x, stats=stats, check_values=False)
            loss, c, r = kernels.preference(h, head_weight(model), y, ref_c, ref_r, beta=beta, loss_type=loss_type,
                                            label_smoothing=label_smoothing)
            if rpo_alpha:  # RPO: the chosen completions' mean token NLL, as dsfs.dpo.DPOTrainer
                n = (y[: c.shape[0]] != -100).sum(-1).astype(mx.float32)
                nll = -(c * n if loss_type == "ipo" else c).sum() / mx.maximum(n.sum(), 1.0)
                loss = loss + rpo_alpha * nll
            return loss, c, r, *stats["loads"]

        self._micro = nn.value_and_grad(model, loss_fn)

    def ref_logps(self, batch: dict[str, torch.Tensor]) -> tuple[mx.array, mx.array]:
        """The reference model's (chosen, rejected) log-probabilities (B,) float32 of a batch of
        `dsfs.dpo.collate_pairs` (its precomputed ``ref_chosen_logps`` / ``ref_rejected_logps`` when it has them),
        evaluated: summed over the completion tokens, averaged for ``ipo``. Raises ``ValueError`` when the batch has
        none and the trainer has no reference model."""
        if "ref_chosen_logps" in batch:
            return _floats(batch["ref_chosen_logps"]), _floats(batch["ref_rejected_logps"])
        if self.ref is None:
            raise ValueError("batch has no ref_chosen_logps and the trainer no reference model")
        lp = kernels.sequence_logps(self.ref.hidden_states(_to_mx(batch["input_ids"])), head_weight(self.ref),
                                    _to_mx(batch["targets"]), average=self.loss_type == "ipo")
        lp = mx.stop_gradient(lp)
        mx.eval(lp)
        b = lp.shape[0] // 2
        return lp[:b], lp[b:]

    def _loss(self, batch: dict[str, torch.Tensor]):
        """``(loss, chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)`` of a batch, no gradients."""
        ref_c, ref_r = self.ref_logps(batch)
        h = self.model.hidden_states(_to_mx(batch["input_ids"]))
        loss, c, r = kernels.preference(h, head_weight(self.model), _to_mx(batch["targets"]), ref_c, ref_r,
                                        beta=self.beta, loss_type=self.loss_type,
                                        label_smoothing=self.label_smoothing)
        return loss, c, r, ref_c, ref_r

    def _metrics(self, loss, c, r, ref_c, ref_r, prefix: str = "") -> dict[str, float]:
        rc, rr = self.beta * (c - ref_c), self.beta * (r - ref_r)
        names = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                 "logps/rejected")
        values = [rc.mean(), rr.mean(), (rc > rr).astype(mx.float32).mean(), (rc - rr).mean(), c.mean(), r.mean()]
        mx.eval(values)
        return {f"{prefix}{n}": v.item() for n, v in zip(names, values, strict=True)}

    def micro_step(self, batch: dict[str, torch.Tensor], accum: int) -> dict[str, float | None]:
        """Loss and gradients for a batch of `dsfs.dpo.collate_pairs` (``input_ids`` and ``targets`` (2B, T) int64,
        chosen rows first; optional precomputed ``ref_chosen_logps`` / ``ref_rejected_logps`` (B,)); ``1 / accum``
        of the gradients (and all of the policy's expert loads) are kept for `optimizer_step`. Returns ``loss`` and
        TRL's ``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``, ``rewards/margins``,
        ``logps/chosen``, ``logps/rejected`` (floats)."""
        ref_c, ref_r = self.ref_logps(batch)
        (loss, c, r, *loads), g = self._micro(_to_mx(batch["input_ids"]), _to_mx(batch["targets"]), ref_c, ref_r)
        self._accumulate(g, loads, accum, (loss, c, r))
        return {"loss": loss.item(), **self._metrics(loss, c, r, ref_c, ref_r)}

    def eval_loss(self, batch: dict[str, torch.Tensor]) -> float:
        """The DPO loss of a held-out batch (the models in eval mode)."""
        return self._loss(batch)[0].item()

    def eval_metrics(self, batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        """TRL's reward metrics averaged over held-out ``batches``, named ``val_rewards/...`` (the policy in eval mode
        meanwhile, its mode restored)."""
        was = self.model.training
        self.model.eval()
        try:
            ms = [self._metrics(*self._loss(b), prefix="val_") for b in batches]
        finally:
            self.model.train(was)
        return {k: sum(m[k] for m in ms) / len(ms) for k in ms[0] if "rewards" in k}


class MLXDistillTrainer(_PostTrainer):
    """A `dsfs.trainer.Trainer` that distills ``teacher`` into ``model`` (`runtime_mlx.Model` s), the MLX twin of
    `dsfs.distill.DistillTrainer`.

    ``model``: the student (train mode, dropout as configured); ``teacher``: frozen (eval mode, no gradients; its
    config may differ, its vocabulary may not). ``lr``, ``weight_decay``, ``grad_clip``, ``optimizer``:
    `MLXTrainerBase`'s. ``beta``, ``temperature``, ``lmbda`` (TRL's GKD names), ``weight_hard_loss`` (Liger's; the
    soft loss gets ``1 - weight_hard_loss``), passed to `runtime_mlx.kernels.distill`; ``max_new_tokens``: the
    length of on-policy samples; ``eos_id``: kept for the torch trainer's signature (samples run to
    ``max_new_tokens``, as the torch trainer's). Attributes: `MLXTrainerBase`'s, plus ``teacher``.
    """

    def __init__(self, model: Model, teacher: Model, lr: float, weight_decay: float, grad_clip: float, optimizer: str,
                 beta: float, temperature: float, weight_hard_loss: float, lmbda: float, max_new_tokens: int,
                 eos_id: int):
        super().__init__(model, lr, weight_decay, grad_clip, optimizer)
        self.teacher = teacher
        teacher.eval()
        self.beta, self.temperature, self.weight_hard_loss = beta, temperature, weight_hard_loss
        self.lmbda, self.max_new_tokens, self.eos_id = lmbda, max_new_tokens, eos_id
        self._reseed = has_dropout(model)  # dropout masks: a fresh MLX key per micro-step

        def loss_fn(x, y, ht, hard_weight):
            stats = {"loads": [], "aux": []}
            hs = model.hidden_states(x, stats=stats, check_values=False)
            loss, soft, hard = self._distill(hs, head_weight(model), ht, y, hard_weight)
            return loss, soft, hard, *stats["loads"]

        self._micro = nn.value_and_grad(model, loss_fn)

    def _distill(self, hs, ws, ht, y, hard_weight: float):
        wt = head_weight(self.teacher)
        return kernels.distill(hs.reshape(-1, hs.shape[-1]), ws, mx.stop_gradient(ht.reshape(-1, ht.shape[-1])),
                               mx.stop_gradient(wt), y.reshape(-1), beta=self.beta, temperature=self.temperature,
                               weight_hard_loss=hard_weight, weight_soft_loss=1.0 - hard_weight,
                               ignore_index=IGNORE_INDEX)

    def on_policy(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The student's samples for the batch's prompts: ``batch["prompt_len"]`` leading tokens of each row are kept
        (pretraining windows: the first half), ``max_new_tokens`` more are sampled (temperature 1, the student in
        eval mode, the MLX key drawn from torch's generator) and become the targets (-100 on the prompt). Returns
        ``{"input_ids", "targets"}`` int64 torch tensors, as `dsfs.distill.DistillTrainer.on_policy`."""
        x = batch["input_ids"]
        keep = int(batch.get("prompt_len", torch.tensor(x.shape[1] // 2)))
        key = mx.random.key(_torch_seed())
        was = self.model.training
        self.model.eval()
        try:
            seq = self.model.generate(_to_mx(x[:, :keep]), self.max_new_tokens, temperature=1.0, generator=key)
        finally:
            self.model.train(was)
        seq = torch.from_numpy(np.array(seq).astype(np.int64))
        y = torch.full_like(seq, IGNORE_INDEX)
        y[:, keep - 1:-1] = seq[:, keep:]
        return {"input_ids": seq[:, :-1], "targets": y[:, :-1]}

    def micro_step(self, batch: dict[str, torch.Tensor], accum: int) -> dict[str, float | None]:
        """Loss and gradients for ``batch["input_ids"]`` (B, T) int64 with ``batch["targets"]`` (-100 ignored), or,
        with probability ``lmbda`` (``float(torch.rand(())) < lmbda``, as the torch trainer), for the student's own
        samples (`on_policy`; divergence only); ``1 / accum`` of the gradients (and all of the student's expert
        loads) are kept for `optimizer_step`. Returns ``loss``, ``soft_loss`` (the divergence), ``hard_loss`` (the
        student's cross-entropy on the labels; ``None`` on an on-policy batch) and ``on_policy`` (0 or 1)."""
        on = self.lmbda > 0 and float(torch.rand(())) < self.lmbda
        if on:
            batch = self.on_policy(batch)
        if self._reseed:
            mx.random.seed(_torch_seed())
        x, y = _to_mx(batch["input_ids"]), _to_mx(batch["targets"])
        ht = mx.stop_gradient(self.teacher.hidden_states(x))
        (loss, soft, hard, *loads), g = self._micro(x, y, ht, 0.0 if on else self.weight_hard_loss)
        self._accumulate(g, loads, accum, (loss, soft, hard))
        return {"loss": loss.item(), "soft_loss": soft.item(), "hard_loss": None if on else hard.item(),
                "on_policy": float(on)}

    def eval_loss(self, batch: dict[str, torch.Tensor]) -> float:
        """The student's mean next-token cross-entropy over the non-ignored targets of a held-out batch
        (`runtime_mlx.train.eval_cross_entropy`, comparable with ``dsfs train``'s ``val_loss``)."""
        return eval_cross_entropy(self.model, batch).item()


def _gather(h: mx.array, positions: mx.array) -> mx.array:
    """``h`` (N, L, H) at ``positions`` (N, C) -> (N, C, H) (`dsfs.grpo.gather_positions`)."""
    idx = mx.broadcast_to(positions[..., None], (*positions.shape, h.shape[-1]))
    return mx.take_along_axis(h, idx, axis=1)


class MLXGRPOTrainer(_PostTrainer):
    """A `dsfs.trainer.Trainer` for GRPO with `runtime_mlx.Model` s, the MLX twin of `dsfs.grpo.GRPOTrainer`: the same
    batches (`dsfs.grpo.collate_rollouts`), metrics and ``token_logps``; the loss is `runtime_mlx.kernels.grpo` on the
    policy's hidden states at the completion positions.

    ``model``: the policy (dropout disabled, train mode; `dsfs.rollout.rollout` samples it in eval mode);
    ``ref_model``: the frozen reference (eval mode) or ``None`` when ``opts["beta"]`` is 0. ``lr``, ``weight_decay``,
    ``grad_clip``, ``optimizer``: `MLXTrainerBase`'s; ``opts``: the run's GRPO options (`dsfs.grpo.GRPO_DEFAULTS`
    keys)."""

    def __init__(self, model: Model, ref_model: Model | None, lr: float, weight_decay: float, grad_clip: float,
                 optimizer: str, opts: dict):
        super().__init__(disable_dropout(model), lr, weight_decay, grad_clip, optimizer)
        self.ref = None if ref_model is None else disable_dropout(ref_model)
        if self.ref is not None:
            self.ref.eval()
        self.opts = opts
        eps = opts["epsilon"]
        self._kw = dict(beta=opts["beta"], epsilon_low=eps,
                        epsilon_high=opts["epsilon_high"] if opts["epsilon_high"] is not None else eps,
                        temperature=opts["temperature"], loss_type=opts["loss_type"],
                        max_completion_length=opts["max_completion_length"])

        def loss_fn(x, pos, y, mask, adv, given):
            stats = {"loads": [], "aux": []}
            h = model.hidden_states(x, stats=stats, check_values=False)
            out = kernels.grpo(_gather(h, pos), head_weight(model), y, mask, adv, old_logps=given.get("old_logps"),
                               ref_logps=given.get("ref_logps"), **self._kw)
            return (*out, *stats["loads"])

        self._micro = nn.value_and_grad(model, loss_fn)

    def token_logps(self, batch: dict[str, torch.Tensor], ref: bool = False) -> torch.Tensor:
        """Per-token log-probs (N, C) float32 (a torch CPU tensor) of the completion tokens at the run's temperature,
        by the policy (eval mode) or, with ``ref``, the reference model, as `dsfs.grpo.GRPOTrainer.token_logps`."""
        model = self.ref if ref else self.model
        was = model.training
        model.eval()
        try:
            h = model.hidden_states(_to_mx(batch["input_ids"]))
            lp = kernels.token_logps(_gather(h, _to_mx(batch["positions"])), head_weight(model),
                                     _to_mx(batch["completion_ids"]), temperature=self.opts["temperature"])
            lp = mx.stop_gradient(lp).astype(mx.float32)
            mx.eval(lp)
        finally:
            model.train(was)
        return torch.from_numpy(np.array(lp))

    def micro_step(self, batch: dict[str, torch.Tensor], accum: int) -> dict[str, float | None]:
        """Loss and gradients for a batch of `dsfs.grpo.collate_rollouts` (with ``old_logps`` / ``ref_logps`` when the
        run has them); ``1 / accum`` of the gradients (and all of the policy's expert loads) are kept for
        `optimizer_step`. Returns ``loss``, the op's metrics (``kl`` only with beta > 0) and the generation's."""
        given = {k: _floats(batch[k]) for k in ("old_logps", "ref_logps") if k in batch}
        (loss, *rest), g = self._micro(_to_mx(batch["input_ids"]), _to_mx(batch["positions"]),
                                       _to_mx(batch["completion_ids"]), _floats(batch["completion_mask"]),
                                       _floats(batch["advantages"]), given)
        values, loads = rest[:len(GRPO_METRICS)], rest[len(GRPO_METRICS):]
        scale = float(batch.get("loss_scale", 1.0))  # dapo's share of the generation's tokens (dsfs.grpo)
        if scale != 1.0:
            g = tree_map(lambda x: x * scale, g)
        self._accumulate(g, loads, accum, (loss, *values))
        m = {k: v.item() for k, v in zip(GRPO_METRICS, values, strict=True) if self.opts["beta"] > 0 or k != "kl"}
        return {"loss": loss.item(), **m, **batch.get("metrics", {})}

    def eval_loss(self, batch: dict[str, torch.Tensor]) -> float:
        """The policy's cross-entropy on held-out reference completions (`runtime_mlx.train.eval_cross_entropy`), as
        `dsfs.grpo.GRPOTrainer`'s."""
        return eval_cross_entropy(self.model, batch).item()


__all__ = ["MLXDPOTrainer", "MLXDistillTrainer", "MLXGRPOTrainer", "disable_dropout", "has_dropout", "head_weight"]
