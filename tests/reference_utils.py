"""Shared helpers for the reference-model tests: tiny configs, O(1) random weights, naive re-derivations.

The naive functions here are written from the papers' equations (loops / einsums over explicit heads),
not from the reference code, so a test that compares the two can fail.
"""

from __future__ import annotations

import torch

from reference import Model, ModelConfig

# ----------------------------------------------------------------------------- configs


def make_config(attention_type: str = "mla", moe_type: str = "deepseek", **overrides) -> ModelConfig:
    """A tiny config (hidden 32, 2 layers, vocab 97, 8 routed experts top-2) for ``attention_type``.

    DSA gets 8 indexer heads: with fewer, a query often sees several keys whose every ReLU term is 0, an exact
    tie in the index scores that top-k breaks differently in a full and a cached pass (see test_dsa)."""
    base = dict(
        attention_type=attention_type, moe_type=moe_type, vocab_size=97, hidden_size=32,
        intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
        q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=1, topk_group=1,
        first_k_dense_replace=1, max_position_embeddings=64, index_n_heads=8, index_head_dim=8,
        index_topk=4, routed_scaling_factor=1.5,
    )
    if attention_type == "dsa":
        base.update(model_type="deepseek_v32", q_lora_rank=12)
    if attention_type == "gqa":
        base.update(num_key_value_heads=2)
    base.update(overrides)
    return ModelConfig(**base)


# ----------------------------------------------------------------------------- weights


@torch.no_grad()
def randomize_(module: torch.nn.Module, norm_noise: float = 0.1, router_bias: float = 0.0) -> torch.nn.Module:
    """Redraw every parameter so activations are O(1): matrices ``N(0, fan_in**-0.5)`` (fan_in = last dim),
    norm gains ``1 + N(0, norm_noise)``, biases ``N(0, 0.1)``; the routing correction bias ``N(0, router_bias)``.
    The default init (std 0.02) gives nearly constant logits that hide errors."""
    for name, p in module.named_parameters():
        parts = name.split(".")
        owner = parts[-2] if len(parts) > 1 else ""
        if p.ndim == 1 and parts[-1] == "bias":
            p.normal_(0.0, 0.1)
        elif p.ndim == 1 and "norm" in owner:
            p.copy_(1.0 + norm_noise * torch.randn_like(p))
        elif p.ndim == 1:
            p.normal_(0.0, 0.1)
        else:
            p.normal_(0.0, p.shape[-1] ** -0.5)
    for name, b in module.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.normal_(0.0, router_bias) if router_bias > 0 else b.zero_()
    return module


def make_model(config: ModelConfig, dtype=torch.float32, router_bias: float = 0.0) -> Model:
    """``Model(config)`` with O(1) random weights, in eval mode."""
    model = Model(config)
    randomize_(model, router_bias=router_bias)
    return model.to(dtype).eval()


def tiny_model(attention_type: str = "mla", dtype=torch.float32, router_bias: float = 0.05, **overrides) -> Model:
    """`make_model` of `make_config` (``attention_type``, ``overrides``) with correction biases of scale
    ``router_bias``: the model most reference tests draw."""
    return make_model(make_config(attention_type, **overrides), dtype, router_bias=router_bias)


def assert_o1(t: torch.Tensor, what: str = "logits", lo: float = 0.3, hi: float = 3.0) -> float:
    """Assert that ``t`` is not nearly constant: its std lies in [lo, hi]. Returns the std."""
    s = t.detach().double().std().item()
    assert lo <= s <= hi, f"{what}: std {s:.3g} outside [{lo}, {hi}]; the test weights are badly scaled"
    return s


def rand_ids(config: ModelConfig, batch: int, seq: int) -> torch.Tensor:
    return torch.randint(0, config.vocab_size, (batch, seq))


# ----------------------------------------------------------------------------- naive math


def naive_rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)


def naive_layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Official DeepSeek ``apply_rotary_emb``: pairs (x[2i], x[2i+1]) as complex numbers times e^{i theta}."""
    z = torch.complex(x[..., 0::2], x[..., 1::2]) * torch.complex(cos, sin)
    return torch.stack((z.real, z.imag), dim=-1).flatten(-2)


def rope_neox(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Llama/NeoX ``x * cos + rotate_half(x) * sin`` with cos/sin repeated over both halves."""
    half = x.shape[-1] // 2
    c, s = torch.cat((cos, cos), -1), torch.cat((sin, sin), -1)
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * c + rot * s


def _lin(layer, x):
    y = x @ layer.weight.T
    return y if layer.bias is None else y + layer.bias


def naive_mla(attn, x, cos, sin, select: torch.Tensor | None = None) -> torch.Tensor:
    """MLA from DeepSeek-V3 report eq. 1-11, per head and in full (no cache), for the `reference.mla.MLA`
    layer ``attn``. ``x`` (B, T, hidden), ``cos``/``sin`` (T, dr/2); ``select`` (B, T, T) boolean extra mask."""
    b, t, _ = x.shape
    h, dn, dr, dv, r = attn.n_heads, attn.dn, attn.dr, attn.dv, attn.r
    rope = rope_interleaved if attn.interleaved else rope_neox
    if attn.q_lora_rank is None:
        q = _lin(attn.q_proj, x)
    else:
        cq = naive_rms(_lin(attn.q_a_proj, x), attn.q_a_layernorm.weight, attn.q_a_layernorm.eps)
        q = _lin(attn.q_b_proj, cq)
    q = q.view(b, t, h, dn + dr)
    q_nope, q_pe = q[..., :dn], rope(q[..., dn:].transpose(1, 2), cos, sin)  # (B,T,H,dn), (B,H,T,dr)
    kv_a = _lin(attn.kv_a_proj_with_mqa, x)
    c_kv = naive_rms(kv_a[..., :r], attn.kv_a_layernorm.weight, attn.kv_a_layernorm.eps)  # (B,T,r)
    k_pe = rope(kv_a[..., r:], cos, sin)  # (B,T,dr), one head shared by all heads
    kv = _lin(attn.kv_b_proj, c_kv).view(b, t, h, dn + dv)
    k_nope, v = kv[..., :dn], kv[..., dn:]
    logits = (torch.einsum("bthd,bshd->bhts", q_nope, k_nope) + torch.einsum("bhtd,bsd->bhts", q_pe, k_pe))
    logits = logits * attn.scale
    mask = torch.ones(t, t, dtype=torch.bool).tril()[None, None]
    if select is not None:
        mask = mask & select[:, None]
    p = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)
    o = torch.einsum("bhts,bshd->bthd", p, v).reshape(b, t, h * dv)
    return _lin(attn.o_proj, o)


def naive_index_scores(indexer, x, q_latent, cos, sin) -> torch.Tensor:
    """V3.2 lightning indexer ``I[t,s] = sum_h w[t,h] relu(q[t,h] . k[s]) / sqrt(D)``, w = weights_proj(x)/sqrt(H),
    NeoX RoPE on the first ``qk_rope_head_dim`` features. Returns (B, T, S)."""
    b, t, _ = x.shape
    nh, d, dr = indexer.n_heads, indexer.head_dim, indexer.dr
    q = _lin(indexer.wq_b, q_latent).view(b, t, nh, d).transpose(1, 2)  # (B,H,T,D)
    k = naive_layer_norm(_lin(indexer.wk, x), indexer.k_norm.weight, indexer.k_norm.bias, indexer.k_norm.eps)
    q = torch.cat((rope_neox(q[..., :dr], cos, sin), q[..., dr:]), -1)
    k = torch.cat((rope_neox(k[..., :dr], cos, sin), k[..., dr:]), -1)
    w = _lin(indexer.weights_proj, x) * nh**-0.5  # (B,T,H)
    out = torch.zeros(b, t, t, dtype=x.dtype)
    for hh in range(nh):
        out += w[:, :, hh, None] * torch.relu(q[:, hh] @ k.transpose(1, 2) * d**-0.5)
    return out


def expert_ffn(experts, e: int, x: torch.Tensor) -> torch.Tensor:
    """SwiGLU expert ``e`` of a `reference.moe.Experts` on (..., H)."""
    g = x @ experts.gate_proj[e].T
    u = x @ experts.up_proj[e].T
    return (g * torch.sigmoid(g) * u) @ experts.down_proj[e].T


def naive_experts(experts, x, idx, w) -> torch.Tensor:
    """Per-token loop: ``y[n] = sum_k w[n,k] * expert_{idx[n,k]}(x[n])``."""
    rows = []
    for n in range(x.shape[0]):
        acc = torch.zeros_like(x[n])
        for j in range(idx.shape[1]):
            acc = acc + w[n, j].to(x.dtype) * expert_ffn(experts, int(idx[n, j]), x[n])
        rows.append(acc)
    return torch.stack(rows)


# ----------------------------------------------------------------------------- gradcheck


class _Call(torch.nn.Module):
    def __init__(self, module, fn):
        super().__init__()
        self.m, self.fn = module, fn

    def forward(self, *ts):
        return self.fn(self.m, *ts)


def gradcheck_module(module, fn, inputs, names=(), **kwargs) -> bool:
    """``torch.autograd.gradcheck`` of ``fn(module, *inputs)`` with respect to ``inputs`` (float64 tensors that
    require grad) and the module parameters ``names`` (swapped in by `torch.func.functional_call`)."""
    named = dict(module.named_parameters())
    params = [named[n].detach().clone().requires_grad_(True) for n in names]
    wrapper = _Call(module, fn)
    k = len(inputs)

    def f(*ts):
        return torch.func.functional_call(wrapper, {f"m.{n}": p for n, p in zip(names, ts[k:], strict=True)}, ts[:k])

    return torch.autograd.gradcheck(f, (*inputs, *params), **kwargs)
