"""Rotary position embedding (RoPE) with YaRN, 'linear' or 'llama3' scaling, through ``mx.fast.rope``.

``traditional=True`` of ``mx.fast.rope`` rotates consecutive pairs ``(x[2i], x[2i+1])``: DeepSeek-V3's
interleaved MLA RoPE (``rope_interleave``); ``traditional=False`` pairs ``(x[i], x[i + d/2])`` (NeoX: the V3.2
indexer, Llama). The frequencies (every scaling type's) come from `reference.rope.rope_inv_freq` and are passed
as ``freqs = 1 / inv_freq`` (``mx.fast.rope`` computes the angle ``position / freqs``). YaRN's cos/sin amplitude
factor (1 for DeepSeek-V3's released config) multiplies the rotated features before the rotation.
"""

from __future__ import annotations

import mlx.core as mx

from reference.rope import rope_inv_freq


class RoPE:
    """Rotates the first ``dim`` features of (B, *, T, D) inputs by the positions ``offset .. offset + T - 1``.

    Not an ``nn.Module``: it holds no parameters (the reference's ``inv_freq`` buffer is not saved either).
    Raises ``ValueError`` for an odd ``dim``.
    """

    def __init__(self, dim: int, theta: float = 10000.0, rope_scaling: dict | None = None):
        inv_freq, self.amplitude = rope_inv_freq(dim, theta, rope_scaling)
        self.dim = dim
        self.freqs = mx.array((1.0 / inv_freq.double()).float().numpy())

    def __call__(self, x: mx.array, offset: int = 0, traditional: bool = True) -> mx.array:
        """``x`` (B, *, T, D) with D >= dim; returns the same shape and dtype. ``traditional``: interleaved pairs."""
        if self.amplitude != 1.0:
            d, a = self.dim, self.amplitude
            x = x * a if x.shape[-1] == d else mx.concatenate([x[..., :d] * a, x[..., d:]], axis=-1)
        return mx.fast.rope(x, self.dim, traditional=traditional, base=None, scale=1.0, offset=offset,
                            freqs=self.freqs)
