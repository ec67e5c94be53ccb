"""Text generation and validation loss: the helpers behind ``dsfs generate`` and ``dsfs eval`` (the trainer
uses ``evaluate`` too).

Prompts are encoded with the checkpoint's ``tokenizer.json`` and preceded by the eos token: in the packed
training stream every document follows the previous document's eos, so this is the context the model saw at
the start of each story (and an empty prompt works).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dsfs.checkpointing import CheckpointError, load_model_dir, resolve_model_dir
from dsfs.data import DataError, file_sha256, load_meta, load_tokens


def pick_device(name: str = "auto") -> torch.device:
    """``auto``: cuda when available, else cpu. Otherwise the named device; ``DataError`` if unavailable."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DataError("device cuda requested but CUDA is not available (torch.cuda.is_available() is False)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise DataError("device mps requested but MPS is not available")
    return torch.device(name)


def autocast(device: torch.device):
    """bf16 autocast on CUDA; a no-op context elsewhere (CPU and MPS stay float32)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ---------------------------------------------------------------- evaluation


def eval_starts(n_tokens: int, n_windows: int, seq_len: int) -> list[int]:
    """Start offsets of ``n_windows`` windows of ``seq_len + 1`` tokens spread evenly over ``n_tokens``
    (first at 0, last at ``n_tokens - seq_len - 1``); the same every call. Windows overlap when the split is
    short. Raises ``DataError`` when ``n_tokens < seq_len + 1``."""
    span = n_tokens - seq_len - 1
    if span < 0:
        raise DataError(f"only {n_tokens} tokens: too few for seq_len {seq_len} (need at least {seq_len + 1})")
    if n_windows == 1:
        return [0]
    return [i * span // (n_windows - 1) for i in range(n_windows)]


@torch.no_grad()
def evaluate(model, tokens: np.ndarray, batch_size: int, seq_len: int, n_batches: int, device=None) -> float:
    """Mean next-token cross-entropy (nats/token) of the main model over fixed windows of ``tokens``.

    ``n_batches`` batches of ``batch_size`` windows of ``seq_len`` inputs (positions from ``eval_starts``, so
    every call sees the same tokens); MTP heads and balance losses are not counted. Runs in eval mode under
    ``no_grad`` (bf16 autocast on CUDA) and restores the model's train/eval mode. ``device``: where batches
    go (default: the model's). Raises ``DataError`` when ``tokens`` is too short for ``seq_len``.
    """
    device = device or next(model.parameters()).device
    starts = eval_starts(len(tokens), n_batches * batch_size, seq_len)
    was_training = model.training
    model.eval()
    total = 0.0
    try:
        for b in range(n_batches):
            rows = [np.asarray(tokens[s : s + seq_len + 1]) for s in starts[b * batch_size : (b + 1) * batch_size]]
            w = torch.from_numpy(np.stack(rows).astype(np.int64)).to(device)
            with autocast(device):
                logits = model(w[:, :-1])
            total += F.cross_entropy(logits.float().flatten(0, 1), w[:, 1:].flatten()).item()
    finally:
        model.train(was_training)
    return total / n_batches


def check_tokenizer(model_dir: str | os.PathLike, data_dir: str | os.PathLike, vocab_size: int) -> None:
    """Raise ``DataError`` when the data directory's tokenizer differs from the model's: another vocab size
    than ``vocab_size``, or (when the model directory holds one) a different ``tokenizer.json``."""
    meta = load_meta(data_dir)
    if meta["vocab_size"] != vocab_size:
        raise DataError(
            f"vocab size mismatch: the model in {model_dir} has vocab_size {vocab_size}, "
            f"the data in {data_dir} has {meta['vocab_size']}"
        )
    mine, theirs = Path(model_dir) / "tokenizer.json", Path(data_dir) / meta.get("tokenizer", "tokenizer.json")
    if mine.is_file() and theirs.is_file() and file_sha256(mine) != file_sha256(theirs):
        raise DataError(f"tokenizer mismatch: {mine} differs from {theirs} (the data was prepared with another one)")


def evaluate_checkpoint(
    checkpoint: str | os.PathLike,
    data_dir: str | os.PathLike,
    split: str = "val",
    batches: int = 16,
    batch_size: int = 16,
    seq_len: int = 256,
    device: str = "auto",
) -> dict:
    """Load a model (see ``resolve_model_dir``) and ``evaluate`` it on ``split`` of a prepared directory.

    ``seq_len`` is capped at the model's ``max_position_embeddings``. Returns ``{"loss", "ppl", "tokens",
    "model_dir", "split"}`` (loss in nats/token, ``tokens`` = inputs scored). Raises ``DataError`` /
    ``CheckpointError`` for a missing checkpoint or data directory, a tokenizer mismatch or a too-short split.
    """
    model_dir = resolve_model_dir(checkpoint)
    dev = pick_device(device)
    if not Path(data_dir).is_dir():
        raise DataError(f"{data_dir}: no such data directory (run dsfs prepare, or pass --data DIR)")
    model = load_model_dir(model_dir, device=dev)
    check_tokenizer(model_dir, data_dir, model.config.vocab_size)
    seq_len = min(seq_len, model.config.max_position_embeddings)
    loss = evaluate(model, load_tokens(data_dir, split), batch_size, seq_len, batches, dev)
    return {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "tokens": batches * batch_size * seq_len,
            "model_dir": str(model_dir), "split": split}


# ---------------------------------------------------------------- generation


@dataclass
class Generation:
    """``text``: prompt + continuation (special tokens dropped); ``new_tokens``: tokens generated (the stop
    token included); ``seconds``: wall time of ``Model.generate``; ``tokens_per_s``: their ratio."""

    text: str
    new_tokens: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / max(self.seconds, 1e-9)


def load_tokenizer(model_dir: str | os.PathLike):
    """The ``tokenizers.Tokenizer`` of a model directory's ``tokenizer.json``; ``CheckpointError`` if absent."""
    from tokenizers import Tokenizer

    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file (the checkpoint was saved without its tokenizer)")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable tokenizer ({e})") from e


def generate_text(
    model,
    tokenizer,
    prompt: str,
    max_new_tokens: int = 100,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    use_cache: bool = True,
) -> Generation:
    """Continue ``prompt`` with ``model.generate`` (stops at the eos token); see ``Model.generate`` for the
    sampling options (``temperature`` 0 is greedy; ``seed`` seeds the sampling generator).

    The prompt is encoded without special tokens and preceded by eos (``config.eos_token_id``). The total
    length is capped at ``max_position_embeddings``. Raises ``DataError`` when the prompt alone is too long
    or a sampling option is out of range. Runs in the model's dtype (no autocast), so cached and uncached
    decoding agree.
    """
    cfg = model.config
    eos = cfg.eos_token_id[0] if isinstance(cfg.eos_token_id, list) else cfg.eos_token_id
    ids = tokenizer.encode(prompt, add_special_tokens=False).ids
    ids = ([eos] if eos is not None else []) + ids
    room = cfg.max_position_embeddings - len(ids)
    if room < 0 or (room == 0 and max_new_tokens > 0):
        raise DataError(f"prompt of {len(ids)} tokens leaves no room in max_position_embeddings "
                        f"{cfg.max_position_embeddings}")
    device = next(model.parameters()).device
    x = torch.tensor([ids], dtype=torch.long, device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    model.eval()
    t0 = time.perf_counter()
    try:
        out = model.generate(x, min(max_new_tokens, room), temperature=temperature, top_k=top_k, top_p=top_p,
                             stop_tokens=[eos] if eos is not None else None, use_cache=use_cache,
                             generator=gen)
    except ValueError as e:
        raise DataError(str(e)) from e
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    new = out[0, len(ids):].tolist()
    n_new = len(new)
    if eos is not None and eos in new:
        new = new[: new.index(eos)]
    text = prompt + tokenizer.decode(new, skip_special_tokens=True)
    return Generation(text, n_new, seconds)
