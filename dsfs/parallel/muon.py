"""Muon when the parameters are sharded: `DistributedMuon` orthogonalizes whole matrices, each on one rank.

Newton-Schulz needs each whole matrix, and under FSDP or TP a rank holds a slice of it. As in Moonlight's
distributed Muon (Liu et al. 2025, "Muon is Scalable for LLM Training", sec. 2.3, Algorithm 2), the momentum-updated
matrix is gathered from its shards; here the work is then split: each matrix is assigned to one rank of its mesh
(greedily by size, so every rank gets about the same number of Newton-Schulz FLOPs), that rank alone orthogonalizes
it, and the result is broadcast and each rank keeps its own slice. All ranks first gather everything they own, then
all orthogonalize at once, then the results are broadcast, so the ranks work in parallel.

A stack of expert matrices ``(E, A, B)`` split along its expert dimension only (expert parallelism, FSDP's
``Shard(0)``) already holds whole matrices on every rank: it is orthogonalized where it lies, with no
communication. Replicated (plain) tensors are orthogonalized locally too (every rank has them whole, e.g. under
ZeRO-1, where ``ZeroRedundancyOptimizer`` gives each rank whole parameters to update already).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from reference.muon import Muon, zeropower_via_newtonschulz5


def _whole_matrices_local(u) -> bool:
    """Whether every shard of the DTensor ``u`` holds whole matrices: only its leading (stack) dimension is split,
    and ``u`` is a stack (``ndim > 2``)."""
    from torch.distributed.tensor import Replicate, Shard

    return u.ndim > 2 and all(isinstance(pl, Replicate) or (isinstance(pl, Shard) and pl.dim == 0)
                              for pl in u.placements)


class DistributedMuon(Muon):
    """`reference.muon.Muon` whose `orthogonalize` runs on sharded (DTensor) updates (module docstring); the update
    is the one-process Muon's to float rounding. ``ns_matrices``: the number of (stacks of) matrices this rank
    orthogonalized in the last step (tests check the work is split)."""

    ns_matrices = 0

    def orthogonalize(self, updates: list[Tensor], ns_steps: int) -> list[Tensor]:
        from torch.distributed.tensor import DTensor, Replicate

        out: list[Tensor | None] = [None] * len(updates)
        gathered: dict[int, tuple] = {}  # index -> (mesh, global ranks, owner, whole update or None)
        load: dict[int, int] = {}  # FLOP-ish load per global rank, for the greedy assignment
        self.ns_matrices = 0
        for i, u in enumerate(updates):
            if not isinstance(u, DTensor):
                out[i] = zeropower_via_newtonschulz5(u, ns_steps)
                self.ns_matrices += 1
            elif _whole_matrices_local(u):
                o = zeropower_via_newtonschulz5(u.to_local(), ns_steps)
                out[i] = DTensor.from_local(o, u.device_mesh, u.placements, run_check=False, shape=u.shape,
                                            stride=u.stride())
                self.ns_matrices += 1
            else:
                ranks = u.device_mesh.mesh.flatten().tolist()
                owner = min(ranks, key=lambda r: (load.get(r, 0), r))
                load[owner] = load.get(owner, 0) + u.numel()
                whole = u.full_tensor()  # the gather every rank of the mesh joins
                gathered[i] = (u.device_mesh, ranks, owner, whole if owner == dist.get_rank() else None)
        done = {}
        for i, (_, _, _, whole) in gathered.items():  # this rank's share, while the others do theirs
            if whole is not None:
                done[i] = zeropower_via_newtonschulz5(whole, ns_steps).contiguous()  # broadcast sends memory order
                self.ns_matrices += 1
        for i, (mesh, _, owner, _) in gathered.items():
            u = updates[i]
            full = done[i] if i in done else torch.empty(u.shape, dtype=torch.float32, device=u.to_local().device)
            dist.broadcast(full, src=owner, group=_group_of(mesh))
            rep = DTensor.from_local(full, mesh, [Replicate()] * mesh.ndim, run_check=False)
            out[i] = rep.redistribute(mesh, u.placements)  # each rank keeps its slice: no communication
        return out


def _group_of(mesh):
    """The process group of all the ranks of ``mesh`` (a multi-dimensional mesh flattened: DeviceMesh keeps the
    flattened mesh, so the group is made once)."""
    import warnings

    if mesh.ndim == 1:
        return mesh.get_group()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Slicing a flattened dim")
        return mesh._flatten().get_group()
