"""Validation loss: the fixed evaluation windows (`eval_starts`, `eval_batches`) and the one `evaluate`, used by
``dsfs eval`` (`dsfs.generate.evaluate_checkpoint`) and by every trainer's periodic evaluations.

A batch is a dict of CPU tensors, here ``{"input_ids": (B, T) int64, "targets": (B, T) int64}`` with
``targets[:, t] == input_ids[:, t + 1]`` inside the window: the same kind of batch the pretraining loop feeds
``Trainer.micro_step``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F

from dsfs.errors import DataError

Batch = dict[str, torch.Tensor]


def eval_starts(n_tokens: int, n_windows: int, seq_len: int) -> list[int]:
    """Start offsets of ``n_windows`` windows of ``seq_len + 1`` tokens spread evenly over ``n_tokens``
    (first at 0, last at ``n_tokens - seq_len - 1``); the same every call. Windows overlap when the split is
    short. Raises `DataError` when ``n_tokens < seq_len + 1``."""
    span = n_tokens - seq_len - 1
    if span < 0:
        raise DataError(f"only {n_tokens} tokens: too few for seq_len {seq_len} (need at least {seq_len + 1})")
    if n_windows == 1:
        return [0]
    return [i * span // (n_windows - 1) for i in range(n_windows)]


def eval_batches(tokens: np.ndarray, batch_size: int, seq_len: int, n_batches: int) -> list[Batch]:
    """``n_batches`` batches of ``batch_size`` windows of ``tokens`` at `eval_starts` (window ``i`` of batch ``b``
    is window ``b * batch_size + i``): ``{"input_ids", "targets"}``, (batch_size, seq_len) int64 CPU tensors each.
    Raises `DataError` when ``tokens`` is too short for ``seq_len``."""
    starts = eval_starts(len(tokens), n_batches * batch_size, seq_len)
    rows = np.stack([np.asarray(tokens[s : s + seq_len + 1]) for s in starts]).astype(np.int64)
    windows = torch.from_numpy(rows).reshape(n_batches, batch_size, seq_len + 1)
    return [{"input_ids": w[:, :-1].contiguous(), "targets": w[:, 1:].contiguous()} for w in windows]


def autocast(device: torch.device, precision: str = "auto"):
    """The autocast of a training ``precision`` (`dsfs.train_config.PRECISIONS`): bf16 autocast on CUDA for
    ``"auto"`` and ``"fp8"`` (the parts FP8 training leaves out of FP8 run in bf16 there), on any device for
    ``"bf16"``; a no-op context otherwise (``"fp32"``; CPU and MPS stay float32 under ``"auto"`` and ``"fp8"``)."""
    if precision == "bf16" or (device.type == "cuda" and precision in ("auto", "fp8")):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def torch_eval_loss(model: torch.nn.Module, batch: Batch, device: torch.device | None = None,
                    precision: str = "auto") -> float:
    """Mean next-token cross-entropy (nats/token) of a torch model's main head on one batch: ``F.cross_entropy``
    of ``model(input_ids)`` (float32 logits, under `autocast` of ``precision``: bf16 on CUDA by default) against
    ``targets``; MTP heads and balance losses are not counted. ``device``: where the batch goes (default: the
    model's)."""
    device = device or next(model.parameters()).device
    x, y = batch["input_ids"].to(device), batch["targets"].to(device)
    with autocast(device, precision):
        logits = model(x)
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten()).item()


def evaluate(model, batches: Iterable[Batch], batch_loss: Callable[[Batch], float] | None = None) -> float:
    """Mean over ``batches`` of ``batch_loss(batch)``, with ``model`` in eval mode (its train/eval mode restored
    after): the validation loss of every trainer and of ``dsfs eval``.

    ``model``: any model with ``training``, ``eval()`` and ``train(mode)`` (torch or MLX); ``batch_loss``: the
    backend's forward, one batch to a float (a trainer's ``eval_loss``; default: `torch_eval_loss` of ``model``).
    Raises ``ValueError`` when ``batches`` is empty."""
    if batch_loss is None:
        def batch_loss(b: Batch) -> float:
            return torch_eval_loss(model, b)
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    try:
        for b in batches:
            total += batch_loss(b)
            n += 1
    finally:
        model.train(was_training)
    if n == 0:
        raise ValueError("evaluate: no batches")
    return total / n
