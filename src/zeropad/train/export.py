"""A checkpoint -> a Hugging Face model directory: `AutoModelForCausalLM.from_pretrained` loads a language
model's, `AutoModelForImageTextToText.from_pretrained` a vision-language (or Chameleon) model's, which also
holds the image processor the run trained with (preprocessor_config.json)."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
from transformers import AutoTokenizer, GenerationConfig

from zeropad.config import Config, ModelConfig
from zeropad.data.multimodal import load_image_processor
from zeropad.errors import ZeropadError
from zeropad.family import is_multimodal
from zeropad.model.load import auto_class, build_model
from zeropad.model.lora import merged_for_export
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


def run_config(checkpoint: Path) -> Config:
    """The run's resolved config: remote code runs only when it turned model.trust_remote_code on;
    model.lora says whether adapters are part of the weights; vision says how images were processed."""
    return Config.model_validate_json((checkpoint / "config.json").read_text())


def checkpoint_model_config(checkpoint: Path) -> ModelConfig:
    """The model as the checkpoint saved it (model/config.json, overrides applied), with the run's adapters
    and eager attention, which every model has: exporting runs no forward, and the exported config names
    no attention, so whoever loads it gets transformers' default."""
    run = run_config(checkpoint).model
    return ModelConfig(path=str(checkpoint / "model"), trust_remote_code=run.trust_remote_code, lora=run.lora,
                       attn_implementation="eager")


def load_trained_model(checkpoint: Path) -> torch.nn.Module:
    """The trained model of a checkpoint, fp32, with eager attention and LoRA adapters, if any, merged
    into the weights."""
    verify(checkpoint)
    model = build_model(checkpoint_model_config(checkpoint), weights=False, lora=True)  # weights: below
    load_weights(checkpoint, model)  # every rank's shards, gathered into the full weights
    model = merged_for_export(model)
    if (checkpoint / "model" / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(checkpoint / "model")
    # Training turns the KV cache off; whoever loads the export generates, and wants it on.
    model.config.get_text_config().use_cache = True
    return model


class Export(NamedTuple):
    checkpoint: Path  # the checkpoint exported
    auto_class: str  # the transformers Auto class that loads the exported directory


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path) -> Export:
    """Write the model (safetensors), its config, generation config and tokenizer to out_dir, and for a
    vision-language model its image processor: the one the run built (`load_image_processor`, from the
    run's vision settings and model config), saved with the PIL backend's settings."""
    path = resolve_checkpoint(checkpoint)
    model = load_trained_model(path)
    run = run_config(path)
    out = Path(out_dir)
    model.save_pretrained(out)  # writes generation_config.json too: the model can generate
    tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer", trust_remote_code=run.model.trust_remote_code)
    tokenizer.save_pretrained(out)
    if is_multimodal(model.config):  # Chameleon too: its resize-and-crop processor
        load_image_processor(run, model.config).save_pretrained(out)
    return Export(path, auto_class(model.config).__name__)
