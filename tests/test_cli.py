"""Bad input across the CLI verbs: each gets one ``dsfs: error:`` line naming the option and what was expected, and
no traceback (issue 13, defects 4, 8 and 9). Runs use the micro model of ``tests/test_train.py``; every command here
fails before any slow work."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from dsfs import data
from tests.test_train import _cli, micro_train


@pytest.fixture(scope="module")
def run(data_dir, tmp_path_factory) -> Path:
    """A finished 4-step micro run: checkpoints at steps 2 and 4, final/."""
    out = tmp_path_factory.mktemp("run") / "run"
    micro_train(data_dir, out, max_steps=4, eval_every=2)
    return out


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    """A prepared directory of 40 short documents: a few hundred train tokens, a few dozen val tokens."""
    root = tmp_path_factory.mktemp("small")
    src = root / "s.txt"
    src.write_text("\n<|endoftext|>\n".join(f"Story {i}: the cat sat on the mat." for i in range(40)))
    return data.prepare(src, root / "out", vocab_size=300, verbose=False)


def _error(capsys, *argv, rc: int = 1) -> str:
    """Run ``dsfs argv``; assert exit code ``rc`` and one ``dsfs: error:`` line; return that line."""
    got, _, err = _cli(capsys, *argv)
    assert got == rc and err.startswith("dsfs: error: ") and err.count("\n") == 1, err
    return err.strip()


def _copy(src: Path, tmp_path: Path, name: str = "copy") -> Path:
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def _null_kv_lora_rank(model_dir: Path) -> None:
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["kv_lora_rank"] = None
    (model_dir / "config.json").write_text(json.dumps(cfg))


# ---------------------------------------------------------------- train options


@pytest.mark.parametrize("argv, msg", [
    (["--lr", "-1e-3"], "--lr -0.001: expected a finite number > 0"),  # a value, not an unknown option
    (["--lr=-1e-3"], "--lr -0.001: expected a finite number > 0"),
    (["--batch-size", "0"], "--batch-size 0: expected an integer >= 1"),
    (["--warmup-steps", "-1"], "--warmup-steps -1: expected an integer >= 0"),
    (["--min-lr-ratio", "1.5"], "--min-lr-ratio 1.5: expected a number in [0, 1]"),
    (["--grad-clip", "nan"], "--grad-clip nan: expected a finite number >= 0"),
    (["--time-budget", "-1"], "--time-budget -1.0: expected a number of seconds >= 0"),
    (["--save-every", "0"], "--save-every 0: expected an integer >= 1"),
    (["--save-every", "-3"], "--save-every -3: expected an integer >= 1"),
    (["--keep-last", "-1"], "--keep-last -1: expected an integer >= 0"),
])
def test_train_options_are_checked_and_named_by_their_flag(argv, msg, capsys, tmp_path):
    err = _error(capsys, "train", "--data", tmp_path / "missing", "--out", tmp_path / "o", "-q", *argv)
    assert msg in err


def test_train_out_and_init_from_that_are_files(capsys, tmp_path, data_dir):
    f = tmp_path / "file"
    f.write_text("x")
    assert _error(capsys, "train", "--data", data_dir, "--out", f, "-q") == \
        f"dsfs: error: --out {f} is a file; expected a directory"
    assert "lies under the file" in _error(capsys, "train", "--data", data_dir, "--out", f / "run", "-q")
    assert _error(capsys, "train", "--data", data_dir, "--out", tmp_path / "o", "--init-from", f, "-q") == \
        f"dsfs: error: {f} is a file; expected a model, run or checkpoints directory"


def test_train_names_the_short_split_and_a_step_larger_than_the_data(capsys, tmp_path, small_data):
    n_train, n_val = (len(data.load_tokens(small_data, s)) for s in data.SPLITS)
    assert n_val < 100 < n_train < 1000
    base = ["train", "--data", small_data, "--out", tmp_path / "o", "--max-steps", 1, "--eval-batches", 1,
            "--compile", "off", "-q"]
    err = _error(capsys, *base, "--seq-len", 1000)
    assert f"the train split of {small_data} holds {n_train} tokens: too few for --seq-len 1000" in err
    err = _error(capsys, *base, "--seq-len", 100)
    assert f"the val split of {small_data} holds {n_val} tokens: too few for --seq-len 100" in err
    with pytest.raises(data.DataError, match=rf"one step takes 16,000 tokens \(--batch-size 2000 x --seq-len 8 x "
                       rf"--grad-accum 1\), more than the {n_train} tokens of the train split"):
        micro_train(small_data, tmp_path / "o2", batch_size=2000, seq_len=8, max_steps=1)


# ---------------------------------------------------------------- resume


def test_resume_refuses_what_it_would_silently_ignore(capsys, tmp_path, data_dir, run):
    out = _copy(run, tmp_path)
    metrics = (out / "metrics.jsonl").read_text()
    ckpt = out / "checkpoints" / "step_000004"
    err = _error(capsys, "train", "--out", out, "--resume", "-q")  # finished: no duplicate validation record
    assert f"{ckpt} is at step 4 of --max-steps 4: the run is finished" in err
    err = _error(capsys, "train", "--out", out, "--resume", "--max-steps", 2, "-q")
    assert f"{ckpt} is at step 4; --max-steps 2 is below it" in err
    err = _error(capsys, "train", "--out", out, "--resume", "--seed", 5, "--max-steps", 6, "-q")
    assert f"{ckpt} is a run of --seed 0; --seed 5 cannot change it on --resume" in err
    err = _error(capsys, "train", "--out", out, "--resume", "--overwrite", "--max-steps", 6, "-q")
    assert "pass --resume (continue the run) or --overwrite (delete it and start over), not both" in err
    assert (out / "metrics.jsonl").read_text() == metrics and (ckpt / "trainer_state.pt").is_file()
    s = micro_train(data_dir, out, resume=True, seed=0, max_steps=5)  # the checkpoint's own seed is fine
    assert s["steps"] == 5


def test_resume_names_what_is_missing(capsys, tmp_path, data_dir, run, monkeypatch):
    out = _copy(run, tmp_path)
    step = out / "checkpoints" / "step_000004"
    (step / "trainer_state.pt").unlink()
    err = _error(capsys, "train", "--resume", step, "-q")
    assert f"{step}: no checkpoint to resume: trainer_state.pt is missing" in err
    _null_kv_lora_rank(out / "checkpoints" / "step_000002")
    err = _error(capsys, "train", "--out", out, "--resume", "--max-steps", 6, "-q")
    assert "kv_lora_rank=None; expected an integer >= 1" in err

    moved = _copy(data_dir, tmp_path, "data")  # a run on data that is then moved away
    micro_train(moved, tmp_path / "r2", max_steps=2, eval_every=2)
    moved.rename(tmp_path / "data-moved")
    monkeypatch.chdir(tmp_path)  # nothing may prepare the default data here
    err = _error(capsys, "train", "--out", tmp_path / "r2", "--resume", "--max-steps", 4, "-q")
    assert f"was trained on the data in {moved.resolve()}, which no longer exists; pass --data DIR" in err
    assert not (tmp_path / "data_cache").exists()


# ---------------------------------------------------------------- generate and eval


@pytest.mark.parametrize("argv, msg", [
    (["--temperature", "nan"], "--temperature nan: expected a finite number >= 0"),
    (["--temperature", "inf"], "--temperature inf: expected a finite number >= 0"),
    (["--temperature", "-0.5"], "--temperature -0.5: expected a finite number >= 0"),
    (["--temperature", "-inf"], "--temperature -inf: expected a finite number >= 0"),
    (["--top-k", "0"], "--top-k 0: expected an integer >= 1"),
    (["--top-p", "nan"], "--top-p nan: expected a number in (0, 1]"),
    (["--prompt", "caf\udcff"], "--prompt is not UTF-8 text (byte 0xff at character 3)"),  # argv of b"caf\xff"
])
def test_generate_options(argv, msg, capsys, run):
    assert msg in _error(capsys, "generate", "--checkpoint", run, "--max-new-tokens", 2, "--device", "cpu", *argv)


def test_generate_and_eval_bad_files(capsys, tmp_path, data_dir, run):
    nullkv = _copy(run / "final", tmp_path, "nullkv")
    _null_kv_lora_rank(nullkv)
    gen = ["generate", "--max-new-tokens", 2, "--temperature", 0, "--device", "cpu"]
    ev = ["eval", "--batches", 1, "--batch-size", 2, "--seq-len", 16, "--device", "cpu"]
    for argv in (gen, [*ev, "--data", data_dir]):
        err = _error(capsys, *argv, "--checkpoint", nullkv)
        assert err.endswith("ModelConfig: kv_lora_rank=None; expected an integer >= 1"), err

    garbage = tmp_path / "garbage.json"
    garbage.write_text("not a tokenizer")
    for argv in (gen, [*ev, "--data", data_dir]):
        err = _error(capsys, *argv, "--checkpoint", run, "--tokenizer", garbage)
        assert f"{garbage}: cannot be read as a tokenizer.json" in err and "mismatch" not in err
    empty = tmp_path / "empty"
    empty.mkdir()
    err = _error(capsys, *gen, "--checkpoint", run, "--tokenizer", empty)
    assert f"--tokenizer {empty}: the directory holds no tokenizer.json" in err
    f = tmp_path / "file"
    f.write_text("x")
    assert _error(capsys, *gen, "--checkpoint", f).endswith(f"{f} is a file; expected a model, run or checkpoints "
                                                              "directory")
    err = _error(capsys, *ev, "--checkpoint", run, "--data", tmp_path / "missing")
    assert err == f"dsfs: error: --data {tmp_path / 'missing'}: no such data directory (expected a dsfs prepare output)"

    from tokenizers import Tokenizer  # a tokenizer larger than the model's vocab

    big = Tokenizer.from_file(str(data_dir / "tokenizer.json"))
    big.add_tokens([f"extra{i}" for i in range(50)])
    big.save(str(tmp_path / "big.json"))
    err = _error(capsys, *gen, "--checkpoint", run, "--tokenizer", tmp_path / "big.json")
    assert "the tokenizer's vocab of 434 tokens is larger than the model's vocab_size 384" in err


def test_train_init_from_a_garbage_tokenizer_is_not_a_mismatch(capsys, tmp_path, data_dir, run):
    src = _copy(run / "final", tmp_path, "src")
    (src / "tokenizer.json").write_text("{")
    err = _error(capsys, "train", "--data", data_dir, "--out", tmp_path / "o", "--init-from", src, "-q")
    assert f"{src / 'tokenizer.json'}: cannot be read as a tokenizer.json" in err


# ---------------------------------------------------------------- prepare


def test_prepare_paths(capsys, tmp_path, monkeypatch):
    src = tmp_path / "s.txt"
    src.write_text("\n<|endoftext|>\n".join(f"Story {i}: the cat sat." for i in range(30)))
    d, f = tmp_path / "dir", tmp_path / "file"
    d.mkdir()
    f.write_text("x")
    base = ["prepare", "--vocab-size", 300, "-q"]
    err = _error(capsys, *base, "--input", d, "--out", tmp_path / "o")
    assert err == f"dsfs: error: --input {d} is a directory; expected a text or .jsonl file"
    err = _error(capsys, *base, "--input", src, "--val-input", d, "--out", tmp_path / "o")
    assert err == f"dsfs: error: --val-input {d} is a directory; expected a text or .jsonl file"
    err = _error(capsys, *base, "--input", src, "--out", f)
    assert err == f"dsfs: error: --out {f} is a file; expected a directory"

    def no_training(*a, **k):
        raise AssertionError("the tokenizer was trained before --out was checked")

    monkeypatch.setattr(data, "train_tokenizer", no_training)
    err = _error(capsys, *base, "--input", src, "--out", f / "sub")
    assert err == f"dsfs: error: --out {f / 'sub'} lies under the file {f}; expected a directory"


def test_prepare_refuses_too_little_text(capsys, tmp_path):
    two = tmp_path / "two.txt"
    two.write_text("a<|endoftext|>b")
    err = _error(capsys, "prepare", "--input", two, "--out", tmp_path / "o", "--vocab-size", 300, "-q")
    assert err == (f"dsfs: error: {two}: too little text for a train and a val split: train 2 tokens / 1 document, "
                   "val 2 tokens / 1 document; expected at least 64 train tokens (use a larger source)")
    assert not (tmp_path / "o").exists()
