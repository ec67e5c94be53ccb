"""The per-step work of a training loop: the `Trainer` protocol, `TorchTrainer` (torch models with the
``reference.Model`` API: the reference, ``runtime_cuda``) and `make_trainer`, which also picks
``runtime_mlx.train.MLXTrainer`` for the MLX runtime.

The loop (`dsfs.loop.TrainingRun`) owns the schedule, the batches, the metrics, the evaluation cadence and the
checkpoints; a trainer owns the model, the optimizer and the backend's forward and backward. Pretraining feeds
language-modelling batches; a post-training stage (SFT, DPO, GRPO) plugs in a trainer of its own whose
``micro_step`` takes its own kind of batch and returns its own metrics.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from dsfs.backend import Backend
from dsfs.errors import ConfigError
from dsfs.evaluation import Batch, autocast, torch_eval_loss
from dsfs.train_config import TrainConfig
from reference.fp8_training import enable_fp8_training, fp8_ops_for
from reference.model import indexer_layers, set_indexer_training
from reference.optim import make_optimizer
from reference.v4_model import V4Model


@runtime_checkable
class Trainer(Protocol):
    """What the training loop needs of a trainer (``runtime_mlx.train.MLXTrainer`` and `TorchTrainer` satisfy it).

    Attributes: ``model`` (the trained model: ``save_pretrained(path, tokenizer_file=...)`` for checkpoints, and
    ``training`` / ``eval()`` / ``train(mode)`` for `dsfs.evaluation.evaluate`), ``device_type`` (``"cpu"``,
    ``"cuda"``, ``"gpu"``, ...), ``n_params``, ``label`` (appended to the start line, e.g. ``" (torch.compile)"``),
    ``note`` (one line to print at the start, or ``None``), ``summary`` (extra fields of the run summary).

    A step: ``micro_step(batch, accum)`` once per micro-batch (``batch``: a dict of CPU tensors, the kind of batch
    this trainer trains on; pretraining's is ``{"input_ids", "targets"}``), accumulating ``1 / accum`` of the
    gradients, returns metrics as a dict of floats (``None`` for a metric that does not apply, e.g. ``mtp_loss``
    without MTP) that the loop averages over the micro-batches and logs; ``"loss"``, the optimized objective, is
    required (the loop stops on a non-finite one). Then ``optimizer_step(lr)`` clips, updates the weights at
    learning rate ``lr``, clears the gradients and returns metrics of the step (``{"grad_norm": ...}``).

    ``eval_loss(batch)``: the validation loss (a float, lower is better) of one evaluation batch, the model
    already in eval mode, no gradients. ``state_dict()`` / ``load_state_dict(sd)``: the optimizer state in the
    reference optimizer's layout, so a run continues on another backend (``ValueError`` / ``KeyError`` when it does
    not fit the model).
    """

    model: Any
    device_type: str
    n_params: int
    label: str
    note: str | None
    summary: dict

    def micro_step(self, batch: Batch, accum: int) -> dict[str, float | None]: ...

    def optimizer_step(self, lr: float) -> dict[str, float]: ...

    def eval_loss(self, batch: Batch) -> float: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, sd: dict) -> None: ...


def compiled_loss(model: nn.Module) -> Callable:
    """``torch.compile(model.loss)``. On CPU the experts run through ``F.grouped_mm`` and the whole forward is one
    graph (the input check and the valid-token count stay outside it). Where the per-expert loop runs instead
    (CUDA, float64, autocast) it is a graph break with routing-dependent segment sizes, so each decoder-layer
    type is compiled on its own, more variants than Dynamo's default limit of 8 allows: the limits are raised."""
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, 1024)
    return torch.compile(model.loss)


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool = True) -> Iterator[None]:
    """``torch.use_deterministic_algorithms(True, warn_only=True)`` inside the block (nothing when not ``enabled``),
    the previous setting restored after it; uninitialized memory is not filled (``torch.empty`` stays as fast).

    What it fixes: inductor lowers an accumulating ``index_put`` (the embedding's backward) to a scatter with
    atomic adds, so the compiled backward adds a token's gradient rows in whatever order the OpenMP threads reach
    them, and two runs with the same seed drift apart from the first steps (``embed_tokens`` gradients differ in
    the last bits, then everything). Under deterministic algorithms inductor calls ATen's ``index_put_`` instead,
    which accumulates in order. Inductor reads the flag when it lowers a graph, Dynamo guards on it, and a compiled
    backward is lowered on its first call: the forward and the backward must both run inside the block."""
    if not enabled:
        yield
        return
    det = torch.utils.deterministic
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              det.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True, warn_only=True)
    det.fill_uninitialized_memory = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        det.fill_uninitialized_memory = before[2]


class TorchTrainer:
    """A `Trainer` for language modelling with a torch model of the ``reference.Model`` API.

    ``model`` is moved to ``device`` in train mode; the optimizer is `reference.optim.make_optimizer` (``lr``,
    ``weight_decay``, ``optimizer``: ``"adamw"`` or ``"muon"``); the loss runs through `compiled_loss` when
    ``compile``, under bf16 autocast on CUDA; gradients are clipped to ``grad_clip`` (0: no clipping);
    ``mtp_weight`` weighs the MTP loss; the MoE correction biases are updated after each optimizer step.

    ``deterministic``: run the compiled forward and backward under `deterministic_algorithms`, so two runs with the
    same seed (and a resumed run) train bit for bit alike, on the same machine, torch and thread count; ``None``
    (default): when compiled on CPU (eager CPU training is deterministic already; on CUDA, deterministic kernels
    need ``CUBLAS_WORKSPACE_CONFIG`` and cost more, and are left to the user).

    ``precision`` (`dsfs.train_config.PRECISIONS`): the autocast of `dsfs.evaluation.autocast`; ``"bf16"`` and
    ``"fp8"`` keep the optimizer moments in bf16 (`reference.optim.store_moments_in`), and ``"fp8"`` puts the model
    on FP8 GEMMs (`reference.fp8_training.enable_fp8_training` with ``scale_fmt`` and ``fp8_ops``, the ops to run:
    None for the reference's, ``kernels.triton.fp8`` on CUDA); FP8 training runs eager (``compile`` must be False:
    the grouped FP8 GEMMs' data-dependent segments do not trace).
    """

    def __init__(self, model: nn.Module, device: torch.device, lr: float, weight_decay: float, grad_clip: float,
                 mtp_weight: float, compile: bool, optimizer: str = "adamw", deterministic: bool | None = None,
                 precision: str = "auto", scale_fmt: str | None = None, fp8_ops=None, indexer_warmup_steps: int = 0):
        self.model, self.device, self.mtp_weight = model.to(device).train(), device, mtp_weight
        self.precision = precision
        if precision == "fp8":
            if compile:
                raise ValueError("precision='fp8' trains eager: pass compile=False")
            enable_fp8_training(self.model, scale_fmt, fp8_ops)
        moments = torch.bfloat16 if precision in ("bf16", "fp8") else None
        self.opt = make_optimizer(self.model, lr, weight_decay, optimizer, moment_dtype=moments)
        self.loss_fn = compiled_loss(self.model) if compile else self.model.loss
        self.deterministic = bool(compile and device.type == "cpu") if deterministic is None else deterministic
        self.clip = grad_clip if grad_clip > 0 else float("inf")
        self.device_type, self.n_params = device.type, sum(p.numel() for p in self.model.parameters())
        self.label = (" (torch.compile)" if compile else "") + ("" if precision == "auto" else f", {precision}"
                                                               + (f" ({scale_fmt} scales)" if scale_fmt else ""))
        self.note, self.summary = None, {}
        self.update_bias = True  # the auxiliary-loss-free bias update after each step (a stage may hold it)
        self.indexer_warmup_steps, self.indexer_mode = indexer_warmup_steps, None
        self.has_indexers = bool(indexer_layers(self.model))

    def begin_step(self, step: int) -> None:
        """Before optimizer step ``step`` (0-based): the indexers' training stage of a model that has lightning
        indexers (`reference.model.set_indexer_training`): the dense warm-up for the first ``indexer_warmup_steps``
        steps, with every parameter outside the indexers frozen (``requires_grad=False``: no gradient, so the
        optimizer leaves them as they are, and no bias update), then the sparse stage with everything trained."""
        if not self.has_indexers:
            return
        mode = "dense" if step < self.indexer_warmup_steps else "sparse"
        if mode == self.indexer_mode:
            return
        set_indexer_training(self.model, mode)
        for name, p in self.model.named_parameters():
            if ".indexer." not in name:
                p.requires_grad_(mode == "sparse")
        self.update_bias, self.indexer_mode = mode == "sparse", mode

    def micro_step(self, batch: Batch, accum: int) -> dict[str, float | None]:
        """Forward and backward of ``loss / accum`` for ``batch["input_ids"]`` (B, T) int64 with ``batch["targets"]``
        (gradients accumulate in ``.grad``). Returns floats ``loss``, ``lm_loss``, ``mtp_loss`` (the mean over MTP
        depths; ``None`` without MTP) and ``aux_loss``."""
        x = batch["input_ids"].to(self.device, non_blocking=True)
        y = batch["targets"].to(self.device, non_blocking=True)
        with deterministic_algorithms(self.deterministic):
            with autocast(self.device, self.precision):
                o = self.loss_fn(x, y, mtp_weight=self.mtp_weight)
            (o.loss / accum).backward()
        mtp = torch.stack(o.mtp_losses).mean().item() if o.mtp_losses else None
        out = {"loss": o.loss.item(), "lm_loss": o.lm_loss.item(), "mtp_loss": mtp, "aux_loss": float(o.aux_loss)}
        if self.has_indexers:
            out["indexer_loss"] = None if o.indexer_loss is None else o.indexer_loss.item()
        return out

    def optimizer_step(self, lr: float) -> dict[str, float]:
        """Clip the accumulated gradients, step the optimizer at learning rate ``lr``, clear the gradients and update
        the MoE correction biases. Returns ``{"grad_norm"}``: the global gradient norm before clipping."""
        for g in self.opt.param_groups:
            g["lr"] = lr
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip))
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.update_bias:
            self.model.update_moe_bias()
        else:
            for m in self.model.moe_layers():  # the counts are dropped: the routing stays as loaded
                if getattr(m, "expert_load", None) is not None:
                    m.expert_load.zero_()
        return {"grad_norm": grad_norm}

    def eval_loss(self, batch: Batch) -> float:
        """`dsfs.evaluation.torch_eval_loss` of the model on this trainer's device, at its precision (FP8 training
        evaluates the FP8 forward it trains)."""
        return torch_eval_loss(self.model, batch, self.device, self.precision)

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


def make_trainer(be: Backend, model, tc: TrainConfig, compile: bool | str) -> Trainer:
    """The language-modelling trainer of backend ``be`` for ``model`` with training config ``tc``.

    ``model``: a torch model with the ``reference.Model`` API (for the MLX runtime it is converted with
    ``runtime_mlx.train.from_reference``, so every backend starts from the same weights) or a ``runtime_mlx.Model``.
    ``compile``: ``torch.compile`` the loss (``"auto"``: on cpu and cuda, except FP8 training, which runs eager)
    or ``mx.compile`` the steps (``"auto"``: on). ``tc.precision`` / ``tc.scale_fmt``: `TorchTrainer`; FP8 runs the
    Triton kernels on the cuda backend with a GPU of compute capability 8.9 or more (FP8 tensor cores), the
    reference's ops elsewhere. Imports ``runtime_mlx.train`` only for the MLX runtime. Raises `ConfigError` for
    ``--compile on`` with FP8."""
    if be.name == "mlx":
        from runtime_mlx.train import MLXTrainer, from_reference

        if isinstance(model, V4Model):
            raise ConfigError("--backend mlx: DeepSeek-V4 trains on the torch backends (reference, cuda) for now; "
                              "runtime_mlx runs V4 inference")

        if isinstance(model, nn.Module):
            model = from_reference(model)
        return MLXTrainer(model, tc.lr, tc.weight_decay, tc.grad_clip, tc.mtp_weight, bool(compile), tc.optimizer,
                          precision=tc.precision, scale_fmt=tc.scale_fmt)
    if compile == "auto":
        compile = be.device.type in ("cpu", "cuda") and tc.precision != "fp8"
    if compile and tc.precision == "fp8":
        raise ConfigError("--compile on: FP8 training runs eager (--compile off or auto)")
    fp8_ops = fp8_ops_for(be.model_cls, be.device) if tc.precision == "fp8" else None
    return TorchTrainer(model, be.device, tc.lr, tc.weight_decay, tc.grad_clip, tc.mtp_weight, compile, tc.optimizer,
                        precision=tc.precision, scale_fmt=tc.scale_fmt, fp8_ops=fp8_ops,
                        indexer_warmup_steps=tc.indexer_warmup_steps)
