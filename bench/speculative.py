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
    return to_backend(backend, np.array([([eos] if eos is not None else []) +
                                         read_tokenizer(tok_file).encode(PROMPT, add_special_tokens=False).ids]))


def to_backend(backend: str, ids):
    """(B, T) int64 numpy token ids as ``backend``'s array (MLX int32, torch int64 on the bench device)."""
    if backend in common.MLX_BACKENDS:
        import mlx.core as mx

        return mx.array(ids.astype("int32"))
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


def heldout(checkpoint: str, data_dir: str, backend: str = "reference", prompts: int = 20, prompt_len: int = 24,
            new_tokens: int = 100, drafts: int = 1, repeats: int = 3) -> dict:
    """The acceptance and batch-1 greedy speed-up of speculative decoding on held-out text, one run: the first
    ``prompts`` documents of ``data_dir``'s validation split (`dsfs.data.load_tokens`; documents of more than 64
    tokens) give prompts of eos + their first ``prompt_len`` tokens; each is decoded ``new_tokens`` tokens plainly
    (``model.generate``) and speculatively with ``drafts`` drafts per step, interleaved ``repeats`` times, the fastest
    of each counting (prefill included). Returns the summed acceptance per depth, tokens per verification step, the
    number of identical outputs and both tokens/s."""
    import numpy as np

    from dsfs.data import load_tokens

    common.require(backend)
    model = common.load_model(backend, checkpoint)
    eos = model.config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    val = np.asarray(load_tokens(data_dir, "val")).astype(np.int64)
    cuts = np.flatnonzero(val == eos).tolist()
    docs = [val[a + 1:b] for a, b in zip(cuts, cuts[1:], strict=False) if b - a > 64][:prompts]
    plain, spec = generator(backend, model, 0), generator(backend, model, drafts)
    t_plain = t_spec = 0.0
    same, drafted, accepted, steps, tokens = 0, [0] * drafts, [0] * drafts, 0, 0
    plain(to_backend(backend, np.concatenate(([eos], docs[0][:prompt_len]))[None]), 8)  # warm-up
    for doc in docs:
        ids = to_backend(backend, np.concatenate(([eos], doc[:prompt_len]))[None])
        best_plain = best_spec = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            want, _ = plain(ids, new_tokens)
            t1 = time.perf_counter()
            got, st = spec(ids, new_tokens)
            best_plain, best_spec = min(best_plain, t1 - t0), min(best_spec, time.perf_counter() - t1)
        t_plain, t_spec = t_plain + best_plain, t_spec + best_spec
        same += np.array_equal(np.asarray(want), np.asarray(got))
        drafted = [a + b for a, b in zip(drafted, st.drafted, strict=True)]
        accepted = [a + b for a, b in zip(accepted, st.accepted, strict=True)]
        steps, tokens = steps + st.steps, tokens + st.tokens
    n = len(docs) * new_tokens
    return {"prompts": len(docs), "identical": same, "drafted": drafted, "accepted": accepted,
            "acceptance": [a / d if d else float("nan") for a, d in zip(accepted, drafted, strict=True)],
            "tokens_per_step": tokens / max(steps, 1), "plain_tokens_per_s": n / t_plain,
            "speculative_tokens_per_s": n / t_spec, "speedup": t_plain / t_spec}


def main(argv=None) -> None:
    """``uv run python -m bench.speculative --checkpoint runs/tiny/final --data data_cache/tinystories_sample-v4096``:
    `heldout`, printed."""
    import argparse

    p = argparse.ArgumentParser(description=heldout.__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="model directory with MTP layers")
    p.add_argument("--data", required=True, metavar="DIR", help="prepared data directory (its val split)")
    p.add_argument("--backend", default="reference", choices=list(OURS))
    p.add_argument("--prompts", type=int, default=20)
    p.add_argument("--prompt-len", type=int, default=24)
    p.add_argument("--tokens", type=int, default=100)
    p.add_argument("--drafts", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args(argv)
    r = heldout(a.checkpoint, a.data, a.backend, a.prompts, a.prompt_len, a.tokens, a.drafts, a.repeats)
    rates = ", ".join(f"depth {j} {x:.1%} ({n}/{d})" for j, (x, n, d) in
                      enumerate(zip(r["acceptance"], r["accepted"], r["drafted"], strict=True), start=1))
    print(f"{a.backend}: {r['prompts']} held-out prompts, {a.tokens} new tokens each, {a.drafts} draft(s) per step: "
          f"acceptance {rates}; {r['tokens_per_step']:.2f} tokens per verification step; greedy output identical "
          f"{r['identical']}/{r['prompts']}; {r['plain_tokens_per_s']:.1f} -> {r['speculative_tokens_per_s']:.1f} "
          f"tokens/s, {r['speedup']:.2f}x")


if __name__ == "__main__":
    main()
