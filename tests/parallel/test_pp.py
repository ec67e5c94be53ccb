"""Pipeline parallelism (`dsfs.parallel.pp`) against the single-process step on the same global batch: for each
schedule, one `Pipeline.step`'s loss and metrics and every parameter's gradient (the stages' gradients gathered
by name) within 1e-5 of ``Model.loss``'s, also with the MoE balance loss on, with gradient accumulation, and with
pp 2 x FSDP over 2 data ranks; the MoE expert loads, the validation loss, the gathered state dict; the split
rule and the layout errors."""

from __future__ import annotations

import pytest
import torch

from dsfs.errors import ConfigError
from dsfs.parallel import pp
from dsfs.parallel.layout import PP_SCHEDULES
from tests.parallel.harness import spawn
from tests.parallel.oracle import TOL, full_tensor, global_batch, max_error, parallel_model

MTP_WEIGHT = 0.3


def reference(overrides: dict, ids: torch.Tensor, targets: torch.Tensor) -> dict:
    """The single-process step: metrics, gradients and expert loads by name, the state dict before the step."""
    model = parallel_model(**overrides)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    out = model.loss(ids, targets, mtp_weight=MTP_WEIGHT)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    loads = {n: b.clone() for n, b in model.named_buffers() if n.endswith("expert_load")}
    metrics = {"loss": out.loss.item(), "lm_loss": out.lm_loss.item(), "aux_loss": out.aux_loss.item(),
               "mtp_loss": torch.stack(out.mtp_losses).mean().item()}
    return {"metrics": metrics, "grads": grads, "loads": loads, "state": state}


def gather_by_name(tensors: dict, layout) -> tuple[dict, float]:
    """This pipeline's tensors by name from every pp rank (``all_gather_object``), and the largest difference
    between two stages' copies of one name (the tied embedding)."""
    import torch.distributed as dist

    got = [None] * layout.size("pp")
    dist.all_gather_object(got, tensors, group=layout.group("pp"))
    merged, copies = {}, 0.0
    for part in got:
        for k, v in part.items():
            if k in merged:
                copies = max(copies, float((merged[k] - v).abs().max()))
            merged[k] = v
    return merged, copies


def dp_mean(values: list[float], layout) -> list[float]:
    """The means over the data ranks (each holds its own rows' metrics)."""
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, group=layout.group("dp"))
    return (t / layout.size("dp")).tolist()


def case(schedule: str, degree: int, overrides: dict, fsdp: bool = False, accum: int = 1) -> dict:
    """One pipeline run on this process group (pp ``degree``, the other ranks data ranks, FSDP over them when
    ``fsdp``, ``accum`` micro-steps): its errors against `reference`."""
    import torch.distributed as dist

    from dsfs.parallel.layout import Layout, ParallelDims

    dims = ParallelDims(world_size=dist.get_world_size(), pp=degree, pp_schedule=schedule)
    layout = Layout.build(dims, torch.device("cpu"))
    n_mb = dims.microbatches()
    ids, targets = global_batch(parallel_model(**overrides).config, n_mb * dims.dp * accum, 16)
    want = reference(overrides, ids, targets)
    rows = ids.shape[0] // dims.dp
    mine = slice(layout.rank("dp") * rows, (layout.rank("dp") + 1) * rows)
    parts, stage_ids = pp.split_model(parallel_model(**overrides), layout.mesh["pp"], schedule)
    if fsdp:
        from dsfs.parallel.fsdp import apply_fsdp

        for part in parts:
            apply_fsdp(part, layout, 3)
    pipe = pp.Pipeline(parts, stage_ids, layout, n_mb)
    ms = [pipe.step(x, y, MTP_WEIGHT, accum) for x, y in zip(ids[mine].chunk(accum), targets[mine].chunk(accum),
                                                               strict=True)]
    grads = {n: full_tensor(p.grad).detach().clone() for part in parts for n, p in part.named_parameters()
             if p.grad is not None}
    grads, copies = gather_by_name(grads, layout)
    grad_err, where = max_error(grads, want["grads"])
    m = dict(zip(want["metrics"], dp_mean([sum(x[k] for x in ms) / accum for k in want["metrics"]], layout),
                 strict=True))
    res = {"grad": grad_err, "where": where, "copies": copies, "stage_ids": stage_ids, "metrics": m,
           "metric": max(abs(m[k] - v) for k, v in want["metrics"].items())}
    for part in parts:  # as the trainer evaluates: eval mode (no expert loads counted), no gradients
        part.eval()
    with torch.no_grad():
        res["eval"] = abs(dp_mean([pipe.eval_loss(ids[mine], targets[mine])], layout)[0] - want["metrics"]["lm_loss"])
    loads = {n: b.clone() for part in parts for n, b in part.named_buffers() if n.endswith("expert_load")}
    for b in loads.values():
        dist.all_reduce(b, group=layout.group("dp"))
    res["loads"] = max_error(gather_by_name(loads, layout)[0], want["loads"])[0]
    if accum == 1:  # the stages' state gathered whole for final/ (`dsfs.parallel.checkpoint`): the full model's names
        from dsfs.parallel.checkpoint import full_model_state

        state = full_model_state(parts, layout)
        if state is not None:
            assert set(state) == set(want["state"]), sorted(set(state) ^ set(want["state"]))
            res["state"] = max_error(state, want["state"])[0]
    return res


def run_cases(cases: dict) -> dict:
    """Each named ``(schedule, pp, overrides, fsdp, accum)`` case (`case`) on this process group."""
    return {name: case(*args) for name, args in cases.items()}


AUX = {"aux_loss_alpha": 0.01}  # every case with the MoE balance loss on: the stages before the last carry it
DEEP = {**AUX, "num_hidden_layers": 8}  # pp 4: 8 stages of the two-stage schedules, a layer each
CASES = {**{f"{s}-pp4": (s, 4, DEEP) for s in PP_SCHEDULES},
         "ZBVZeroBubble-pp2-fsdp2": ("ZBVZeroBubble", 2, AUX, True),
         "Interleaved1F1B-pp2-fsdp2-accum2": ("Interleaved1F1B", 2, AUX, True, 2)}


@pytest.fixture(scope="module")
def results():
    """The cases on 4 processes (one spawn): rank r's results, r = pp rank x (4 / pp) + data rank."""
    return spawn(4, run_cases, CASES)


def check(ranks: list[dict], name: str) -> None:
    runs = [r[name] for r in ranks]
    r = runs[0]
    assert r["grad"] <= TOL, f"{name}: gradient error {r['grad']:.3g} at {r['where']}"
    assert r["copies"] == 0.0, f"{name}: the tied embedding's copies differ by {r['copies']:.3g}"
    assert r["metric"] <= TOL, f"{name}: metrics {r['metrics']}"
    assert r["loads"] == 0.0, f"{name}: expert loads differ by {r['loads']}"
    assert r["eval"] <= TOL, f"{name}: validation loss error {r['eval']:.3g}"
    assert r.get("state", 0.0) == 0.0, f"{name}: gathered state dict differs by {r['state']}"
    assert all(x["metrics"] == r["metrics"] for x in runs), f"{name}: metrics differ over ranks"


@pytest.mark.parametrize("name", list(CASES))
def test_pp_matches_single_process(results, name):
    schedule, degree = CASES[name][:2]
    dp = 4 // degree
    for ranks in (results[i::dp] for i in range(dp)):  # each data rank's pipeline: world ranks i, i + dp, ...
        check(ranks, name)
        assert [r[name]["stage_ids"] for r in ranks] == [pp.rank_stages(schedule, degree, r) for r in range(degree)]


def test_aux_loss_is_counted(results):
    assert all(r["metrics"]["aux_loss"] > 1e-3 for r in results[0].values())


class _Mesh:
    """The two things `split_model` asks of a pp mesh."""

    def __init__(self, size: int, rank: int):
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def get_local_rank(self) -> int:
        return self._rank


def test_split_names_and_placement():
    model = parallel_model()
    names = {n for n, _ in model.named_parameters()}
    got, layers = set(), []
    for rank in range(2):
        parts, ids = pp.split_model(model, _Mesh(2, rank), "DualPipeV")
        assert ids == [rank, 3 - rank]
        for part in parts:
            own = {n for n, _ in part.named_parameters()}
            assert own <= names
            got |= own
            layers.append((part.stage_index, list(part.layer_ids)))
            assert (part.model.embed_tokens is not None) == (part.is_first or part.is_last)
            assert (part.lm_head is not None) == part.is_last and len(part.mtp) == part.is_last
            if part.is_last:
                assert part.lm_head.weight is part.model.embed_tokens.weight
    assert got == names
    assert sorted(layers) == [(0, [0]), (1, [1]), (2, [2]), (3, [3])]


def test_stage_layers_rule():
    assert pp.stage_layers(4, 1, 2) == [range(0, 3), range(3, 4)]
    assert [len(r) for r in pp.stage_layers(61, 1, 8)] == [8] * 6 + [7, 6]
    assert pp.stage_layers(7, 0, 3) == [range(0, 3), range(3, 5), range(5, 7)]
    assert pp.stage_layers(5, 3, 2) == [range(0, 4), range(4, 5)]


def test_layout_errors():
    model = parallel_model(num_hidden_layers=3)
    with pytest.raises(ConfigError, match="4 pipeline stages for 3 decoder layers"):
        pp.split_model(model, _Mesh(2, 0), "ZBVZeroBubble")
    with pytest.raises(ConfigError, match="expected one of"):
        pp.split_model(model, _Mesh(2, 0), "GPipe")
    with pytest.raises(ConfigError, match="at least 4 microbatches"):
        pp.check_microbatches("DualPipeV", 2, 3)
    with pytest.raises(ConfigError, match="multiple of pp 2"):
        pp.check_microbatches("Interleaved1F1B", 2, 5)
