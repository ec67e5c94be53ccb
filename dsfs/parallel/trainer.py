"""`ParallelTrainer`: the `dsfs.trainer.Trainer` of a multi-process run. Every rank runs the same training loop
(`dsfs.loop.TrainingRun`) on the same global batches; the trainer takes this rank's share of each batch, runs the
model parallelized by the run's `dsfs.parallel.layout.Layout`, and reduces what the loop and the optimizer need.

How one global batch (B, T) is split, so that a step equals the single-process step on the whole batch:

- ``dp`` ranks (``dp_replicate x dp_shard``) take ``B / dp`` rows each (rank ``i``: rows ``[i B/dp, (i+1) B/dp)``);
- ``cp`` ranks split the sequence (`dsfs.parallel.cp`); ``tp`` and ``pp`` ranks of one data rank see the same rows;
- each rank's loss is the mean over its own tokens, and gradients are averaged over the ``dp_cp`` ranks (FSDP's
  reduce-scatter, or DDP's all-reduce at ZeRO-1): with every row holding as many targets (pretraining), that is the
  gradient of the global mean loss.

The order of the parallelisms is torchtitan's: pipeline split, then per stage tensor parallelism, expert
parallelism and data parallelism (FSDP2 outermost). After each optimizer step the MoE expert loads are summed over
the ``dp_cp`` ranks before the auxiliary-loss-free bias update, so every rank applies the update of the global
batch (DeepSeek-V3 report section 2.1.2), as one process would.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist
from torch import nn

from dsfs.evaluation import Batch, autocast
from dsfs.parallel.layout import Layout
from dsfs.parallel.muon import DistributedMuon
from dsfs.train_config import TrainConfig
from reference.optim import make_optimizer, param_groups, store_moments_in

METRICS = ("loss", "lm_loss", "mtp_loss", "aux_loss")


def local_rows(x: torch.Tensor, layout: Layout) -> torch.Tensor:
    """This rank's rows of a global batch tensor ``x`` (B, ...): the ``dp`` rank's contiguous ``B / dp`` rows."""
    dp, i = layout.size("dp"), layout.rank("dp")
    n = x.shape[0] // dp
    return x[i * n:(i + 1) * n]


def all_reduce_mean(values: list[float], layout: Layout, dim: str = "dp_cp") -> list[float]:
    """The mean over the ranks of mesh dimension ``dim`` of each float in ``values`` (one all-reduce; NaN stays
    NaN)."""
    t = torch.tensor(values, dtype=torch.float64, device=layout.device)
    if layout.size(dim) > 1:
        dist.all_reduce(t, group=layout.group(dim))
        t /= layout.size(dim)
    return t.tolist()


def grad_norm(params: list[nn.Parameter], layout: Layout, skip: set[int] = frozenset()) -> torch.Tensor:
    """The global L2 norm of the gradients of ``params`` over every rank of the run: each DTensor gradient counts
    its shards once (DTensor reductions over the mesh dimensions it is sharded on), a plain tensor (replicated over
    its data ranks) once, and the pipeline stages' sums are added over ``pp``. ``skip``: ids of parameters a stage
    holds as a copy of another stage's (a tied embedding), not counted twice. Returns a 0-d float32 tensor."""
    from torch.distributed.tensor import DTensor

    groups: dict = defaultdict(list)
    for p in params:
        if p.grad is None or id(p) in skip:
            continue
        g = p.grad
        key = (g.device_mesh, g.placements) if isinstance(g, DTensor) else None
        groups[key].append(g)
    total = torch.zeros((), dtype=torch.float32, device=layout.device)
    for key, gs in groups.items():
        sq = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) ** 2 for g in gs]).sum()
        total = total + (sq.full_tensor() if key is not None else sq)
    if layout.dims.pp > 1:
        dist.all_reduce(total, group=layout.group("pp"))
    return total.sqrt()


class ParallelTrainer:
    """A `dsfs.trainer.Trainer` for language modelling on many processes (module docstring).

    ``model``: a torch model of the ``reference.Model`` API (the same initial weights on every rank: built from the
    same seed, or loaded); ``layout``: the run's `Layout` (``layout.device`` this rank's device); ``tc``: the
    training config (lr, weight decay, optimizer, clipping, MTP weight, precision). Parallelizes ``model`` in place
    (pipeline split, TP, EP, then FSDP at ``layout.dims.zero``, or DDP + ``ZeroRedundancyOptimizer`` at ZeRO-1) and
    builds one optimizer per model part (`reference.optim.make_optimizer`: the same groups as a single process).
    Runs eager. Raises `dsfs.errors.ConfigError` for a model the layout cannot split (`ParallelDims.check_model`).
    """

    def __init__(self, model: nn.Module, layout: Layout, tc: TrainConfig):
        dims = layout.dims
        dims.check_model(model.config)
        dims.check_batch(tc.batch_size, tc.seq_len)
        self.layout, self.tc, self.config = layout, tc, model.config
        self.device_type, self.precision, self.mtp_weight = layout.device.type, tc.precision, tc.mtp_weight
        self.n_params = sum(p.numel() for p in model.parameters())
        names = {id(p): n for n, p in model.named_parameters()}
        self.group_names = [[names[id(p)] for p in g["params"]]  # the one-process optimizer's order (load_state_dict)
                            for g in param_groups(model, tc.weight_decay, tc.optimizer)]
        model = model.to(layout.device).train()
        self.parts, self.pipeline, self.ddp = [model], None, None
        self.sharded = dims.zero > 1 and dims.dp_replicate * dims.dp_shard * dims.cp > 1  # FSDP applies
        if dims.pp > 1:
            from dsfs.parallel import pp

            self.parts, stage_ids = pp.split_model(model, layout.mesh["pp"], dims.pp_schedule)
        for part in self.parts:
            self._parallelize(part)
        if dims.pp > 1:
            self.pipeline = pp.Pipeline(self.parts, stage_ids, layout, dims.microbatches())
        moments = torch.bfloat16 if tc.precision in ("bf16", "fp8") else None
        if dims.zero == 1:
            self.optimizers = [zero1_optimizer(part, tc, moments) for part in self.parts]
        else:
            self.optimizers = [make_optimizer(part, tc.lr, tc.weight_decay, tc.optimizer, moment_dtype=moments,
                                              muon_cls=DistributedMuon) for part in self.parts]
        self.model = self.parts[0] if len(self.parts) == 1 else nn.ModuleList(self.parts)
        self.clip = tc.grad_clip if tc.grad_clip > 0 else float("inf")
        self.label = f", {dims.describe()} over {dims.world_size} processes"
        self.note, self.summary = None, {"parallel": dims.to_dict()}
        self.update_bias = True

    def _parallelize(self, part: nn.Module) -> None:
        layout, dims = self.layout, self.layout.dims
        if dims.tp > 1:
            from dsfs.parallel.tp import apply_tp

            apply_tp(part, layout.mesh["tp"])
        if dims.ep > 1:
            from dsfs.parallel.ep import apply_ep

            apply_ep(part, layout.mesh["ep"])
        if dims.cp > 1:
            from dsfs.parallel.cp import apply_cp

            apply_cp(part, layout.mesh["cp"])
        if dims.zero == 1:
            if dims.dp > 1:
                from dsfs.parallel.fsdp import apply_replicate

                self.ddp = apply_replicate(part, layout)
        elif self.sharded:
            from dsfs.parallel.fsdp import apply_fsdp

            apply_fsdp(part, layout, dims.zero)

    # ---------------------------------------------------------------- the Trainer protocol
    def micro_step(self, batch: Batch, accum: int) -> dict[str, float | None]:
        """Forward and backward of this rank's share of the global micro-batch ``batch`` (``input_ids``, ``targets``
        (B, T) int64, the same on every rank), ``1 / accum`` of the gradients accumulated. Returns the metrics of the
        whole micro-batch (means over the data ranks): ``loss``, ``lm_loss``, ``mtp_loss`` (None without MTP),
        ``aux_loss``."""
        x = local_rows(batch["input_ids"], self.layout).to(self.layout.device)
        y = local_rows(batch["targets"], self.layout).to(self.layout.device)
        cp = self.layout.dims.cp
        with autocast(self.layout.device, self.precision):
            if self.pipeline is not None:
                m = self.pipeline.step(x, y, self.mtp_weight, accum)
            else:
                loss = self.ddp if self.ddp is not None else self.parts[0].loss
                o = loss(x, y, mtp_weight=self.mtp_weight, **self.cp_positions(x.shape[1]))
                (o.loss * (cp / accum)).backward()  # CP: a share of the loss; FSDP averages over the cp ranks too
                mtp = torch.stack(o.mtp_losses).mean().item() if o.mtp_losses else None
                m = {"loss": o.loss.item(), "lm_loss": o.lm_loss.item(), "mtp_loss": mtp,
                     "aux_loss": float(o.aux_loss)}
        keys = [k for k in METRICS if m.get(k) is not None]
        means = all_reduce_mean([m[k] * cp for k in keys], self.layout)  # CP: the sum of the ranks' shares
        return {**dict.fromkeys(METRICS), **dict(zip(keys, means, strict=True))}

    def cp_positions(self, seq_len: int) -> dict:
        """``{"positions": ...}``, the sequence positions this rank computes under context parallelism
        (`dsfs.parallel.cp.positions`), or ``{}`` without it."""
        if self.layout.dims.cp == 1:
            return {}
        from dsfs.parallel.cp import positions

        return {"positions": positions(seq_len, self.layout.dims.cp, self.layout.rank("cp"), self.layout.device)}

    def params(self) -> list[nn.Parameter]:
        """Every trained parameter of this rank's model parts (tied ones once)."""
        seen, out = set(), []
        for part in self.parts:
            for p in part.parameters():
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        return out

    def optimizer_step(self, lr: float) -> dict[str, float]:
        """Clip the gradients to the global norm ``tc.grad_clip`` (`grad_norm`), step the optimizers at ``lr``,
        clear the gradients, sum the MoE expert loads over the ``dp_cp`` ranks and update the correction biases.
        Returns ``{"grad_norm"}`` (before clipping, over the whole model)."""
        if self.layout.dims.tp > 1 and not self.sharded:  # without FSDP, sum the norms' partial gradients
            from dsfs.parallel.tp import reduce_partial_grads

            for part in self.parts:
                reduce_partial_grads(part)
        params = self.params()
        skip = self.pipeline.duplicate_params() if self.pipeline is not None else set()
        norm = grad_norm(params, self.layout, skip)
        coef = float(self.clip / (norm + 1e-6))
        if coef < 1.0:
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(coef)
        for opt in self.optimizers:
            for g in opt.param_groups:
                g["lr"] = lr
            opt.step()
            opt.zero_grad(set_to_none=True)
        self.sync_expert_loads()
        for part in self.parts:
            if self.update_bias:
                part.update_moe_bias()
            else:
                for m in part.moe_layers():
                    if hasattr(m, "expert_load"):
                        m.expert_load.zero_()
        return {"grad_norm": float(norm)}

    def moe_layers(self) -> list[nn.Module]:
        """The MoE layers of this rank's model parts (a pipeline stage holds its own)."""
        return [m for part in self.parts for m in part.moe_layers()]

    def sync_expert_loads(self) -> None:
        """Sum every MoE layer's ``expert_load`` (tokens routed to each expert since the last update, counted by
        this rank) over the ``dp_cp`` ranks, in one all-reduce: the global loads the bias update reads."""
        loads = [m.expert_load for m in self.moe_layers() if hasattr(m, "expert_load")]
        if not loads or self.layout.size("dp_cp") == 1:
            return
        flat = torch.cat([x.reshape(-1) for x in loads])
        dist.all_reduce(flat, group=self.layout.group("dp_cp"))
        for x, y in zip(loads, flat.split([x.numel() for x in loads]), strict=True):
            x.copy_(y.view_as(x))

    @torch.no_grad()
    def eval_loss(self, batch: Batch) -> float:
        """The validation loss of the global batch ``batch`` (the main model's mean cross-entropy), each data rank
        evaluating its rows, averaged over them."""
        x = local_rows(batch["input_ids"], self.layout).to(self.layout.device)
        y = local_rows(batch["targets"], self.layout).to(self.layout.device)
        with autocast(self.layout.device, self.precision):
            if self.pipeline is not None:
                v = self.pipeline.eval_loss(x, y)
            else:
                v = float(self.parts[0].loss(x, y, mtp_weight=0.0, **self.cp_positions(x.shape[1])).lm_loss)
        return all_reduce_mean([v * self.layout.dims.cp], self.layout)[0]

    def state_dict(self) -> dict | None:
        """None: the optimizer state is saved sharded with the model (`dsfs.parallel.checkpoint`)."""
        return None

    def load_state_dict(self, sd: dict) -> None:
        """Load a one-process run's optimizer state (the reference optimizer's ``state_dict()``, parameters numbered
        in `reference.optim.param_groups` order) into this run's sharded optimizers: renamed by parameter name, each
        rank taking its part (DCP's ``set_optimizer_state_dict`` from a full state dict). Raises ``ValueError`` when
        it does not fit the model (a sharded checkpoint is loaded by `dsfs.parallel.checkpoint.load_sharded`)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        from dsfs.parallel.checkpoint import set_optimizer_state

        flat = [n for names in self.group_names for n in names]
        groups = sd["param_groups"]
        if len(groups) != len(self.group_names) or sum(len(g["params"]) for g in groups) != len(flat):
            raise ValueError(f"optimizer state of {sum(len(g['params']) for g in groups)} parameters in "
                             f"{len(groups)} groups; this model's optimizer has {len(flat)} in "
                             f"{len(self.group_names)}")
        for part, opt in zip(self.parts, self.optimizers, strict=True):
            local = getattr(opt, "optim", opt)  # ZeRO-1: the rank's share
            held = {id(q) for g in local.param_groups for q in g["params"]}
            mine = {n for n, p in part.named_parameters() if id(p) in held}
            kept = [{**g, "params": [flat[i] for i in g["params"] if flat[i] in mine]} for g in groups]
            osd = {"state": {flat[i]: st for i, st in sd["state"].items() if flat[i] in mine},
                   "param_groups": [g for g in kept if g["params"]]}  # a stage's optimizer has no empty group
            set_optimizer_state(part, local, osd, StateDictOptions(full_state_dict=True))


def zero1_optimizer(model: nn.Module, tc: TrainConfig, moments) -> torch.optim.Optimizer:
    """ZeRO-1: the optimizer of `reference.optim.make_optimizer` (same groups and hyperparameters) wrapped in
    ``torch.distributed.optim.ZeroRedundancyOptimizer``: each rank keeps the state of, and updates, a share of the
    parameters (whole tensors, so Muon orthogonalizes whole matrices, each on one rank), then broadcasts them."""
    import inspect

    from torch.distributed.optim import ZeroRedundancyOptimizer

    ref = make_optimizer(model, tc.lr, tc.weight_decay, tc.optimizer)
    accepted = inspect.signature(type(ref).__init__).parameters
    defaults = {k: v for k, v in ref.defaults.items() if k in accepted}
    opt = ZeroRedundancyOptimizer([dict(g) for g in ref.param_groups], optimizer_class=type(ref), **defaults)
    if moments is not None:
        store_moments_in(opt.optim, moments)
    return opt



class ShardedCheckpoints:
    """How a multi-process run saves (the `dsfs.loop.LocalCheckpoints` interface): sharded checkpoints
    (`dsfs.parallel.checkpoint.save_sharded`, the run's `ParallelDims` stored in the trainer state), ``final/``
    gathered whole on rank 0 (`save_full_model`); ``main`` is global rank 0; ``agree`` is the maximum over every
    rank (one all-reduce), so a Ctrl-C or a time budget seen by one rank stops every rank after the same step."""

    def __init__(self):
        self.main = dist.get_rank() == 0

    def save(self, trainer: ParallelTrainer, state: dict, ckpt_dir, step: int, tokenizer_file, keep_last: int):
        from dsfs.parallel.checkpoint import save_sharded

        state = {**state, "parallel": trainer.layout.dims.to_dict()}
        return save_sharded(trainer.parts, trainer.optimizers, trainer.config, state, ckpt_dir, step, tokenizer_file,
                            keep_last)

    def save_final(self, trainer: ParallelTrainer, path, tokenizer_file):
        from dsfs.parallel.checkpoint import save_full_model

        return save_full_model(trainer.parts, trainer.layout, trainer.config, path, tokenizer_file)

    def agree(self, value: int) -> int:
        t = torch.tensor([int(value)], dtype=torch.int64, device=_collective_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())


def _collective_device() -> torch.device:
    """The device the default process group's collectives take tensors on (a GPU under NCCL)."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
