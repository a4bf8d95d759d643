"""Data parallelism through PyTorch's own wrappers: DDP, or FSDP2 (`fully_shard`).

Applied once, after the model is built (and adapted, checkpointed), in a fixed order, before
the optimizer is built (torchtitan `parallelize.py` style); the model classes are not changed.

  none   one process; the model as it is.
  ddp    every rank holds the whole model, gradients all-reduced (DistributedDataParallel).
  fsdp   FSDP2: each decoder layer, a VLM's vision blocks, vision tower and projector, then the root,
         sharded across ranks (HSDP with parallel.replicate > 1: sharded within each of `replicate` groups of
         `shard` ranks, replicated across them). reshard_after_forward
         true frees gathered weights after the forward (ZeRO-3), false keeps them to the
         backward (ZeRO-2). bf16 runs use MixedPrecisionPolicy (bf16 params and compute, fp32
         gradient reduction); cpu_offload keeps shards, gradients and optimizer state on the host.

The loss is the global token mean (DESIGN.md invariant 5): each rank divides its loss sum by the
all-reduced target count of the step, so the gradient wanted is the SUM over ranks. DDP averages,
so its loss is scaled by world size (`loss_scale`); FSDP2 is told to divide by 1.
"""

from __future__ import annotations

import contextlib
from collections import deque

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from zeropad.config import ParallelConfig
from zeropad.errors import ConfigError, ZeropadError
from zeropad.family import media_family, random_pixels
from zeropad.parallel import distributed


def _decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    decoder = model.get_decoder()
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise ConfigError(f"parallel.strategy=fsdp: cannot find the decoder layers of {type(model).__name__} "
                          "(expected get_decoder().layers); use parallel.strategy=ddp")
    return list(layers)


def _vision_units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """A VLM's vision tower blocks (each element of the tower's ModuleLists), the tower, and the projector
    modules beside it (Kimi's mm_projector; Qwen's merger lives in the tower), in the order to shard them."""
    tower = vision_tower(model)
    if tower is None:
        return []
    blocks = [block for child in tower.children() if isinstance(child, torch.nn.ModuleList) for block in child]
    parent = next(m for m in model.modules() if any(child is tower for child in m.children()))
    decoder = model.get_decoder()
    projectors = [child for child in parent.children()
                  if child is not tower and child is not decoder and any(True for _ in child.parameters())]
    return [*blocks, tower, *projectors]


def vision_tower(model: torch.nn.Module) -> torch.nn.Module | None:
    """The module built from the config's vision_config (Qwen's `visual`, Kimi's `vision_tower`); None for a
    text-only model."""
    vision_config = getattr(model.config, "vision_config", None)
    if vision_config is None:
        return None
    return next(m for m in model.modules() if getattr(m, "config", None) is vision_config)


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
    for layer in [*_vision_units(model), *_decoder_layers(model)]:
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


def check_parallel(cfg: ParallelConfig, device: torch.device) -> None:
    """What `parallelize` would refuse for these settings on `device`, refused before any work."""
    if cfg.cpu_offload and cfg.strategy != "fsdp":
        raise ConfigError("parallel.cpu_offload is an FSDP option: set parallel.strategy=fsdp")
    if cfg.cpu_offload and device.type != "cuda":
        raise ConfigError("parallel.cpu_offload moves FSDP shards from the GPU to host memory; training on "
                          f"{device.type} they are in host memory already: set parallel.cpu_offload=false")


def parallelize(model: torch.nn.Module, cfg: ParallelConfig, dtype: str, device: torch.device) -> torch.nn.Module:
    """The model wrapped for `parallel.strategy`; call after build/LoRA/checkpointing, before the optimizer."""
    check_parallel(cfg, device)
    if cfg.strategy == "none" or (distributed.world_size() == 1 and not cfg.cpu_offload):
        return model  # one process: nothing to shard or synchronise (cpu_offload: FSDP on one GPU, states on host)
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


class VisionCalls:
    """Under FSDP2 every rank must run each sharded module equally often in each micro-step: a module's forward
    all-gathers its weights and its backward reduce-scatters their gradients, collectives every rank joins in the
    same order. A VLM runs its vision tower once per forward for the pack's images (once more for its videos),
    so a rank whose pack holds fewer kinds of media than another's would skip collectives the other waits in.

    The scheme: before a step's micro-steps, `plan` agrees with the other ranks (one all-reduce, MAX) how many
    tower calls each micro-step makes at most. When the text model starts (a forward pre-hook on the decoder,
    the point where the tower has run, so the collective order is the real call's), each missing call runs the
    tower and projector (`get_image_features`) on a tiny fixed dummy image, and zero times the sum of its
    outputs is added to the text model's input embeddings. The forward's values are unchanged (x + 0 = x) and
    the dummy's gradient is exactly zero, so the sum over ranks equals one process over the same packs; a
    micro-step without images on every rank runs no tower at all, so its weights keep no gradient (None, as in
    one process, and Adam skips them). Unplanned forwards (evaluation: every rank the same packs) are not padded.
    """

    def __init__(self, model: torch.nn.Module, tower: torch.nn.Module):
        self.model = model
        config = model.config
        family = media_family(config)
        grid = (1, family.merge_size, family.merge_size)  # the smallest image: one visual token
        self.pixels = random_pixels(config, family, grid, np.random.default_rng(0))
        self.grid = torch.tensor([grid])
        self.planned: deque[int] = deque()
        self.calls = 0
        self._handles = [tower.register_forward_hook(self._count),
                         model.get_decoder().register_forward_pre_hook(self._pad, with_kwargs=True)]

    @classmethod
    def attach(cls, model: torch.nn.Module) -> VisionCalls | None:
        """The padding for an FSDP-sharded VLM; None for any other model or strategy."""
        tower = vision_tower(model) if isinstance(model, FSDPModule) else None
        return None if tower is None else cls(model, tower)

    def plan(self, packs) -> None:
        """Agree with the other ranks on each micro-step's tower calls (a collective: every rank calls it)."""
        calls = torch.tensor([("pixel_values" in p.media) + ("pixel_values_videos" in p.media) for p in packs],
                             dtype=torch.int64, device=distributed.host_collective_device(packs[0].input_ids.device))
        dist.all_reduce(calls, op=dist.ReduceOp.MAX)
        self.planned = deque(calls.tolist())

    def _count(self, module, args, output) -> None:
        self.calls += 1

    def _pad(self, module, args, kwargs):
        calls = self.calls
        if not self.planned:
            self.calls = 0
            return None
        missing = self.planned.popleft() - calls
        if missing < 0:
            raise ZeropadError(f"the vision tower ran {calls} times in one forward, {calls + missing} planned "
                               "(one call for the images, one for the videos): this model is not supported "
                               "with parallel.strategy=fsdp; use parallel.strategy=ddp")
        embeds = kwargs["inputs_embeds"]
        zero = embeds.new_zeros(())
        for _ in range(missing):
            out = self.model.get_image_features(self.pixels.to(embeds.device), self.grid.to(embeds.device))
            zero = zero + sum(t.sum() for t in _tensors(out) if t.is_floating_point())
        self.calls = 0  # after the dummy calls, which _count counts too
        return (args, {**kwargs, "inputs_embeds": embeds + 0 * zero}) if missing else None


def _tensors(value):
    """Every tensor in a model output (tensors, tuples, lists, dicts and ModelOutputs, nested)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):  # ModelOutput is a dict
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)
