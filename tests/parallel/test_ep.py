"""Expert parallelism (`dsfs.parallel.ep`) against the single-process run on the same global batch: each rank takes
its own rows, and after one forward and backward of ``model.loss`` the mean of the ranks' losses, every gradient
(expert gradients gathered from their Shard(0) DTensors) and the summed expert loads equal the single-process ones.
The data-parallel reduction FSDP will do is emulated as `apply_ep`'s docstring states it: non-expert gradients
averaged over the data ranks, expert gradients summed over the expert replicas and divided by the data ranks."""

from __future__ import annotations

import pytest
import torch

from dsfs.errors import ConfigError
from dsfs.parallel.ep import EXPERT_PARAMS, apply_ep, dispatch_volume
from reference.moe import route
from tests.parallel.harness import spawn
from tests.parallel.oracle import TOL, full_grads, global_batch, max_error, parallel_model, reference_step

BATCH, SEQ = 4, 16


def starve_(model) -> None:
    """Correction biases that starve experts: layer 1's experts 0-3 (all of rank 0's under ep 2: with n_group 4,
    their groups lose, so rank 0 receives no row at all) and layer 2's experts 1 and 6 (uneven splits)."""
    with torch.no_grad():
        model.model.layers[1].mlp.gate.e_score_correction_bias[:4] = -100.0
        model.model.layers[2].mlp.gate.e_score_correction_bias[[1, 6]] = -100.0


def loads(model) -> torch.Tensor:
    """The DeepSeekMoE layers' ``expert_load`` stacked (L, E); (0,) for the standard MoE, which counts none."""
    ls = [m.expert_load for m in model.moe_layers() if hasattr(m, "expert_load")]
    return torch.stack(ls) if ls else torch.zeros(0)


def build(case: dict):
    model = parallel_model(0, **case.get("config", {}))
    if case.get("starve"):
        starve_(model)
    return model


def ep_case(case: dict, mesh, ep_dim: str, data_rank: int, data_size: int) -> dict:
    """One model under EP on ``mesh[ep_dim]`` (the other mesh dimension, if any: expert replicas); this rank reads
    rows ``[data_rank B/D, (data_rank+1) B/D)``. Returns the errors against the single-process run."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Shard

    ref = build(case)
    ids, targets = global_batch(ref.config, BATCH, SEQ)
    want_loss, want_grads = reference_step(ref, ids, targets)
    want_load = loads(ref)

    model = build(case)
    ep_mesh = mesh[ep_dim]
    apply_ep(model, ep_mesh)
    out = {"names": sorted(n for n, _ in model.named_parameters()) == sorted(n for n, _ in ref.named_parameters())}
    r, ep = ep_mesh.get_local_rank(), ep_mesh.size()
    shards_ok = True
    for m_ep, m_ref in zip(model.moe_layers(), ref.moe_layers(), strict=True):
        for name in EXPERT_PARAMS:
            p, q = getattr(m_ep.experts, name), getattr(m_ref.experts, name)
            e = q.shape[0] // ep
            shards_ok &= (isinstance(p, DTensor) and p.placements == (Shard(0),) and p.shape == q.shape
                          and torch.equal(p.to_local(), q[r * e:(r + 1) * e].detach()))
    out["shards"] = shards_ok

    rows = slice(data_rank * BATCH // data_size, (data_rank + 1) * BATCH // data_size)
    model.zero_grad(set_to_none=True)
    loss = model.loss(ids[rows], targets[rows], mtp_weight=0.3).loss
    loss.backward()
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    out["loss"] = abs(float(mean_loss) / data_size - want_loss)

    replicas = mesh[[d for d in mesh.mesh_dim_names if d != ep_dim][0]].get_group() if mesh.ndim > 1 else None
    for p in model.parameters():
        if p.grad is None:
            continue
        if isinstance(p.grad, DTensor):  # experts: the all_to_all backward summed the ep ranks' tokens already
            g = p.grad.to_local()
            if replicas is not None:
                dist.all_reduce(g, group=replicas)
            g.div_(data_size)
        else:
            dist.all_reduce(p.grad)
            p.grad.div_(data_size)
    out["grad"], out["where"] = max_error(full_grads(model), want_grads)
    if case.get("starve"):  # ep 2: rank 0 received no row in layer 1 (its experts' gradients are exact zeros)
        local = [getattr(model.model.layers[1].mlp.experts, n).grad.to_local() for n in EXPERT_PARAMS]
        out["empty_rank"] = all(bool((g == 0).all()) == (r == 0) for g in local)

    load = loads(model)
    dist.all_reduce(load)
    out["load"] = float((load - want_load).abs().max()) if load.numel() else 0.0
    try:
        apply_ep(model, ep_mesh)
        out["twice"] = "no error"
    except ConfigError:
        out["twice"] = "ConfigError"
    return out


CASES = {
    "oracle": {},
    "n_group1": {"config": dict(n_group=1, topk_group=1)},
    "starved": {"starve": True},
    "standard": {"config": dict(moe_type="standard", n_group=1, topk_group=1)},
    "ep1xdp2": {"mesh": "replicas"},
}
"""The cases of the one 2-process run: ep 2 over both data ranks, and (``ep1xdp2``) ep 1 with the experts replicated
over the 2 data ranks, which checks the divide-by-D contract where D != ep (an ep 2 x dp 2 run needs 4 processes:
twice the start-up on this 2-core machine for the same contract)."""


def run_cases() -> dict:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    meshes = {None: init_device_mesh("cpu", (2,), mesh_dim_names=("ep",)),
              "replicas": init_device_mesh("cpu", (2, 1), mesh_dim_names=("dp_shard_mod_ep", "ep"))}
    return {name: ep_case(c, meshes[c.get("mesh")], "ep", dist.get_rank(), 2) for name, c in CASES.items()}


def _worst(values: list):
    """The ranks' values of one result: the largest error, every rank's check, or rank 0's text."""
    if isinstance(values[0], bool):
        return all(values)
    return max(values) if isinstance(values[0], float) else values[0]


@pytest.fixture(scope="module")
def results():
    ranks = spawn(2, run_cases)
    out = {name: {k: _worst([r[name][k] for r in ranks]) for k in res} for name, res in ranks[0].items()}
    print({n: (f"loss {r['loss']:.2e}", f"grad {r['grad']:.2e} at {r['where']}") for n, r in out.items()})
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_ep_matches_single_process(results, name):
    r = results[name]
    assert r["names"] and r["shards"], r
    assert r["loss"] <= TOL, r
    assert r["grad"] <= TOL, r
    assert r["load"] == 0.0, r
    assert r["twice"] == "ConfigError"
    assert r.get("empty_rank", True)


def test_dispatch_volume_counts_token_rank_rows():
    idx = torch.tensor([[0, 1], [0, 7], [3, 4], [6, 5]])
    v = dispatch_volume(idx, num_experts=8, ep=2, hidden_size=10, element_size=2)
    assert (v.rows, v.pairs, v.max_ranks) == (6, 8, 2)
    assert v.bytes == 6 * (2 * 10 * 2 + 2 * (2 + 8)) and v.pair_bytes == 8 * 2 * 10 * 2
    assert dispatch_volume(idx, 8, 4, 10).max_ranks == 2 and dispatch_volume(idx, 8, 1, 10).rows == 4
    with pytest.raises(ConfigError):
        dispatch_volume(idx, 8, 3, 10)


@pytest.mark.parametrize("ep, bound", [(4, 2), (2, 2), (8, 4)])
def test_group_limited_routing_bounds_destinations(ep, bound):
    """16 experts in 4 groups, top-6 within the 2 best groups: with n_group == ep every token reaches at most
    topk_group ranks (ep 2: whole groups per rank; ep 8: each group spans 2 ranks, at most 2 x topk_group), while the
    same scores without the group limit reach more."""
    g = torch.Generator().manual_seed(0)
    logits, bias = torch.randn(512, 16, generator=g), torch.zeros(16)
    limited = route(logits, bias, 6, n_group=4, topk_group=2)[0]
    free = route(logits, bias, 6)[0]
    v, w = dispatch_volume(limited, 16, ep, 64), dispatch_volume(free, 16, ep, 64)
    assert v.max_ranks <= bound < w.max_ranks or ep == 2
    assert v.rows < v.pairs and v.rows <= w.rows


def test_oracle_dispatch_volume():
    """The test model's routing on the global batch under ep 2 and ep 4: the rows and bytes with and without the
    (token, rank) dedupe (printed for the record)."""
    model = parallel_model(0)
    ids, _ = global_batch(model.config, BATCH, SEQ)
    seen = []
    hooks = [m.gate.register_forward_hook(lambda mod, args, res: seen.append(res[0])) for m in model.moe_layers()]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    cfg = model.config
    for ep in (2, 4):
        vs = [dispatch_volume(t, cfg.n_routed_experts, ep, cfg.hidden_size, 4) for t in seen]
        rows, pairs = sum(v.rows for v in vs), sum(v.pairs for v in vs)
        print(f"ep {ep}: rows {rows} vs pairs {pairs}; bytes {sum(v.bytes for v in vs)} vs "
              f"{sum(v.pair_bytes for v in vs)}")
        assert all(v.max_ranks <= cfg.topk_group for v in vs) if ep == cfg.n_group else True
        assert rows <= pairs and all(v.rows >= t.shape[0] for v, t in zip(vs, seen, strict=True))
