"""Oracle tests: the reference against `transformers` (DeepseekV3ForCausalLM, DeepseekV32ForCausalLM) and
`mlx_lm` (deepseek_v3, deepseek_v32) on the same weights, both ways through the checkpoint directory.

Weights are drawn so that logits have a standard deviation near 1 (the default init's near-constant logits
would hide errors). Bound: relative error 1e-5 in float32 (DESIGN.md, Tolerance).
"""

from __future__ import annotations

import logging
import pathlib

import numpy as np
import pytest
import torch

from reference import Model, ModelConfig
from reference.dsa import Indexer
from reference.testing import assert_close

transformers = pytest.importorskip("transformers")
mx = pytest.importorskip("mlx.core")
mlx_utils = pytest.importorskip("mlx_lm.utils")

VOCAB, SEQ = 97, 11
BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
            n_routed_experts=8, num_experts_per_tok=2, max_position_embeddings=320)
YARN = dict(type="yarn", factor=40.0, original_max_position_embeddings=8, beta_fast=32, beta_slow=1,
            mscale=1.0, mscale_all_dim=1.0)
CASES = {
    "q_lora_null": dict(),
    "q_lora_set_mtp": dict(q_lora_rank=24, num_nextn_predict_layers=1),
    "n_group4_dense0": dict(n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2,
                            first_k_dense_replace=0, routed_scaling_factor=2.5),
    "n_group1_dense1_shared2": dict(n_shared_experts=2, first_k_dense_replace=1, norm_topk_prob=False),
    "yarn_factor40": dict(q_lora_rank=24, rope_scaling=YARN),
    "tied_mtp": dict(tie_word_embeddings=True, num_nextn_predict_layers=1),
    "v32_dsa_topk4": dict(model_type="deepseek_v32", attention_type="dsa", q_lora_rank=24, index_topk=4,
                          index_n_heads=4, index_head_dim=16),
}


@torch.no_grad()
def randomize(model: Model, gen: torch.Generator) -> None:
    """O(1) activations: matrices N(0, 1/fan_in), embeddings N(0, 1) (untied; a tied one is a head matrix), norm
    gains 1 + N(0, 0.1^2), biases N(0, 0.1^2); routing correction bias U(0, 0.1) (positive, so mlx-lm's
    zero-fill of dropped groups and transformers' -inf agree)."""
    for name, p in model.named_parameters():
        if p.ndim == 1:
            base = 0.0 if name.endswith("bias") else 1.0
            p.copy_(base + 0.1 * torch.randn(p.shape, generator=gen))
        elif "embed" in name and not model.config.tie_word_embeddings:  # tied: it is the head too
            p.copy_(torch.randn(p.shape, generator=gen))
        else:
            p.copy_(torch.randn(p.shape, generator=gen) * p.shape[-1] ** -0.5)
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(0.1 * torch.rand(b.shape, generator=gen))


def topk_margin(model: Model, ids: torch.Tensor) -> float:
    """Smallest relative gap between the k-th and (k+1)-th visible indexer score over all DSA layers and
    queries: a near-tie could flip the discrete top-k under rounding differences between implementations."""
    gaps = []
    select = Indexer.select

    def recording_select(self, scores, mask):
        s = scores.masked_fill(~mask, float("-inf"))
        if s.shape[-1] > self.topk:
            top = s.topk(self.topk + 1, dim=-1).values
            valid = torch.isfinite(top[..., self.topk])
            gap = (top[..., self.topk - 1] - top[..., self.topk]) / top[..., 0].abs().clamp(min=1e-6)
            if valid.any():
                gaps.append(gap[valid].min().item())
        return select(self, scores, mask)

    Indexer.select = recording_select
    try:
        with torch.no_grad():
            model(ids)
    finally:
        Indexer.select = select
    return min(gaps) if gaps else float("inf")


def build(case: str, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    cfg = ModelConfig(**{**BASE, **CASES[case]})
    model = Model(cfg).eval()
    randomize(model, gen)
    for _ in range(20):
        ids = torch.randint(0, VOCAB, (2, SEQ), generator=gen)
        if cfg.attention_type != "dsa" or topk_margin(model, ids) > 1e-3:
            return model, ids
    raise AssertionError("could not draw indexer scores without near-ties")


@pytest.fixture(scope="module", params=list(CASES))
def saved(request, tmp_path_factory):
    model, ids = build(request.param)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    with torch.no_grad():
        ref = model(ids)
    assert 0.7 < ref.std().item() < 1.5, f"logits std {ref.std().item():.3f}: weights too small to test"
    return request.param, path, ids, ref, model


def test_transformers_loads_ours(saved):
    case, path, ids, ref, _ = saved
    logging.getLogger("transformers").setLevel(logging.ERROR)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    expected = "DeepseekV32ForCausalLM" if "v32" in case else "DeepseekV3ForCausalLM"
    assert type(hf).__name__ == expected
    with torch.no_grad():
        out = hf(ids).logits
    err = assert_close(out, ref, torch.float32, what=f"transformers vs reference [{case}]")
    print(f"\n[oracle] transformers {case}: rel err {err:.2e}")


def test_mlx_lm_loads_ours(saved):
    case, path, ids, ref, _ = saved
    model, _ = mlx_utils.load_model(pathlib.Path(path))
    out = np.array(model(mx.array(ids.numpy())).astype(mx.float32))
    err = assert_close(out, ref, torch.float32, what=f"mlx_lm vs reference [{case}]")
    print(f"\n[oracle] mlx_lm {case}: rel err {err:.2e}")


@pytest.mark.parametrize("case", ["q_lora_set_mtp", "n_group4_dense0", "v32_dsa_topk4"])
def test_reference_loads_transformers_checkpoint(case, tmp_path):
    """The other way round: transformers saves (its own layout), the reference loads it."""
    logging.getLogger("transformers").setLevel(logging.ERROR)
    ours, ids = build(case, seed=1)
    ours.save_pretrained(tmp_path / "ours")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    hf.save_pretrained(tmp_path / "hf")
    assert not (tmp_path / "hf" / "mtp.safetensors").exists()
    cfg_dict = ModelConfig.from_json(tmp_path / "hf").to_dict()
    assert cfg_dict["model_type"] == ours.config.model_type
    loaded = Model.from_pretrained(tmp_path / "hf") if ours.config.num_nextn_predict_layers == 0 else None
    if loaded is None:  # transformers drops MTP layers: the reference reads it with depth 0
        import json

        cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
        cfg["num_nextn_predict_layers"] = 0
        (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
        loaded = Model.from_pretrained(tmp_path / "hf")
    with torch.no_grad():
        expected, got = hf(ids).logits, loaded(ids)
    err = assert_close(got, expected, torch.float32, what=f"reference loading transformers' save [{case}]")
    print(f"\n[oracle] reverse {case}: rel err {err:.2e}")
