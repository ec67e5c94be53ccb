"""Speculative decoding with the MTP modules (DeepSeek-V3 report section 5.4.3): batch-1 greedy decode tokens/s with
and without drafts, and the acceptance rate of each draft depth.

Model (`MODEL`): the ``tiny`` preset's shape (`dsfs.presets`: hidden 128, 4 decoder layers, MLA, DeepSeekMoE with 8
routed experts top-2 and one shared, one MTP module, tied head) with the default data vocab of 4096, float32, the
seeded random weights every backend loads (`common.checkpoint`). Random weights make the MTP drafts nearly always
wrong, so these numbers show the cost of speculation, not its gain: set ``DSFS_BENCH_CHECKPOINT`` to a trained
checkpoint directory with MTP layers (for example ``dsfs train --preset tiny``'s ``final/``) to measure a real
acceptance; its ``tokenizer.json``, when present, encodes `PROMPT` (preceded by eos, as ``dsfs generate`` does),
else the prompt is random tokens.

- `Decode`: ``track_tokens_per_s``: `NEW_TOKENS` greedy tokens for one sequence after a `PROMPT_LEN`-token prompt,
  through the backend's KV cache: the model's ``generate`` (``drafts`` 0) or speculative decoding with ``drafts``
  MTP drafts per step (`reference.speculative.speculative_generate` for ``reference`` and ``cuda``,
  `runtime_mlx.speculative.speculative_generate` for ``mlx``; more drafts than MTP modules reuse them). Tokens/s =
  (NEW_TOKENS - 1) / (t(NEW_TOKENS) - t(1)): the prompt's prefill and the first token, measured alone in ``setup``,
  are not counted. ``track_tokens_per_step``: tokens per verification forward (1 without drafts).
- `Acceptance`: ``track_acceptance``: the share of depth-``depth`` drafts accepted (with every draft before them,
  `reference.speculative.SpeculativeStats.acceptance`) in one greedy run of `NEW_TOKENS` tokens with
  ``max(DEPTHS)`` drafts per step.

Backends: ours only (``reference``, ``cuda``, ``mlx``); the peers have no MTP speculative decoding. ``cuda`` needs an
NVIDIA GPU.
"""

from __future__ import annotations

import os
import time

from . import common
from .common import OURS, Suite

MODEL = dict(
    hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=384, moe_intermediate_size=128,
    n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, n_group=1, topk_group=1, first_k_dense_replace=1,
    routed_scaling_factor=1.0, q_lora_rank=None, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
    v_head_dim=32, num_nextn_predict_layers=1, max_position_embeddings=1024, rope_theta=10000.0,
    tie_word_embeddings=True, vocab_size=4096,
)
CHECKPOINT_ENV = "DSFS_BENCH_CHECKPOINT"
PROMPT = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her"
PROMPT_LEN, NEW_TOKENS = 16, 48
DRAFTS = [0, 1, 2, 3]
DEPTHS = [1, 2, 3]


def model_dir() -> str:
    """``DSFS_BENCH_CHECKPOINT`` when set, else the seeded random `MODEL` written as a checkpoint."""
    return os.environ.get(CHECKPOINT_ENV) or common.checkpoint(common.config(**MODEL))


def prompt(backend: str, path: str):
    """(1, L) prompt ids for ``backend``: `PROMPT` encoded by ``path``'s tokenizer.json (after eos), else
    `PROMPT_LEN` seeded random tokens."""
    import json

    import numpy as np

    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    tok_file = os.path.join(path, "tokenizer.json")
    if not os.path.exists(tok_file):
        return common.array(backend, (1, PROMPT_LEN), seed=1, kind="tokens", high=cfg["vocab_size"])
    from dsfs.data import read_tokenizer

    eos = cfg.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) else eos
    ids = np.array([([eos] if eos is not None else []) +
                    read_tokenizer(tok_file).encode(PROMPT, add_special_tokens=False).ids])
    if backend in common.MLX_BACKENDS:
        import mlx.core as mx

        return mx.array(ids.astype(np.int32))
    import torch

    return torch.from_numpy(ids).to(common.torch_device())


def generator(backend: str, model, drafts: int):
    """``run(ids, n) -> (ids, stats or None)``: ``n`` greedy tokens after ``ids`` by ``model.generate`` (``drafts``
    0) or by speculative decoding with ``drafts`` drafts per step, synchronized."""
    if backend == "mlx":
        from runtime_mlx.speculative import speculative_generate
    else:
        from reference.speculative import speculative_generate

    def run(ids, n):
        with common.no_grad(backend):
            if drafts == 0:
                out, stats = model.generate(ids, n), None
            else:
                out, stats = speculative_generate(model, ids, n, num_speculative_tokens=drafts)
        common.sync(backend, out)
        return out, stats

    return run


def load(backend: str):
    """The model and prompt of this suite for ``backend``; ``NotImplementedError`` (asv: skipped) where the backend
    cannot run or the checkpoint has no MTP modules."""
    common.require(backend)
    path = model_dir()
    model = common.load_model(backend, path)
    if len(model.mtp) == 0:
        common.skip(f"{path}: no MTP modules to draft with (num_nextn_predict_layers 0 or not saved)")
    return model, prompt(backend, path)


def _seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


class Decode(Suite):
    """Batch-1 greedy decoding, plain and speculative: tokens/s and tokens per verification forward."""

    params = [list(OURS), DRAFTS]
    param_names = ["backend", "drafts"]
    unit = "tokens/s"

    def setup(self, backend, drafts):
        model, self.prompt = load(backend)
        self.run = generator(backend, model, drafts)
        self.run(self.prompt, NEW_TOKENS)  # warm-up: first calls, lazy initialisation
        self.first = min(_seconds(lambda: self.run(self.prompt, 1)) for _ in range(3))  # prefill + first token

    def track_tokens_per_s(self, backend, drafts):
        return (NEW_TOKENS - 1) / max(_seconds(lambda: self.run(self.prompt, NEW_TOKENS)) - self.first, 1e-9)

    def track_tokens_per_step(self, backend, drafts):
        _, stats = self.run(self.prompt, NEW_TOKENS)
        return 1.0 if stats is None else stats.tokens_per_step


class Acceptance(Suite):
    """Acceptance rate of the depth-``depth`` draft, greedy, ``max(DEPTHS)`` drafts per step."""

    params = [list(OURS), DEPTHS]
    param_names = ["backend", "depth"]
    unit = "accepted / drafted"

    def setup(self, backend, depth):
        model, ids = load(backend)
        self.stats = generator(backend, model, max(DEPTHS))(ids, NEW_TOKENS)[1]

    def track_acceptance(self, backend, depth):
        return self.stats.acceptance[depth - 1]
