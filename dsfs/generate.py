"""Text generation and validation loss: the helpers behind ``dsfs generate`` and ``dsfs eval`` (whose loss is
`dsfs.evaluation.evaluate`, the trainer's).

Prompts are encoded with the checkpoint's ``tokenizer.json`` and preceded by the eos token: in the packed
training stream every document follows the previous document's eos, so this is the context the model saw at
the start of each story (and an empty prompt works). With ``chat`` (``dsfs generate --chat``) the prompt is one
user message of the chat template instead (`dsfs.chat`), and only the assistant's reply is returned.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from dsfs.checkpointing import CheckpointError, load_model_dir, resolve_model_dir
from dsfs.data import BOS, EOS, PAD, DataError, file_sha256, load_meta, load_tokens, plural, read_tokenizer
from dsfs.evaluation import eval_batches, eval_starts, evaluate  # noqa: F401 (eval_starts: imported from here too)


def pick_device(name: str = "auto") -> torch.device:
    """``auto``: cuda when available, else cpu. Otherwise the named device; ``DataError`` if unavailable."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DataError("device cuda requested but CUDA is not available (torch.cuda.is_available() is False)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise DataError("device mps requested but MPS is not available")
    return torch.device(name)


# ---------------------------------------------------------------- evaluation


def check_tokenizer(model_dir: str | os.PathLike, data_dir: str | os.PathLike, vocab_size: int,
                    tokenizer: str | os.PathLike | None = None) -> None:
    """Raise ``DataError`` when the data directory's tokenizer does not fit the model's (`tokenizer_file` of
    ``model_dir`` and ``tokenizer``): a data vocab larger than the model's ``vocab_size`` (a larger, padded model
    vocab is fine, as for ``dsfs train --init-from``), or a different ``tokenizer.json``.
    ``CheckpointError`` (naming ``--tokenizer PATH``) when the model has no tokenizer to compare."""
    mine = tokenizer_file(model_dir, tokenizer)
    meta = load_meta(data_dir)
    if meta["vocab_size"] > vocab_size:
        raise DataError(
            f"vocab size mismatch: the model in {model_dir} has vocab_size {vocab_size}, smaller than the "
            f"{meta['vocab_size']} of the data in {data_dir}"
        )
    theirs = Path(data_dir) / meta.get("tokenizer", "tokenizer.json")
    if theirs.is_file() and file_sha256(mine) != file_sha256(theirs):
        raise DataError(f"tokenizer mismatch: {mine} differs from {theirs} (the data was prepared with another one)")


def evaluate_checkpoint(
    checkpoint: str | os.PathLike,
    data_dir: str | os.PathLike,
    split: str = "val",
    batches: int = 16,
    batch_size: int = 16,
    seq_len: int = 256,
    device: str = "auto",
    tokenizer: str | os.PathLike | None = None,
) -> dict:
    """Load a model (see ``resolve_model_dir``) whose tokenizer (the model directory's, or ``tokenizer``: see
    `tokenizer_file`) prepared ``data_dir``, and `dsfs.evaluation.evaluate` it on ``batches`` batches of
    ``batch_size`` windows (`dsfs.evaluation.eval_batches`) of ``split`` of a prepared directory, as the trainer's
    evaluations.

    ``seq_len`` is capped at the model's ``max_position_embeddings``. Returns ``{"loss", "ppl", "tokens",
    "model_dir", "split"}`` (loss in nats/token, ``tokens`` = inputs scored). Raises ``DataError`` /
    ``CheckpointError`` for a missing checkpoint, tokenizer or data directory, a tokenizer mismatch or a too-short
    split.
    """
    model_dir = resolve_model_dir(checkpoint)
    load_tokenizer(model_dir, tokenizer)  # before the model loads: fail fast on a missing or unreadable one
    dev = pick_device(device)
    if not Path(data_dir).is_dir():
        raise DataError(f"{data_dir}: no such data directory (expected a dsfs prepare output)")
    model = load_model_dir(model_dir, device=dev)
    check_tokenizer(model_dir, data_dir, model.config.vocab_size, tokenizer)
    seq_len = min(seq_len, model.config.max_position_embeddings)
    tokens = load_tokens(data_dir, split)
    if len(tokens) < seq_len + 1:
        raise DataError(f"the {split} split of {data_dir} holds {plural(len(tokens), 'token')}: too few for --seq-len "
                        f"{seq_len} (expected at least {seq_len + 1}); lower --seq-len")
    loss = evaluate(model, eval_batches(tokens, batch_size, seq_len, batches))
    if not math.isfinite(loss):
        raise CheckpointError(f"{model_dir}: the {split} loss is {loss}: the model's logits are not finite on this "
                              "data (its weights load as finite: broken weights or an overflow)")
    return {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "tokens": batches * batch_size * seq_len,
            "model_dir": str(model_dir), "split": split}


# ---------------------------------------------------------------- generation


@dataclass
class Generation:
    """``text``: prompt + continuation (special tokens dropped), or with ``chat`` the reply alone; ``new_tokens``:
    tokens generated (the stop token included); ``seconds``: wall time of the batch that generated it
    (`generate_texts`); ``tokens_per_s``: their ratio; ``speculative``: with speculative decoding, the batch's
    `reference.speculative.SpeculativeStats` (the same object in every generation of the batch), else None."""

    text: str
    new_tokens: int
    seconds: float
    speculative: object | None = None

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / max(self.seconds, 1e-9)


def tokenizer_file(model_dir: str | os.PathLike, tokenizer: str | os.PathLike | None = None) -> Path:
    """The ``tokenizer.json`` to use with the model in ``model_dir``: ``tokenizer`` when given (a tokenizer.json
    file, or a directory that holds one: ``--tokenizer PATH``), else the model directory's. Raises
    ``CheckpointError`` when that file does not exist; without ``tokenizer`` the one-line message says to pass
    ``--tokenizer PATH`` (checkpoints saved by ``transformers`` or taken from elsewhere often hold none)."""
    if tokenizer is not None:
        if Path(tokenizer).is_dir():
            path = Path(tokenizer) / "tokenizer.json"
            if not path.is_file():
                raise CheckpointError(f"--tokenizer {tokenizer}: the directory holds no tokenizer.json (expected a "
                                      "tokenizer.json file or a directory that holds one)")
            return path
        if not Path(tokenizer).is_file():
            raise CheckpointError(f"--tokenizer {tokenizer}: no such file (expected a tokenizer.json file or a "
                                  "directory that holds one)")
        return Path(tokenizer)
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise CheckpointError(f"{model_dir} holds no tokenizer.json: pass --tokenizer PATH (a tokenizer.json file "
                              "or a directory that holds one, e.g. the dsfs prepare output the model was trained on)")
    return path


def load_tokenizer(model_dir: str | os.PathLike, tokenizer: str | os.PathLike | None = None):
    """The ``tokenizers.Tokenizer`` of `tokenizer_file` (``tokenizer``, else the model directory's
    ``tokenizer.json``). Raises ``CheckpointError`` when absent (naming ``--tokenizer PATH``), ``DataError`` when it
    cannot be read (`dsfs.data.read_tokenizer`)."""
    return read_tokenizer(tokenizer_file(model_dir, tokenizer))


def check_prompt(prompt: str) -> None:
    """Raise ``DataError`` when ``prompt`` cannot be encoded as UTF-8: a lone surrogate, such as the surrogate
    escape (U+DC80..U+DCFF) that Python makes of a command-line byte that is not UTF-8."""
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        c = ord(prompt[e.start])
        what = f"byte 0x{c - 0xDC00:02x}" if 0xDC80 <= c <= 0xDCFF else f"lone surrogate U+{c:04X}"
        raise DataError(f"--prompt is not UTF-8 text ({what} at character {e.start}); expected UTF-8 text") from None


def generate_texts(
    model,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int = 100,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    use_cache: bool = True,
    chat: bool = False,
    num_return_sequences: int = 1,
    tools: bool = False,
    speculative: str | None = None,
    num_speculative_tokens: int | None = None,
) -> list[Generation]:
    """Continue each of ``prompts`` ``num_return_sequences`` times in one batch (`dsfs.rollout.rollout`: left-padded,
    with the KV cache unless not ``use_cache``, each sequence stopping at eos on its own); returns the generations
    prompt-major. ``temperature`` 0 is greedy; ``top_k`` / ``top_p`` filter; ``seed`` seeds each sequence's own
    generator (`dsfs.rollout.sequence_seeds`: sequence ``i`` of a call draws from seed ``(seed, i)``), so what a
    sequence samples does not depend on the other prompts of its batch.

    Each prompt is encoded without special tokens and preceded by eos (``config.eos_token_id``), and ``text`` is the
    prompt + the continuation with special tokens dropped. With ``chat``, the prompt is one user message rendered by
    the chat template with the generation prompt (`dsfs.chat.render`: bos, ``<|user|>``, the prompt,
    ``<|assistant|>``), and ``text`` is only the assistant's reply, up to eos: decoded with its special tokens except
    bos, eos and pad, so ``<think>`` / ``</think>`` and tool calls stay visible; ``tools`` gives the model the
    calculator (`dsfs.tools`). The total length is capped at ``max_position_embeddings``. ``seconds`` is the batch's
    wall time (the same in every generation). Raises ``DataError`` when a prompt is not UTF-8 text (a command
    line's undecodable bytes arrive as surrogate escapes) or alone is too long, when the tokenizer's vocab is larger
    than the model's or (``chat``, ``tools``) lacks the tokens they need, or when a sampling option is out of range.
    Runs in the model's dtype (no autocast), so cached and uncached decoding agree.

    ``speculative="mtp"``: MTP speculative decoding (`dsfs.rollout.speculative_rollout`, ``num_speculative_tokens``
    drafts per step, default the model's MTP depth): greedy gives the same text; sampling the same distribution, with
    one generator for the batch seeded with ``seed``. Raises ``CheckpointError`` for a model without MTP modules and
    ``DataError`` with ``tools`` (a tool call pauses one sequence of the batch, which speculative steps do not do) or
    without ``use_cache``.
    """
    from dsfs.rollout import completion_text, rollout

    cfg = model.config
    for p in prompts:
        check_prompt(p)
    if tokenizer.get_vocab_size() > cfg.vocab_size:
        raise DataError(f"the tokenizer's vocab of {tokenizer.get_vocab_size()} tokens is larger than the model's "
                        f"vocab_size {cfg.vocab_size}; expected the tokenizer the model was trained with (--tokenizer)")
    eos = cfg.eos_token_id[0] if isinstance(cfg.eos_token_id, list) else cfg.eos_token_id
    if chat:
        from dsfs.chat import render

        ids = [render([{"role": "user", "content": p}], tokenizer, add_generation_prompt=True)[0] for p in prompts]
        eos = tokenizer.token_to_id(EOS)  # the chat template's end of turn
    else:
        ids = [([eos] if eos is not None else []) + tokenizer.encode(p, add_special_tokens=False).ids for p in prompts]
    longest = max(len(x) for x in ids)
    room = cfg.max_position_embeddings - longest
    if room < 0 or (room == 0 and max_new_tokens > 0) or longest == 0:
        raise DataError(f"prompt of {plural(longest, 'token')} leaves no room in max_position_embeddings "
                        f"{cfg.max_position_embeddings}" if longest else "empty prompt and no eos token to start from")
    if tools and not chat:
        raise DataError("tools need --chat (the tool-call format is the chat model's)")
    tool_fns = None
    if tools:
        from dsfs.tools import TOOLS

        tool_fns = TOOLS
    if speculative is not None:
        check_speculative(model, speculative, num_speculative_tokens, tools, use_cache)
    stats = None
    t0 = time.perf_counter()
    try:
        if speculative is None:
            outs = [(o.ids, o.finish_reason == "stop") for o in rollout(
                model, ids, min(max_new_tokens, room), temperature=temperature, top_k=top_k, top_p=top_p,
                num_generations=num_return_sequences, seed=seed, stop_token_ids=[eos] if eos is not None else (),
                tokenizer=tokenizer, tools=tool_fns, use_cache=use_cache)]
        else:
            from dsfs.rollout import speculative_rollout

            rows, stats = speculative_rollout(model, ids, min(max_new_tokens, room), temperature=temperature,
                                              top_k=top_k, top_p=top_p, num_generations=num_return_sequences,
                                              seed=seed, stop_token_ids=[eos] if eos is not None else (),
                                              num_speculative_tokens=num_speculative_tokens)
            outs = [(r, eos is not None and r[-1:] == [eos]) for r in rows]
    except ValueError as e:
        raise DataError(str(e)) from e
    if isinstance(model, torch.nn.Module) and next(model.parameters()).device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    gens = []
    drop = {tokenizer.token_to_id(t) for t in (BOS, EOS, PAD)} | ({eos} if eos is not None else set())
    for (out, stopped), prompt in zip(outs, [p for p in prompts for _ in range(num_return_sequences)], strict=True):
        new = out[:-1] if stopped else out
        if chat:
            text = completion_text(tokenizer, new, [t for t in drop if t is not None])
        else:
            text = prompt + tokenizer.decode(new, skip_special_tokens=True)
        gens.append(Generation(text, len(out), seconds, stats))
    return gens


MAX_SPECULATIVE_TOKENS = 16  # drafts per step `check_speculative` allows


def check_speculative(model, speculative: str, num_speculative_tokens: int | None = None, tools: bool = False,
                      use_cache: bool = True) -> None:
    """Raise for what ``dsfs generate --speculative`` cannot do: ``DataError`` for a method other than ``"mtp"``,
    ``num_speculative_tokens`` outside 1..`MAX_SPECULATIVE_TOKENS`, ``tools`` or no KV cache; ``CheckpointError``
    for a ``model`` without MTP modules (``num_nextn_predict_layers`` 0, or a checkpoint saved without its MTP layers,
    as ``transformers`` saves them).
    ``model`` None checks the options alone (before the model loads)."""
    if speculative != "mtp":
        raise DataError(f"--speculative {speculative}: expected mtp (drafts from the model's MTP modules)")
    if num_speculative_tokens is not None and not 1 <= num_speculative_tokens <= MAX_SPECULATIVE_TOKENS:
        raise DataError(f"--num-speculative-tokens {num_speculative_tokens}: expected an integer in "
                        f"1..{MAX_SPECULATIVE_TOKENS} (drafts past a few are almost never accepted)")
    if tools:
        raise DataError("--speculative mtp does not support --tools (a tool call pauses one sequence of the batch "
                        "mid-step); drop one of them")
    if not use_cache:
        raise DataError("--speculative mtp needs the KV cache (it rolls the cache back after rejected drafts); "
                        "drop --no-cache")
    if model is not None and len(model.mtp) == 0:
        raise CheckpointError("--speculative mtp needs MTP layers and this model has none (num_nextn_predict_layers "
                              f"{model.config.num_nextn_predict_layers}, or a checkpoint saved without them); "
                              "generate without --speculative")
