"""`dsfs generate` and `dsfs eval`: cached and uncached greedy decoding agree, model-directory resolution, the
eval helper the trainer uses, and the CLI verbs' output and one-line errors."""

from __future__ import annotations

import json
import math
import os
import time

import pytest
import torch

from dsfs import checkpointing, data
from dsfs.checkpointing import CheckpointError
from dsfs.data import DataError
from dsfs.evaluation import eval_batches
from dsfs.generate import eval_starts, evaluate, evaluate_checkpoint, generate_texts, load_tokenizer
from reference import Model
from tests.test_train import _cli, make_data_dir, micro_train


@pytest.fixture(scope="module")
def run(data_dir, tmp_path_factory):
    """A 16-step micro run: checkpoints at 8 and 16, final/."""
    out = tmp_path_factory.mktemp("gen") / "run"
    micro_train(data_dir, out, max_steps=16, eval_every=8)
    return out


def test_greedy_generation_with_and_without_cache_agree(run):
    model_dir = run / "final"
    model, tok = Model.from_pretrained(model_dir), load_tokenizer(model_dir)
    a = generate_texts(model, tok, ["Once upon a time"], max_new_tokens=24, use_cache=True)[0]
    b = generate_texts(model, tok, ["Once upon a time"], max_new_tokens=24, use_cache=False)[0]
    assert a.text == b.text and a.new_tokens == b.new_tokens > 0
    assert a.text.startswith("Once upon a time") and len(a.text) > len("Once upon a time")
    s1, s2 = (generate_texts(model, tok, ["The dog"], 16, temperature=1.0, top_k=20, top_p=0.9, seed=3)[0]
              for _ in range(2))
    assert s1.text == s2.text  # the seed fixes the samples


def test_resolve_model_dir(run, tmp_path):
    final, latest = run / "final", run / "checkpoints/step_000016"
    assert checkpointing.resolve_model_dir(final) == final
    assert checkpointing.resolve_model_dir(run / "checkpoints") == latest
    now = time.time()
    os.utime(latest / "config.json", (now + 5, now + 5))  # the newer of final/ and the newest step wins
    assert checkpointing.resolve_model_dir(run) == latest
    os.utime(final / "config.json", (now + 10, now + 10))
    assert checkpointing.resolve_model_dir(run) == final
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        checkpointing.resolve_model_dir(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="not a model directory"):
        checkpointing.resolve_model_dir(tmp_path)


def test_eval_matches_the_trainer(run, data_dir):
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last_val = [r for r in recs if "val_loss" in r][-1]
    assert last_val["step"] == 16
    r = evaluate_checkpoint(run / "final", data_dir, "val", batches=2, batch_size=4, seq_len=32, device="cpu")
    assert r["loss"] == pytest.approx(last_val["val_loss"], rel=1e-6) and r["ppl"] == pytest.approx(
        math.exp(r["loss"]))
    tokens = data.load_tokens(data_dir, "val")
    model = Model.from_pretrained(run / "final")
    assert evaluate(model, eval_batches(tokens, 4, 32, 2)) == r["loss"]  # the same fixed windows
    assert eval_starts(100, 3, 10) == [0, 44, 89]


def test_eval_rejects_another_tokenizer(run, tmp_path):
    """Data of a larger vocab than the model's cannot be evaluated; a smaller one of another tokenizer neither."""
    larger = make_data_dir(tmp_path / "larger", vocab_size=512)
    with pytest.raises(DataError, match="vocab size mismatch: .* vocab_size 384, smaller than the 512"):
        evaluate_checkpoint(run, larger, batches=1, batch_size=2, seq_len=16, device="cpu")
    other = make_data_dir(tmp_path / "other", vocab_size=300)
    with pytest.raises(DataError, match="tokenizer mismatch"):
        evaluate_checkpoint(run, other, batches=1, batch_size=2, seq_len=16, device="cpu")


def test_eval_accepts_a_padded_model_vocab(run, data_dir, tmp_path):
    """A model vocab larger than the data's (padded, as released checkpoints are, and as dsfs train --init-from
    accepts) evaluates; only a smaller one is refused."""
    small = Model.from_pretrained(run / "final")
    cfg = small.config.to_dict()
    cfg["vocab_size"] += 16
    big = Model(type(small.config).from_dict(cfg))
    sd = small.state_dict()
    sd["model.embed_tokens.weight"] = torch.cat([sd["model.embed_tokens.weight"], torch.zeros(16, cfg["hidden_size"])])
    if "lm_head.weight" in sd:
        sd["lm_head.weight"] = torch.cat([sd["lm_head.weight"], torch.zeros(16, cfg["hidden_size"])])
    big.load_state_dict(sd)
    big.save_pretrained(tmp_path / "big", tokenizer_file=run / "final" / "tokenizer.json")
    r = evaluate_checkpoint(tmp_path / "big", data_dir, batches=1, batch_size=2, seq_len=16, device="cpu")
    assert math.isfinite(r["loss"])


def test_non_finite_logits_from_finite_weights_are_an_error(run, data_dir, tmp_path, capsys):
    """Finite weights whose logits overflow (a final norm gain of 1e38 and a head scaled by 1e6): eval and generate
    stop with one line instead of printing a NaN loss or argmax-of-NaN tokens."""
    model = Model.from_pretrained(run / "final")
    with torch.no_grad():
        model.model.norm.weight.fill_(1e38)
        model.lm_head.weight.mul_(1e6)  # logits ~1e42: inf
    model.save_pretrained(tmp_path / "overflow", tokenizer_file=run / "final" / "tokenizer.json")
    with pytest.raises(CheckpointError, match="val loss is (nan|inf): the model.s logits are not finite"):
        evaluate_checkpoint(tmp_path / "overflow", data_dir, batches=1, batch_size=2, seq_len=16, device="cpu")
    rc, out, err = _cli(capsys, "generate", "--checkpoint", tmp_path / "overflow", "--max-new-tokens", 4,
                        "--device", "cpu")
    assert rc == 1 and out == "" and err.count("\n") == 1 and "non-finite logits" in err, err


def test_cli_warnings_are_one_line(capsys, run, tmp_path):
    """A loader warning (a checkpoint whose config asks for an MTP depth its files lack) is one dsfs: warning: line,
    not Python's two-line warning with a source line."""
    import shutil

    ckpt = tmp_path / "no_mtp"
    shutil.copytree(run / "final", ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["num_nextn_predict_layers"] = cfg.get("num_nextn_predict_layers", 0) + 1
    (ckpt / "config.json").write_text(json.dumps(cfg))
    (ckpt / "mtp.safetensors").unlink(missing_ok=True)
    (ckpt / "checksums.json").unlink(missing_ok=True)  # edited by hand: unverified, as one written elsewhere
    rc, out, err = _cli(capsys, "generate", "--checkpoint", ckpt, "--max-new-tokens", 4, "--temperature", 0,
                        "--device", "cpu")
    lines = [line for line in err.splitlines() if "MTP depth" in line]
    assert rc == 0 and len(lines) == 1 and lines[0].startswith("dsfs: warning: checkpoint "), err
    assert "UserWarning" not in err and "return load_model" not in err, err


def test_cli_generate_and_eval(capsys, run, data_dir):
    rc, out, err = _cli(capsys, "generate", "--checkpoint", run, "--prompt", "Once upon a time",
                        "--max-new-tokens", 12, "--temperature", 0, "--device", "cpu")
    assert rc == 0 and out.startswith("Once upon a time") and "tokens/s" in err
    rc, out2, _ = _cli(capsys, "generate", "--checkpoint", run, "--prompt", "Once upon a time",
                       "--max-new-tokens", 12, "--temperature", 0, "--no-cache", "--device", "cpu")
    assert rc == 0 and out2 == out
    rc, out, err = _cli(capsys, "eval", "--checkpoint", run, "--data", data_dir, "--batches", 2,
                        "--batch-size", 4, "--seq-len", 32, "--device", "cpu")
    assert rc == 0 and "val loss" in out and "perplexity" in out


def test_cli_help_and_bad_input(capsys, run, tmp_path):
    for verb in ("generate", "eval"):
        rc, out, _ = _cli(capsys, verb, "--help")
        assert rc == 0 and "--checkpoint" in out
    rc, _, err = _cli(capsys, "generate", "--checkpoint", tmp_path / "missing")
    assert rc == 1 and err.count("\n") == 1 and "no such checkpoint directory" in err
    rc, _, err = _cli(capsys, "eval", "--checkpoint", tmp_path / "missing", "--data", tmp_path)
    assert rc == 1 and err.count("\n") == 1 and "no such checkpoint directory" in err
    rc, _, err = _cli(capsys, "eval", "--checkpoint", run, "--data", tmp_path / "missing")
    assert rc == 1 and err.count("\n") == 1 and "no such data directory" in err
    rc, _, err = _cli(capsys, "generate", "--checkpoint", run, "--top-p", "1.5")
    assert rc == 1 and err.count("\n") == 1 and "--top-p 1.5: expected a number in (0, 1]" in err
    rc, _, err = _cli(capsys, "generate")
    assert rc == 2 and err.count("\n") == 1 and "--checkpoint" in err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_generate_and_eval_on_cuda(run, data_dir):
    model = Model.from_pretrained(run / "final", device="cuda")
    tok = load_tokenizer(run / "final")
    a, b = (generate_texts(model, tok, ["Once upon a time"], 16, use_cache=c)[0] for c in (True, False))
    assert a.new_tokens > 0 and a.text.startswith("Once upon a time")
    cpu = evaluate_checkpoint(run, data_dir, batches=2, batch_size=4, seq_len=32, device="cpu")["loss"]
    gpu = evaluate_checkpoint(run, data_dir, batches=2, batch_size=4, seq_len=32, device="cuda")["loss"]
    assert gpu == pytest.approx(cpu, rel=2e-2)  # bf16 autocast


def test_checkpoint_without_tokenizer_and_the_tokenizer_flag(capsys, run, data_dir, tmp_path):
    """A model directory without tokenizer.json (as transformers saves them): generate and eval name --tokenizer
    PATH in one line; --tokenizer takes a tokenizer.json file or a directory that holds one."""
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(run / "final", bare)
    (bare / "tokenizer.json").unlink()
    gen = ["generate", "--checkpoint", bare, "--max-new-tokens", 8, "--temperature", 0, "--device", "cpu"]
    ev = ["eval", "--checkpoint", bare, "--data", data_dir, "--batches", 1, "--batch-size", 2, "--seq-len", 16,
          "--device", "cpu"]
    for argv in (gen, ev):
        rc, _, err = _cli(capsys, *argv)
        assert rc == 1 and err.count("\n") == 1 and "holds no tokenizer.json: pass --tokenizer PATH" in err, err
    rc, want, _ = _cli(capsys, "generate", "--checkpoint", run / "final", "--max-new-tokens", 8, "--temperature", 0,
                       "--device", "cpu")
    for tok in (data_dir, data_dir / "tokenizer.json"):
        rc, out, err = _cli(capsys, *gen, "--tokenizer", tok)
        assert rc == 0 and out == want, err
    rc, out, err = _cli(capsys, *ev, "--tokenizer", data_dir)
    assert rc == 0 and "val loss" in out, err
    rc, _, err = _cli(capsys, *gen, "--tokenizer", tmp_path / "missing.json")
    assert rc == 1 and err.count("\n") == 1 and "--tokenizer" in err and "no such file" in err
    other = tmp_path / "other.json"
    other.write_text((data_dir / "tokenizer.json").read_text().replace("<|pad|>", "<|PAD|>"))
    rc, _, err = _cli(capsys, *ev, "--tokenizer", other)
    assert rc == 1 and err.count("\n") == 1 and "tokenizer mismatch" in err


# ---------------------------------------------------------------- bad arguments of the API (issue 13)


def test_sampling_api_rejects_nan_inf_and_bad_prompts(run):
    from reference import ModelConfig
    from reference.model import sample_next

    logits = torch.randn(2, 10)
    for t in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match=rf"temperature={t}; expected a finite number >= 0"):
            sample_next(logits, t)
    with pytest.raises(ValueError, match=r"top_p=nan; expected None or a number in \(0, 1\]"):
        sample_next(logits, 1.0, top_p=float("nan"))
    model, tok = Model.from_pretrained(run / "final"), load_tokenizer(run / "final")
    with pytest.raises(DataError, match="temperature=nan"):
        generate_texts(model, tok, ["The dog"], 4, temperature=float("nan"))
    with pytest.raises(DataError, match=r"--prompt is not UTF-8 text \(byte 0xff at character 0\)"):
        generate_texts(model, tok, ["\udcff"], 4)
    with pytest.raises(ValueError, match="ModelConfig: kv_lora_rank=None; expected an integer >= 1"):
        ModelConfig(kv_lora_rank=None)
    with pytest.raises(ValueError, match="ModelConfig: n_routed_experts='8'; expected an integer >= 1"):
        ModelConfig(n_routed_experts="8")
    assert ModelConfig(attention_type="gqa", num_key_value_heads=2, kv_lora_rank=None).kv_lora_rank is None


# ---------------------------------------------------------------- --chat


def test_generate_chat(capsys, run, monkeypatch, tmp_path):
    """--chat renders the prompt as one user turn with the generation prompt (bos first), decodes greedily until eos
    and prints only the reply; <think>/</think> stay visible, bos/eos/pad are dropped. The model directory carries
    the chat template (tokenizer_config.json, copied from the prepared data by write_model_dir)."""
    from dsfs import chat

    model_dir = run / "final"
    assert json.loads((model_dir / "tokenizer_config.json").read_text())["chat_template"] == chat.CHAT_TEMPLATE
    model, tok = Model.from_pretrained(model_dir), load_tokenizer(model_dir)
    prompt = "What is 2 + 3?"
    ids = chat.render([{"role": "user", "content": prompt}], tok, add_generation_prompt=True)[0]
    bos, eos, user, assistant = (tok.token_to_id(t) for t in (data.BOS, data.EOS, "<|user|>", "<|assistant|>"))
    assert ids[0] == bos and ids[1] == user and ids[-1] == assistant
    out = model.generate(torch.tensor([ids]), 12, temperature=0.0, stop_tokens=[eos])[0, len(ids):].tolist()
    new = out[: out.index(eos)] if eos in out else out
    want = tok.decode([t for t in new if t not in (bos, eos, tok.token_to_id(data.PAD))], skip_special_tokens=False)
    g = generate_texts(model, tok, [prompt], 12, chat=True)[0]
    assert g.text == want and g.new_tokens == len(out)
    rc, printed, err = _cli(capsys, "generate", "--checkpoint", run, "--chat", "--prompt", prompt,
                            "--max-new-tokens", 12, "--temperature", 0, "--device", "cpu")
    assert rc == 0 and printed == want + "\n" and "tokens/s" in err, err

    digit = tok.token_to_id("7")
    reply = [tok.token_to_id("<think>"), digit, tok.token_to_id("</think>"), bos, digit, tok.token_to_id(data.PAD),
             eos, digit]

    def scripted(model, prompts, max_new_tokens, **kw):  # answers "<think>7</think>7", stray bos/pad, then eos
        from dsfs.rollout import Completion

        return [Completion(list(p), reply[:reply.index(eos) + 1], finish_reason="stop") for p in prompts]

    monkeypatch.setattr("dsfs.rollout.rollout", scripted)
    g = generate_texts(model, tok, [prompt], 20, chat=True)[0]
    assert g.text == "<think>7</think>7" and g.new_tokens == reply.index(eos) + 1

    from tokenizers import Tokenizer, models

    Tokenizer(models.BPE()).save(str(tmp_path / "plain.json"))  # no special tokens: no chat template
    rc, _, err = _cli(capsys, "generate", "--checkpoint", run, "--chat", "--tokenizer", tmp_path / "plain.json",
                      "--device", "cpu")
    assert rc == 1 and err.count("\n") == 1 and "the tokenizer has no <|begin_of_text|> token" in err, err
