"""KV cache for generation: per layer, named arrays appended along the sequence axis (-2)."""

from __future__ import annotations

import mlx.core as mx


class LayerCache:
    """One layer's cache. MHA/GQA store ``k``, ``v`` (B, Hk, S, D); MLA only the latent ``c_kv``
    (B, S, kv_lora_rank) and ``k_pe`` (B, S, qk_rope_head_dim); DSA adds ``index_k`` (B, S, index_head_dim)."""

    def __init__(self):
        self.arrays: dict[str, mx.array] = {}

    def update(self, **new: mx.array) -> tuple[mx.array, ...]:
        """Append each named array (new tokens on axis -2); return the full arrays in the given order."""
        out = []
        for name, a in new.items():
            old = self.arrays.get(name)
            full = a if old is None else mx.concatenate([old, a], axis=-2)
            self.arrays[name] = full
            out.append(full)
        return tuple(out)

    def crop(self, seq_len: int) -> None:
        """Keep the first ``seq_len`` cached tokens of every array (drop positions >= ``seq_len``, axis -2): the
        rollback of speculative decoding after rejected drafts. A ``seq_len`` at or past the end keeps them all."""
        self.arrays = {name: a[..., :seq_len, :] for name, a in self.arrays.items()}

    def nbytes_per_token(self) -> int:
        """Bytes cached per token (per sequence of the batch) in this layer."""
        return sum(a.nbytes // (a.shape[0] * a.shape[-2]) for a in self.arrays.values())


class KVCache:
    """The whole model's cache: one `LayerCache` per decoder layer plus the number of tokens seen."""

    def __init__(self, num_layers: int):
        self.layers = [LayerCache() for _ in range(num_layers)]
        self.seq_len = 0

    def crop(self, seq_len: int) -> None:
        """Roll the cache back to its first ``seq_len`` tokens (drop positions >= ``seq_len`` in every layer), as
        `reference.cache.KVCache.crop`: the next forward continues at position ``seq_len``. Raises ``ValueError``
        for ``seq_len`` outside [0, ``self.seq_len``]."""
        if not isinstance(seq_len, int) or not 0 <= seq_len <= self.seq_len:
            raise ValueError(f"crop: seq_len={seq_len}; expected an integer in [0, {self.seq_len}] (the cached tokens)")
        for layer in self.layers:
            layer.crop(seq_len)
        self.seq_len = seq_len

    def nbytes_per_token(self) -> int:
        """Bytes cached per token over all layers (one sequence)."""
        return sum(layer.nbytes_per_token() for layer in self.layers)
