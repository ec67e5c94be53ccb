"""``dsfs train --preset tiny-v4`` machinery on a micro DeepSeek-V4: the loss falls, an interrupted run resumes bit
for bit, the final checkpoint opens in ``transformers``' ``DeepseekV4ForCausalLM`` with the same logits, and
``generate`` reads it back."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from dsfs import checkpointing
from dsfs.presets import MODEL_PRESETS
from dsfs.train import train
from reference import Model, V4Config, V4Model
from reference.optim import param_groups
from reference.testing.tolerance import assert_close
from tests.test_train import read_metrics

MICRO_V4 = dict(
    hidden_size=32, num_hidden_layers=3, num_attention_heads=2, head_dim=16, q_lora_rank=16, o_groups=2,
    o_lora_rank=8, sliding_window=8, layer_types=["sliding_attention", "compressed_sparse_attention",
                                                  "heavily_compressed_attention"],
    compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8}, index_n_heads=4,
    index_head_dim=8, index_topk=3, mlp_layer_types=["hash_moe", "moe", "moe"], moe_intermediate_size=16,
    n_routed_experts=4, hc_mult=2, num_nextn_predict_layers=1, max_position_embeddings=64,
)


def micro_v4(data_dir, out, **kw):
    kw.setdefault("model_overrides", MICRO_V4)
    return train("tiny-v4", data_dir, out, backend="reference", compile=False, verbose=False,
                 **{**dict(batch_size=4, seq_len=32, lr=1e-2, warmup_steps=2, eval_every=4, eval_batches=2,
                           max_steps=12), **kw})


def test_tiny_v4_preset_is_a_v4_model():
    cfg = V4Config(**MODEL_PRESETS["tiny-v4"], vocab_size=4096)
    model = Model.for_config(cfg)
    assert isinstance(model, V4Model) and set(cfg.layer_types) == {"compressed_sparse_attention",
                                                                    "heavily_compressed_attention"}
    muon = {id(p) for p in param_groups(model, 0.1, "muon")[0]["params"]}
    named = dict(model.named_parameters())
    assert id(named["model.layers.1.self_attn.q_b_proj.weight"]) in muon
    assert id(named["model.layers.1.attn_hc.fn"]) in muon  # V4 trains mHC's projections with Muon
    for adam in ("model.layers.1.self_attn.compressor.position_bias", "model.layers.1.mlp.gate.weight",
                 "model.layers.1.self_attn.sinks", "model.layers.1.attn_hc.base"):
        assert id(named[adam]) not in muon, adam


def test_train_resume_and_open_in_transformers(data_dir, tmp_path):
    micro_v4(data_dir, tmp_path / "a")
    tr, ev = read_metrics(tmp_path / "a")
    assert tr[-1]["lm_loss"] < tr[0]["lm_loss"] - 0.3 and tr[0]["mtp_loss"] is not None

    def ctrl_c_at_4(rec):
        if rec["step"] == 4:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        micro_v4(data_dir, tmp_path / "b", on_step=ctrl_c_at_4)
    assert [p.name for p in checkpointing.list_checkpoints(tmp_path / "b/checkpoints")] == ["step_000004"]
    train(data_dir=data_dir, out_dir=tmp_path / "b", resume=True, backend="reference", verbose=False, compile=False)
    keys = ("step", "loss", "lm_loss", "mtp_loss", "lr", "grad_norm")
    assert [[r[k] for k in keys] for r in tr] == [[r[k] for k in keys] for r in read_metrics(tmp_path / "b")[0]]
    wa, wb = (load_file(tmp_path / r / "final/model.safetensors") for r in "ab")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)

    transformers = pytest.importorskip("transformers")
    ours = Model.from_pretrained(tmp_path / "a/final")
    assert isinstance(ours, V4Model) and len(ours.mtp) == 1
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "a/final").eval()
    ids = torch.randint(0, ours.config.vocab_size, (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_close(theirs(ids, use_cache=False).logits, ours(ids), bound=1e-5, what="trained V4 in transformers")
    out = ours.generate(ids[:, :5], max_new_tokens=6)
    assert out.shape == (2, 11)

    from dsfs.export import ExportError, export
    from reference.speculative import speculative_generate

    r = export(tmp_path / "a/final", tmp_path / "hf", "hf")
    again = Model.from_pretrained(r["out"])
    assert all(torch.equal(again.state_dict()[k], v) for k, v in ours.state_dict().items())
    with pytest.raises(ExportError, match="DeepSeek-V4"):
        export(tmp_path / "a/final", tmp_path / "x.gguf", "gguf")
    with pytest.raises(ValueError, match="roll back"):
        speculative_generate(ours, ids[:, :5], 4)

    from dsfs.data import read_tokenizer
    from dsfs.generate import generate_texts

    tok = read_tokenizer(tmp_path / "a/final/tokenizer.json")
    prompts = ["Once upon a time", "The cat", "A"]  # different lengths: V4 decodes one prompt's rows at a time
    both = generate_texts(ours, tok, prompts, max_new_tokens=5)
    alone = [generate_texts(ours, tok, [p], max_new_tokens=5)[0] for p in prompts]
    assert [g.text for g in both] == [g.text for g in alone]
    with pytest.raises(ValueError, match="padded"):
        ours(ids[:, :4], attention_mask=torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]]))
