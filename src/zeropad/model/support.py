"""Which model families can be packed exactly, decided from the config at start-up.

Packing is exact when every layer that mixes tokens is attention that zeropad_varlen computes per
document. Layers that carry state along the sequence (linear attention, state-space, recurrent,
convolutional token mixers) would carry it from one document into the next: their kernels here
take no document boundaries, so such families are refused with the reason, before any step runs.
"""

from __future__ import annotations

from transformers import PretrainedConfig

from zeropad.errors import ConfigError

# layer_types entries that zeropad_varlen computes exactly (sliding windows are passed per call)
ATTENTION_LAYER_TYPES = frozenset({"full_attention", "sliding_attention"})

# Families whose token mixers carry state along the sequence, including those whose configs do not
# say so through layer_types.
STATEFUL_FAMILIES = {
    "mamba": "state-space (Mamba) layers",
    "mamba2": "state-space (Mamba-2) layers",
    "falcon_mamba": "state-space (Mamba) layers",
    "jamba": "Mamba layers between its attention layers",
    "bamba": "Mamba-2 layers between its attention layers",
    "falcon_h1": "Mamba-2 heads beside its attention heads",
    "nemotron_h": "Mamba-2 layers between its attention layers",
    "granitemoehybrid": "Mamba-2 layers between its attention layers",
    "zamba": "Mamba layers",
    "zamba2": "Mamba-2 layers",
    "lfm2": "short-convolution layers",
    "lfm2_moe": "short-convolution layers",
    "recurrent_gemma": "recurrent (RG-LRU) layers",
    "rwkv": "recurrent (RWKV) layers",
    "xlstm": "recurrent (xLSTM) layers",
    "qwen3_next": "linear-attention (Gated DeltaNet) layers",
    "qwen3_5": "linear-attention (Gated DeltaNet) layers",
    "qwen3_5_moe": "linear-attention (Gated DeltaNet) layers",
    "kimi_linear": "linear-attention (KDA) layers",
    "minimax": "linear (lightning) attention layers",
    "olmo_hybrid": "linear-attention layers",
}


def _configs(config: PretrainedConfig) -> list[PretrainedConfig]:
    text = config.get_text_config()
    return [config] if text is config else [config, text]


def check_packable(config: PretrainedConfig) -> None:
    """Raise ConfigError naming the family and the reason when packed training cannot equal
    per-document training for this config; return None when it can."""
    for cfg in _configs(config):
        name = cfg.model_type or type(cfg).__name__
        if name in STATEFUL_FAMILIES:
            raise ConfigError(f"{name}: {STATEFUL_FAMILIES[name]} carry state along the sequence from one "
                              "document into the next, and their kernels here take no document boundaries; "
                              "packing would not be exact")
        other = sorted(set(getattr(cfg, "layer_types", None) or []) - ATTENTION_LAYER_TYPES)
        if other:
            raise ConfigError(f"{name}: layer_types {other} are not attention that zeropad_varlen computes per "
                              "document (only full_attention and sliding_attention are); packing would not be exact")
        if getattr(cfg, "attention_chunk_size", None):
            raise ConfigError(f"{name}: chunked attention (attention_chunk_size={cfg.attention_chunk_size}) is "
                              "built into the attention mask, which packed attention does not use")
        if getattr(cfg, "use_bidirectional_attention", False):
            raise ConfigError(f"{name}: use_bidirectional_attention: bidirectional attention cannot be packed "
                              "causally")
        if getattr(cfg, "alibi", False):
            raise ConfigError(f"{name}: ALiBi position bias is added through the attention mask, which packed "
                              "attention does not use")
        if getattr(cfg, "is_encoder_decoder", False):
            raise ConfigError(f"{name}: encoder-decoder models attend bidirectionally in the encoder; only causal "
                              "decoders are packed")
