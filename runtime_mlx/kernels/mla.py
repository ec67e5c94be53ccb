"""Absorbed MLA decode over the latent cache in MLX: the Metal kernel of ``kernels/metal/mla.metal`` or the pure-MLX
path. Reference: `reference.mla.MLA.attend_absorbed` (before W_UV)."""

from __future__ import annotations

import mlx.core as mx

from .launch import Launch, check_close, check_float, check_shape, f32, run, sample, scalar, spec, use_metal

DECODE = spec("mla_decode", "mla", "q_latent q_pe c_kv k_pe scale", "o_latent")
_TG = 128


def mla_decode_mlx(q_latent, q_pe, c_kv, k_pe, scale):
    """Pure MLX `mla_decode` (same contract)."""
    b, h, t, r = q_latent.shape
    s = c_kv.shape[1]
    ckv, kpe = f32(c_kv)[:, None], f32(k_pe)[:, None]
    logits = (f32(q_latent) @ ckv.swapaxes(-1, -2) + f32(q_pe) @ kpe.swapaxes(-1, -2)) * scale
    visible = mx.arange(s)[None, :] <= (mx.arange(t)[:, None] + (s - t))
    p = mx.softmax(mx.where(visible, logits, -mx.inf), axis=-1, precise=True)
    return (p @ ckv).astype(q_latent.dtype)


def mla_decode_launch(q_latent, q_pe, c_kv, k_pe, scale) -> Launch:
    """One threadgroup of 128 threads (4 simdgroups) per query (b, h, t): grid (B*H*T*128, 1, 1). Each simdgroup
    takes every 4th key with an online softmax, lanes splitting the R latent features; the 4 partial results
    are merged through threadgroup memory (4*R + 8 floats). Output (B, H, T, R) in q_latent's dtype."""
    b, h, t, r = q_latent.shape
    s, dr = c_kv.shape[1], k_pe.shape[-1]
    return Launch(DECODE, [q_latent, q_pe, c_kv, k_pe, scalar(scale)],
                  [("T", q_latent.dtype), ("KT", c_kv.dtype), ("H", h), ("TQ", t), ("S", s), ("R", r), ("DR", dr),
                   ("NSG", _TG // 32)],
                  (b * h * t * _TG, 1, 1), (_TG, 1, 1), [(b, h, t, r)], [q_latent.dtype])


def _mla_decode_metal(q_latent, q_pe, c_kv, k_pe, scale, runner=None):
    (o,) = run(runner, mla_decode_launch(q_latent, q_pe, c_kv, k_pe, scale))
    return o


def _self_check(q_dtype, kv_dtype, r, dr) -> None:
    """The Metal kernel against the pure-MLX path on 2 heads x 2 queries over 9 cached keys."""
    args = (sample((1, 2, 2, r), 1, q_dtype), sample((1, 2, 2, dr), 2, q_dtype), sample((1, 9, r), 3, kv_dtype),
            sample((1, 9, dr), 4, kv_dtype), (r + dr) ** -0.5)
    check_close("mla_decode", _mla_decode_metal(*args), mla_decode_mlx(*args), q_dtype)


def mla_decode(q_latent: mx.array, q_pe: mx.array, c_kv: mx.array, k_pe: mx.array, scale: float) -> mx.array:
    """Absorbed MLA attention over the latent cache (decode), as `reference.mla.MLA.attend_absorbed` before W_UV.

    ``q_latent`` (B, H, T, R) (``q_nope W_UK``), ``q_pe`` (B, H, T, DR) (rotated), ``c_kv`` (B, S, R) (normalized
    latents, also the values), ``k_pe`` (B, S, DR) (rotated, one head shared by all). Query t sees keys
    ``s <= S - T + t`` (causal, aligned to the end of the cache; S >= T). Returns
    ``o_latent = softmax((q_latent c_kv^T + q_pe k_pe^T) * scale) c_kv`` (B, H, T, R) in q_latent's dtype, softmax
    in float32. Forward only (decode). Raises ValueError on mismatched shapes or S < T.
    Source: DeepSeek-V3 report section 2.1.1 (eq. 1-11), "absorb" in DeepSeek's inference code.
    """
    for name, a in (("q_latent", q_latent), ("q_pe", q_pe), ("c_kv", c_kv), ("k_pe", k_pe)):
        check_float(name, a)
    if q_latent.ndim != 4:
        raise ValueError(f"q_latent: expected (B, H, T, R), got {tuple(q_latent.shape)}")
    b, h, t, r = q_latent.shape
    check_shape("c_kv", c_kv, (b, None, r))
    s = c_kv.shape[1]
    check_shape("q_pe", q_pe, (b, h, t, None))
    check_shape("k_pe", k_pe, (b, s, q_pe.shape[-1]))
    if s < t:
        raise ValueError(f"the cache must hold at least the T={t} new tokens, got S={s}")
    key = (q_latent.dtype, c_kv.dtype, r, q_pe.shape[-1])
    if use_metal("mla_decode", key, lambda: _self_check(*key)):
        return _mla_decode_metal(q_latent, q_pe, c_kv, k_pe, scale)
    return mla_decode_mlx(q_latent, q_pe, c_kv, k_pe, scale)
