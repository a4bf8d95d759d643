"""Weights for a model built on the meta device and sharded there: no rank ever holds the whole model.

Under FSDP the model is built on the meta device (shapes only), adapted (LoRA), checkpointed and sharded
there, then `to_empty` gives each rank storage for its own shards alone, and this module fills them:

  from model.path   transformers' own distributed loading (`from_pretrained(distributed_config=...)`) builds
                    a second, equally sharded copy that reads from the safetensors files only the slices this
                    rank's shards need (and applies the checkpoint's key conversions, e.g. per-expert tensors
                    fused); its local shards are copied into the model's, then it is dropped.
  from model.config model/init.py: Hugging Face's per-module init, one module at a time on the CPU, each rank
                    keeping its slice: the same initial weights at every world size, one process included.
  LoRA adapters     peft's own adapter init, on a CPU copy of each adapter alone, seeded as `apply_lora` is.

So a rank's peak holds its shards twice (model and loading copy) at most, plus one whole tensor (from
model.config) or one whole module's parameters; never the model.
"""

from __future__ import annotations

import gc

import torch
from torch.distributed.tensor import DTensor, Shard

from zeropad.config import ModelConfig, ParallelConfig
from zeropad.errors import ZeropadError
from zeropad.model.init import init_weights
from zeropad.model.load import _model_dir, auto_class, build_model, build_model_config
from zeropad.model.lora import adapter_layers, apply_lora, init_adapters
from zeropad.parallel import distributed

Slots = dict[str, tuple[torch.nn.Module, str]]


def weight_slots(model: torch.nn.Module) -> Slots:
    """Every parameter and buffer (persistent or not) of a plain Hugging Face model, by its state-dict name, as
    (module, attribute): the modules survive LoRA, checkpoint wrappers and FSDP, whose names differ."""
    slots = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        for name in [*module._parameters, *module._buffers]:
            if getattr(module, name) is not None:
                slots[f"{prefix}.{name}" if prefix else name] = (module, name)
    return slots


def _local_slice(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The part of `full` that `like` (a DTensor shard, or a whole tensor) holds on this rank: FSDP2 shards
    dim 0 as torch.chunk does over each sharded mesh dimension."""
    if not isinstance(like, DTensor):
        return full
    local = full
    for dim, placement in enumerate(like.placements):
        if isinstance(placement, Shard):
            pieces = local.chunk(like.device_mesh.size(dim), dim=placement.dim)
            index = like.device_mesh.get_local_rank(dim)
            local = pieces[index] if index < len(pieces) else local.narrow(placement.dim, 0, 0)
    return local


@torch.no_grad()
def _fill(name: str, target: torch.Tensor, value: torch.Tensor) -> None:
    local = target.to_local() if isinstance(target, DTensor) else target
    value = value.to_local() if isinstance(value, DTensor) else _local_slice(value, target)
    if local.shape != value.shape:
        raise ZeropadError(f"{name}: this rank's shard has shape {tuple(local.shape)} but the weights give "
                           f"{tuple(value.shape)}")
    local.copy_(value)


def _init_from_config(cfg: ModelConfig, seed: int, slots: Slots) -> None:
    """model/init.py's module-by-module init on a meta copy; each tensor goes to its slot as soon as it is drawn."""
    def write(name: str, tensor: torch.Tensor) -> None:
        module, attr = slots[name]
        _fill(name, getattr(module, attr), tensor)

    init_weights(build_model(cfg, device="meta"), seed, write)


def _load_from_path(cfg: ModelConfig, slots: Slots, device: torch.device, replicate: int, shard: int) -> None:
    from transformers.distributed import DistributedConfig

    config = build_model_config(cfg)
    layout = DistributedConfig(fsdp_size=shard, dp_replicate_size=replicate)
    loaded = auto_class(config).from_pretrained(
        _model_dir(cfg), config=config, dtype=torch.float32, trust_remote_code=cfg.trust_remote_code,
        distributed_config=layout, device_map=str(device), attn_implementation="eager")
    tensors = dict(loaded.named_parameters(remove_duplicate=False))
    tensors.update(loaded.named_buffers(remove_duplicate=False))
    missing = sorted(set(slots) - set(tensors))
    if missing:
        raise ZeropadError(f"model.path {cfg.path}: the loaded model has no {missing[:3]}")
    for name, (module, attr) in slots.items():
        _fill(name, getattr(module, attr), tensors[name])
    del loaded, tensors
    gc.collect()  # the loading copy is freed only with its reference cycles: otherwise it outlives the step


def materialize(model: torch.nn.Module, slots: Slots, cfg: ModelConfig, *, seed: int, device: torch.device,
                parallel: ParallelConfig) -> None:
    """Storage for the sharded meta `model`, filled with its initial weights (module docstring): its shards on
    `device`, or in host memory with parallel.cpu_offload (buffers stay on `device`); the mesh is
    parallel.replicate x parallel.shard, as the model was sharded."""
    home = torch.device("cpu") if parallel.cpu_offload else device
    model.to_empty(device=home)
    if _model_dir(cfg) is not None:
        shard = parallel.shard or distributed.world_size() // parallel.replicate
        _load_from_path(cfg, slots, home, parallel.replicate, shard)
    else:
        _init_from_config(cfg, seed, slots)
    if cfg.lora is not None:
        _init_adapters(model, cfg, seed)
    for module in model.modules():  # FSDP offloads parameters only: a buffer (RoPE's inv_freq) lives on the device
        for name, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[name] = buffer.to(device)


def _init_adapters(model: torch.nn.Module, cfg: ModelConfig, seed: int) -> None:
    """model.lora.init_adapters on a twin of the adapted model whose adapters alone are real (they are small),
    then each adapter weight copied into its shard."""
    twin = apply_lora(build_model(cfg, device="meta"), cfg.lora)
    twin_layers = adapter_layers(twin)
    for _, layer in twin_layers:
        for name, module in layer.named_modules():
            if name.startswith(("lora_A", "lora_B")):
                module.to_empty(device="cpu")
    init_adapters(twin, seed)
    for (name, layer), (_, target) in zip(twin_layers, adapter_layers(model), strict=True):
        for key, tensor in layer.named_parameters():
            if key.startswith(("lora_A", "lora_B")):
                _fill(f"{name}.{key}", target.get_parameter(key), tensor)
