"""Model and training presets for ``dsfs train --preset``.

``tiny`` (DeepSeekMoE + MLA + MTP depth 1) is sized for 2 CPU cores and 10 minutes, and so are its DeepSeek-V3.2
(``tiny-v32``: DSA) and DeepSeek-V4 (``tiny-v4``: mHC, CSA/HCA, hash MoE) versions; ``nano`` is a student for
distilling it; ``small`` and ``base`` are for a GPU or an Apple Silicon Mac. Each preset is a ``ModelConfig``
keyword dict (`MODEL_PRESETS`) plus a `TrainConfig` (`TRAIN_PRESETS`).
"""

from __future__ import annotations

from dsfs.train_config import TrainConfig

MODEL_PRESETS: dict[str, dict] = {
    # hidden 128: in less wall-clock time it ends where hidden 192 does (bench/results/tiny_preset_sweep.md). The
    # LM head is tied to the embedding: on the 2 MiB sample the model overfits, and the tie (0.5M parameters fewer)
    # lowered validation loss by 0.07 under AdamW
    "tiny": dict(
        hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=384,
        moe_intermediate_size=128, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
        n_group=1, topk_group=1, first_k_dense_replace=1, routed_scaling_factor=1.0,
        q_lora_rank=None, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
        num_nextn_predict_layers=1, max_position_embeddings=1024, rope_theta=10000.0, tie_word_embeddings=True,
    ),
    # a student for distilling tiny (dsfs distill --student-preset nano): 1.1M parameters against tiny's 2.8M, without
    # MTP; `dsfs train --preset nano` trains the same model from scratch on tiny's schedule (the baseline)
    "nano": dict(
        hidden_size=96, num_hidden_layers=3, num_attention_heads=4, intermediate_size=288,
        moe_intermediate_size=96, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
        n_group=1, topk_group=1, first_k_dense_replace=1, routed_scaling_factor=1.0,
        q_lora_rank=None, kv_lora_rank=48, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
        num_nextn_predict_layers=0, max_position_embeddings=1024, rope_theta=10000.0, tie_word_embeddings=True,
    ),
    # DeepSeek-V3.2 at tiny's size: DSA (a lightning indexer keeps the top 64 of up to 256 keys per query), so the
    # query goes through a latent (q_lora_rank 64) as the indexer reads it
    "tiny-v32": dict(
        model_type="deepseek_v32", attention_type="dsa", hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
        intermediate_size=384, moe_intermediate_size=128, n_routed_experts=8, num_experts_per_tok=2,
        n_shared_experts=1, n_group=1, topk_group=1, first_k_dense_replace=1, routed_scaling_factor=1.0,
        q_lora_rank=64, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
        index_n_heads=4, index_head_dim=32, index_topk=64, num_nextn_predict_layers=1, max_position_embeddings=1024,
        rope_theta=10000.0, tie_word_embeddings=True,
    ),
    # DeepSeek-V4 at tiny's width and depth (V4 report; reference.v4_model): mHC with 4 streams, CSA (4x + indexer
    # top-16) and HCA layers alternating after a sliding window of 32 tokens, a hash-routed first MoE layer,
    # sqrt-softplus routing, MTP depth 1; the compression rates scaled to 256-token sequences (HCA 32 instead of 128)
    "tiny-v4": dict(
        model_type="deepseek_v4", hidden_size=128, num_hidden_layers=4, num_attention_heads=4, head_dim=32,
        partial_rotary_factor=0.5, q_lora_rank=64, o_groups=2, o_lora_rank=64, sliding_window=32,
        layer_types=["heavily_compressed_attention", "compressed_sparse_attention", "heavily_compressed_attention",
                     "compressed_sparse_attention"],
        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 32},
        index_n_heads=4, index_head_dim=32, index_topk=16, mlp_layer_types=["hash_moe", "moe", "moe", "moe"],
        moe_intermediate_size=128, n_routed_experts=8, num_experts_per_tok=2, routed_scaling_factor=1.0,
        hc_mult=4, hc_sinkhorn_iters=20, num_nextn_predict_layers=1, max_position_embeddings=1024,
        tie_word_embeddings=True,
    ),
    "small": dict(
        hidden_size=512, num_hidden_layers=8, num_attention_heads=8, intermediate_size=1536,
        moe_intermediate_size=256, n_routed_experts=32, num_experts_per_tok=4, n_shared_experts=1,
        n_group=4, topk_group=2, first_k_dense_replace=1, routed_scaling_factor=2.0,
        q_lora_rank=256, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
        num_nextn_predict_layers=1, max_position_embeddings=2048,
    ),
    "base": dict(
        hidden_size=1024, num_hidden_layers=16, num_attention_heads=16, intermediate_size=3072,
        moe_intermediate_size=512, n_routed_experts=64, num_experts_per_tok=6, n_shared_experts=2,
        n_group=8, topk_group=4, first_k_dense_replace=1, routed_scaling_factor=2.5,
        q_lora_rank=512, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
        num_nextn_predict_layers=1, max_position_embeddings=4096,
    ),
}

TRAIN_PRESETS: dict[str, TrainConfig] = {
    # under 10 minutes on 2 CPU cores: 1,300 x 8 x 256 = 2.7M tokens (5.4 epochs of the sample) at ~0.35 s a step
    # with Muon (Newton-Schulz adds ~0.08 s a step here, and gains ~0.1 nats over AdamW at equal steps); weight
    # decay 1.0 against the overfitting; the cosine ends at 0 (Muon's step size is lr times a fixed norm, so only
    # a zero lr removes its noise: 0.04 nats over ending at 0.1 lr); the time budget caps a slow machine's run at
    # 9 min 10 s of training. The sweep behind each value: bench/results/tiny_preset_sweep.md
    "tiny": TrainConfig(batch_size=8, seq_len=256, lr=6e-3, min_lr_ratio=0.0, warmup_steps=60, max_steps=1300,
                        time_budget_s=550, weight_decay=1.0, grad_clip=1.0, grad_accum=1, eval_every=100,
                        eval_batches=12, mtp_weight=0.3, optimizer="muon"),
    "nano": TrainConfig(batch_size=8, seq_len=256, lr=6e-3, min_lr_ratio=0.0, warmup_steps=60, max_steps=1300,
                        time_budget_s=550, weight_decay=1.0, grad_clip=1.0, grad_accum=1, eval_every=100,
                        eval_batches=12, mtp_weight=0.3, optimizer="muon"),
    "tiny-v32": TrainConfig(batch_size=8, seq_len=256, lr=6e-3, min_lr_ratio=0.0, warmup_steps=60, max_steps=1300,
                            time_budget_s=550, weight_decay=1.0, grad_clip=1.0, grad_accum=1, eval_every=100,
                            eval_batches=12, mtp_weight=0.3, optimizer="muon"),
    # V4 trains at about half tiny's tokens/s here (4 mHC streams, the compressors, the indexers' KL): 1,000 steps fit
    # the 550 s budget with the cosine run to 0 (1,300 stopped at step 1,072 at 8% of the peak lr: 3.075)
    "tiny-v4": TrainConfig(batch_size=8, seq_len=256, lr=6e-3, min_lr_ratio=0.0, warmup_steps=60, max_steps=1000,
                           time_budget_s=550, weight_decay=1.0, grad_clip=1.0, grad_accum=1, eval_every=100,
                           eval_batches=12, mtp_weight=0.3, optimizer="muon"),
    "small": TrainConfig(batch_size=32, seq_len=512, lr=1e-3, min_lr_ratio=0.1, warmup_steps=200, max_steps=5000,
                         time_budget_s=None, weight_decay=0.1, grad_clip=1.0, grad_accum=1, eval_every=250,
                         eval_batches=32, mtp_weight=0.3, optimizer="adamw"),
    "base": TrainConfig(batch_size=32, seq_len=1024, lr=6e-4, min_lr_ratio=0.1, warmup_steps=500, max_steps=20000,
                        time_budget_s=None, weight_decay=0.1, grad_clip=1.0, grad_accum=4, eval_every=500,
                        eval_batches=32, mtp_weight=0.3, optimizer="adamw"),
}
