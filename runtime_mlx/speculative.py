"""Speculative decoding with the model's own Multi-Token Prediction modules in MLX (DeepSeek-V3 report section
5.4.3: the MTP modules draft the next tokens, the main model verifies them), the algorithm of
`reference.speculative` step for step; its module docstring states it in full. In short, for a batch whose accepted
prefix is ``t_0 .. t_N`` (the main cache holds positions ``0 .. N-1``) and ``k`` drafts per step:

1. **Draft.** Draft ``j`` comes from MTP module ``((j - 1) mod D) + 1`` (D = ``num_nextn_predict_layers``; more drafts
   than modules reuse them in turn, as vLLM's DeepSeek MTP proposer) at position ``N - 1`` (report eq. 21-23):
   ``h^j_i = Block(eh_proj([enorm(Emb(t_{i+j})); hnorm(h^{j-1}_i)]))``, ``h^0`` the main model's final-normed
   hidden state; the shared head on ``shared_head.norm(h^j_{N-1})`` predicts ``t_{N+j}``. Each draft depth has
   its own one-layer KV cache.
2. **Verify.** One main-model forward over ``[t_N, d_1 .. d_k]`` through the cache.
3. **Accept.** Greedy: while the draft equals the target's argmax, then the argmax (exactly
   `runtime_mlx.model.Model.generate` at temperature 0, up to the float rounding of a multi-token forward).
   Sampling: the rejection rule of Leviathan et al. 2023 (Algorithm 1) and Chen et al. 2023 with ``p`` and ``q``
   both `runtime_mlx.model.sampling_probs` (temperature, top-k, top-p): accept ``d ~ q`` with probability
   ``min(1, p(d) / q(d))``, else draw from ``norm(max(0, p - q))``; after ``k`` acceptances a bonus from ``p``.
4. **Batch.** Every unfinished row emits ``m = 1 + min_r n_r`` tokens (its accepted drafts, then its own accepted
   draft, correction or bonus at position ``m``): a stopping rule that keeps every row's distribution exact.
5. **Roll back.** `runtime_mlx.cache.KVCache.crop` of the main cache to ``N + m`` and of draft depth ``j``'s cache
   to the positions whose inputs are all emitted tokens; the rest is recomputed in the next step from the kept
   hidden states (the last ``k + 1`` positions of each level).

Statistics are `reference.speculative.SpeculativeStats`, counted as the reference counts them. Host syncs: one per
step (the accepted count, the finished rows, the stop position and the logits' finiteness, read together after one
``mx.eval`` of the step's state), plus the prompt's (its id range, whether the mask pads, the first token). MLX builds
each step (drafts, verification, acceptance, statistics) as one lazy graph that this read evaluates.
"""

from __future__ import annotations

import mlx.core as mx

from reference.speculative import SpeculativeStats, absorbed, check_speculative_args

from .attention import padding_mask
from .cache import KVCache
from .mla import MLA
from .model import Model, sample_next, sampling_probs

__all__ = ["SpeculativeStats", "speculative_generate"]


class _Level:
    """The outputs of one level of the draft chain (0: the main model's final-normed hidden states, j >= 1: draft
    ``j``'s block output), (B, W, hidden) at the positions ``start .. start + W - 1``
    (`reference.speculative._Level` in MLX)."""

    def __init__(self, h: mx.array, start: int = 0):
        self.h, self.start = h, start

    def at(self, lo: int, hi: int) -> mx.array:
        """Positions ``lo .. hi - 1`` (B, hi - lo, hidden)."""
        return self.h[:, lo - self.start:hi - self.start]

    def put(self, out: mx.array, lo: int) -> None:
        """Replace positions >= ``lo`` by ``out`` (B, T, hidden) at ``lo .. lo + T - 1``."""
        self.h = mx.concatenate([self.h[:, :lo - self.start], out], axis=1)

    def keep(self, end: int, width: int) -> None:
        """Drop positions >= ``end``, then keep only the last ``width`` positions."""
        h = self.h[:, :max(end - self.start, 0)]
        cut = max(h.shape[1] - width, 0)
        self.h, self.start = h[:, cut:], self.start + cut


def speculative_generate(model: Model, input_ids: mx.array, max_new_tokens: int, temperature: float = 0.0,
                         top_k: int | None = None, top_p: float | None = None, stop_tokens=None,
                         generator: mx.array | None = None, num_speculative_tokens: int | None = None,
                         attention_mask: mx.array | None = None) -> tuple[mx.array, SpeculativeStats]:
    """Generate with MTP drafts verified by the main model (the module docstring; `reference.speculative`).

    ``model``: a `runtime_mlx.Model` with MTP modules, in eval mode. ``input_ids`` (B, T) integer ``mx.array`` ->
    ((B, T + n) of the same dtype, `SpeculativeStats`), n <= ``max_new_tokens``, the output contract of
    `runtime_mlx.model.Model.generate`: ``temperature`` 0 is greedy (the same tokens as ``generate``), otherwise
    temperature, ``top_k`` and ``top_p`` as `runtime_mlx.model.sample_next`, drawn with the PRNG key ``generator``
    (``mx.random.key``, split at every draw) or MLX's global PRNG; a row that emits one of ``stop_tokens`` is
    finished, later positions are filled with ``pad_token_id`` (or the first stop token), and generation ends when
    every row is finished. ``num_speculative_tokens``: drafts per step (default: the MTP depth; more reuses the
    modules in turn). ``attention_mask``: (B, T) bool or integer, 1 = real token, 0 = left padding, or None.

    Raises ``ValueError`` for a model without MTP modules, bad options (`reference.model.check_sampling`,
    ``max_new_tokens`` < 0, ``num_speculative_tokens`` < 1), bad ``input_ids`` or ``attention_mask`` (as the model's
    forward) and non-finite logits.
    """
    depth, k_max = check_speculative_args(model, max_new_tokens, temperature, top_k, top_p, num_speculative_tokens)
    stats = SpeculativeStats([0] * k_max, [0] * k_max)
    if max_new_tokens == 0:
        return input_ids, stats
    greedy = temperature == 0
    keys = _Keys(generator)
    cache = model.new_cache()
    h = model.hidden_states(input_ids, cache, attention_mask)  # checks the ids and the mask
    b, t = input_ids.shape
    stops = sorted(set(stop_tokens or []))
    stop_arr = mx.array(stops or [-1])
    cfg = model.config
    fill = mx.array(cfg.pad_token_id if cfg.pad_token_id is not None else (stops[0] if stops else 0),
                    dtype=input_ids.dtype)
    full = None  # the padding mask over every position a step can reach, or None without padding
    if attention_mask is not None and not attention_mask.astype(mx.bool_).all().item():
        full = mx.concatenate([attention_mask.astype(mx.bool_), mx.ones((b, max_new_tokens + k_max), mx.bool_)],
                              axis=1)
    logits = model.head(h[:, -1]).astype(mx.float32)
    nxt = sample_next(logits, temperature, top_k, top_p, keys()).astype(input_ids.dtype)
    seq = mx.concatenate([input_ids, nxt[:, None]], axis=1)
    done = _is_stop(nxt, stop_arr)
    finite, finished = mx.isfinite(logits).all(), done.all()
    mx.eval(seq, h, finite, finished)
    if not finite.item():
        raise ValueError(f"speculative_generate: non-finite logits for the token at position {t}")
    if stops and finished.item():
        return seq, stats

    levels: list[_Level | None] = [_Level(h)] + [None] * k_max
    mtp_caches = [KVCache(1) for _ in range(k_max)]
    drafted = mx.zeros((k_max,), mx.int32)
    accepted = mx.zeros((k_max,), mx.int32)
    tokens = mx.array(0, mx.int32)
    positions = mx.arange(k_max + 1)
    n_pos, emitted = t, 1  # the main cache holds positions < n_pos; seq[:, n_pos] is the newest token
    with absorbed(model, MLA):  # the few tokens of a step through the latent cache, as a one-token decode step
        while emitted < max_new_tokens:
            k = min(k_max, max_new_tokens - emitted - 1)
            drafts, q = [], []
            for j in range(1, k + 1):
                mtp, c = model.mtp[(j - 1) % depth], mtp_caches[j - 1]
                lo = c.seq_len  # positions lo .. n_pos - 1 to run; their tokens t_{i+j} end in the drafts so far
                ahead = [seq[:, lo + j:]] + drafts[max(lo + j - n_pos - 1, 0):]
                x = mtp.combine(levels[j - 1].at(lo, n_pos), model.model.embed_tokens(mx.concatenate(ahead, axis=1)))
                mask = None if full is None else padding_mask(full[:, :n_pos], n_pos - lo, lo)
                out = mtp(x, c.layers[0], lo, None, mask)
                c.seq_len = n_pos
                if levels[j] is None:
                    levels[j] = _Level(out)
                else:
                    levels[j].put(out, lo)
                draft_logits = model.head(mtp.shared_head.norm(out[:, -1])).astype(mx.float32)
                if greedy:
                    drafts.append(draft_logits.argmax(-1).astype(seq.dtype)[:, None])
                else:
                    q.append(sampling_probs(draft_logits, temperature, top_k, top_p))
                    drafts.append(mx.random.categorical(mx.log(q[-1]), key=keys()).astype(seq.dtype)[:, None])

            d = mx.concatenate(drafts, axis=1) if drafts else mx.zeros((b, 0), seq.dtype)
            hv = model.hidden_states(mx.concatenate([seq[:, n_pos:], d], axis=1), cache,
                                     None if full is None else full[:, :n_pos + k + 1], check_values=False)
            logits = model.head(hv).astype(mx.float32)  # (B, k + 1, V): the target at positions n_pos .. n_pos + k
            stats.steps += 1
            if greedy:
                cand = logits.argmax(-1).astype(seq.dtype)  # an accepted draft equals it; after them the correction
                ok = d == cand[:, :k]
            else:
                cand, ok = _reject(sampling_probs(logits, temperature, top_k, top_p), q, d, keys)
            prefix = mx.cumprod(ok.astype(mx.int32), axis=-1)  # (B, k): 1 while every draft so far is accepted
            active = ~done
            n_min = mx.where(done, k, prefix.sum(-1)).min()
            drafted = drafted + mx.where(mx.arange(k_max) < k, active.sum(), 0).astype(mx.int32)
            accepted = accepted + mx.pad((prefix * active[:, None]).sum(0).astype(mx.int32), (0, k_max - k))
            live = (positions[None, :k + 1] <= n_min) & active[:, None]  # (B, k + 1): tokens this step emits
            new = mx.where(done[:, None], fill, cand)
            last = mx.array(-1)
            if stops:
                hit = _is_stop(new, stop_arr) & live
                hits = hit.astype(mx.int32)
                after = (mx.cumsum(hits, axis=-1) - hits) > 0  # positions after a row's stop token
                new = mx.where(after, fill, new)
                live = live & ~after
                stopped = hit.any(-1)
                last = mx.where(stopped, hits.argmax(-1).astype(mx.int32), -1).max()  # where the last row stops
                done = done | stopped
            tokens = tokens + live.sum()
            info = mx.stack([n_min.astype(mx.int32), mx.isfinite(logits).all().astype(mx.int32),
                             done.all().astype(mx.int32), last.astype(mx.int32)])
            mx.eval(info, new, hv, done, drafted, accepted, tokens, [lv.h for lv in levels if lv is not None])
            n, finite, finished, last = info.tolist()
            if not finite:
                raise ValueError(f"speculative_generate: non-finite logits for the tokens at positions {n_pos + 1} .. "
                                 f"{n_pos + k + 1}")
            m = last + 1 if finished else n + 1
            seq = mx.concatenate([seq, new[:, :m]], axis=1)
            emitted += m
            if finished:
                break
            n_pos += m  # roll back: the cache keeps the fed tokens that were emitted
            cache.crop(n_pos)
            levels[0].put(hv[:, :m], n_pos - m)
            levels[0].keep(n_pos, k_max + 1)
            for j, c in enumerate(mtp_caches, start=1):
                valid = max(min(c.seq_len, n_pos - j), 0)
                if valid < c.seq_len:
                    c.crop(valid)
                if levels[j] is not None:
                    levels[j].keep(valid, k_max + 1)
    mx.eval(seq)
    stats.drafted, stats.accepted, stats.tokens = drafted.tolist(), accepted.tolist(), tokens.item()
    return seq, stats


class _Keys:
    """PRNG keys for successive draws: split from ``generator`` (an ``mx.random.key``) at every call, or None (MLX's
    global PRNG) without one."""

    def __init__(self, generator: mx.array | None):
        self.generator = generator

    def __call__(self) -> mx.array | None:
        if self.generator is None:
            return None
        self.generator, key = mx.random.split(self.generator)
        return key


def _is_stop(tokens: mx.array, stop_arr: mx.array) -> mx.array:
    """Boolean, ``tokens``' shape: the token is one of ``stop_arr`` (1-D; ``[-1]`` when there are no stops)."""
    return (tokens[..., None] == stop_arr).any(-1)


def _reject(p: mx.array, q: list[mx.array], d: mx.array, keys: _Keys) -> tuple[mx.array, mx.array]:
    """The rejection rule of speculative sampling (Leviathan et al. 2023, Algorithm 1; Chen et al. 2023) for every
    row and position, as `reference.speculative._reject`. ``p`` (B, k + 1, V) target probabilities at the k drafts'
    positions and the next one, ``q`` k draft distributions (B, V) each, ``d`` (B, k) the drafts drawn from them.
    Returns ``cand`` (B, k + 1) in ``d``'s dtype, the row's tokens if the step emits its first ``i + 1`` (its drafts
    while accepted, then at its first rejection a draw from ``norm(max(0, p - q))``, or after k acceptances a bonus
    draw from ``p``), and ``ok`` (B, k) bool, each draft's acceptance (``u < p(d) / q(d)``, u uniform on [0, 1))."""
    b, k = d.shape
    qs = mx.stack(q, axis=1) if q else mx.zeros((b, 0, p.shape[-1]), p.dtype)
    idx = d[..., None].astype(mx.int32)
    u = mx.random.uniform(shape=(b, k), key=keys())
    ok = u * mx.take_along_axis(qs, idx, axis=-1)[..., 0] < mx.take_along_axis(p[:, :k], idx, axis=-1)[..., 0]
    n = mx.cumprod(ok.astype(mx.int32), axis=-1).sum(-1)  # (B,) accepted drafts of each row
    resid = mx.concatenate([mx.maximum(p[:, :k] - qs, 0), p[:, k:]], axis=1)
    resid = mx.take_along_axis(resid, n[:, None, None], axis=1)[:, 0]  # (B, V)
    # p == q up to rounding leaves no residual mass; a rejection is then (almost) impossible: p is the limit
    resid = mx.where(resid.sum(-1, keepdims=True) > 0, resid, mx.take_along_axis(p, n[:, None, None], axis=1)[:, 0])
    x = mx.random.categorical(mx.log(resid), key=keys()).astype(d.dtype)[:, None]  # (B, 1), unnormalized is fine
    cand = mx.where(mx.arange(k + 1)[None] < n[:, None], mx.concatenate([d, x], axis=1), x)
    return cand, ok
