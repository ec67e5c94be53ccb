"""Expert parallelism (EP) for the routed experts of DeepSeekMoE and the standard MoE.

Each of the ``ep`` ranks of a 1-D mesh holds ``E / ep`` whole experts (rank ``r``: experts ``[r E/ep, (r+1) E/ep)``),
as DTensors ``Shard(0)`` of the stacked ``gate_proj``/``up_proj``/``down_proj``; the router, the shared experts and
everything else stay plain, replicated parameters. Tokens travel to the experts with ``all_to_all_single`` (GShard,
Lepikhin et al. 2020; DeepSeek-V3 report section 3.2.2), with DeepSeek-V3's node-limited dispatch (report sections
2.1.2 and 3.2.2): a token goes to a rank at most once, whatever the number of its experts there. One row per
(token, destination rank) carries the token's hidden state and its (local expert, weight) pairs on that rank; the
destination returns one row, the weighted sum of those experts' outputs, and the source adds the returned rows:

1. the source counts its rows and (token, expert) pairs per destination; one plain ``all_to_all_single`` of these
   counts (a small int tensor) tells every rank what it receives, and one ``tolist`` brings the split sizes to the
   host (the only host sync: ``all_to_all_single`` takes its splits as Python lists);
2. the rows (hidden state and the K weights, differentiable) go with
   ``torch.distributed._functional_collectives.all_to_all_single_autograd``, the local expert ids (-1 where the
   expert is elsewhere) with a plain ``all_to_all_single``;
3. the destination sorts the received pairs by local expert and runs the experts' own ``grouped_swiglu`` on its
   local weight shards (the single-process per-expert math), weights and sums them per row;
4. the rows come back with ``all_to_all_single_autograd`` (splits swapped), and the source adds them per token.

With group-limited routing (``n_group``, ``topk_group``) the expert groups are contiguous blocks of experts, so with
``n_group`` a multiple of ``ep`` each rank holds whole groups and a token reaches at most ``topk_group`` ranks; with
``ep`` a multiple of ``n_group`` at most ``topk_group * ep / n_group`` (`dispatch_volume` counts it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd

from dsfs.errors import ConfigError
from reference.moe import Experts, expert_counts

EXPERT_PARAMS = ("gate_proj", "up_proj", "down_proj")
"""The routed experts' stacked parameters that EP shards on dim 0 (the expert dimension)."""


def apply_ep(model: nn.Module, ep_mesh) -> None:
    """Shard the routed experts of every MoE layer of ``model`` (``model.moe_layers()``: DeepSeekMoE and the
    standard MoE, main and MTP layers) over the 1-D ``DeviceMesh`` ``ep_mesh``, in place.

    Each ``experts.gate_proj``/``up_proj``/``down_proj`` (E, ...) becomes an ``nn.Parameter`` holding a DTensor
    ``Shard(0)`` on ``ep_mesh`` (``torch.distributed.tensor.distribute_tensor``: rank 0's values, scattered; the
    global shape and the parameter names unchanged, so ``torch.distributed.checkpoint`` reshards them); rank ``r``
    holds experts ``[r E/ep, (r+1) E/ep)``. The experts' class becomes a subclass with the EP forward (module
    docstring) that keeps ``Experts.forward``'s semantics ``y[n] = sum_k w[n,k] expert_{idx[n,k]}(x[n])`` for this
    rank's tokens and the class's own ``grouped_swiglu`` (apply FP8 training's class switch before EP, not after).
    Every rank of ``ep_mesh`` must run each MoE layer's forward and backward together (collectives).

    Gradient contract (the trainer relies on it). The loss on each rank is the mean over its own tokens; the
    ``D`` data ranks (mesh ``"dp_cp"``, of which the ``ep`` ranks are a part) must end with the gradient of the mean
    of their losses:

    - non-expert parameters (router, shared experts, attention, ...) are plain: each rank's gradient is that of its
      own loss; average them over ``"dp_cp"`` (FSDP2 over ``"dp_shard_cp"`` with its default divide factor);
    - expert parameters: the ``all_to_all`` backward already sums into each rank's expert shard the gradients of
      every ``ep`` rank's tokens routed to it, so the shard's gradient is a sum over the ``ep`` group; sum it over
      the other expert replicas (``"dp_shard_mod_ep"``, and ``"dp_replicate"``) and divide by ``D``, not by the
      size of that mesh: FSDP2 on the experts with ``set_gradient_divide_factor(D)`` (without FSDP: divide by
      ``ep`` when ``ep == D``).

    ``expert_load`` still counts this rank's tokens for all E experts (the router is replicated): all-reduce (sum) it
    over ``"dp_cp"`` before ``update_bias``. Raises `ConfigError` when ``ep_mesh`` is not 1-D, when a layer's
    expert count is not divisible by its size, or when EP was already applied.
    """
    if ep_mesh.ndim != 1:
        raise ConfigError(f"apply_ep: expected a 1-D expert-parallel mesh, got {ep_mesh.ndim} dimensions")
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    ep = ep_mesh.size()
    for moe in model.moe_layers():
        experts = moe.experts
        if experts.num_experts % ep:
            raise ConfigError(f"apply_ep: n_routed_experts = {experts.num_experts} is not divisible by ep {ep}")
        for name in EXPERT_PARAMS:
            p = getattr(experts, name)
            if isinstance(p, DTensor):
                raise ConfigError(f"apply_ep: experts.{name} is already a DTensor; expected plain experts (apply EP "
                                  "once, before FSDP)")
            dt = distribute_tensor(p.detach(), ep_mesh, [Shard(0)])
            experts.register_parameter(name, nn.Parameter(dt, requires_grad=p.requires_grad))
        experts.ep_group = ep_mesh.get_group()
        experts.__class__ = _ep_class(type(experts))


class ExpertParallelMixin:
    """Mixin put before an `Experts` class by `apply_ep`: the forward dispatches tokens to the ranks holding their
    experts (`ep_experts_forward` over ``self.ep_group``)."""

    ep_group = None

    def forward(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor) -> torch.Tensor:
        """``Experts.forward``'s arguments and result for this rank's tokens (`ep_experts_forward`)."""
        return ep_experts_forward(self, x, topk_idx, topk_weight, self.ep_group)


_EP_CLASSES: dict[type, type] = {}


def _ep_class(cls: type) -> type:
    """``EP<cls>``: `ExpertParallelMixin` before ``cls``, made once per experts class (``reference``'s, the CUDA
    runtime's, FP8 training's)."""
    if issubclass(cls, ExpertParallelMixin):
        return cls
    if cls not in _EP_CLASSES:
        doc = f"`{cls.__module__}.{cls.__name__}` under `apply_ep`."
        attrs = {"__module__": __name__, "__doc__": doc}
        _EP_CLASSES[cls] = type(f"EP{cls.__name__}", (ExpertParallelMixin, cls), attrs)
    return _EP_CLASSES[cls]


def _local_view(experts: Experts) -> Experts:
    """A shallow copy of ``experts`` whose ``gate_proj``/``up_proj``/``down_proj`` are this rank's shards (the
    DTensors' ``to_local()``, differentiable) and ``num_experts`` the local count: its ``grouped_swiglu`` runs the
    class's per-expert math on the local experts. The module itself is left untouched."""
    from torch.distributed.tensor import DTensor

    params = {n: (p.to_local() if isinstance(p, DTensor) else p) for n, p in experts._parameters.items()}
    view = object.__new__(type(experts))
    view.__dict__.update(experts.__dict__)
    view.__dict__["_parameters"] = params
    view.__dict__["num_experts"] = params["gate_proj"].shape[0]
    return view


def ep_experts_forward(experts: Experts, x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor,
                       group) -> torch.Tensor:
    """The routed experts under EP over process group ``group`` (size P; this rank holds experts ``[r L, (r+1) L)``,
    ``L = E / P``, as ``experts``' Shard(0) DTensors or plain (L, ...) tensors).

    ``x`` (N, H) this rank's tokens; ``topk_idx`` (N, K) int64 global expert ids (distinct per token, as routers
    give); ``topk_weight`` (N, K). Returns (N, H) in ``x.dtype``: ``y[n] = sum_k topk_weight[n,k]
    expert_{topk_idx[n,k]}(x[n])``, differentiable w.r.t. ``x``, ``topk_weight`` and every rank's expert weights
    (a rank's expert gradient sums the contributions of all ranks' tokens). Dispatch per (token, destination rank)
    (module docstring); the weights travel in ``x.dtype``. Collective: every rank of ``group`` must call it."""
    p = dist.get_world_size(group)
    n, k = topk_idx.shape
    h = x.shape[1]
    local_n = experts.num_experts // p
    dest = topk_idx // local_n  # (N, K) destination rank of each pair
    hit = torch.zeros(p, n, dtype=torch.bool, device=x.device).scatter_(0, dest.t(), True)  # (P, N)
    send = torch.stack([hit.sum(1), expert_counts(dest, p)], 1).reshape(-1)  # rows, pairs per destination
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    counts = torch.stack([send, recv]).view(2, p, 2).tolist()  # the host sync: split sizes for all_to_all_single
    send_rows = [c[0] for c in counts[0]]
    recv_rows = [c[0] for c in counts[1]]
    recv_pairs = sum(c[1] for c in counts[1])

    # rows in (destination, token) order, without a data-dependent output size: hits sort first
    order = torch.argsort((~hit).reshape(-1).to(torch.uint8), stable=True)[:sum(send_rows)]
    token, row_dest = order % n, order // n
    on_dest = dest.index_select(0, token) == row_dest[:, None]  # (S, K) the pairs this row carries
    ids = torch.where(on_dest, topk_idx.index_select(0, token) - row_dest[:, None] * local_n, -1)
    w = torch.where(on_dest, topk_weight.index_select(0, token), 0)
    payload = torch.cat([x.index_select(0, token), w.to(x.dtype)], 1)
    recv_ids = ids.new_empty(sum(recv_rows), k)
    dist.all_to_all_single(recv_ids, ids, recv_rows, send_rows, group=group)
    got = all_to_all_single_autograd(payload, recv_rows, send_rows, group)
    out = _combine_local(_local_view(experts), got[:, :h], got[:, h:], recv_ids, recv_pairs)
    back = all_to_all_single_autograd(out, send_rows, recv_rows, group)
    return x.new_zeros(n, h).index_add(0, token, back.to(x.dtype))


def _combine_local(view: Experts, xr: torch.Tensor, wr: torch.Tensor, ids: torch.Tensor, pairs: int) -> torch.Tensor:
    """Per received row ``j``: ``sum_k wr[j,k] expert_{ids[j,k]}(xr[j])`` over its slots with ``ids >= 0``
    (``pairs`` of them in all), through ``view.grouped_swiglu`` on the rows sorted by local expert. (R, H)."""
    r, k = ids.shape
    key = torch.where(ids >= 0, ids, view.num_experts).reshape(-1)  # unused slots sort last
    order = torch.argsort(key, stable=True)[:pairs]
    row = order // k
    counts = expert_counts(key, view.num_experts + 1)[:-1]
    ys = view.grouped_swiglu(xr.index_select(0, row), counts)
    ys = ys * wr.reshape(-1)[order, None].to(ys.dtype)
    return xr.new_zeros(r, xr.shape[1]).index_add(0, row, ys.to(xr.dtype))


@dataclass(frozen=True)
class DispatchVolume:
    """What one MoE layer's EP dispatch moves for a routing (`dispatch_volume`): ``rows`` (token, rank) rows with
    the node-limited dedupe and ``pairs`` (token, expert) rows without it; ``bytes`` and ``pair_bytes`` the bytes
    through both ``all_to_all`` (dispatch and combine) for each; ``max_ranks`` the most ranks one token reaches."""

    rows: int
    pairs: int
    bytes: int
    pair_bytes: int
    max_ranks: int


def dispatch_volume(topk_idx: torch.Tensor, num_experts: int, ep: int, hidden_size: int,
                    element_size: int = 2) -> DispatchVolume:
    """Rows and bytes of the EP dispatch of a routing ``topk_idx`` (N, K) (global expert ids, distinct per token)
    over ``ep`` ranks holding ``num_experts / ep`` contiguous experts each (rows to the sending rank itself counted:
    the all_to_all's whole volume).

    Deduped (this module's dispatch, DeepSeek-V3's node-limited routing, report section 3.2.2): one row per
    (token, rank), dispatch ``hidden_size * element_size`` bytes plus K weights (``element_size``) and K int64
    local ids, combine ``hidden_size * element_size``. Without the dedupe: one row per (token, expert) pair,
    ``hidden_size * element_size`` each way (weights applied at the source, ids implied by per-expert counts).
    Raises `ConfigError` for an ``ep`` that does not divide ``num_experts``."""
    if ep < 1 or num_experts % ep:
        raise ConfigError(f"dispatch_volume: ep={ep} must divide num_experts={num_experts}")
    n, k = topk_idx.shape
    dest = topk_idx // (num_experts // ep)
    hit = torch.zeros(n, ep, dtype=torch.bool, device=topk_idx.device).scatter_(1, dest, True)
    per_token = hit.sum(1)
    rows, pairs = int(per_token.sum()), n * k
    act = hidden_size * element_size
    return DispatchVolume(rows=rows, pairs=pairs, bytes=rows * (2 * act + k * (element_size + 8)),
                          pair_bytes=pairs * 2 * act, max_ranks=int(per_token.max()) if n else 0)
