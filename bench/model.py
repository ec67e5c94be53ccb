"""The whole model: a training step and a decode step, as tokens/s, and the peak memory of a training step.

Model (`MODEL`): hidden 256, 2 decoder layers (the first with a dense SwiGLU FFN, the second DeepSeekMoE with 8
routed experts, top-2, one shared), MLA (kv_lora_rank 128, qk 64+32, v 64), vocab 4096, no MTP, float32.

- `TrainStep`: one AdamW step (lr 1e-3) on a batch of 4 x T random tokens, next-token cross-entropy; eager on
  every backend (no torch.compile / mx.compile). ``track_tokens_per_s``: 4 * T tokens times `STEPS` steps over
  their wall time, after one untimed step. ``peakmem_train_step``: the process's peak resident memory (bytes)
  after a step, as asv measures it (setup included).
- `DecodeStep`: greedy generation for a batch of 4 sequences after a prompt of L tokens, one token per sequence
  and step through the backend's KV cache; ``track_tokens_per_s`` = 4 * `DECODE_STEPS` / their wall time
  (the prompt's prefill is not timed).

The reference and runtimes train through their ``loss`` (the training objective of `dsfs train`); transformers'
DeepseekV3ForCausalLM and mlx-lm's deepseek_v3 Model through their logits and a mean cross-entropy.
"""

from __future__ import annotations

import time

from . import common
from .common import BACKENDS, Suite

MODEL = dict(num_hidden_layers=2, first_k_dense_replace=1, vocab_size=4096)
BATCH, STEPS, DECODE_STEPS = 4, 3, 16
SEQ_LENS = [128, 512]
PROMPT_LENS = [128, 1024]


def train_step(backend: str, model):
    """``step(x, y)``: one optimizer step of ``model`` on token ids ``x`` and next-token targets ``y``."""
    if backend in common.MLX_BACKENDS:
        import mlx.core as mx
        import mlx.nn as nn
        import mlx.optimizers as optim

        opt = optim.AdamW(learning_rate=1e-3)
        if backend == "mlx":
            grad_fn = nn.value_and_grad(model, lambda x, y: model.loss(x, y).loss)
        else:
            grad_fn = nn.value_and_grad(model, lambda x, y: nn.losses.cross_entropy(model(x), y).mean())

        def step(x, y):
            loss, grads = grad_fn(x, y)
            opt.update(model, grads)
            mx.eval(loss, model.parameters(), opt.state)

        return step

    import torch
    import torch.nn.functional as F

    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step(x, y):
        if backend == "transformers":
            logits = model(input_ids=x).logits
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        else:
            loss = model.loss(x, y).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        common.sync(backend)

    return step


def decoder(backend: str, model):
    """``(start(prompt) -> state, next(state) -> state)``: prefill a fresh cache with ``prompt`` (B, L) and return
    the last greedy tokens; ``next`` feeds them as one new token per sequence and returns the next ones."""
    if backend in common.MLX_BACKENDS:
        import mlx.core as mx

        if backend == "mlx":
            new_cache = model.new_cache
        else:
            from mlx_lm.models.cache import make_prompt_cache

            def new_cache():
                return make_prompt_cache(model)

        def run(ids, cache):
            tok = mx.argmax(model(ids, cache=cache)[:, -1:], axis=-1)
            mx.eval(tok)
            return tok, cache

        return (lambda prompt: run(prompt, new_cache())), (lambda state: run(*state))

    import torch

    def run(ids, cache):
        with torch.no_grad():
            if backend == "transformers":
                logits = model(input_ids=ids, cache=cache, use_cache=True).logits
            else:
                logits = model(ids, cache)
            tok = logits[:, -1:].argmax(-1)
        common.sync(backend)
        return tok, cache

    def start(prompt):
        if backend == "transformers":
            from transformers import DynamicCache

            return run(prompt, DynamicCache(config=model.config))
        return run(prompt, model.new_cache())

    return start, (lambda state: run(*state))


def whole_model(backend: str, train: bool = False):
    """`MODEL` loaded by ``backend`` from the shared seeded checkpoint."""
    common.require(backend)
    return common.load_model(backend, common.checkpoint(common.config(**MODEL)), train=train)


def tokens(backend: str, b: int, t: int, seed: int):
    """Random token ids (b, t) for ``backend``."""
    return common.array(backend, (b, t), seed=seed, kind="tokens", high=MODEL["vocab_size"])


class TrainStep(Suite):
    """A training step of the whole model on 4 x T tokens: tokens/s and peak memory."""

    params = [BACKENDS, SEQ_LENS]
    param_names = ["backend", "seq_len"]
    unit = "tokens/s"

    def setup(self, backend, seq_len):
        self.model = whole_model(backend, train=True)
        self.step = train_step(backend, self.model)
        ids = tokens(backend, BATCH, seq_len + 1, seed=1)
        self.x, self.y = ids[:, :-1], ids[:, 1:]
        self.step(self.x, self.y)  # warm-up: optimizer state, lazy initialisation

    def track_tokens_per_s(self, backend, seq_len):
        t0 = time.perf_counter()
        for _ in range(STEPS):
            self.step(self.x, self.y)
        return BATCH * seq_len * STEPS / (time.perf_counter() - t0)

    def peakmem_train_step(self, backend, seq_len):
        self.step(self.x, self.y)


class DecodeStep(Suite):
    """Greedy decoding with the KV cache for 4 sequences after an L-token prompt: tokens/s."""

    params = [BACKENDS, PROMPT_LENS]
    param_names = ["backend", "prompt_len"]
    unit = "tokens/s"

    def setup(self, backend, prompt_len):
        self.start, self.next = decoder(backend, whole_model(backend))
        self.prompt = tokens(backend, BATCH, prompt_len, seed=1)

    def track_tokens_per_s(self, backend, prompt_len):
        state = self.next(self.start(self.prompt))  # prefill, then one untimed step
        t0 = time.perf_counter()
        for _ in range(DECODE_STEPS):
            state = self.next(state)
        return BATCH * DECODE_STEPS / (time.perf_counter() - t0)
