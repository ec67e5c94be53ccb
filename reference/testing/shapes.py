"""Dimensions of released DeepSeek models, for the specs' ``model`` samples (from their ``config.json``).

A sample keeps the dimensions a kernel tiles over (hidden size, head dims, latent rank, experts, groups) and
takes few tokens, so the battery runs on a CPU and under Triton's interpreter; where a whole weight would not
fit (the 129,280 x 7,168 LM head, 256 experts of 2,048 x 7,168), the sample says which dimension it slices.
"""

from __future__ import annotations

V3 = dict(  # deepseek-ai/DeepSeek-V3 (671B); DeepSeek-R1 has the same shapes
    name="V3 671B", hidden_size=7168, num_attention_heads=128, q_lora_rank=1536, kv_lora_rank=512,
    qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, vocab_size=129280, intermediate_size=18432,
    moe_intermediate_size=2048, n_routed_experts=256, num_experts_per_tok=8, n_group=8, topk_group=4,
    n_shared_experts=1, routed_scaling_factor=2.5, norm_topk_prob=True,
)
V32 = dict(V3, name="V3.2", index_n_heads=64, index_head_dim=128, index_topk=2048)  # deepseek-ai/DeepSeek-V3.2-Exp
V2_LITE = dict(  # deepseek-ai/DeepSeek-V2-Lite (16B)
    name="V2-Lite", hidden_size=2048, num_attention_heads=16, q_lora_rank=None, kv_lora_rank=512,
    qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, vocab_size=102400, intermediate_size=10944,
    moe_intermediate_size=1408, n_routed_experts=64, num_experts_per_tok=6, n_group=1, topk_group=1,
    n_shared_experts=2, routed_scaling_factor=1.0, norm_topk_prob=False,
)
MODELS = (V3, V32, V2_LITE)
