"""KV cache for generation: per layer, named tensors appended along the sequence axis (dim -2)."""

from __future__ import annotations

import torch


class LayerCache:
    """One layer's cache. Each tensor has the sequence on dim -2: MHA/GQA store ``k``, ``v`` (B, Hk, S, D);
    MLA stores only ``c_kv`` (B, S, kv_lora_rank) and ``k_pe`` (B, S, qk_rope_head_dim); DSA adds the
    indexer key ``index_k`` (B, S, index_head_dim)."""

    def __init__(self):
        self.tensors: dict[str, torch.Tensor] = {}

    def update(self, **new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Append each named tensor (new tokens on dim -2); return the full tensors in the given order."""
        out = []
        for name, t in new.items():
            old = self.tensors.get(name)
            full = t if old is None else torch.cat((old, t), dim=-2)
            self.tensors[name] = full
            out.append(full)
        return tuple(out)

    def crop(self, seq_len: int) -> None:
        """Keep the first ``seq_len`` cached tokens of every tensor (drop positions >= ``seq_len`` on dim -2): the
        rollback of speculative decoding after rejected drafts. A view, no copy (the next `update` concatenates). A
        ``seq_len`` at or past the end keeps them all."""
        self.tensors = {name: t[..., :seq_len, :] for name, t in self.tensors.items()}

    def nbytes_per_token(self) -> int:
        """Bytes cached per token (per sequence of the batch) in this layer."""
        total = 0
        for t in self.tensors.values():
            total += t.element_size() * t.numel() // (t.shape[0] * t.shape[-2])
        return total


class KVCache:
    """The whole model's cache: one `LayerCache` per decoder layer plus the number of tokens seen."""

    def __init__(self, num_layers: int):
        self.layers = [LayerCache() for _ in range(num_layers)]
        self.seq_len = 0

    def crop(self, seq_len: int) -> None:
        """Roll the cache back to its first ``seq_len`` tokens (drop positions >= ``seq_len`` in every layer, the
        indexer keys of DSA included): the next forward continues at position ``seq_len``, as if the dropped tokens
        had never been fed (`reference.speculative`, after rejected drafts). Raises ``ValueError`` for ``seq_len``
        outside [0, ``self.seq_len``]."""
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or not 0 <= seq_len <= self.seq_len:
            raise ValueError(f"crop: seq_len={seq_len}; expected an integer in [0, {self.seq_len}] (the cached tokens)")
        for layer in self.layers:
            layer.crop(seq_len)
        self.seq_len = seq_len

    def nbytes_per_token(self) -> int:
        """Bytes cached per token over all layers (one sequence)."""
        return sum(layer.nbytes_per_token() for layer in self.layers)
