"""A checkpoint -> a Hugging Face model directory: `AutoModelForCausalLM.from_pretrained` loads a language
model's, `AutoModelForImageTextToText.from_pretrained` a vision-language (or Chameleon) model's, which also
holds the image processor the run trained with (preprocessor_config.json)."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
from transformers import AutoTokenizer, GenerationConfig

from zeropad.config import Config, ModelConfig
from zeropad.data.image_targets import image_target_processor
from zeropad.data.multimodal import load_image_processor
from zeropad.errors import ZeropadError
from zeropad.family import images_are_targets, is_multimodal
from zeropad.model.load import auto_class, build_model
from zeropad.model.hf_writer import save_hf_model
from zeropad.model.lora import merged_for_export
from zeropad.train.state import MANIFEST, checkpoint_root, load_weights, step_dirs, verify, weight_reader


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
    """The trained model of a checkpoint, whole, fp32, with eager attention and LoRA adapters, if any, merged
    into the weights (`export_checkpoint` writes it without holding it whole)."""
    verify(checkpoint)
    model = build_model(checkpoint_model_config(checkpoint), weights=False, lora=True)  # weights: below
    load_weights(checkpoint, model)  # every rank's shards, gathered into the full weights
    return _ready_to_generate(merged_for_export(model), checkpoint)


def _ready_to_generate(model: torch.nn.Module, checkpoint: Path) -> torch.nn.Module:
    if (checkpoint / "model" / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(checkpoint / "model")
    # Training turns the KV cache off; whoever loads the export generates, and wants it on.
    model.config.get_text_config().use_cache = True
    return model


class Export(NamedTuple):
    checkpoint: Path  # the checkpoint exported
    auto_class: str  # the transformers Auto class that loads the exported directory
    weight_files: list[str]  # model.safetensors, or model-0000k-of-0000n.safetensors (with an index)


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, max_shard_size: int | str | None = None) -> Export:
    """Write the model (safetensors, LoRA adapters merged in), its config, generation config and tokenizer to
    out_dir, and for a vision-language model its image processor: the one the run built (`load_image_processor`,
    from the run's vision settings and model config), saved with the PIL backend's settings.

    The weights are read from the checkpoint one shard of the output at a time (`save_hf_model`), so the model is
    never whole in memory; max_shard_size defaults to the run's checkpoint.max_shard_size."""
    path = resolve_checkpoint(checkpoint)
    verify(path)  # every file whole before any is read: a truncated config names itself, not a JSON parser
    run = run_config(path)
    # On the meta device: the names, shapes and config, and no memory for the weights.
    model = _ready_to_generate(build_model(checkpoint_model_config(path), device="meta", lora=True), path)
    out = Path(out_dir)
    files = save_hf_model(model, out, max_shard_size or run.checkpoint.max_shard_size,
                          load=weight_reader(path, model))
    tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer", trust_remote_code=run.model.trust_remote_code)
    tokenizer.save_pretrained(out)
    if is_multimodal(model.config):  # Chameleon too: its resize-and-crop processor
        load_image_processor(run, model.config).save_pretrained(out)
    elif images_are_targets(model.config):  # Emu3: generation reads the image size from it
        image_target_processor(run, model.config).save_pretrained(out)
    return Export(path, auto_class(model.config).__name__, files)
