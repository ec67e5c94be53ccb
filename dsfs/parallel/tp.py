"""Tensor parallelism for the dsfs model: Megatron-style column/row-parallel linears (Shoeybi et al. 2019) with
sequence-parallel norms (Korthikanti et al. 2022), through DTensor's ``parallelize_module``
(``torch.distributed.tensor.parallel``), following the plan torchtitan uses for DeepSeek-V3.

`apply_tp` changes a `reference.Model` (or ``runtime_cuda.Model``) in place; parameter names never change.

Layouts. Between modules every activation is a plain tensor. Inside the decoder stack the residual stream is
``(B, T / tp, H)``: each TP rank holds a contiguous chunk of the sequence (``Shard(1)``) when sequence parallelism
is active, else the whole ``(B, T, H)`` on every rank. Each decoder layer cuts a whole input onto the stream
(the embedding's output, a pipeline stage's input: free, a local chunk); the norms (and MTP's ``eh_proj``, a
token-wise linear) run on the stream as it is; attention and FFN inputs are all-gathered along the sequence; their
outputs, partial sums over the TP ranks (row-parallel), are reduce-scattered back onto the stream (all-reduced
without sequence parallelism); the final norms gather their output whole, as does the last layer of a pipeline
stage without the final norm (stages exchange whole hidden states). Sequence parallelism is active for a forward
whose sequence length tp divides (each decoder layer reads the length from its rotary table ``cos``, (T, d)), so
``model(ids)`` of any length and ``generate``'s one-token decode steps run as plain TP.

The plan, per module (``Colwise``: weight ``Shard(0)``, output split over heads / intermediate features;
``Rowwise``: weight ``Shard(1)``, output a partial sum; ``Replicated``: weight a ``Replicate()`` DTensor, computed
on local tensors):

- MLA (`reference.mla.MLA`, and DSA): ``q_b_proj`` (``q_proj`` without ``q_lora_rank``) and ``kv_b_proj``
  colwise, ``o_proj`` rowwise; each rank holds ``n_heads / tp`` heads (the module's ``n_heads`` is set to that).
  ``q_a_proj``, ``kv_a_proj_with_mqa`` and their norms are replicated: they map the hidden state to the small
  latents (``q_lora_rank`` + ``kv_lora_rank`` + ``qk_rope_head_dim``) shared by every head, so splitting them would
  save little and need a gather of the latents; replicated, their backward all-reduces latent-sized gradients
  (the colwise inputs ``q_latent`` and ``c_kv``, the shared ``k_pe``), smaller than the hidden state. The absorbed
  decode form (`MLA.attend_absorbed`) reads the local heads' rows of ``kv_b_proj``'s weight. DSA's indexer stays
  replicated (plain parameters; it gets no gradient from the LM loss). Standard attention (MHA/GQA): ``q_proj``,
  ``k_proj``, ``v_proj`` colwise (local ``n_heads`` and ``n_kv``), ``o_proj`` rowwise.
- Dense MLP and DeepSeekMoE's shared experts (`reference.swiglu.MLP`): ``gate_proj``/``up_proj`` colwise,
  ``down_proj`` rowwise.
- DeepSeekMoE: the input is gathered whole; the router (``gate``, replicated) and the routed experts (``experts``,
  plain parameters) run on the whole batch on every TP rank (ETP = 1: experts are not tensor-parallel); the
  shared experts' partial output is all-reduced and added, and the MoE output is cut back onto the stream. The
  expert loads (``expert_load``) and the balance loss are therefore those of the whole batch, equal on every TP
  rank (no reduction over TP). Expert parallelism (``dsfs.parallel.ep``) is a separate dimension that may take
  over ``experts`` after `apply_tp`.
- Norms (``input_layernorm``, ``post_attention_layernorm``, ``model.norm``, MTP's ``enorm``, ``hnorm``,
  ``shared_head.norm``) and MTP's ``eh_proj``: replicated, run on the stream (sequence-parallel); ``model.norm``
  and ``shared_head.norm`` gather their output whole for the LM head. MTP's ``enorm`` cuts the (whole) embedding
  onto the stream, ``hnorm`` its input when it is whole (depth 1 reads the main model's gathered final hidden
  state, depth k > 1 the stream of depth k - 1). MTP blocks are decoder layers and get the plan above.
- Embedding and LM head: replicated plain parameters (the embedding's output is whole). The LM loss
  (`reference.model.Model.lm_loss`) hands ``lm_head.weight`` itself to the fused cross-entropy outside any
  module's forward, and the tiny presets tie it to the embedding, so it must stay a plain tensor; a vocabulary-
  parallel head would need a TP-aware fused loss.

Gradients: a replicated parameter computed on the whole tokens gets the whole gradient on every rank
(``Replicate``); one computed on the sequence shard (norms, ``eh_proj``) gets a ``Partial()`` gradient (a sum over
the TP ranks), which FSDP2's ``fully_shard`` reduces (as for torch's ``SequenceParallel``), as do ``full_tensor()``
and `reduce_partial_grads`. Triton kernels (``runtime_cuda``) only ever see local tensors: replicated modules
swap their DTensor parameters for ``to_local()`` views during their forward, as ``torch.func.functional_call``
swaps parameters.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel, parallelize_module

from dsfs.errors import ConfigError
from dsfs.parallel.layout import ParallelDims


class _SequenceState:
    """Whether sequence parallelism is active for the current forward, and its global sequence length."""

    def __init__(self, enabled: bool, tp: int):
        self.enabled, self.tp, self.active, self.seq = enabled, tp, enabled, None

    def start(self, seq_len: int) -> None:
        """Called with the forward's sequence length T (by each decoder layer and the embedding)."""
        self.seq, self.active = seq_len, self.enabled and seq_len % self.tp == 0

    def stream(self) -> list:
        """The residual stream's placement: ``Shard(1)`` (the sequence) or ``Replicate()``."""
        return [Shard(1)] if self.active else [Replicate()]


# ------------------------------------------------------------------ layout changes (plain tensors in and out)


def _gather(x: torch.Tensor, mesh, st: _SequenceState, local: bool = True):
    """Stream (B, T/tp, H) -> whole (B, T, H): all-gather along the sequence (nothing without sequence
    parallelism). ``local``: a plain tensor whose gradient must be whole on every rank (backward: the local
    chunk), else a ``Replicate()`` DTensor for colwise linears (backward: reduce-scatter, or all-reduce, of their
    partial gradients)."""
    if local and not st.active:
        return x
    d = DTensor.from_local(x, mesh, st.stream(), run_check=False)
    if st.active:
        d = d.redistribute(mesh, [Replicate()])
    return d.to_local() if local else d


def _scatter(y: torch.Tensor, mesh, st: _SequenceState) -> torch.Tensor:
    """A row-parallel ``Partial()`` DTensor or a whole plain tensor -> the stream: reduce-scatter (all-reduce
    without sequence parallelism) or the local chunk. Backward: all-gather of the gradient (or nothing)."""
    if not isinstance(y, DTensor):
        if not st.active:
            return y
        y = DTensor.from_local(y, mesh, [Replicate()], run_check=False)
    return y.redistribute(mesh, st.stream()).to_local()


def _scatter_whole(x: torch.Tensor, mesh, st: _SequenceState) -> torch.Tensor:
    """`_scatter` for an input that is whole (its length the forward's) or already on the stream (kept)."""
    return _scatter(x, mesh, st) if st.active and x.shape[1] == st.seq else x


def _replicate(x: torch.Tensor, mesh, st: _SequenceState) -> DTensor:
    """A whole plain tensor -> ``Replicate()`` DTensor; backward all-reduces the partial gradients of colwise
    linears."""
    return DTensor.from_local(x, mesh, [Replicate()], run_check=False)


def _reduce(y: DTensor, mesh, st: _SequenceState) -> torch.Tensor:
    """A row-parallel ``Partial()`` DTensor -> whole plain tensor (all-reduce)."""
    return y.redistribute(mesh, [Replicate()]).to_local()


def _sum_grad(x: torch.Tensor, mesh) -> torch.Tensor:
    """Identity forward; backward all-reduces the gradient over the TP ranks (Megatron's ``f``): for a whole
    tensor that each rank consumes with its own heads only (MLA's shared ``k_pe``, the absorbed form's
    ``c_kv``)."""
    return DTensor.from_local(x, mesh, [Replicate()], run_check=False).to_local(grad_placements=[Partial()])


_CONVERSIONS = {"gather": _gather, "gather_dtensor": functools.partial(_gather, local=False), "scatter": _scatter,
                "scatter_whole": _scatter_whole, "replicate": _replicate, "reduce": _reduce}


class _Local(ParallelStyle):
    """A module computed on plain local tensors: its first input converted by ``input`` and its output by
    ``output`` (names of `_CONVERSIONS`, or None), its own parameters made ``Replicate()`` DTensors when
    ``replicate`` and swapped for their ``to_local()`` views during its forward (gradient placement ``Partial()``
    when ``on_stream`` and sequence parallelism is active: the module then saw only this rank's tokens)."""

    def __init__(self, st: _SequenceState, replicate: bool = False, on_stream: bool = False, input: str | None = None,
                 output: str | None = None):
        super().__init__()
        self.st, self.replicate, self.on_stream, self.input, self.output = st, replicate, on_stream, input, output

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        st, mesh = self.st, device_mesh
        if self.input is not None:
            convert_in = _CONVERSIONS[self.input]
            module.register_forward_pre_hook(lambda m, args: (convert_in(args[0], mesh, st), *args[1:]))
        if self.replicate:
            names = [n for n, p in module.named_parameters(recurse=False) if p is not None]
            for n in names:
                p = module._parameters[n]
                module.register_parameter(n, nn.Parameter(DTensor.from_local(p.detach(), mesh, [Replicate()],
                                                                             run_check=False), p.requires_grad))
            saved: list[dict] = []

            def swap_in(m, args):
                grad = [Partial()] if self.on_stream and st.active else [Replicate()]
                saved.append({n: m._parameters[n] for n in names})
                for n in names:  # a plain tensor in the registry for the forward only, as functional_call does
                    m._parameters[n] = saved[-1][n].to_local(grad_placements=grad)

            def swap_out(m, args, out):
                m._parameters.update(saved.pop())

            module.register_forward_pre_hook(swap_in)
            module.register_forward_hook(swap_out, always_call=True)
        if self.output is not None:
            convert_out = _CONVERSIONS[self.output]
            module.register_forward_hook(lambda m, args, out: convert_out(out, mesh, st))
        return module


# ------------------------------------------------------------------ attention


class _TPMLA:
    """Mixed into an MLA (or DSA) module's class under TP: ``n_heads`` is the local head count, ``kv_b_proj``'s
    weight a ``Shard(0)`` DTensor. Sums the gradients of the shared latent tensors that the local heads consume
    directly (``k_pe``; in the absorbed form also ``c_kv``, which then bypasses the colwise ``kv_b_proj`` module)."""

    tp_mesh = None

    def attend_naive(self, q_nope, q_pe, c_kv, k_pe, mask):
        return super().attend_naive(q_nope, q_pe, c_kv, _sum_grad(k_pe, self.tp_mesh), mask)

    def attend_absorbed(self, q_nope, q_pe, c_kv, k_pe, mask):
        """`reference.mla.MLA.attend_absorbed` over the local heads: their rows of ``kv_b_proj``'s weight."""
        c_kv, k_pe = _sum_grad(c_kv, self.tp_mesh), _sum_grad(k_pe, self.tp_mesh)
        w = self.kv_b_proj.weight
        w = (w.to_local() if isinstance(w, DTensor) else w).view(self.n_heads, self.dn + self.dv, self.r)
        w_uk, w_uv = w[:, : self.dn], w[:, self.dn :]
        q_lat = torch.einsum("bhtd,hdr->bhtr", q_nope, w_uk)
        o_lat = self.attend_latent(q_lat, q_pe, c_kv, k_pe, mask)
        return torch.einsum("bhtr,hvr->bhtv", o_lat, w_uv)


@functools.cache
def _tp_class(cls: type) -> type:
    """``cls`` (an MLA class: the reference's, runtime_cuda's, DSA) with `_TPMLA` mixed in."""
    return type(f"TP{cls.__name__}", (_TPMLA, cls), {"__module__": __name__})


def _parallelize_attention(attn: nn.Module, mesh, st: _SequenceState) -> None:
    from reference.attention import Attention
    from reference.mla import MLA

    tp = mesh.size()
    rowwise = RowwiseParallel(output_layouts=Partial(), use_local_output=False)
    if isinstance(attn, MLA):
        q = "q_proj" if attn.q_lora_rank is None else "q_b_proj"
        plan = {q: ColwiseParallel(), "kv_b_proj": ColwiseParallel(), "o_proj": rowwise,
                "kv_a_proj_with_mqa": _Local(st, replicate=True), "kv_a_layernorm": _Local(st, replicate=True)}
        if attn.q_lora_rank is not None:
            plan.update(q_a_proj=_Local(st, replicate=True), q_a_layernorm=_Local(st, replicate=True))
        attn.__class__ = _tp_class(type(attn))
        attn.tp_mesh = mesh
        attn.n_heads //= tp
    elif isinstance(attn, Attention):
        plan = {"q_proj": ColwiseParallel(), "k_proj": ColwiseParallel(), "v_proj": ColwiseParallel(),
                "o_proj": rowwise}
        attn.n_heads //= tp
        attn.n_kv //= tp
    else:
        raise ConfigError(f"apply_tp: attention module {type(attn).__name__}: expected MLA, DSA or Attention")
    parallelize_module(attn, mesh, plan)
    parallelize_module(attn, mesh, _Local(st, input="gather", output="scatter"))


# ------------------------------------------------------------------ FFN


def _parallelize_mlp(mlp: nn.Module, mesh, st: _SequenceState, input: str, output: str) -> None:
    plan = {"gate_proj": ColwiseParallel(), "up_proj": ColwiseParallel(),
            "down_proj": RowwiseParallel(output_layouts=Partial(), use_local_output=False)}
    parallelize_module(mlp, mesh, plan)
    parallelize_module(mlp, mesh, _Local(st, input=input, output=output))


def _parallelize_ffn(ffn: nn.Module, mesh, st: _SequenceState) -> None:
    from reference.moe import DeepSeekMoE, MoE
    from reference.swiglu import MLP

    if isinstance(ffn, MLP):
        _parallelize_mlp(ffn, mesh, st, "gather_dtensor", "scatter")
    elif isinstance(ffn, (DeepSeekMoE, MoE)):
        parallelize_module(ffn.gate, mesh, _Local(st, replicate=True))
        if getattr(ffn, "shared_experts", None) is not None:
            _parallelize_mlp(ffn.shared_experts, mesh, st, "replicate", "reduce")
        parallelize_module(ffn, mesh, _Local(st, input="gather", output="scatter"))
    else:
        raise ConfigError(f"apply_tp: FFN module {type(ffn).__name__}: expected MLP, DeepSeekMoE or MoE")


def _parallelize_layer(layer: nn.Module, mesh, st: _SequenceState, gather_output: bool = False) -> None:
    """The plan of one decoder layer (main or MTP). Its pre-hook reads the forward's sequence length from the
    rotary table (``cos``: (T, d) for the T tokens of the call) and cuts a whole input onto the stream (a pipeline
    stage's input); ``gather_output``: gather its output whole (the last layer of a pipeline stage before the last,
    whose output travels to the next stage whole)."""
    _parallelize_attention(layer.self_attn, mesh, st)
    _parallelize_ffn(layer.mlp, mesh, st)
    for norm in (layer.input_layernorm, layer.post_attention_layernorm):
        parallelize_module(norm, mesh, _Local(st, replicate=True, on_stream=True))

    def enter(m, args, kwargs):
        x = args[0]
        cos = args[1] if len(args) > 1 else kwargs["cos"]
        st.start(cos.shape[0])
        if st.active and x.shape[1] == cos.shape[0]:
            return (_scatter(x, mesh, st), *args[1:]), kwargs
        return None

    layer.register_forward_pre_hook(enter, with_kwargs=True)
    if gather_output:  # a copy: to_local() returns a view, and a zero-bubble schedule detaches stage outputs in place
        layer.register_forward_hook(lambda m, args, out: _gather(out, mesh, st).clone())


# ------------------------------------------------------------------ the model


def apply_tp(model: nn.Module, tp_mesh, sequence_parallel: bool = True) -> None:
    """Tensor-parallelize ``model`` (a `reference.Model` or ``runtime_cuda.Model``) over the 1-D ``tp_mesh``, in
    place (the plan: module docstring). Every TP rank must then feed the same batch rows: the whole ``(B, T)``
    ``input_ids`` and targets; outputs (logits, losses, generated tokens) are whole and equal on every TP rank.
    ``sequence_parallel``: norms on the sequence shard and a sharded residual stream (for forwards whose length tp
    divides), else plain TP with activations replicated between blocks. A mesh of size 1 leaves the model as is.

    Parameters afterwards (names unchanged): ``Shard(0)``/``Shard(1)`` DTensors on ``tp_mesh`` for the colwise and
    rowwise linears, ``Replicate()`` DTensors for the norms, MLA's latent projections, the routers and MTP's
    ``eh_proj``; plain tensors (replicated over TP) for the embedding, the LM head, the routed experts and DSA's
    indexer. Raises `ConfigError` (from `ParallelDims.check_model`) when a width does not split over the mesh,
    for a mesh that is not 1-D, for a model already parallelized (TP applied twice, or after FSDP) or for a module
    this plan does not know. Source: Megatron-LM (Shoeybi et al.
    2019, section 3), sequence parallelism (Korthikanti et al. 2022, section 4.2.2), torch's
    ``torch.distributed.tensor.parallel``; torchtitan's DeepSeek-V3 plan."""
    if tp_mesh.ndim != 1:
        raise ConfigError(f"apply_tp: expected a 1-D tp mesh, got a mesh of shape {tuple(tp_mesh.shape)}")
    tp = tp_mesh.size()
    ParallelDims(dp_shard=1, tp=tp, world_size=tp).check_model(model.config)
    if tp == 1:
        return
    backbone = model.model
    layers = [layer for layer in backbone.layers if hasattr(layer, "self_attn")]  # a pipeline stage: its own only
    if any(isinstance(layer.input_layernorm.weight, DTensor) for layer in layers):
        raise ConfigError("apply_tp: the model's norms are DTensors already; expected a model not yet tensor- or "
                          "data-parallel (apply TP once, first: TP -> EP -> FSDP)")
    st = _SequenceState(sequence_parallel, tp)
    if getattr(backbone, "embed_tokens", None) is not None:
        backbone.embed_tokens.register_forward_pre_hook(lambda m, args: st.start(args[0].shape[1]))
    last_stage = getattr(backbone, "norm", None) is not None
    for i, layer in enumerate(layers):
        _parallelize_layer(layer, tp_mesh, st, gather_output=i == len(layers) - 1 and not last_stage)
    if getattr(backbone, "norm", None) is not None:
        parallelize_module(backbone.norm, tp_mesh, _Local(st, replicate=True, on_stream=True, output="gather"))
    for layer in getattr(model, "mtp", ()):
        _parallelize_layer(layer, tp_mesh, st)
        parallelize_module(layer, tp_mesh, {
            "enorm": _Local(st, replicate=True, on_stream=True, input="scatter"),
            "hnorm": _Local(st, replicate=True, on_stream=True, input="scatter_whole"),
            "eh_proj": _Local(st, replicate=True, on_stream=True),
            "shared_head.norm": _Local(st, replicate=True, on_stream=True, output="gather"),
        })


def reduce_partial_grads(model: nn.Module) -> None:
    """Reduce every ``Partial()`` DTensor gradient (the sequence-parallel norms') to its parameter's placements
    (an all-reduce over TP each), in place. For a TP run without FSDP2 (which does this itself), after backward
    and before gradient clipping or the optimizer step."""
    for p in model.parameters():
        g = p.grad
        if isinstance(g, DTensor) and g.placements != p.placements:
            p.grad = g.redistribute(g.device_mesh, p.placements)
