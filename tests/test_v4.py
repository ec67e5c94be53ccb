"""DeepSeek-V4 (`reference.v4_model`) against ``transformers``' ``DeepseekV4ForCausalLM`` in float32 on the same random
weights: logits within 1e-5, checkpoints both ways (our save into theirs, their save into ours), cached decode equal to
the full forward (ours and theirs), MTP as DeepSeek's ``MTPBlock``, config reading, and one-line errors.

Weights: O(1) random draws for every tensor, with attention sinks, compressor position biases and ``tid2eid`` random
too (their defaults are zeros, which would hide a wrong formula). ``layer_types`` is always explicit. The indexer's
ReLU makes exact zero ties; 8 index heads and a margin check on every top-k cut keep the selection well defined.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from reference.checkpoint import CheckpointWarning
from reference.compressor import Indexer
from reference.testing.tolerance import assert_close
from reference.v4_config import V4Config
from reference.v4_model import V4Model

transformers = pytest.importorskip("transformers")
DeepseekV4Config, DeepseekV4ForCausalLM = transformers.DeepseekV4Config, transformers.DeepseekV4ForCausalLM

SW, CSA, HCA = "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32, "beta_slow": 1}


def tiny(**over) -> dict:
    """Config kwargs of a tiny V4 (hidden 32, 4 heads of 16, rope on the last 8, windows of 8 tokens)."""
    kw = dict(vocab_size=97, hidden_size=32, moe_intermediate_size=16, num_hidden_layers=4, num_attention_heads=4,
              head_dim=16, q_lora_rank=24, partial_rotary_factor=0.5, num_experts_per_tok=2, n_routed_experts=6,
              layer_types=[SW, CSA, HCA, CSA], mlp_layer_types=["hash_moe", "moe", "moe", "moe"],
              compress_rates={CSA: 4, HCA: 8}, hc_mult=4, sliding_window=8, o_groups=2, o_lora_rank=8,
              index_n_heads=8, index_head_dim=8, index_topk=3, max_position_embeddings=512)
    kw.update(over)
    return kw


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """O(1) weights: matrices N(0, 1/fan_in), vectors N(0, 0.25) (+1 for norm gains and mHC scales), a random
    ``tid2eid`` of distinct experts per token."""
    g = torch.Generator().manual_seed(seed)
    for name, v in model.state_dict().items():
        if v.dtype.is_floating_point:
            gain = 1.0 if v.dim() == 1 and ("norm" in name or "scale" in name) else 0.0
            std = v.shape[-1] ** -0.5 if v.dim() > 1 else 0.5
            v.copy_(torch.randn(v.shape, generator=g) * std + gain)
        elif name.endswith("tid2eid"):
            e = model.config.n_routed_experts
            v.copy_(torch.rand(v.shape[0], e, generator=g).argsort(-1)[:, : v.shape[1]])
    return model


def pair(seed: int = 0, **over) -> tuple[V4Model, torch.nn.Module]:
    kw = tiny(**over)
    ours = randomize(V4Model(V4Config(**kw)), seed).eval()
    theirs = DeepseekV4ForCausalLM(DeepseekV4Config(**kw)).eval()
    main = {k: v for k, v in ours.state_dict().items() if not k.startswith("mtp.")}  # transformers has no MTP
    missing, unexpected = theirs.load_state_dict(main, strict=False)
    assert not unexpected and not missing
    return ours, theirs


def ids_for(cfg_vocab: int, b: int, s: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, cfg_vocab, (b, s), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def margins(monkeypatch):
    """Records, for every CSA top-k cut, the gap between the last kept and the first dropped visible score."""
    gaps = []
    select = Indexer.select

    def spy(self, scores, positions):
        idx = select(self, scores, positions)
        visible = torch.arange(scores.shape[-1]) < ((positions + 1) // self.compress_rate)[:, None]
        ranked = scores.masked_fill(~visible, -math.inf).sort(-1, descending=True).values
        k = idx.shape[-1]
        if ranked.shape[-1] > k:
            cut = ranked[..., k - 1] - ranked[..., k]
            gaps.append(cut[torch.isfinite(ranked[..., k])].min() if torch.isfinite(ranked[..., k]).any() else None)
        return idx

    monkeypatch.setattr(Indexer, "select", spy)
    return gaps


CASES = {
    "all three types, hc 4, YaRN on compressed layers": dict(rope_parameters=YARN),
    "hc 1": dict(hc_mult=1),
    "HCA at 128, two windows": dict(layer_types=[HCA, SW, CSA, HCA], compress_rates={CSA: 4, HCA: 128},
                                    mlp_layer_types=["hash_moe", "hash_moe", "moe", "moe"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_equal_transformers(case, margins):
    over = CASES[case]
    ours, theirs = pair(**over)
    seq = 263 if over.get("compress_rates", {}).get(HCA) == 128 else 45
    ids = ids_for(97, 2, seq)
    with torch.no_grad():
        got, want = ours(ids), theirs(ids, use_cache=False).logits
    assert 0.5 < float(want.std()) < 3.0, "logits should have a std near 1"
    assert all(g is None or g > 1e-5 for g in margins), "a top-k cut without margin: pick another seed"
    assert margins, "index_topk should be below the number of visible compressed entries"
    assert_close(got, want, bound=1e-5, what=f"logits ({case})")


def test_cached_decode_equals_full_forward():
    ours, theirs = pair(rope_parameters=YARN)
    ids = ids_for(97, 2, 45)
    with torch.no_grad():
        full = ours(ids)
        for chunks in ([13] + [1] * 32, [5, 17, 23], [1] * 45):
            cache, parts, at = ours.new_cache(), [], 0
            for n in chunks:
                parts.append(ours(ids[:, at:at + n], cache))
                at += n
            assert cache.seq_len == 45
            assert_close(torch.cat(parts, 1), full, bound=1e-5, what=f"cached decode in chunks {chunks[:3]}...")
        out = theirs(ids[:, :13], use_cache=True)
        steps = [out.logits]
        for t in range(13, 45):
            steps.append(theirs(ids[:, t:t + 1], cache=out.cache, use_cache=True).logits)
    assert_close(torch.cat(steps, 1), full, bound=1e-5, what="transformers' cached decode vs our full forward")


def test_generate_greedy_equals_transformers():
    ours, theirs = pair()
    ids = ids_for(97, 1, 10)
    mine = ours.generate(ids, max_new_tokens=12)
    with torch.no_grad():
        seq = ids
        for _ in range(12):  # transformers' own greedy loop without its cache (its generate needs a tokenizer config)
            seq = torch.cat((seq, theirs(seq, use_cache=False).logits[:, -1:].argmax(-1)), 1)
    assert torch.equal(mine, seq)


def test_our_checkpoint_into_transformers(tmp_path):
    ours, _ = pair(num_nextn_predict_layers=1, rope_parameters=YARN)
    ours.save_pretrained(tmp_path / "ours")
    theirs = DeepseekV4ForCausalLM.from_pretrained(tmp_path / "ours").eval()
    ids = ids_for(97, 2, 30)
    with torch.no_grad():
        assert_close(theirs(ids, use_cache=False).logits, ours(ids), bound=1e-5, what="our save, their load")
    back = V4Model.from_pretrained(tmp_path / "ours")  # MTP block kept in mtp.safetensors
    for k, v in ours.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_transformers_checkpoint_into_ours(tmp_path):
    """Their save of their own init with their default schedule (layer_types and mlp_layer_types left to
    transformers, compress rates 4 / 128), then random sinks and biases so nothing is zero."""
    kw = tiny(layer_types=None, mlp_layer_types=None, compress_rates=None, num_hidden_layers=4)
    theirs = DeepseekV4ForCausalLM(DeepseekV4Config(**kw)).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if name.endswith(("sinks", "position_bias", "base", "hc_base")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        for name, b in theirs.named_buffers():
            if name.endswith("tid2eid"):
                b.copy_(torch.rand(b.shape[0], kw["n_routed_experts"], generator=g).argsort(-1)[:, : b.shape[1]])
    theirs.save_pretrained(tmp_path / "theirs")
    with pytest.warns(CheckpointWarning, match="MTP"):  # their config asks for 1 MTP block they never save
        ours = V4Model.from_pretrained(tmp_path / "theirs")
    assert ours.config.layer_types == theirs.config.layer_types
    ids = ids_for(97, 2, 140)
    with torch.no_grad():
        assert_close(ours(ids), theirs(ids, use_cache=False).logits, bound=1e-5, what="their save, our load")


def test_deepseek_release_names_load(tmp_path):
    """DeepSeek's own layout (no ``model.`` prefix, ``embed``/``head``/``hc_head_fn``, ``attn.kv_norm``)."""
    from safetensors.torch import save_file

    from reference.v4_checkpoint import to_disk_names

    ours, _ = pair()
    disk = to_disk_names(ours.state_dict(), ours.config)
    release = {}
    for k, v in disk.items():
        k = {"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "norm.weight"}.get(k, k)
        k = k.replace("model.hc_head.hc_", "hc_head_").removeprefix("model.").replace(".attn.norm.", ".attn.kv_norm.")
        release[k] = v
    (tmp_path / "rel").mkdir()
    save_file(release, str(tmp_path / "rel" / "model.safetensors"))
    ours.config.save_json(tmp_path / "rel" / "config.json")
    back = V4Model.from_pretrained(tmp_path / "rel")
    ids = ids_for(97, 1, 20)
    with torch.no_grad():
        assert torch.equal(back(ids), ours(ids))
    release["layers.1.attn.wq_a.scale"] = torch.ones(1)
    save_file(release, str(tmp_path / "rel" / "model.safetensors"))
    with pytest.raises(ValueError, match="quantized"):
        V4Model.from_pretrained(tmp_path / "rel")


def test_mtp_block_follows_deepseek_code():
    """Depth 1 written out from DeepSeek-V4's ``MTPBlock.forward``: ``e = enorm(embed(ids)); x = hnorm(x);
    x = e_proj(e).unsqueeze(2) + h_proj(x); x = Block(x); logits = head(hc_head(x), norm)``."""
    ours, _ = pair(num_nextn_predict_layers=1)
    ids = ids_for(97, 2, 20)
    tgt = torch.roll(ids, -1, 1)
    out = ours.loss(ids, tgt)
    blk = ours.mtp[0]
    with torch.no_grad():
        h = ours.streams(ids)
        ahead = torch.cat((ids[:, 1:], ids.new_zeros(2, 1)), 1)
        x = blk.e_proj(blk.enorm(ours.model.embed_tokens(ahead))).unsqueeze(2) + blk.h_proj(blk.hnorm(h))
        x = super(type(blk), blk).forward(x, ahead)
        logits = ours.lm_head(blk.norm(blk.hc_head(x)))
        want = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 97), tgt[:, 1:].reshape(-1))
        lm = torch.nn.functional.cross_entropy(ours(ids).reshape(-1, 97), tgt.reshape(-1))
    assert_close(out.mtp_losses[0], want, bound=1e-5, what="MTP depth-1 loss")
    assert_close(out.lm_loss, lm, bound=1e-5, what="main loss")
    out.loss.backward()
    assert blk.e_proj.weight.grad is not None and ours.model.layers[0].attn_hc.fn.grad is not None


def test_config_reads_legacy_keys_and_refuses_bad_values():
    cfg = V4Config.from_dict({"model_type": "deepseek_v4", "num_hidden_layers": 3, "compress_ratios": [128, 4, 0],
                              "num_hash_layers": 1, "qk_rope_head_dim": 16, "head_dim": 64})
    assert cfg.layer_types == [HCA, CSA, SW] and cfg.mlp_layer_types == ["hash_moe", "moe", "moe"]
    assert cfg.rope_dim == 16 and cfg.rope_parameters["compress"]["rope_theta"] == 160000.0
    d = cfg.to_dict()
    assert DeepseekV4Config(**{k: v for k, v in d.items() if k != "extra"}).layer_types == cfg.layer_types
    for bad, match in ((dict(layer_types=[SW, "dense"]), "layer_types"), (dict(num_key_value_heads=2), "key-value"),
                       (dict(o_groups=3), "o_groups"), (dict(scoring_func="softmax"), "scoring_func"),
                       (dict(partial_rotary_factor=0.3), "partial_rotary_factor")):
        with pytest.raises(ValueError, match=match):
            V4Config(**{**dict(num_hidden_layers=2, layer_types=[SW, SW], mlp_layer_types=["moe", "moe"]), **bad})
    with pytest.raises(ValueError, match="unknown config keys"):
        V4Config.from_dict({"model_type": "deepseek_v4", "kv_lora_rank": 3})
    with pytest.raises(ValueError, match="dequantize"):
        V4Config.from_dict({"model_type": "deepseek_v4", "quantization_config": {"quant_method": "fp8"}})
    for bad in ({"compress_rates": [4, 8]}, {"rope_parameters": "x"}):
        with pytest.raises(ValueError, match="expected a dict"):
            V4Config.from_dict({"model_type": "deepseek_v4", **bad})


def test_cache_bytes_per_token_shrink_with_compression():
    """HCA and CSA layers keep the window plus one entry per m tokens: far fewer bytes than a full-length cache."""
    ours, _ = pair(layer_types=[HCA, HCA, HCA, HCA], mlp_layer_types=["moe"] * 4, compress_rates={CSA: 4, HCA: 8})
    cache = ours.new_cache()
    with torch.no_grad():
        ours(ids_for(97, 1, 200), cache)
    per_token_full = 4 * 16 * 4  # 4 layers, head_dim 16, float32
    assert cache.nbytes_per_token() < per_token_full / 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(NotImplementedError, match="rolled back"):
            cache.crop(10)
