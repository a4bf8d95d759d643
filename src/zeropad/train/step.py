"""One optimizer step, and evaluation: the packs' forward and backward, the one host read, the update.

What the loop (train/loop.py) calls every step, and what benchmarks call directly: `StepSetup` holds what every
step uses besides its packs, `train_step` runs one step over this rank's micro-steps, `StepResult` is what it read.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch

from zeropad.pack.collate import Pack
from zeropad.parallel import distributed, ulysses
from zeropad.parallel.sharding import VisionCalls, gradient_sync, loss_scale
from zeropad.train.loss import lm_loss_sum
from zeropad.train.moe import RouterStats, load_metrics
from zeropad.train.preference import PreferenceObjective


@dataclass
class StepSetup:
    """What every optimizer step uses besides its packs; built once per run."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer | None = None
    scheduler: object = None
    autocast: object = field(default_factory=contextlib.nullcontext)
    grad_clip: float = 0.0  # 0: measure the norm, clip nothing
    loss_chunk_tokens: int | None = None  # set: the [T, V] logits are never built (train/loss.py)
    activations: object = field(default_factory=contextlib.nullcontext)  # checkpointing.activation_context
    router: RouterStats | None = None  # an MoE model's routers (train/moe.py)
    vision: VisionCalls | None = None  # an FSDP-sharded VLM: equal vision tower calls on every rank (sharding.py)
    objective: PreferenceObjective | None = None  # a pair loss over the packs' pairs (train/preference.py)


@dataclass(frozen=True)
class StepResult:
    """One optimizer step, summed over ranks: token loss, router aux loss, gradient norm; an MoE model's expert
    load (train/moe.load_metrics) over the step's forwards."""

    loss: float
    aux_loss: float
    grad_norm: float
    expert_load: dict[str, float] = field(default_factory=dict)

    @property
    def skipped(self) -> bool:
        """The one non-finite check: such an update would poison the weights and Adam's moments, so it is not
        applied, and the run guard counts it."""
        return not (math.isfinite(self.loss + self.aux_loss) and math.isfinite(self.grad_norm))


def forward_loss_sum(model, pack: Pack, autocast, loss_chunk_tokens: int | None = None) -> torch.Tensor:
    """Summed token loss of one pack; with loss_chunk_tokens the [T, V] logits are never built."""
    with autocast:
        return lm_loss_sum(model, pack.model_inputs(), pack.target_ids[0], loss_chunk_tokens, pack.target_rows)


def accumulate_gradients(setup: StepSetup, packs: list[Pack], num_targets: int | None = None,
                         num_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward over this process's micro-steps of one optimizer step; (token loss, router aux loss), this
    process's shares, as device scalars: nothing is read to the host here (train_step reads the step once).

    Each pack's loss sum is divided by the step's total target count (`num_targets`: over all ranks,
    all-reduced; by default this process's packs), so the summed gradient is that of the token mean over
    the step. An MoE model's aux loss is weighted by each pack's share of the step's tokens (`num_tokens`,
    all ranks), the same normalisation (train/moe.py). Gradients are synchronised across ranks on the last
    micro-step only. A preference objective's pair losses are divided by the step's pair count instead."""
    model, router = setup.model, setup.router
    num_targets = sum(p.num_pairs or p.num_targets for p in packs) if num_targets is None else num_targets
    num_tokens = sum(p.num_tokens for p in packs) if num_tokens is None else num_tokens
    assert num_targets > 0, "every sample carries at least one target token"
    scale = loss_scale(model)  # DDP averages over ranks; the global mean needs their sum
    device = packs[0].input_ids.device
    loss_total, aux_total = torch.zeros((), device=device), torch.zeros((), device=device)
    if setup.vision is not None:
        setup.vision.plan(packs)
    # bf16: autocast casts each fp32 weight once per optimizer step, not once per micro-step. Its cache of casts
    # lives until the outermost autocast context exits; this one (autocast off: backward runs outside autocast)
    # spans the micro-steps, so later forwards, and checkpointed layers' recomputes, reuse the first's bf16 copies.
    # It exits before the update, which the copies must not outlive.
    with torch.autocast(device.type, enabled=False):
        for i, pack in enumerate(packs):
            with gradient_sync(model, enabled=i == len(packs) - 1), setup.activations:
                if setup.objective is None:
                    loss = forward_loss_sum(model, pack, setup.autocast, setup.loss_chunk_tokens) / num_targets
                else:
                    loss = setup.objective.loss_sum(model, pack, setup.autocast) / num_targets
                aux = router.pack_aux_loss() * (pack.num_tokens / num_tokens) if router else torch.zeros((), device=device)
                ((loss + aux) * scale if scale != 1 else loss + aux).backward()
            loss_total += loss.detach()
            aux_total += aux.detach().to(device)
    return loss_total, aux_total


def _clip_grad_norm(model, grad_clip: float) -> torch.Tensor:
    """The gradient norm over all ranks, a device scalar (clipping, if any, scales the gradients on the device)."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else math.inf)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: a DTensor


def train_step(setup: StepSetup, packs: list[Pack], num_targets: int | None = None,
               num_tokens: int | None = None) -> StepResult:
    """One optimizer step over this rank's packs; the update is skipped when anything is non-finite.

    The step reads the device once: its statistics (with an MoE model's expert counts), stacked, in one
    collective and one `.tolist()`. That read comes before the update, which it decides: the skip stays exact (a
    non-finite step touches neither the weights nor Adam's moments nor the schedule) at the cost of the device
    idling while the host launches the update, a few fused kernels (train/optim.py). Deciding on the device instead would need GradScaler's private
    found_inf protocol in the optimizer and a schedule stepped after the read."""
    loss, aux = accumulate_gradients(setup, packs, num_targets, num_tokens)
    routed = setup.router.take_counts() if setup.router is not None else None
    # summed over ranks: each rank's shares of the mean losses, and its expert counts
    summed = distributed.sum_over_ranks(torch.cat([torch.stack([loss, aux]).double()]
                                                  + ([routed[1].flatten()] if routed else [])))
    norm = _clip_grad_norm(setup.model, setup.grad_clip)  # global already: not summed over ranks
    # the norm is on the CPU under parallel.cpu_offload (so are the gradients); a non-blocking copy waits for nothing
    stats = torch.cat([summed, norm.detach().to(summed.device, torch.float64, non_blocking=True)[None]]).tolist()
    result = StepResult(stats[0], stats[1], stats[-1], load_metrics(routed[0], stats[2:-1]) if routed else {})
    if not result.skipped:
        setup.optimizer.step()
        setup.scheduler.step()
    setup.optimizer.zero_grad(set_to_none=True)
    return result


@torch.no_grad()
def evaluate(model, packs: list[Pack], device: torch.device, autocast, loss_chunk_tokens: int | None = None,
             objective: PreferenceObjective | None = None) -> float:
    """The token-mean loss over `packs`, or with a preference `objective`, the pair-mean loss (its rewards tallied)."""
    model.eval()
    loss_sum, num_targets = 0.0, 0
    for pack in packs:
        if objective is None:
            loss_sum += forward_loss_sum(model, pack.to(device), autocast, loss_chunk_tokens).item()
        else:
            loss_sum += objective.loss_sum(model, pack.to(device), autocast).item()
        num_targets += pack.num_pairs or pack.num_targets
    model.train()
    if ulysses.active() is not None:  # each rank of an SP group evaluated its token range of the same packs
        loss_sum, num_targets = ulysses.group_sum(torch.tensor([loss_sum, num_targets], dtype=torch.float64,
                                                                device=device)).tolist()
    return loss_sum / max(1, num_targets)
