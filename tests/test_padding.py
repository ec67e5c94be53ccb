"""A left-padded batch through the model with ``attention_mask`` (batched rollouts): the reference and runtime_cuda.

Prompts of lengths 5, 9 and 1 are left-padded to 9 with random ids, prefilled together and decoded 4 cached steps
(the mask extended by ones): the logits at every real position equal each prompt's own unpadded run, for every
attention type (MHA/GQA, MLA naive and absorbed, DSA with ``index_topk`` below the prompt length) with MoE layers,
whatever the pad ids; padding positions stay finite. transformers (DeepseekV3/V32ForCausalLM, same weights, the
same left-padded batch and mask) agrees at the real positions. runtime_cuda runs the reference's SDPA under a
mask (its flash-attention and absorbed-decode kernels take none) and its kernels without; DSA keeps its sparse
kernels. Float32, bound 1e-5 (DESIGN.md, "Tolerance").
"""

from __future__ import annotations

import logging

import pytest
import torch

from reference.attention import padding_mask
from reference.dsa import Indexer
from reference.testing import assert_close
from tests.reference_utils import make_config, make_model

LENGTHS, STEPS = (5, 9, 1), 4
CASES = {  # name: (attention_type, config overrides, MLA absorb: None = naive prefill and absorbed decode)
    "gqa": ("gqa", dict(), None),
    "mha_softmax_moe_dense0": ("mha", dict(moe_type="standard", first_k_dense_replace=0), None),
    "mla": ("mla", dict(q_lora_rank=12), None),
    "mla_absorbed": ("mla", dict(), True),
    "mla_naive": ("mla", dict(q_lora_rank=12), False),
    "dsa": ("dsa", dict(), None),
    "dsa_absorbed": ("dsa", dict(first_k_dense_replace=0), True),
}


def case_config(name: str):
    """The config of case ``name`` and its MLA ``absorb`` setting."""
    attention_type, overrides, absorb = CASES[name]
    overrides = dict(overrides)
    return make_config(attention_type, overrides.pop("moe_type", "deepseek"), **overrides), absorb


def set_absorb(model, absorb) -> None:
    """Force the MLA form of every attention layer (None: the default choice)."""
    for layer in model.model.layers:
        if hasattr(layer.self_attn, "absorb"):
            layer.self_attn.absorb = absorb


def padded_batch(vocab: int, lengths=LENGTHS, steps: int = STEPS):
    """Prompts of ``lengths`` (1-D int64), the (B, W) left-padded ids (random pad ids) and int64 mask
    (1 = real), and (B, ``steps``) decode tokens."""
    prompts = [torch.randint(0, vocab, (n,)) for n in lengths]
    w = max(lengths)
    ids = torch.randint(0, vocab, (len(lengths), w))
    mask = torch.zeros(len(lengths), w, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, w - len(p):] = p
        mask[b, w - len(p):] = 1
    return prompts, ids, mask, torch.randint(0, vocab, (len(lengths), steps))


def prefill_and_decode(model, ids, steps, mask=None, to=lambda a: a, back=lambda a: a) -> torch.Tensor:
    """Logits (B, W + n, V) of a prefill of ``ids`` (B, W) and one cached step per column of ``steps`` (B, n),
    ``mask`` (B, W) (or None) extended by ones at each step. Torch tensors in and out; ``to`` / ``back`` convert
    for another backend (the MLX tests)."""
    cache = model.new_cache()
    outs = [back(model(to(ids), cache, None if mask is None else to(mask)))]
    for t in range(steps.shape[1]):
        if mask is not None:
            mask = torch.cat((mask, torch.ones_like(mask[:, :1])), dim=1)
        outs.append(back(model(to(steps[:, t:t + 1]), cache, None if mask is None else to(mask))))
    return torch.cat(outs, dim=1)


def real_positions(logits: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """Per row, the logits (n_b + steps, V) at its real positions; ``mask`` (B, W) of the prompts."""
    w = mask.shape[1]
    return [logits[b, w - int(mask[b].sum()):] for b in range(logits.shape[0])]


def assert_rows_match_unpadded(padded, mask, prompts, steps, run, what: str) -> None:
    """Each row's real positions of ``padded`` equal ``run(prompt[None], steps[b:b+1])[0]`` (its unpadded run)."""
    for b, (got, p) in enumerate(zip(real_positions(padded, mask), prompts, strict=True)):
        assert_close(got, run(p[None], steps[b:b + 1])[0], what=f"{what}, row {b} (length {len(p)})")


# ----------------------------------------------------------------------------- the reference


@pytest.mark.parametrize("name", list(CASES))
@torch.no_grad()
def test_padded_batch_equals_unpadded_runs(name):
    cfg, absorb = case_config(name)
    model = make_model(cfg, router_bias=0.05)
    set_absorb(model, absorb)
    prompts, ids, mask, steps = padded_batch(cfg.vocab_size)
    padded = prefill_and_decode(model, ids, steps, mask)
    assert padded.shape == (3, 9 + STEPS, cfg.vocab_size)
    assert torch.isfinite(padded).all(), "non-finite logits (at padding positions?)"
    assert_rows_match_unpadded(padded, mask, prompts, steps, lambda p, s: prefill_and_decode(model, p, s), name)
    repadded = torch.where(mask.bool(), ids, torch.randint_like(ids, cfg.vocab_size))
    again = prefill_and_decode(model, repadded, steps, mask.bool())  # other pad ids, a bool mask
    for a, b in zip(real_positions(again, mask), real_positions(padded, mask), strict=True):
        assert_close(a, b, what=f"{name}: other pad ids")


def test_padding_mask_is_causal_real_keys_and_self():
    real = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    m = padding_mask(real, 2, 2)  # the last 2 of 4 positions
    assert m.shape == (2, 1, 2, 4) and m.dtype == torch.bool
    assert m[0, 0].tolist() == [[False, False, True, False], [False, False, True, True]]
    assert m[1, 0].tolist() == [[True, True, True, False], [True, True, True, True]]
    pad_query = padding_mask(torch.tensor([[0, 0, 1]]), 3, 0)[0, 0]
    assert pad_query.tolist() == [[True, False, False], [False, True, False], [False, False, True]]


def test_indexer_selects_real_keys_only():
    """Padding keys scoring highest never take a slot; a query with fewer real visible keys than index_topk
    selects all of them; a padding query selects itself."""
    cfg = make_config("dsa", index_topk=3)
    real = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1, 1, 1]])
    scores = torch.randn(2, 8, 8)
    scores[~real.bool()[:, None, :].expand(2, 8, 8)] = 100.0
    visible = padding_mask(real, 8, 0)[:, 0]
    sel = Indexer(cfg).select(scores, visible)
    assert not (sel & ~visible).any()
    n_real = real.cumsum(1).clamp(max=3)  # real keys visible to each query, capped at index_topk
    assert torch.equal(sel.sum(-1)[real.bool()], n_real[real.bool()])
    assert torch.equal(sel.sum(-1)[~real.bool()], torch.ones(int((real == 0).sum()), dtype=torch.long))


def test_bad_attention_mask_is_a_one_line_value_error():
    cfg, _ = case_config("mla")
    model = make_model(cfg)
    _, ids, mask, _ = padded_batch(cfg.vocab_size)
    bad = {"shape": mask[:, 1:], "float dtype": mask.float(), "list": mask.tolist(), "3-D": mask[..., None]}
    for what, m in bad.items():
        with pytest.raises(ValueError, match="attention_mask") as e:
            model(ids, attention_mask=m)
        assert "\n" not in str(e.value), what
    cache = model.new_cache()
    model(ids, cache, mask)
    with pytest.raises(ValueError, match=r"attention_mask: expected shape .*\(3, 9 \+ 1\)") as e:
        model(ids[:, :1], cache, mask[:, :1])  # S must cover the cache too
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- transformers


@pytest.mark.parametrize("attention_type", ["mla", "dsa"])
@torch.no_grad()
def test_transformers_agrees_on_a_left_padded_batch(attention_type, tmp_path):
    """Our checkpoint in transformers (DeepseekV3 / DeepseekV32ForCausalLM), the same left-padded batch and
    ``attention_mask``, prefill and cached decode: the logits at real positions agree. transformers also takes
    the positions from the cache, not from the mask."""
    transformers = pytest.importorskip("transformers")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    model = make_model(make_config(attention_type, q_lora_rank=12), router_bias=0.05)
    model.save_pretrained(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    _, ids, mask, steps = padded_batch(model.config.vocab_size)
    ours = prefill_and_decode(model, ids, steps, mask)
    out = hf(ids, attention_mask=mask, use_cache=True)
    theirs, cache = [out.logits], out.cache
    for t in range(STEPS):
        mask = torch.cat((mask, torch.ones_like(mask[:, :1])), dim=1)
        out = hf(steps[:, t:t + 1], attention_mask=mask, cache=cache, use_cache=True)
        theirs.append(out.logits)
    real = mask.bool()
    err = assert_close(ours[real], torch.cat(theirs, dim=1)[real], what=f"transformers vs ours [{attention_type}]")
    print(f"\n[padding] transformers {type(hf).__name__}: rel err {err:.2e}")


# ----------------------------------------------------------------------------- runtime_cuda

CUDA_CASES = ["gqa", "mla", "dsa"]


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts of the attention ops runtime_cuda's layers call: the flash-attention, absorbed-decode (dense and
    sparse) and DSA sparse kernels, and the reference's SDPA fallback; Triton outputs poisoned, and the skips of
    tests/cuda (no triton, or an interpreter that cannot run the installed versions)."""
    pytest.importorskip("triton")
    from kernels.triton import utils as triton_utils
    from reference import attention as ref_attention
    from runtime_cuda import attention as rc
    from tests.cuda.conftest import interpreter_unusable

    reason = triton_utils.interpreted() and interpreter_unusable()
    if reason:
        pytest.skip(reason)
    monkeypatch.setattr(triton_utils, "POISON", True)

    calls = dict.fromkeys(["attention", "mla_decode", "mla_decode_sparse", "sparse_attention", "fallback"], 0)

    def counting(module, fn_name, key):
        fn = getattr(module, fn_name)

        def wrapper(*args, **kwargs):
            k = key(kwargs) if callable(key) else key
            calls[k] += 1
            return fn(*args, **kwargs)

        monkeypatch.setattr(module, fn_name, wrapper)

    counting(rc, "attention", "attention")
    counting(rc, "sparse_attention", "sparse_attention")
    counting(rc, "mla_decode", lambda kw: "mla_decode" if kw.get("indices") is None else "mla_decode_sparse")
    counting(ref_attention, "attend", "fallback")
    return calls


@pytest.mark.parametrize("name", CUDA_CASES)
@torch.no_grad()
def test_runtime_cuda_padded_batch_matches_reference(name, kernel_calls):
    """runtime_cuda on the padded batch equals the reference's padded run at real positions (which equals the
    unpadded runs, above): the reference's SDPA under a mask for dense attention, DSA's kernels on its
    selection; without a mask the kernels only."""
    import runtime_cuda
    from tests.cuda.conftest import DEVICE

    cfg, _ = case_config(name)
    ref = make_model(cfg, router_bias=0.05).to(DEVICE)
    fast = runtime_cuda.Model(cfg).to(DEVICE).eval()
    fast.load_state_dict(ref.state_dict())
    _, ids, mask, steps = (t.to(DEVICE) if isinstance(t, torch.Tensor) else t for t in padded_batch(cfg.vocab_size))
    want = prefill_and_decode(ref, ids, steps, mask)
    kernel_calls.update(dict.fromkeys(kernel_calls, 0))  # the reference's own calls of `attend` do not count
    got = prefill_and_decode(fast, ids, steps, mask)
    assert torch.isfinite(got).all()
    for b, (g, w) in enumerate(zip(real_positions(got, mask), real_positions(want, mask), strict=True)):
        assert_close(g, w, what=f"runtime_cuda vs reference [{name}], row {b}")
    masked = dict(kernel_calls)
    assert masked["attention"] == masked["mla_decode"] == 0, masked
    assert (masked["fallback"] > 0) == (name != "dsa"), masked  # DSA: its kernels, on a selection of real keys
    if name == "dsa":
        assert masked["sparse_attention"] > 0 and masked["mla_decode_sparse"] > 0, masked
    kernel_calls.update(dict.fromkeys(kernel_calls, 0))
    prefill_and_decode(fast, ids, steps[:, :1])
    assert kernel_calls["fallback"] == 0, kernel_calls
    assert kernel_calls["attention" if name == "gqa" else "mla_decode" if name == "mla" else "sparse_attention"] > 0
