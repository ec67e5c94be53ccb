"""Data preparation for pretraining: text -> byte-level BPE tokenizer -> packed token shards.

``prepare()`` (the ``dsfs prepare`` verb) turns a text source into a directory::

    tokenizer.json          byte-level BPE (``tokenizers``), special tokens at ids 0..12
    tokenizer_config.json   bos/eos/pad and the chat template (`dsfs.chat`) for ``transformers.AutoTokenizer``
    train.bin, val.bin      raw token ids, documents packed back to back, each followed by eos
    meta.json               dtype, vocab size, token/document counts, special ids, source and its sha256

Readers memory-map the shards with ``load_tokens`` and draw training windows with ``get_batch``.

Sources: a ``.jsonl`` / ``.ndjson`` file with one JSON object per line (the text in ``text_field``), or any
other file read as UTF-8 text whose documents are separated by ``<|endoftext|>``. Documents are stripped and
empty ones dropped. The last document of a text file may be cut short (a byte-range sample, such as the shared
TinyStories sample, ends mid-sentence); it is kept as a document like the others. A document that contains the
literal text of a special token (``<think>``, ``<|user|>``, ...) is encoded with that special token's id.

Sources are streamed (read a few times, never held in memory whole) and shards written in chunks, so memory
stays small even for the full TinyStories train file (about 1.9 GB).

The default source is ``../shared/data/tinystories_sample.txt`` (the first 2 MiB of TinyStories' train file).
Where it is absent (every user's clone), the default run fetches the same slice, the first 2,097,152 bytes of
``TinyStories-train.txt`` of the Hugging Face dataset ``roneneldan/TinyStories``, through ``huggingface_hub``
(an HTTP range request, `fetch_tinystories_sample`) and caches it as ``data_cache/tinystories_sample.txt``.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

if TYPE_CHECKING:
    import torch

EOS = "<|endoftext|>"
BOS = "<|begin_of_text|>"
PAD = "<|pad|>"
# Ids 0..12, in this order: eos, bos, pad, the chat roles (`dsfs.chat`), DeepSeek-R1's reasoning and answer tags, and
# the tool-call tags (`dsfs.tools`, Qwen's / Hermes' layout, as TRL renders tool calls).
R1_TOKENS = ["<think>", "</think>", "<answer>", "</answer>"]
TOOL_TOKENS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]
SPECIAL_TOKENS = [EOS, BOS, PAD, "<|user|>", "<|assistant|>", *R1_TOKENS, *TOOL_TOKENS]
DEFAULT_VOCAB = 4096
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)  # every byte plus the special tokens
MAX_VOCAB = 2**32  # ids must fit uint32
MIN_TRAIN_TOKENS = 64  # a train split below one window of a short --seq-len is refused at prepare
FORMAT_VERSION = 3  # 2: digits pre-split (one token per digit); 3 = R1/tool tokens reserved (ids 7..12)
_FORMAT_CHANGE = "the R1 and tool tokens <answer>, </answer>, <tool_call>, ... reserved as ids 7..12"
SPLITS = ("train", "val")
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_INPUT = REPO_ROOT.parent / "shared" / "data" / "tinystories_sample.txt"
TINYSTORIES_REPO = "roneneldan/TinyStories"
TINYSTORIES_FILES = ("TinyStories-train.txt", "TinyStories-valid.txt")
TINYSTORIES_SAMPLE_BYTES = 2 * 1024 * 1024  # the shared sample's size: the default run's slice of the train file
TINYSTORIES_SAMPLE = Path("data_cache") / "tinystories_sample.txt"  # where the fetched slice is cached
_FETCH_CHUNK = 256 * 1024  # bytes per range request (and progress-bar step)
_ENCODE_CHUNK = 2048  # documents per encode_batch call

from dsfs.errors import DataError  # noqa: E402 (defined with the other user errors; imported from here too)

# ---------------------------------------------------------------- reading


def _is_jsonl(path: Path) -> bool:
    return path.suffix.lower() in (".jsonl", ".ndjson")


def _decode(line: bytes, offset: int, path: Path) -> str:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path}: not UTF-8 text: byte 0x{line[e.start]:02x} at byte offset {offset + e.start}"
        ) from None


def iter_documents(path: str | os.PathLike, text_field: str = "text") -> Iterator[str]:
    """Yield the documents of a source file, in file order, stripped, empty ones dropped.

    ``.jsonl``/``.ndjson``: one JSON object per non-blank line; the document is ``obj[text_field]``, a
    string. Any other file: UTF-8 text, documents separated by ``<|endoftext|>``; the last one may be
    truncated and is still yielded. Raises ``DataError`` for a missing file, non-UTF-8 bytes (names the byte
    offset), or a jsonl line that is not a JSON object with a string ``text_field`` (names the line number).
    Yields nothing for an empty file (``count_documents`` turns that into an error).
    """
    path = Path(path)
    check_source_file(path)
    jsonl = _is_jsonl(path)
    buf: list[str] = []
    offset = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            line = _decode(raw, offset, path)
            offset += len(raw)
            if jsonl:
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}: line {lineno}: not valid JSON ({e.msg})") from None
                if not isinstance(obj, dict):
                    got = type(obj).__name__
                    raise DataError(f"{path}: line {lineno}: expected a JSON object, got {got}")
                if not isinstance(obj.get(text_field), str):
                    why = "has no" if text_field not in obj else "has a non-string"
                    keys = ", ".join(map(repr, obj)) or "none"
                    raise DataError(
                        f"{path}: line {lineno}: object {why} text field {text_field!r} "
                        f"(keys: {keys}; choose one with --text-field)"
                    )
                doc = obj[text_field].strip()
                if doc:
                    yield doc
            elif EOS in line:
                first, *rest = line.split(EOS)
                buf.append(first)
                for doc in ["".join(buf), *rest[:-1]]:
                    if doc.strip():
                        yield doc.strip()
                buf = [rest[-1]]
            else:
                buf.append(line)
    last = "".join(buf).strip()
    if last:
        yield last


def plural(n: int, word: str) -> str:
    """``n`` and ``word``, plural unless ``n == 1``: ``plural(1, "step")`` -> ``"1 step"``, ``"2,048 steps"``."""
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def check_source_file(path: str | os.PathLike, option: str = "--input") -> None:
    """Raise ``DataError`` when ``path`` is not a file: it does not exist, or it is a directory."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{option} {path} is a directory; expected a text or .jsonl file")
    if not path.is_file():
        raise DataError(f"{path}: no such file")


def check_out_dir(path: str | os.PathLike, option: str = "--out") -> None:
    """Raise ``DataError`` when ``path`` cannot be made a directory: it, or the first of its parents that exists,
    is a file. Reads only; a verb calls it before its slow work."""
    path = Path(path)
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                where = "is a file" if p == path else f"lies under the file {p}"
                raise DataError(f"{option} {path} {where}; expected a directory")
            return


def count_documents(path: str | os.PathLike, text_field: str = "text") -> int:
    """Number of documents ``iter_documents`` yields (validates the whole file on the way).

    Raises ``DataError`` as ``iter_documents`` does, and when the file holds no non-empty document.
    """
    n = sum(1 for _ in iter_documents(path, text_field))
    if n == 0:
        raise DataError(f"{path}: no non-empty documents (the file is empty or holds only separators/blanks)")
    return n


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------- tokenizer


def shard_dtype(vocab_size: int) -> np.dtype:
    """Token shard dtype for a vocabulary: uint16 when ``vocab_size <= 65536`` else uint32.

    Raises ``DataError`` when ``vocab_size > 2**32`` (ids would not fit) or ``vocab_size < 269``
    (256 byte tokens + 13 special tokens: `MIN_VOCAB`).
    """
    if vocab_size > MAX_VOCAB:
        raise DataError(f"vocab size {vocab_size} does not fit the uint32 token shards (max {MAX_VOCAB})")
    if vocab_size < MIN_VOCAB:
        raise DataError(
            f"vocab size {vocab_size} is too small: need at least {MIN_VOCAB} "
            f"(256 byte tokens + {len(SPECIAL_TOKENS)} special tokens)"
        )
    return np.dtype("<u2" if vocab_size <= 2**16 else "<u4")  # little-endian on every host


def train_tokenizer(
    texts, vocab_size: int = DEFAULT_VOCAB, length: int | None = None, progress: bool = False
):
    """Train a byte-level BPE ``tokenizers.Tokenizer`` on an iterable of strings (or of lists of strings).

    Digits are split off one by one first (``Digits(individual_digits=True)``, as Llama's and DeepSeek-V3's
    tokenizers do, so ``"348"`` is always the three tokens ``3 4 8`` and a small model can learn arithmetic on
    them), then the ByteLevel pre-tokenizer (GPT-2 regex, no prefix space) and decoder, so
    ``decode(encode(s).ids) == s`` for any string. Ids 0..12 are ``SPECIAL_TOKENS`` (0 = ``<|endoftext|>`` eos,
    1 = ``<|begin_of_text|>`` bos, 2 = ``<|pad|>``), then the 256 byte tokens, then merges. The result holds at
    most ``vocab_size`` tokens (fewer when the text runs out of pairs to merge). ``length``: number of items, for
    the progress bar. Raises ``DataError`` for a vocab size outside [269, 2**32].
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    shard_dtype(vocab_size)  # validates the size
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([  # every digit its own token, as Llama's and DeepSeek's
        pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    for i, s in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(s) == i, (s, tok.token_to_id(s))
    return tok


def read_tokenizer(path: str | os.PathLike):
    """The ``tokenizers.Tokenizer`` in the ``tokenizer.json`` file ``path``; ``DataError`` when it cannot be read
    (not JSON, not a tokenizer)."""
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises plain Exception subclasses for every kind of bad file
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{path}: cannot be read as a tokenizer.json ({reason})") from None


def _batched(items, n: int):
    batch = []
    for x in items:
        batch.append(x)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


# ---------------------------------------------------------------- prepare


def tokenizer_config() -> dict:
    """The ``tokenizer_config.json`` of a prepared directory: ``PreTrainedTokenizerFast`` with bos/eos/pad and the
    chat template (`dsfs.chat.CHAT_TEMPLATE`), so ``transformers.AutoTokenizer`` loads the tokenizer and its
    ``apply_chat_template`` renders the ids of `dsfs.chat.render`."""
    from dsfs.chat import CHAT_TEMPLATE  # dsfs.chat imports this module

    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }


def write_tokenizer_config(directory: str | os.PathLike, only_if_changed: bool = False) -> None:
    """Write `tokenizer_config` as ``directory/tokenizer_config.json`` (through a temporary file and a rename).
    ``only_if_changed``: leave a file that already holds it untouched (the skip path of `prepare`)."""
    path = Path(directory) / "tokenizer_config.json"
    text = json.dumps(tokenizer_config(), indent=2) + "\n"
    if only_if_changed and path.is_file() and path.read_text(encoding="utf-8", errors="replace") == text:
        return
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _source_info(path: Path, text_field: str) -> dict:
    return {
        "path": str(path.resolve()),
        "sha256": file_sha256(path),
        "bytes": path.stat().st_size,
        "format": "jsonl" if _is_jsonl(path) else "txt",
        "text_field": text_field if _is_jsonl(path) else None,
    }


def _settings(meta: dict) -> tuple:
    """What must agree for an existing output to be reused."""
    src, val = meta.get("source") or {}, meta.get("val_source") or {}
    return (
        meta.get("version"),
        src.get("sha256"),
        src.get("text_field"),
        val.get("sha256"),
        val.get("text_field"),
        meta.get("requested_vocab_size"),
        meta.get("val_fraction"),
        meta.get("seed"),
    )


def load_meta(data_dir: str | os.PathLike) -> dict:
    """The ``meta.json`` of a prepared directory as a dict; ``DataError`` if it is missing or unreadable, or written
    by a newer dsfs (a data format above `FORMAT_VERSION`).

    Older formats load: a directory's shards hold the ids of its own ``tokenizer.json``, which every checkpoint
    trained on it carries, so format 1 (digits not pre-split) and 2 (no R1/tool tokens) still pretrain and chat as
    before. What needs the tokens reserved since format 3 checks the tokenizer itself (`require_special_tokens`), and
    ``dsfs prepare`` rebuilds an older output in place (`prepare`)."""
    path = Path(data_dir) / "meta.json"
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{data_dir}: not a prepared data directory ({path.name}: {e})") from None
    version = meta.get("version") if isinstance(meta, dict) else None
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise DataError(f"{data_dir}: prepared by a newer dsfs (data format {version}; this one reads formats up to "
                        f"{FORMAT_VERSION}); upgrade dsfs, or run `dsfs prepare` again with this one")
    return meta


def require_special_tokens(tokenizer, tokens, what: str, source: str | os.PathLike = "the tokenizer") -> None:
    """Raise ``DataError`` (one line) naming the first of ``tokens`` (strings) that ``tokenizer`` (a
    ``tokenizers.Tokenizer``) lacks as a token of its own, for a feature that needs it: ``what`` (``"tool calls"``)
    says which, ``source`` where the tokenizer came from (a checkpoint directory or file). A tokenizer prepared
    before data format 3 has ids 0..6 only (no ``<answer>``, ``<tool_call>``, ...): its checkpoint still chats and
    evaluates, and R1-format text is encoded piece by piece, but a feature that stops on or masks these tokens
    needs a tokenizer that holds them."""
    for t in tokens:
        if tokenizer.token_to_id(t) is None:
            raise DataError(f"{source} has no {t} token, which {what} need: it was prepared before data format 3 "
                            "reserved the R1 and tool tokens (ids 7..12); run `dsfs prepare` again and train a "
                            "checkpoint on that data")


def default_out_dir(input_path: str | os.PathLike, vocab_size: int) -> Path:
    """``data_cache/<source stem>-v<vocab_size>`` under the current directory."""
    return Path("data_cache") / f"{Path(input_path).stem}-v{vocab_size}"


def download_tinystories() -> tuple[Path, Path]:
    """Download (or find in the Hugging Face cache) ``roneneldan/TinyStories`` train and valid text files.

    Returns ``(train_path, valid_path)``; about 1.9 GB and 19 MB. Raises ``DataError`` naming ``--input`` when
    the hub cannot be reached (offline, ``HF_HUB_OFFLINE=1``) or the download fails.
    """
    from huggingface_hub import hf_hub_download

    paths = []
    for name in TINYSTORIES_FILES:
        try:
            with _quiet_hub():
                paths.append(Path(hf_hub_download(TINYSTORIES_REPO, name, repo_type="dataset")))
        except Exception as e:  # network, auth, disk: all end the same way for the user
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise DataError(
                f"could not download {name} from the Hugging Face hub dataset {TINYSTORIES_REPO} ({reason}); "
                "offline? pass a local text or .jsonl file with --input PATH"
            ) from e
    return paths[0], paths[1]


@contextlib.contextmanager
def _quiet_hub():
    """huggingface_hub's retry warnings ("Retrying in 8s [Retry 1/5]") silenced: a failure ends in one line."""
    from huggingface_hub.utils import logging as hub_logging

    logger = hub_logging.get_logger("huggingface_hub")
    level = logger.level
    logger.setLevel(hub_logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _open_hub_file(path: str):
    """Open ``path`` (``datasets/<repo>/<file>``) on the Hugging Face hub for reading; each ``read`` is an HTTP
    range request (``huggingface_hub.HfFileSystem``)."""
    from huggingface_hub import HfFileSystem

    return HfFileSystem().open(path, "rb", block_size=_FETCH_CHUNK)


def _whole_utf8(raw: bytes) -> bytes:
    """``raw`` without a UTF-8 character that its end cuts (a byte range may end inside one)."""
    for i in range(1, min(4, len(raw)) + 1):
        b = raw[-i]
        if b & 0xC0 != 0x80:  # the last lead (or ASCII) byte
            need = 1 if b < 0x80 else 2 if b < 0xE0 else 3 if b < 0xF0 else 4
            return raw[:-i] if need > i else raw
    return raw


def fetch_tinystories_sample(dest: str | os.PathLike | None = None, verbose: bool = True) -> Path:
    """The default run's text where ``../shared/data`` is absent: the first ``TINYSTORIES_SAMPLE_BYTES``
    (2,097,152) bytes of ``TinyStories-train.txt`` of the hub dataset ``roneneldan/TinyStories``, the slice the
    shared ``tinystories_sample.txt`` holds, so the default run's results stay comparable. Its last story is cut
    mid-sentence (and a character the cut splits is dropped).

    Read by HTTP range requests (`_open_hub_file`) with a tqdm progress bar on stderr when ``verbose``, and cached
    at ``dest`` (default ``data_cache/tinystories_sample.txt`` under the current directory; written atomically):
    a later call reads the cache and needs no network. Returns ``dest``. Raises ``DataError``, one line that says
    how to pass a local file, when the hub cannot be reached (offline, ``HF_HUB_OFFLINE=1``) or the read fails.
    """
    dest = Path(dest) if dest is not None else TINYSTORIES_SAMPLE
    if dest.is_file():
        return dest
    remote, n = f"datasets/{TINYSTORIES_REPO}/{TINYSTORIES_FILES[0]}", TINYSTORIES_SAMPLE_BYTES
    chunks: list[bytes] = []
    try:
        with (
            _quiet_hub(),
            _open_hub_file(remote) as f,
            tqdm(total=n, unit="B", unit_scale=True, desc="TinyStories", disable=not verbose, file=sys.stderr) as bar,
        ):
            while (got := sum(map(len, chunks))) < n and (block := f.read(min(_FETCH_CHUNK, n - got))):
                chunks.append(block)
                bar.update(len(block))
    except Exception as e:  # network, offline mode, auth: all end the same way for the user
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise DataError(
            f"no input: {DEFAULT_INPUT} does not exist and fetching the first {n:,} bytes of {TINYSTORIES_FILES[0]} "
            f"from the Hugging Face hub dataset {TINYSTORIES_REPO} failed ({reason}); pass a local file with "
            "`dsfs prepare --input PATH`, or a prepared directory with `dsfs train --data DIR`"
        ) from e
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    tmp.write_bytes(_whole_utf8(b"".join(chunks)))
    tmp.replace(dest)
    return dest


def _write_shards(tmp: Path, docs, tok, dtype: np.dtype, total: int, verbose: bool) -> dict:
    """Encode ``(document, split)`` pairs in chunks, add ids + eos to ``tmp/<split>.bin``; return counts."""
    eos = tok.token_to_id(EOS)
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # fast: skips offsets (tokenizers >= 0.21)
    counts = {s: {"tokens": 0, "documents": 0} for s in SPLITS}
    with (
        open(tmp / "train.bin", "wb") as f_train,
        open(tmp / "val.bin", "wb") as f_val,
        tqdm(total=total, unit="doc", desc="encoding", disable=not verbose, file=sys.stderr) as bar,
    ):
        files = {"train": f_train, "val": f_val}
        for batch in _batched(docs, _ENCODE_CHUNK):
            ids: dict[str, list[int]] = {s: [] for s in SPLITS}
            encodings = encode([d for d, _ in batch], add_special_tokens=False)
            for (_, split), enc in zip(batch, encodings, strict=True):
                ids[split] += enc.ids
                ids[split].append(eos)
                counts[split]["documents"] += 1
            for s in SPLITS:
                np.asarray(ids[s], dtype=dtype).tofile(files[s])
                counts[s]["tokens"] += len(ids[s])
            bar.update(len(batch))
    return counts


def _check_counts(input: Path, counts: dict) -> None:
    if counts["train"]["tokens"] < MIN_TRAIN_TOKENS:
        tr, va = (" / ".join(plural(n, k[:-1]) for k, n in counts[s].items()) for s in SPLITS)
        raise DataError(f"{input}: too little text for a train and a val split: train {tr}, val {va}; expected "
                        f"at least {MIN_TRAIN_TOKENS} train tokens (use a larger source)")


def prepare(
    input: str | os.PathLike | None = None,
    out_dir: str | os.PathLike | None = None,
    *,
    vocab_size: int = DEFAULT_VOCAB,
    val_fraction: float = 0.05,
    seed: int = 0,
    text_field: str = "text",
    val_input: str | os.PathLike | None = None,
    dataset: str | None = None,
    force: bool = False,
    verbose: bool = True,
) -> Path:
    """Train a tokenizer on a text source and write packed token shards; return the output directory.

    ``input``: a ``.txt`` (``<|endoftext|>``-separated) or ``.jsonl`` file (see ``iter_documents``); default
    ``../shared/data/tinystories_sample.txt`` relative to the repository root, when it exists, else the same
    slice of TinyStories fetched from the Hugging Face hub and cached (`fetch_tinystories_sample`).
    ``dataset="tinystories"`` instead downloads ``roneneldan/TinyStories``, whose valid file becomes
    ``val_input``.
    ``out_dir``: default ``data_cache/<input stem>-v<vocab_size>`` under the current directory.
    ``val_input``: a separate validation file; then every input document goes to train and ``val_fraction``
    is unused. Otherwise ``max(1, round(val_fraction * n_docs))`` whole documents, picked by a permutation
    seeded with ``seed``, go to val (at least one document stays in train).

    The tokenizer is trained on the train documents only. Each document is encoded (no bos) and followed by
    the eos id 0; shards are raw ``meta["dtype"]`` arrays (uint16 when ``vocab_size <= 65536``, else uint32).
    If ``out_dir`` already holds an output with the same source sha256(s), vocab size, val fraction, seed and
    text field, nothing is done (printed when ``verbose``) unless ``force``. An output with other settings, or of
    an older data format (`FORMAT_VERSION`; the reason is printed), is replaced. The output is written to a
    temporary sibling directory and renamed into place, so an interrupted run leaves the previous output (or none),
    never a partial one; a killed run may leave a hidden ``.<name>.tmp-*`` sibling behind.

    Raises ``DataError`` for a missing or empty source, non-UTF-8 bytes, malformed jsonl, a vocab size outside
    [269, 2**32], a val fraction outside (0, 1), fewer than 2 documents, a train split under ``MIN_TRAIN_TOKENS``
    (64) tokens, an ``out_dir`` that is (or lies under) a file or exists but is not a prepared data directory, or
    a failed download.
    """
    log = print if verbose else (lambda *a, **k: None)
    if dataset is not None:
        if input is not None:
            raise DataError("pass either --input or --dataset, not both")
        if dataset != "tinystories":
            raise DataError(f"unknown dataset {dataset!r} (known: tinystories)")
        input, val_input = download_tinystories()
    if input is None:
        input = DEFAULT_INPUT if DEFAULT_INPUT.is_file() else fetch_tinystories_sample(verbose=verbose)
    input = Path(input)
    dtype = shard_dtype(vocab_size)
    if val_input is None and not 0.0 < val_fraction < 1.0:
        raise DataError(f"val fraction must be in (0, 1), got {val_fraction}")
    for p, option in ((input, "--input"), (val_input, "--val-input")):
        if p is not None:
            check_source_file(p, option)
    out = Path(out_dir) if out_dir is not None else default_out_dir(input, vocab_size)
    check_out_dir(out)

    source = _source_info(input, text_field)
    val_source = _source_info(Path(val_input), text_field) if val_input is not None else None
    wanted = {
        "version": FORMAT_VERSION,
        "source": source,
        "val_source": val_source,
        "requested_vocab_size": vocab_size,
        "val_fraction": None if val_input is not None else val_fraction,
        "seed": seed,
    }
    if out.exists():
        if (out / "meta.json").is_file():
            try:
                old = load_meta(out)
            except DataError:
                old = {}  # unreadable meta: rebuild
            complete = all((out / f).is_file() for f in ("tokenizer.json", "train.bin", "val.bin"))
            if complete and _settings(old) == _settings(wanted) and not force:
                log(f"{out}: already prepared from {input} with these settings; skipping (--force to redo)")
                try:
                    write_tokenizer_config(out, only_if_changed=True)  # an older output gains the chat template
                except OSError as e:  # a read-only directory keeps its older tokenizer_config.json
                    log(f"{out}: could not update tokenizer_config.json ({e.strerror}); it lacks the chat template")
                return out
            if force:
                why = "--force"
            elif complete and old.get("version") != FORMAT_VERSION:
                why = (f"prepared in data format {old.get('version')}; this dsfs writes format {FORMAT_VERSION} "
                       f"({_FORMAT_CHANGE})")
            else:
                why = "settings or source changed"
            log(f"{out}: {why}; preparing it again")
        elif any(out.iterdir()):
            raise DataError(f"{out} exists and is not a prepared data directory; choose another --out")

    # Split by document index.
    log(f"reading {input}")
    n_docs = count_documents(input, text_field)
    if val_input is not None:
        val_ids: set[int] = set()
        n_val_docs = count_documents(val_input, text_field)
    else:
        if n_docs < 2:
            raise DataError(f"{input}: only 1 document; need at least 2 to hold out a validation split")
        n_val_docs = min(max(1, round(val_fraction * n_docs)), n_docs - 1)
        val_ids = set(np.random.default_rng(seed).permutation(n_docs)[:n_val_docs].tolist())
    n_train_docs = n_docs - len(val_ids)

    def train_docs():
        return (d for i, d in enumerate(iter_documents(input, text_field)) if i not in val_ids)

    log(f"training a {vocab_size}-token byte-level BPE on {plural(n_train_docs, 'document')}")
    n_batches = -(-n_train_docs // 1000)
    tok = train_tokenizer(_batched(train_docs(), 1000), vocab_size, n_batches, progress=verbose)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it owner-only
        tok.save(str(tmp / "tokenizer.json"))
        write_tokenizer_config(tmp)
        if val_input is None:
            docs = (
                (d, "val" if i in val_ids else "train")
                for i, d in enumerate(iter_documents(input, text_field))
            )
        else:
            docs = itertools.chain(
                ((d, "train") for d in iter_documents(input, text_field)),
                ((d, "val") for d in iter_documents(val_input, text_field)),
            )
        counts = _write_shards(tmp, docs, tok, dtype, n_train_docs + n_val_docs, verbose)
        _check_counts(input, counts)
        meta = {
            **wanted,
            "format": "dsfs packed token shards: raw little-endian ids, each document followed by eos",
            "dtype": dtype.name,
            "vocab_size": tok.get_vocab_size(),
            "special_tokens": {s: tok.token_to_id(s) for s in SPECIAL_TOKENS},
            "eos_id": tok.token_to_id(EOS),
            "bos_id": tok.token_to_id(BOS),
            "pad_id": tok.token_to_id(PAD),
            "splits": {s: {"file": f"{s}.bin", **counts[s]} for s in SPLITS},
            "tokenizer": "tokenizer.json",
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        if out.exists():  # move the old output aside first: `out` is never missing-but-half-written
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            out.rename(trash / out.name)
            tmp.rename(out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    tr, va = counts["train"], counts["val"]
    log(
        f"wrote {out}: vocab {meta['vocab_size']}, {dtype.name}; train {plural(tr['tokens'], 'token')} / "
        f"{plural(tr['documents'], 'doc')}, val {plural(va['tokens'], 'token')} / {plural(va['documents'], 'doc')}"
    )
    return out


# ---------------------------------------------------------------- reading shards


def load_tokens(data_dir: str | os.PathLike, split: str) -> np.memmap:
    """Memory-map one split of a prepared directory: a read-only 1-D array of token ids (``meta["dtype"]``).

    ``split``: ``"train"`` or ``"val"``. Raises ``DataError`` for another split name or a missing directory
    or file.
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r} (expected one of {', '.join(SPLITS)})")
    meta = load_meta(data_dir)
    path = Path(data_dir) / meta["splits"][split]["file"]
    if not path.is_file():
        raise DataError(f"{path}: no such file; run dsfs prepare again")
    return np.memmap(path, dtype=np.dtype(meta["dtype"]).newbyteorder("<"), mode="r")


def get_batch(
    tokens: np.ndarray, batch_size: int, seq_len: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ``batch_size`` random windows of ``seq_len + 1`` consecutive tokens.

    Returns ``(inputs, targets)``, both int64 CPU tensors of shape ``(batch_size, seq_len)``, with
    ``targets[:, t] == inputs[:, t + 1]`` for ``t < seq_len - 1`` (targets are the inputs shifted by one).
    Window starts are uniform over ``[0, len(tokens) - seq_len - 1]`` drawn with ``generator``, so a generator
    seeded the same gives the same batch. Windows may cross document boundaries (eos separates documents).
    Raises ``DataError`` when ``len(tokens) < seq_len + 1``.
    """
    n = len(tokens)
    if n < seq_len + 1:
        raise DataError(f"only {plural(n, 'token')}: too few for seq_len {seq_len} (need at least {seq_len + 1})")
    import torch

    starts = torch.randint(0, n - seq_len, (batch_size,), generator=generator).tolist()
    windows = np.stack([np.asarray(tokens[s : s + seq_len + 1]) for s in starts]).astype(np.int64)
    windows = torch.from_numpy(windows)
    return windows[:, :-1].clone(), windows[:, 1:].clone()
