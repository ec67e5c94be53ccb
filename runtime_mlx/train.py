"""The MLX backend of ``dsfs train --backend mlx``: `MLXTrainer`, the per-step work that the one training loop
(`dsfs.loop.TrainingRun`: schedule, batches, accumulation sums, evaluation cadence, metrics, checkpoints, resume)
drives through the `dsfs.trainer.Trainer` protocol; `MLXTrainerBase`, what it shares with the post-training
trainers of `runtime_mlx.posttrain` (optimizer, accumulation, update, MoE bias update, optimizer state).

The reference's optimizer, group by group (`reference.optim.optimizer_groups`), through
``mlx.optimizers.MultiOptimizer``: AdamW (betas, eps and weight
decay of each parameter group: decoupled decay on matrices only, none on norms, biases, embeddings;
bias-corrected), and for ``--optimizer muon`` `runtime_mlx.muon.Muon` on the hidden matrices,
``optim.clip_grad_norm``, the MTP loss weight, and the auxiliary-loss-free MoE bias update applied eagerly after
each optimizer step (the loads come out of the compiled micro-step). The micro-step (``nn.value_and_grad`` of
`runtime_mlx.Model.loss`) and the update are each one ``mx.compile``d function: every shape in the model is static
(the experts' ``gather_mm`` runs over all N*K token copies), so the MoE compiles without graph breaks.

Data parallel over several processes (``mlx.launch``, ``dsfs train --backend mlx --nproc N``;
`runtime_mlx.distributed`): each process takes its rows of every micro-batch; the gradients are averaged over the
processes before clipping and the update (every process keeps the same weights and optimizer state), the MoE expert
loads summed before the bias update, the logged metrics and the validation loss averaged; the collectives run
eagerly around the compiled micro-step and update.

Carries over between backends (a run started with one continues with the other): the optimizer state goes to and
from the layout of the reference optimizer's ``state_dict()`` (moments, step, groups), and a fresh run starts from
the reference model's initial weights (`from_reference`); weights go through the Hugging Face checkpoint
(`runtime_mlx.Model.save_pretrained`).

Precision (``precision``, as ``dsfs train --precision``): ``"fp32"`` (and ``"auto"``) computes in float32;
``"bf16"`` computes in bfloat16 from float32 master weights (each step casts the parameters, the routers' excepted,
to bfloat16, so activations are bfloat16 while kernels reduce in float32; gradients reach the master weights in
float32; unlike torch's bf16 autocast, which keeps the embedding, the norms and the residual stream in float32);
``"fp8"`` is DeepSeek-V3's FP8 training (`runtime_mlx.fp8.enable_fp8_training`: FP8 GEMMs for the attention
projections, MLPs and experts, float32 elsewhere, as the reference on CPU). ``"bf16"`` and ``"fp8"`` keep the
optimizer moments in bfloat16 between steps (AdamW's ``m``/``v``, Muon's momentum; report section 3.3.3), as
`reference.optim.store_moments_in`: the update runs in float32 and rounds them back; saved states hold bfloat16
tensors, so a resumed run continues bit for bit.

No ``dsfs`` import: what the loop knows (hyperparameters, batches as dicts of torch tensors) is passed in.

On Linux, MLX's CPU wheel uses a slow bundled BLAS; preloading OpenBLAS speeds it up about 20x (DESIGN.md):
``LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0 dsfs train --backend mlx``.
"""

from __future__ import annotations

import os
import sys

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import torch
from mlx.utils import tree_flatten, tree_map, tree_map_with_path, tree_unflatten

from reference.optim import optimizer_groups

from . import distributed
from .checkpoint import load_torch_state_dict
from .fp8 import enable_fp8_training
from .model import Model
from .muon import Muon

PRECISIONS = ("auto", "fp32", "bf16", "fp8")
"""``MLXTrainer``'s ``precision`` values (``dsfs.train_config.PRECISIONS``; ``"auto"`` is float32 here)."""

BLAS_NOTE = ("note: MLX's Linux CPU wheel links a slow reference BLAS; about 20x faster with OpenBLAS: apt-get install "
             "libopenblas0-pthread, then LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0 dsfs train ...")

# ---------------------------------------------------------------- weights and optimizer


def from_reference(ref: torch.nn.Module) -> Model:
    """A `runtime_mlx.Model` holding the weights of the reference model ``ref`` (same config; a fresh run draws
    ``ref`` under its torch seed, so it starts from the same weights on every backend)."""
    model = Model(ref.config)
    load_torch_state_dict(model, ref.state_dict())
    return model


class _LowPrecisionMoments:
    """Mixin for an MLX optimizer: its per-parameter state arrays (AdamW's ``m`` and ``v``, Muon's
    ``momentum_buffer``) are stored in ``moment_dtype`` between steps; each update widens them to float32, runs the
    optimizer's own update, and rounds them back (round to nearest even), as `reference.optim.store_moments_in`."""

    moment_dtype = mx.bfloat16

    def init_single(self, parameter: mx.array, state: dict) -> None:
        super().init_single(parameter, state)
        for k, v in state.items():
            state[k] = v.astype(self.moment_dtype)

    def apply_single(self, gradient: mx.array, parameter: mx.array, state: dict) -> mx.array:
        wide = {k: v.astype(mx.float32) for k, v in state.items()}
        out = super().apply_single(gradient, parameter, wide)
        for k, v in wide.items():
            state[k] = v.astype(self.moment_dtype)
        return out


class AdamWLowPrecision(_LowPrecisionMoments, optim.AdamW):
    """``mlx.optimizers.AdamW`` with ``m`` and ``v`` kept in ``moment_dtype`` (bfloat16) between steps."""


class MuonLowPrecision(_LowPrecisionMoments, Muon):
    """`runtime_mlx.muon.Muon` with ``momentum_buffer`` kept in ``moment_dtype`` (bfloat16) between steps."""


def _group_optimizer(g: dict, moment_dtype=None) -> optim.Optimizer:
    low = moment_dtype is not None and moment_dtype != mx.float32
    if g.get("use_muon"):
        o = (MuonLowPrecision if low else Muon)(learning_rate=g["lr"], momentum=g["momentum"],
                                                weight_decay=g["weight_decay"], nesterov=g["nesterov"],
                                                ns_steps=g["ns_steps"])
    else:
        o = (AdamWLowPrecision if low else optim.AdamW)(learning_rate=g["lr"], betas=list(g["betas"]), eps=g["eps"],
                                                        weight_decay=g["weight_decay"], bias_correction=True)
    if low:
        o.moment_dtype = moment_dtype
    return o


def make_mlx_optimizer(groups: list[dict], moment_dtype=None) -> optim.MultiOptimizer:
    """One MLX optimizer per parameter group of the reference optimizer: bias-corrected AdamW with the group's
    ``lr``, ``betas``, ``eps`` and ``weight_decay``, or, for a ``use_muon`` group of `reference.muon.Muon`,
    `runtime_mlx.muon.Muon` with its ``momentum``, ``nesterov``, ``ns_steps`` and ``weight_decay``. ``groups``:
    the reference optimizer's ``state_dict()["param_groups"]`` with parameter names (the reference's
    ``named_parameters`` names, which are this model's) in place of indices in ``params``; a parameter named
    by no group but the last goes to the last. ``moment_dtype``: an ``mx.Dtype`` (e.g. ``mx.bfloat16``) to keep
    the moments in between steps (`AdamWLowPrecision`, `MuonLowPrecision`); None or float32: float32."""
    filters = [lambda path, a, names=frozenset(g["params"]): path in names for g in groups[:-1]]
    return optim.MultiOptimizer([_group_optimizer(g, moment_dtype) for g in groups], filters=filters)


def _to_torch(a: mx.array) -> torch.Tensor:
    """An optimizer state array as a torch tensor of the same dtype (bfloat16 exactly, through float32)."""
    if a.dtype == mx.bfloat16:
        return torch.from_numpy(np.array(a.astype(mx.float32))).to(torch.bfloat16)
    return torch.from_numpy(np.array(a))


def optimizer_state_to_torch(opt: optim.MultiOptimizer, groups: list[dict]) -> dict:
    """The MLX optimizer state as the reference optimizer's ``state_dict()``: ``param_groups`` are ``groups``
    (see `make_mlx_optimizer`) with indices numbered across groups in place of names; ``state`` has one entry
    per index whose parameter has state: AdamW's ``step`` (float32 scalar), ``exp_avg`` and ``exp_avg_sq``, or
    Muon's ``momentum_buffer`` (tensors of the moments' dtype: float32, or bfloat16 as `make_mlx_optimizer`'s
    ``moment_dtype`` keeps them)."""
    state, param_groups, i = {}, [], 0
    for g, o in zip(groups, opt.optimizers, strict=True):
        flat = dict(tree_flatten(o.state))
        step = float(o.state["step"].item())
        param_groups.append({**g, "params": list(range(i, i + len(g["params"])))})
        for n in g["params"]:
            if f"{n}.momentum_buffer" in flat:
                state[i] = {"momentum_buffer": _to_torch(flat[f"{n}.momentum_buffer"])}
            elif f"{n}.m" in flat:
                state[i] = {"step": torch.tensor(step), "exp_avg": _to_torch(flat[f"{n}.m"]),
                            "exp_avg_sq": _to_torch(flat[f"{n}.v"])}
            i += 1
    return {"state": state, "param_groups": param_groups}


def optimizer_state_from_torch(opt: optim.MultiOptimizer, sd: dict, groups: list[dict]) -> None:
    """Load the reference optimizer's ``state_dict()`` ``sd`` (AdamW, or Muon with its AdamW groups) into
    ``opt`` (already initialized), in place (so compiled functions that captured ``opt.state`` see it), each moment
    cast to the dtype ``opt`` keeps it in (exact from a state saved in that dtype). ``groups``: as
    `make_mlx_optimizer`. Raises ``ValueError`` when ``sd`` does not fit this model (group sizes or kinds,
    shapes)."""
    if [len(g["params"]) for g in sd["param_groups"]] != [len(g["params"]) for g in groups]:
        raise ValueError("optimizer state has other parameter groups than this model")
    if [bool(g.get("use_muon")) for g in sd["param_groups"]] != [bool(g.get("use_muon")) for g in groups]:
        raise ValueError("optimizer state is another optimizer's (Muon and AdamW groups differ)")
    names = [n for g in groups for n in g["params"]]
    loaded, step = {}, 0
    for i, s in sd["state"].items():
        n = names[int(i)]
        if "momentum_buffer" in s:
            loaded[f"{n}.momentum_buffer"] = mx.array(s["momentum_buffer"].float().numpy())
        else:
            loaded[f"{n}.m"] = mx.array(s["exp_avg"].float().numpy())
            loaded[f"{n}.v"] = mx.array(s["exp_avg_sq"].float().numpy())
            step = int(float(s["step"]))
    for o in opt.optimizers:
        flat = dict(tree_flatten(o.state))
        for k in flat:
            if k in loaded:
                if loaded[k].shape != flat[k].shape:
                    raise ValueError(f"optimizer state: {k} has shape {loaded[k].shape}, expected {flat[k].shape}")
                flat[k] = loaded[k].astype(flat[k].dtype)
        flat["step"] = mx.array(step, dtype=flat["step"].dtype)
        o.state.update(tree_unflatten(list(flat.items())))


# ---------------------------------------------------------------- the trainers


def _to_mx(t: torch.Tensor) -> mx.array:
    return mx.array(t.numpy().astype(np.int32))


def eval_cross_entropy(model: Model, batch: dict[str, torch.Tensor]) -> mx.array:
    """Mean next-token cross-entropy (nats/token) of ``model``'s main head for ``batch["input_ids"]`` (B, T) against
    ``batch["targets"]`` (B, T), over the targets that are not -100 (padding, prompt tokens), as
    `dsfs.evaluation.torch_eval_loss` (``F.cross_entropy`` with ``ignore_index=-100``); 0 for a batch without a
    valid target (where ``F.cross_entropy`` gives NaN: `Model.lm_loss`'s convention, as the training loss).
    Fused with the head and chunked (`Model.lm_loss`): the (B, T, vocab) logits are never held. A scalar
    float32 array, not evaluated."""
    return model.lm_loss(model.hidden_states(_to_mx(batch["input_ids"])), _to_mx(batch["targets"]))


class MLXTrainerBase:
    """What every MLX trainer shares (`MLXTrainer`, `runtime_mlx.posttrain.MLXDPOTrainer` and ``MLXDistillTrainer``):
    the optimizer, gradient accumulation, the update, the MoE bias update, the optimizer state in the reference
    layout, and the attributes the training loop reads. A subclass computes a micro-batch's loss, gradients and
    expert loads and hands them to `_accumulate`.

    ``model``: put in train mode; parameters it freezes before calling this constructor get no optimizer state
    and are never updated (as torch's optimizers skip parameters whose ``.grad`` is ``None``). The optimizer: the
    reference's (`reference.optim.optimizer_groups` of ``lr``, ``weight_decay``, ``optimizer``: ``"adamw"`` or
    ``"muon"``) through `make_mlx_optimizer`; ``grad_clip``: max global gradient norm (0: no clipping);
    ``compile``: ``mx.compile`` the update (clipping and the optimizer: every shape static), its state
    ``_compile_state`` (the model's, the optimizer's and MLX's random state) for a subclass that compiles more.
    ``label``: what follows the kernel path in the start line's parenthesis (default: ``", mx.compile"`` when
    compiled); ``moment_dtype``: keep the optimizer moments in this ``mx.Dtype`` between steps (`make_mlx_optimizer`;
    None: float32). Attributes for the loop: ``model``, ``device_type`` ("gpu" or "cpu"), ``n_params``, ``label``
    (kernel path and compilation), ``note`` (the OpenBLAS hint on a Linux CPU without it, else ``None``),
    ``summary`` (``{"kernel_path": ...}`` for the run summary), ``groups`` (the optimizer's parameter groups by
    name). ``group``: an ``mx.distributed.Group`` of data-parallel processes (`runtime_mlx.distributed`) whose
    gradients are averaged and MoE loads summed at each `optimizer_step`, or ``None`` (one process); the label then
    names the number of processes.
    """

    def __init__(self, model: Model, lr: float, weight_decay: float, grad_clip: float, optimizer: str = "adamw",
                 compile: bool = True, label: str | None = None, moment_dtype=None,
                 group: mx.distributed.Group | None = None):
        groups = optimizer_groups(model.config, lr, weight_decay, optimizer)
        self.model, self.groups = model, groups
        model.train()
        self.opt = make_mlx_optimizer(groups, moment_dtype)
        self.opt.init(model.trainable_parameters())
        mx.eval(model.parameters(), self.opt.state)
        clip = grad_clip if grad_clip > 0 else float("inf")

        def update(grads):
            grads, norm = optim.clip_grad_norm(grads, clip)
            self.opt.update(model, grads)
            return norm

        self._compile_state = [model.state, self.opt.state, mx.random.state]  # the random state: dropout masks
        if compile:
            update = mx.compile(update, inputs=self._compile_state, outputs=self._compile_state)
        self._update = update
        self._grads = self._loads = None
        self.update_bias = True  # the auxiliary-loss-free bias update after each step (a stage may hold it)
        self.device_type = "gpu" if mx.default_device().type == mx.DeviceType.gpu else "cpu"
        self.n_params = sum(a.size for _, a in tree_flatten(model.parameters()))
        if label is None:
            label = ", mx.compile" if compile else ""
        self.group = group
        if group is not None:
            label += f", data parallel over {group.size()} processes"
        self.label = f" ({model.kernel_path} kernels{label})"
        slow_blas = sys.platform == "linux" and "openblas" not in os.environ.get("LD_PRELOAD", "")
        self.note = BLAS_NOTE if slow_blas and self.device_type == "cpu" else None
        self.summary = {"kernel_path": model.kernel_path}

    def _accumulate(self, grads, loads: list[mx.array], accum: int, outs=()) -> None:
        """Add ``1 / accum`` of ``grads`` (a micro-batch's gradient tree) and all of ``loads`` (one (E,) count per
        DeepSeekMoE layer) to those kept for `optimizer_step`, and evaluate them with ``outs`` (the micro-batch's
        other outputs)."""
        g = tree_map(lambda a: a / accum, grads) if accum > 1 else grads
        self._grads = g if self._grads is None else tree_map(mx.add, self._grads, g)
        loads = list(loads)
        self._loads = loads if self._loads is None else [a + b for a, b in zip(self._loads, loads, strict=True)]
        mx.eval(self._grads, self._loads, outs)

    def gradients(self):
        """The gradient tree accumulated since the last `optimizer_step`, averaged over the processes of ``group``
        (`runtime_mlx.distributed.average_gradients`): what `optimizer_step` clips and applies. Not evaluated."""
        return distributed.average_gradients(self._grads, self.group)

    def optimizer_step(self, lr: float) -> dict[str, float]:
        """Clip the accumulated gradients (averaged over the processes: `gradients`), apply the optimizer at
        learning rate ``lr``, update the MoE correction biases from the accumulated loads (summed over the
        processes), and clear both. Returns ``{"grad_norm"}``: the global gradient norm before clipping."""
        self.opt.learning_rate = lr
        norm = self._update(self.gradients())
        if self._loads and self.update_bias:
            self.model.update_moe_bias(distributed.sum_over(self._loads, self.group))
        mx.eval(norm, self.model.state, self.opt.state)
        self._grads = self._loads = None
        return {"grad_norm": norm.item()}

    def state_dict(self) -> dict:
        """The optimizer state in the reference optimizer's ``state_dict()`` layout (`optimizer_state_to_torch`)."""
        return optimizer_state_to_torch(self.opt, self.groups)

    def load_state_dict(self, sd: dict) -> None:
        """Load a reference optimizer's ``state_dict()`` (`optimizer_state_from_torch`; ``ValueError`` when it does not
        fit)."""
        optimizer_state_from_torch(self.opt, sd, self.groups)
        mx.eval(self.opt.state)


def _low_precision_params(model: Model, dtype) -> dict:
    """Swap ``model``'s trainable float32 parameters for ``dtype`` copies (the routers' weights, ``*.gate.weight``,
    stay float32) and return the float32 ones to put back (``model.update``); inside a differentiated function the
    gradients flow back through the casts to the float32 master weights."""
    master = model.trainable_parameters()

    def cast(path, p):
        return p if p.dtype != mx.float32 or path.endswith("gate.weight") else p.astype(dtype)

    model.update(tree_map_with_path(cast, master))
    return master


class MLXTrainer(MLXTrainerBase):
    """A `dsfs.trainer.Trainer` for language modelling with a `runtime_mlx.Model`, the MLX twin of
    `dsfs.trainer.TorchTrainer` (same arguments but the device).

    ``model``: put in train mode; the optimizer: the reference's (`reference.optim.optimizer_groups` of ``lr``,
    ``weight_decay``, ``optimizer``: ``"adamw"`` or ``"muon"``) through `make_mlx_optimizer`; ``grad_clip``: max
    global gradient norm (0: no clipping); ``mtp_weight``: weight of the MTP loss; ``compile``: ``mx.compile`` the
    micro-step and the update (FP8 training included: its ops trace). ``precision``: one of `PRECISIONS` (module
    docstring: ``"auto"``/``"fp32"``, ``"bf16"``, ``"fp8"``); ``scale_fmt``: with ``"fp8"``, None (float32 scales)
    or ``"ue8m0"`` (powers of two), else ignored. Raises ValueError for another ``precision`` or ``scale_fmt``.
    Attributes for the loop: ``model``, ``device_type`` ("gpu" or "cpu"), ``n_params``,
    ``label`` (kernel path and compilation, for the start line), ``note`` (the OpenBLAS hint on a Linux CPU
    without it, else ``None``), ``summary`` (``{"kernel_path": ...}`` for the run summary), ``groups`` (the
    optimizer's parameter groups by name). The optimizer step and state are `MLXTrainerBase`'s.

    ``group``: the data-parallel processes (an ``mx.distributed.Group``; module docstring), ``None`` for one
    process, or ``"auto"`` (default): those of this process's MLX launch (`runtime_mlx.distributed.world`; ``None``
    when not launched). Every process must build its trainer from the same weights and feed it the same global
    batches.
    """

    def __init__(self, model: Model, lr: float, weight_decay: float, grad_clip: float, mtp_weight: float,
                 compile: bool = True, optimizer: str = "adamw", precision: str = "fp32",
                 scale_fmt: str | None = None, group: mx.distributed.Group | None | str = "auto"):
        if precision not in PRECISIONS:
            raise ValueError(f"precision={precision!r}: expected one of {', '.join(PRECISIONS)}")
        if precision == "fp8":
            enable_fp8_training(model, scale_fmt)
        self.precision = precision
        low = precision in ("bf16", "fp8")
        extra = "" if precision in ("auto", "fp32") else f", {precision}" + (
            f" ({scale_fmt} scales)" if precision == "fp8" and scale_fmt else "")
        if group == "auto":
            group = distributed.world()
        super().__init__(model, lr, weight_decay, grad_clip, optimizer, compile,
                         label=(", mx.compile" if compile else "") + extra, moment_dtype=mx.bfloat16 if low else None,
                         group=group)
        self.n_mtp = len(model.mtp)
        bf16 = precision == "bf16"

        def loss_fn(x, y):
            master = _low_precision_params(model, mx.bfloat16) if bf16 else None
            # the MTP losses go out one by one: returning a recomputed mean of them trips mx.compile (MLX 0.32:
            # IndexError _Map_base::at, the output's node merged away with its twin inside the loss)
            o = model.loss(x, y, mtp_weight=mtp_weight, check_values=False)
            if master is not None:
                model.update(master)
            return o.loss, o.lm_loss, o.aux_loss, *o.mtp_losses, *o.expert_loads

        micro = nn.value_and_grad(model, loss_fn)
        self._reseed = model.config.hidden_dropout > 0  # dropout masks: a fresh MLX key per micro-step
        if compile:
            micro = mx.compile(micro, inputs=self._compile_state, outputs=self._compile_state)
        self._micro = micro

    def micro_step(self, batch: dict[str, torch.Tensor], accum: int) -> dict[str, float | None]:
        """Loss and gradients of ``batch["input_ids"]`` (B, T) int64 with ``batch["targets"]``; ``1 / accum`` of the
        gradients (and all of the expert loads) are added to those kept for `optimizer_step`. Returns floats
        ``loss``, ``lm_loss``, ``mtp_loss`` (the mean over MTP depths; ``None`` without MTP) and ``aux_loss``. With
        dropout, the masks' MLX key is drawn from torch's global generator, which the training loop checkpoints: a
        resumed run draws the same masks.

        Data parallel (``group``): ``batch`` is the global micro-batch, the same on every process; this process
        computes its rows (`runtime_mlx.distributed.local_rows`; ``ValueError`` when the processes do not divide B),
        and the metrics returned are the means over the processes (that of the whole batch, every row holding as
        many targets); each process draws its own dropout masks."""
        g, n = self.group, distributed.size(self.group)
        if self._reseed:
            mx.random.seed(int(torch.randint(0, 2**31 - 1, ())) * n + distributed.rank(g))
        x, y = distributed.local_rows(batch["input_ids"], g), distributed.local_rows(batch["targets"], g)
        outs, grads = self._micro(_to_mx(x), _to_mx(y))
        self._accumulate(grads, outs[3 + self.n_mtp :], accum, outs)
        mtp = sum(outs[3 : 3 + self.n_mtp]) / self.n_mtp if self.n_mtp else mx.array(0.0)
        m = mx.stack([outs[0], outs[1], mtp, outs[2]]).astype(mx.float32)
        if g is not None:
            m = mx.distributed.all_sum(m, group=g) / n
        loss, lm, mtp, aux = m.tolist()
        return {"loss": loss, "lm_loss": lm, "mtp_loss": mtp if self.n_mtp else None, "aux_loss": aux}

    def eval_loss(self, batch: dict[str, torch.Tensor]) -> float:
        """Mean next-token cross-entropy (nats/token) of the main model over the non-ignored targets of ``batch``
        (`eval_cross_entropy`: -100 targets, the padding and prompt tokens of SFT batches, do not count; 0 when
        none is valid), the model already in eval mode (`dsfs.evaluation.evaluate` averages it over the
        validation batches), at the training precision (bfloat16 compute for ``"bf16"``, the FP8 forward for
        ``"fp8"``). Data parallel (``group``): each process evaluates its rows of the global ``batch``, and the
        losses are averaged weighted by their counts of valid targets (the loss of the whole batch)."""
        g = self.group
        x, y = distributed.local_rows(batch["input_ids"], g), distributed.local_rows(batch["targets"], g)
        local = {"input_ids": x, "targets": y}
        master = _low_precision_params(self.model, mx.bfloat16) if self.precision == "bf16" else None
        try:
            loss = eval_cross_entropy(self.model, local)
            mx.eval(loss)
        finally:
            if master is not None:
                self.model.update(master)
        if g is None:
            return loss.item()
        n = mx.array(float((y != -100).sum()))
        total, count = mx.distributed.all_sum(mx.stack([loss * n, n]), group=g).tolist()
        return total / count if count > 0 else 0.0
