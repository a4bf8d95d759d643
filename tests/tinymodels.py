"""Tiny random Hugging Face models built from configs (no downloads), shared by the tests."""

import torch
from transformers import AutoConfig, AutoModelForCausalLM

TINY = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
            pad_token_id=0, bos_token_id=1, eos_token_id=2)

# The families the training tests (checkpointing, chunked loss, memory plan) run on.
FAMILIES = {
    "qwen3": {},
    "llama": {},
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1,
                      mlp_only_layers=[]),
}

# Every family the exactness suite must pass. Windows are short (8 tokens) so that the test
# documents run past them.
EXACT_FAMILIES = {
    **FAMILIES,
    "qwen2": {},
    "gemma2": dict(sliding_window=8, query_pre_attn_scalar=16),
    "gemma3_text": dict(sliding_window=8, query_pre_attn_scalar=16, sliding_window_pattern=2),
    "olmo2": {},
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=8,
                    layer_types=["sliding_attention", "full_attention"],
                    rope_parameters=dict(rope_type="yarn", rope_theta=150000.0, factor=32.0, beta_fast=32.0,
                                         beta_slow=1.0, truncate=False, original_max_position_embeddings=16)),
    "deepseek_v3": dict(n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=32,
                        kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12,
                        head_dim=8, num_key_value_heads=4, first_k_dense_replace=1, n_group=1, topk_group=1),
}


def tiny_config(model_type: str, **overrides):
    return AutoConfig.for_model(model_type, **{**TINY, **EXACT_FAMILIES.get(model_type, {}), **overrides})


def tiny_model(model_type: str, attn_implementation: str = "zeropad_varlen", seed: int = 0, **overrides):
    import zeropad.model.attention  # noqa: F401  (registers zeropad_varlen)

    torch.manual_seed(seed)
    config = tiny_config(model_type, **overrides)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=torch.float32)
