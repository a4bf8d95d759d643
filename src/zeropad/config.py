"""One typed config schema: YAML file + dotted CLI overrides, validated once.

Unknown keys and bad values raise ConfigError naming the key (and the closest valid key).
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from zeropad.errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LoraConfig(_Strict):
    r: int = Field(16, gt=0, description="LoRA rank.")
    alpha: float = Field(32.0, gt=0, description="LoRA scaling numerator (the update is scaled by alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: str | list[str] = Field(
        "all-linear", description="Module names to adapt (peft matching), or all-linear (every linear but the LM head)."
    )


class ModelConfig(_Strict):
    path: str | None = Field(None, description="Local Hugging Face model directory (config.json, weights, tokenizer).")
    config: dict[str, Any] = Field(
        default_factory=dict,
        description="Architecture for a model trained from scratch ({model_type: qwen3, hidden_size: ...}); "
        "with `path`, overrides applied to its config.",
    )
    tokenizer: str | None = Field(None, description="Tokenizer directory; defaults to model.path.")
    attn_implementation: str = Field(
        "zeropad_varlen", description="zeropad_varlen (packed, no padding) or any transformers backend."
    )
    trust_remote_code: bool = Field(False, description="Allow code from the model directory to run.")
    lora: LoraConfig | None = Field(
        None, description="LoRA adapters through peft ({r, alpha, dropout, target_modules}); null trains every weight."
    )


class SourceConfig(_Strict):
    path: str = Field(description="JSON, JSONL, parquet file, or a datasets.save_to_disk directory.")
    format: Literal["auto", "alpaca", "messages", "sharegpt", "text"] = Field(
        "auto", description="Record format; auto detects it from each record's keys."
    )
    weight: float = Field(1.0, gt=0, description="Samples drawn per epoch = weight x source size (seeded).")


class DataConfig(_Strict):
    sources: list[SourceConfig] = Field(default_factory=list, description="Datasets to mix.")
    on_bad_sample: Literal["error", "skip"] = Field(
        "error", description="error: stop before training, listing problems; skip: skip and count them."
    )
    train_on_prompt: bool = Field(False, description="Also train on system/user tokens (default: assistant only).")
    chat_template: str | None = Field(None, description="Jinja chat template overriding the tokenizer's.")
    chat_template_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Variables for the chat template, e.g. {enable_thinking: false} (Qwen3)."
    )
    cache_dir: str | None = Field(None, description="Tokenized-sample cache (default ~/.cache/zeropad).")
    num_workers: int = Field(2, ge=0, description="Tokenizer worker processes (0 = in-process).")


class PackConfig(_Strict):
    max_tokens: int = Field(8192, gt=0, description="Real tokens per micro-step (the pack budget).")
    overlong: Literal["truncate", "drop"] = Field("truncate", description="What to do with samples over max_tokens.")
    streaming: bool = Field(False, description="Pack a bounded window of samples at a time (data larger than memory).")
    buffer_samples: int = Field(10000, gt=0, description="Window size for streaming packing.")


class TrainConfig(_Strict):
    steps: int = Field(100, gt=0, description="Optimizer steps.")
    lr: float = Field(1e-4, gt=0, description="Peak learning rate.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final LR as a fraction of lr (cosine).")
    schedule: Literal["cosine", "constant"] = Field("cosine", description="LR schedule after warmup.")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas.")
    grad_clip: float = Field(1.0, ge=0, description="Max gradient norm (0 = off).")
    grad_accum: int = Field(1, gt=0, description="Micro-steps (packs) per optimizer step.")
    seed: int = Field(0, description="Seed for init, shuffling and sampling.")
    dtype: Literal["fp32", "bf16"] = Field("fp32", description="fp32, or bf16 autocast (weights stay fp32).")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto picks cuda when available.")
    max_bad_steps: int = Field(
        5, gt=0, description="A step with a non-finite loss or grad norm is skipped; this many in a row "
        "save a checkpoint and stop the run (exit code 4).",
    )
    freeze: list[Literal["vision", "projector", "language"]] = Field(
        default_factory=list, description="Parameter groups of a VLM left untrained: vision (encoder), projector "
        "(merger / multimodal projection), language (the LM with its embeddings and head).",
    )
    group_lr: dict[Literal["vision", "projector", "language"], float] = Field(
        default_factory=dict, description="Peak learning rate per group (e.g. {vision: 2e-6}); groups not named use "
        "train.lr. Warmup and schedule scale every group alike.",
    )
    objective: Literal["sft", "dpo", "simpo", "orpo"] = Field(
        "sft", description="sft: token loss on the targets; dpo (sigmoid loss against the frozen starting model), "
        "simpo or orpo (reference-free): preference pairs (prompt, chosen, rejected), loss averaged over pairs.",
    )
    beta: float = Field(0.1, gt=0, description="dpo/simpo: inverse temperature of the preference loss; orpo: weight "
                        "of the odds-ratio term.")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="dpo/simpo: probability that a pair's preference "
                                   "is flipped (conservative DPO).")
    simpo_gamma: float = Field(0.5, ge=0, description="simpo: target reward margin gamma.")
    compile: bool = Field(False, description="torch.compile each decoder layer (dynamic shapes; packed attention "
                          "runs as one custom op). The compile counts go to summary.json.")
    router_aux_loss_coef: float | None = Field(
        None, ge=0, description="MoE load-balancing loss coefficient (null: the model config's "
        "router_aux_loss_coef; 0: off). Averaged over the step's tokens like the token loss.",
    )


class EvalConfig(_Strict):
    split: float = Field(0.0, ge=0, lt=1, description="Fraction of the training samples held out for eval (not with "
                       "`pack.streaming`: give `eval.sources`).")
    sources: list[SourceConfig] = Field(default_factory=list, description="Separate eval datasets (entries as in `data.sources`).")
    every_steps: int = Field(0, ge=0, description="Eval every N steps (0 = only at the end).")


class LogConfig(_Strict):
    tensorboard: bool = Field(False, description="Also write TensorBoard events to OUTPUT_DIR/tb.")
    progress: bool = Field(True, description="Show a progress bar.")
    peak_tflops: float | None = Field(None, description="Device peak TFLOP/s for MFU (auto-detected on known GPUs).")
    expert_load: bool = Field(True, description="MoE models: log each layer's expert load (max/mean tokens per expert).")


class VisionConfig(_Strict):
    processor: str | None = Field(
        None, description="Directory with preprocessor_config.json (default: model.path; a model from scratch gets "
        "a processor built from its vision config).",
    )
    min_pixels: int | None = Field(None, gt=0, description="Smallest image area after resizing (default: the processor's).")
    max_pixels: int | None = Field(None, gt=0, description="Largest image area after resizing (default: the processor's).")


class VideoConfig(_Strict):
    fps: float = Field(2.0, gt=0, description="Frames sampled per second of video.")
    max_frames: int = Field(32, gt=0, description="At most this many frames per video (sampled evenly over it).")
    max_pixels: int | None = Field(None, gt=0, description="Largest frame area after resizing (default: vision.max_pixels).")


_CHECKPOINTING = re.compile(r"none|full|selective|auto|every:[1-9][0-9]*")


class MemoryConfig(_Strict):
    checkpointing: str = Field(
        "none", description="Activation checkpointing: none, full, every:K (every K-th decoder layer), selective "
        "(recompute MLPs, keep attention), or auto (the memory planner picks).",
    )
    offload_activations: bool = Field(False, description="Move tensors saved for backward to host memory.")
    chunked_loss: bool = Field(True, description="LM head + cross-entropy in token chunks, never the full logits.")
    loss_chunk_tokens: int = Field(4096, gt=0, description="Tokens per chunk of the chunked loss.")
    device_gb: float | None = Field(
        None, gt=0, description="Memory per device (GB) that checkpointing=auto and `zeropad plan` fit the run "
        "into; null = the GPU's total memory, or host RAM when training on CPU.",
    )

    @field_validator("checkpointing")
    @classmethod
    def _known_policy(cls, value: str) -> str:
        if not _CHECKPOINTING.fullmatch(value):
            raise ValueError("must be none, full, every:K (K >= 1), selective or auto")
        return value


_SIZE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20,
               "gib": 2**30, "tib": 2**40}


def parse_shard_size(value: int | str) -> int:
    """Bytes from a number of bytes or a size such as '5GB' (decimal, as Hugging Face reads it) or '512MiB'."""
    if isinstance(value, int):
        size = value
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", value)
        unit = _SIZE_UNITS.get(match.group(2).lower() or "b") if match else None
        if unit is None:
            raise ValueError(f"cannot read the size {value!r}; write it like 5GB, 500MB, 2GiB or a number of bytes")
        size = int(float(match.group(1)) * unit)
    if size <= 0:
        raise ValueError(f"the size must be positive, got {value!r}")
    return size


class CheckpointConfig(_Strict):
    every_steps: int = Field(0, ge=0, description="Save a checkpoint every N optimizer steps (0 = only at the end).")
    keep: int = Field(2, gt=0, description="Newest checkpoints kept in OUTPUT_DIR/checkpoints; older ones are deleted.")
    max_shard_size: int | str = Field(
        "5GB", validate_default=True, description="Largest safetensors file of final/ and `zeropad export` (bytes, "
        "or e.g. 5GB, 2GiB): a bigger model is written as model-0000k-of-0000n.safetensors plus an index.",
    )

    resume_data: Literal["refuse", "restart_epoch", "continue"] = Field(
        "refuse", description="Resuming when the data, tokenizer or chat template differ from the checkpoint's: "
        "refuse (list what changed and stop), restart_epoch (start a new epoch of the new data) or continue (keep "
        "the data position); the choice is logged in metrics.jsonl.",
    )
    on_low_disk: Literal["refuse", "warn"] = Field(
        "refuse", description="Before any compute, OUTPUT_DIR's free space is checked against what the run writes "
        "(keep + 1 checkpoints, final/, logs): refuse (exit code 5) or warn and run.",
    )

    @field_validator("max_shard_size")
    @classmethod
    def _shard_bytes(cls, value: int | str) -> int:
        return parse_shard_size(value)


class ParallelConfig(_Strict):
    strategy: Literal["none", "ddp", "fsdp"] = Field(
        "none", description="Data parallelism under torchrun: none (one process), ddp (whole model per rank, "
        "gradients all-reduced) or fsdp (FSDP2 fully_shard of each decoder layer, a VLM's vision blocks, tower "
        "and projector, and the root).",
    )
    reshard_after_forward: bool = Field(
        True, description="fsdp: free gathered weights after the forward (ZeRO-3, less memory) or keep them "
        "for the backward (false: ZeRO-2, less communication).",
    )
    cpu_offload: bool = Field(False, description="fsdp: keep weight shards, gradients and optimizer state in host memory.")
    replicate: int = Field(1, ge=1, description="fsdp: HSDP replicas (e.g. nodes). The ranks form a replicate x "
                           "shard mesh: the model is sharded within each replica and gradients are all-reduced "
                           "across replicas. 1: plain FSDP over all ranks.")
    shard: int | None = Field(None, ge=1, description="fsdp with replicate > 1: ranks per replica the model is "
                              "sharded over (e.g. GPUs per node); default world size / replicate.")
    sp_size: int = Field(1, ge=1, description="Ulysses sequence parallelism: the ranks that share one pack, each "
                         "holding a contiguous token range of it (attention heads are split across them around "
                         "attention). The number of processes must be a multiple; sp_size=1: none.")


class Config(_Strict):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    pack: PackConfig = Field(default_factory=PackConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    memory: MemoryConfig = Field(default_factory=MemoryConfig)
    vision: VisionConfig = Field(default_factory=VisionConfig)
    video: VideoConfig = Field(default_factory=VideoConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    resume: str | None = Field(
        None, description="null: start fresh (refused if OUTPUT_DIR has checkpoints); auto: continue from the "
        "newest usable checkpoint in OUTPUT_DIR (fresh if none); or a checkpoint directory to continue from.",
    )
    output_dir: str = Field("runs/zeropad", description="Where metrics, plots, checkpoints and the model go.")

    @model_validator(mode="after")
    def _combinations(self) -> Config:
        """What is refused from the config alone, before anything is loaded."""
        if (self.parallel.replicate > 1 or self.parallel.shard is not None) and self.parallel.strategy != "fsdp":
            raise ValueError("parallel.replicate / parallel.shard (HSDP) are FSDP options: set parallel.strategy=fsdp")
        if self.parallel.sp_size > 1 and self.parallel.strategy == "none":
            raise ValueError(f"parallel.sp_size={self.parallel.sp_size} splits each pack over several processes: "
                             "run under torchrun with parallel.strategy=fsdp or ddp")
        return self


def _model_at(path: tuple) -> type[BaseModel] | None:
    """The schema class that holds the key at `path` (skipping list indices)."""
    cls: Any = Config
    for part in path[:-1]:
        if isinstance(part, int):
            continue
        field = cls.model_fields.get(part) if isinstance(cls, type) and issubclass(cls, BaseModel) else None
        if field is None:
            return None
        ann = field.annotation
        inner = getattr(ann, "__args__", None)
        cls = inner[0] if inner and isinstance(inner[0], type) else ann
    return cls if isinstance(cls, type) and issubclass(cls, BaseModel) else None


def _explain(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            parent = _model_at(e["loc"])
            valid = list(parent.model_fields) if parent else []
            close = difflib.get_close_matches(str(e["loc"][-1]), valid, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else (f"; valid keys: {', '.join(valid)}" if valid else "")
            lines.append(f"unknown key '{key}'{hint}")
        elif not e["loc"]:  # a combination of keys (Config._combinations)
            lines.append(e["msg"].removeprefix("Value error, "))
        else:
            lines.append(f"bad value for '{key}': {e['msg']} (got {e.get('input')!r})")
    return "config error: " + "; ".join(lines)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set '{dotted}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


class _YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's floats: 1e-5 and 1e6 are numbers (YAML 1.1 wants 1.0e-5 and reads them
    as strings, which reached model.config and transformers as text)."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)?(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _yaml(text: str):
    return yaml.load(text, Loader=_YamlLoader)


def parse_overrides(overrides: list[str]) -> dict:
    """['train.steps=10', 'pack.max_tokens=4096'] -> nested dict; values parsed as YAML scalars."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key.sub=value")
        key, raw = item.split("=", 1)
        try:
            value = _yaml(raw) if raw else None
        except (yaml.YAMLError, ValueError) as err:  # ValueError: YAML-looking values such as a bad date
            raise ConfigError(f"override '{key.strip()}': cannot parse the value {raw!r} ({err})") from None
        _set_dotted(tree, key.strip(), value)
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def build_config(data: dict | None = None, overrides: list[str] | None = None) -> Config:
    merged = _merge(data or {}, parse_overrides(overrides or []))
    try:
        return Config.model_validate(merged)
    except ValidationError as err:
        raise ConfigError(_explain(err)) from None


def load_config(path: str | Path | None, overrides: list[str] | None = None, base: dict | None = None) -> Config:
    """Read a YAML config (or start from `base`), apply dotted overrides, validate.

    Relative data/model paths in a YAML file stay relative to the working directory, as users type them.
    """
    data: dict = dict(base or {})
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = _yaml(p.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{p}: invalid YAML: {err}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections")
        data = _merge(data, loaded)
    return build_config(data, overrides)


def describe_keys() -> str:
    """Every key with its default and description, for `zeropad train --help` and the README."""
    rows = []
    for section, field in Config.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            for name, sub in ann.model_fields.items():
                default = sub.default_factory() if sub.default_factory else sub.default
                rows.append(f"{section}.{name} = {default!r}: {sub.description}")
        else:
            rows.append(f"{section} = {field.default!r}: {field.description}")
    return "\n".join(rows)
