"""Tiny random Hugging Face models built from configs (no downloads), shared by the tests."""

import torch
from transformers import AutoConfig, AutoModelForCausalLM

TINY = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=512)

FAMILIES = {
    "qwen3": {},
    "llama": {},
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1,
                      mlp_only_layers=[]),
}


def tiny_model(model_type: str, attn_implementation: str = "zeropad_varlen", seed: int = 0, **overrides):
    import zeropad.model.attention  # noqa: F401  (registers zeropad_varlen)

    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, **{**TINY, **FAMILIES[model_type], **overrides})
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=torch.float32)
