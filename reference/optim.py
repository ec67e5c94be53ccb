"""Which optimizer updates which parameter of a `reference.Model`: a fact about the model, as nanoGPT's
``configure_optimizers`` makes it one, so every trainer (``dsfs train``, the MLX trainer, the post-training
stages) splits the parameters the same way.

`param_groups` is the split (the group order and contents fix the layout of every saved optimizer state, so exact
resume of existing checkpoints depends on them), `make_optimizer` the torch optimizer over it (AdamW, or
`reference.muon.Muon`), `optimizer_groups` the same groups by parameter name for a backend without torch modules.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig
from .model import Model
from .muon import Muon

OPTIMIZERS = ("adamw", "muon")
BETAS = (0.9, 0.95)
MOMENTS = ("exp_avg", "exp_avg_sq", "momentum_buffer")
"""The optimizer state tensors that `store_moments_in` keeps in a low-precision dtype (AdamW's first and second
moments, Muon's momentum)."""


def param_groups(model: nn.Module, weight_decay: float, optimizer: str = "adamw") -> list[dict]:
    """The optimizer's parameter groups of a `reference.Model` (or a model with its ``lm_head`` and ``moe_layers()``).

    ``"adamw"``: two groups, matrices (parameters with ``ndim >= 2`` other than embeddings, so also stacked expert
    weights and the router) get ``weight_decay``; norms, biases and embeddings (and an LM head tied to them) get
    none. ``"muon"`` (`reference.muon.Muon`): the hidden matrices (attention and MLP projections, stacked experts,
    the MTP ``eh_proj``) form a first group with ``use_muon=True``; the LM head (AdamW with decay) and the no-decay
    group above stay with AdamW (``use_muon=False``), as in Moonlight (Liu et al. 2025, sec. 2.2). The routers stay
    with AdamW too, this project's choice: a router's (E, H) rows score experts one by one rather than form a hidden
    linear map; so do DeepSeek-V4's compressor position biases (V4 report section 2.4: AdamW for biases and gating
    factors; its mHC projections ``fn`` are matrices and take Muon). Parameters appear in ``model.parameters()``
    order, shared (tied) ones once, frozen ones (``requires_grad=False``) not at all; a group with no parameter (a
    pipeline stage without head or router) is left out. Raises ``ValueError`` for another ``optimizer``."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer={optimizer!r}: expected one of {', '.join(OPTIMIZERS)}")
    emb = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    head = getattr(model, "lm_head", None)  # a pipeline stage before the last holds no head
    adam_only = ({id(head.weight)} if head is not None else set()) | {id(m.gate.weight) for m in model.moe_layers()}
    adam_only |= {id(p) for n, p in model.named_parameters() if n.endswith("position_bias")}  # V4's compressor biases
    muon, decay, no_decay = [], [], []
    for p in model.parameters():  # shared (tied) parameters are listed once
        if not p.requires_grad:
            continue
        if p.ndim < 2 or id(p) in emb:
            no_decay.append(p)
        elif optimizer == "muon" and id(p) not in adam_only:
            muon.append(p)
        else:
            decay.append(p)
    if optimizer == "adamw":
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    else:
        groups = [{"params": muon, "weight_decay": weight_decay, "use_muon": True},
                  {"params": decay, "weight_decay": weight_decay, "use_muon": False},
                  {"params": no_decay, "weight_decay": 0.0, "use_muon": False}]
    return [g for g in groups if g["params"]]  # a pipeline stage may hold none of a kind (no head, no router)


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, optimizer: str = "adamw",
                   moment_dtype: torch.dtype | None = None, muon_cls: type[Muon] = Muon) -> torch.optim.Optimizer:
    """The training optimizer over `param_groups` (betas ``BETAS``): ``"adamw"``, ``torch.optim.AdamW`` with
    decoupled weight decay on matrices only; ``"muon"``, `reference.muon.Muon` (Muon on the hidden matrices,
    AdamW on the rest, one learning rate). AdamW runs PyTorch's fused implementation (one kernel over all
    parameters) when they all live on CPU or CUDA and are all DTensors or all plain tensors. ``moment_dtype``: keep
    the moments in this dtype between steps (`store_moments_in`; ``torch.bfloat16`` in FP8 training, DeepSeek-V3
    report section 3.3.3). ``muon_cls``: the Muon implementation (a sharded run's is
    `dsfs.parallel.muon.DistributedMuon`). Raises ``ValueError`` for another ``optimizer``."""
    fused = all(p.device.type in ("cpu", "cuda") for p in model.parameters()) or None
    if _mixes_dtensors(model):
        fused = False
    groups = param_groups(model, weight_decay, optimizer)
    if optimizer == "muon":
        opt = muon_cls(groups, lr=lr, betas=BETAS, fused=fused)
    else:
        opt = torch.optim.AdamW(groups, lr=lr, betas=BETAS, fused=fused)
    if moment_dtype is not None:
        store_moments_in(opt, moment_dtype)
    return opt


def _mixes_dtensors(model: nn.Module) -> bool:
    """Whether ``model`` holds both DTensor and plain parameters (tensor parallelism without FSDP: the fused AdamW
    kernel takes one kind per call, so such a model steps parameter by parameter)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch build without distributed
        return False
    return len({isinstance(p, DTensor) for p in model.parameters()}) > 1


def store_moments_in(opt: torch.optim.Optimizer, dtype: torch.dtype) -> torch.optim.Optimizer:
    """Keep ``opt``'s moments (`MOMENTS`: AdamW's ``exp_avg``/``exp_avg_sq``, Muon's ``momentum_buffer``) in
    ``dtype`` (e.g. ``torch.bfloat16``) between steps, as DeepSeek-V3 tracks AdamW's moments in BF16 (report section
    3.3.3, "low-precision optimizer states"): a step pre-hook widens them to their parameter's dtype, the update runs
    at full precision, and a post-hook rounds them back (round to nearest). The saving is in the memory held between
    steps, through forward and backward where activations peak; during ``step()`` itself the moments are widened all
    at once (the fused AdamW kernel updates every parameter in one call), so the step's own peak is fp32 AdamW's.
    The parameters (master weights) and gradients keep their dtype. Saved states hold the ``dtype`` values
    (``load_state_dict`` casts them to the parameter's dtype exactly; the next step rounds them back), so a resumed
    run continues bit for bit. Returns ``opt``."""

    def widen(o, args, kwargs):
        for p, st in o.state.items():
            for k in MOMENTS:
                if k in st and st[k].dtype != p.dtype:
                    st[k] = st[k].to(p.dtype)

    def narrow(o, args, kwargs):
        for st in o.state.values():
            for k in MOMENTS:
                if k in st:
                    st[k] = st[k].to(dtype)

    opt.register_step_pre_hook(widen)
    opt.register_step_post_hook(narrow)
    opt.moment_dtype = dtype
    return opt


def optimizer_groups(cfg: ModelConfig, lr: float, weight_decay: float, optimizer: str = "adamw") -> list[dict]:
    """The reference optimizer's ``state_dict()["param_groups"]`` for a model of ``cfg`` (hyperparameters of
    `make_optimizer`), with the parameters' ``named_parameters`` names in ``params`` in place of their indices:
    what a non-torch backend needs to build the same optimizer and to read and write its state in the reference's
    layout. Built on the meta device (no memory, no RNG draws). Raises ``ValueError`` for another ``optimizer``."""
    with torch.device("meta"):
        ref = Model(cfg)
    names = {id(p): n for n, p in ref.named_parameters()}
    opt = make_optimizer(ref, lr, weight_decay, optimizer)
    return [{**g, "params": [names[id(p)] for p in pg["params"]]}
            for g, pg in zip(opt.state_dict()["param_groups"], opt.param_groups, strict=True)]
