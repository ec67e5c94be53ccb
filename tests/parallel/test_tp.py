"""Tensor parallelism (`dsfs.parallel.tp.apply_tp`) against the single-process model: on 2 gloo processes, one
forward and backward of ``model.loss`` on the same global batch gives the single-process loss and every parameter's
gradient within `TOL`, with sequence parallelism on and off, with ``q_proj`` (no query LoRA), through MLA's
absorbed form, with 2 MTP depths and the balance loss, with DSA and with GQA + the standard MoE; in eval, logits
and greedy generation with the KV cache (prefill sequence-parallel, one-token decode steps through the absorbed
form) equal the single-process model's; the same for ``runtime_cuda.Model`` (a smaller model) under
``TRITON_INTERPRET=1``, where DTensors must never reach a Triton kernel. All checks run in one spawn."""

from __future__ import annotations

import os

import pytest
import torch

from dsfs.errors import ConfigError
from dsfs.parallel.layout import ParallelDims
from tests.parallel.harness import spawn
from tests.parallel.oracle import (
    TOL,
    full_grads,
    global_batch,
    max_error,
    parallel_config,
    reference_step,
)

TP = 2
MTP_WEIGHT = 0.3


def _set_absorb(model, absorb):
    for m in model.modules():
        if hasattr(m, "absorb"):
            m.absorb = absorb


def _step(model, ids, targets):
    """One forward and backward of ``model.loss``: the loss (a float) and the gathered gradients by name."""
    model.zero_grad(set_to_none=True)
    out = model.loss(ids, targets, mtp_weight=MTP_WEIGHT)
    out.loss.backward()
    return float(out.loss.detach()), full_grads(model)


VARIANTS = {
    "dsa": {"attention_type": "dsa", "model_type": "deepseek_v32"},
    "gqa_standard_moe": {"attention_type": "gqa", "num_key_value_heads": 2, "moe_type": "standard"},
}
"""Other attention and FFN types: fields of `parallel_config` replaced."""


def _model(variant=None, runtime_cuda=False, **cfg):
    """``parallel_model(0, **cfg)``: the same weight draws, in train mode, with the fields of ``VARIANTS[variant]``
    replaced, as a ``runtime_cuda.Model`` when ``runtime_cuda``."""
    import dataclasses

    from reference import Model
    from tests.reference_utils import randomize_

    config = parallel_config(**cfg)
    if variant is not None:
        config = dataclasses.replace(config, **VARIANTS[variant])
    if runtime_cuda:
        import runtime_cuda as rc

        Model = rc.Model  # noqa: N806
    torch.manual_seed(0)
    return randomize_(Model(config), router_bias=0.05).train()


def _train_check(mesh, ids, targets, sp, absorb=None, variant=None, runtime_cuda=False, **cfg):
    """Errors of one TP step against the single-process step (before and after `reduce_partial_grads`), and the
    sequence length the norms saw."""
    from torch.distributed.tensor import DTensor

    from dsfs.parallel.tp import apply_tp, reduce_partial_grads

    ref = _model(variant, **cfg)
    _set_absorb(ref, absorb)
    want_loss, want = reference_step(ref, ids, targets, mtp_weight=MTP_WEIGHT)
    model = _model(variant, runtime_cuda, **cfg)
    names = [n for n, _ in model.named_parameters()]
    apply_tp(model, mesh, sequence_parallel=sp)
    _set_absorb(model, absorb)
    seen = []
    model.model.layers[-1].input_layernorm.register_forward_hook(lambda m, a, o: seen.append(a[0].shape[1]))
    loss, got = _step(model, ids, targets)
    err, where = max_error(got, want)
    reduce_partial_grads(model)  # the sequence-parallel norms' Partial() gradients, all-reduced in place
    unreduced = [n for n, p in model.named_parameters() if isinstance(p.grad, DTensor) and p.grad.placements
                 != p.placements]
    return {"loss": abs(loss - want_loss), "grad": err, "where": where, "norm_len": seen[0],
            "names": names == [n for n, _ in model.named_parameters()], "unreduced": unreduced,
            "reduced_grad": max_error(full_grads(model), want)[0]}, ref, model


def _tp_worker() -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    from dsfs.parallel.tp import apply_tp

    mesh = init_device_mesh("cpu", (TP,), mesh_dim_names=("tp",))
    ids, targets = global_batch(parallel_config(), batch=4, seq=16)
    res = {}
    res["sp"], ref, model = _train_check(mesh, ids, targets, sp=True)
    res["no_sp"], _, _ = _train_check(mesh, ids, targets, sp=False)
    res["q_proj"], _, _ = _train_check(mesh, ids, targets, sp=True, q_lora_rank=None)
    res["absorbed"], _, _ = _train_check(mesh, ids, targets, sp=True, absorb=True)
    res["mtp2_aux"], _, _ = _train_check(mesh, ids, targets, sp=True, num_nextn_predict_layers=2, aux_loss_alpha=0.01)
    res["dsa"], _, _ = _train_check(mesh, ids, targets, sp=True, variant="dsa")
    res["gqa_standard_moe"], _, _ = _train_check(mesh, ids, targets, sp=True, variant="gqa_standard_moe", n_group=1,
                                                 topk_group=1, aux_loss_alpha=0.01)

    # placements: colwise Shard(0), rowwise Shard(1), replicated DTensors, plain embedding / routed experts
    params = dict(model.named_parameters())
    res["placements"] = {n: str(getattr(params[n], "placements", "plain")) for n in (
        "model.layers.1.self_attn.q_b_proj.weight", "model.layers.1.self_attn.o_proj.weight",
        "model.layers.1.self_attn.kv_a_proj_with_mqa.weight", "model.layers.1.mlp.shared_experts.down_proj.weight",
        "model.layers.0.mlp.gate_proj.weight", "mtp.0.eh_proj.weight", "model.embed_tokens.weight",
        "model.layers.1.mlp.experts.gate_proj")}
    res["tied"] = model.lm_head.weight is model.model.embed_tokens.weight

    # eval: logits (sequence-parallel), absorbed forward == naive, greedy generation with the cache
    ref.eval()
    model.eval()
    with torch.no_grad():
        want = ref(ids)
        naive = model(ids)
        odd = (model(ids[:, :7]) - ref(ids[:, :7])).abs().max()  # length 7: plain TP
        _set_absorb(model, True)
        absorbed = model(ids)
        _set_absorb(model, None)
    res["logits"] = float((naive - want).abs().max())
    res["logits_odd"] = float(odd)
    res["absorbed_vs_naive"] = float((absorbed - naive).abs().max())
    prompt = ids[:2, :8]
    res["generate"] = (model.generate(prompt, 6).tolist(), ref.generate(prompt, 6).tolist())

    # runtime_cuda (Triton kernels, under the interpreter here): a smaller model (a dense layer and an MoE MTP
    # block), one step and a prefill + one absorbed decode step through the kernels
    if os.environ.get("TRITON_INTERPRET") == "1":
        ids1, targets1 = ids[:1, :8], targets[:1, :8]
        res["runtime_cuda"], ref, model = _train_check(mesh, ids1, targets1, sp=True, runtime_cuda=True,
                                                       num_hidden_layers=1)
        res["runtime_cuda_generate"] = (model.eval().generate(ids1, 2).tolist(), ref.eval().generate(ids1, 2).tolist())

    # a degree the heads do not split over is rejected, and so is a second apply_tp
    res["reject"], res["twice"] = None, None
    try:
        apply_tp(_model(num_attention_heads=3), mesh)
    except ConfigError as e:
        res["reject"] = str(e)
    try:
        apply_tp(model, mesh)
    except ConfigError as e:
        res["twice"] = str(e)
    return res


@pytest.fixture(scope="module")
def results():
    ranks = spawn(TP, _tp_worker)
    assert ranks[0]["generate"] == ranks[1]["generate"]
    return ranks[0]


@pytest.mark.parametrize("case", ["sp", "no_sp", "q_proj", "absorbed", "mtp2_aux", "dsa", "gqa_standard_moe",
                                  "runtime_cuda"])
def test_step_equals_single_process(results, case):
    if case not in results:
        pytest.skip("runtime_cuda on CPU tensors needs TRITON_INTERPRET=1")
    r = results[case]
    assert r["names"], "parameter names changed"
    assert r["loss"] <= TOL, f"{case}: loss error {r['loss']:.3g}"
    assert r["grad"] <= TOL, f"{case}: gradient error {r['grad']:.3g} at {r['where']}"
    assert not r["unreduced"] and r["reduced_grad"] <= TOL, f"{case}: reduce_partial_grads left {r['unreduced']}"
    seq = 8 if case == "runtime_cuda" else 16
    assert r["norm_len"] == (seq // TP if case != "no_sp" else seq), f"{case}: the norms saw {r['norm_len']} tokens"


def test_placements(results):
    p = results["placements"]
    assert p["model.layers.1.self_attn.q_b_proj.weight"] == "(Shard(dim=0),)"
    assert p["model.layers.0.mlp.gate_proj.weight"] == "(Shard(dim=0),)"
    assert p["model.layers.1.self_attn.o_proj.weight"] == "(Shard(dim=1),)"
    assert p["model.layers.1.mlp.shared_experts.down_proj.weight"] == "(Shard(dim=1),)"
    assert p["model.layers.1.self_attn.kv_a_proj_with_mqa.weight"] == "(Replicate(),)"
    assert p["mtp.0.eh_proj.weight"] == "(Replicate(),)"
    assert p["model.embed_tokens.weight"] == "plain"
    assert p["model.layers.1.mlp.experts.gate_proj"] == "plain"
    assert results["tied"]


def test_eval_and_generate(results):
    assert results["logits"] <= TOL
    assert results["logits_odd"] <= TOL
    assert results["absorbed_vs_naive"] <= TOL
    got, want = results["generate"]
    assert got == want
    if "runtime_cuda_generate" in results:
        got, want = results["runtime_cuda_generate"]
        assert got == want


def test_rejects_bad_degree(results):
    assert results["reject"] is not None and "num_attention_heads" in results["reject"]
    assert results["twice"] is not None and "already" in results["twice"]
    with pytest.raises(ConfigError, match="num_attention_heads"):
        ParallelDims(tp=2, world_size=2).check_model(parallel_config(num_attention_heads=3))
    with pytest.raises(ConfigError, match="intermediate_size"):
        ParallelDims(tp=2, world_size=2).check_model(parallel_config(intermediate_size=47))
