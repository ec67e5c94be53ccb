"""Attention layers: MHA, MQA, GQA, MLA (naive and absorbed forms) and DSA, one decoder layer's ``self_attn``.

Shapes (`bench.common.BASE_CONFIG`): hidden 256, 4 query heads; MHA/MQA/GQA heads of width 64 with 4/1/2 key-value
heads; MLA with kv_lora_rank 128, q_lora_rank 192, qk_nope 64, qk_rope 32, v 64; DSA adds a 4-head indexer of width
64 that keeps the top 128 keys per query. float32.

- `Prefill`: one layer on (1, T, 256) for T in a sweep, forward and forward+backward (gradients of the layer's
  parameters); causal. Seconds per call.
- `Decode`: one new token (batch 1) against a cache of L tokens, forward only. Seconds per step.
- `KVCacheSize`: bytes the cache holds per token per layer (one sequence), measured on the reference's cache.

MLA "naive" up-projects the latent into per-head keys and values; "absorbed" folds the up-projections into the
query and output and attends over the latent (the reference forces each form). The peers have one form each:
transformers' DeepseekV3Attention (which expands the latent into per-head keys and values, also when decoding)
is timed as naive; mlx-lm's DeepseekV3Attention as naive in prefill (it up-projects the latent into per-head keys)
and as absorbed in decode (one token attends over the latent); their DSA rows are DeepseekV32Attention.
"""

from __future__ import annotations

from . import common
from .common import BACKENDS, Suite, skip

KINDS = ["mha", "mqa", "gqa", "mla_naive", "mla_absorbed", "dsa"]
SEQ_LENS = [128, 256, 512, 1024]
CACHE_LENS = [128, 512, 2048]
DECODE_BATCH = 1
MLA_SHAPE = dict(q_lora_rank=192)


def attention_config(kind: str):
    """The one-layer config of attention ``kind`` (dense FFN, so every backend builds the same layer)."""
    over = dict(moe_type="dense", first_k_dense_replace=1)
    if kind in ("mha", "mqa", "gqa"):
        over.update(attention_type=kind, head_dim=64, num_key_value_heads={"mha": 4, "mqa": 1, "gqa": 2}[kind])
    elif kind == "dsa":
        over.update(MLA_SHAPE, attention_type="dsa", model_type="deepseek_v32")
    else:
        over.update(MLA_SHAPE, attention_type="mla")
    return common.config(**over)


class Layer:
    """One backend's attention layer of ``kind``, loaded from the shared checkpoint, with the calls the suites
    time: ``prefill(x)`` (causal, no cache), ``fill(x)`` (prefill into a fresh cache) and ``decode(x)`` (one step
    that leaves the cache as ``fill`` left it)."""

    def __init__(self, backend: str, kind: str, path: str, decode: bool = False):
        if backend in common.PEERS and kind in ("mha", "mqa", "gqa"):
            skip(f"{backend}: DeepSeek-V3 has no {kind} attention")
        if backend == "transformers" and kind == "mla_absorbed":
            skip("transformers: DeepseekV3Attention has no absorbed form")
        if backend == "mlx_lm" and kind == ("mla_naive" if decode else "mla_absorbed"):
            skip(f"mlx_lm: its {'decode step is absorbed' if decode else 'prefill up-projects the latent'}, timed as "
                 f"{'mla_absorbed' if decode else 'mla_naive'}")
        self.backend, self.kind = backend, kind
        self.model = common.load_model(backend, path)
        self.attn = self.model.model.layers[0].self_attn
        if backend in common.OURS and kind.startswith("mla"):
            self.attn.absorb = kind == "mla_absorbed"
        self.cache, self.offset, self.saved = None, 0, None

    # -------------------------------------------------------------- calls per backend
    def _call(self, x, cache=None, offset: int = 0):
        b, t = self.backend, x.shape[1]
        if b in ("reference", "cuda"):
            cos, sin = self.model.rotary(t, offset, x.device, x.dtype)
            return self.attn(x, cos, sin, cache, offset)
        if b == "mlx":  # runtime_mlx: the layer rotates by its own RoPE module
            return self.attn(x, cache, offset)
        if b == "transformers":
            import torch

            pos = torch.arange(offset, offset + t, device=x.device)[None]
            return self.attn(x, position_embeddings=self.model.model.rotary_emb(x, pos),
                             attention_mask=self._hf_mask(x, cache, pos), cache=cache)[0]
        from mlx_lm.models.base import create_attention_mask

        c = cache[0] if cache is not None and hasattr(cache, "caches") else cache
        return self.attn(x, create_attention_mask(x, c, return_array=True), cache)

    def _hf_mask(self, x, cache, pos):
        from transformers.masking_utils import create_causal_mask

        dsa = self.kind == "dsa"  # V3.2's indexer needs the explicit mask, as DeepseekV32Model builds it
        return create_causal_mask(config=self.model.config, inputs_embeds=x, attention_mask=None, cache=cache,
                                  position_ids=pos, allow_is_causal_skip=not dsa)

    def _new_cache(self):
        b = self.backend
        if b in common.OURS:
            return self.model.new_cache().layers[0]
        if b == "transformers":
            from transformers import DynamicCache

            return DynamicCache(config=self.model.config)
        from mlx_lm.models.cache import make_prompt_cache

        return make_prompt_cache(self.model)[0]

    def _cache_state(self) -> list[dict] | None:
        """The dicts that hold the cache's tensors, restored after each decode step (None: mlx-lm's caches, which
        `trim` instead). Ours keep a dict of named tensors/arrays; transformers' cache layers their attributes."""
        if self.backend in common.OURS:
            return [vars(self.cache).get("tensors", vars(self.cache).get("arrays"))]
        if self.backend == "transformers":
            return [vars(layer) for layer in self.cache.layers]
        return None

    # -------------------------------------------------------------- timed work
    def prefill(self, x):
        return self._call(x)

    def fill(self, x):
        """Run ``x`` (B, L, hidden) through the layer into a fresh cache; later `decode` steps start from it."""
        self.cache, self.offset = self._new_cache(), x.shape[1]
        with common.no_grad(self.backend):
            common.sync(self.backend, common.first(self._call(x, self.cache)))
        self.saved = [dict(d) for d in self._cache_state() or []]

    def decode(self, x):
        """One token per sequence, ``x`` (B, 1, hidden), at position L; the cache is reset to L tokens after."""
        out = common.first(self._call(x, self.cache, self.offset))
        common.sync(self.backend, out)
        state = self._cache_state()
        if state is None:
            self.cache.trim(1)
        for d, saved in zip(state or [], self.saved, strict=True):
            d.clear()
            d.update(saved)
        return out


class Prefill(Suite):
    """One attention layer over (1, T, 256), causal, no cache: forward, and forward+backward (seconds)."""

    params = [BACKENDS, KINDS, SEQ_LENS]
    param_names = ["backend", "kind", "seq_len"]

    def setup(self, backend, kind, seq_len):
        common.require(backend)
        self.backend = backend
        self.layer = Layer(backend, kind, common.checkpoint(attention_config(kind)))
        self.x = common.array(backend, (1, seq_len, 256), seed=1)
        self.step = common.forward_backward(backend, self.layer.prefill, self.layer.attn)

    def time_forward(self, backend, kind, seq_len):
        with common.no_grad(backend):
            common.sync(backend, common.first(self.layer.prefill(self.x)))

    def time_forward_backward(self, backend, kind, seq_len):
        self.step(self.x)


class Decode(Suite):
    """One decode step of one attention layer: a (1, 1, 256) new token against a cache of L tokens (seconds)."""

    params = [BACKENDS, KINDS, CACHE_LENS]
    param_names = ["backend", "kind", "cache_len"]

    def setup(self, backend, kind, cache_len):
        common.require(backend)
        self.layer = Layer(backend, kind, common.checkpoint(attention_config(kind)), decode=True)
        self.layer.fill(common.array(backend, (DECODE_BATCH, cache_len, 256), seed=1))
        self.x = common.array(backend, (DECODE_BATCH, 1, 256), seed=2)

    def time_decode(self, backend, kind, cache_len):
        with common.no_grad(backend):
            self.layer.decode(self.x)


class KVCacheSize(Suite):
    """Bytes the KV cache holds per token per layer for one sequence (float32), from the reference's cache:
    MHA/GQA/MQA store k and v per key head; MLA stores the latent c_kv and the shared RoPE key k_pe; DSA adds the
    indexer key."""

    params = [KINDS]
    param_names = ["kind"]
    unit = "bytes"

    def track_kv_bytes_per_token(self, kind):
        import torch

        layer = Layer("reference", kind, common.checkpoint(attention_config(kind)))
        layer.fill(torch.randn(1, 8, 256, device=common.torch_device()))
        return layer.cache.nbytes_per_token()
