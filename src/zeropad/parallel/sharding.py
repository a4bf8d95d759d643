"""Data parallelism through PyTorch's own wrappers: DDP, or FSDP2 (`fully_shard`).

Applied once, after the model is built (and adapted, checkpointed), in a fixed order, before
the optimizer is built (torchtitan `parallelize.py` style); the model classes are not changed.

  none   one process; the model as it is.
  ddp    every rank holds the whole model, gradients all-reduced (DistributedDataParallel).
  fsdp   FSDP2: each decoder layer, then the root, sharded across ranks (HSDP with parallel.replicate > 1:
         sharded within each of `replicate` groups of `shard` ranks, replicated across them). reshard_after_forward
         true frees gathered weights after the forward (ZeRO-3), false keeps them to the
         backward (ZeRO-2). bf16 runs use MixedPrecisionPolicy (bf16 params and compute, fp32
         gradient reduction); cpu_offload keeps shards, gradients and optimizer state on the host.

The loss is the global token mean (DESIGN.md invariant 5): each rank divides its loss sum by the
all-reduced target count of the step, so the gradient wanted is the SUM over ranks. DDP averages,
so its loss is scaled by world size (`loss_scale`); FSDP2 is told to divide by 1.
"""

from __future__ import annotations

import contextlib

import torch
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from zeropad.config import ParallelConfig
from zeropad.errors import ConfigError
from zeropad.parallel import distributed


def _decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    decoder = model.get_decoder()
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise ConfigError(f"parallel.strategy=fsdp: cannot find the decoder layers of {type(model).__name__} "
                          "(expected get_decoder().layers); use parallel.strategy=ddp")
    return list(layers)


def apply_fsdp(model: torch.nn.Module, cfg: ParallelConfig, dtype: str, device: torch.device) -> torch.nn.Module:
    kwargs: dict = {"reshard_after_forward": cfg.reshard_after_forward}
    if dtype == "bf16":
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if cfg.cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    if cfg.replicate > 1 or cfg.shard is not None:  # HSDP: shard within a replica, all-reduce across replicas
        try:
            kwargs["mesh"] = distributed.data_parallel_mesh(device, cfg.replicate, cfg.shard)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    for layer in _decoder_layers(model):
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)  # sum, not mean: the loss is already the global mean
            if device.type != "cuda":
                module.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM reduction
    return model


def apply_ddp(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    device_ids = [device.index] if device.type == "cuda" else None
    # A VLM's vision tower gets no gradient from a micro-step whose pack holds no image; DDP must look for
    # such unused parameters each step or it waits for their gradients forever.
    vision = getattr(model.config, "vision_config", None) is not None
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=vision)


def parallelize(model: torch.nn.Module, cfg: ParallelConfig, dtype: str, device: torch.device) -> torch.nn.Module:
    """The model wrapped for `parallel.strategy`; call after build/LoRA/checkpointing, before the optimizer."""
    if cfg.cpu_offload and cfg.strategy != "fsdp":
        raise ConfigError("parallel.cpu_offload is an FSDP option: set parallel.strategy=fsdp")
    if cfg.cpu_offload and device.type != "cuda":
        raise ConfigError("parallel.cpu_offload moves FSDP shards from the GPU to host memory; training on "
                          f"{device.type} they are in host memory already: set parallel.cpu_offload=false")
    if cfg.strategy == "none" or distributed.world_size() == 1:
        return model  # one process: nothing to shard or synchronise
    if cfg.strategy == "ddp":
        return apply_ddp(model, device)
    return apply_fsdp(model, cfg, dtype, device)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face model inside a DDP wrapper (FSDP2 keeps the model's own class)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def loss_scale(model: torch.nn.Module) -> float:
    """Factor on each rank's loss so that the synchronised gradient is the sum over ranks."""
    return float(distributed.world_size()) if isinstance(model, DistributedDataParallel) else 1.0


def gradient_sync(model: torch.nn.Module, enabled: bool):
    """Context for one micro-step's backward: skip the gradient reduction unless `enabled`
    (the last micro-step of the optimizer step)."""
    if isinstance(model, DistributedDataParallel):
        return contextlib.nullcontext() if enabled else model.no_sync()
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """Full (unsharded) weights on the host; a collective under FSDP, so every rank calls it."""
    if isinstance(model, FSDPModule):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return None
