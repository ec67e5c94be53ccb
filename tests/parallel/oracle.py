"""The single-process side of the multi-device equality tests: one small model every strategy is checked on, the
global batch, the single-process loss and gradients, and the gathered gradients of a parallelized model.

The model: MLA with a query LoRA, 4 layers (the first dense), DeepSeekMoE with 8 routed experts in 4 groups
(group-limited routing keeps 2) plus a shared expert, MTP depth 1, the LM head tied to the embedding (the tiny
preset's choices), O(1) random weights (`tests.reference_utils.randomize_`) with random correction biases.
"""

from __future__ import annotations

import torch

from reference import Model, ModelConfig
from tests.reference_utils import make_config, randomize_

TOL = 1e-5
"""The issue's bound: losses and every gradient of a parallel run equal the single-process run's within 1e-5
(float32, absolute)."""


def parallel_config(**overrides) -> ModelConfig:
    """The equality tests' model config (module docstring); ``overrides``: ``ModelConfig`` fields."""
    base = dict(q_lora_rank=12, num_hidden_layers=4, first_k_dense_replace=1, n_group=4, topk_group=2,
                num_nextn_predict_layers=1, tie_word_embeddings=True, num_attention_heads=4)
    merged = {**base, **overrides}
    return make_config(merged.pop("attention_type", "mla"), **merged)


def parallel_model(seed: int = 0, **overrides) -> Model:
    """A `Model` of `parallel_config` with O(1) random weights drawn from ``seed``, in train mode."""
    torch.manual_seed(seed)
    model = randomize_(Model(parallel_config(**overrides)), router_bias=0.05)
    return model.train()


def global_batch(cfg: ModelConfig, batch: int = 4, seq: int = 16, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, targets)`` (batch, seq) int64 drawn from ``seed``: the global batch every rank slices."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=g)
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()


def reference_step(model: Model, ids: torch.Tensor, targets: torch.Tensor, mtp_weight: float = 0.3):
    """One forward and backward of ``model.loss`` on the whole batch in this process: ``(loss, grads)``, the loss a
    float and the gradients by parameter name (tied weights once, under their first name)."""
    model.zero_grad(set_to_none=True)
    out = model.loss(ids, targets, mtp_weight=mtp_weight)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(out.loss.detach()), grads


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """``t`` whole: a DTensor gathered (``full_tensor()``), a plain tensor as it is."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def full_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The gradients of a parallelized ``model`` gathered whole, by parameter name (collective: every rank of the
    parameters' meshes must call it)."""
    return {n: full_tensor(p.grad).detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def max_error(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> tuple[float, str]:
    """The largest absolute difference between two dicts of tensors and the name where it is; raises
    ``AssertionError`` when their names or shapes differ."""
    assert set(got) == set(want), f"names differ: only parallel {sorted(set(got) - set(want))}, only single " \
                                  f"{sorted(set(want) - set(got))}"
    worst, where = 0.0, ""
    for n, w in want.items():
        assert got[n].shape == w.shape, f"{n}: shape {tuple(got[n].shape)}, expected {tuple(w.shape)}"
        e = float((got[n].double() - w.double()).abs().max()) if w.numel() else 0.0
        if e > worst or not where:
            worst, where = e, n
    return worst, where
