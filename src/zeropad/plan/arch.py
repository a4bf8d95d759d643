"""The architecture facts memory depends on, read from a model built on the meta device
(`zeropad.model.load.build_model(cfg, device="meta", lora=True)`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from zeropad.model.checkpointing import decoder_layers


@dataclass(frozen=True)
class Arch:
    """What memory depends on, read from a (meta-device) model and its config."""

    num_layers: int
    hidden: int
    intermediate: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab: int
    qk_norm: bool  # Qwen3 normalises q and k per head: two more RMSNorms' worth of saved tensors
    num_moe_layers: int
    num_experts: int
    experts_per_token: int
    moe_intermediate: int
    shared_intermediate: int  # always-on shared experts of a MoE layer (DeepSeek, Qwen2-MoE)
    num_params: int
    num_trainable_params: int  # all of them, or the adapters' with LoRA: what has gradients and optimizer state
    num_active_params: int  # per token: MoE layers count only experts_per_token of their experts
    num_expert_params: int  # routed experts' weights (grouped_mm runs them in the weights' dtype)
    num_matmul_params: int  # weights of all matmuls, experts and the LM head included
    num_active_matmul_params: int  # the language model's matmul weights a token runs through (train/metrics.py)
    num_head_params: int  # the output embedding (LM head)
    max_layer_params: int  # the largest decoder layer: what FSDP gathers at a time
    # Outside the language model: a VLM's vision tower and projector, Chameleon's VQ-VAE. Included in
    # num_params (and num_trainable_params): they have model states; their activations are not modelled.
    num_image_params: int = 0
    # A layer whose saved activations the planner's Llama/Qwen-style layer does not describe (None: it does)
    unmodelled_layer: str | None = None


def _text_params(model: torch.nn.Module) -> set[int]:
    """ids of the language model's parameters: its decoder and LM head. An image model nested inside the
    decoder as a model of its own (Chameleon's VQ-VAE) is outside it."""
    decoder = model.get_decoder()
    nested = [m for m in decoder.modules() if m is not decoder and isinstance(m, PreTrainedModel)]
    inner = {id(p) for m in nested for p in m.parameters()}
    text = {id(p) for p in decoder.parameters() if id(p) not in inner}
    return text | {id(p) for p in model.get_output_embeddings().parameters()}


def image_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The modules with parameters of their own outside the language model: a VLM's vision tower and projector,
    Chameleon's VQ-VAE."""
    text = _text_params(model)
    return [(name, module) for name, module in model.named_modules()
            if any(id(p) not in text for p in module.parameters(recurse=False))]


def arch_of(model: torch.nn.Module) -> Arch:
    """Works on a meta-device model: only shapes and counts are read. The language model's shape comes
    from the text config (a VLM's nests it)."""
    cfg = model.config.get_text_config()
    layers = [layer for _, layer in decoder_layers(model)]
    assert len(layers) == cfg.num_hidden_layers, f"{type(model).__name__}: decoder layers not found"
    params = dict(model.named_parameters())  # deduplicated: tied embeddings count once
    num_experts = getattr(cfg, "num_experts", None) or getattr(cfg, "n_routed_experts", None) or 0
    top_k = getattr(cfg, "num_experts_per_tok", None) or 0
    expert_params = sum(p.numel() for n, p in params.items() if ".experts." in n)
    text = _text_params(model)
    # the language model's matmul weights (stacked experts' biases are 2-D too, but no matmul's)
    weights = {n: p for n, p in params.items() if id(p) in text and p.ndim >= 2 and not n.endswith("bias")}
    embedding = model.get_input_embeddings().weight
    tied = model.get_output_embeddings().weight is embedding
    # an expert's width: its own field, or (Mixtral, gpt-oss: none) the MLP's intermediate_size
    moe_intermediate = (getattr(cfg, "moe_intermediate_size", 0) or (getattr(cfg, "intermediate_size", 0) or 0)
                        if num_experts else 0)
    shared = (getattr(cfg, "shared_expert_intermediate_size", 0) or 0) + (
        (getattr(cfg, "n_shared_experts", 0) or 0) * moe_intermediate)
    num_params = sum(p.numel() for p in params.values())
    num_trainable = sum(p.numel() for p in params.values() if p.requires_grad)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return Arch(
        num_layers=len(layers), hidden=cfg.hidden_size, intermediate=getattr(cfg, "intermediate_size", 0) or 0,
        num_heads=cfg.num_attention_heads, num_kv_heads=getattr(cfg, "num_key_value_heads", None)
        or cfg.num_attention_heads, head_dim=head_dim, vocab=cfg.vocab_size,
        qk_norm=any(hasattr(getattr(layer, "self_attn", None), "q_norm") for layer in layers),
        num_moe_layers=sum(hasattr(getattr(layer, "mlp", None), "experts") for layer in layers),
        num_experts=num_experts, experts_per_token=top_k, moe_intermediate=moe_intermediate,
        shared_intermediate=shared, num_params=num_params, num_trainable_params=num_trainable,
        num_active_params=_active(num_params - expert_params, expert_params, top_k, num_experts),
        num_expert_params=expert_params,
        num_head_params=model.get_output_embeddings().weight.numel(),
        num_matmul_params=sum(p.numel() for p in params.values() if p.ndim >= 2)
        - (0 if tied else embedding.numel()),
        num_active_matmul_params=_active(
            sum(p.numel() for n, p in weights.items() if ".experts." not in n) - (0 if tied else embedding.numel()),
            sum(p.numel() for n, p in weights.items() if ".experts." in n), top_k, num_experts),
        max_layer_params=max(sum(p.numel() for p in layer.parameters()) for layer in layers),
        num_image_params=sum(p.numel() for p in params.values() if id(p) not in text),
        unmodelled_layer=("multi-head latent attention (low-rank q/kv projections, wider q/k heads)"
                          if getattr(cfg, "kv_lora_rank", None) else
                          "attention sinks and clamped, biased experts" if cfg.model_type == "gpt_oss" else None),
    )


def _active(dense: int, experts: int, top_k: int, num_experts: int) -> int:
    """Parameters a token runs through: all dense ones, top_k of num_experts routed experts' (experts are equal)."""
    return dense + (experts * top_k // num_experts if num_experts else 0)
