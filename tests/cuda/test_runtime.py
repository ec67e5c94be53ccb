"""runtime_cuda.Model against reference.Model on the same weights: logits, loss, every parameter's gradient,
cached decode and checkpoints (DESIGN.md, "Tolerance"). On CPU the kernels run under Triton's interpreter."""

import pytest
import torch

import runtime_cuda
from reference import Model
from reference.testing import assert_close
from tests.cuda.conftest import DEVICE
from tests.reference_utils import assert_o1, make_config, make_model, rand_ids

CASES = {
    "mla-qlora-mtp-groups": dict(q_lora_rank=12, num_nextn_predict_layers=1, n_group=4, topk_group=2,
                                 first_k_dense_replace=0),
    "dsa": dict(),
    "gqa": dict(),
}


def pair(name: str, dtype=torch.float32):
    attention_type = name.split("-")[0]
    cfg = make_config(attention_type, **CASES[name])
    ref = make_model(cfg, router_bias=0.1).to(DEVICE)
    fast = runtime_cuda.Model(cfg).to(DEVICE)
    fast.load_state_dict(ref.state_dict())
    return cfg, ref.to(dtype).train(), fast.to(dtype).train()


def test_every_hot_module_is_swapped():
    _, _, fast = pair("dsa")
    names = {type(m).__module__ for m in fast.modules()}
    assert {"runtime_cuda.attention", "runtime_cuda.moe", "runtime_cuda.model"} <= names
    assert not any(type(m) in runtime_cuda.model.SWAPS for m in fast.modules()), "a reference module was left"


@pytest.mark.parametrize("name", list(CASES))
def test_loss_logits_and_grads_match_reference(name):
    cfg, ref, fast = pair(name)
    ids = rand_ids(cfg, 2, 11).to(DEVICE)
    targets = torch.roll(ids, -1, 1)
    targets[0, :3] = -100
    lr, lf = ref.loss(ids, targets), fast.loss(ids, targets)
    assert_close(lf.loss, lr.loss, what="loss")
    lr.loss.backward()
    lf.loss.backward()
    for (n, pr), (_, pf) in zip(ref.named_parameters(), fast.named_parameters(), strict=True):
        if pr.grad is None:
            assert pf.grad is None or not pf.grad.any(), n
            continue
        assert_close(pf.grad, pr.grad, what=f"grad {n}")
    with torch.no_grad():
        out = fast.eval()(ids)
        assert_o1(out)
        assert_close(out, ref.eval()(ids), what="logits")


@pytest.mark.parametrize("name", ["mla-qlora-mtp-groups", "dsa"])
def test_cached_decode_matches_full_forward(name):
    cfg, ref, fast = pair(name)
    ids = rand_ids(cfg, 2, 8).to(DEVICE)
    fast.eval()
    with torch.no_grad():
        full = fast(ids)
        cache = fast.new_cache()
        steps = [fast(ids[:, :6], cache)] + [fast(ids[:, t:t + 1], cache) for t in range(6, 8)]
    assert_close(torch.cat(steps, dim=1), full, what="cached decode")


def test_checkpoint_round_trip_with_reference(tmp_path):
    cfg, ref, fast = pair("mla-qlora-mtp-groups")
    fast.save_pretrained(tmp_path / "ckpt")
    back = Model.from_pretrained(tmp_path / "ckpt").to(DEVICE).eval()
    again = runtime_cuda.Model.from_pretrained(tmp_path / "ckpt").to(DEVICE).eval()
    ids = rand_ids(cfg, 1, 7).to(DEVICE)
    with torch.no_grad():
        assert_close(again(ids), back(ids), what="logits after a round trip")


def test_bf16_autocast_training_step_matches_reference():
    """The training loop's bf16 autocast (dsfs.evaluation.autocast on a GPU): the kernels take the mixed dtypes
    autocast produces (bf16 activations, fp32 norm gains, router and head) and agree with the reference."""
    cfg, ref, fast = pair("mla-qlora-mtp-groups")
    ids = rand_ids(cfg, 2, 8).to(DEVICE)
    targets = torch.roll(ids, -1, 1)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        lr, lf = ref.loss(ids, targets), fast.loss(ids, targets)
    assert_close(lf.loss, lr.loss, dtype=torch.bfloat16, what="bf16 loss")
    lr.loss.backward()
    lf.loss.backward()
    for (n, pr), (_, pf) in zip(ref.named_parameters(), fast.named_parameters(), strict=True):
        if pr.grad is not None:
            assert pf.grad.dtype == pr.grad.dtype, n
            assert_close(pf.grad, pr.grad, dtype=torch.bfloat16, bound=5e-2, what=f"bf16 grad {n}")
