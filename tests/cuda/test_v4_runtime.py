"""runtime_cuda.V4Model (Triton sink attention, gated pooling, CSA top-k and mHC) against reference.V4Model on the same
weights: loss, every parameter's gradient, logits and cached decode. On CPU the kernels run under Triton's
interpreter."""

import torch

import runtime_cuda
from reference import Model, V4Config, V4Model
from reference.testing import assert_close
from tests.cuda.conftest import DEVICE

SW, CSA, HCA = "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"
CFG = dict(vocab_size=61, hidden_size=32, moe_intermediate_size=16, num_hidden_layers=3, num_attention_heads=2,
           head_dim=16, q_lora_rank=16, partial_rotary_factor=0.5, num_experts_per_tok=2, n_routed_experts=4,
           layer_types=[SW, CSA, HCA], mlp_layer_types=["hash_moe", "moe", "moe"], compress_rates={CSA: 4, HCA: 8},
           hc_mult=2, sliding_window=6, o_groups=2, o_lora_rank=8, index_n_heads=8, index_head_dim=8, index_topk=3,
           num_nextn_predict_layers=1, max_position_embeddings=64)


def pair():
    cfg = V4Config(**CFG)
    torch.manual_seed(0)
    ref = V4Model(cfg)
    with torch.no_grad():  # O(1) weights; random sinks, position biases and mHC biases
        for name, p in ref.named_parameters():
            p.copy_(torch.randn(p.shape) * (p.shape[-1] ** -0.5 if p.dim() > 1 else 0.3)
                    + (1.0 if p.dim() == 1 and ("norm" in name or "scale" in name) else 0.0))
    fast = runtime_cuda.Model.for_config(cfg)
    fast.load_state_dict(ref.state_dict())
    return cfg, ref.to(DEVICE).train(), fast.to(DEVICE).train()


def test_hot_modules_are_swapped():
    _, _, fast = pair()
    assert isinstance(fast, runtime_cuda.V4Model) and Model.v4_class is V4Model
    assert not any(type(m) in runtime_cuda.v4_model.V4_SWAPS for m in fast.modules()), "a reference module was left"


def test_loss_logits_grads_and_cached_decode_match_reference():
    cfg, ref, fast = pair()
    ids = torch.randint(0, cfg.vocab_size, (2, 19), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    targets = torch.roll(ids, -1, 1)
    lr, lf = ref.loss(ids, targets), fast.loss(ids, targets)
    assert_close(lf.loss, lr.loss, what="loss")
    lr.loss.backward()
    lf.loss.backward()
    for (n, pr), (_, pf) in zip(ref.named_parameters(), fast.named_parameters(), strict=True):
        if pr.grad is None:
            assert pf.grad is None or not pf.grad.any(), n
        elif not n.endswith(("hc_scale", "hc_base", ".scale", ".base")):  # near-cancelling sums: compared together
            assert_close(pf.grad, pr.grad, what=f"grad {n}")
    small = [n for n, _ in ref.named_parameters() if n.endswith(("hc_scale", "hc_base", ".scale", ".base"))]
    gr = torch.cat([dict(ref.named_parameters())[n].grad.flatten() for n in small])
    gf = torch.cat([dict(fast.named_parameters())[n].grad.flatten() for n in small])
    assert_close(gf, gr, what="grads of the mHC scales and biases")
    with torch.no_grad():
        full = fast.eval()(ids)
        assert_close(full, ref.eval()(ids), what="logits")
        cache = fast.new_cache()
        steps = [fast(ids[:, :7], cache)] + [fast(ids[:, t:t + 1], cache) for t in range(7, 19)]
        assert_close(torch.cat(steps, 1), full, what="cached decode")
