"""Rotary position embedding (RoPE, Su et al. 2021) with YaRN (Peng et al. 2023) as DeepSeek-V3 uses it.

Frequency tables as ``transformers``' ``ROPE_INIT_FUNCTIONS`` compute them for the static types: 'default',
'linear' (positions divided by ``factor``), 'llama3' (Llama 3.1's smoothed band scaling) and 'yarn'.

Two pairings: interleaved (pairs ``(x[2i], x[2i+1])``, DeepSeek-V3's MLA, ``rope_interleave=True``) and NeoX
(pairs ``(x[i], x[i + d/2])``, the V3.2 lightning indexer and Llama). Positions start at an offset, so
decode steps rotate by their absolute position.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_inv_freq(dim: int, theta: float, rope_scaling: dict | None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (dim/2,) float32 and the cos/sin amplitude factor.

    Without scaling: ``theta ** (-2i/dim)``. 'linear' (``rope_scaling['rope_type']``, or ``'type'``): divided by
    ``factor``, as position interpolation divides the positions (transformers'
    ``_compute_linear_scaling_rope_parameters``). 'llama3': wavelengths above ``original_max_position_embeddings /
    low_freq_factor`` divided by ``factor``, below ``original_max_position_embeddings / high_freq_factor``
    unchanged, a linear blend in between (``_compute_llama3_parameters``). With YaRN ('yarn'): frequencies blend
    interpolation (divided by ``factor``) and extrapolation over a linear ramp between the correction
    dims of ``beta_fast``/``beta_slow`` rotations at ``original_max_position_embeddings`` (YaRN eq. 23, as in
    DeepSeek-V3's ``precompute_freqs_cis``); the amplitude factor is ``mscale(factor, mscale) /
    mscale(factor, mscale_all_dim)`` (1 for DeepSeek-V3's released config). Raises ``ValueError`` for an odd dim.
    """
    if dim % 2:
        raise ValueError(f"rope dim must be even, got {dim}")
    pos_freqs = theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    inv_freq = 1.0 / pos_freqs
    rs = rope_scaling or {}
    kind = rs.get("rope_type", rs.get("type"))
    if kind == "linear":
        return inv_freq / float(rs["factor"]), 1.0
    if kind == "llama3":
        return _llama3(inv_freq, rs), 1.0
    if kind != "yarn":
        return inv_freq, 1.0
    factor = float(rs["factor"])
    orig = rs["original_max_position_embeddings"]
    beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1

    def corr_dim(rot):
        return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(theta))

    low, high = corr_dim(beta_fast), corr_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    inv_freq = (inv_freq / factor) * (1 - extrapolation) + inv_freq * extrapolation
    mscale, mscale_all = rs.get("mscale"), rs.get("mscale_all_dim")
    if rs.get("attention_factor") is not None:
        amp = float(rs["attention_factor"])
    elif mscale and mscale_all:
        amp = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all)
    else:
        amp = _yarn_mscale(factor)
    return inv_freq, amp


def _llama3(inv_freq: torch.Tensor, rs: dict) -> torch.Tensor:
    factor, low, high = float(rs["factor"]), float(rs["low_freq_factor"]), float(rs["high_freq_factor"])
    orig = rs["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > orig / low, inv_freq / factor, inv_freq)
    smooth = (orig / wavelen - low) / (high - low)
    blend = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= orig / high) & (wavelen <= orig / low)
    return torch.where(medium, blend, scaled)


class RotaryEmbedding(nn.Module):
    """Holds ``inv_freq`` and gives ``(cos, sin)`` of shape (T, dim/2) for positions ``offset .. offset+T-1``."""

    def __init__(self, dim: int, theta: float = 10000.0, rope_scaling: dict | None = None):
        super().__init__()
        inv_freq, self.amplitude = rope_inv_freq(dim, theta, rope_scaling)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, seq_len: int, offset: int = 0, device=None, dtype=torch.float32):
        """cos, sin: (seq_len, dim/2) in ``dtype``, angles computed in float32."""
        pos = torch.arange(offset, offset + seq_len, device=device or self.inv_freq.device, dtype=torch.float32)
        ang = torch.outer(pos, self.inv_freq.to(pos.device))
        return (ang.cos() * self.amplitude).to(dtype), (ang.sin() * self.amplitude).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate ``x`` (..., T, D) by angles ``cos``/``sin`` (T, D/2); returns (..., T, D) in ``x.dtype``.

    ``interleaved``: pairs are ``(x[2i], x[2i+1])`` and stay in place (DeepSeek-V3 MLA, official
    ``apply_rotary_emb`` with complex numbers). Otherwise NeoX pairing ``(x[i], x[i+D/2])``.
    """
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool, offset: int = 0) -> torch.Tensor:
    """The RoPE op (the signature of `kernels.triton.rope.rope`): `apply_rope` at positions ``offset .. offset+T-1``
    of whole ``cos``/``sin`` tables.

    ``x`` (..., T, D) float, D even; ``cos``/``sin`` (P, D/2) float with ``P >= offset + T``, any float dtype (row
    ``offset + t`` rotates row ``t`` of ``x``, YaRN's amplitude already folded in as `RotaryEmbedding` gives them);
    ``interleaved``: pairs ``(x[2i], x[2i+1])`` (DeepSeek-V3 MLA) or NeoX pairs ``(x[i], x[i + D/2])`` (the V3.2
    indexer). Computed in the wider of the two dtypes; returns (..., T, D) in ``x.dtype``. Differentiable in
    ``x`` (and the tables). Raises ``ValueError`` for an odd D, tables of the wrong width, or an offset outside
    the table. Source: Su et al. 2021 (RoFormer) section 3.4; DeepSeek-V3 report section 2.1.1 (decoupled RoPE).
    """
    if x.dim() < 2 or x.shape[-1] % 2:
        raise ValueError(f"x: expected shape (..., T, D) with D even, got {tuple(x.shape)}")
    t, d = x.shape[-2:]
    if cos.dim() != 2 or cos.shape[1] != d // 2 or sin.shape != cos.shape:
        raise ValueError(f"cos, sin: expected shape (P, {d // 2}), got {tuple(cos.shape)} and {tuple(sin.shape)}")
    if not isinstance(offset, int) or offset < 0 or offset + t > cos.shape[0]:
        raise ValueError(f"offset: need an int with 0 <= offset and offset + T <= {cos.shape[0]} (cos/sin rows), "
                         f"got offset={offset!r}, T={t}")
    return apply_rope(x, cos[offset:offset + t], sin[offset:offset + t], interleaved).to(x.dtype)
