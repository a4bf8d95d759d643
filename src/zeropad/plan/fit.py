"""Fitting a run into a device: the largest pack.max_tokens and the least recompute that fit, and
the `memory.checkpointing: auto` choice made with them at start-up."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch

from zeropad.config import Config
from zeropad.errors import ConfigError
from zeropad.plan.arch import Arch, arch_of
from zeropad.plan.memory import GB, Setup, device_total, plan, recompute_fraction

MARGIN = 0.10  # left free of the device: allocator fragmentation, and what the plan does not model


def setup_from_config(cfg: Config, **options) -> Setup:
    """The run's Setup as configured; `options` (strategy, num_devices, ...) override it."""
    m = cfg.memory
    return replace(Setup(
        precision=cfg.train.dtype, checkpointing=m.checkpointing, offload_activations=m.offload_activations,
        chunked_loss=m.chunked_loss, loss_chunk_tokens=m.loss_chunk_tokens,
        grad_accum=cfg.train.grad_accum, sp_size=cfg.parallel.sp_size,
    ), **options)


def largest_tokens(a: Arch, setup: Setup, budget: float) -> int:
    """The largest pack.max_tokens (a multiple of 128 when over 128) that fits in `budget` bytes."""
    def fits(tokens: int) -> bool:
        return device_total(plan(a, setup, tokens)) <= budget

    if not fits(1):
        return 0
    low, high = 1, 2
    while high < 2**26 and fits(high):
        low, high = high, high * 2
    while high - low > 1:  # memory grows with tokens, so bisect
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low if low < 128 else low // 128 * 128


@dataclass
class Option:
    policy: str
    recompute: float  # share of forward matmul FLOPs recomputed in backward
    device_bytes: float  # at the configured pack.max_tokens
    largest_tokens: int


def options(a: Arch, setup: Setup, tokens: int, budget: float) -> list[Option]:
    """Every checkpointing policy worth considering, least recompute first."""
    every = [f"every:{k}" for k in (4, 2) if k < a.num_layers]
    out = []
    for policy in ["none", "selective", *every, "full"]:
        s = replace(setup, checkpointing=policy)
        out.append(Option(policy, recompute_fraction(a, policy), device_total(plan(a, s, tokens)),
                          largest_tokens(a, s, budget)))
    return sorted(out, key=lambda o: o.recompute)


def recommend(opts: list[Option], tokens: int) -> Option | None:
    """The least recompute that fits `tokens`; if none does, the policy that fits the most tokens."""
    for opt in opts:
        if opt.largest_tokens >= tokens:
            return opt
    best = max(opts, key=lambda o: o.largest_tokens)
    return best if best.largest_tokens > 0 else None


def budget_bytes(device_bytes: float) -> float:
    return device_bytes * (1 - MARGIN)


def detect_device_bytes(device: torch.device) -> float:
    """The GPU's total memory, or the host's RAM when training on CPU."""
    if device.type == "cuda":
        return float(torch.cuda.get_device_properties(device).total_memory)
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def parse_size(text: str) -> float:
    """'80GB' -> 80e9 bytes; GiB and MiB are binary; a bare number is GB."""
    units = {"": GB, "g": GB, "gb": GB, "mb": 1e6, "tb": 1e12, "gib": 2**30, "mib": 2**20}
    t = text.strip().lower()
    number = t.rstrip("abcdefghijklmnopqrstuvwxyz ")
    try:
        return float(number) * units[t[len(number):].strip()]
    except (KeyError, ValueError):
        raise ConfigError(f"cannot read the memory size {text!r}; write it like 80GB or 24GiB") from None


def choose_checkpointing(cfg: Config, a: Arch, device: torch.device) -> str:
    """`memory.checkpointing: auto`: the least recompute whose plan fits the device at pack.max_tokens."""
    device_bytes = cfg.memory.device_gb * GB if cfg.memory.device_gb else detect_device_bytes(device)
    setup = setup_from_config(cfg)
    tokens = cfg.pack.max_tokens
    opts = options(a, setup, tokens, budget_bytes(device_bytes))
    best = recommend(opts, tokens)
    if best is None or best.largest_tokens < tokens:
        most = f"at most pack.max_tokens={best.largest_tokens} fits (with {best.policy})" if best else "nothing fits"
        raise ConfigError(
            f"memory.checkpointing=auto: {tokens} tokens per micro-step do not fit in "
            f"{device_bytes / GB:.1f} GB even with full checkpointing; {most}. Lower pack.max_tokens, "
            "or set memory.device_gb if the detected size is wrong (see `zeropad plan`)"
        )
    return best.policy


def resolve_checkpointing(cfg: Config, model: torch.nn.Module) -> str:
    """The concrete policy for this run: `memory.checkpointing`, with `auto` resolved by
    `choose_checkpointing` for the model as built (and adapted); it raises if no policy fits."""
    policy = cfg.memory.checkpointing
    if policy == "auto":
        return choose_checkpointing(cfg, arch_of(model), next(model.parameters()).device)
    return policy
