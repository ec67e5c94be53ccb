"""`dsfs prepare`: documents -> byte-level BPE -> packed uint16/uint32 shards, and the CLI around it."""

from __future__ import annotations

import io
import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from dsfs import cli, data
from dsfs.data import SPECIAL_TOKENS, DataError

SAMPLE_CHARS = 300_000  # about 340 stories of the shared sample, the last one cut mid-sentence


def _source_text() -> str:
    """The first SAMPLE_CHARS of the shared TinyStories sample, or synthetic stories if it is absent."""
    if data.DEFAULT_INPUT.is_file():
        text = data.DEFAULT_INPUT.read_text(encoding="utf-8")[:SAMPLE_CHARS]
    else:
        rng = random.Random(0)
        words = "the a cat dog sun ran saw big little happy sad tree ball mom said played went home".split()
        stories = [" ".join(rng.choices(words, k=rng.randint(20, 200))) + "." for _ in range(400)]
        text = "\n<|endoftext|>\n".join(stories)
    text = text[:SAMPLE_CHARS]
    return text[: text.rindex(" the ") + 4]  # the last story ends mid-sentence, "... the"


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("src") / "stories.txt"
    path.write_text(_source_text(), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def prepared(source, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prep") / "out"
    return data.prepare(source, out, vocab_size=512, val_fraction=0.1, seed=1, verbose=False)


def _split_docs(tokens: np.ndarray, tok: Tokenizer) -> list[str]:
    """Cut a shard at eos ids and decode each piece."""
    ends = np.flatnonzero(np.asarray(tokens) == 0)
    assert len(tokens) and ends[-1] == len(tokens) - 1, "every document ends with eos"
    starts = np.concatenate([[0], ends[:-1] + 1])
    pieces = [tokens[s:e].tolist() for s, e in zip(starts, ends, strict=True)]
    return [tok.decode(ids, skip_special_tokens=False) for ids in pieces]


def _tiny(tmp_path: Path, n: int = 30, name: str = "tiny.txt") -> Path:
    path = tmp_path / name
    stories = [f"Story {i}: the cat sat on the mat {i} times." for i in range(n)]
    path.write_text("\n<|endoftext|>\n".join(stories))
    return path


def _cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


# ---------------------------------------------------------------- reading


def test_iter_documents_splits_strips_and_keeps_truncated_last(tmp_path):
    path = tmp_path / "d.txt"
    text = " first doc \n<|endoftext|>\n \n<|endoftext|>second<|endoftext|>"
    text += "third\nline 2<|endoftext|>cut mid-sent"
    path.write_text(text)
    assert list(data.iter_documents(path)) == ["first doc", "second", "third\nline 2", "cut mid-sent"]


def test_iter_documents_jsonl(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"text": " a ", "q": "x"}, {"text": ""}, {"text": "b\nc", "q": "y"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert list(data.iter_documents(path)) == ["a", "b\nc"]
    path.write_text(json.dumps({"q": "x"}) + "\n" + json.dumps({"q": "y"}))
    assert list(data.iter_documents(path, text_field="q")) == ["x", "y"]


# ---------------------------------------------------------------- prepared output


def test_round_trip_and_val_split(prepared, source):
    meta = data.load_meta(prepared)
    tok = Tokenizer.from_file(str(prepared / "tokenizer.json"))
    docs = list(data.iter_documents(source))
    train = _split_docs(data.load_tokens(prepared, "train"), tok)
    val = _split_docs(data.load_tokens(prepared, "val"), tok)

    # text -> ids -> text gives the documents back, each split in file order, whole documents only.
    assert Counter(train) + Counter(val) == Counter(docs)
    assert len(val) == max(1, round(0.1 * len(docs))) == meta["splits"]["val"]["documents"]
    assert len(train) == meta["splits"]["train"]["documents"] == len(docs) - len(val)
    assert not set(val) & set(train)
    for split in (train, val):
        pos = [docs.index(d) for d in split]
        assert pos == sorted(pos)
    # The last document is cut mid-sentence in the source and is still a document.
    assert docs[-1].endswith(" the") and docs[-1] in train + val
    assert meta["seed"] == 1 and meta["val_fraction"] == 0.1


def test_meta_and_shards(prepared, source):
    meta = data.load_meta(prepared)
    assert meta["dtype"] == "uint16" and meta["requested_vocab_size"] == 512
    assert meta["vocab_size"] <= 512
    assert meta["special_tokens"] == {s: i for i, s in enumerate(SPECIAL_TOKENS)}
    assert (meta["eos_id"], meta["bos_id"], meta["pad_id"]) == (0, 1, 2)
    assert meta["source"]["sha256"] == data.file_sha256(source)
    assert meta["source"]["path"] == str(source.resolve())
    tok = Tokenizer.from_file(str(prepared / "tokenizer.json"))
    docs = list(data.iter_documents(source))
    for split in ("train", "val"):
        tokens = data.load_tokens(prepared, split)
        assert isinstance(tokens, np.memmap) and tokens.dtype == np.uint16
        assert len(tokens) == meta["splits"][split]["tokens"]
        assert (prepared / f"{split}.bin").stat().st_size == 2 * len(tokens)
        assert int(tokens.max()) < meta["vocab_size"]
    # The memmap holds exactly what the tokenizer encodes, each document followed by eos.
    val = data.load_tokens(prepared, "val")
    first = next(d for d in docs if _split_docs(val, tok)[0] == d)
    expect = tok.encode(first, add_special_tokens=False).ids + [0]
    assert val[: len(expect)].tolist() == expect


def test_tokenizer_special_tokens_and_any_text(prepared):
    tok = Tokenizer.from_file(str(prepared / "tokenizer.json"))
    for i, s in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(s) == i
        assert tok.encode(s, add_special_tokens=False).ids == [i]
    text = "Tab\there,  two spaces, café, 日本語, 🙂\r\nend <think>ok</think>\n"
    assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == text
    assert tok.decode(tok.encode(" x").ids) == " x"  # no prefix space added or lost


def test_transformers_loads_tokenizer(prepared):
    transformers = pytest.importorskip("transformers")
    text = "Once upon a time, Lily saw a café.\n"
    ref = Tokenizer.from_file(str(prepared / "tokenizer.json")).encode(text).ids
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(prepared / "tokenizer.json"))
    assert fast.encode(text) == ref
    assert fast.decode(ref) == text
    auto = transformers.AutoTokenizer.from_pretrained(str(prepared))  # via tokenizer_config.json
    assert (auto.eos_token_id, auto.bos_token_id, auto.pad_token_id) == (0, 1, 2)
    assert auto.encode(text) == ref


def test_shard_dtype():
    assert data.shard_dtype(data.MIN_VOCAB) == np.uint16 and data.MIN_VOCAB == 269  # 256 bytes + 13 special tokens
    assert data.shard_dtype(65536) == np.uint16
    assert data.shard_dtype(65537) == np.uint32
    assert data.shard_dtype(2**32) == np.uint32
    for bad in (2**32 + 1, 268, 0):
        with pytest.raises(DataError):
            data.shard_dtype(bad)


def test_uint32_shards(tmp_path):
    # The dtype follows the requested vocab; BPE on tiny text stops early, so this is fast.
    out = data.prepare(_tiny(tmp_path), tmp_path / "out", vocab_size=70_000, verbose=False)
    meta = data.load_meta(out)
    assert meta["dtype"] == "uint32" and meta["vocab_size"] < 70_000
    tokens = data.load_tokens(out, "train")
    assert tokens.dtype == np.uint32 and (out / "train.bin").stat().st_size == 4 * len(tokens)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert _split_docs(tokens, tok)[0] == "Story 0: the cat sat on the mat 0 times."


def test_jsonl_and_separate_val_file(tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"body": f"Row {i}: a dog ran home."}) + "\n" for i in range(20)))
    val = tmp_path / "val.jsonl"
    val.write_text(json.dumps({"body": "Held out."}) + "\n" + json.dumps({"body": "  "}) + "\n")
    out = data.prepare(train, tmp_path / "o", vocab_size=300, text_field="body", val_input=val, verbose=False)
    meta = data.load_meta(out)
    assert meta["splits"]["train"]["documents"] == 20 and meta["splits"]["val"]["documents"] == 1
    assert meta["val_source"]["sha256"] == data.file_sha256(val) and meta["source"]["text_field"] == "body"
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert _split_docs(data.load_tokens(out, "val"), tok) == ["Held out."]
    assert _split_docs(data.load_tokens(out, "train"), tok)[3] == "Row 3: a dog ran home."


# ---------------------------------------------------------------- get_batch


def test_get_batch_shapes_shift_determinism(prepared):
    tokens = data.load_tokens(prepared, "train")
    x, y = data.get_batch(tokens, 4, 32, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 32) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    x2, y2 = data.get_batch(tokens, 4, 32, torch.Generator().manual_seed(0))
    assert torch.equal(x, x2) and torch.equal(y, y2)
    x3, _ = data.get_batch(tokens, 4, 32, torch.Generator().manual_seed(1))
    assert not torch.equal(x, x3)
    # Windows are consecutive tokens of the shard.
    ramp = np.arange(100, dtype=np.uint16)
    x, y = data.get_batch(ramp, 8, 10, torch.Generator().manual_seed(3))
    assert torch.equal(y, x + 1) and torch.equal(x[:, 1:] - x[:, :-1], torch.ones(8, 9, dtype=torch.int64))
    assert int(y.max()) <= 99
    # The last possible window can be drawn and nothing past the end is read.
    x, y = data.get_batch(ramp[:11], 3, 10, torch.Generator().manual_seed(0))
    assert torch.equal(y[0], torch.arange(1, 11))
    with pytest.raises(DataError, match="too few"):
        data.get_batch(ramp[:10], 1, 10)


# ---------------------------------------------------------------- caching, --force, atomic writes


def test_skip_if_exists_and_force(tmp_path, capsys):
    src, out = _tiny(tmp_path), tmp_path / "out"
    assert data.prepare(src, out, vocab_size=300, verbose=False) == out
    inode = (out / "train.bin").stat().st_ino
    data.prepare(src, out, vocab_size=300)
    assert "skipping" in capsys.readouterr().out
    assert (out / "train.bin").stat().st_ino == inode

    rc, stdout, _ = _cli(capsys, "prepare", "--input", src, "--out", out, "--vocab-size", 300)
    assert rc == 0 and "skipping" in stdout and (out / "train.bin").stat().st_ino == inode
    argv = ["prepare", "--input", src, "--out", out, "--vocab-size", 300]
    rc, stdout, _ = _cli(capsys, *argv, "--force", "-q")
    assert rc == 0 and "skipping" not in stdout and (out / "train.bin").stat().st_ino != inode

    inode = (out / "train.bin").stat().st_ino
    data.prepare(src, out, vocab_size=300, seed=5, verbose=False)  # other settings: rebuilt
    assert data.load_meta(out)["seed"] == 5 and (out / "train.bin").stat().st_ino != inode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "tiny.txt"]  # no temp dirs left


def test_older_formats_load_and_are_prepared_again(tmp_path, capsys):
    """Format 2 (no R1/tool tokens) still loads; `dsfs prepare` rebuilds it and says why; a newer format is refused;
    a feature that needs the tokens names the one an old tokenizer lacks."""
    src, out = _tiny(tmp_path), tmp_path / "out"
    data.prepare(src, out, vocab_size=300, verbose=False)
    meta = data.load_meta(out)
    assert meta["version"] == data.FORMAT_VERSION == 3
    assert meta["special_tokens"]["<tool_call>"] == 9 and meta["special_tokens"]["</tool_response>"] == 12
    meta["version"] = 2
    (out / "meta.json").write_text(json.dumps(meta))
    assert data.load_meta(out)["version"] == 2 and len(data.load_tokens(out, "train"))  # old data still trains
    data.prepare(src, out, vocab_size=300)
    said = capsys.readouterr().out
    assert "prepared in data format 2; this dsfs writes format 3 (the R1 and tool tokens" in said, said
    assert data.load_meta(out)["version"] == 3
    meta["version"] = 99
    (out / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"prepared by a newer dsfs \(data format 99; this one reads formats up to 3\)"):
        data.load_meta(out)

    old = Tokenizer.from_file(str(out / "tokenizer.json"))
    data.require_special_tokens(old, data.TOOL_TOKENS, "tool calls")  # a format-3 tokenizer has them
    from tokenizers import models, trainers

    v2 = Tokenizer(models.BPE())  # a format-2 tokenizer: special tokens 0..6 only
    v2.train_from_iterator(["a b"], trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL_TOKENS[:7]))
    with pytest.raises(DataError, match=r"ckpt/tokenizer.json has no <tool_call> token, which tool calls need: .*"
                                        r"run `dsfs prepare` again"):
        data.require_special_tokens(v2, data.TOOL_TOKENS, "tool calls", "ckpt/tokenizer.json")


def test_interrupted_prepare_leaves_no_partial_output(tmp_path, monkeypatch):
    src, out = _tiny(tmp_path), tmp_path / "out"

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(data, "_write_shards", boom)
    with pytest.raises(KeyboardInterrupt):
        data.prepare(src, out, vocab_size=300, verbose=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.txt"]
    monkeypatch.undo()
    data.prepare(src, out, vocab_size=300, verbose=False)
    before = (out / "meta.json").read_text()
    monkeypatch.setattr(data, "_write_shards", boom)
    with pytest.raises(KeyboardInterrupt):
        data.prepare(src, out, vocab_size=300, force=True, verbose=False)
    assert (out / "meta.json").read_text() == before  # the previous output is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "tiny.txt"]


def test_refuses_to_overwrite_foreign_directory(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    for force in (False, True):
        with pytest.raises(DataError, match="not a prepared data directory"):
            data.prepare(_tiny(tmp_path), out, vocab_size=300, force=force, verbose=False)
    assert (out / "notes.txt").read_text() == "keep me"


def test_default_input_and_out_dir(tmp_path, monkeypatch, capsys):
    root = Path(cli.__file__).resolve().parent.parent
    assert data.DEFAULT_INPUT == root.parent / "shared" / "data" / "tinystories_sample.txt"
    assert data.default_out_dir("/x/stories.txt", 512) == Path("data_cache/stories-v512")
    if not data.DEFAULT_INPUT.is_file():
        pytest.skip(f"{data.DEFAULT_INPUT} is absent")
    monkeypatch.chdir(tmp_path)
    rc, _, err = _cli(capsys, "prepare", "--vocab-size", 300, "-q")
    assert rc == 0, err
    meta = data.load_meta(tmp_path / "data_cache" / "tinystories_sample-v300")
    assert meta["source"]["path"] == str(data.DEFAULT_INPUT.resolve())
    assert meta["splits"]["val"]["documents"] >= 1


# ---------------------------------------------------------------- bad input


def _write(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


BAD = {
    "missing file": (None, {}, ["no such file"]),
    "empty file": (("e.txt", ""), {}, ["no non-empty documents"]),
    "only separators": (("s.txt", " <|endoftext|>\n\n<|endoftext|> "), {}, ["no non-empty documents"]),
    "empty jsonl": (("e.jsonl", "\n\n"), {}, ["no non-empty documents"]),
    "not utf-8": (("b.txt", b"hello\nwor\xffld <|endoftext|> more"), {}, ["UTF-8", "byte offset 9", "0xff"]),
    "vocab too large": (("v.txt", "a<|endoftext|>b"), {"vocab_size": 2**32 + 1}, ["does not fit", "uint32"]),
    "vocab too small": (("v.txt", "a<|endoftext|>b"), {"vocab_size": 268}, ["at least 269"]),
    "jsonl not object": (("j.jsonl", '{"text": "a"}\n[1, 2]\n'), {}, ["line 2", "JSON object", "list"]),
    "jsonl not json": (("j.jsonl", '{"text": "a"}\n\n{"text": \n'), {}, ["line 3", "not valid JSON"]),
    "jsonl no field": (("j.jsonl", '{"q": "a"}\n'), {}, ["line 1", "no text field 'text'", "--text-field"]),
    "jsonl non-string": (("j.jsonl", '{"text": "a"}\n{"text": 3}\n'), {}, ["line 2", "non-string"]),
    "one document": (("one.txt", "just one story"), {}, ["only 1 document"]),
    "val fraction": (("v.txt", "a<|endoftext|>b"), {"val_fraction": 1.0}, ["val fraction"]),
}
CLI_FLAGS = {"vocab_size": "--vocab-size", "val_fraction": "--val-fraction"}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input(case, tmp_path, capsys):
    file, kwargs, parts = BAD[case]
    path = _write(tmp_path, *file) if file else tmp_path / "missing.txt"
    kwargs = {"vocab_size": 300, **kwargs}
    with pytest.raises(DataError) as e:
        data.prepare(path, tmp_path / "out", verbose=False, **kwargs)
    for part in parts:
        assert part in str(e.value)

    argv = ["prepare", "--input", path, "--out", tmp_path / "out", "-q"]
    argv += [x for k, v in kwargs.items() for x in (CLI_FLAGS[k], v)]
    rc, _, err = _cli(capsys, *argv)
    assert rc == 1
    assert err.startswith("dsfs: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert all(part in err for part in parts), err
    assert not (tmp_path / "out").exists()


def test_offline_dataset_message(tmp_path, monkeypatch, capsys):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(*args, **kwargs):
        raise LocalEntryNotFoundError("Cannot reach the Hub and the file is not in the local cache.")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(DataError, match="--input"):
        data.prepare(dataset="tinystories", verbose=False)
    rc, _, err = _cli(capsys, "prepare", "--dataset", "tinystories", "--out", tmp_path / "o")
    assert rc == 1 and err.startswith("dsfs: error: could not download") and err.count("\n") == 1
    assert "--input" in err and "roneneldan/TinyStories" in err


def test_cli_usage(capsys):
    rc, out, _ = _cli(capsys, "prepare", "--help")
    assert rc == 0 and "--vocab-size" in out and "--val-fraction" in out and "--force" in out
    rc, _, err = _cli(capsys, "prepare", "--vocab-size", "lots")
    assert rc == 2 and err.startswith("dsfs: error: argument --vocab-size") and err.count("\n") == 1
    rc, _, err = _cli(capsys, "prepare", "--input", "a.txt", "--dataset", "tinystories")
    assert rc == 2 and "not allowed with" in err and err.count("\n") == 1
    rc, _, err = _cli(capsys, "frobnicate")
    assert rc == 2 and err.startswith("dsfs: error: argument <verb>: invalid choice")
    rc, _, err = _cli(capsys)
    assert rc == 2 and "prepare" in err


# ---------------------------------------------------------------- the default source where ../shared/data is absent


class _FakeHubFile(io.BytesIO):
    """Stands in for `huggingface_hub.HfFileSystem().open(...)`: records the path and the bytes read."""

    opened: list[str] = []

    def __init__(self, path: str, content: bytes):
        super().__init__(content)
        self.opened.append(path)


def _fake_hub(monkeypatch, content: bytes, n_bytes: int) -> list[str]:
    monkeypatch.setattr(data, "TINYSTORIES_SAMPLE_BYTES", n_bytes)
    _FakeHubFile.opened = []
    monkeypatch.setattr(data, "_open_hub_file", lambda path: _FakeHubFile(path, content))
    return _FakeHubFile.opened


def test_fetch_tinystories_sample_reads_the_slice_and_caches_it(tmp_path, monkeypatch, capsys):
    content = ("Once upon a time, a café.\n<|endoftext|>\n" * 3000).encode()
    n = content.index("é".encode(), 40_000) + 1  # the slice ends inside é (2 bytes in UTF-8)
    opened = _fake_hub(monkeypatch, content, n)
    dest = data.fetch_tinystories_sample(tmp_path / "cache" / "sample.txt")
    assert opened == ["datasets/roneneldan/TinyStories/TinyStories-train.txt"]
    assert dest.read_bytes() == content[: n - 1]  # the slice, without the cut character
    assert "TinyStories" in capsys.readouterr().err  # the progress bar
    monkeypatch.setattr(data, "_open_hub_file", lambda path: pytest.fail("read the hub again"))
    assert data.fetch_tinystories_sample(tmp_path / "cache" / "sample.txt") == dest  # cached
    assert data.TINYSTORIES_SAMPLE == Path("data_cache/tinystories_sample.txt")


def test_default_run_without_shared_data_fetches_the_sample(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DEFAULT_INPUT", tmp_path / "no-shared" / "tinystories_sample.txt")
    monkeypatch.chdir(tmp_path)
    text = _source_text().encode()
    _fake_hub(monkeypatch, text + b"<|endoftext|> never read", len(text))
    out = data.prepare(vocab_size=300, verbose=False)
    assert out == Path("data_cache/tinystories_sample-v300")
    meta = data.load_meta(out)
    assert meta["source"]["path"] == str((tmp_path / "data_cache" / "tinystories_sample.txt").resolve())
    assert meta["source"]["bytes"] == len(text) and meta["splits"]["val"]["documents"] >= 1


@pytest.mark.parametrize("how", ["hub error", "HF_HUB_OFFLINE"])
def test_default_run_offline_says_how_to_pass_a_local_file(how, tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants

    monkeypatch.setattr(data, "DEFAULT_INPUT", tmp_path / "no-shared" / "tinystories_sample.txt")
    monkeypatch.chdir(tmp_path)
    if how == "hub error":
        def unreachable(path):
            raise ConnectionError("Cannot reach https://huggingface.co\nsecond line")

        monkeypatch.setattr(data, "_open_hub_file", unreachable)
    else:  # the real huggingface_hub, told it is offline: it raises before any request
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match="dsfs prepare --input PATH"):
        data.prepare(verbose=False)
    for argv in (["prepare", "-q"], ["train", "--out", tmp_path / "run", "-q"]):
        rc, _, err = _cli(capsys, *argv)
        assert rc == 1 and err.count("\n") == 1, err
        assert err.startswith("dsfs: error: no input: ") and "roneneldan/TinyStories" in err
        assert "`dsfs prepare --input PATH`" in err and "`dsfs train --data DIR`" in err
    assert not (tmp_path / "data_cache" / "tinystories_sample.txt").exists()


def test_prepare_api_checks_paths_and_split_sizes(tmp_path):
    """A directory as --input, an --out under a file (refused before the tokenizer trains), too little text."""
    src = _tiny(tmp_path)
    with pytest.raises(DataError, match="is a directory; expected a text or .jsonl file"):
        data.prepare(tmp_path, tmp_path / "o", vocab_size=300, verbose=False)
    with pytest.raises(DataError, match="is a directory; expected a text or .jsonl file"):
        list(data.iter_documents(tmp_path))
    (tmp_path / "f").write_text("x")
    with pytest.raises(DataError, match="lies under the file"):
        data.prepare(src, tmp_path / "f" / "o", vocab_size=300, verbose=False)
    with pytest.raises(DataError, match=r"train 5 tokens / 2 documents, val 4 tokens / 1 document; expected at least "
                       "64 train tokens"):
        data.prepare(_write(tmp_path, "three.txt", "a b<|endoftext|>c<|endoftext|>d e"), tmp_path / "o",
                     vocab_size=300, val_fraction=0.3, verbose=False)
