"""Pipeline parallelism over the ``pp`` ranks with ``torch.distributed.pipelining`` (``PipelineStage`` and the
schedules of `dsfs.parallel.layout.PP_SCHEDULES`: ``Schedule1F1B``, ``ScheduleInterleaved1F1B``,
``ScheduleZBVZeroBubble``, ``ScheduleDualPipeV``).

Use, in torchtitan's order: `split_model` (this rank's stage modules), then tensor, expert and data parallelism on
each stage module, then `Pipeline` (the ``PipelineStage`` objects and the schedule) and ``Pipeline.step`` per
micro-batch.

- Stages are contiguous ranges of decoder layers (`stage_layers`); the first stage holds the embedding, the last
  the final norm, the LM head and the MTP layers. "1F1B" runs one stage per rank; "Interleaved1F1B" two per rank in
  loop order (rank ``r``: stages ``r`` and ``r + pp``); "ZBVZeroBubble" and "DualPipeV" two per rank in V order
  (rank ``r``: stages ``r`` and ``2 pp - 1 - r``).
- A stage module (`StageModel`) keeps the parameter names (FQNs) of the full ``reference.Model``: ``model.layers`` is
  a ``ModuleList`` of the full length whose absent layers are parameterless `AbsentLayer` placeholders, so DCP
  checkpoints written under one layout load under another.
- The loss of a micro-batch is computed inside the last stage's forward (it gets the targets and the input ids as
  the keyword ``labels``: MTP depth ``k`` embeds the tokens ``k`` ahead); the schedule's loss function returns it.
  Each micro-batch's loss is weighted by its share of the rank's valid targets (``count_mb / count_all``), so the
  accumulated gradients are those of the mean loss over the rank's rows, as ``Model.loss`` on those rows gives
  (the schedules' own ``1 / n_microbatches`` scaling is off: ``scale_grads=False``).
- Tied embedding (``tie_word_embeddings``; the last stage's MTP also embeds tokens): the first and the last stage
  each hold a copy of ``model.embed_tokens.weight``; after backward their gradients are summed over the
  "embedding group" (the two ranks of one pipeline that hold them, Megatron-LM's embedding group), so the copies
  get the full gradient and stay equal after each optimizer step.
- MoE auxiliary (balance) losses of stages before the last: an identity on the stage output whose backward also
  back-propagates the stage's balance loss (Megatron-LM's ``MoEAuxLossAutoScaler``), weighted ``1 / n_microbatches``
  (the sequence-wise loss is a mean over rows).
"""

from __future__ import annotations

import contextlib
import copy

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import pipelining
from torch.distributed.pipelining import PipelineStage

from dsfs.errors import ConfigError
from dsfs.parallel.layout import PP_SCHEDULES

IGNORE_INDEX = -100
V_SCHEDULES = ("ZBVZeroBubble", "DualPipeV")


# ---------------------------------------------------------------------------------------------- the split
def stages_per_rank(schedule: str) -> int:
    """Stages a rank holds under ``schedule`` (1 for "1F1B", 2 for the others). Raises `ConfigError` for a name not
    in `PP_SCHEDULES`."""
    if schedule not in PP_SCHEDULES:
        raise ConfigError(f"--pp-schedule {schedule}: expected one of {', '.join(PP_SCHEDULES)}")
    return 1 if schedule == "1F1B" else 2


def rank_stages(schedule: str, pp: int, rank: int) -> list[int]:
    """The stage indices pipeline rank ``rank`` of ``pp`` holds under ``schedule``, ascending (module docstring);
    the mapping of ``torch.distributed.pipelining``'s loop ("1F1B", "Interleaved1F1B") and V schedules."""
    if stages_per_rank(schedule) == 1:
        return [rank]
    if schedule in V_SCHEDULES:
        return [rank, 2 * pp - 1 - rank]
    return [rank, rank + pp]


def stage_layers(n_layers: int, n_mtp: int, n_stages: int) -> list[range]:
    """The decoder layers of each of ``n_stages`` stages: contiguous ranges covering ``range(n_layers)``, each
    stage at least one layer.

    Balance: the ``n_layers + n_mtp`` layer-sized chunks (the decoder layers, then the MTP layers, which live on
    the last stage) are spread as evenly as possible, the extra chunks on the earliest stages (the last stage also
    runs the final norm and the LM head; the first stage's embedding is a lookup); the last stage keeps at least one
    decoder layer, the others then share the rest evenly. E.g. 61 layers + 1 MTP over 8 stages: 8 x 6, 7, and 6
    (+ MTP); 4 + 1 over 2: 3 and 1 (+ MTP); 7 + 0 over 3: 3, 2, 2. Raises `ConfigError` when there are more stages
    than decoder layers."""
    if n_stages > n_layers:
        raise ConfigError(f"{n_stages} pipeline stages for {n_layers} decoder layers (num_hidden_layers): expected at "
                          f"most one stage per layer (lower --pp, or use the 1F1B schedule: one stage per rank)")
    s, units = n_stages, n_layers + n_mtp
    last = max(1, units // s - n_mtp) if s > 1 else n_layers
    rest = n_layers - last
    sizes = [rest // (s - 1) + (i < rest % (s - 1)) for i in range(s - 1)] + [last] if s > 1 else [n_layers]
    starts = [sum(sizes[:i]) for i in range(s)]
    return [range(a, a + n) for a, n in zip(starts, sizes, strict=True)]


class AbsentLayer(nn.Module):
    """The place of decoder layer ``layer_idx`` in a stage that does not hold it: no parameters, so the stage's
    parameter names keep their layer indices. Calling it raises ``RuntimeError``."""

    def __init__(self, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx

    def forward(self, *args, **kwargs):
        raise RuntimeError(f"decoder layer {self.layer_idx} lives on another pipeline stage")


class StageBackbone(nn.Module):
    """The ``model.*`` part of a stage: ``embed_tokens`` (or None), ``layers`` (full-length ``ModuleList``, absent
    layers `AbsentLayer`), ``norm`` (or None)."""

    def __init__(self, embed_tokens, layers: nn.ModuleList, norm):
        super().__init__()
        self.embed_tokens, self.layers, self.norm = embed_tokens, layers, norm


class _AuxLossCarrier(torch.autograd.Function):
    """Identity on ``h`` (a copy) whose backward also gives ``aux`` the gradient ``scale``: the balance loss of a
    stage before the last reaches the backward without reaching the schedule's loss (Megatron-LM's
    ``MoEAuxLossAutoScaler``)."""

    @staticmethod
    def forward(ctx, h, aux, scale: float):
        ctx.scale = scale
        ctx.aux_meta = (aux.shape, aux.dtype, aux.device)
        return h.clone()  # not ``h`` itself: a returned input is a view, and the pipeline detaches stage outputs

    @staticmethod
    def backward(ctx, grad):
        shape, dtype, device = ctx.aux_meta
        return grad, torch.full(shape, ctx.scale, dtype=dtype, device=device), None


class StageModel(nn.Module):
    """Pipeline stage ``stage_index`` of ``n_stages`` of a ``reference.Model`` (or ``runtime_cuda.Model``): decoder
    layers ``layer_ids``; the embedding on the first stage, the final norm, LM head and MTP layers on the last (and
    the embedding there too when the head is tied to it or MTP embeds tokens). Parameter and buffer names are the
    full model's. Built by `split_model` (copies of the model's modules).

    ``forward(x, labels=None)``: the first stage takes the (B, T) int64 token ids, the others the (B, T, hidden)
    hidden states of the stage before; a stage before the last returns (B, T, hidden) hidden states; the last stage
    returns the weighted loss (1,) of the micro-batch (`Pipeline`), ``labels`` (B, 2, T) int64 the targets and the
    input ids. `Pipeline` sets ``pp_ctx`` before each run (``n`` microbatches, ``accum``, ``train``, ``mtp_weight``,
    ``lm_total`` and ``mtp_totals``: the valid targets of all the rows, 0-d tensors) and reads ``pp_records`` (per
    microbatch: the weighted LM, MTP and balance losses, detached).
    """

    def __init__(self, model: nn.Module, stage_index: int, n_stages: int, layer_ids: range):
        super().__init__()
        c = model.config
        self.config, self._impl = c, type(model)
        self.stage_index, self.n_stages, self.layer_ids = stage_index, n_stages, layer_ids
        self.is_first, self.is_last = stage_index == 0, stage_index == n_stages - 1
        embed = head = norm = None
        if self.is_last:
            embed, head, norm, mtp = copy.deepcopy((model.model.embed_tokens, model.lm_head, model.model.norm,
                                                    model.mtp))  # one deepcopy: a tied head stays tied
            if not (c.tie_word_embeddings or len(mtp) or self.is_first):
                embed = None
        else:
            mtp = nn.ModuleList()
            if self.is_first:
                embed = copy.deepcopy(model.model.embed_tokens)
        layers = nn.ModuleList(copy.deepcopy(layer) if i in layer_ids else AbsentLayer(i)
                               for i, layer in enumerate(model.model.layers))
        self.model = StageBackbone(embed, layers, norm)
        self.lm_head, self.mtp = head, mtp
        self.rotary = copy.deepcopy(model.rotary)
        self.cross_entropy = model.cross_entropy  # the fused head + cross-entropy of the model's runtime
        # the zero-bubble schedules split backward into input and weight passes (torch's stage_backward_input /
        # _weight); a weight used both before and after the stage's input path (the tied head: MTP's embedding
        # lookup and the heads' cross-entropies) makes the weight pass re-run that path: such a stage runs whole
        self.split_backward = not (self.is_last and len(mtp) and head is not None and embed is not None
                                   and head.weight is embed.weight)
        self.pp_ctx: dict = {}
        self.pp_records: list[torch.Tensor] = []
        self.pp_probe = False

    def moe_layers(self) -> list[nn.Module]:
        """The MoE FFNs this stage holds (its decoder layers', then its MTP layers')."""
        return self._impl.moe_layers(self)

    @torch.no_grad()
    def update_moe_bias(self, gamma: float | None = None) -> None:
        """`reference.Model.update_moe_bias` on this stage's DeepSeekMoE layers (their ``expert_load`` counts)."""
        self._impl.update_moe_bias(self, gamma)

    def _aux(self) -> torch.Tensor | None:
        terms = [m.aux_loss for m in self.moe_layers() if getattr(m, "aux_loss", None) is not None]
        return torch.stack([a.float() for a in terms]).sum() if terms else None

    def _record(self, lm: torch.Tensor, mtp: torch.Tensor, aux: torch.Tensor) -> None:
        if not self.pp_probe:  # the schedule's metadata-inference probe is no micro-batch
            self.pp_records.append(torch.stack([v.detach().float() for v in (lm, mtp, aux)]))

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        ctx = self.pp_ctx
        if self.is_first:
            self._impl._check_input_ids(self, x, 0)
            h = self.model.embed_tokens(x)
        else:
            h = x
        cos, sin = self.rotary(h.shape[1], 0, h.device, h.dtype)
        for i in self.layer_ids:
            h = self.model.layers[i](h, cos, sin)
        n = ctx["n"]
        zero = torch.zeros((), device=h.device)
        if not self.is_last:
            aux = self._aux()
            if aux is not None:
                self._record(zero, zero, aux / n)
                if torch.is_grad_enabled():
                    h = _AuxLossCarrier.apply(h, aux, 1.0 / (n * ctx["accum"]))
            return h
        targets, ids = labels[:, 0], labels[:, 1]
        h = self.model.norm(h)
        lm = self._impl.lm_loss(self, h, targets) * (_valid(targets) / ctx["lm_total"])
        if not ctx["train"]:
            self._record(lm, zero, zero)
            return torch.stack((lm,))
        mtp = zero
        b, t = ids.shape
        for k, layer in enumerate(self.mtp, start=1):
            pad = ids.new_zeros(b, min(k, t))
            ahead = torch.cat((ids[:, k:], pad), dim=1)
            tgt = torch.cat((targets[:, k:], torch.full_like(pad, IGNORE_INDEX)), dim=1)
            h = layer(layer.combine(h, self.model.embed_tokens(ahead)), cos, sin)
            mtp = mtp + self._impl.lm_loss(self, layer.shared_head.norm(h), tgt) * (
                _valid(tgt) / ctx["mtp_totals"][k - 1])
        if len(self.mtp):
            mtp = mtp / len(self.mtp)
        aux = self._aux()
        aux = zero if aux is None else aux / n
        self._record(lm, mtp, aux)
        return torch.stack(((lm + ctx["mtp_weight"] * mtp + aux) / ctx["accum"],))  # stack, not a view


def _valid(targets: torch.Tensor) -> torch.Tensor:
    return (targets != IGNORE_INDEX).sum()


def split_model(model: nn.Module, pp_mesh, schedule: str) -> tuple[list[StageModel], list[int]]:
    """This pipeline rank's stage modules of ``model`` (a ``reference.Model`` / ``runtime_cuda.Model``, on its
    device, same weights on every rank) and their stage indices, ascending: `rank_stages` of ``schedule`` at
    ``pp_mesh``'s local rank, layers by `stage_layers`. Each `StageModel` holds copies of its modules under the
    full model's names; ``model`` itself is left as it was (drop it afterwards). Raises `ConfigError` for an unknown
    schedule or more stages than decoder layers."""
    pp, rank = pp_mesh.size(), pp_mesh.get_local_rank()
    n_stages = stages_per_rank(schedule) * pp
    ranges = stage_layers(model.config.num_hidden_layers, len(model.mtp), n_stages)
    ids = rank_stages(schedule, pp, rank)
    return [StageModel(model, s, n_stages, ranges[s]) for s in ids], ids


# ---------------------------------------------------------------------------------------------- the schedule
def check_microbatches(schedule: str, pp: int, n: int) -> None:
    """Raise `ConfigError` unless ``n`` microbatches fit ``schedule`` over ``pp`` ranks: at least the number of
    stages (``pp``, or ``2 pp`` for the two-stage schedules), and a multiple of ``pp`` for "Interleaved1F1B"."""
    n_stages = stages_per_rank(schedule) * pp
    if n < n_stages or (schedule == "Interleaved1F1B" and n % pp):
        extra = f" and a multiple of pp {pp}" if schedule == "Interleaved1F1B" else ""
        raise ConfigError(f"--pp-microbatches {n}: the {schedule} schedule over {n_stages} stages expects at least "
                          f"{n_stages} microbatches{extra}")


def _schedule_class(schedule: str):
    return getattr(pipelining, f"Schedule{schedule}")


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _pipeline_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The schedule's loss function: the last stage's output (1,) is its micro-batch's weighted loss already."""
    return output.sum()


class Pipeline:
    """This rank's pipeline stages of a model split by `split_model`, run by a ``torch.distributed.pipelining``
    schedule.

    ``parts``: the stage modules `split_model` returned, after tensor/expert/data parallelism were applied to each;
    ``stage_ids``: their stage indices; ``layout``: the run's `dsfs.parallel.layout.Layout` (its ``pp`` mesh and
    device; ``layout.dims.pp_schedule`` the schedule); ``n_microbatches``: micro-batches per `step`
    (`check_microbatches`). Collective: every rank of the world builds it (the embedding groups are new process
    groups). The ``PipelineStage`` objects and the schedule are built per micro-batch shape on first use (a
    training and an evaluation pair: the schedules infer the activation shapes from their first run). FSDP2 stage
    modules are set to keep their parameters gathered from forward to backward (``set_reshard_after_forward(False)``,
    torchtitan's default under pipeline parallelism: each layer runs once per microbatch, and re-gathering it for
    each would multiply the all-gathers; torch 2.15's ZBVZeroBubble schedule also computes wrong weight gradients
    when a layer is resharded between its input and weight backward). Raises
    `ConfigError` for a microbatch count the schedule cannot run, ``ValueError`` when the two copies of the tied
    embedding are laid out differently.
    """

    def __init__(self, parts: list[StageModel], stage_ids: list[int], layout, n_microbatches: int):
        self.parts, self.stage_ids, self.layout = list(parts), list(stage_ids), layout
        self.schedule_name, self.n = layout.dims.pp_schedule, n_microbatches
        self.pp_mesh, self.pp = layout.mesh["pp"], layout.size("pp")
        check_microbatches(self.schedule_name, self.pp, n_microbatches)
        self.n_stages = parts[0].n_stages
        self._schedules: dict = {}
        for part in self.parts:
            if hasattr(part, "set_reshard_after_forward"):  # an FSDP2 module: see the class docstring
                part.set_reshard_after_forward(False)
        self._embed_group = None
        self._embed_copies = self._embedding_copies()

    # ------------------------------------------------------------------ tied embedding
    def _embedding_copies(self) -> list[nn.Parameter]:
        """The embedding weights this rank holds as the first or the last stage's copy when the last stage holds one
        (`StageModel`), after building the embedding groups: each pipeline's two ranks that hold its first and last
        stage (none when one rank holds both)."""
        c = self.parts[0].config
        if self.n_stages == 1 or not (c.tie_word_embeddings or c.num_nextn_predict_layers > 0):
            return []
        first, last = (rank_stages_owner(self.schedule_name, self.pp, s) for s in (0, self.n_stages - 1))
        mine = [p.model.embed_tokens.weight for p in self.parts if p.is_first or p.is_last]
        if first == last:
            return mine
        pp_group = self.pp_mesh.get_group()
        pair = tuple(dist.get_global_rank(pp_group, r) for r in (first, last))
        pairs = [None] * dist.get_world_size()
        dist.all_gather_object(pairs, pair)  # every pipeline's pair: each rank builds every group, in one order
        for ranks in sorted(set(pairs)):
            group = dist.new_group(list(ranks))
            if ranks == pair and mine:
                self._embed_group = group
        if self._embed_group is not None:
            w = mine[0]
            info = (str(getattr(w, "placements", None)), tuple(_local(w).shape))
            got = [None, None]
            dist.all_gather_object(got, info, group=self._embed_group)
            if got[0] != got[1]:
                raise ValueError(f"the tied embedding's copies on the first and the last pipeline stage are laid out "
                                 f"differently ({got[0]} vs {got[1]}): parallelize both stages alike")
        return mine

    def duplicate_params(self) -> set[int]:
        """``id``s of this rank's parameters that copy another stage's (the last stage's copy of the embedding
        weight): a global gradient norm skips them so the embedding counts once."""
        return {id(p.model.embed_tokens.weight) for p in _last_embedding_holder(self.parts)}

    @torch.no_grad()
    def _sum_embedding_grads(self) -> None:
        if not self._embed_copies:
            return
        grads = [_local(w.grad) if w.grad is not None else None for w in self._embed_copies]
        grads = [g if g is not None else torch.zeros_like(_local(w)) for g, w in zip(grads, self._embed_copies,
                                                                                       strict=True)]
        total = grads[0] if len(grads) == 1 else grads[0].add_(grads[1])
        if self._embed_group is not None:
            dist.all_reduce(total, group=self._embed_group)
        for w, g in zip(self._embed_copies, grads, strict=True):
            if w.grad is None:
                w.grad = _wrap_like(w, total.clone())
            elif g is not total:
                g.copy_(total)

    def _clear_last_embedding_grads(self) -> None:
        for p in _last_embedding_holder(self.parts):
            p.model.embed_tokens.weight.grad = None

    # ------------------------------------------------------------------ schedules
    def _schedule(self, train: bool, shape: tuple):
        key = (train, shape)
        if key not in self._schedules:
            group = self.pp_mesh.get_group()
            stages = [_Stage(part, s, self.n_stages, self.layout.device, group=group,
                             dw_builder=None if part.split_backward else _whole_backward)
                      for part, s in zip(self.parts, self.stage_ids, strict=True)]
            for st in stages:
                st.register_forward_context(_probe_flag(st.submod))
            cls = _schedule_class(self.schedule_name)
            arg = stages[0] if self.schedule_name == "1F1B" else stages
            self._schedules[key] = cls(arg, self.n, loss_fn=_pipeline_loss, scale_grads=False)
        return self._schedules[key]

    def _run(self, input_ids: torch.Tensor, targets: torch.Tensor, train: bool, ctx: dict) -> torch.Tensor:
        if input_ids.shape != targets.shape or input_ids.ndim != 2:
            raise ValueError(f"input_ids and targets: expected equal (rows, seq) shapes, got "
                             f"{tuple(input_ids.shape)} and {tuple(targets.shape)}")
        rows = input_ids.shape[0]
        if rows % self.n:
            raise ConfigError(f"{rows} rows per data-parallel rank do not split into {self.n} pipeline microbatches "
                              "(--pp-microbatches)")
        labels = torch.stack((targets, input_ids), dim=1)
        t = targets.shape[1]
        n_mtp = self.parts[0].config.num_nextn_predict_layers
        ctx = {"mtp_weight": 0.0, "accum": 1, **ctx, "n": self.n, "train": train,
               "lm_total": _valid(targets).clamp(min=1),  # tensors: no host sync
               "mtp_totals": [_valid(targets[:, k:]).clamp(min=1) for k in range(1, n_mtp + 1)]}
        for p in self.parts:
            p.pp_ctx, p.pp_records = ctx, []
        has_first = any(p.is_first for p in self.parts)
        has_last = any(p.is_last for p in self.parts)
        arg_mbs = [(x,) for x in input_ids.chunk(self.n)] if has_first else None
        lab = list(labels.chunk(self.n))
        kwarg_mbs = [{"labels": x} for x in lab] if has_last else None
        sched = self._schedule(train, (rows // self.n, t))
        run = sched.step if train else sched.eval
        kw = dict(return_outputs=False) if train else {}
        run(arg_mbs=arg_mbs, kwarg_mbs=kwarg_mbs, target_mbs=lab if has_last else None, **kw)
        recs = [r for p in self.parts for r in p.pp_records]
        out = torch.stack(recs).sum(0) if recs else torch.zeros(3)
        out = out.to(device=self.layout.device, dtype=torch.float64)
        if self.pp > 1:
            dist.all_reduce(out, group=self.pp_mesh.get_group())
        return out

    def step(self, input_ids: torch.Tensor, targets: torch.Tensor, mtp_weight: float, accum: int = 1) -> dict:
        """Forward and backward of this rank's rows through the schedule, ``n_microbatches`` micro-batches of
        ``rows / n_microbatches`` rows: ``input_ids`` and ``targets`` (rows, T) int64 (the same on every pipeline rank
        of this data rank; the first stage reads the ids, the last both). Accumulates into ``.grad`` the gradient of
        ``Model.loss(input_ids, targets, mtp_weight).loss / accum`` (each micro-batch weighted by its share of the
        valid targets), sums the tied embedding's gradients over its two stages, and returns the floats ``loss``,
        ``lm_loss``, ``mtp_loss`` (mean over depths; None without MTP) and ``aux_loss`` (summed over the stages) of
        the rows, equal on every pipeline rank. Raises `ConfigError` for rows the microbatches do not split."""
        self._clear_last_embedding_grads()
        lm, mtp, aux = self._run(input_ids, targets, True, {"mtp_weight": mtp_weight, "accum": accum}).tolist()
        self._sum_embedding_grads()
        has_mtp = self.parts[0].config.num_nextn_predict_layers > 0
        return {"loss": lm + mtp_weight * mtp + aux, "lm_loss": lm,
                "mtp_loss": mtp if has_mtp else None, "aux_loss": aux}

    def eval_loss(self, input_ids: torch.Tensor, targets: torch.Tensor) -> float:
        """The main model's mean cross-entropy over this rank's rows (the validation loss, ``Model.loss``'s
        ``lm_loss``), forward only, equal on every pipeline rank; the stage modules run in their current mode
        (the caller puts them in eval mode: MoE layers then count no expert loads)."""
        return self._run(input_ids, targets, False, {}).tolist()[0]


def rank_stages_owner(schedule: str, pp: int, stage: int) -> int:
    """The pipeline rank holding stage ``stage`` under ``schedule`` (the inverse of `rank_stages`)."""
    return next(r for r in range(pp) if stage in rank_stages(schedule, pp, r))


def _last_embedding_holder(parts: list[StageModel]) -> list[StageModel]:
    """The last stage of ``parts`` when it holds its own copy of the embedding (a pipeline of several stages)."""
    return [p for p in parts if p.is_last and not p.is_first and p.model.embed_tokens is not None]


def _wrap_like(param: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    if isinstance(param, DTensor):
        return DTensor.from_local(local, param.device_mesh, param.placements, shape=param.shape,
                                  stride=param.stride(), run_check=False)
    return local


class _Stage(PipelineStage):
    """``PipelineStage`` with forward-only evaluation of the V schedules fixed: their runtime (torch 2.15) hands the
    input gradients of a stage to the stage before it on the same rank even when the schedule runs no backward
    (``eval``), and ``get_local_bwd_output`` raises then; without backward there is nothing to hand over."""

    def get_local_bwd_output(self, mb_index):
        return super().get_local_bwd_output(mb_index) if self.has_backward else ()

    def set_local_bwd_input(self, next_stage_bwd_outputs, mb_index):
        if self.has_backward:
            super().set_local_bwd_input(next_stage_bwd_outputs, mb_index)


def _whole_backward():
    """``PipelineStage``'s ``dw_builder`` of a stage that runs its whole backward in the input pass: the weight pass
    has nothing left to do."""
    return lambda: None


def _probe_flag(module: StageModel):
    @contextlib.contextmanager
    def factory(info):
        module.pp_probe = info.is_metadata_inference
        try:
            yield
        finally:
            module.pp_probe = False

    return factory
