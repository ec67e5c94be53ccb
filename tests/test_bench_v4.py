"""bench/v4.py: the KV-cache formula against `reference.v4_model.V4Cache.nbytes()` of real runs (and V3.2's against the
reference DSA cache), the KV table the script writes, every suite's benchmarks once on the reference backend at small
sizes, and the peers (transformers' DeepSeek-V4 attention and mHC, runtime_mlx) computing what the reference computes
through the same calls. Each suite at its smallest parameters; timings are never asserted (bench/ measures)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bench import common, v4
from reference.testing import assert_close
from reference.v4_config import V4Config
from reference.v4_model import V4Model

SW, CSA, HCA = v4.SW, v4.CSA, v4.HCA


def tiny_v4(**over) -> V4Config:
    """Four layers of every type, windows of 8, CSA 4 / HCA 8 tokens per entry, indexer keys of 8."""
    kw = dict(vocab_size=97, hidden_size=32, moe_intermediate_size=16, num_hidden_layers=4, num_attention_heads=2,
              head_dim=16, q_lora_rank=16, partial_rotary_factor=0.5, n_routed_experts=4, num_experts_per_tok=2,
              layer_types=[SW, CSA, HCA, CSA], mlp_layer_types=["moe"] * 4, compress_rates={CSA: 4, HCA: 8},
              sliding_window=8, o_groups=2, o_lora_rank=8, index_n_heads=4, index_head_dim=8, index_topk=3,
              max_position_embeddings=512)
    return V4Config(**{**kw, **over})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_v4_formula_equals_v4cache_nbytes(dtype):
    """After every chunk of a prefill-then-decode run (lengths below and past each window, remainders 0..m-1)."""
    cfg = tiny_v4()
    model = V4Model(cfg).to(dtype).eval()
    cache, ids = model.new_cache(), torch.randint(0, 97, (1, 60), generator=torch.Generator().manual_seed(0))
    assert v4.v4_cache_bytes(cfg, 0, 2) == cache.nbytes() == 0
    at = 0
    with torch.no_grad():
        for n in (1, 2, 13, 1, 1, 1, 5, 8, 20, 1, 7):
            model(ids[:, at:at + n], cache)
            at += n
            assert cache.nbytes() == v4.v4_cache_bytes(cfg, at, dtype.itemsize), f"after {at} tokens"


def test_v32_formula_equals_dsa_cache():
    """Per token: the reference DSA cache holds the latent, the RoPE key and the indexer key of every layer."""
    cfg = common.config(attention_type="dsa", model_type="deepseek_v32", num_hidden_layers=2, moe_type="dense",
                        first_k_dense_replace=2, q_lora_rank=64)
    model = common.reference_model(cfg)
    cache = model.new_cache()
    with torch.no_grad():
        model(torch.randint(0, cfg.vocab_size, (1, 9)), cache)
    want = v4.v32_cache_bytes(1, 4, cfg.num_hidden_layers, cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.index_head_dim)
    assert cache.nbytes_per_token() == want


def test_v4_flash_is_transformers_default_config():
    transformers = pytest.importorskip("transformers")
    theirs, ours = transformers.DeepseekV4Config(), v4.v4_flash_config()
    for name in ("hidden_size", "num_hidden_layers", "head_dim", "sliding_window", "index_head_dim", "index_topk",
                 "compress_rates", "layer_types", "num_attention_heads", "q_lora_rank", "o_groups", "o_lora_rank"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert (ours.layer_types.count(CSA), ours.layer_types.count(HCA)) == (20, 23)


def test_kv_suite_and_results_file(tmp_path, capsys):
    suite, cfg = v4.KVCache(), v4.v4_flash_config()
    for n in v4.KVCache.params[0]:
        per_token = suite.track_v4_flash_bytes_per_token(n)
        assert per_token == v4.v4_cache_bytes(cfg, n) / n and suite.track_v32_bytes_per_token(n) == 85888
        assert math.isclose(suite.track_v4_over_v32(n), per_token / 85888)
    assert 0.05 < suite.track_v4_over_v32(1048576) < 0.1  # the report: about 7%
    out = tmp_path / "kv.md"
    v4.main(["--no-timing", "--out", str(out)])
    assert out.read_text() == v4.kv_markdown() and v4.kv_markdown() in capsys.readouterr().out
    with open(v4.RESULTS, encoding="utf-8") as f:
        assert f.read() == v4.kv_markdown(), "bench/results/v4_kv_cache.md is stale: run python -m bench.v4"


@pytest.mark.parametrize("kind", v4.KINDS)
def test_attention_suites_run(kind, monkeypatch):
    monkeypatch.setattr(v4, "FILL_CHUNK", 400)  # a chunked fill, the last chunk shorter
    n = v4.CONTEXTS[0]
    pre = v4.Prefill()
    pre.setup("reference", kind, n)
    pre.time_forward("reference", kind, n)
    pre.time_forward_backward("reference", kind, n)
    assert all(p.grad is None for p in pre.layer.attn.parameters())
    if kind == "mla":  # the cheapest forward
        try:
            assert pre.track_peak_mib_forward("reference", kind, n) >= 0
        except NotImplementedError:  # no peak-RSS reset on this machine
            pass
    dec = v4.Decode()
    dec.setup("reference", kind, n)
    with torch.no_grad():
        first, again = dec.layer.decode(dec.x), dec.layer.decode(dec.x)
    assert torch.equal(first, again), "decode must leave the cache as the fill left it"
    monkeypatch.setattr(v4, "free_bytes", lambda backend: 0)
    with pytest.raises(NotImplementedError, match="GiB free"):
        v4.Prefill().setup("reference", kind, n)


def _np(a) -> torch.Tensor:
    return torch.from_numpy(np.array(a)) if not isinstance(a, torch.Tensor) else a.detach()


@pytest.mark.parametrize("kind", list(v4.V4_KINDS))
def test_peers_compute_what_the_reference_computes(kind, monkeypatch):
    """Prefill, and decode twice after a fill of 140 tokens in chunks of 64 (past the window of 128; one HCA entry,
    35 CSA entries), on the same checkpoint through each backend's calls."""
    monkeypatch.setattr(v4, "FILL_CHUNK", 64)
    path = v4.v4_checkpoint(v4.v4_config(kind))
    backends = ["reference", "transformers"]
    try:
        v4.require("mlx")
        backends.append("mlx")
    except NotImplementedError:
        pass
    got = {}
    for b in backends:
        try:
            layer = v4.V4Layer(b, kind, path)
        except NotImplementedError as e:
            pytest.skip(str(e))
        x, x1 = common.array(b, (1, 140, v4.HIDDEN), seed=1), common.array(b, (1, 1, v4.HIDDEN), seed=2)
        with common.no_grad(b):
            out = common.first(layer.prefill(x))
            layer.fill(x)
            got[b] = [_np(out), _np(layer.decode(x1)), _np(layer.decode(x1))]
    for b in backends[1:]:
        for what, g, w in zip(("prefill", "decode", "decode again"), got[b], got["reference"], strict=True):
            assert_close(g, w, bound=1e-5, what=f"{b} {kind} {what}")


def test_mhc_suites_run_and_peers_agree():
    n = v4.TOKENS[0]
    for kind in v4.MHC_KINDS:
        suite = v4.MHC()
        suite.setup("reference", kind, n)
        suite.time_forward("reference", kind, n)
        suite.time_forward_backward("reference", kind, n)
    over = v4.MHCOverhead()
    over.setup("reference", n)
    assert over.track_forward_ratio("reference", n) > 0 and over.track_forward_backward_ratio("reference", n) > 0
    got = {}
    for b in ("reference", "transformers", "mlx"):
        try:
            r = v4.Residual(b, "mhc", 16)
        except NotImplementedError:
            continue
        with common.no_grad(b):
            got[b] = [_np(t) for t in r.call(*r.inputs)]
    assert len(got) > 1
    for b, outs in got.items():
        for what, g, w in zip(("streams", "block input"), outs, got["reference"], strict=True):
            assert_close(g, w, bound=1e-5, what=f"{b} mHC {what}")


def test_script_prints_a_row_per_component(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(v4, "KINDS", ["hca"])
    monkeypatch.setattr(v4, "QUICK_CONTEXT", 64)
    monkeypatch.setattr(v4, "TOKENS", [8])
    v4.main(["--quick", "--out", str(tmp_path / "kv.md")])
    out = capsys.readouterr().out
    for row in ("prefill hca (64 tokens)", "decode hca (cache 64)", "mhc (8 x 4096)", "residual (8 x 4096)"):
        assert row in out
