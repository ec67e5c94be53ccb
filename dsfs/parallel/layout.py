"""The parallel layout of a multi-device run: `ParallelDims` (the degrees, validated against the world size, the
model and the batch) and `Layout` (the `DeviceMesh` over them with torchtitan's dimension names).

The world is one mesh ``pp x dp_replicate x dp_shard x cp x tp`` (torchtitan's order: pipeline stages outermost,
tensor parallelism innermost, so that TP's frequent collectives stay between neighbouring ranks: on one node with
NCCL). Expert parallelism does not add ranks: as in torchtitan (with experts not tensor-parallel, ETP = 1 here), the
``ep`` ranks are borrowed from ``dp_shard x cp``, the ranks that hold different tokens, so ``dp_shard`` splits into
``dp_shard_mod_ep x dp_shard_in_ep`` with ``ep = dp_shard_in_ep x cp``; the routed experts are fully sharded over
the remaining ``dp_shard_mod_ep`` (and replicated over ``dp_replicate``).

Flattened submeshes: ``dp`` (``dp_replicate x dp_shard``: the ranks that read different rows
of the batch), ``dp_shard_cp`` (FSDP's shard dimension: parameters are sharded over the data and context ranks),
``dp_cp`` (the ranks whose losses and expert loads are averaged or summed), ``ep`` (when ``ep > 1``): `Layout.mesh`.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, fields

from dsfs.errors import ConfigError

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")
"""The world mesh's dimensions, outermost first (torchtitan's ``ParallelDims`` names and order)."""
DEGREES = ("dp_replicate", "dp_shard", "cp", "tp", "pp", "ep")
"""The degrees a user sets (``dsfs train --dp-replicate ... --ep``), in the order of the options."""
ZERO_STAGES = (1, 2, 3)
PP_SCHEDULES = ("1F1B", "Interleaved1F1B", "ZBVZeroBubble", "DualPipeV")
"""Pipeline schedules, by their ``torch.distributed.pipelining`` names (``Schedule<name>``)."""


@dataclass(frozen=True)
class ParallelDims:
    """Parallelism degrees of a run over ``world_size`` processes.

    ``dp_replicate``: data-parallel replicas (HSDP's replicate dimension: whole copies, gradients all-reduced);
    ``dp_shard``: fully sharded data parallelism (FSDP2 ``fully_shard``; -1: the rest of the world, the default);
    ``cp``: context parallelism (the sequence split over ranks); ``tp``: tensor parallelism (Megatron-style with
    sequence-parallel norms); ``pp``: pipeline stages; ``ep``: expert parallelism, borrowed from ``dp_shard x cp``
    (module docstring). ``zero``: the ZeRO stage of the data-parallel dimensions (Rajbhandari et al. 2020): 3
    (parameters, gradients and optimizer state sharded: ``fully_shard``), 2 (``reshard_after_forward=False``: the
    parameters stay gathered from forward to backward), 1 (parameters and gradients replicated, all-reduced; the
    optimizer state sharded by parameter, ``ZeroRedundancyOptimizer``; pure data parallelism only).
    ``pp_schedule`` (`PP_SCHEDULES`) and ``pp_microbatches`` (per micro-step; default: `microbatches`): the
    pipeline's. Raises `ConfigError` naming the fields for a degree below 1, a
    product that is not ``world_size`` (`resolve`) or an EP that does not fit ``dp_shard x cp``.
    """

    dp_replicate: int = 1
    dp_shard: int = -1
    cp: int = 1
    tp: int = 1
    pp: int = 1
    ep: int = 1
    world_size: int = 1
    zero: int = 3
    pp_schedule: str = "1F1B"
    pp_microbatches: int | None = None

    def __post_init__(self):
        for k in (*DEGREES, "world_size"):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or (v < 1 and not (k == "dp_shard" and v == -1)):
                raise ConfigError(f"--{k.replace('_', '-')} {v}: expected an integer >= 1"
                                  + (" (or -1: the rest of the world)" if k == "dp_shard" else ""))
        if self.zero not in ZERO_STAGES:
            raise ConfigError(f"--zero {self.zero}: expected one of {', '.join(map(str, ZERO_STAGES))}")
        if self.pp_schedule not in PP_SCHEDULES:
            raise ConfigError(f"--pp-schedule {self.pp_schedule}: expected one of {', '.join(PP_SCHEDULES)}")
        if self.pp_microbatches is not None and self.pp_microbatches < 1:
            raise ConfigError(f"--pp-microbatches {self.pp_microbatches}: expected an integer >= 1")
        rest = self.dp_replicate * self.cp * self.tp * self.pp
        if self.dp_shard == -1:
            if self.world_size % rest:
                raise ConfigError(f"world size {self.world_size} is not divisible by dp_replicate x cp x tp x pp = "
                                  f"{self.dp_replicate} x {self.cp} x {self.tp} x {self.pp} = {rest}")
            object.__setattr__(self, "dp_shard", self.world_size // rest)
        if rest * self.dp_shard != self.world_size:
            raise ConfigError(f"dp_replicate x dp_shard x cp x tp x pp = {self.dp_replicate} x {self.dp_shard} x "
                              f"{self.cp} x {self.tp} x {self.pp} = {rest * self.dp_shard}, expected the world size "
                              f"{self.world_size} (--nproc x nodes)")
        if self.ep > 1 and (self.ep % self.cp or (self.dp_shard * self.cp) % self.ep):
            raise ConfigError(f"--ep {self.ep}: expert parallelism borrows ranks from dp_shard x cp = {self.dp_shard} "
                              f"x {self.cp}; expected an ep that cp divides and that divides dp_shard x cp")
        if self.pp > 1 and self.cp > 1:
            raise ConfigError("--pp with --cp: the pipeline stages do not split the sequence; use one of them")
        if self.zero == 1 and (self.tp, self.pp, self.cp, self.ep, self.dp_replicate) != (1, 1, 1, 1, 1):
            raise ConfigError("--zero 1 (replicated parameters, sharded optimizer state) is pure data parallelism: "
                              "expected --dp-shard only (tp, pp, cp, ep and dp-replicate 1); use --zero 2 or 3 with "
                              "the others")

    @classmethod
    def from_dict(cls, d: dict) -> ParallelDims:
        """The dims of `to_dict` (a checkpoint's ``parallel`` entry); unknown keys are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict:
        """The fields as a plain dict (stored in checkpoints: ``trainer_state.pt``'s ``"parallel"``)."""
        return asdict(self)

    @property
    def dp(self) -> int:
        """Data-parallel degree: the ranks that read different rows of the batch (``dp_replicate x dp_shard``)."""
        return self.dp_replicate * self.dp_shard

    @property
    def dp_shard_in_ep(self) -> int:
        """The part of ``dp_shard`` that EP borrows (``ep / cp``; 1 without EP)."""
        return self.ep // self.cp if self.ep > 1 else 1

    @property
    def enabled(self) -> dict[str, int]:
        """The degrees above 1, by name, in `DEGREES` order."""
        return {k: getattr(self, k) for k in DEGREES if getattr(self, k) > 1}

    def describe(self) -> str:
        """One line: ``"dp_shard 2 x tp 2 (ZeRO-3)"``, or ``"1 process"``."""
        on = self.enabled
        if not on:
            return "1 process"
        parts = " x ".join(f"{k} {v}" for k, v in on.items())
        zero = f" (ZeRO-{self.zero})" if self.dp_shard * self.cp > 1 or self.zero == 1 and self.dp > 1 else ""
        pp = f", {self.pp_schedule} schedule" if self.pp > 1 else ""
        return parts + zero + pp

    def check_model(self, cfg) -> None:
        """Raise `ConfigError` naming the fields when model config ``cfg`` (a ``reference.ModelConfig``) cannot be
        split this way: attention heads (and the dense, shared-expert and indexer widths) by ``tp``, routed experts
        by ``ep`` (and the expert groups of group-limited routing: whole groups per rank), layers by ``pp``."""
        c = cfg
        if self.tp > 1:
            checks = {"num_attention_heads": c.num_attention_heads, "intermediate_size": c.intermediate_size}
            if c.n_routed_experts and c.n_shared_experts:
                checks["moe_intermediate_size x n_shared_experts"] = c.moe_intermediate_size * c.n_shared_experts
            if getattr(c, "num_key_value_heads", None) and c.attention_type not in ("mla", "dsa"):
                checks["num_key_value_heads"] = c.num_key_value_heads
            if c.attention_type == "dsa":
                checks["index_n_heads"] = c.index_n_heads
            for k, v in checks.items():
                if v % self.tp:
                    raise ConfigError(f"--tp {self.tp}: the model's {k} = {v} is not divisible by tp {self.tp}")
        if self.ep > 1:
            if not c.n_routed_experts:
                raise ConfigError(f"--ep {self.ep}: the model has no routed experts (n_routed_experts 0)")
            if c.n_routed_experts % self.ep:
                raise ConfigError(f"--ep {self.ep}: n_routed_experts = {c.n_routed_experts} is not divisible by "
                                  f"ep {self.ep}")
            if c.n_group > 1 and (c.n_group % self.ep and self.ep % c.n_group):
                raise ConfigError(f"--ep {self.ep}: n_group = {c.n_group} expert groups do not map onto {self.ep} "
                                  "ranks (expected one to divide the other, as DeepSeek-V3 maps groups to nodes)")
        if self.cp > 1 and c.aux_loss_alpha > 0:
            raise ConfigError(f"--cp {self.cp}: the sequence-wise balance loss (aux_loss_alpha {c.aux_loss_alpha}) "
                              "needs whole sequences on a rank")
        if self.pp > 1 and c.num_hidden_layers < self.pp:
            raise ConfigError(f"--pp {self.pp}: the model has {c.num_hidden_layers} layers (num_hidden_layers), "
                              f"fewer than the {self.pp} stages")

    def check_batch(self, batch_size: int, seq_len: int) -> None:
        """Raise `ConfigError` when a micro-batch of ``batch_size`` sequences of ``seq_len`` tokens does not split
        over the layout: rows by ``dp`` (and then by the pipeline's microbatches), the sequence by ``2 x cp``
        (causal load balancing: each CP rank holds a chunk from each end) and by ``tp`` (sequence-parallel norms)."""
        rows = batch_size
        if rows % self.dp:
            raise ConfigError(f"--batch-size {batch_size} is not divisible by the data-parallel degree dp_replicate x "
                              f"dp_shard = {self.dp}")
        if self.pp > 1 and (rows // self.dp) % self.microbatches():
            raise ConfigError(f"--batch-size {batch_size}: {rows // self.dp} rows per data-parallel rank do not split "
                              f"into {self.microbatches()} pipeline microbatches (--pp-microbatches)")
        if self.cp > 1 and seq_len % (2 * self.cp):
            raise ConfigError(f"--seq-len {seq_len} is not divisible by 2 x cp = {2 * self.cp} (context parallelism "
                              "splits the sequence into 2 x cp chunks, balancing the causal work)")
        if self.tp > 1 and (seq_len // self.cp) % self.tp:
            raise ConfigError(f"--seq-len {seq_len}: {seq_len // self.cp} tokens per context rank are not divisible "
                              f"by tp {self.tp} (sequence-parallel norms split the sequence over the TP ranks)")

    def microbatches(self) -> int:
        """Pipeline microbatches per micro-step: ``pp_microbatches``, default ``pp`` (``2 x pp`` for the
        schedules with two stages per rank, `PP_SCHEDULES` other than 1F1B)."""
        if self.pp_microbatches is not None:
            return self.pp_microbatches
        return self.pp if self.pp_schedule == "1F1B" else 2 * self.pp


class Layout:
    """The `ParallelDims` of this process's run and its `DeviceMesh`: ``world`` the world mesh, ``mesh[names]`` the
    submesh of one dimension or several by name, flattened ones included (``mesh["tp"]``, ``mesh["dp_replicate",
    "dp_shard_cp"]``: module docstring). ``device``: this rank's ``torch.device``.

    Build it with `Layout.build` inside an initialized process group."""

    def __init__(self, dims: ParallelDims, world, device):
        self.dims, self.world, self.device = dims, world, device
        self.mesh = _Submeshes(world)

    @classmethod
    def build(cls, dims: ParallelDims, device) -> Layout:
        """``init_device_mesh`` over the world with `MESH_DIMS` (``dp_shard`` split for EP) and the flattened
        submeshes; ``device``: this rank's device (its type picks gloo or NCCL meshes)."""
        from torch.distributed.device_mesh import init_device_mesh

        d = dims
        shape = [d.pp, d.dp_replicate, d.dp_shard // d.dp_shard_in_ep, d.dp_shard_in_ep, d.cp, d.tp]
        names = ["pp", "dp_replicate", "dp_shard_mod_ep", "dp_shard_in_ep", "cp", "tp"]
        mesh = _Submeshes(init_device_mesh(device.type, tuple(shape), mesh_dim_names=tuple(names)))
        mesh["dp_shard_mod_ep", "dp_shard_in_ep"]._flatten("dp_shard")
        mesh["dp_replicate", "dp_shard_mod_ep", "dp_shard_in_ep"]._flatten("dp")
        mesh["dp_shard_mod_ep", "dp_shard_in_ep", "cp"]._flatten("dp_shard_cp")
        mesh["dp_replicate", "dp_shard_mod_ep", "dp_shard_in_ep", "cp"]._flatten("dp_cp")
        if d.ep > 1:
            mesh["dp_shard_in_ep", "cp"]._flatten("ep")
        return cls(dims, mesh.world, device)

    def rank(self, dim: str) -> int:
        """This process's coordinate along the (possibly flattened) mesh dimension ``dim``."""
        return self.mesh[dim].get_local_rank()

    def size(self, dim: str) -> int:
        """The size of mesh dimension ``dim``."""
        return self.mesh[dim].size()

    def group(self, dim: str):
        """The process group of mesh dimension ``dim``."""
        return self.mesh[dim].get_group()


class _Submeshes:
    """``Layout.mesh``: the world mesh's submeshes by dimension name(s)."""

    def __init__(self, world):
        self.world = world

    def __getitem__(self, names):
        with warnings.catch_warnings():  # torch 2.10+ warns about slicing flattened dims from the root mesh
            warnings.filterwarnings("ignore", message="Slicing a flattened dim")
            return self.world[names]

