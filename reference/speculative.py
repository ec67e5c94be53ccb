"""Speculative decoding with the model's own Multi-Token Prediction modules (DeepSeek-V3 report section 5.4.3:
the MTP module drafts the next tokens, the main model verifies them; 85-90 % acceptance of the second token,
1.8x tokens per second).

One step, for a batch whose accepted prefix is ``t_0 .. t_N`` (the main model's cache holds positions ``0 .. N-1``;
``t_N``, the newest token, is not fed yet) and ``k`` drafts:

1. **Draft.** Draft ``j`` (1..k) comes from MTP module ``((j - 1) mod D) + 1`` (D = ``num_nextn_predict_layers``)
   at position ``N - 1`` (report eq. 21-23): ``h^j_i = Block_j(eh_proj([enorm(Emb(t_{i+j})); hnorm(h^{j-1}_i)]))``
   with ``h^0`` the main model's final-normed hidden state (as `reference.model.Model.loss` trains it), and the
   shared head on ``shared_head.norm(h^j_{N-1})`` predicts ``t_{N+j}``; ``t_{N+j-1}`` is ``t_N`` for j = 1, else
   draft ``j - 1``. With ``num_speculative_tokens`` > D the modules are reused in turn (draft ``j`` runs module
   ``(j - 1) mod D``, the rule of vLLM's DeepSeek MTP proposer, so with D = 1 the one module drafts recursively,
   fed its own block output); such drafts are an extrapolation the modules were not trained for, so their
   acceptance is lower, but the output stays exact (verification decides).
2. **Verify.** One forward of the main model over ``[t_N, d_1 .. d_k]`` through its KV cache gives the target
   logits at positions ``N .. N+k``.
3. **Accept.** Greedy (``temperature`` 0): draft ``d_i`` is accepted while it equals the target's argmax; the token
   after the accepted ones is the target's argmax there, so the output is exactly plain greedy decoding
   (`reference.model.Model.generate`), up to the float rounding of a multi-token forward against a one-token one.
   Sampling: the rejection rule of Leviathan et al. 2023 (Algorithm 1) and Chen et al. 2023: ``d_i ~ q_i`` is
   accepted with probability ``min(1, p_i(d_i) / q_i(d_i))``; at the first rejection the token is drawn from
   ``norm(max(0, p_i - q_i))``, and after ``k`` acceptances a bonus token from ``p_{k+1}``. ``p`` and ``q`` are
   both `reference.model.sampling_probs` (temperature, top-k, top-p), the distribution plain sampling draws from,
   so every token is distributed exactly as in `Model.generate` (the draws themselves differ).
4. **Batch.** Rows accept different numbers of drafts, but the caches advance together, so every row emits
   ``m = 1 + min_r n_r`` tokens (the minimum over unfinished rows ``r`` of their accepted counts): its first
   ``m - 1`` accepted drafts, then its own token at position ``m`` (its accepted draft ``d_m`` if ``n_r >= m``,
   else its correction or bonus token). This keeps the distribution exact: within a row, the tokens of a step are
   produced one position at a time, and the token at position ``i``, given the row's prefix and that its drafts
   before ``i`` were accepted, is distributed as ``p(. | prefix)`` (the lemma behind the rejection rule). Whether
   the row emits position ``i`` at all depends only on what came before it (its own acceptances before ``i`` and
   the other rows', which use independent draws), so cutting the row after ``m`` tokens is a stopping rule that
   cannot bias the tokens kept; the drafts after the cut are discarded, and the next step starts from the emitted
   prefix alone (the caches hold nothing else). Rows stay independent of each other for the same reason.
5. **Roll back.** Main cache: `reference.cache.KVCache.crop` to ``N + m`` (the fed tokens ``t_N, d_1 .. d_{m-1}``
   are the emitted ones). MTP caches: draft ``j`` has its own cache (one per draft depth, also for reused modules),
   whose position ``i`` holds the block's keys for ``t_{i+j}``; it keeps positions ``i <= N + m - 1 - j``, whose
   inputs are all emitted tokens (earlier steps' drafts at those positions were accepted), and recomputes the rest
   in the next step, together with the new positions: ``j`` positions after a rejection at the first draft, ``m``
   when all drafts are accepted. The hidden-state inputs ``h^{j-1}`` of the recomputed positions are kept from
   earlier steps (the last ``k + 1`` positions of each level).

Works for `reference.model.Model` and its subclasses (`runtime_cuda.Model`: the kernels run inside the same
methods), every attention type whose cache layers crop (MHA/GQA ``k``/``v``, MLA ``c_kv``/``k_pe``, DSA's indexer
keys ``index_k``), left-padded batches (``attention_mask``, as `dsfs.rollout`: the padding stays masked in the
main model and in every MTP layer) and ``stop_tokens``. Host syncs: one per step (the accepted count, the
finiteness of the logits and the finished rows, read together), plus the input checks of the model's forward.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from .attention import padding_mask
from .cache import KVCache
from .mla import MLA
from .model import check_sampling, sample_next, sampling_probs


@dataclass
class SpeculativeStats:
    """Counts of one `speculative_generate` call, summed over the batch's rows.

    ``drafted[j-1]``: drafts made at depth ``j`` (1..k) for unfinished rows; ``accepted[j-1]``: those a row accepted
    together with every draft before them (by its own test, before the batch's minimum cuts the step); ``steps``:
    verification forwards; ``tokens``: tokens the verification steps emitted, summed over rows (a finished row's
    filler not counted; the first token, which the prompt's forward samples, not counted either).
    """

    drafted: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    steps: int = 0
    tokens: int = 0

    @property
    def acceptance(self) -> list[float]:
        """Per depth ``j``: ``accepted / drafted``, the rate at which the ``j``-th draft of a step is accepted (with
        all before it; depth 1 is the report's "acceptance rate of the second token"); NaN where nothing was
        drafted."""
        return [a / d if d else float("nan") for a, d in zip(self.accepted, self.drafted, strict=True)]

    @property
    def tokens_per_step(self) -> float:
        """``tokens / steps``: tokens emitted per verification forward over the batch (per row for a batch of one:
        1 + the mean accepted drafts); NaN without a step."""
        return self.tokens / self.steps if self.steps else float("nan")


class _Level:
    """The outputs of one level of the draft chain (0: the main model's final-normed hidden states, j >= 1: MTP
    draft ``j``'s block output), (B, W, hidden) at the positions ``start .. start + W - 1``."""

    def __init__(self, h: torch.Tensor, start: int = 0):
        self.h, self.start = h, start

    def at(self, lo: int, hi: int) -> torch.Tensor:
        """Positions ``lo .. hi - 1`` (B, hi - lo, hidden)."""
        return self.h[:, lo - self.start:hi - self.start]

    def put(self, out: torch.Tensor, lo: int) -> None:
        """Replace positions >= ``lo`` by ``out`` (B, T, hidden) at ``lo .. lo + T - 1``."""
        self.h = torch.cat((self.h[:, :lo - self.start], out), dim=1)

    def keep(self, end: int, width: int) -> None:
        """Drop positions >= ``end``, then keep only the last ``width`` positions."""
        h = self.h[:, :max(end - self.start, 0)]
        cut = max(h.shape[1] - width, 0)
        self.h, self.start = h[:, cut:], self.start + cut


class _Drafter:
    """The MTP side of speculative decoding (module docstring, steps 1 and 5): per draft depth ``j`` (1..``k_max``)
    a one-layer `KVCache` of MTP module ``(j - 1) mod D`` and the level of its block outputs; level 0 holds the main
    model's hidden states. ``h`` (B, T, hidden): the main model's final-normed hidden states of the prompt; ``full``:
    the batch's padding mask over every position (B, S) bool, or None; ``sampling``: (temperature, top_k, top_p)
    with temperature > 0, or None for greedy drafts."""

    def __init__(self, model, h: torch.Tensor, k_max: int, full: torch.Tensor | None, sampling, generator):
        self.model, self.full, self.sampling, self.generator = model, full, sampling, generator
        self.width = k_max + 1  # positions of each level a later step may need again
        self.levels = [_Level(h)] + [None] * k_max
        self.caches = [KVCache(1) for _ in range(k_max)]

    def draft(self, seq: torch.Tensor, n_pos: int, k: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``k`` drafts (B, k) int64 for the positions after ``seq`` (B, n_pos + 1), whose last token the main model
        has not seen, and their draft distributions (k tensors (B, V); none when greedy). Draft ``j`` runs its module
        over the positions its cache lacks, ``lo .. n_pos - 1``, fed the tokens ``j`` ahead (the last ``j - 1`` of them
        drafts) and the level ``j - 1`` below, and predicts from position ``n_pos - 1``."""
        model, drafts, q = self.model, [], []
        depth = len(model.mtp)
        for j in range(1, k + 1):
            mtp, cache = model.mtp[(j - 1) % depth], self.caches[j - 1]
            lo = cache.seq_len
            ahead = seq[:, lo + j:]
            if drafts:
                ahead = torch.cat((ahead, torch.stack(drafts[max(lo + j - n_pos - 1, 0):], dim=1)), dim=1)
            x = mtp.combine(self.levels[j - 1].at(lo, n_pos), model.model.embed_tokens(ahead))
            cos, sin = model.rotary(n_pos - lo, lo, x.device, x.dtype)
            mask = None if self.full is None else padding_mask(self.full[:, :n_pos], n_pos - lo, lo)
            out = mtp(x, cos, sin, cache.layers[0], lo, mask)
            cache.seq_len = n_pos
            if self.levels[j] is None:
                self.levels[j] = _Level(out)
            else:
                self.levels[j].put(out, lo)
            logits = model.lm_head(mtp.shared_head.norm(out[:, -1])).float()
            if self.sampling is None:
                drafts.append(logits.argmax(-1))
            else:
                q.append(sampling_probs(logits.nan_to_num(), *self.sampling))  # broken MTP weights: bad drafts
                drafts.append(torch.multinomial(q[-1], 1, generator=self.generator).squeeze(-1))
        return (torch.stack(drafts, dim=1) if drafts else seq.new_zeros(seq.shape[0], 0)), q

    def advance(self, h: torch.Tensor, n_pos: int) -> None:
        """The main model emitted ``m`` tokens and now holds ``n_pos`` positions; ``h`` (B, m, hidden) its hidden
        states at ``n_pos - m .. n_pos - 1``. Draft ``j`` keeps the positions ``< n_pos - j``, whose inputs are all
        emitted tokens (`reference.cache.KVCache.crop`)."""
        self.levels[0].put(h, n_pos - h.shape[1])
        self.levels[0].keep(n_pos, self.width)
        for j, cache in enumerate(self.caches, start=1):
            valid = max(min(cache.seq_len, n_pos - j), 0)
            if valid < cache.seq_len:
                cache.crop(valid)
            if self.levels[j] is not None:
                self.levels[j].keep(valid, self.width)


def check_speculative_args(model, max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None,
                           num_speculative_tokens: int | None) -> tuple[int, int]:
    """``(depth, drafts per step)`` of ``model`` (torch or MLX: anything with an ``mtp`` module list) for the
    arguments of `speculative_generate`. Raises ``ValueError`` for a model without MTP modules, ``max_new_tokens`` < 0,
    ``num_speculative_tokens`` not None nor an integer >= 1, or bad sampling options (`check_sampling`)."""
    if getattr(model.config, "model_type", None) == "deepseek_v4":
        raise ValueError("speculative decoding: DeepSeek-V4's cache cannot roll back rejected drafts (its "
                         "compressors' running windows are stateful, as in transformers' V4); decode without it")
    depth = len(model.mtp)
    if depth == 0:
        raise ValueError("speculative_generate: the model has no MTP modules (num_nextn_predict_layers 0, or a "
                         "checkpoint saved without them); expected MTP depth >= 1")
    k_max = depth if num_speculative_tokens is None else num_speculative_tokens
    if isinstance(k_max, bool) or not isinstance(k_max, int) or k_max < 1:
        raise ValueError(f"num_speculative_tokens: expected None or an integer >= 1, got {num_speculative_tokens}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens: expected >= 0, got {max_new_tokens}")
    check_sampling(temperature, top_k, top_p)
    return depth, k_max


def speculative_generate(model, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                         top_k: int | None = None, top_p: float | None = None, stop_tokens=None,
                         generator: torch.Generator | None = None, num_speculative_tokens: int | None = None,
                         attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, SpeculativeStats]:
    """Generate with MTP drafts verified by the main model (see the module docstring for the algorithm).

    ``model``: a `reference.model.Model` (or `runtime_cuda.Model`) with MTP modules, in eval mode. ``input_ids``
    (B, T) int64 -> ((B, T + n) int64, `SpeculativeStats`), n <= ``max_new_tokens``, the output contract of
    `reference.model.Model.generate`: ``temperature`` 0 is greedy (the same tokens as ``generate``), otherwise
    temperature, ``top_k`` and ``top_p`` as `reference.model.sample_next`, drawn with ``generator``; a row that emits
    one of ``stop_tokens`` is finished, later positions are filled with ``pad_token_id`` (or the first stop token),
    and generation ends when every row is finished. ``num_speculative_tokens``: drafts per step (default: the MTP
    depth ``num_nextn_predict_layers``; more reuses the modules in turn). ``attention_mask``: (B, T) bool or integer,
    1 = real token, 0 = left padding (as ``dsfs.rollout`` pads a batch of prompts), or None.

    Raises ``ValueError`` for a model without MTP modules, bad options (`reference.model.check_sampling`,
    ``max_new_tokens`` < 0, ``num_speculative_tokens`` < 1), a bad ``attention_mask`` and non-finite logits.

    Runs under ``torch.inference_mode`` (less overhead per op than ``no_grad``; the returned ids are an ordinary
    tensor). MLA and DSA layers attend in the absorbed form over the latent cache for every step after the prompt
    (verification and drafts, as a one-token decode step does; `reference.mla.MLA.absorb`, restored afterwards):
    the naive form would up-project the whole cache at every step.
    """
    with torch.inference_mode():
        seq, stats = _generate(model, input_ids, max_new_tokens, temperature, top_k, top_p, stop_tokens, generator,
                               num_speculative_tokens, attention_mask)
    return seq.clone(), stats


def _generate(model, input_ids, max_new_tokens, temperature, top_k, top_p, stop_tokens, generator,
              num_speculative_tokens, attention_mask):
    """`speculative_generate` in inference mode."""
    _, k_max = check_speculative_args(model, max_new_tokens, temperature, top_k, top_p, num_speculative_tokens)
    stats = SpeculativeStats([0] * k_max, [0] * k_max)
    if max_new_tokens == 0:
        return input_ids, stats
    greedy = temperature == 0
    dev = input_ids.device
    b, t = input_ids.shape
    stops = torch.tensor(sorted(set(stop_tokens or [])), dtype=torch.long, device=dev)
    cfg = model.config
    fill = cfg.pad_token_id if cfg.pad_token_id is not None else (int(stops[0]) if stops.numel() else 0)

    cache = model.new_cache()
    h = model.hidden_states(input_ids, cache, attention_mask)  # checks the ids and the mask
    full = None  # the padding mask over every position a step can reach, or None without padding
    if attention_mask is not None and not bool(attention_mask.all()):
        full = torch.cat((attention_mask.to(dev, torch.bool),
                          torch.ones(b, max_new_tokens + k_max, dtype=torch.bool, device=dev)), dim=1)
    logits = model.lm_head(h[:, -1]).float()
    if not bool(torch.isfinite(logits).all()):
        raise ValueError(f"speculative_generate: non-finite logits for the token at position {t}")
    nxt = sample_next(logits, temperature, top_k, top_p, generator)
    seq = torch.cat((input_ids, nxt[:, None]), dim=1)
    done = torch.isin(nxt, stops)
    if stops.numel() and bool(done.all()):
        return seq, stats

    drafter = _Drafter(model, h, k_max, full, None if greedy else (temperature, top_k, top_p), generator)
    drafted = torch.zeros(k_max, dtype=torch.long, device=dev)
    accepted = torch.zeros(k_max, dtype=torch.long, device=dev)
    tokens = torch.zeros((), dtype=torch.long, device=dev)
    positions = torch.arange(k_max + 1, device=dev)
    n_pos, emitted = t, 1  # the main cache holds positions < n_pos; seq[:, n_pos] is the newest token
    with absorbed(model):
        while emitted < max_new_tokens:
            k = min(k_max, max_new_tokens - emitted - 1)
            d, q = drafter.draft(seq, n_pos, k)
            hv = model.hidden_states(torch.cat((seq[:, n_pos:], d), dim=1), cache,
                                     None if full is None else full[:, :n_pos + k + 1])
            logits = model.lm_head(hv).float()  # (B, k + 1, V): the target at positions n_pos .. n_pos + k
            stats.steps += 1
            if greedy:
                cand = logits.argmax(-1)  # an accepted draft equals it; after the accepted ones it is the correction
                ok = d == cand[:, :k]
            else:
                # non-finite logits raise below, after the step's one host sync; until then they must not crash
                cand, ok = _reject(sampling_probs(logits.nan_to_num(), temperature, top_k, top_p), q, d, generator)
            prefix = ok.long().cumprod(-1)  # (B, k): 1 while every draft so far is accepted
            active = ~done
            n_min = prefix.sum(-1).masked_fill(done, k).min()
            drafted[:k] += active.sum()
            accepted[:k] += (prefix * active[:, None]).sum(0)
            live = (positions[:k + 1] <= n_min) & active[:, None]  # (B, k + 1): the tokens this step emits
            new = cand.masked_fill(done[:, None], fill)
            last = n_min.new_tensor(-1)
            if stops.numel():
                hit = torch.isin(new, stops) & live
                after = (hit.cumsum(-1) - hit.long()) > 0  # the positions after a row's stop token
                new = new.masked_fill(after, fill)
                live &= ~after
                stopped = hit.any(-1)
                last = torch.where(stopped, hit.long().argmax(-1), -1).max()  # where the last row to stop stops
                done = done | stopped
            tokens += live.sum()
            n, finite, finished, last = torch.stack(
                (n_min, torch.isfinite(logits).all().long(), done.all().long(), last)).tolist()  # the one host sync
            if not finite:
                raise ValueError(f"speculative_generate: non-finite logits for the tokens at positions {n_pos + 1} .. "
                                 f"{n_pos + k + 1}")
            m = last + 1 if finished else n + 1
            seq = torch.cat((seq, new[:, :m]), dim=1)
            emitted += m
            if finished:
                break
            n_pos += m
            cache.crop(n_pos)  # the fed tokens t_N, d_1 .. d_{m-1} were emitted; the rest is rolled back
            drafter.advance(hv[:, :m], n_pos)
    stats.drafted, stats.accepted, stats.tokens = drafted.tolist(), accepted.tolist(), int(tokens)
    return seq, stats


@contextmanager
def absorbed(model, mla_cls=MLA):
    """Within: every ``mla_cls`` (MLA / DSA) layer of ``model`` (main and MTP; torch, or MLX with
    ``runtime_mlx.mla.MLA``) whose ``absorb`` is None (automatic) attends in the absorbed form, also for the few
    tokens of a speculative step; the automatic choice is restored on exit."""
    layers = [m for m in model.modules() if isinstance(m, mla_cls) and m.absorb is None]
    for m in layers:
        m.absorb = True
    try:
        yield
    finally:
        for m in layers:
            m.absorb = None


def _reject(p: torch.Tensor, q: list[torch.Tensor], d: torch.Tensor, generator: torch.Generator | None):
    """The rejection rule of speculative sampling (Leviathan et al. 2023, Algorithm 1; Chen et al. 2023) for every
    row and position. ``p`` (B, k + 1, V) target probabilities at the k drafts' positions and the next one, ``q``
    k draft distributions (B, V) each, ``d`` (B, k) the drafts drawn from them. Returns ``cand`` (B, k + 1) int64, the
    row's tokens if the step emits its first ``i + 1`` (its drafts while accepted, then at its first rejection a draw
    from ``norm(max(0, p - q))``, or after k acceptances a bonus draw from ``p``), and ``ok`` (B, k) bool, each
    draft's acceptance (``u < p(d) / q(d)`` with u uniform on [0, 1))."""
    b, k = d.shape
    qs = torch.stack(q, dim=1) if q else p.new_zeros(b, 0, p.shape[-1])
    idx = d[..., None]
    u = torch.rand((b, k), generator=generator, device=p.device)
    ok = u * qs.gather(-1, idx).squeeze(-1) < p[:, :k].gather(-1, idx).squeeze(-1)  # u < p/q; q(d) > 0
    n = ok.long().cumprod(-1).sum(-1)  # (B,) accepted drafts of each row
    rows = torch.arange(b, device=p.device)
    resid = torch.cat(((p[:, :k] - qs).clamp(min=0), p[:, k:]), dim=1)[rows, n]  # (B, V)
    # p == q up to rounding leaves no residual mass; a rejection is then (almost) impossible: p is the limit
    resid = torch.where(resid.sum(-1, keepdim=True) > 0, resid, p[rows, n])
    x = torch.multinomial(resid, 1, generator=generator)  # (B, 1), normalized by multinomial
    cand = torch.where(torch.arange(k + 1, device=p.device) < n[:, None], torch.cat((d, x), dim=1), x)
    return cand, ok
