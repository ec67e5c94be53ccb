"""Data parallelism over the ``dp_replicate x dp_shard (x cp)`` ranks: FSDP2 ``fully_shard`` (ZeRO-3 and ZeRO-2,
HSDP) or replicated parameters with a sharded optimizer state (ZeRO-1).

ZeRO stages (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion Parameter Models"):

- 3: parameters, gradients and optimizer state sharded over ``dp_shard_cp``; each decoder layer's parameters are
  all-gathered before its forward and again before its backward, and freed after (``reshard_after_forward=True``);
  gradients are reduce-scattered.
- 2: as 3 with ``reshard_after_forward=False``: a layer's gathered parameters stay from its forward to its backward
  (one all-gather per step instead of two, at the memory of the unsharded parameters of the layers in flight).
- 1: parameters and gradients replicated (gradients all-reduced, `replicate`, PyTorch's composable DDP), the
  optimizer state sharded by parameter (``torch.distributed.optim.ZeroRedundancyOptimizer``): every rank updates
  the whole matrices it owns and broadcasts them, which is also how Muon splits its Newton-Schulz work over ranks
  (Moonlight's distributed Muon is built on ZeRO-1).

HSDP (``dp_replicate > 1``): ``fully_shard`` over the 2-D mesh ``(dp_replicate, dp_shard_cp)``: sharded within a
replica group, gradients all-reduced across groups. Routed experts under expert parallelism are DTensors on the
``ep`` mesh already (`dsfs.parallel.ep`); FSDP shards them further over ``dp_shard_mod_ep`` (the data ranks outside
EP) and divides their gradients by the whole ``dp_cp`` size, because their gradients already sum the contributions
of every EP rank's tokens.
"""

from __future__ import annotations

from torch import nn

from dsfs.parallel.layout import Layout


def fsdp_mesh(layout: Layout, experts: bool = False):
    """The mesh ``fully_shard`` uses: ``dp_shard_cp`` (``dp_shard_mod_ep`` for routed experts under EP), with
    ``dp_replicate`` in front for HSDP."""
    shard = "dp_shard_mod_ep" if experts else "dp_shard_cp"
    if layout.dims.dp_replicate > 1:
        return layout.mesh["dp_replicate", shard]
    return layout.mesh[shard]


def blocks(model: nn.Module) -> list[nn.Module]:
    """The decoder layers and MTP layers of a `reference.Model` (or of a pipeline stage of one, whose absent layers
    hold no parameters), the units FSDP gathers one at a time."""
    layers = [*getattr(getattr(model, "model", None), "layers", []), *getattr(model, "mtp", [])]
    return [m for m in layers if any(True for _ in m.parameters())]


def apply_fsdp(model: nn.Module, layout: Layout, zero: int = 3) -> nn.Module:
    """Shard ``model`` (a `reference.Model`, ``runtime_cuda.Model`` or a pipeline stage of one, after TP and EP are
    applied) over the data-parallel ranks at ZeRO stage ``zero`` (3 or 2; module docstring), in place: each decoder
    and MTP layer is one ``fully_shard`` unit (its routed experts a unit of their own under EP), the rest (embedding,
    final norm, head) the root unit. Parameter names are unchanged; parameters and gradients become DTensors.
    Gradients are averaged over the ``dp_cp`` ranks (each rank's loss is the mean over its own tokens, every rank has
    as many). Returns ``model``."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    reshard = zero == 3
    mesh = fsdp_mesh(layout)
    for block in blocks(model):
        experts = getattr(getattr(block, "mlp", None), "experts", None)
        if layout.dims.ep > 1 and experts is not None:
            fully_shard(experts, mesh=fsdp_mesh(layout, experts=True), reshard_after_forward=reshard)
            experts.set_gradient_divide_factor(float(layout.size("dp_cp")))
        if hasattr(block, "shared_head"):  # an MTP layer: its output norm runs after the block's forward
            fully_shard(block.shared_head.norm, mesh=mesh, reshard_after_forward=reshard)
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard)
        if hasattr(block, "combine"):  # and its input projection before it
            register_fsdp_forward_method(block, "combine")
    # the root unit (embedding, final norm, head) stays gathered: the backward starts with it (torchtitan's choice)
    fully_shard(model, mesh=mesh, reshard_after_forward=False)
    if hasattr(model, "loss"):  # training's entry point (forward's hooks are FSDP's own)
        register_fsdp_forward_method(model, "loss")
    return model


class LossOf(nn.Module):
    """``forward(*args, **kwargs) = model.loss(*args, **kwargs)``: DDP synchronizes the gradients of what runs
    through its wrapped module's forward, and training runs ``loss``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        return self.model.loss(*args, **kwargs)


def apply_replicate(model: nn.Module, layout: Layout) -> nn.Module:
    """ZeRO-1's data parallelism: ``model``'s parameters replicated over the ``dp`` ranks and its gradients
    all-reduced (averaged) in backward by PyTorch's ``DistributedDataParallel``. Returns the DDP module whose forward
    is ``model.loss`` (`LossOf`); ``model`` keeps its parameter names."""
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(LossOf(model), device_mesh=layout.mesh["dp"])
