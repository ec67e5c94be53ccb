"""The chat template and the conversation / preference data of post-training (SFT, DPO, distillation).

Layout: DeepSeek-V3's chat template (its ``tokenizer_config.json`` ``chat_template``) with this project's reserved
role tokens (ids 3 and 4 of `dsfs.data.SPECIAL_TOKENS`) in place of ``<｜User｜>`` / ``<｜Assistant｜>``, and no
newline added anywhere::

    <|begin_of_text|>{system}<|user|>{user}<|assistant|>{assistant}<|endoftext|><|user|>...

The system prompt (optional, first message only) follows bos with no role token, as in DeepSeek-V3; each user
turn is ``<|user|>`` + content; each assistant turn ``<|assistant|>`` + content + ``<|endoftext|>`` (eos); with
``add_generation_prompt`` a trailing ``<|assistant|>`` opens the reply. Unlike DeepSeek-R1's template, assistant
contents keep their ``<think>...</think>`` part (the model is trained to write it). The *assistant mask* is True
on every token of an assistant turn's content and its closing eos (what the model learns to produce), False on
bos, the system prompt, user turns and the ``<|assistant|>`` role token.

`CHAT_TEMPLATE` is the same layout as Jinja for ``tokenizer_config.json`` (``dsfs prepare`` writes it there and
`reference.checkpoint.write_model_dir` copies that file into model directories), with ``{% generation %}`` around
each assistant content + eos, so ``transformers``' ``apply_chat_template(messages, tokenize=True, return_dict=True,
return_assistant_tokens_mask=True)`` renders the same ids and the same mask as `render`.

Data files (JSONL, one object per non-blank line) follow Hugging Face TRL's dataset formats:

- conversational: ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``
- prompt-completion: ``{"prompt": str | messages, "completion": str | messages}``; a string prompt is one user
  message, a string completion one assistant message
- preference, explicit prompt: ``{"prompt": str | messages, "chosen": str | messages, "rejected": str | messages}``
- preference, implicit prompt: ``{"chosen": messages, "rejected": messages}`` whose messages agree up to a last
  assistant message (the shared prefix is the prompt)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from dsfs.data import BOS, EOS, plural
from dsfs.errors import DataError

ROLES = ("system", "user", "assistant")
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
IGNORE_INDEX = -100  # labels of tokens without loss (PyTorch's cross_entropy ignore_index, as TRL and transformers)

# DeepSeek-V3's template (bos, system prompt, <｜User｜> / <｜Assistant｜> turns, eos after each reply) with our role
# tokens, one system message allowed (first), and {% generation %} around what the assistant mask covers.
CHAT_TEMPLATE = (
    "{{- '<|begin_of_text|>' -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- if not loop.first -%}{{- raise_exception('a system message must come first') -}}{%- endif -%}"
    "{{- message['content'] -}}"
    "{%- elif message['role'] == 'user' -%}"
    "{{- '<|user|>' + message['content'] -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- '<|assistant|>' -}}"
    "{%- generation -%}{{- message['content'] + '<|endoftext|>' -}}{%- endgeneration -%}"
    "{%- else -%}"
    "{{- raise_exception('unknown role ' + message['role'] + ': expected system, user or assistant') -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}"
)


# ---------------------------------------------------------------- rendering


def _special_id(tokenizer, token: str) -> int:
    i = tokenizer.token_to_id(token)
    if i is None:
        raise DataError(f"the tokenizer has no {token} token; expected a dsfs tokenizer (dsfs prepare), whose special "
                        "tokens are ids 0..12")
    return i


def check_messages(messages, where: str = "messages") -> None:
    """Raise ``DataError`` (prefixed by ``where``) unless ``messages`` is a non-empty list of ``{"role", "content"}``
    dicts with a role in `ROLES`, string content, and a system message only first. Other keys are ignored."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: expected a non-empty list of messages, got {_what(messages)}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise DataError(f"{where}: message {i} is {_what(m)}; expected an object with role and content")
        for key in ("role", "content"):
            if key not in m:
                raise DataError(f"{where}: message {i} has no {key!r} field (keys: {', '.join(map(repr, m))})")
        if m["role"] not in ROLES:
            raise DataError(f"{where}: message {i} has an unknown role {m['role']!r}; expected one of "
                            f"{', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise DataError(f"{where}: message {i} ({m['role']}) has non-string content ({_what(m['content'])})")
        if m["role"] == "system" and i > 0:
            raise DataError(f"{where}: message {i} is a system message; a system message must come first")


def render(messages: list[dict], tokenizer, add_generation_prompt: bool = False) -> tuple[list[int], list[bool]]:
    """Token ids of ``messages`` in the chat layout (module docstring), and its assistant mask.

    ``messages``: ``[{"role": "system"|"user"|"assistant", "content": str}, ...]``; ``tokenizer``: a
    ``tokenizers.Tokenizer`` with this project's special tokens (`dsfs.data.train_tokenizer`). Each piece (bos,
    system content, role tokens, contents, eos) is encoded alone with ``add_special_tokens=False`` and the pieces
    concatenated; every boundary is a special token, so this equals encoding the whole rendered string (and the
    ``transformers`` rendering of `CHAT_TEMPLATE`). A content that holds the literal text of a special token
    (``<think>``) gets that token's id, as ``transformers`` does. Returns ``(ids, mask)``, two lists of the same
    length; ``mask[i]`` is True on the tokens of an assistant content and its closing eos. Raises ``DataError`` for
    malformed messages (`check_messages`) or a tokenizer without the special tokens.
    """
    check_messages(messages)
    bos, eos = _special_id(tokenizer, BOS), _special_id(tokenizer, EOS)
    user, assistant = _special_id(tokenizer, USER), _special_id(tokenizer, ASSISTANT)
    ids, mask = [bos], [False]

    def add(piece: list[int], on: bool) -> None:
        ids.extend(piece)
        mask.extend([on] * len(piece))

    for m in messages:
        content = tokenizer.encode(m["content"], add_special_tokens=False).ids
        if m["role"] == "system":
            add(content, False)
        elif m["role"] == "user":
            add([user] + content, False)
        else:
            add([assistant], False)
            add(content + [eos], True)
    if add_generation_prompt:
        add([assistant], False)
    return ids, mask


def render_text(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The rendered string of ``messages`` (what `CHAT_TEMPLATE` renders; `render` encodes it). Raises
    ``DataError`` for malformed messages (`check_messages`)."""
    check_messages(messages)
    parts = [BOS]
    for m in messages:
        prefix = {"system": "", "user": USER, "assistant": ASSISTANT}[m["role"]]
        parts.append(prefix + m["content"] + (EOS if m["role"] == "assistant" else ""))
    if add_generation_prompt:
        parts.append(ASSISTANT)
    return "".join(parts)


# ---------------------------------------------------------------- features


def _check_max_length(max_length: int) -> None:
    if not isinstance(max_length, int) or max_length < 1:
        raise DataError(f"max_length {max_length!r}: expected an integer >= 1")


def sft_features(messages: list[dict], tokenizer, max_length: int) -> tuple[list[int], list[int], bool]:
    """SFT inputs of one conversation: ``(input_ids, labels, truncated)``.

    ``input_ids``: `render` of ``messages`` (no generation prompt), cut to its first ``max_length`` tokens;
    ``labels``: the same length, the token id where the assistant mask is True and ``-100`` (`IGNORE_INDEX`)
    elsewhere -- NOT shifted (the trainer predicts ``labels[t + 1]`` from ``input_ids[: t + 1]``); ``truncated``:
    whether tokens were cut (the caller counts and reports them). Raises ``DataError`` for malformed messages, a
    ``max_length`` below 1, or when no assistant token remains (none in the conversation, or all cut off).
    """
    _check_max_length(max_length)
    ids, mask = render(messages, tokenizer)
    truncated = len(ids) > max_length
    ids, mask = ids[:max_length], mask[:max_length]
    if not any(mask):
        first = next((i for i, m in enumerate(render(messages, tokenizer)[1]) if m), None)
        if first is None:
            raise DataError("the conversation has no assistant turn: no token to learn")
        raise DataError(f"truncation to max_length {max_length} leaves no assistant token (the first one is token "
                        f"{first}); raise max_length or shorten the prompt")
    return ids, [t if m else IGNORE_INDEX for t, m in zip(ids, mask, strict=True)], truncated


def preference_features(prompt_messages: list[dict], chosen: str, rejected: str, tokenizer, max_length: int,
                        max_prompt_length: int | None = None) -> dict:
    """DPO inputs of one preference pair: ``{"prompt_ids", "chosen_ids", "rejected_ids", "truncated"}``.

    ``prompt_ids``: `render` of ``prompt_messages`` (ending in a user turn) with the generation prompt, so it ends
    with ``<|assistant|>``; ``chosen_ids`` / ``rejected_ids``: the completion's tokens followed by the closing eos
    (``prompt_ids + chosen_ids`` is the rendered conversation). Over-long pairs (prompt + the longer completion over
    ``max_length``): first, when ``max_prompt_length`` is given and the prompt is longer, the prompt keeps its last
    ``max_prompt_length`` tokens (the end of the prompt, as TRL's DPO did with ``max_prompt_length`` and
    ``truncation_mode="keep_end"``); then each completion keeps its first ``max_length - len(prompt_ids)`` tokens
    (the closing eos may be cut). ``truncated``: whether anything was cut. Raises ``DataError`` for malformed
    messages, a prompt that does not end with a user turn, an empty completion, a bad ``max_length`` /
    ``max_prompt_length``, or when nothing of a completion remains (the prompt fills ``max_length``).
    """
    _check_max_length(max_length)
    check_messages(prompt_messages, "prompt")
    if prompt_messages[-1]["role"] != "user":
        raise DataError(f"prompt: the last message is {prompt_messages[-1]['role']!r}; expected a user turn")
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{name}: expected a non-empty string completion, got {_what(text)}")
    eos = _special_id(tokenizer, EOS)
    prompt = render(prompt_messages, tokenizer, add_generation_prompt=True)[0]
    comps = [tokenizer.encode(t, add_special_tokens=False).ids + [eos] for t in (chosen, rejected)]
    truncated = False
    if len(prompt) + max(map(len, comps)) > max_length:
        if max_prompt_length is not None:
            _check_max_length(max_prompt_length)
            if len(prompt) > max_prompt_length:
                prompt, truncated = prompt[-max_prompt_length:], True
        room = max_length - len(prompt)
        if room < 1:
            raise DataError(f"the prompt of {plural(len(prompt), 'token')} fills max_length {max_length}: nothing of "
                            "the completions remains (raise max_length, or pass max_prompt_length)")
        truncated = truncated or any(len(c) > room for c in comps)
        comps = [c[:room] for c in comps]
    return {"prompt_ids": prompt, "chosen_ids": comps[0], "rejected_ids": comps[1], "truncated": truncated}


# ---------------------------------------------------------------- reading files


def _what(x) -> str:
    """A short description of a JSON value for error messages."""
    if isinstance(x, str):
        return "an empty string" if not x else "a string"
    return {dict: "an object", list: "a list", bool: "a boolean", int: "a number", float: "a number",
            type(None): "null"}.get(type(x), type(x).__name__)


def _read_jsonl(path: Path):
    """Yield ``(lineno, obj)`` for each non-blank line of a JSONL file; ``DataError`` (file and line) for a line that
    is not a JSON object or not UTF-8, and for a missing file."""
    if path.is_dir():
        raise DataError(f"{path} is a directory; expected a .jsonl file")
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}: line {lineno}: not UTF-8 text (byte 0x{raw[e.start]:02x})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}: line {lineno}: expected a JSON object, got {_what(obj)}")
            yield lineno, obj


def _as_messages(value, role: str, where: str) -> list[dict]:
    """A prompt or completion field: a string becomes one message of ``role``; a list is checked messages."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if not isinstance(value, list):
        raise DataError(f"{where}: expected a string or a list of messages, got {_what(value)}")
    check_messages(value, where)
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _check_assistants(messages: list[dict], where: str) -> None:
    """At least one assistant turn, none of them empty."""
    replies = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not replies:
        raise DataError(f"{where}: no assistant turn (nothing to learn); expected at least one")
    for i in replies:
        if not messages[i]["content"].strip():
            raise DataError(f"{where}: message {i} is an empty assistant turn; expected content")


def read_conversations(path: str | os.PathLike) -> list[list[dict]]:
    """Read a JSONL file of conversations (TRL's conversational or prompt-completion format; module docstring).

    Returns one message list per non-blank line, each ``[{"role", "content"}, ...]`` (other keys dropped); a
    prompt-completion row becomes its prompt's messages (a string: one user message) followed by the completion's
    (a string: one assistant message). Raises ``DataError`` naming the file and line for: a missing file, a line
    that is not a JSON object, neither ``messages`` nor ``prompt`` + ``completion``, a message without role or
    content, an unknown role, non-string content, a system message not first, no assistant turn, an empty
    assistant content or completion, a completion that holds a non-assistant message; and for a file with no rows.
    """
    path = Path(path)
    out = []
    for lineno, obj in _read_jsonl(path):
        where = f"{path}: line {lineno}"
        if "messages" in obj:
            if not isinstance(obj["messages"], list):
                raise DataError(f"{where}: messages: expected a list of messages, got {_what(obj['messages'])}")
            messages = _as_messages(obj["messages"], "user", f"{where}: messages")
        elif "prompt" in obj or "completion" in obj:
            for key in ("prompt", "completion"):
                if key not in obj:
                    raise DataError(f"{where}: has {'completion' if key == 'prompt' else 'prompt'} but no {key!r} "
                                    "field; expected both (TRL's prompt-completion format)")
            if isinstance(obj["completion"], str) and not obj["completion"].strip():
                raise DataError(f"{where}: empty completion")
            prompt = _as_messages(obj["prompt"], "user", f"{where}: prompt")
            completion = _as_messages(obj["completion"], "assistant", f"{where}: completion")
            for i, m in enumerate(completion):
                if m["role"] != "assistant":
                    raise DataError(f"{where}: completion: message {i} is a {m['role']} message; expected "
                                    "assistant messages only")
            messages = prompt + completion
            check_messages(messages, where)
        else:
            keys = ", ".join(map(repr, obj)) or "none"
            raise DataError(f"{where}: no 'messages' field nor 'prompt' + 'completion' (keys: {keys}); expected "
                            "TRL's conversational or prompt-completion format")
        _check_assistants(messages, where)
        out.append(messages)
    if not out:
        raise DataError(f"{path}: no conversations (the file is empty)")
    return out


def read_prompts(path: str | os.PathLike) -> list[tuple[list[dict], dict]]:
    """The prompt-only rows of a JSONL file, TRL's format for GRPO: ``{"prompt": str | messages, ...}``. Returns one
    ``(messages, columns)`` per row: the prompt as messages (a string becomes one user message) and the row's other
    fields, which the reward functions receive. Raises `DataError` (file and line) for a row without a prompt, bad
    messages, bad JSON, or a file without rows."""
    rows = []
    for lineno, obj in _read_jsonl(Path(path)):
        where = f"{path}: line {lineno}"
        if "prompt" not in obj:
            raise DataError(f"{where}: expected a \"prompt\" field (a string or a list of messages)")
        messages = _as_messages(obj.pop("prompt"), "user", f"{where}: prompt")
        if messages[-1]["role"] != "user":
            raise DataError(f"{where}: the prompt must end with a user message (the policy writes the reply), got "
                            f"{messages[-1]['role']}")
        if {"prompts", "completions"} & set(obj):
            raise DataError(f"{where}: a column may not be named prompts or completions (the reward functions' first "
                            "two arguments)")
        rows.append((messages, obj))
    if not rows:
        raise DataError(f"{path}: no prompts")
    return rows


def _reply(value, name: str, where: str) -> str:
    """A chosen/rejected field of the explicit-prompt format: a string, or a list of exactly one assistant
    message; returns its content, which must not be empty."""
    if isinstance(value, list):
        check_messages(value, f"{where}: {name}")
        if len(value) != 1 or value[0]["role"] != "assistant":
            roles = ", ".join(m["role"] for m in value)
            raise DataError(f"{where}: {name}: expected one assistant message, got {len(value)} ({roles})")
        value = value[0]["content"]
    elif not isinstance(value, str):
        raise DataError(f"{where}: {name}: expected a string or a list of messages, got {_what(value)}")
    if not value.strip():
        raise DataError(f"{where}: empty {name} completion")
    return value


def read_preferences(path: str | os.PathLike) -> list[dict]:
    """Read a JSONL file of preference pairs (TRL's preference format, explicit or implicit prompt).

    Returns one ``{"prompt": messages, "chosen": str, "rejected": str}`` per non-blank line: ``prompt`` a message
    list ending in a user turn, ``chosen`` / ``rejected`` the assistant replies as strings. Explicit prompt: the
    prompt a string (one user message) or messages, each reply a string or a list of one assistant message.
    Implicit prompt (no ``prompt`` field): ``chosen`` and ``rejected`` are conversations that agree up to their last
    message, an assistant reply; the shared part is the prompt. Raises ``DataError`` naming the file and line for
    a line that is not a JSON object, a missing field, malformed messages (unknown role, non-string content, system
    not first), a prompt that does not end with a user turn, an empty reply, implicit conversations that differ
    before their last message, or a file with no rows.
    """
    path = Path(path)
    out = []
    for lineno, obj in _read_jsonl(path):
        where = f"{path}: line {lineno}"
        for key in ("chosen", "rejected"):
            if key not in obj:
                keys = ", ".join(map(repr, obj)) or "none"
                raise DataError(f"{where}: no {key!r} field (keys: {keys}); expected prompt, chosen and rejected")
        if "prompt" in obj:
            prompt = _as_messages(obj["prompt"], "user", f"{where}: prompt")
            chosen, rejected = (_reply(obj[k], k, where) for k in ("chosen", "rejected"))
        else:
            convs = {}
            for key in ("chosen", "rejected"):
                if not isinstance(obj[key], list):
                    raise DataError(f"{where}: no 'prompt' field and {key} is {_what(obj[key])}: an implicit prompt "
                                    "needs chosen and rejected as message lists; expected a prompt field")
                check_messages(obj[key], f"{where}: {key}")
                convs[key] = [{"role": m["role"], "content": m["content"]} for m in obj[key]]
                if convs[key][-1]["role"] != "assistant":
                    raise DataError(f"{where}: {key}: the last message is {convs[key][-1]['role']!r}; expected the "
                                    "assistant reply")
            if convs["chosen"][:-1] != convs["rejected"][:-1]:
                raise DataError(f"{where}: chosen and rejected differ before their last message; an implicit prompt "
                                "is the part they share (or give a prompt field)")
            prompt = convs["chosen"][:-1]
            if not prompt:
                raise DataError(f"{where}: chosen and rejected hold only the reply; expected a prompt before it")
            chosen, rejected = (_reply(convs[k][-1:], k, where) for k in ("chosen", "rejected"))
        if prompt[-1]["role"] != "user":
            raise DataError(f"{where}: prompt: the last message is {prompt[-1]['role']!r}; expected a user turn")
        out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    if not out:
        raise DataError(f"{path}: no preference pairs (the file is empty)")
    return out
