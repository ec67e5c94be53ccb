"""`dsfs plan`: per-device memory and per-step communication of a training layout, predicted from the model config.

A small analytical model of what `dsfs.parallel.trainer.ParallelTrainer` does, in three steps:

1. `model_counts`: every parameter tensor of the model (built on the meta device from the ``ModelConfig``, so the
   counts are the model code's own), with what splits it: its FSDP unit (a decoder or MTP layer, or the root:
   embedding, final norm, head), its tensor-parallel placement (`dsfs.parallel.tp`'s plan: column-, row-wise or
   replicated), whether it is a routed-expert stack (expert parallelism shards its dim 0, `dsfs.parallel.ep`) and its
   optimizer (`reference.optim.param_groups`: Muon for hidden matrices, AdamW for the rest).
2. Memory per device (`plan`; per pipeline rank when they differ): fp32 master parameters, fp32 gradients and the
   optimizer state (AdamW 2 moments + a step scalar per tensor, Muon 1 momentum; bf16 moments under bf16/fp8
   training, `reference.optim.store_moments_in`), sharded as the layout shards them (FSDP2 pads dim 0 to a multiple of
   the shard count; ZeRO-1's ``ZeroRedundancyOptimizer`` gives each rank whole tensors, greedily by size); the
   activations autograd saves for backward (`activation_bytes`, derived tensor by tensor from the model code: MLA,
   SwiGLU MLPs, DeepSeekMoE with its router and grouped experts or the EP dispatch, RMSNorm, the fused chunked
   cross-entropy, MTP) for the microbatches in flight; the unsharded parameters FSDP holds at the end of forward; and
   the peak (`Memory`).
3. Communication per optimizer step (`Comm`), per collective and mesh dimension, in one convention: the bytes a
   rank sends, ring algorithms: an all-gather or reduce-scatter of a buffer of ``S`` bytes (the whole, gathered
   buffer) over ``n`` ranks sends ``(n-1)/n S``, an all-reduce ``2 (n-1)/n S``, a broadcast ``(n-1)/n S`` (averaged
   over the ranks, as the ring pipelines it), an all-to-all the rows that leave the rank, a pipeline send its
   buffer. Scalars (loss metrics, the gradient norm) are left out.

The planner is checked against measurements of real `ParallelTrainer` steps on 2 gloo processes in
tests/parallel/test_plan.py (the c10d collectives the dispatcher runs, counted by a dispatch mode as torch's
``CommDebugMode`` counts them; ``torch.distributed._tools.mem_tracker.MemTracker`` and autograd's saved-tensor hooks
for memory): ZeRO-3, ZeRO-2, ZeRO-1, EP, TP, CP and Muon layouts, every category within 10%. Not measured there:
pipeline parallelism (`inflight` is the schedules' textbook count) and HSDP. ``docs/plan_v3_671b.md`` works
DeepSeek-V3's layout.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from dsfs.errors import ConfigError
from dsfs.parallel.layout import ParallelDims

PRECISIONS = ("fp32", "bf16", "fp8")


def q8(d: float) -> float:
    """Bytes per token of an FP8-saved activation of width ``d``: one e4m3 byte per element and a float32 scale per
    1 x 128 tile (`reference.fp8_training`, `reference.fp8.act_quant`)."""
    return d + 4 * math.ceil(d / 128)

GiB, MiB = 2**30, 2**20


# ---------------------------------------------------------------------------------------------- the training shape
@dataclass(frozen=True)
class TrainShape:
    """What one optimizer step processes and how: ``batch_size`` sequences per micro-batch (the whole world's, as
    ``dsfs train --batch-size``), ``seq_len`` tokens each, ``grad_accum`` micro-batches per step, ``optimizer``
    (adamw, muon), ``precision`` (fp32; bf16: autocast, bf16 moments; fp8: FP8 GEMMs with bf16 autocast on the
    rest, bf16 moments) and ``device`` ("cuda": bf16 autocast under fp8, as `dsfs.evaluation.autocast`; "cpu": fp8
    GEMMs in an fp32 model). Raises `ConfigError` naming the field."""

    batch_size: int
    seq_len: int
    grad_accum: int = 1
    optimizer: str = "adamw"
    precision: str = "fp32"
    device: str = "cuda"

    def __post_init__(self):
        for k in ("batch_size", "seq_len", "grad_accum"):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"--{k.replace('_', '-')} {v}: expected an integer >= 1")
        if self.optimizer not in ("adamw", "muon"):
            raise ConfigError(f"--optimizer {self.optimizer}: expected adamw or muon")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision {self.precision}: expected one of {', '.join(PRECISIONS)}")
        if self.device not in ("cuda", "cpu"):
            raise ConfigError(f"device {self.device!r}: expected cuda or cpu")

    @property
    def autocast(self) -> bool:
        """bf16 autocast is on (`dsfs.evaluation.autocast`)."""
        return self.precision == "bf16" or (self.precision == "fp8" and self.device == "cuda")

    @property
    def moment_bytes(self) -> int:
        """Bytes per optimizer moment element between steps (bf16 under bf16/fp8 training)."""
        return 2 if self.precision in ("bf16", "fp8") else 4


# ---------------------------------------------------------------------------------------------- 1. the counts
@dataclass(frozen=True)
class TensorCount:
    """One parameter tensor of the model: ``name`` (its FQN), ``shape``; ``unit`` the FSDP unit holding it ("root"
    for the embedding, final norm and head, "layers.i" or "mtp.k"), ``layer`` the decoder-layer index (MTP depth k:
    ``num_hidden_layers + k``; None for the root), ``tp`` its tensor-parallel placement ("col": dim 0 split, "row": dim
    1 split, "rep": whole on every TP rank), ``expert`` a routed-expert stack (EP splits dim 0), ``group`` its
    optimizer ("muon" or "adamw")."""

    name: str
    shape: tuple[int, ...]
    unit: str
    layer: int | None
    tp: str
    expert: bool
    group: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


_COLWISE = re.compile(r"self_attn\.(q_b_proj|q_proj|kv_b_proj|k_proj|v_proj)\.weight$|"
                      r"mlp\.(shared_experts\.)?(gate_proj|up_proj)\.weight$")
_ROWWISE = re.compile(r"self_attn\.o_proj\.weight$|mlp\.(shared_experts\.)?down_proj\.weight$")
_SEQUENCE_PARALLEL = re.compile(r"(input_layernorm|post_attention_layernorm|enorm|hnorm|eh_proj|shared_head\.norm)"
                                r"\.weight$|^model\.norm\.weight$")


def model_counts(cfg) -> list[TensorCount]:
    """The parameter tensors of ``reference.Model(cfg)`` (``cfg`` a ``reference.ModelConfig``), tied ones once, in
    ``named_parameters`` order, classified as `TensorCount` says. The model is built on the meta device: no memory,
    whatever its size. TP placements follow `dsfs.parallel.tp` (MLA's q_b/kv_b column-wise and o_proj row-wise, the
    latent projections, norms, routers and routed experts replicated); optimizer groups follow
    `reference.optim.param_groups` (Muon: matrices other than embeddings, the LM head and routers)."""
    import torch

    from reference import Model

    with torch.device("meta"):
        model = Model(cfg)
    emb = {id(model.model.embed_tokens.weight)}
    adam_only = {id(model.lm_head.weight)} | {id(m.gate.weight) for m in model.moe_layers()}
    n = cfg.num_hidden_layers
    out = []
    for name, p in model.named_parameters():
        m = re.match(r"model\.layers\.(\d+)\.|mtp\.(\d+)\.", name)
        if m is None:
            unit, layer = "root", None
        elif m.group(1) is not None:
            unit, layer = f"layers.{m.group(1)}", int(m.group(1))
        else:
            unit, layer = f"mtp.{m.group(2)}", n + int(m.group(2))
        tp = "col" if _COLWISE.search(name) else "row" if _ROWWISE.search(name) else "rep"
        expert = ".mlp.experts." in name
        muon = p.ndim >= 2 and id(p) not in emb and id(p) not in adam_only
        out.append(TensorCount(name, tuple(p.shape), unit, layer, tp, expert, "muon" if muon else "adamw"))
    return out


def param_totals(cfg, counts: list[TensorCount] | None = None) -> dict[str, int]:
    """Parameter counts: ``total`` (with MTP), ``main`` (without the MTP layers), ``mtp``, and ``activated`` (the
    main model's parameters one token uses: the routed experts counted ``num_experts_per_tok / n_routed_experts``
    of the way; the embedding and the head both counted)."""
    counts = model_counts(cfg) if counts is None else counts
    total = sum(t.numel for t in counts)
    mtp = sum(t.numel for t in counts if t.unit.startswith("mtp."))
    main = total - mtp
    experts = sum(t.numel for t in counts if t.expert and not t.unit.startswith("mtp."))
    head = cfg.vocab_size * cfg.hidden_size if cfg.tie_word_embeddings else 0  # the tied head is used twice
    activated = main - experts + experts * cfg.num_experts_per_tok // max(cfg.n_routed_experts, 1) + head
    return {"total": total, "main": main, "mtp": mtp, "activated": activated}


# ---------------------------------------------------------------------------------------------- layout helpers
def local_shape(t: TensorCount, dims: ParallelDims) -> tuple[int, ...]:
    """``t``'s shape on one rank after tensor and expert parallelism (before FSDP)."""
    s = list(t.shape)
    if t.tp == "col" and dims.tp > 1:
        s[0] //= dims.tp
    elif t.tp == "row" and dims.tp > 1:
        s[1] //= dims.tp
    if t.expert and dims.ep > 1:
        s[0] //= dims.ep
    return tuple(s)


def fsdp_shards(t: TensorCount, dims: ParallelDims, zero: int) -> int:
    """Over how many ranks FSDP2 shards ``t`` (1: not sharded): ``dp_shard x cp`` (`dsfs.parallel.fsdp`), the
    routed experts under EP over ``dp_shard / (ep / cp)``; ZeRO-1 and a single data rank shard nothing."""
    if zero == 1:
        return 1
    if t.expert and dims.ep > 1:
        return dims.dp_shard // dims.dp_shard_in_ep
    return dims.dp_shard * dims.cp


def _padded_shard(shape: tuple[int, ...], n: int) -> int:
    """Elements of one FSDP2 shard: dim 0 padded to a multiple of ``n`` (``ceil(d0 / n) x rest``)."""
    if n == 1:
        return math.prod(shape)
    return -(-shape[0] // n) * math.prod(shape[1:])


def uniform_routing(cfg, ep: int, tokens: int = 4096, seed: int = 0) -> Routing:
    """Expected EP dispatch per token under uniform routing: ``tokens`` tokens routed by `reference.moe.route` from
    i.i.d. normal router logits (every expert equally likely; the config's group-limited routing applied), counted
    by `dsfs.parallel.ep.dispatch_volume` (one row per token and destination rank, ep.py's dedupe). Deterministic
    (``seed``)."""
    import torch

    from dsfs.parallel.ep import dispatch_volume
    from reference.moe import route

    if ep == 1 or not cfg.n_routed_experts:
        return Routing(1.0, 1.0, float(cfg.num_experts_per_tok))
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, cfg.n_routed_experts, generator=g)
    idx, _, _ = route(logits, torch.zeros(cfg.n_routed_experts), cfg.num_experts_per_tok, cfg.n_group,
                      cfg.topk_group)
    rows = dispatch_volume(idx, cfg.n_routed_experts, ep, cfg.hidden_size).rows / tokens
    return Routing(rows, rows / ep, float(cfg.num_experts_per_tok))


@dataclass(frozen=True)
class Routing:
    """EP dispatch statistics per token of a rank (`uniform_routing`, or measured): ``rows`` (token, destination
    rank) rows it sends (ep.py sends a token once per rank, whatever the number of its experts there), ``self_rows``
    of them to itself (no traffic), ``pairs`` (token, expert) pairs its experts receive, ``recv`` rows it receives
    (None: as many as it sends, as uniform routing gives)."""

    rows: float
    self_rows: float
    pairs: float
    recv: float | None = None

    @property
    def received(self) -> float:
        return self.rows if self.recv is None else self.recv


# ---------------------------------------------------------------------------------------------- 2. activations
def _norm(d: int, in_bytes: int) -> float:
    """Bytes RMSNorm (`reference.rms_norm`) saves per token for an input of width ``d`` in ``in_bytes``: the fp32
    input (a fp32 copy of a bf16 one) for ``pow``, the (1,) rsqrt, the normalized ``y`` in the input dtype for the
    gain; its output (fp32: the gain is fp32) is saved by its consumer."""
    return 4 * d + 4 + in_bytes * d


def activation_bytes(cfg, shape: TrainShape, dims: ParallelDims, layers: list[int], rows: int, first: bool,
                     last: bool, routing: Routing | None = None) -> dict[str, float]:
    """Bytes autograd saves for backward over one forward of ``rows`` sequences (this rank's share: ``seq_len /
    cp`` tokens each) through decoder layers ``layers`` (MTP depth k as layer ``num_hidden_layers + k``), plus the
    embedding (``first``) and final norm, head cross-entropies (``last``). By component: "embedding", "attention"
    (norm, MLA), "ffn" (norm, dense MLP or DeepSeekMoE: router, routed experts, shared experts), "head" (final
    norms, the fused cross-entropy's precomputed gradients: (N, H) and the whole (V, H) head gradient in fp32, per
    call), "mtp" (its embedding and combine), "rope" (cos/sin per forward).

    Derived from the model code, tensor by tensor (fp32: every saved float 4 bytes; ``autocast``: linears save bf16
    copies of their input, one per linear, and of their weight, attention saves bf16 q, k, v; fp8: FP8 linears and
    SwiGLUs save e4m3 inputs with fp32 tile scales, `q8`). Tensor parallelism: norms and the residual stream hold
    ``1/tp`` of the tokens (sequence parallelism), attention and FFNs the whole; routed experts run every token on
    every TP rank. Context parallelism: each MLA layer up-projects the latent of the whole sequence (k, v and the
    gathered latent for ``seq_len`` tokens, `dsfs.parallel.cp`). Expert parallelism: the rows ``routing`` gives
    (default `uniform_routing`)."""
    c = cfg
    ac, f8 = shape.autocast, shape.precision == "fp8"
    cd = 2 if ac else 4  # compute dtype: linear outputs, attention operands
    tp, cp = dims.tp, dims.cp
    n = rows * shape.seq_len / cp  # this rank's tokens (attention, FFN)
    ns = n / tp  # the residual stream's (norms)
    nkv = rows * shape.seq_len if cp > 1 else n  # keys/values: CP up-projects the whole sequence's latent
    h = c.hidden_size
    out = dict.fromkeys(("embedding", "attention", "ffn", "head", "mtp", "rope"), 0.0)

    def lin_in(d: int, consumers: int = 1) -> float:
        """A fp32 input of width d consumed by ``consumers`` linear layers: saved as is (fp32), one bf16 copy per
        linear (autocast), or one e4m3 copy (FP8 linears sharing it)."""
        return q8(d) if f8 else (2 * d * consumers if ac else 4 * d)

    def wcopy(numel: float) -> float:
        """Autocast's bf16 copy of a weight (saved by its linear): 2 bytes per element, per forward."""
        return 2 * numel if ac else 0.0

    def mlp(inter: float, shared_input: bool) -> tuple[float, float]:
        """A SwiGLU MLP of (local) width ``inter``: (bytes per token, fixed bytes). ``shared_input``: its fp32
        input is saved by another module already (the router)."""
        if f8:  # fp8_swiglu_mlp: x, gate and up outputs in e4m3 (the SwiGLU output recomputed)
            return q8(h) + 2 * q8(inter), 0.0
        x = 0.0 if shared_input and not ac else lin_in(h, 2)
        return x + 4 * cd * inter, wcopy(3 * h * inter)  # gate out, up out, silu(gate), product (down's input)

    nh = c.num_attention_heads // tp
    dq, dv, r, dr, ql = c.qk_head_dim, c.v_head_dim, c.kv_lora_rank, c.qk_rope_head_dim, c.q_lora_rank
    dvp = dq if dv < dq else (dv if ac else c.qk_nope_head_dim + dv)  # v as SDPA saves it (padded to dq)
    for layer in layers:
        # the residual stream is fp32 (the embedding's dtype); an MTP block's starts as eh_proj's output, bf16 under
        # autocast, and stays so
        sb = 2 if ac and layer >= c.num_hidden_layers else 4
        # ---- attention: input norm on the stream, MLA on the tokens (`reference.mla.MLA`, naive form)
        a = _norm(h, sb) * ns + lin_in(h, 2) * n  # q_a / kv_a input (the TP-gathered one)
        fixed = 0.0
        if ql is not None:
            a += (_norm(ql, cd) + lin_in(ql)) * n  # q_a output through q_a_layernorm, q_b input
            fixed += wcopy(ql * h) + wcopy(ql * nh * dq)
        else:
            fixed += wcopy(h * nh * dq)
        a += (4 * (r + dr) + 4 + 4 * r if cd == 4 else 4 * r + 4 + 2 * r) * n  # kv_a output through kv_a_layernorm
        a += lin_in(r) * nkv  # kv_b input (under CP: the gathered latent of the whole sequence)
        if cp > 1:  # the gathered latent's k_pe columns stay alive in fp32 (kv_b saves a view); the index order
            a += (4 * dr if not (ac or f8) else 0) * nkv + 8 * shape.seq_len
        a += (cd * nh * dq + 4 * nh + cd * nh * dvp) * n + (cd * nh * dq + cd * nh * dvp) * nkv  # SDPA q, lse, o; k, v
        a += (q8(nh * dv) if f8 else cd * nh * dv) * n  # o_proj input
        fixed += wcopy((r + dr) * h) + wcopy(r * nh * (c.qk_nope_head_dim + dv)) + wcopy(nh * dv * h)
        out["attention"] += a + (0 if f8 else fixed)
        # ---- FFN: post-attention norm on the stream, then the dense MLP or DeepSeekMoE on the tokens
        f = _norm(h, sb) * ns
        if not c.is_moe_layer(layer):
            per, fx = mlp(c.intermediate_size / tp, False)
            f += per * n + (0 if f8 else fx)
        else:
            e, k = c.n_routed_experts, c.num_experts_per_tok
            f += (4 * h + 4 * e + 8 * k + 4 + 4 * k) * n  # router: input, sigmoid scores, top-k ids, norm, weights
            im = c.moe_intermediate_size
            el = e // dims.ep
            if dims.ep == 1:
                p = k * n  # (token, expert) pairs, all local
                f += 16 * p  # token and order indices (int64)
                if f8:
                    f += (q8(h) + 2 * q8(im) + cd * h + cd + 4 * h) * p + 8 * (el + 1)
                elif ac:  # per-expert loop: bf16 casts of each segment for gate and up, outputs, weight copies
                    f += (4 * h + 8 * im + 2 * h + 2 + 4 * h) * p + wcopy(3 * el * im * h)
                else:
                    f += (4 * h + 16 * im + 4 * h + 4 + 4 * h) * p + 4 * el  # xs, SwiGLU, ys, weights, ys*w; offsets
            else:  # ep_experts_forward: rows sent and received, pairs received
                rt = routing or uniform_routing(c, dims.ep)
                s, p = rt.rows * n, rt.pairs * n
                # sent rows: token ids, the pairs-on-rank mask, the combined rows coming back; received: each pair's
                # row, and the sort order of the received (row, slot) grid (the whole argsort stays alive)
                f += (8 + k + 4 * h) * s + 8 * p + 8 * k * rt.received * n
                if f8:
                    f += (q8(h) + 2 * q8(im) + cd * h + cd + 4 * h) * p + 8 * (el + 1)
                elif ac:
                    f += (4 * h + 8 * im + 2 * h + 2 + 4 * h) * p + wcopy(3 * el * im * h)
                else:
                    f += (4 * h + 16 * im + 4 * h + 4 + 4 * h) * p + 4 * el
            if c.n_shared_experts:
                per, fx = mlp(im * c.n_shared_experts / tp, True)
                f += per * n + (0 if f8 else fx)
        out["ffn"] += f
    if layers:
        out["rope"] += 4 * shape.seq_len * dr  # cos and sin of the main forward, shared by its layers
        if cp > 1:
            out["rope"] += shape.seq_len * shape.seq_len / cp  # the (T/cp, T) causal mask by position
    v = c.vocab_size
    if first:
        out["embedding"] += 8 * n  # token ids
    if last:
        ce = 4 * h * n + 4 * v * h + 8  # fused cross-entropy: grad_h (N, H), grad_w (V, H) fp32, the target count
        out["head"] += _norm(h, 4) * ns + ce
        n_mtp = c.num_nextn_predict_layers
        if n_mtp:
            out["rope"] += 4 * shape.seq_len * dr
        for _ in range(n_mtp):
            m = 8 * n + 2 * _norm(h, 4) * ns  # its embedding's ids, enorm, hnorm
            m += (8 * h if not ac else 4 * h) * ns + wcopy(2 * h * h)  # eh_proj input (cat), bf16 weight copy
            out["mtp"] += m
            out["head"] += _norm(h, 4) * ns + ce  # shared_head.norm, its cross-entropy
    return out


# ---------------------------------------------------------------------------------------------- pipeline placement
@dataclass(frozen=True)
class Stage:
    """A pipeline stage: ``index`` of ``n_stages``, its decoder ``layers`` (MTP depths on the last stage counted as
    layers ``num_hidden_layers + k``), whether it holds the embedding (the first stage; the last too when the head is
    tied to it or MTP embeds tokens: `dsfs.parallel.pp.StageModel`) and the head (the last)."""

    index: int
    n_stages: int
    layers: tuple[int, ...]
    embedding: bool
    head: bool


def rank_stages(cfg, dims: ParallelDims, pp_rank: int) -> list[Stage]:
    """The stages pipeline rank ``pp_rank`` holds (`dsfs.parallel.pp.rank_stages`, layers by
    `dsfs.parallel.pp.stage_layers`); without PP one stage with everything."""
    n, n_mtp = cfg.num_hidden_layers, cfg.num_nextn_predict_layers
    mtp = tuple(range(n, n + n_mtp))
    if dims.pp == 1:
        return [Stage(0, 1, tuple(range(n)) + mtp, True, True)]
    from dsfs.parallel import pp

    n_stages = pp.stages_per_rank(dims.pp_schedule) * dims.pp
    ranges = pp.stage_layers(n, n_mtp, n_stages)
    out = []
    for s in pp.rank_stages(dims.pp_schedule, dims.pp, pp_rank):
        last = s == n_stages - 1
        embed = s == 0 or (last and (cfg.tie_word_embeddings or n_mtp > 0))
        out.append(Stage(s, n_stages, tuple(ranges[s]) + (mtp if last else ()), embed, last))
    return out


def _stage_tensors(counts: list[TensorCount], st: Stage) -> list[TensorCount]:
    """The tensors stage ``st`` holds (a tied head is the embedding's tensor, held once per stage)."""
    mine = []
    for t in counts:
        if t.unit == "root":
            if t.name.startswith("model.embed_tokens") and st.embedding:
                mine.append(t)
            elif not t.name.startswith("model.embed_tokens") and st.head:
                mine.append(t)
        elif t.layer in st.layers:
            mine.append(t)
    return mine


def inflight(dims: ParallelDims, pp_rank: int, microbatches: int) -> float:
    """Microbatches whose activations a pipeline rank holds at once (in units of one microbatch through all of the
    rank's layers): 1F1B, rank r: ``pp - r`` (its warm-up); Interleaved1F1B: Megatron-LM's warm-up of ``2 (pp - r -
    1) + pp`` chunks plus one, over the rank's two chunks; ZBVZeroBubble and DualPipeV: ``pp + 1``, DualPipe's figure
    (DeepSeek-V3 report Table 2). Capped at the microbatches per micro-step. Textbook counts, not measured here."""
    if dims.pp == 1:
        return 1.0
    if dims.pp_schedule == "1F1B":
        k = dims.pp - pp_rank
    elif dims.pp_schedule == "Interleaved1F1B":
        k = (2 * (dims.pp - pp_rank - 1) + dims.pp + 1) / 2
    else:
        k = dims.pp + 1
    return float(min(k, microbatches))


# ---------------------------------------------------------------------------------------------- results
@dataclass
class Memory:
    """Bytes on one device (`plan`). ``params``: the fp32 master parameters it keeps (its shards under FSDP);
    ``grads``: its fp32 gradients after backward; ``buckets``: DDP's flat gradient buckets (ZeRO-1; allocated once,
    outside any step); ``optimizer``: the optimizer state between steps; ``activations``: what autograd saves for
    backward at the end of the forward (all microbatches in flight), by component in ``activation_parts``;
    ``gathered``: the unsharded parameters FSDP holds then (the root unit's; with ZeRO-2 every unit's);
    ``transient``: what the first backward steps add (the head's cross-entropy gradients, FSDP's re-gathered unit and
    its prefetched neighbour); ``peak``: the largest of the backward start (``params + optimizer + buckets +
    activations + gathered + transient``, plus the gradients of earlier micro-batches under accumulation or earlier
    pipeline microbatches) and the optimizer step (``params + grads + buckets + optimizer`` plus the moments widened
    to fp32 when kept in bf16); ``peak_at`` names which. ``inflight``: the pipeline microbatches whose activations
    are held at once (`inflight`)."""

    params: float = 0.0
    grads: float = 0.0
    buckets: float = 0.0
    optimizer: float = 0.0
    activations: float = 0.0
    gathered: float = 0.0
    transient: float = 0.0
    peak: float = 0.0
    peak_at: str = ""
    activation_parts: dict = field(default_factory=dict)
    inflight: float = 1.0


@dataclass(frozen=True)
class Comm:
    """One collective of an optimizer step on one device: ``kind`` ("all-gather", "reduce-scatter", "all-reduce",
    "all-to-all", "broadcast", "send/recv"), mesh dimension ``dim`` and group size ``n``, ``what`` it carries, ``calls``
    per optimizer step, ``buffer`` the bytes of one call (the whole buffer: gathered, reduced, the rows sent including
    the rank's own, the sent tensor), ``bytes`` what this rank sends per step (module docstring's convention) and
    ``elements`` per call (scalars are left out of the plan)."""

    kind: str
    dim: str
    n: int
    what: str
    calls: float
    buffer: float
    bytes: float
    elements: float


def ring_bytes(kind: str, buffer: float, n: int) -> float:
    """Bytes one rank sends for one collective over ``n`` ranks on a ``buffer``-byte buffer (module docstring)."""
    if n <= 1:
        return 0.0
    if kind == "all-reduce":
        return 2 * (n - 1) / n * buffer
    if kind in ("all-gather", "reduce-scatter", "broadcast"):
        return (n - 1) / n * buffer
    return buffer


@dataclass
class RankPlan:
    """One pipeline rank's devices: its ``stages``, ``memory`` and ``comm``."""

    pp_rank: int
    stages: list[Stage]
    memory: Memory
    comm: list[Comm]

    @property
    def label(self) -> str:
        if len(self.stages) == 1 and self.stages[0].n_stages == 1:
            return "every rank"
        names = ", ".join(str(s.index) for s in self.stages)
        return f"pp rank {self.pp_rank} (stage{'s' if len(self.stages) > 1 else ''} {names})"

    def comm_bytes(self) -> float:
        return sum(c.bytes for c in self.comm)


@dataclass
class Plan:
    """The planner's answer (`plan`): the model's parameter counts (`param_totals`), the layout ``dims``, the
    ``shape``, one `RankPlan` per pipeline rank, the EP ``routing`` used and ``notes``."""

    cfg: object
    dims: ParallelDims
    shape: TrainShape
    totals: dict
    ranks: list[RankPlan]
    routing: Routing | None
    notes: list[str]

    def peak_rank(self) -> RankPlan:
        return max(self.ranks, key=lambda r: r.memory.peak)


# ---------------------------------------------------------------------------------------------- 3. the plan
def _zero1_share(tensors: list[TensorCount], dims: ParallelDims, shape: TrainShape) -> dict[str, float]:
    """ZeRO-1's optimizer-state share per tensor name of the data rank holding the most state:
    ``ZeroRedundancyOptimizer``'s partition (per parameter group in `reference.optim.param_groups` order, largest
    tensor first, each whole to the rank with the fewest elements so far) when the data ranks hold the same tensors;
    else (expert shards differ per rank: planned ZeRO-1) each tensor's state split evenly over its replicas."""
    n = dims.dp
    if dims.ep > 1 or dims.pp > 1:
        return {t.name: 1.0 / (n // (dims.ep // dims.cp) if t.expert and dims.ep > 1 else n) for t in tensors}

    def split(ts):  # param_groups: matrices (decay), then vectors and embeddings (no decay)
        emb = [t for t in ts if len(t.shape) < 2 or t.name.startswith("model.embed_tokens")]
        return [[t for t in ts if t not in emb], emb]

    if shape.optimizer == "muon":
        groups = [[t for t in tensors if t.group == "muon"], *split([t for t in tensors if t.group == "adamw"])]
    else:
        groups = split(tensors)
    sizes, owner = [0] * n, {}
    for g in groups:
        for t in sorted(g, key=lambda t: t.numel, reverse=True):
            r = sizes.index(min(sizes))
            owner[t.name] = r
            sizes[r] += t.numel
    state = [sum(_state_bytes(t, t.numel, shape) for t in tensors if owner[t.name] == r) for r in range(n)]
    fullest = state.index(max(state))
    return {t.name: 1.0 if owner[t.name] == fullest else 0.0 for t in tensors}


def _state_bytes(t: TensorCount, elems: float, shape: TrainShape) -> float:
    """Optimizer state bytes of ``elems`` elements of ``t`` (AdamW: two moments and a step scalar; Muon: one)."""
    if shape.optimizer == "muon" and t.group == "muon":
        return shape.moment_bytes * elems
    return 2 * shape.moment_bytes * elems + 4


def plan(cfg, dims: ParallelDims, shape: TrainShape, routing: Routing | None = None,
         counts: list[TensorCount] | None = None) -> Plan:
    """Memory per device and communication per optimizer step of training ``cfg`` (a ``reference.ModelConfig``) on
    layout ``dims`` with ``shape`` (module docstring; `Memory`, `Comm`). ``routing``: the EP dispatch per token
    (default `uniform_routing`). ``dims.zero == 1`` with pipeline or expert parallelism (which ``dsfs train`` does not
    run) is planned as DeepSpeed-style ZeRO-1: parameters and gradients replicated over the data ranks, optimizer
    state split over them. Raises `ConfigError` when the layout cannot split the model or the batch
    (`ParallelDims.check_model`, ``check_batch``)."""
    dims.check_model(cfg)
    dims.check_batch(shape.batch_size, shape.seq_len)
    if shape.seq_len > cfg.max_position_embeddings:
        raise ConfigError(f"--seq-len {shape.seq_len} exceeds the model's max_position_embeddings="
                          f"{cfg.max_position_embeddings}")
    counts = model_counts(cfg) if counts is None else counts
    if dims.ep > 1 and routing is None:
        routing = uniform_routing(cfg, dims.ep)
    notes = []
    if dims.zero == 1 and (dims.pp > 1 or dims.ep > 1 or dims.tp > 1 or dims.cp > 1):
        notes.append("ZeRO-1 with pp/ep/tp/cp is planned (replicated parameters and gradients, optimizer state "
                     "split over the data ranks) but dsfs train runs ZeRO-1 with data parallelism only")
    if dims.pp > 1:
        notes.append(f"pipeline: {dims.microbatches()} microbatches per micro-step; activations in flight are the "
                     f"{dims.pp_schedule} schedule's textbook count (inflight); FSDP is assumed to gather and "
                     "reduce-scatter per microbatch")
    ranks = [_rank_plan(cfg, dims, shape, counts, r, routing) for r in range(dims.pp)]
    return Plan(cfg, dims, shape, param_totals(cfg, counts), ranks, routing, notes)


def _rank_plan(cfg, dims: ParallelDims, shape: TrainShape, counts: list[TensorCount], pp_rank: int,
               routing: Routing | None) -> RankPlan:
    zero = dims.zero
    fsdp = zero in (2, 3) and dims.dp_replicate * dims.dp_shard * dims.cp > 1  # ParallelTrainer applies fully_shard
    stages = rank_stages(cfg, dims, pp_rank)
    m = dims.microbatches() if dims.pp > 1 else 1
    rows = shape.batch_size // dims.dp // m
    acc = shape.grad_accum
    mem, comm = Memory(), []
    tensors = [t for st in stages for t in _stage_tensors(counts, st)]
    zshare = _zero1_share(tensors, dims, shape) if zero == 1 and dims.dp > 1 else {}
    ce = 0.0
    for st in stages:
        parts = activation_bytes(cfg, shape, dims, list(st.layers), rows, st.index == 0, st.head, routing)
        for k, v in parts.items():
            mem.activation_parts[k] = mem.activation_parts.get(k, 0.0) + v
        if st.head:
            ce = 4 * cfg.vocab_size * cfg.hidden_size + 4 * cfg.hidden_size * rows * shape.seq_len / dims.cp
    per_mb = sum(mem.activation_parts.values())
    k_inflight = inflight(dims, pp_rank, m)
    mem.activations, mem.inflight = per_mb * k_inflight, k_inflight
    mem.activation_parts = {k: v * k_inflight for k, v in mem.activation_parts.items()}

    units: dict[str, list] = {}
    for t in tensors:
        loc = local_shape(t, dims)
        n = fsdp_shards(t, dims, zero) if fsdp else 1
        shard = _padded_shard(loc, n)
        mem.params += 4 * shard
        mem.grads += 4 * shard
        if zero == 1 and dims.dp > 1:
            mem.optimizer += _state_bytes(t, math.prod(loc), shape) * zshare[t.name]
        else:
            mem.optimizer += _state_bytes(t, shard, shape)
        key = t.unit + (":experts" if t.expert and dims.ep > 1 else "")
        units.setdefault(key, []).append((t, loc, n, shard))
    ddp = zero == 1 and dims.dp > 1 and dims.pp == dims.tp == dims.cp == dims.ep == 1  # dsfs's ZeRO-1: DDP
    if ddp:
        mem.buckets = mem.grads  # DDP's flat buckets (gradient_as_bucket_view=False): a second copy of the grads
    # FSDP: what stays gathered at the end of the forward, and the largest unit (re-gathered in backward)
    biggest = 0.0
    for key, ts in units.items():
        full = sum(4 * shard * n for _, _, n, shard in ts)
        sharded = fsdp and ts[0][2] > 1
        if sharded and (key == "root" or zero == 2):
            mem.gathered += full
        if sharded and key != "root":
            biggest = max(biggest, full)
    mem.transient = ce + (2 * biggest if fsdp and zero == 3 else 0.0)
    held = mem.grads if acc > 1 or dims.pp > 1 else 0.0  # gradients of earlier micro-batches (or microbatches)
    widen = mem.optimizer * (4 / shape.moment_bytes - 1) if shape.moment_bytes < 4 else 0.0
    fwd = mem.params + mem.optimizer + mem.buckets + held + mem.activations + mem.gathered + mem.transient
    step = mem.params + mem.grads + mem.buckets + mem.optimizer + widen
    mem.peak, mem.peak_at = (fwd, "backward start") if fwd >= step else (step, "optimizer step")

    comm.extend(_data_comm(dims, shape, units, zero, fsdp, m, acc))
    comm.extend(_model_comm(cfg, dims, shape, stages, rows, m, acc, routing, tensors))
    return RankPlan(pp_rank, stages, mem, [c for c in comm if c.calls > 0])


def _data_comm(dims: ParallelDims, shape: TrainShape, units: dict, zero: int, fsdp: bool, m: int,
               acc: int) -> list[Comm]:
    """FSDP's all-gathers and reduce-scatters (HSDP's all-reduce across replicas), or ZeRO-1's all-reduce and
    parameter broadcast; Muon's gathers and broadcasts (`dsfs.parallel.muon.DistributedMuon`)."""
    out = []
    if fsdp:
        for key, ts in units.items():
            n = ts[0][2]
            dim = "dp_shard_mod_ep" if key.endswith(":experts") else "dp_shard_cp"
            full = sum(4 * shard * n for _, _, _, shard in ts)
            shard_b = sum(4 * shard for _, _, _, shard in ts)
            mbs = m * acc
            # a unit is gathered before each forward call (an MTP layer has two: combine, then the block) under
            # ZeRO-3, and again before the backward of each; ZeRO-2 keeps it gathered from its first forward call
            # until the backward of its last, then re-gathers for the backward of each earlier call
            k = 2 if key.startswith("mtp.") and not key.endswith(":experts") else 1
            fwd_calls = mbs * (k if zero == 3 else 1)
            bwd_calls = mbs * (k if zero == 3 else k - 1) if key != "root" else 0
            if n > 1:
                out.append(Comm("all-gather", dim, n, f"FSDP parameters of {key} (forward)", fwd_calls, full,
                                fwd_calls * ring_bytes("all-gather", full, n), full / 4))
                if bwd_calls:
                    out.append(Comm("all-gather", dim, n, f"FSDP parameters of {key} (backward)", bwd_calls, full,
                                    bwd_calls * ring_bytes("all-gather", full, n), full / 4))
                out.append(Comm("reduce-scatter", dim, n, f"FSDP gradients of {key}", mbs, full,
                                mbs * ring_bytes("reduce-scatter", full, n), full / 4))
            if dims.dp_replicate > 1:
                r = dims.dp_replicate
                out.append(Comm("all-reduce", "dp_replicate", r, f"HSDP gradients of {key} (across replicas)", mbs,
                                shard_b, mbs * ring_bytes("all-reduce", shard_b, r), shard_b / 4))
        out = _merge(out)
    elif zero == 1 and dims.dp > 1:
        grads, tensors = {"dp": 0.0, "dp_shard_mod_ep": 0.0}, {"dp": 0, "dp_shard_mod_ep": 0}
        for ts in units.values():
            for t, loc, _, _ in ts:
                dim = "dp_shard_mod_ep" if t.expert and dims.ep > 1 else "dp"
                grads[dim] += 4 * math.prod(loc)
                tensors[dim] += 1
        for dim, b in grads.items():
            n = dims.dp if dim == "dp" else dims.dp // (dims.ep // dims.cp)
            if b and n > 1:
                k = tensors[dim]
                out.append(Comm("all-reduce", dim, n, "gradients (DDP)", acc, b, acc * ring_bytes("all-reduce", b, n),
                                b / 4))
                out.append(Comm("broadcast", dim, n, "ZeRO-1 updated parameters (one per tensor, from its owner)", k,
                                b / k, ring_bytes("broadcast", b, n), b / 4 / k))
    if shape.optimizer == "muon" and (fsdp or dims.tp > 1):
        # DistributedMuon: a 2-D matrix held as a DTensor is gathered whole (full_tensor: an all-gather over its
        # split dimensions), orthogonalized on one rank and broadcast over its whole mesh; stacks stay local
        gather = bcast = 0.0
        calls = 0
        for ts in units.values():
            for t, _, n, _ in ts:
                if t.group != "muon" or len(t.shape) > 2:
                    continue
                split = n * (dims.tp if t.tp != "rep" else 1)
                group = (n * dims.dp_replicate if fsdp else 1) * dims.tp
                if group == 1:
                    continue
                gather += ring_bytes("all-gather", 4 * t.numel, split)
                bcast += ring_bytes("broadcast", 4 * t.numel, group)
                calls += 1
        if calls:
            out.append(Comm("all-gather", "dp_shard_cp x tp", 0, "Muon: whole momentum updates", calls,
                            gather / calls, gather, gather / calls / 4))
            out.append(Comm("broadcast", "dp x tp", 0, "Muon: orthogonalized updates", calls, bcast / calls, bcast,
                            bcast / calls / 4))
    return out


def _merge(comms: list[Comm]) -> list[Comm]:
    """One entry per (kind, dim, what) with the unit names folded into "layers" / "mtp" / "root"."""
    out: dict[tuple, list] = {}
    for c in comms:
        what = re.sub(r"layers\.\d+", "layers", re.sub(r"mtp\.\d+", "mtp", c.what))
        key = (c.kind, c.dim, c.n, what)
        if key not in out:
            out[key] = [0.0, 0.0, 0.0, 0.0]
        acc = out[key]
        acc[0] += c.calls
        acc[1] += c.buffer * c.calls
        acc[2] += c.bytes
        acc[3] = max(acc[3], c.elements)
    return [Comm(k[0], k[1], k[2], k[3], v[0], v[1] / v[0] if v[0] else 0.0, v[2], v[3]) for k, v in out.items()]


def _model_comm(cfg, dims: ParallelDims, shape: TrainShape, stages: list[Stage], rows: int, m: int, acc: int,
                routing: Routing | None, tensors: list[TensorCount]) -> list[Comm]:
    """TP (sequence parallel), EP, CP and PP collectives, and the expert-load all-reduce."""
    c, out = cfg, []
    h, cd = c.hidden_size, 2 if shape.autocast else 4
    n = rows * shape.seq_len / dims.cp  # tokens of one microbatch on this rank
    mbs = m * acc
    layers = [i for st in stages for i in st.layers]
    moe = [i for i in layers if c.is_moe_layer(i)]
    tp = dims.tp

    def add(kind, dim, size, what, calls, buffer, elsize=4):
        if size > 1 and calls:
            out.append(Comm(kind, dim, size, what, calls, buffer, calls * ring_bytes(kind, buffer, size),
                            buffer / elsize))

    if tp > 1:
        dense = [i for i in layers if not c.is_moe_layer(i)]
        L = len(layers)
        latent = (c.q_lora_rank if c.q_lora_rank is not None else h) + c.kv_lora_rank + c.qk_rope_head_dim
        add("all-gather", "tp", tp, "TP: attention input (sequence -> whole), fp32", L * mbs, 4 * h * n)
        add("reduce-scatter", "tp", tp, "TP: o_proj output (whole -> sequence)", L * mbs, cd * h * n, cd)
        add("all-gather", "tp", tp, "TP: o_proj output gradient", L * mbs, cd * h * n, cd)
        add("all-reduce", "tp", tp, "TP: gradients of the latents (q, c_kv, k_pe)", L * mbs, 4 * latent * n)
        add("all-gather", "tp", tp, "TP: FFN input (sequence -> whole), fp32", L * mbs, 4 * h * n)
        if dense:
            add("reduce-scatter", "tp", tp, "TP: dense MLP input gradient", len(dense) * mbs, 4 * h * n)
            add("reduce-scatter", "tp", tp, "TP: dense MLP output", len(dense) * mbs, cd * h * n, cd)
            add("all-gather", "tp", tp, "TP: dense MLP output gradient", len(dense) * mbs, cd * h * n, cd)
        if moe:
            if c.n_shared_experts:
                add("all-reduce", "tp", tp, "TP: shared experts' input gradient", len(moe) * mbs, 4 * h * n)
                add("all-reduce", "tp", tp, "TP: shared experts' output", len(moe) * mbs, cd * h * n, cd)
            add("all-gather", "tp", tp, "TP: MoE output gradient", len(moe) * mbs, 4 * h * n)
        heads = sum(1 for st in stages if st.head)
        firsts = sum(1 for st in stages if st.index == 0)
        n_mtp = c.num_nextn_predict_layers * heads
        add("all-gather", "tp", tp, "TP: embedding output gradient", (firsts + n_mtp) * mbs, 4 * h * n)
        add("all-gather", "tp", tp, "TP: final norms' output (sequence -> whole)", (heads + n_mtp) * mbs, 4 * h * n)
        add("all-gather", "tp", tp, "TP: MTP hnorm input gradient", n_mtp * mbs, 4 * h * n)
        # the parameters computed on the sequence shard (norms, MTP's eh_proj) get partial gradients, summed over TP:
        # by FSDP per backward, else once before the optimizer step (`dsfs.parallel.tp.reduce_partial_grads`)
        seq = sum(t.numel for t in tensors if _SEQUENCE_PARALLEL.search(t.name))
        fsdp = dims.zero in (2, 3) and dims.dp_replicate * dims.dp_shard * dims.cp > 1
        add("all-reduce", "tp", tp, "TP: partial gradients of the sequence-parallel norms (and eh_proj)",
            mbs if fsdp else 1, 4 * seq)
    if dims.ep > 1 and moe:
        rt = routing or uniform_routing(c, dims.ep)
        ep, k = dims.ep, c.num_experts_per_tok
        sent, back = (rt.rows - rt.self_rows) * n, (rt.received - rt.self_rows) * n  # rows leaving the rank
        calls = len(moe) * mbs
        for what, rows_out, width, el in (("EP dispatch: hidden states and weights (forward)", sent, h + k, 4),
                                          ("EP dispatch: local expert ids (forward)", sent, k, 8),
                                          ("EP combine (forward)", back, h, 4),
                                          ("EP dispatch gradient (backward)", back, h + k, 4),
                                          ("EP combine gradient (backward)", sent, h, 4)):
            b = rows_out * width * el
            out.append(Comm("all-to-all", "ep", ep, what, calls, b, calls * b, rows_out * width))
        out.append(Comm("all-to-all", "ep", ep, "EP row and pair counts", calls, 16 * ep,
                        calls * 16 * (ep - 1), 2 * ep))
    if dims.cp > 1:
        L = len(layers)
        latent = rows * shape.seq_len * (c.kv_lora_rank + c.qk_rope_head_dim) * 4
        add("all-gather", "cp", dims.cp, "CP: MLA latent c_kv + k_pe (forward)", L * mbs, latent)
        add("reduce-scatter", "cp", dims.cp, "CP: latent gradients (backward)", L * mbs, latent)
    if dims.pp > 1:
        act = rows * shape.seq_len / dims.cp / tp * h * 4
        sends = 0
        owners = {s.index for s in stages}
        for st in stages:
            if st.index + 1 < st.n_stages and st.index + 1 not in owners:
                sends += 1  # activations to the next stage
            if st.index > 0 and st.index - 1 not in owners:
                sends += 1  # gradients to the stage before
        if sends:
            out.append(Comm("send/recv", "pp", dims.pp, "PP: stage activations and gradients", sends * mbs, act,
                            sends * mbs * act, act / 4))
        holders = [st for st in stages if st.embedding]
        last_first = {0, stages[0].n_stages - 1}
        if holders and not last_first <= owners and (c.tie_word_embeddings or c.num_nextn_predict_layers):
            emb = 4 * c.vocab_size * h
            if dims.zero in (2, 3) and dims.dp_shard * dims.cp > 1:
                emb /= dims.dp_shard * dims.cp
            add("all-reduce", "pp (embedding group)", 2, "PP: tied embedding gradients", acc, emb)
    if moe:  # once per step, before the bias update (ParallelTrainer.sync_expert_loads)
        dp_cp = dims.dp_replicate * dims.dp_shard * dims.cp
        add("all-reduce", "dp_cp", dp_cp, "MoE expert loads (bias update)", 1, 4 * c.n_routed_experts * len(moe))
    return out


# ---------------------------------------------------------------------------------------------- the table
def _size(b: float) -> str:
    if b >= GiB:
        return f"{b / GiB:,.2f} GiB"
    if b >= MiB:
        return f"{b / MiB:,.2f} MiB"
    return f"{b / 2**10:,.1f} KiB"


def _count(n: float) -> str:
    for unit, d in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= d:
            return f"{n / d:,.1f}{unit}"
    return f"{n:,.0f}"


def representative(p: Plan) -> list[RankPlan]:
    """The ranks worth showing: the first and last pipeline ranks and the one with the highest peak (one rank
    without PP)."""
    pick = {0, len(p.ranks) - 1, p.peak_rank().pp_rank}
    return [r for r in p.ranks if r.pp_rank in pick]


def format_plan(p: Plan) -> str:
    """The plan as text: the model, the layout, a memory table (one column per representative rank) and the
    communication of each shown rank per collective."""
    c, d, s = p.cfg, p.dims, p.shape
    t = p.totals
    tok = s.batch_size * s.seq_len
    lines = [f"model: {_count(t['total'])} parameters ({_count(t['main'])} main + {_count(t['mtp'])} MTP), "
             f"{_count(t['activated'])} activated per token; {c.num_hidden_layers} layers, hidden {c.hidden_size}, "
             f"{c.n_routed_experts} routed experts top-{c.num_experts_per_tok}",
             f"layout: {d.describe()} over {d.world_size} devices; batch {s.batch_size} x {s.seq_len} tokens "
             f"({_count(tok)} tokens) x {s.grad_accum} accumulation, {s.optimizer}, {s.precision}"]
    if p.routing is not None:
        lines.append(f"EP dispatch (uniform routing, ep.py's dedupe): {p.routing.rows:.2f} rows per token, "
                     f"{p.routing.rows - p.routing.self_rows:.2f} of them to other ranks")
    for n in p.notes:
        lines.append(f"note: {n}")
    shown = representative(p)
    rowsdef = [("parameters (fp32 master)", "params"), ("gradients (fp32)", "grads"),
               ("DDP gradient buckets", "buckets"), ("optimizer state", "optimizer"),
               ("activations", "activations"), ("gathered parameters (FSDP)", "gathered"),
               ("backward transient", "transient"), ("peak", "peak")]
    head = ["memory per device"] + [r.label for r in shown]
    table = [head]
    for label, key in rowsdef:
        vals = [getattr(r.memory, key) for r in shown]
        if key != "peak" and not any(vals):
            continue
        table.append([label] + [_size(v) for v in vals])
    parts = sorted({k for r in shown for k, v in r.memory.activation_parts.items() if v})
    for k in parts:
        table.append([f"  activations: {k}"] + [_size(r.memory.activation_parts.get(k, 0.0)) for r in shown])
    if p.dims.pp > 1:
        table.append(["  (microbatches in flight)"] + [f"{r.memory.inflight:g}" for r in shown])
    table.append(["peak at"] + [r.memory.peak_at for r in shown])
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    lines.append("")
    for i, row in enumerate(table):
        lines.append("  ".join(v.ljust(widths[0]) if j == 0 else v.rjust(widths[j]) for j, v in enumerate(row)))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    for r in shown:
        lines.append("")
        lines.append(f"communication per optimizer step, {r.label} (bytes sent by the rank; ring algorithms):")
        for cm in sorted(r.comm, key=lambda x: -x.bytes):
            lines.append(f"  {cm.kind:<14} {cm.dim:<20} {_size(cm.bytes):>12}  {cm.calls:>8,.0f} calls  {cm.what}")
        lines.append(f"  {'total':<14} {'':<20} {_size(r.comm_bytes()):>12}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- the command
def load_config(preset: str | None, config: str | None):
    """The ``ModelConfig`` of ``--preset NAME`` (`dsfs.presets.MODEL_PRESETS`) or ``--config PATH`` (a config.json
    or a directory holding one). Raises `ConfigError` naming the option."""
    from reference import ModelConfig

    if (preset is None) == (config is None):
        raise ConfigError("expected exactly one of --preset NAME or --config PATH")
    if preset is not None:
        from dsfs.presets import MODEL_PRESETS

        if preset not in MODEL_PRESETS:
            raise ConfigError(f"--preset {preset}: expected one of {', '.join(MODEL_PRESETS)}")
        return ModelConfig(**MODEL_PRESETS[preset])
    try:
        return ModelConfig.from_json(config)
    except (OSError, ValueError) as e:
        raise ConfigError(f"--config {config}: {e}") from None


def add_plan(sub) -> None:
    """Register ``dsfs plan``: memory per device and communication per step of a training layout (`plan`)."""
    from dsfs.cli import add_parallel_options

    p = sub.add_parser(
        "plan",
        help="predict memory per device and bytes communicated per step of a multi-device training layout",
        description="From a model config and a layout, print per device the memory of parameters, gradients, "
        "optimizer state and activations and the peak, and per optimizer step the bytes each collective sends "
        "(ring algorithms, bytes a rank sends), per mesh dimension. Nothing runs; no device is needed.",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", metavar="NAME", help="a dsfs train preset's model (tiny, nano, small, base); "
                     "its training options are the defaults")
    src.add_argument("--config", metavar="PATH", help="a Hugging Face config.json, or a model directory holding one")
    g = p.add_argument_group("training shape (default: the preset's, else batch 8 x 4096, adamw, bf16)")
    g.add_argument("--batch-size", type=int, metavar="B", help="sequences per micro-batch, whole world")
    g.add_argument("--seq-len", type=int, metavar="T", help="tokens per sequence")
    g.add_argument("--grad-accum", type=int, metavar="N", help="micro-batches per optimizer step")
    g.add_argument("--optimizer", choices=["adamw", "muon"])
    g.add_argument("--precision", choices=list(PRECISIONS), help="fp32, bf16 (autocast, bf16 moments) or fp8 "
                   "(FP8 GEMMs, bf16 elsewhere, bf16 moments)")
    add_parallel_options(p)
    p.set_defaults(func=_run_plan)


def _run_plan(args) -> int:
    from dsfs.cli import parallel_args

    if args.preset is None and args.config is None:
        args.preset = "tiny"
    cfg = load_config(args.preset, args.config)
    base = dict(batch_size=8, seq_len=4096, grad_accum=1, optimizer="adamw", precision="bf16")
    if args.preset is not None:
        from dsfs.presets import TRAIN_PRESETS

        tc = TRAIN_PRESETS.get(args.preset)
        if tc is not None:
            base = dict(batch_size=tc.batch_size, seq_len=tc.seq_len, grad_accum=tc.grad_accum,
                        optimizer=tc.optimizer, precision="fp32")
    for k in base:
        v = getattr(args, k)
        if v is not None:
            base[k] = v
    shape = TrainShape(**base)
    nproc, degrees = parallel_args(args)
    dims = planned_dims(nproc, degrees)
    print(format_plan(plan(cfg, dims, shape)))
    return 0


def planned_dims(world_size: int, degrees: dict) -> ParallelDims:
    """`ParallelDims` of ``world_size`` devices and ``degrees`` (``dsfs train``'s option names), validated by it; the
    planner also accepts ZeRO-1 with pipeline, expert, tensor or context parallelism (DeepSeek-V3's layout), which
    ``ParallelDims`` refuses for ``dsfs train``: those degrees are validated as ZeRO-2 and planned as ZeRO-1."""
    degrees = dict(degrees)
    zero1 = degrees.get("zero") == 1 and any(degrees.get(k, 1) > 1 for k in ("tp", "pp", "cp", "ep",
                                                                               "dp_replicate"))
    if zero1:
        degrees["zero"] = 2
    dims = ParallelDims(world_size=world_size, **degrees)
    if zero1:
        object.__setattr__(dims, "zero", 1)
    return dims


def main(argv: list[str] | None = None) -> int:
    """``python -m dsfs.parallel.plan ARGS``: ``dsfs plan ARGS`` (`add_plan`) through the ``dsfs`` command line's
    error handling (a `dsfs.errors.UserError` is one ``dsfs: error:`` line, exit 1)."""
    import argparse
    import sys

    from dsfs.errors import UserError

    parser = argparse.ArgumentParser(prog="dsfs")
    add_plan(parser.add_subparsers(dest="verb"))
    args = parser.parse_args(["plan", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.func(args)
    except UserError as e:
        print(f"dsfs: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
