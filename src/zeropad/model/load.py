"""Build the model and tokenizer: from a local Hugging Face directory, or from a config (from scratch)."""

from __future__ import annotations

import difflib

from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from zeropad.config import ModelConfig
from zeropad.errors import ConfigError, ZeropadError
from zeropad.model import attention  # noqa: F401  (registers the zeropad_varlen attention)
from zeropad.model.attention import ATTN_NAME
from zeropad.model.init import init_weights
from zeropad.model.lora import apply_lora
from zeropad.model.vlm import packed_attn_implementation


def _model_dir(cfg: ModelConfig) -> Path | None:
    if cfg.path is None:
        return None
    path = Path(cfg.path).expanduser()
    if not (path / "config.json").is_file():
        raise ConfigError(f"model.path: {path} is not a Hugging Face model directory (no config.json there)")
    return path


def load_tokenizer(cfg: ModelConfig):
    source = cfg.tokenizer or cfg.path
    if source is None:
        raise ConfigError("model.tokenizer: no tokenizer given (set model.tokenizer or model.path)")
    if not Path(source).expanduser().is_dir():
        raise ConfigError(f"model.tokenizer: tokenizer directory not found: {source}")
    tokenizer = AutoTokenizer.from_pretrained(str(Path(source).expanduser()), trust_remote_code=cfg.trust_remote_code)
    if tokenizer.eos_token_id is None:
        raise ZeropadError(f"{source}: the tokenizer has no eos_token; add one to tokenizer_config.json")
    return tokenizer


def build_model_config(cfg: ModelConfig) -> PretrainedConfig:
    path = _model_dir(cfg)
    overrides = dict(cfg.config)
    if path is not None:
        config, unused = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code,
                                                    return_unused_kwargs=True, **overrides)
        _refuse_unknown(unused, config)
        return config
    if "model_type" not in overrides:
        raise ConfigError("model.config.model_type: needed to build a model from scratch (e.g. qwen3)")
    model_type = overrides.pop("model_type")
    try:
        return AutoConfig.for_model(model_type, **overrides)
    except ValueError as err:
        raise ConfigError(f"model.config.model_type: {err}") from None


def _refuse_unknown(keys, config: PretrainedConfig) -> None:
    """Overrides a loaded config has no field for: transformers drops them, so they would change nothing. (From
    scratch a key is kept as an attribute, which modeling code may read with getattr: not checked there.)"""
    if keys:
        known = [key for key in config.to_dict() if not key.startswith("_")]
        # a VLM's language-model fields live in its text_config (vision_config): nested, the override applies
        nested = {key: f"{sub}.{key}" for sub in ("text_config", "vision_config") for key in keys
                  if isinstance(getattr(config, sub, None), PretrainedConfig) and hasattr(getattr(config, sub), key)}
        hints = {key: [nested[key]] if key in nested else difflib.get_close_matches(key, known, n=1) for key in keys}
        named = ", ".join(f"{key}" + (f" (did you mean {hint[0]}?)" if hint else "") for key, hint in hints.items())
        raise ConfigError(f"model.config: the checkpoint's {type(config).__name__} has no {named}, so the override "
                          "would change nothing")


def is_vision_language(config: PretrainedConfig) -> bool:
    """A model with a vision tower: its config nests a vision_config beside the text one."""
    return getattr(config, "vision_config", None) is not None


def emu3_attn_implementation(text: str = ATTN_NAME) -> dict[str, str]:
    """Emu3's packed attention: `text` for the language model, a stock backend for the VQ model, whose attention
    blocks are bidirectional within one image."""
    return {"text_config": text, "vq_config": "sdpa"}


def auto_class(config: PretrainedConfig):
    """Causal LMs (also remote-code ones) by AutoModelForCausalLM; the rest, VLMs and early-fusion models such
    as Chameleon (no vision_config, but registered only as image-text-to-text), by AutoModelForImageTextToText."""
    auto_map = getattr(config, "auto_map", None) or {}
    if config.model_type == "emu3":  # its causal-LM class is the text model alone, without the VQ model
        return AutoModelForImageTextToText
    if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or "AutoModelForCausalLM" in auto_map:
        return AutoModelForCausalLM
    return AutoModelForImageTextToText


def build_model(cfg: ModelConfig, *, seed: int = 0, device: str | torch.device = "cpu", weights: bool = True,
                attn_implementation: str | None = None, lora: bool = False) -> torch.nn.Module:
    """The one model builder (training, `zeropad plan`, export, verify): `cfg` -> an fp32 model on `device`.

    weights: read model.path's weights; otherwise (and always for a model from scratch) the weights are
      initialised with `seed`, on the CPU, module by module (model/init.py), so they depend on neither `device`
      nor how the model is sharded. On the meta device nothing is
      read or allocated: only shapes exist (the planner's model).
    attn_implementation: the backend (default model.attn_implementation), chosen by name, not patched in. A
      vision-language model gets zeropad_varlen in its language model only (model.vlm explains why).
    lora: add model.lora's adapters (model.lora.apply_lora); training adds them itself, after the base model.
    fp32 weights: bf16 runs use autocast."""
    device = torch.device(device)
    path = _model_dir(cfg)
    config = build_model_config(cfg)
    attn = attn_implementation or cfg.attn_implementation
    if is_vision_language(config) and attn == ATTN_NAME:
        attn = packed_attn_implementation()
    elif config.model_type == "emu3" and attn == ATTN_NAME:  # its VQ model attends bidirectionally, per image
        attn = emu3_attn_implementation()
    auto = auto_class(config)
    kwargs = dict(config=config, dtype=torch.float32, attn_implementation=attn, trust_remote_code=cfg.trust_remote_code)
    if path is not None and weights and device.type != "meta":
        model = auto.from_pretrained(path, **kwargs).to(device)
    else:
        with torch.device("meta"):
            model = auto.from_config(**kwargs)
        if device.type != "meta":
            init_weights(model, seed)  # module by module: the same weights as any sharded build (model/init.py)
            model = model.to(device)
    model.config.get_text_config().use_cache = False  # a VLM's language model reads its own config
    if config.model_type == "emu3":  # its VQ model is frozen: it tokenizes images (zeropad.model.emu3)
        model.model.vqmodel.requires_grad_(False)
    return apply_lora(model, cfg.lora) if lora else model


def check_vocab(model: PreTrainedModel, tokenizer) -> None:
    """A token id past the embedding table fails deep inside the model; say it here instead."""
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise ConfigError(
            f"model.tokenizer: the tokenizer has {len(tokenizer)} tokens but the model's embedding has {rows} rows; "
            "use the model's own tokenizer (a model built from scratch takes model.config.vocab_size; a trained one's "
            "embedding is not resized)"
        )
