"""Batched sampling with the KV cache on every backend: the rollouts of ``dsfs grpo`` and the batches of
``dsfs generate`` and of task accuracy (`dsfs.tasks.accuracy`).

One loop for every backend. The model (``reference.Model``, ``runtime_cuda.Model`` or ``runtime_mlx.Model``) is
only called as ``model(input_ids, cache, attention_mask=mask)`` for the last position's logits; sampling, stops
and tool calls run here in torch (MLX logits are copied to torch once per step: (B, vocab) floats).

- **Left padding.** Prompts of different lengths are left-padded to the longest of their batch with an
  ``attention_mask`` (B, S), 0 on padding, which the model honours on every backend (padding keys are never
  attended). Positions are not shifted: RoPE is relative, so a padded prompt scores as it does alone.
- **Stops.** Each sequence stops on its own: at one of ``stop_token_ids`` (kept as its last token, as TRL keeps the
  eos), at a ``stop_strings`` match in its decoded text (the token that completes the match is the last one), or
  after ``max_new_tokens`` tokens, or at ``max_position_embeddings``.
- **Sampling.** ``temperature`` 0 is greedy; otherwise temperature, ``top_k`` and ``top_p`` as
  `reference.model.sample_next`. Every sequence draws from its own ``torch.Generator`` seeded with its entry of
  ``seeds``, so a sequence's tokens do not depend on what else is in its batch: a batch equals the same prompts
  generated one by one, greedy and sampled.
- **Log-probs.** ``logps[t]`` is the sampled token's log-probability under ``softmax(logits / temperature)``
  (temperature 1 when greedy), before top-k / top-p filtering: the quantity TRL's GRPO loss recomputes
  (``_get_per_token_logps`` divides the logits by the temperature).
- **Tools.** With ``tools`` (a name -> ``f(**arguments) -> str`` dict, `dsfs.tools.TOOLS`), a sequence that emits
  ``</tool_call>`` pauses: the text since its last ``<tool_call>`` is run by `dsfs.tools.run_tool_call`, and
  ``<tool_response>{result}</tool_response>`` is fed to it token by token through the cache while the other
  sequences go on sampling; then it resumes. These tokens have ``loss_mask`` 0 and log-prob 0. After
  ``max_tool_calls`` calls, a further call gets an error response.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from dsfs.data import TOOL_TOKENS, require_special_tokens
from reference.model import check_sampling, sample_next


@dataclass
class Completion:
    """One sampled completion.

    ``prompt_ids``: the prompt (no padding); ``ids``: the completion's tokens, the stop token included and
    tool responses included; ``logps``: float32 log-probabilities of ``ids`` (see the module docstring; 0.0 for
    tool-response tokens); ``loss_mask``: 1 for tokens the model sampled, 0 for tool-response tokens;
    ``finish_reason``: ``"stop"`` (a stop token or string) or ``"length"`` (``max_new_tokens`` or the model's
    ``max_position_embeddings``); ``tool_calls``: calls made."""

    prompt_ids: list[int]
    ids: list[int] = field(default_factory=list)
    logps: list[float] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    finish_reason: str = "length"
    tool_calls: int = 0


class _Torch:
    """The forward of a torch model: (B, T) ids, cache, (B, S) mask -> (B, V) float32 logits of the last position."""

    def __init__(self, model):
        self.model = model
        self.device = next(model.parameters()).device

    def __call__(self, ids: torch.Tensor, cache, mask: torch.Tensor) -> torch.Tensor:
        mask = None if bool(mask.all()) else mask.to(self.device)  # no padding: the kernels' fast path
        with torch.no_grad():
            out = self.model(ids.to(self.device), cache, attention_mask=mask)
        return out[:, -1].float()


class _MLX:
    """The forward of a ``runtime_mlx.Model``, its logits copied to a float32 CPU torch tensor."""

    def __init__(self, model):
        import mlx.core as mx

        self.mx, self.model, self.device = mx, model, torch.device("cpu")

    def __call__(self, ids: torch.Tensor, cache, mask: torch.Tensor) -> torch.Tensor:
        mx = self.mx
        out = self.model(mx.array(ids.numpy()), cache,
                         attention_mask=None if bool(mask.all()) else mx.array(mask.numpy()))
        return torch.from_numpy(np.array(out[:, -1].astype(mx.float32)))


def _backend(model):
    return _Torch(model) if isinstance(model, torch.nn.Module) else _MLX(model)


def sequence_seeds(seed: int, n: int, start: int = 0) -> list[int]:
    """Seeds of sequences ``start .. start + n - 1`` of a run seeded with ``seed``: distinct 63-bit integers that
    depend on (``seed``, index) only, so a sequence samples the same tokens whichever batch it is generated in."""
    base = np.random.SeedSequence(seed).generate_state(2, np.uint64)
    return [int((int(base[0]) + (start + i) * int(base[1] | 1)) % (1 << 63)) for i in range(n)]




class _Tools:
    """The tool-call state machine of one batch (module docstring, **Tools**)."""

    def __init__(self, tools: dict[str, Callable[..., str]], tokenizer, max_tool_calls: int):
        from dsfs.tools import run_tool_call

        self.run_tool_call = run_tool_call
        require_special_tokens(tokenizer, TOOL_TOKENS, "tool calls")
        self.tools, self.tokenizer, self.max_calls = tools, tokenizer, max_tool_calls
        self.call, self.end_call, self.response, self.end_response = (tokenizer.token_to_id(t) for t in TOOL_TOKENS)

    def response_ids(self, c: Completion) -> list[int]:
        """Run the call that ``c`` has just closed; the ids of ``<tool_response>…</tool_response>``."""
        ids = c.ids
        start = len(ids) - 1 - ids[::-1].index(self.call) if self.call in ids else None
        if c.tool_calls >= self.max_calls:
            result = f"error: at most {self.max_calls} tool calls per completion"
        elif start is None or self.end_call in ids[start + 1:-1]:  # no <tool_call> open since the last call
            result = "error: </tool_call> without <tool_call>"
        else:
            text = self.tokenizer.decode(ids[start + 1:-1], skip_special_tokens=False)
            result = self.run_tool_call(text, self.tools)
        c.tool_calls += 1
        return [self.response, *self.literal(result), self.end_response]

    def literal(self, text: str) -> list[int]:
        """The ids of ``text`` with special-token strings in it encoded as plain text: a tool's error message may
        repeat the model's input, and a ``</tool_response>`` or eos there must not close the response."""
        tok, before = self.tokenizer, self.tokenizer.encode_special_tokens
        tok.encode_special_tokens = True
        try:
            return tok.encode(text, add_special_tokens=False).ids
        finally:
            tok.encode_special_tokens = before


def _batches(rows: list[list[int]], batch_size: int, padding: bool, tools: bool) -> list[tuple[int, int]]:
    """``(start, end)`` of each forward batch of ``rows``: ``batch_size`` rows at a time, or, for a model without
    padding masks (``supports_padding`` False: DeepSeek-V4), runs of copies of one prompt only (one row at a time with
    tools, whose replies differ in length). Seeds are per row, so the batching changes no result."""
    if padding:
        return [(s, min(s + batch_size, len(rows))) for s in range(0, len(rows), batch_size)]
    spans, s = [], 0
    while s < len(rows):
        e = s + 1
        while not tools and e < len(rows) and e - s < batch_size and rows[e] == rows[s]:
            e += 1
        spans.append((s, e))
        s = e
    return spans


def rollout(
    model,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    num_generations: int = 1,
    seeds: Sequence[int] | None = None,
    seed: int = 0,
    stop_token_ids: Sequence[int] = (),
    stop_strings: Sequence[str] = (),
    tokenizer=None,
    tools: dict[str, Callable[..., str]] | None = None,
    max_tool_calls: int = 4,
    pad_token_id: int | None = None,
    batch_size: int = 64,
    use_cache: bool = True,
) -> list[Completion]:
    """Sample ``num_generations`` completions of each prompt (see the module docstring).

    ``prompts``: token-id lists (at least one token each). Returns ``len(prompts) * num_generations``
    `Completion` s, prompt-major (prompt 0's generations first, as TRL's ``RepeatSampler`` orders them).
    ``seeds``: one per completion (default `sequence_seeds` of ``seed``); ``batch_size``: sequences per forward
    batch (results do not depend on it, except that a batch's room under ``max_position_embeddings`` is set by its
    longest prompt). ``stop_strings`` and ``tools`` need ``tokenizer`` (a
    ``tokenizers.Tokenizer``). ``pad_token_id``: the id that fills left padding (masked, so any id; default the
    config's pad or 0). ``use_cache=False`` reruns the whole sequence at every step (the check of the cache). The
    model is put in eval mode and restored. Raises ``ValueError`` for a bad option or an
    empty prompt, and `DataError` when tools or stop strings lack what they need in ``tokenizer``.
    """
    check_sampling(temperature, top_k, top_p)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens: expected >= 0, got {max_new_tokens}")
    if num_generations < 1 or batch_size < 1 or max_tool_calls < 0:
        raise ValueError(f"num_generations={num_generations}, batch_size={batch_size}, "
                         f"max_tool_calls={max_tool_calls}: expected >= 1, >= 1 and >= 0")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("rollout: every prompt needs at least one token (chat prompts start with bos)")
    if (stop_strings or tools) and tokenizer is None:
        raise ValueError("rollout: stop_strings and tools need the tokenizer")
    rows = [list(p) for p in prompts for _ in range(num_generations)]
    if seeds is None:
        seeds = sequence_seeds(seed, len(rows))
    if len(seeds) != len(rows):
        raise ValueError(f"seeds: expected {len(rows)} (one per completion), got {len(seeds)}")
    cfg = model.config
    if pad_token_id is None:
        pad_token_id = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    tool_state = _Tools(tools, tokenizer, max_tool_calls) if tools else None
    fwd = _backend(model)
    was_training = model.training
    model.eval()
    out: list[Completion] = []
    try:
        for s, e in _batches(rows, batch_size, getattr(model, "supports_padding", True), bool(tools)):
            out += _rollout_batch(fwd, model, rows[s:e], seeds[s:e], max_new_tokens,
                                  temperature, top_k, top_p, set(stop_token_ids), tuple(stop_strings), tokenizer,
                                  tool_state, pad_token_id, use_cache)
    finally:
        model.train(was_training)
    return out


def _rollout_batch(fwd, model, prompts, seeds, max_new_tokens, temperature, top_k, top_p, stop_ids, stop_strings,
                   tokenizer, tools: _Tools | None, pad_id: int, use_cache: bool) -> list[Completion]:
    """`rollout` of one batch (every argument resolved)."""
    b, width = len(prompts), max(len(p) for p in prompts)
    budget = min(max_new_tokens, model.config.max_position_embeddings - width)
    comps = [Completion(prompt_ids=p) for p in prompts]
    if budget <= 0:
        return comps
    ids, mask = left_pad(prompts, pad_id)
    gens = [torch.Generator(device=fwd.device).manual_seed(s) for s in seeds]
    forced: list[collections.deque] = [collections.deque() for _ in range(b)]
    done = [False] * b
    cache = model.new_cache() if use_cache else None
    logits = fwd(ids, cache, mask)
    for step in range(budget):
        if not bool(torch.isfinite(logits).all()):
            raise ValueError(f"rollout: non-finite logits at step {step} of the batch "
                             "(broken weights or an overflow)")
        scaled = logits / (temperature if temperature > 0 else 1.0)
        logp_all = F.log_softmax(scaled, dim=-1)
        nxt = torch.full((b,), pad_id, dtype=torch.long)
        for i, c in enumerate(comps):
            if done[i]:
                continue
            if forced[i]:
                tok, logp, learn = forced[i].popleft(), 0.0, 0
            else:
                tok = int(sample_next(logits[i:i + 1], temperature, top_k, top_p, gens[i])[0])
                logp, learn = float(logp_all[i, tok]), 1
            c.ids.append(tok)
            c.logps.append(logp)
            c.loss_mask.append(learn)
            nxt[i] = tok
            if not learn:
                continue
            if tok in stop_ids or (stop_strings and _ends_with_stop(c.ids, tokenizer, stop_strings)):
                done[i], c.finish_reason = True, "stop"
            elif tools is not None and tok == tools.end_call:
                forced[i].extend(tools.response_ids(c))
        if all(done) or step == budget - 1:
            break
        mask = torch.cat((mask, torch.ones((b, 1), dtype=torch.bool)), dim=1)
        ids = torch.cat((ids, nxt[:, None]), dim=1)
        logits = fwd(nxt[:, None] if use_cache else ids, cache, mask)
    return comps


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts (token-id lists, at least one) left-padded to the longest: ``ids`` (B, W) int64 with ``pad_id`` in
    the padding and ``attention_mask`` (B, W) bool, False on the padding (the batch layout of module docstring,
    **Left padding**)."""
    b, width = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    mask = torch.zeros((b, width), dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = True
    return ids, mask


def speculative_rollout(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, temperature: float = 1.0,
                        top_k: int | None = None, top_p: float | None = None, num_generations: int = 1,
                        seed: int = 0, stop_token_ids: Sequence[int] = (), pad_token_id: int | None = None,
                        num_speculative_tokens: int | None = None):
    """Sample ``num_generations`` completions of each prompt in one left-padded batch by MTP speculative decoding
    (`reference.speculative.speculative_generate` for a torch model, `runtime_mlx.speculative.speculative_generate`
    for a ``runtime_mlx.Model``). Returns ``(completions, stats)``: each completion's token ids (prompt-major, the stop
    token included, as `Completion.ids`) and the `reference.speculative.SpeculativeStats` of the batch.

    Greedy (``temperature`` 0) gives the tokens of `rollout`; sampled tokens follow the same distribution, drawn from
    one generator seeded with ``seed`` for the whole batch (not `rollout`'s per-sequence seeds, so a sequence's sample
    depends on its batch). Every sequence stops at ``stop_token_ids``, after ``max_new_tokens`` or at the model's
    ``max_position_embeddings`` (a batch's room is set by its longest prompt). The model is put in eval mode and
    restored. Raises ``ValueError`` for a bad option, an empty prompt or a model without MTP modules.
    """
    check_sampling(temperature, top_k, top_p)
    if max_new_tokens < 0 or num_generations < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}, num_generations={num_generations}: expected >= 0 and >= 1")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("speculative_rollout: every prompt needs at least one token (chat prompts start with bos)")
    rows = [list(p) for p in prompts for _ in range(num_generations)]
    cfg = model.config
    if pad_token_id is None:
        pad_token_id = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    ids, mask = left_pad(rows, pad_token_id)
    budget = max(min(max_new_tokens, cfg.max_position_embeddings - ids.shape[1]), 0)
    args = dict(temperature=temperature, top_k=top_k, top_p=top_p, stop_tokens=list(stop_token_ids),
                num_speculative_tokens=num_speculative_tokens)
    was_training = model.training
    model.eval()
    try:
        if isinstance(model, torch.nn.Module):
            from reference.speculative import speculative_generate

            dev = next(model.parameters()).device
            gen = torch.Generator(device=dev).manual_seed(seed)
            out, stats = speculative_generate(model, ids.to(dev), budget, generator=gen, attention_mask=mask.to(dev),
                                              **args)
            out = out.cpu()
        else:
            import mlx.core as mx

            from runtime_mlx.speculative import speculative_generate

            out, stats = speculative_generate(model, mx.array(ids.numpy()), budget, generator=mx.random.key(seed),
                                              attention_mask=mx.array(mask.numpy()), **args)
            out = torch.from_numpy(np.array(out.astype(mx.int64)))
    finally:
        model.train(was_training)
    stops = set(stop_token_ids)
    comps = []
    for row in out[:, ids.shape[1]:].tolist():
        end = next((i + 1 for i, tok in enumerate(row) if tok in stops), len(row))
        comps.append(row[:end])
    return comps, stats


def _ends_with_stop(ids: list[int], tokenizer, stop_strings: tuple[str, ...]) -> bool:
    """Whether the decoded text of ``ids`` contains a stop string that its last token completes (decodes only the
    tail that can hold one: as many tokens as the longest stop string has UTF-8 bytes, plus one)."""
    longest = max(len(s.encode("utf-8")) for s in stop_strings)
    tail = tokenizer.decode(ids[-(longest + 1):], skip_special_tokens=False)
    head = tokenizer.decode(ids[-(longest + 1):-1], skip_special_tokens=False)
    return any(s in tail and s not in head for s in stop_strings)


def completion_text(tokenizer, ids: Sequence[int], drop: Sequence[int] = ()) -> str:
    """A completion's text for rewards and display: decoded with its special tokens (``<think>``, ``<answer>``,
    tool tags) except the ids in ``drop`` (eos, bos, pad), which are removed first."""
    skip = set(drop)
    return tokenizer.decode([t for t in ids if t not in skip], skip_special_tokens=False)
