"""Activation memory saved for backward by a training forward, per precision (DeepSeek-V3 report section 3.3.3).

`saved_activation_bytes` counts the bytes of every tensor autograd saves for backward during one training forward
of a `reference.Model` (``torch.autograd.graph.saved_tensors_hooks``), each storage once, parameters (and views of
them) excluded: the activation memory of a training step, counted exactly instead of read from a noisy process
peak. Precisions as ``dsfs train --precision``: ``fp32``; ``bf16`` (autocast); ``fp8`` (`reference.fp8_training`:
FP8 linear inputs and SwiGLU inputs, the rest of the model in bf16 under autocast, as on a GPU).

asv: `ActivationMemory.track_saved_bytes` at the ``small`` preset (batch 1 x 512), by precision. As a script
(``uv run python -m bench.precision``): the table and the ratios against bf16.
"""

from __future__ import annotations

import argparse
import copy

import torch

from .common import Suite

PRESET, BATCH, SEQ = "small", 1, 512
PRECISIONS = ["fp32", "bf16", "fp8"]


def saved_activation_bytes(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, precision: str) -> int:
    """Bytes autograd saves for backward in one ``model.loss(x, y)`` at ``precision`` (``fp32``, ``bf16``, ``fp8``;
    module docstring): the sum of the sizes of the distinct storages of the saved tensors, parameters excluded.
    ``model`` must already be on FP8 layers for ``fp8`` (`reference.fp8_training.enable_fp8_training`)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
        return t

    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if precision in ("bf16", "fp8") else torch.autocast(
        "cpu", enabled=False)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), ctx:
        out = model.loss(x, y)
    del out
    return sum(seen.values())


def small_models(seed: int = 0) -> dict[str, torch.nn.Module]:
    """The ``small`` preset's model (vocab 4096) in train mode, and a copy of it on FP8 layers."""
    from dsfs.presets import MODEL_PRESETS
    from reference.config import ModelConfig
    from reference.fp8_training import enable_fp8_training
    from reference.model import Model

    torch.manual_seed(seed)
    base = Model(ModelConfig(vocab_size=4096, **MODEL_PRESETS[PRESET])).train()
    fp8 = copy.deepcopy(base)
    enable_fp8_training(fp8)
    return {"fp32": base, "bf16": base, "fp8": fp8}


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A (BATCH, SEQ) batch of random token ids and next-token targets."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 4096, (BATCH, SEQ + 1), generator=g)
    return ids[:, :-1], ids[:, 1:]


class ActivationMemory(Suite):
    """Saved-for-backward bytes of one training forward of the small preset, by precision."""

    params = [PRECISIONS]
    param_names = ["precision"]
    timeout = 600

    def setup(self, precision):
        self.model = small_models()[precision]
        self.x, self.y = batch()

    def track_saved_bytes(self, precision):
        return saved_activation_bytes(self.model, self.x, self.y, precision)

    track_saved_bytes.unit = "bytes"


def main(argv=None) -> None:
    argparse.ArgumentParser(description=__doc__.split("\n")[0]).parse_args(argv)
    models, (x, y) = small_models(), batch()
    got = {p: saved_activation_bytes(models[p], x, y, p) for p in PRECISIONS}
    print(f"{PRESET} preset, batch {BATCH} x {SEQ}: activation bytes saved for backward")
    for p, n in got.items():
        print(f"  {p:5s} {n / 2**20:9.1f} MiB  {n / got['bf16']:.3f} x bf16")
    print(f"fp8 saves {100 * (1 - got['fp8'] / got['bf16']):.1f}% against bf16")


if __name__ == "__main__":
    main()
