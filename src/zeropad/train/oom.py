"""Out of memory in a step (CUDA's torch.OutOfMemoryError, the host's MemoryError), named: the step, the pack's
size, the memory planner's predicted peak for this configuration and the settings that would fit, after
saving the last good state when that is possible."""

from __future__ import annotations

import gc
from contextlib import contextmanager
from dataclasses import replace

import torch

from zeropad.config import Config
from zeropad.errors import OutOfMemory
from zeropad.parallel import distributed
from zeropad.plan.arch import arch_of
from zeropad.plan.fit import budget_bytes, detect_device_bytes, largest_tokens, options, recommend, setup_from_config
from zeropad.plan.memory import GB, device_total, plan
from zeropad.storage import fmt_bytes
from zeropad.train.state import last_complete_checkpoint


class StepMemory:
    """Watches the optimizer through its public step hooks: an OOM before its step leaves the weights as the
    last step left them (saved), one inside it may have updated some of them (not saved)."""

    def __init__(self, cfg: Config, model, optimizer, guard, device: torch.device):
        self.cfg, self.model, self.optimizer, self.guard, self.device = cfg, model, optimizer, guard, device
        self.stepping = False
        optimizer.register_step_pre_hook(lambda *_: setattr(self, "stepping", True))
        optimizer.register_step_post_hook(lambda *_: setattr(self, "stepping", False))

    @contextmanager
    def step(self, step: int, pack_tokens: list[int]):
        try:
            yield
        except (torch.OutOfMemoryError, MemoryError) as err:
            raise self._stopped(step, pack_tokens, err) from None

    def _stopped(self, step: int, pack_tokens: list[int], err: BaseException) -> OutOfMemory:
        kind = "CUDA" if isinstance(err, torch.OutOfMemoryError) else "host"
        self.optimizer.zero_grad(set_to_none=True)  # the partial step's gradients: room to save in
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        largest = max(pack_tokens)
        message = (f"step {step} ran out of {kind} memory ({str(err).splitlines()[0][:200]}) on a pack of "
                   f"{largest:,} tokens (pack.max_tokens={self.cfg.pack.max_tokens}, "
                   f"memory.checkpointing={self.cfg.memory.checkpointing}). {self._planner_advice()}")
        saved = self._save()
        if saved is not None:
            return OutOfMemory(f"{message} Checkpoint (the state after step {step - 1}) saved to {saved}", saved)
        last = last_complete_checkpoint(self.cfg.output_dir)
        where = f"the last complete checkpoint is {last}" if last else "no checkpoint was written yet"
        return OutOfMemory(f"{message} Nothing new was saved ({self._why_not_saved()}); {where}",
                           None if last is None else str(last))

    def _save(self) -> str | None:
        """Checkpoint the state after the previous step, when that is safe and useful; its path, else None."""
        if self._why_not_saved() is not None:
            return None
        if self.guard.saved_step != self.guard.position.step:
            self.guard.save(before_step=True)
        return str(self.guard.checkpoint_path())

    def _why_not_saved(self) -> str | None:
        if self.stepping:
            return "it struck inside the optimizer step, which may have updated some weights already"
        if distributed.world_size() > 1:
            return "under torchrun another rank may be inside a collective, so saving is not attempted"
        if self.guard.position.step == 0:
            return "no step had finished"
        return None

    def _planner_advice(self) -> str:
        """The planner's peak at this configuration and the settings it says fit; a run the planner cannot model
        (an unknown architecture) gets a pointer to `zeropad plan` instead of a second error."""
        cfg = self.cfg
        try:
            a = arch_of(_unwrapped(self.model))
            setup = setup_from_config(cfg, num_devices=distributed.world_size(),
                                      strategy=_strategy(cfg), replicate=cfg.parallel.replicate)
            device_bytes = cfg.memory.device_gb * GB if cfg.memory.device_gb else detect_device_bytes(self.device)
            policy = cfg.memory.checkpointing if cfg.memory.checkpointing != "auto" else "none"
            setup = replace(setup, checkpointing=policy)
            peak = device_total(plan(a, setup, cfg.pack.max_tokens))
            budget = budget_bytes(device_bytes)
            fits_tokens = largest_tokens(a, setup, budget)
            best = recommend(options(a, setup, cfg.pack.max_tokens, budget), cfg.pack.max_tokens)
        except Exception as err:  # noqa: BLE001 - the OOM is the error to report, not the planner's
            return f"(the memory planner cannot model this run: {err}; see `zeropad plan`)"
        advice = [f"pack.max_tokens={fits_tokens}" if fits_tokens else None]
        if best is not None and best.policy != policy:
            advice.append(f"memory.checkpointing={best.policy} (fits up to pack.max_tokens={best.largest_tokens})")
        advice = [a for a in advice if a] or ["more devices (parallel.strategy=fsdp) or parallel.cpu_offload"]
        predicted = (f"The memory planner predicts a peak of {fmt_bytes(peak)} per device for this configuration, "
                     f"against {fmt_bytes(device_bytes)} ({fmt_bytes(budget)} usable)")
        if peak <= budget:  # the plan fits: what ran out is outside it
            return (f"{predicted}: it should fit, so memory the planner does not model is in use (other processes "
                    "on the device, fragmentation, a vision tower's activations); set memory.device_gb to what is "
                    "really free and see `zeropad plan`.")
        return f"{predicted}. What fits: {' or '.join(advice)} (`zeropad plan` shows the breakdown)."


def _unwrapped(model):
    from zeropad.parallel.sharding import unwrap

    return unwrap(model)


def _strategy(cfg: Config) -> str:
    """The planner's name for the configured data parallelism."""
    if cfg.parallel.strategy != "fsdp":
        return "none"  # DDP keeps whole model states on every rank
    if cfg.parallel.cpu_offload:
        return "offload"
    return "zero3" if cfg.parallel.reshard_after_forward else "zero2"
