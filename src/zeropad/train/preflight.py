"""Before any compute: OUTPUT_DIR can be written, and holds room for what the run will write there.

What a run writes, predicted with the memory planner's byte counts for its model states
(plan.memory.model_states: fp32 weights and the optimizer's moments, as a checkpoint's dcp/ holds them):
checkpoint.keep + 1 checkpoints (the next is written before the oldest is pruned), each weights + optimizer
state + the tokenizer's files; final/ (the weights); the logs (metrics.jsonl, loss.png, summary.json).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from zeropad.config import Config
from zeropad.errors import NotEnoughSpace, StorageError
from zeropad.model.load import build_model
from zeropad.parallel import distributed
from zeropad.plan.arch import arch_of
from zeropad.plan.memory import Setup, model_states
from zeropad import storage
from zeropad.train.optim import apply_freeze
from zeropad.train.state import MANIFEST, checkpoint_root, step_dirs

LOG_BYTES_PER_STEP = 4096  # a metrics.jsonl record (an MoE's expert loads make it long), with room to spare
LOG_BYTES = 2 * 10**6  # loss.png, summary.json, config.json
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")


def check(cfg: Config) -> None:
    """NotEnoughSpace (exit code 5) when OUTPUT_DIR cannot be written, or has less free space than the run
    writes and checkpoint.on_low_disk is refuse (warn: a warning, and the run goes on). Every rank checks and
    all agree, so that none starts while another stops."""
    out = Path(cfg.output_dir)
    try:
        storage.agreed(lambda: _probe(out, cfg), "OUTPUT_DIR", out)
    except StorageError as err:
        raise NotEnoughSpace(f"output_dir: {err}; choose another output_dir") from None
    needs = disk_needs(cfg)
    needed, free = sum(needs.values()), storage.free_bytes(out)
    parts = ", ".join(f"{name} {storage.fmt_bytes(n)}" for name, n in needs.items())
    message = storage.on_any_rank(None if needed <= free else (
        f"output_dir {out.absolute()} has {storage.fmt_bytes(free)} free, but the run writes about "
        f"{storage.fmt_bytes(needed)} there ({parts})"))
    if message is None:
        return
    if cfg.checkpoint.on_low_disk == "warn":
        if distributed.is_main():
            print(f"warning: {message}; running anyway (checkpoint.on_low_disk=warn)", file=sys.stderr)
        return
    raise NotEnoughSpace(f"{message}. Free space, choose another output_dir, lower checkpoint.keep, or set "
                         "checkpoint.on_low_disk=warn to run anyway")


def _probe(out: Path, cfg: Config) -> None:
    out.mkdir(parents=True, exist_ok=True)
    probe = out / f".zeropad-write-test-{distributed.rank()}-{os.getpid()}"
    try:
        probe.write_text("zeropad checks that it can write here\n")
    finally:
        probe.unlink(missing_ok=True)


def disk_needs(cfg: Config) -> dict[str, int]:
    """Bytes the run will add to OUTPUT_DIR, by what (checkpoints already there count as written)."""
    model = build_model(cfg.model, device="meta", lora=True)  # shapes only: nothing is read or allocated
    apply_freeze(model, cfg.train.freeze)
    a = arch_of(model)
    states = {row.name: row.device for row in model_states(a.num_params, Setup(precision=cfg.train.dtype),
                                                            a.num_trainable_params)}
    one_checkpoint = int(states["parameters"] + states["optimizer state"]) + _tokenizer_bytes(cfg)
    existing = sum((path / MANIFEST).is_file() for _, path in step_dirs(checkpoint_root(cfg.output_dir)))
    count = max(1, cfg.checkpoint.keep + 1 - existing)
    return {f"{count} checkpoint(s) of {storage.fmt_bytes(one_checkpoint)} (checkpoint.keep={cfg.checkpoint.keep} "
            "+ the next, written before the oldest is deleted)": count * one_checkpoint,
            "final/": int(states["parameters"]),
            "logs": LOG_BYTES + LOG_BYTES_PER_STEP * cfg.train.steps}


def _tokenizer_bytes(cfg: Config) -> int:
    """The tokenizer files a checkpoint copies: its directory's files that are not weights."""
    source = cfg.model.tokenizer or cfg.model.path
    if source is None or not Path(source).is_dir():
        return 0
    return sum(p.stat().st_size for p in Path(source).iterdir() if p.is_file() and not p.name.endswith(_WEIGHT_SUFFIXES))
