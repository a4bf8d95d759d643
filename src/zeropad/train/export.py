"""A checkpoint -> a Hugging Face model directory that `AutoModelForCausalLM.from_pretrained` loads."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from zeropad.config import Config, ModelConfig
from zeropad.errors import ZeropadError
from zeropad.model.lora import apply_lora, merged_for_export
from zeropad.train.state import MANIFEST, checkpoint_root, load_weights, step_dirs, verify


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory as given, or the newest complete one of an output directory."""
    path = Path(path)
    if (path / MANIFEST).is_file() or path.name.startswith("step_"):
        return path
    complete = [p for _, p in step_dirs(checkpoint_root(path)) if (p / MANIFEST).is_file()]
    if not complete:
        raise ZeropadError(f"{path}: not a checkpoint (no {MANIFEST}) and no complete checkpoint in "
                           f"{checkpoint_root(path)}")
    return complete[-1]


def run_config(checkpoint: Path) -> ModelConfig:
    """The model section of the run's resolved config: remote code runs only when it turned
    model.trust_remote_code on; model.lora says whether adapters are part of the weights."""
    return Config.model_validate_json((checkpoint / "config.json").read_text()).model


def load_trained_model(checkpoint: Path) -> torch.nn.Module:
    """The trained model of a checkpoint, fp32, with the default attention (no zeropad kwargs needed)
    and LoRA adapters, if any, merged into the weights."""
    verify(checkpoint)
    cfg = run_config(checkpoint)
    config = AutoConfig.from_pretrained(checkpoint / "model", trust_remote_code=cfg.trust_remote_code)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=cfg.trust_remote_code)
    model = apply_lora(model, cfg.lora)
    load_weights(checkpoint, model)  # every rank's shards, gathered into the full weights
    model = merged_for_export(model)
    if (checkpoint / "model" / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(checkpoint / "model")
    # Training turns the KV cache off; whoever loads the export generates, and wants it on.
    model.config.use_cache = True
    return model


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """Write the model (safetensors), its config, generation config and tokenizer to out_dir;
    return the checkpoint used."""
    path = resolve_checkpoint(checkpoint)
    model = load_trained_model(path)
    out = Path(out_dir)
    model.save_pretrained(out)  # writes generation_config.json too: a causal LM can generate
    tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer", trust_remote_code=run_config(path).trust_remote_code)
    tokenizer.save_pretrained(out)
    return path
