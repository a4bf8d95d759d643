"""AdamW with per-group learning rates and freezing, and the learning-rate schedule (linear warmup,
then cosine to min_lr_ratio, or constant).

A vision-language model's parameters fall in three groups: `vision` (the image encoder), `projector`
(what maps visual features into the language model's embedding space) and `language` (everything
else: the decoder with its embeddings and head). `train.freeze` leaves groups untrained and
`train.group_lr` gives a group its own peak learning rate.

Groups are found by module identity, not by parameter-name patterns: the vision tower is the module
transformers' own `get_encoder(modality="image")` returns, and the projector is the tower's or the
base model's projection sub-module. The parameters of those module objects are then looked up in
whatever the caller holds (a peft, DDP or FSDP wrapper, checkpoint-wrapped layers), so name prefixes
such as "base_model.model.", "module." or "_checkpoint_wrapped_module." never need stripping.

  model            vision                      projector
  Qwen2/2.5-VL     model.visual                visual.merger
  Qwen3-VL(-MoE)   model.visual                visual.merger, visual.deepstack_merger_list
  Kimi-K2.5        model.vision_tower          model.mm_projector
  LLaVA-style      model.vision_tower          model.multi_modal_projector
  Chameleon        model.vqmodel (VQ-VAE)      none: image codes are ordinary tokens
  text-only LM     none                        none

One optimizer param group per (group, decay / no-decay), language first, so `param_groups[0]` is the
language model's whenever it trains. Each carries its group name under "group". The schedule is one
LambdaLR factor, which multiplies every param group's own peak, so all groups warm up and decay
together. A text-only model gets exactly the two groups it always had (same order, same values).
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
from transformers import PreTrainedModel

from zeropad.config import TrainConfig
from zeropad.errors import ConfigError

Group = Literal["vision", "projector", "language"]
OPTIMIZER_ORDER: tuple[Group, ...] = ("language", "projector", "vision")

# Attributes holding the projector, on the vision tower (Qwen's mergers) or on the base model beside it.
# transformers has no lookup for projectors like get_encoder, hence this list.
PROJECTOR_ATTRS = ("merger", "deepstack_merger_list", "mm_projector", "multi_modal_projector")


class GroupCount(NamedTuple):
    trained: int  # parameter elements with requires_grad
    frozen: int


def _hf_model(model: torch.nn.Module) -> PreTrainedModel | None:
    """The outermost Hugging Face model inside any wrappers (modules() walks parents before children)."""
    return next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)


def _vision_tower(hf_model: PreTrainedModel) -> torch.nn.Module | None:
    encoder = hf_model.get_encoder(modality="image")  # returns the model itself when it finds none
    if encoder is not hf_model and encoder is not hf_model.base_model:
        return encoder
    # Chameleon turns images into codes with a VQ-VAE sub-model, a name get_encoder does not look for
    return getattr(hf_model.base_model, "vqmodel", None)


def _projectors(hf_model: PreTrainedModel, tower: torch.nn.Module) -> list[torch.nn.Module]:
    found = (getattr(holder, name, None) for holder in (tower, hf_model.base_model) for name in PROJECTOR_ATTRS)
    return [module for module in found if isinstance(module, torch.nn.Module)]


def parameter_groups(model: torch.nn.Module) -> dict[str, Group]:
    """Group of every parameter, keyed by its name in `model` (as `model.named_parameters()` gives it,
    wrapper prefixes included). Any module that is not a Hugging Face VLM is all `language`."""
    owner: dict[int, Group] = {}
    hf_model = _hf_model(model)
    tower = _vision_tower(hf_model) if hf_model is not None else None
    if tower is not None:
        owner.update((id(p), "vision") for p in tower.parameters())
        # after vision: Qwen's mergers live inside the tower
        owner.update((id(p), "projector") for m in _projectors(hf_model, tower) for p in m.parameters())
    return {name: owner.get(id(p), "language") for name, p in model.named_parameters()}


def count_groups(model: torch.nn.Module) -> dict[Group, GroupCount]:
    """Trained and frozen parameter elements per group present in `model`, in OPTIMIZER_ORDER."""
    groups = parameter_groups(model)
    totals = {g: [0, 0] for g in OPTIMIZER_ORDER}
    for name, p in model.named_parameters():
        totals[groups[name]][0 if p.requires_grad else 1] += p.numel()
    return {g: GroupCount(*t) for g, t in totals.items() if sum(t)}


def describe_groups(counts: dict[Group, GroupCount]) -> str:
    """One log line: 'language 1.20M trained, projector 0.10M trained, vision 0.60M frozen'."""
    def part(g: Group, c: GroupCount) -> str:
        if c.trained and c.frozen:
            return f"{g} {c.trained / 1e6:.2f}M trained + {c.frozen / 1e6:.2f}M frozen"
        return f"{g} {(c.trained or c.frozen) / 1e6:.2f}M {'trained' if c.trained else 'frozen'}"
    return ", ".join(part(g, c) for g, c in counts.items())


def _missing_group(model: torch.nn.Module, key: str, group: str) -> ConfigError:
    hf_model = _hf_model(model)
    kind = type(hf_model or model).__name__
    return ConfigError(f"{key}: {kind} has no {group} parameters (groups present: "
                       f"{', '.join(count_groups(model))}); remove {group} from {key}")


def apply_freeze(model: torch.nn.Module, freeze: list[str]) -> dict[Group, GroupCount]:
    """Sets requires_grad=False on every parameter of the `freeze` groups (train.freeze) and returns the
    counts per group for the log line. Call before parallelize: DDP and FSDP register only the
    parameters that require grad when they wrap the model."""
    groups = parameter_groups(model)
    for group in freeze:
        if group not in groups.values():
            raise _missing_group(model, "train.freeze", group)
    for name, p in model.named_parameters():
        if groups[name] in freeze:
            p.requires_grad_(False)
    counts = count_groups(model)
    if not any(c.trained for c in counts.values()):
        raise ConfigError(f"train.freeze: {freeze} leaves nothing to train ({describe_groups(counts)}); "
                          "freeze fewer groups")
    return counts


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the parameters that require grad, one param group per (group, decay / no-decay),
    each at its group's peak LR (cfg.group_lr, else cfg.lr); torch's fused implementation where it runs."""
    groups = parameter_groups(model)
    for group in cfg.group_lr:
        if group not in groups.values():
            raise _missing_group(model, "train.group_lr", group)
        if group in cfg.freeze:
            raise ConfigError(f"train.group_lr: {group} is also in train.freeze, so it never trains; "
                              f"remove one of the two")
    param_groups = []
    for group in OPTIMIZER_ORDER:
        # Norm weights and biases (1-D) are not decayed: decay would pull their scale towards zero.
        decay, no_decay = [], []
        for name, p in model.named_parameters():
            if p.requires_grad and groups[name] == group:
                (decay if p.ndim >= 2 else no_decay).append(p)
        if decay or no_decay:
            lr = cfg.group_lr.get(group, cfg.lr)
            param_groups += [{"params": decay, "weight_decay": cfg.weight_decay, "lr": lr, "group": group},
                             {"params": no_decay, "weight_decay": 0.0, "lr": lr, "group": group}]
    params = [p for g in param_groups for p in g["params"]]
    return torch.optim.AdamW(param_groups, lr=cfg.lr, betas=cfg.betas, eps=1e-8, fused=_fusable(params))


def _fusable(params: list[torch.Tensor]) -> bool:
    """Whether torch's fused AdamW runs these parameters: floating point on CPU or CUDA (FSDP2's DTensors
    included). Fused, one kernel updates every tensor, and the step count stays on the device: the default
    single-tensor path reads it to the host for every parameter; the results agree within rounding
    (tests/train/test_optim.py). Its state dict is the same, so checkpoints resume across the two."""
    return all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)


def group_lrs(optimizer: torch.optim.Optimizer) -> dict[Group, float]:
    """The LR each group steps with now (the scheduler writes it into every param group)."""
    return {g["group"]: g["lr"] for g in optimizer.param_groups}


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of each group's peak LR for the update at 0-based `step`."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    decay_steps = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    # One factor for all param groups: LambdaLR multiplies each group's own initial lr by it.
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))
