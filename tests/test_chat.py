"""`dsfs.chat`: the chat template renders what `transformers` renders from the tokenizer_config.json that `dsfs
prepare` writes and `write_model_dir` copies (ids and assistant mask), SFT / DPO features, and the JSONL readers'
one-line errors naming file and line."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from dsfs import chat, data
from dsfs.chat import (
    CHAT_TEMPLATE,
    preference_features,
    read_conversations,
    read_preferences,
    render,
    render_text,
    sft_features,
)
from dsfs.errors import DataError

SLICE_CHARS = 60_000
VOCAB = 500


def stories_slice(root: Path, chars: int = SLICE_CHARS) -> Path:
    """A slice of the shared TinyStories sample as a file (synthetic stories where the sample is absent)."""
    src = root / "stories.txt"
    if data.DEFAULT_INPUT.is_file():
        with open(data.DEFAULT_INPUT, encoding="utf-8") as f:
            text = f.read(chars)
    else:
        rng = random.Random(0)
        words = "the a cat dog sun ran saw big little happy sad tree ball mom said played went home 1 2 3".split()
        text = "\n<|endoftext|>\n".join(" ".join(rng.choices(words, k=rng.randint(20, 200))) + "."
                                        for _ in range(150))
    src.write_text(text, encoding="utf-8")
    return src


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """`dsfs prepare` output of a TinyStories slice with a ~500-token vocab."""
    root = tmp_path_factory.mktemp("chat")
    return data.prepare(stories_slice(root), root / "data", vocab_size=VOCAB, verbose=False)


@pytest.fixture(scope="module")
def tok(prepared):
    return data.read_tokenizer(prepared / "tokenizer.json")


@pytest.fixture(scope="module")
def model_dir(prepared, tmp_path_factory) -> Path:
    """A micro model saved with `write_model_dir` (save_pretrained) and the prepared tokenizer."""
    from reference import Model, ModelConfig
    from tests.test_train import MICRO_MODEL

    out = tmp_path_factory.mktemp("model") / "model"
    vocab = data.load_meta(prepared)["vocab_size"]
    Model(ModelConfig(vocab_size=vocab, **MICRO_MODEL)).save_pretrained(out, tokenizer_file=prepared / "tokenizer.json")
    return out


@pytest.fixture(scope="module")
def hf_tok(model_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(model_dir))


SYSTEM = {"role": "system", "content": "You are a careful tutor.\n"}
Q1 = {"role": "user", "content": "What is 47 + 38?"}
A1 = {"role": "assistant", "content": "<think>\n47+38\n7+8=15\n4+3+1=8\n</think>\n85"}
Q2 = {"role": "user", "content": " And café, 日本語 🙂?\n\n"}
A2 = {"role": "assistant", "content": "  Tab\there, two  spaces.\n"}
CASES = {
    "system_user_assistant": ([SYSTEM, Q1, A1], False),
    "multi_turn": ([Q1, A1, Q2, A2], False),
    "system_multi_turn": ([SYSTEM, Q1, A1, Q2, A2], False),
    "generation_prompt": ([SYSTEM, Q1, A1, Q2], True),
    "generation_prompt_first_turn": ([Q1], True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_template_matches_transformers(case, tok, hf_tok):
    """Same ids and same assistant mask as transformers' apply_chat_template on the model directory."""
    messages, gen = CASES[case]
    ids, mask = render(messages, tok, add_generation_prompt=gen)
    out = hf_tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
                                     add_generation_prompt=gen)
    assert out["input_ids"] == ids
    assert [bool(m) for m in out["assistant_masks"]] == mask
    text = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
    assert text == render_text(messages, gen)
    assert tok.encode(text, add_special_tokens=False).ids == ids  # piecewise == whole string
    assert ids[0] == tok.token_to_id(data.BOS)
    if gen:
        assert ids[-1] == tok.token_to_id("<|assistant|>") and not mask[-1]


def test_layout_is_deepseek_v3s():
    """bos, the system prompt with no role token, then the turns; no newline added anywhere."""
    assert render_text([SYSTEM, Q1, A1, Q2], add_generation_prompt=True) == (
        "<|begin_of_text|>You are a careful tutor.\n<|user|>What is 47 + 38?<|assistant|>"
        "<think>\n47+38\n7+8=15\n4+3+1=8\n</think>\n85<|endoftext|><|user|> And café, 日本語 🙂?\n\n<|assistant|>")
    assert render_text([Q1]) == "<|begin_of_text|><|user|>What is 47 + 38?"


@pytest.mark.parametrize("case", list(CASES))
def test_mask_covers_assistant_contents_and_eos(case, tok):
    messages, gen = CASES[case]
    ids, mask = render(messages, tok, add_generation_prompt=gen)
    spans, cur = [], []
    for i, m in zip(ids, mask, strict=True):
        if m:
            cur.append(i)
        elif cur:
            spans.append(cur)
            cur = []
    if cur:
        spans.append(cur)
    want = [m["content"] + data.EOS for m in messages if m["role"] == "assistant"]
    assert [tok.decode(s, skip_special_tokens=False) for s in spans] == want
    for s in spans:  # each span ends with eos and follows an <|assistant|> token
        assert s[-1] == tok.token_to_id(data.EOS)
    unmasked = tok.decode([i for i, m in zip(ids, mask, strict=True) if not m], skip_special_tokens=False)
    prefix = {"system": "", "user": "<|user|>", "assistant": "<|assistant|>"}
    rest = [prefix[m["role"]] + ("" if m["role"] == "assistant" else m["content"]) for m in messages]
    assert unmasked == data.BOS + "".join(rest) + ("<|assistant|>" if gen else "")


def test_prepare_and_model_dir_carry_the_template(prepared, model_dir):
    cfg = json.loads((prepared / "tokenizer_config.json").read_text())
    assert cfg["chat_template"] == CHAT_TEMPLATE
    assert (cfg["bos_token"], cfg["eos_token"], cfg["pad_token"]) == (data.BOS, data.EOS, data.PAD)
    assert (model_dir / "tokenizer_config.json").read_text() == (prepared / "tokenizer_config.json").read_text()
    sums = json.loads((model_dir / "checksums.json").read_text())
    assert "tokenizer_config.json" in sums["files"]


def test_prepare_skip_path_adds_the_template_to_an_older_output(prepared, tmp_path):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(prepared, old)
    cfg_file = old / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    del cfg["chat_template"]
    cfg_file.write_text(json.dumps(cfg))
    meta = data.load_meta(old)
    src = Path(meta["source"]["path"])
    data.prepare(src, old, vocab_size=VOCAB, verbose=False)  # same settings: skipped, the config upgraded
    assert json.loads(cfg_file.read_text())["chat_template"] == CHAT_TEMPLATE
    assert (old / "train.bin").read_bytes() == (prepared / "train.bin").read_bytes()


def test_render_rejects_bad_messages(tok):
    bad = [
        ([], "expected a non-empty list of messages"),
        ([{"role": "bot", "content": "x"}], "unknown role 'bot'"),
        ([{"role": "user", "content": 3}], "non-string content"),
        ([{"role": "user"}], "has no 'content' field"),
        ([Q1, SYSTEM], "a system message must come first"),
        (["hi"], "message 0 is a string"),
    ]
    for messages, match in bad:
        with pytest.raises(DataError, match=match):
            render(messages, tok)
    from tokenizers import Tokenizer, models

    plain = Tokenizer(models.BPE())
    with pytest.raises(DataError, match="the tokenizer has no <|begin_of_text|> token"):
        render([Q1], plain)


def test_template_raises_like_render(hf_tok):
    import jinja2

    with pytest.raises(jinja2.exceptions.TemplateError, match="a system message must come first"):
        hf_tok.apply_chat_template([Q1, SYSTEM], tokenize=False)
    with pytest.raises(jinja2.exceptions.TemplateError, match="unknown role bot"):
        hf_tok.apply_chat_template([{"role": "bot", "content": "x"}], tokenize=False)


# ---------------------------------------------------------------- features


def test_sft_features(tok):
    messages = [SYSTEM, Q1, A1, Q2, A2]
    ids, mask = render(messages, tok)
    got_ids, labels, truncated = sft_features(messages, tok, 4096)
    assert got_ids == ids and not truncated
    assert labels == [i if m else -100 for i, m in zip(ids, mask, strict=True)]  # not shifted
    first = mask.index(True)
    cut_ids, cut_labels, truncated = sft_features(messages, tok, first + 3)
    assert truncated and cut_ids == ids[: first + 3] and cut_labels == labels[: first + 3]
    with pytest.raises(DataError, match=f"truncation to max_length {first} leaves no assistant token"):
        sft_features(messages, tok, first)
    with pytest.raises(DataError, match="no assistant turn"):
        sft_features([SYSTEM, Q1], tok, 100)
    with pytest.raises(DataError, match="max_length 0: expected an integer >= 1"):
        sft_features(messages, tok, 0)


def test_preference_features(tok):
    prompt = [SYSTEM, Q1]
    chosen, rejected = A1["content"], "<think>\n47+38\n7+8=15\n4+3=7\n</think>\n75 is the answer I think"
    f = preference_features(prompt, chosen, rejected, tok, 4096)
    assert not f["truncated"]
    assert f["prompt_ids"] == render(prompt, tok, add_generation_prompt=True)[0]
    assert f["prompt_ids"] + f["chosen_ids"] == render(prompt + [A1], tok)[0]
    eos = tok.token_to_id(data.EOS)
    assert f["chosen_ids"][-1] == eos and f["rejected_ids"][-1] == eos
    assert tok.decode(f["rejected_ids"], skip_special_tokens=False) == rejected + data.EOS
    # over-long: the completions are cut first (keeping their start)
    n_prompt, n_rej = len(f["prompt_ids"]), len(f["rejected_ids"])
    g = preference_features(prompt, chosen, rejected, tok, n_prompt + n_rej - 2)
    assert g["truncated"] and g["prompt_ids"] == f["prompt_ids"]
    assert g["rejected_ids"] == f["rejected_ids"][: n_rej - 2]
    assert g["chosen_ids"] == f["chosen_ids"][: n_rej - 2]
    # then, with max_prompt_length, the prompt keeps its end
    h = preference_features(prompt, chosen, rejected, tok, 8 + n_rej, max_prompt_length=8)
    assert h["truncated"] and h["prompt_ids"] == f["prompt_ids"][-8:] and h["rejected_ids"] == f["rejected_ids"]
    with pytest.raises(DataError, match="fills max_length .*nothing of the completions remains"):
        preference_features(prompt, chosen, rejected, tok, n_prompt)
    with pytest.raises(DataError, match="prompt: the last message is 'assistant'; expected a user turn"):
        preference_features([Q1, A1], chosen, rejected, tok, 100)
    with pytest.raises(DataError, match="rejected: expected a non-empty string completion"):
        preference_features(prompt, chosen, " ", tok, 100)


# ---------------------------------------------------------------- reading files


def _write(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def test_read_conversations_formats(tmp_path):
    msgs = [SYSTEM, Q1, A1]
    rows = [
        {"messages": msgs},
        "",  # blank lines are skipped
        {"prompt": "What is 2 + 2?", "completion": "4"},
        {"prompt": [SYSTEM, Q1], "completion": [A1]},
        {"messages": [{**Q1, "name": "x"}, A1], "id": 7},  # other keys are dropped
    ]
    got = read_conversations(_write(tmp_path / "c.jsonl", rows))
    assert got == [
        msgs,
        [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}],
        msgs,
        [Q1, A1],
    ]


GOOD = json.dumps({"messages": [Q1, A1]})
CONVERSATION_ERRORS = [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object, got a list"),
    (json.dumps({"text": "hi"}), "no 'messages' field nor 'prompt' \\+ 'completion' \\(keys: 'text'\\)"),
    (json.dumps({"prompt": "hi"}), "has prompt but no 'completion' field"),
    (json.dumps({"completion": "hi"}), "has completion but no 'prompt' field"),
    (json.dumps({"messages": [{"role": "bot", "content": "x"}, A1]}), "message 0 has an unknown role 'bot'"),
    (json.dumps({"messages": [Q1, {"role": "assistant", "content": ["x"]}]}), "message 1 \\(assistant\\) has "
     "non-string content \\(a list\\)"),
    (json.dumps({"messages": [Q1, {"role": "assistant"}]}), "message 1 has no 'content' field"),
    (json.dumps({"messages": "hi"}), "messages: expected a list of messages, got a string"),
    (json.dumps({"messages": []}), "expected a non-empty list of messages"),
    (json.dumps({"prompt": "hi", "completion": ""}), "empty completion"),
    (json.dumps({"prompt": "hi", "completion": 5}), "completion: expected a string or a list of messages"),
    (json.dumps({"messages": [Q1, {"role": "assistant", "content": " \n"}]}), "message 1 is an empty assistant turn"),
    (json.dumps({"messages": [SYSTEM, Q1]}), "no assistant turn"),
    (json.dumps({"messages": [Q1, SYSTEM, A1]}), "message 1 is a system message; a system message must come first"),
    (json.dumps({"prompt": [Q1], "completion": [SYSTEM, A1]}), "completion: message 0 is a system message; "
     "expected assistant messages only"),
    (json.dumps({"prompt": [Q1], "completion": [A1, Q2]}), "completion: message 1 is a user message"),
]


@pytest.mark.parametrize(("line", "match"), CONVERSATION_ERRORS, ids=[m[:30] for _, m in CONVERSATION_ERRORS])
def test_read_conversations_errors(tmp_path, line, match):
    path = _write(tmp_path / "bad.jsonl", [GOOD, "", line, GOOD])
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}: line 3: .*{match}"):
        read_conversations(path)


def test_missing_and_empty_files(tmp_path):
    for read in (read_conversations, read_preferences):
        with pytest.raises(DataError, match="no such file"):
            read(tmp_path / "missing.jsonl")
        with pytest.raises(DataError, match="is a directory"):
            read(tmp_path)
        with pytest.raises(DataError, match="the file is empty"):
            read(_write(tmp_path / "empty.jsonl", ["", "  "]))
    (tmp_path / "latin1.jsonl").write_bytes(GOOD.encode() + b"\n\xff\n")
    with pytest.raises(DataError, match="line 2: not UTF-8 text"):
        read_conversations(tmp_path / "latin1.jsonl")


def test_read_preferences_formats(tmp_path):
    reply, wrong = A1["content"], "<think>\n47+38\n</think>\n75"
    rows = [
        {"prompt": "What is 47 + 38?", "chosen": reply, "rejected": wrong},
        {"prompt": [SYSTEM, Q1], "chosen": [{"role": "assistant", "content": reply}],
         "rejected": [{"role": "assistant", "content": wrong}]},
        {"chosen": [SYSTEM, Q1, A1], "rejected": [SYSTEM, Q1, {"role": "assistant", "content": wrong}]},  # implicit
    ]
    got = read_preferences(_write(tmp_path / "p.jsonl", rows))
    assert got == [
        {"prompt": [Q1], "chosen": reply, "rejected": wrong},
        {"prompt": [SYSTEM, Q1], "chosen": reply, "rejected": wrong},
        {"prompt": [SYSTEM, Q1], "chosen": reply, "rejected": wrong},
    ]


GOOD_PAIR = json.dumps({"prompt": "hi", "chosen": "a", "rejected": "b"})
PREFERENCE_ERRORS = [
    ("{not json", "not valid JSON"),
    ('"text"', "expected a JSON object, got a string"),
    (json.dumps({"prompt": "hi", "chosen": "a"}), "no 'rejected' field"),
    (json.dumps({"prompt": "hi", "rejected": "a"}), "no 'chosen' field"),
    (json.dumps({"prompt": "hi", "chosen": "", "rejected": "b"}), "empty chosen completion"),
    (json.dumps({"prompt": "hi", "chosen": "a", "rejected": None}), "rejected: expected a string or a list"),
    (json.dumps({"prompt": [Q1, A1], "chosen": "a", "rejected": "b"}), "prompt: the last message is 'assistant'"),
    (json.dumps({"prompt": [{"role": "bot", "content": "x"}], "chosen": "a", "rejected": "b"}), "unknown role 'bot'"),
    (json.dumps({"prompt": [Q1, SYSTEM], "chosen": "a", "rejected": "b"}), "a system message must come first"),
    (json.dumps({"prompt": "hi", "chosen": [A1, A1], "rejected": "b"}), "chosen: expected one assistant message"),
    (json.dumps({"prompt": "hi", "chosen": [Q1], "rejected": "b"}), "chosen: expected one assistant message"),
    (json.dumps({"chosen": "a", "rejected": "b"}), "no 'prompt' field and chosen is a string"),
    (json.dumps({"chosen": [Q1, A1], "rejected": [Q2, A1]}), "chosen and rejected differ before their last message"),
    (json.dumps({"chosen": [Q1, A1], "rejected": [Q1]}), "rejected: the last message is 'user'"),
    (json.dumps({"chosen": [A1], "rejected": [A1]}), "hold only the reply"),
    (json.dumps({"prompt": "hi", "chosen": [{"role": "assistant", "content": 1}], "rejected": "b"}),
     "non-string content"),
]


@pytest.mark.parametrize(("line", "match"), PREFERENCE_ERRORS, ids=[m[:30] for _, m in PREFERENCE_ERRORS])
def test_read_preferences_errors(tmp_path, line, match):
    path = _write(tmp_path / "bad.jsonl", [GOOD_PAIR, line])
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}: line 2: .*{match}"):
        read_preferences(path)


def test_roles_and_template_constants():
    assert chat.ROLES == ("system", "user", "assistant")
    assert "{% generation %}" in CHAT_TEMPLATE.replace("{%- generation -%}", "{% generation %}")
