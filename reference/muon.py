"""Muon with an auxiliary AdamW: the optimizer of Moonlight / Kimi K2 (DeepSeek-V3-architecture MoE models).

Muon (Jordan et al. 2024, "Muon: An optimizer for hidden layers in neural networks") updates a weight matrix with
the orthogonalized Nesterov momentum of its gradient: Newton-Schulz iterations map the momentum ``U = U S V^T`` to
about ``U V^T`` (all singular values near 1). Moonlight (Liu et al. 2025, "Muon is Scalable for LLM Training",
sec. 2.2, Algorithm 1) adds decoupled weight decay and scales the update by ``0.2 * sqrt(max(A, B))`` for an
``A x B`` matrix, so that its RMS matches AdamW's typical update RMS and one learning rate (and schedule) serves
both; embeddings, the LM head, norms and other vectors stay with AdamW. This is PyTorch's
``torch.optim.Muon(adjust_lr_fn="match_rms_adamw")`` (whose momentum form this follows) extended to what a MoE needs:

- stacked expert weights ``(E, A, B)``: each of the ``E`` matrices is orthogonalized on its own (one batched
  Newton-Schulz over the stack), as E separate ``A x B`` matrices would be;
- the iteration runs in float32 (``torch.optim.Muon`` casts to bfloat16, which CPUs without bf16 units run
  slowly and which is coarser than a reference needs);
- parameter groups with ``use_muon=False`` are updated by AdamW (``torch.optim.adamw.adamw``, PyTorch's own
  AdamW step, fused where ``fused=True``), as in Jordan's ``MuonWithAuxAdam``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor
from torch.optim.adamw import adamw

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # Jordan's quintic: maximal slope at 0, converges in 5 steps
MATCH_RMS_ADAMW = 0.2  # Moonlight's update-RMS scale


def zeropower_via_newtonschulz5(g: Tensor, steps: int = 5, eps: float = 1e-7) -> Tensor:
    """Orthogonalize the trailing two dimensions of ``g`` (..., A, B): about ``U V^T`` of each matrix's SVD
    ``U S V^T`` (Jordan's quintic Newton-Schulz; singular values land in roughly [0.7, 1.2], not exactly 1,
    which does not hurt training). Each matrix is first scaled to Frobenius norm 1 (so spectral norm <= 1; an
    all-zero matrix stays zero), then ``steps`` iterations ``X <- a X + (b XX^T + c (XX^T)^2) X`` run on the wide
    orientation (``A <= B``). Returns float32 of ``g``'s shape. Raises ``ValueError`` for ``g.ndim < 2`` or
    ``steps < 1``."""
    if g.ndim < 2:
        raise ValueError(f"Newton-Schulz orthogonalization needs a matrix (..., A, B), got shape {tuple(g.shape)}")
    if steps < 1:
        raise ValueError(f"steps={steps}: expected >= 1")
    a, b, c = NS_COEFFICIENTS
    x = g.float() if g.ndim <= 3 else g.float().reshape(-1, *g.shape[-2:])
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    mm = torch.addmm if x.ndim == 2 else torch.baddbmm  # fused multiply-adds: ~15% faster than separate ops
    for _ in range(steps):
        gram = x @ x.mT
        x = mm(x, mm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return (x.mT if tall else x).reshape(g.shape)


def _check_hyperparameters(g: dict) -> None:
    if not g["lr"] > 0:
        raise ValueError(f"lr={g['lr']}: expected > 0")
    if not 0.0 <= g["momentum"] < 1.0:
        raise ValueError(f"momentum={g['momentum']}: expected in [0, 1)")
    if not all(0.0 <= b < 1.0 for b in g["betas"]):
        raise ValueError(f"betas={g['betas']}: expected each in [0, 1)")
    if g["weight_decay"] < 0 or g["eps"] < 0 or g["ns_steps"] < 1:
        raise ValueError(f"weight_decay={g['weight_decay']}, eps={g['eps']}, ns_steps={g['ns_steps']}: expected "
                         ">= 0, >= 0, >= 1")


class Muon(torch.optim.Optimizer):
    """Muon for the parameter groups with ``use_muon=True``, AdamW for the others (module docstring).

    Muon group, per parameter ``W`` of shape (..., A, B) (a matrix, or a stack of them as MoE experts hold):
    ``M <- momentum * M + (1 - momentum) * G``; ``U = (1 - momentum) * G + momentum * M`` (Nesterov; ``U = M``
    without); ``W <- W * (1 - lr * weight_decay) - lr * 0.2 * sqrt(max(A, B)) * NS5(U)``, NS5 per matrix
    (`zeropower_via_newtonschulz5`, ``ns_steps``). State: ``momentum_buffer`` (shape of ``W``).

    AdamW group (``use_muon=False``): ``torch.optim.AdamW``'s update with the group's ``betas``, ``eps`` and
    ``weight_decay`` (bias-corrected, decoupled decay ``W * (1 - lr * weight_decay)``). State: ``step`` (float32
    scalar tensor), ``exp_avg``, ``exp_avg_sq``, the layout of ``torch.optim.AdamW``.

    ``params``: parameter groups (dicts with ``params`` and, optionally, ``use_muon`` and any hyperparameter); a
    group without ``use_muon`` is a Muon group. ``fused``: AdamW groups through PyTorch's fused kernel (all their
    parameters on CPU or CUDA). Raises ``ValueError`` for a Muon-group parameter with fewer than 2 dimensions, a
    complex or sparse one, or a hyperparameter out of range.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, weight_decay: float = 0.1, momentum: float = 0.95,
                 nesterov: bool = True, ns_steps: int = 5, betas: tuple[float, float] = (0.9, 0.95),
                 eps: float = 1e-8, fused: bool | None = None):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                        betas=betas, eps=eps, use_muon=True, fused=fused)
        _check_hyperparameters(defaults)
        super().__init__(params, defaults)
        for g in self.param_groups:
            _check_hyperparameters(g)  # a group may override any of them
            for p in g["params"]:
                if p.is_complex() or p.is_sparse:
                    raise ValueError(f"Muon: complex or sparse parameter of shape {tuple(p.shape)} not supported")
                if g["use_muon"] and p.ndim < 2:
                    raise ValueError(f"Muon group holds a parameter of shape {tuple(p.shape)}: Muon updates "
                                     "matrices (..., A, B); put vectors (norms, biases) in a use_muon=False group")

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter with a gradient (module and class docstrings). ``closure``: re-evaluates
        the loss (returned), as for any ``torch.optim`` optimizer."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for g in self.param_groups:
            (self._muon_group if g["use_muon"] else self._adamw_group)(g)
        return loss

    def _muon_group(self, g: dict) -> None:
        lr, mu = g["lr"], g["momentum"]
        params, updates = [], []
        for p in g["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            buf = state["momentum_buffer"]
            buf.lerp_(p.grad, 1 - mu)
            params.append(p)
            updates.append(p.grad.lerp(buf, mu) if g["nesterov"] else buf)
        for p, o in zip(params, self.orthogonalize(updates, g["ns_steps"]), strict=True):
            scale = MATCH_RMS_ADAMW * math.sqrt(max(p.shape[-2], p.shape[-1]))
            p.mul_(1 - lr * g["weight_decay"])
            p.add_(o.to(p.dtype), alpha=-lr * scale)

    def orthogonalize(self, updates: list[Tensor], ns_steps: int) -> list[Tensor]:
        """`zeropower_via_newtonschulz5` of each update (a matrix or a stack of them), float32. The step's one
        whole-matrix operation: a sharded optimizer overrides it (`dsfs.parallel.muon.DistributedMuon`)."""
        return [zeropower_via_newtonschulz5(u, ns_steps) for u in updates]

    def _adamw_group(self, g: dict) -> None:
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p in g["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device if g["fused"] else None)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        if params:
            beta1, beta2 = g["betas"]
            adamw(params, grads, exp_avgs, exp_avg_sqs, [], steps, fused=g["fused"],
                  amsgrad=False, beta1=beta1, beta2=beta2, lr=g["lr"], weight_decay=g["weight_decay"],
                  eps=g["eps"], maximize=False)
