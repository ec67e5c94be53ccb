"""The planner (`dsfs.parallel.plan`) against measurements of real `ParallelTrainer` steps on 2 gloo processes.

Each case builds the equality tests' model (`tests.parallel.oracle`) under one layout, takes one step (so the
optimizer state exists), then measures a second step, ``micro_step`` and ``optimizer_step`` unchanged:

- bytes communicated: a dispatch mode (`CollectiveBytes`, as torch's ``CommDebugMode``) sees every c10d collective
  the step runs (FSDP's, DDP's reducer's, ZeroRedundancyOptimizer's, DTensor's, the functional collectives of EP and
  CP, DistributedMuon's) with its tensors, process group and split sizes, and converts each to the bytes the rank
  sends by the planner's convention (ring algorithms), summed per collective kind (``torch.profiler`` with
  ``record_shapes`` records the same calls, at several times the cost). Every group here is the 2 processes, so mesh
  dimensions cannot be told apart: kinds are compared. Scalars (<= 8 elements: loss metrics, gradient norms, EP's
  split counts) are left out on both sides.
- memory: ``torch.distributed._tools.mem_tracker.MemTracker`` (a dispatch mode tracking every storage by category)
  for parameters and optimizer state before the step, gradients after backward, the total at the end of forward and
  the peak; activations as the storages autograd's saved-tensor hooks receive during forward (parameters excluded),
  "what autograd saves for backward" itself. DDP (ZeRO-1) rebuilds its gradient buckets in its second iteration
  (in the order the gradients became ready in the first), so the measured step allocates them inside the tracker,
  as a steady-state step holds them.

Layouts: ZeRO-3, ZeRO-2, EP 2 (with FSDP), ZeRO-1 (DDP + ZeroRedundancyOptimizer), TP 2 (sequence parallel), CP 2
with Muon (FSDP over the context ranks, DistributedMuon's gathers and broadcasts); both ranks of each. Pipeline
parallelism is not measured (`ParallelTrainer` could not build a pipeline yet when this was written; a "pp2" case
fits here once it can). The EP case feeds the planner the run's own routing (rows per token from the routers' top-k,
ep.py's dedupe); `uniform_routing`, the planner's default, is checked against ep.py's `dispatch_volume` and the
report's node limit. The activation formulas are also checked in one process under bf16 autocast and FP8 training
(with and without autocast) against autograd's saved-tensor hooks. One spawn runs every case.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dsfs.parallel.layout import ParallelDims
from tests.parallel.harness import spawn
from tests.parallel.oracle import global_batch, parallel_config, parallel_model

BATCH, SEQ = 4, 32
TOL = 0.10
CASES = {"zero3": dict(zero=3), "zero2": dict(zero=2), "ep2": dict(ep=2), "zero1": dict(zero=1),
         "tp2": dict(dp_shard=1, tp=2), "cp2-muon": dict(dp_shard=1, cp=2)}
KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "broadcast", "send/recv")


# ---------------------------------------------------------------------------------------------- measuring
def _bytes(x) -> int:
    """Bytes of a tensor or a (nested) list of tensors."""
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    return sum(_bytes(y) for y in x)


def _elements(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel()
    return sum(_elements(y) for y in x)


def _group(args):
    """The process group of a c10d op's arguments (a boxed ``ProcessGroup``, or a functional collective's group
    name)."""
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _resolve_process_group

    for a in args:
        if type(a).__name__ == "ScriptObject":
            return dist.ProcessGroup.unbox(a)
    return _resolve_process_group(next(a for a in reversed(args) if isinstance(a, str)))


_COLLECTIVES = {
    "c10d._allgather_base_": ("all-gather", 1), "c10d.allgather_": ("all-gather", 1),
    "c10d.allgather_into_tensor_coalesced_": ("all-gather", 1),
    "_c10d_functional.all_gather_into_tensor": ("all-gather", 0),
    "_c10d_functional.all_gather_into_tensor_coalesced": ("all-gather", 0),
    "c10d._reduce_scatter_base_": ("reduce-scatter", 1), "c10d.reduce_scatter_": ("reduce-scatter", 1),
    "c10d.reduce_scatter_tensor_coalesced_": ("reduce-scatter", 1),
    "_c10d_functional.reduce_scatter_tensor": ("reduce-scatter", 0),
    "_c10d_functional.reduce_scatter_tensor_coalesced": ("reduce-scatter", 0),
    "c10d.allreduce_": ("all-reduce", 0), "c10d.allreduce_coalesced_": ("all-reduce", 0),
    "_c10d_functional.all_reduce": ("all-reduce", 0), "_c10d_functional.all_reduce_coalesced": ("all-reduce", 0),
    "c10d.broadcast_": ("broadcast", 0), "_c10d_functional.broadcast": ("broadcast", 0),
    "c10d.alltoall_base_": ("all-to-all", 1), "_c10d_functional.all_to_all_single": ("all-to-all", 0),
    "c10d.send": ("send/recv", 0)}
"""The collective ops: their kind and the argument holding the buffer the convention counts (module docstring)."""


class CollectiveBytes(TorchDispatchMode):
    """Bytes this rank sends per collective kind, counted from every c10d collective the dispatcher runs while
    active (FSDP's, DDP's reducer's, ZeroRedundancyOptimizer's, DTensor's and EP's functional collectives), the way
    torch's ``CommDebugMode`` sees them, converted by the planner's convention (module docstring): all-gather
    ``(n-1)/n`` of the gathered buffer, reduce-scatter ``(n-1)/n`` of its input, all-reduce ``2 (n-1)/n``, broadcast
    ``(n-1)/n``, all-to-all the input rows that leave the rank (its split sizes), a send its tensor. Calls of at most
    8 elements (scalars) are left out."""

    def __init__(self):
        super().__init__()
        self.sent = dict.fromkeys(KINDS, 0.0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = f"{func.namespace}.{func.__name__.split('.')[0]}"
        spec = _COLLECTIVES.get(name)
        if spec is not None:
            kind, i = spec
            g = _group(args)
            n, buf = g.size(), args[i]
            b = _bytes(buf)
            if kind == "all-gather":
                sent = (n - 1) * b  # the input is one rank's share
            elif kind in ("reduce-scatter", "broadcast"):
                sent = (n - 1) / n * b
            elif kind == "all-reduce":
                sent = 2 * (n - 1) / n * b
            elif kind == "all-to-all":
                splits = args[4] if name.startswith("c10d") else args[2]
                sent = b - (b / n if not splits else b * splits[g.rank()] / max(sum(splits), 1))
            else:
                sent = b
            if _elements(buf) > 8:
                self.sent[kind] += sent
        return func(*args, **(kwargs or {}))


class _Root(torch.nn.Module):
    """A module whose forward is the model's ``loss`` method (the trainer calls ``parts[0].loss``): a forward hook on
    it marks the end of the forward."""

    def __init__(self, loss):
        super().__init__()
        self.fn = loss

    def forward(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


def _tracker():
    """``MemTracker`` keeping the device's peak only (its per-module peaks cost a loop over every module per op) and
    accepting a root module called again within the step (``Model.loss`` calls ``rotary`` twice; the tracker refuses
    a root module called twice): that module's own statistics start over. The memory accounting is unchanged."""
    from torch.distributed._tools.mem_tracker import MemTracker

    class Tracker(MemTracker):
        def _update_peak_stats(self, peak_state):  # the device's peak only (not every module's: per op, slow)
            for dev, snap in self._curr_mem_snap.items():
                if self._peak_mem.get(dev, 0) < snap["Total"]:
                    self._peak_mem[dev] = snap["Total"]
                    self._peak_mem_snap[dev] = dict(snap)

        def _pre_fw_hook(self, module, inputs):
            if module in self.memory_tracking and not self._mod_tracker.is_bw:
                name = self._mod_tracker.get_known_fqn(module)
                if set(self._mod_tracker.parents) - {name} == {"Global"}:
                    del self.memory_tracking[module]
            super()._pre_fw_hook(module, inputs)

    return Tracker()


def _storages(t: torch.Tensor) -> dict[int, int]:
    """``t``'s storages (a wrapper subclass's inner tensors: DTensor, the functional collectives' results) by data
    pointer, with their bytes."""
    from torch.distributed._tools.common_utils import get_untyped_storages

    return {st.data_ptr(): st.nbytes() for st in get_untyped_storages(t)}


class SavedBytes:
    """Autograd's saved-tensor hooks counting the storages saved for backward, each once, those of ``params()``
    (the parameters, unsharded or local views of them included) left out."""

    def __init__(self, params):
        self.params, self.saved = params, {}

    def pack(self, t):
        own = {}
        for p in self.params():
            own.update(_storages(p))
        self.saved.update({k: v for k, v in _storages(t).items() if k not in own})
        return t

    def __enter__(self):
        self.ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self.ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self.ctx.__exit__(*exc)

    @property
    def bytes(self) -> float:
        return float(sum(self.saved.values()))


def routing_stats(topk: list[torch.Tensor], cfg, ep: int, group_rank: int):
    """This rank's measured EP dispatch per token (a `dsfs.parallel.plan.Routing`), averaged over the MoE layers:
    ``topk`` the routers' (N, K) expert ids of this rank's tokens, one per layer in call order (ep.py's dedupe: one row
    per token and destination rank). Collective: gathers every rank's routing."""
    import torch.distributed as dist

    from dsfs.parallel.plan import Routing

    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, [t.cpu() for t in topk])
    per = cfg.n_routed_experts // ep
    rows = self_rows = pairs = recv = 0.0
    for layer in range(len(topk)):
        for src, ts in enumerate(everyone):
            dest = ts[layer] // per  # (N, K)
            hit = torch.zeros(dest.shape[0], ep, dtype=torch.bool).scatter_(1, dest, True)
            if src == group_rank:
                rows += int(hit.sum())
                self_rows += int(hit[:, group_rank].sum())
            recv += int(hit[:, group_rank].sum())
            pairs += int((dest == group_rank).sum())
    n = topk[0].shape[0] * len(topk)
    return Routing(rows / n, self_rows / n, pairs / n, recv / n)


def measure(dims_kw: dict, optimizer: str) -> dict:
    """One case on this process group (module docstring): this rank's memory by category (bytes), bytes sent per
    collective kind, its pipeline rank and (EP) its routing."""
    import torch.distributed as dist

    from dsfs.parallel.layout import Layout
    from dsfs.parallel.trainer import ParallelTrainer
    from dsfs.train_config import TrainConfig

    layout = Layout.build(ParallelDims(world_size=dist.get_world_size(), **dims_kw), torch.device("cpu"))
    model = parallel_model()
    tc = TrainConfig(batch_size=BATCH, seq_len=SEQ, lr=1e-3, min_lr_ratio=0.0, warmup_steps=0, max_steps=2,
                     time_budget_s=None, weight_decay=0.1, grad_clip=1.0, grad_accum=1, eval_every=2, eval_batches=1,
                     mtp_weight=0.3, optimizer=optimizer)
    tr = ParallelTrainer(model, layout, tc)
    data = [dict(zip(("input_ids", "targets"), global_batch(model.config, BATCH, SEQ, seed=s), strict=True))
            for s in range(2)]
    tr.micro_step(data[0], 1)  # the first step creates the optimizer state
    tr.optimizer_step(1e-3)

    mt = _tracker()
    mt.track_external(tr.model, *(getattr(o, "optim", o) for o in tr.optimizers))  # ZeRO-1: its local optimizer
    marks = {}
    root = tr.ddp if tr.ddp is not None else None
    if root is None and tr.pipeline is None:
        root = _Root(tr.parts[0].loss)
        object.__setattr__(tr.parts[0], "loss", root)
    if root is not None:
        root.register_forward_hook(lambda *a: marks.update(fwd=mt.get_tracker_snapshot()))
    topk = []
    for m in tr.moe_layers():
        m.gate.register_forward_hook(lambda mod, args, out: topk.append(out[0].detach()) and None)
    counter = CollectiveBytes()
    with mt, counter:
        start = mt.get_tracker_snapshot()
        with SavedBytes(lambda: [p for part in tr.parts for p in part.parameters()]) as saved:
            tr.micro_step(data[1], 1)
        after = mt.get_tracker_snapshot()
        tr.optimizer_step(1e-3)
    peak = mt.get_tracker_snapshot("peak")

    def cat(snap, *names):
        d = next(iter(snap.values()))
        return float(sum(v for k, v in d.items() if str(k).split(".")[-1] in names))

    out = {"pp_rank": layout.rank("pp"), "params": cat(start, "PARAM"), "optimizer": cat(start, "OPT"),
           "grads": cat(after, "GRAD", "TEMP"), "activations": saved.bytes, "peak": cat(peak, "Total"),
           "comm": counter.sent}
    if "fwd" in marks:
        out["forward end"] = cat(marks["fwd"], "Total")
    if layout.dims.ep > 1:
        out["routing"] = routing_stats(topk, model.config, layout.dims.ep, layout.rank("ep"))
    return out


def run_cases(cases: dict) -> dict:
    """`measure` of each case, on every rank."""
    return {name: measure(dims, "muon" if name.endswith("muon") else "adamw") for name, dims in cases.items()}


# ---------------------------------------------------------------------------------------------- predicting
def predicted(name: str, pp_rank: int = 0, routing=None) -> dict:
    """The planner's numbers for case ``name`` and pipeline rank ``pp_rank``, in the measurement's terms."""
    from dsfs.parallel.plan import TrainShape, plan

    dims = ParallelDims(world_size=2, **CASES[name])
    shape = TrainShape(BATCH, SEQ, optimizer="muon" if name.endswith("muon") else "adamw", precision="fp32",
                       device="cpu")
    rank = plan(parallel_config(), dims, shape, routing=routing).ranks[pp_rank]
    m, comm = rank.memory, dict.fromkeys(KINDS, 0.0)
    for c in rank.comm:
        if c.elements > 8:
            comm[c.kind] += c.bytes
    out = {"params": m.params, "optimizer": m.optimizer, "grads": m.grads, "activations": m.activations,
           "peak": m.peak, "comm": comm}
    if dims.pp == 1:  # the whole forward at once: activations as saved, and the total when it ends
        out["forward end"] = m.params + m.optimizer + m.buckets + m.activations + m.gathered
    else:  # microbatches interleave (storages of one reused by the next): the peak holds those in flight
        del out["activations"]
    return out


def compare(measured: dict, name: str) -> list[tuple[str, float, float, float]]:
    """(category, measured, predicted, relative error) for every memory category and collective kind of one rank."""
    want = predicted(name, measured["pp_rank"], measured.get("routing"))
    rows = [(k, measured[k], want[k]) for k in ("params", "grads", "optimizer", "activations", "forward end", "peak")
            if k in measured and k in want]
    rows += [(f"comm {k}", measured["comm"][k], want["comm"][k]) for k in KINDS
             if measured["comm"][k] or want["comm"][k]]
    return [(k, a, b, abs(b - a) / max(a, 1.0)) for k, a, b in rows]


@pytest.fixture(scope="module")
def measured():
    return spawn(2, run_cases, CASES)


@pytest.mark.parametrize("name", list(CASES))
def test_plan_matches_measurement(measured, name):
    """Every memory category, the peak and the bytes of every collective kind, on each of the 2 ranks, within 10%."""
    for r, res in enumerate(measured):
        bad = [row for row in compare(res[name], name) if row[3] > TOL]
        assert not bad, f"{name}, rank {r}: " + "; ".join(
            f"{k}: measured {a:,.0f}, predicted {b:,.0f} ({e:.1%})" for k, a, b, e in bad)


# ---------------------------------------------------------------------------------------------- one process
@pytest.mark.parametrize("precision, device", [("fp32", "cpu"), ("bf16", "cpu"), ("fp8", "cpu"), ("fp8", "cuda")])
def test_activations_match_saved_tensors(precision, device):
    """`activation_bytes` against what autograd saves in one forward of ``Model.loss``: fp32, bf16 autocast, FP8
    training in an fp32 model (CPU) and FP8 training under bf16 autocast (what CUDA runs; autocast on CPU here)."""
    import contextlib

    from dsfs.parallel.plan import TrainShape, activation_bytes
    from reference.fp8_training import enable_fp8_training

    model = parallel_model()
    cfg = model.config
    if precision == "fp8":
        enable_fp8_training(model)
    shape = TrainShape(2, SEQ, precision=precision, device=device)
    ids, targets = global_batch(cfg, 2, SEQ)
    ac = torch.autocast("cpu", dtype=torch.bfloat16) if shape.autocast else contextlib.nullcontext()
    with SavedBytes(model.parameters) as saved, ac:
        model.loss(ids, targets)
    layers = list(range(cfg.num_hidden_layers + cfg.num_nextn_predict_layers))
    want = sum(activation_bytes(cfg, shape, ParallelDims(world_size=1), layers, 2, True, True).values())
    # bf16: autocast copies only the weights of experts that receive tokens (all of them on uniform routing)
    assert abs(want - saved.bytes) <= (0.01 if precision == "bf16" else 0.0) * saved.bytes, (saved.bytes, want)


# ---------------------------------------------------------------------------------------------- the model's numbers
V3_CONFIG = str(Path(__file__).resolve().parents[2] / "docs" / "deepseek_v3_config.json")
"""DeepSeek-V3's public config.json (the worked example's, docs/plan_v3_671b.md)."""


def v3_config():
    from dsfs.parallel.plan import load_config

    return load_config(None, V3_CONFIG)


def test_deepseek_v3_counts_and_node_limited_dispatch():
    """DeepSeek-V3's config.json: 671.0B parameters without MTP, 37.6B activated per token (the report: 671B and
    37B); under uniform routing a token reaches at most topk_group = 4 of 8 nodes (the report's node-limited
    routing: 4 groups kept, one group of 32 experts per node), and about 7.5 of 64 EP ranks."""
    from dsfs.parallel.plan import param_totals, uniform_routing

    cfg = v3_config()
    t = param_totals(cfg)
    assert round(t["main"] / 1e9, 1) == 671.0 and round(t["activated"] / 1e9, 1) == 37.6, t
    nodes = uniform_routing(cfg, 8)
    assert 3.8 < nodes.rows <= 4.0 and abs(nodes.self_rows - nodes.rows / 8) < 1e-9
    ranks = uniform_routing(cfg, 64)
    again = uniform_routing(cfg, 64, seed=1)
    assert 7.0 < ranks.rows < 8.0 and abs(ranks.rows - again.rows) < 0.02 * ranks.rows


def test_uniform_routing_is_ep_dispatch_volume():
    """The planner's rows per token are ep.py's `dispatch_volume` of `reference.moe.route`'s choices on random logits;
    one row per (token, rank): never more than the pairs, never fewer than one per token."""
    from dsfs.parallel.ep import dispatch_volume
    from dsfs.parallel.plan import uniform_routing
    from reference.moe import route

    cfg = parallel_config()
    g = torch.Generator().manual_seed(0)
    idx, _, _ = route(torch.randn(4096, 8, generator=g), torch.zeros(8), 2, cfg.n_group, cfg.topk_group)
    assert uniform_routing(cfg, 2).rows == dispatch_volume(idx, 8, 2, cfg.hidden_size).rows / 4096
    assert 1.0 <= uniform_routing(cfg, 4).rows <= cfg.num_experts_per_tok


# ---------------------------------------------------------------------------------------------- the command
def run_cli(*argv) -> str:
    """``dsfs plan ARGV`` through a parser of its own (`add_plan`), its printed table returned."""
    import contextlib
    import io

    from dsfs.parallel.plan import add_plan

    parser = argparse.ArgumentParser(prog="dsfs")
    add_plan(parser.add_subparsers(dest="verb"))
    args = parser.parse_args(["plan", *argv])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert args.func(args) == 0
    return out.getvalue()


def test_cli_plans_the_v3_layout():
    """The worked example's command (docs/plan_v3_671b.md): ZeRO-1 with pipeline and expert parallelism is planned
    (dsfs train does not run it), both pipeline ranks that differ are shown with the peak."""
    text = run_cli("--config", V3_CONFIG, "--nproc", "2048", "--pp", "16", "--ep", "64",
                   "--zero", "1", "--pp-schedule", "DualPipeV", "--pp-microbatches", "120", "--batch-size", "15360",
                   "--seq-len", "4096", "--precision", "fp8")
    assert "671.0B main" in text and "pp rank 0 (stages 0, 31)" in text and "peak" in text
    assert "EP dispatch" in text and "ZeRO-1 updated parameters" in text and "dsfs train runs ZeRO-1" in text


def test_cli_defaults_and_errors():
    """A preset plans with its training options; a layout that does not fit the world, the model or the batch, and
    a missing config, are `ConfigError`s naming the option."""
    from dsfs.errors import ConfigError

    assert "every rank" in run_cli("--preset", "tiny", "--nproc", "2")
    for argv, msg in ((("--preset", "tiny", "--nproc", "4", "--tp", "3"), "world size"),
                      (("--preset", "tiny", "--nproc", "2", "--ep", "3"), "--ep"),
                      (("--preset", "tiny", "--nproc", "2", "--batch-size", "3"), "--batch-size"),
                      (("--config", "no/such/dir"), "--config")):
        with pytest.raises(ConfigError, match=msg):
            run_cli(*argv)


if __name__ == "__main__":
    import time

    t = time.time()
    res = spawn(2, run_cases, CASES)
    print(f"{time.time() - t:.1f} s")
    for name in CASES:
        for r, rr in enumerate(res):
            print(f"--- {name}, rank {r} (pp rank {rr[name]['pp_rank']}) routing {rr[name].get('routing')}")
            for k, a, b, e in compare(rr[name], name):
                print(f"  {k:<26} {a:>12,.0f} {b:>12,.0f} {e:>7.1%}")
