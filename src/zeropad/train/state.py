"""Checkpoints: written atomically, validated on load, resumed exactly.

A checkpoint is a directory OUTPUT_DIR/checkpoints/step_000123/ holding

    model.safetensors    the training model's own state dict (tied tensors stored once)
    optimizer.pt         optimizer and LR-schedule state (tensors and plain data only)
    rng.pt               python, numpy, torch CPU (and CUDA) generator states
    state.json           step, token and bad-step counters, data position (epoch, packs done)
    config.json          the resolved zeropad config of the run
    model/, tokenizer/   Hugging Face model config, generation config and tokenizer, for export
    COMPLETE             manifest of every file with its size, written last

It is written into `.tmp-step_000123`, every file and directory fsynced, then renamed into place,
so it is never half-visible: a crash during a save leaves the previous checkpoint as it was.
Everything loads with safetensors or torch.load(weights_only=True): no pickled code runs.

Under torchrun (world size > 1) model and optimizer are saved with torch.distributed.checkpoint
(DCP) into dcp/, each rank writing its own shards, and scheduler.pt replaces optimizer.pt; rank 0
writes everything else, the manifest last, and renames the directory after every rank has written.
DCP checkpoints load on any world size (1 included), and the single-process format loads under
torchrun too (full state dicts, sharded as they are set), so a run moves between world sizes.

Test hook: ZEROPAD_TEST_KILL_DURING_SAVE=STEP makes the process SIGKILL itself halfway through
writing checkpoint STEP (weights written, manifest not), to test that a crash there loses nothing.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

from zeropad.errors import ZeropadError
from zeropad.parallel import distributed

MANIFEST = "COMPLETE"
DCP_DIR = "dcp"
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CorruptCheckpoint(ZeropadError):
    """A checkpoint that cannot be used: unfinished, truncated or unreadable."""


@dataclass
class Position:
    """Where a run is: the counters and the data position a resumed run continues from."""

    step: int = 0
    tokens_seen: int = 0
    bad_steps: int = 0  # non-finite updates skipped so far (the consecutive count restarts on resume)
    epoch: int = 0
    index: int = 0  # packs of `epoch` already trained on


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def step_dirs(root: Path) -> list[tuple[int, Path]]:
    """(step, directory) of every step_N directory under root, complete or not, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


def verify(path: Path) -> dict:
    """The manifest of a complete checkpoint; CorruptCheckpoint saying why otherwise."""
    if not path.is_dir():
        raise CorruptCheckpoint(f"{path}: no such checkpoint directory")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = dict(manifest["files"])
    except FileNotFoundError:
        raise CorruptCheckpoint(f"{path}: no {MANIFEST} marker (the save did not finish)") from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CorruptCheckpoint(f"{path}: unreadable {MANIFEST} marker ({type(err).__name__}: {err})") from None
    for name, size in files.items():
        file = path / name
        if not file.is_file():
            raise CorruptCheckpoint(f"{path}: {name} is missing")
        if file.stat().st_size != size:
            raise CorruptCheckpoint(f"{path}: {name} is {file.stat().st_size} bytes, expected {size} (truncated?)")
    return manifest


# ---------------------------------------------------------------------------------------------- saving


def save_checkpoint(output_dir: str | Path, position: Position, model, optimizer, scheduler, tokenizer,
                    config_json: str) -> Path:
    """Write checkpoint `position.step` atomically and return its directory."""
    if distributed.world_size() > 1:
        return _save_distributed(output_dir, position, model, optimizer, scheduler, tokenizer, config_json)
    root = checkpoint_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-step_*"):  # left by a crash during an earlier save
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"step_{position.step:06d}"
    tmp = root / f".tmp-{final.name}"

    tmp.mkdir()
    save_model(model, str(tmp / "model.safetensors"))
    if os.environ.get("ZEROPAD_TEST_KILL_DURING_SAVE") == str(position.step):
        os.kill(os.getpid(), signal.SIGKILL)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
    _write_small_files(tmp, position, model, tokenizer, config_json)
    _commit(tmp, final, root, position.step)
    return final


def _write_small_files(tmp: Path, position: Position, model, tokenizer, config_json: str) -> None:
    torch.save(_rng_state(), tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps(position.__dict__, indent=2))
    (tmp / "config.json").write_text(config_json)
    model.config.save_pretrained(tmp / "model")
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(tmp / "model")
    tokenizer.save_pretrained(tmp / "tokenizer")


def _commit(tmp: Path, final: Path, root: Path, step: int) -> None:
    """Manifest last, everything fsynced, then the rename that makes the checkpoint visible."""
    files = {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
    (tmp / MANIFEST).write_text(json.dumps({"step": step, "files": files}, indent=2))
    for f in tmp.rglob("*"):
        _fsync(f)
    _fsync(tmp)
    if final.exists():  # an unusable checkpoint of this step (resume fell back past it): replace it
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync(root)


def _save_distributed(output_dir, position: Position, model, optimizer, scheduler, tokenizer,
                      config_json: str) -> Path:
    """Every rank calls this (collectives): DCP shards of model and optimizer by all ranks, the rest
    by rank 0, which renames the directory into place once every rank has written."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from zeropad.parallel.sharding import unwrap

    root = checkpoint_root(output_dir)
    final = root / f"step_{position.step:06d}"
    tmp = root / f".tmp-{final.name}"
    main = distributed.is_main()
    if main:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-step_*"):  # left by a crash during an earlier save
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(tmp / DCP_DIR))
    if main:
        torch.save({"scheduler": scheduler.state_dict()}, tmp / "scheduler.pt")
        _write_small_files(tmp, position, unwrap(model), tokenizer, config_json)
    dist.barrier()  # every rank's shards are written
    if main:
        _commit(tmp, final, root, position.step)
    dist.barrier()  # the checkpoint is visible to every rank
    return final


def prune(output_dir: str | Path, keep: int, newest_step: int) -> None:
    """Keep the `keep` newest complete checkpoints up to `newest_step`; delete the older ones and any
    unusable one (an unfinished or corrupt save is garbage once a newer complete one exists)."""
    older = [(step, path) for step, path in step_dirs(checkpoint_root(output_dir)) if step <= newest_step]
    complete = [path for _, path in older if (path / MANIFEST).is_file()]
    for _, path in older:
        if path not in complete[-keep:]:
            shutil.rmtree(path, ignore_errors=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _rng_state() -> dict:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        # numpy's key array becomes a tensor: torch.load(weights_only=True) refuses numpy arrays
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------- loading


def load_checkpoint(path: Path, model, optimizer, scheduler) -> Position:
    """Restore everything from checkpoint `path` into the live objects. CorruptCheckpoint when a file
    cannot be read; nothing is changed before every small file has been read successfully."""
    verify(path)
    sharded = (path / DCP_DIR).is_dir()
    try:
        trainer = torch.load(path / ("scheduler.pt" if sharded else "optimizer.pt"), weights_only=True)
        rng = torch.load(path / "rng.pt", weights_only=True)
        position = Position(**json.loads((path / "state.json").read_text()))
    except Exception as err:  # any failure to read means the files are damaged, whatever its type
        raise CorruptCheckpoint(f"{path}: unreadable training state ({type(err).__name__}: {err})") from None
    if sharded:
        _load_dcp(path, model, optimizer)
    elif distributed.world_size() > 1:
        _load_full_into_parallel(path, model, optimizer, trainer["optimizer"])
    else:
        try:
            missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
        except (SafetensorError, OSError) as err:
            raise CorruptCheckpoint(f"{path}: unreadable model.safetensors ({err})") from None
        _check_fit(path, missing, unexpected)
        optimizer.load_state_dict(trainer["optimizer"])
    scheduler.load_state_dict(trainer["scheduler"])
    _set_rng_state(rng)
    return position


def _check_fit(path: Path, missing, unexpected) -> None:
    if missing or unexpected:
        raise ZeropadError(
            f"{path}: the checkpoint does not fit this model (missing {sorted(missing)[:3]}, unexpected "
            f"{sorted(unexpected)[:3]}); resume with the model config the checkpoint was trained with"
        )


def _load_dcp(path: Path, model, optimizer) -> None:
    """Model and optimizer from a DCP checkpoint, resharded to this run's world size and strategy."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optimizer": optim_sd}
    try:
        dcp.load(state, checkpoint_id=str(path / DCP_DIR))
    except Exception as err:  # a missing key means another model; anything else, damaged shards
        if "missing key" in str(err).lower():
            raise ZeropadError(f"{path}: the checkpoint does not fit this model ({err}); resume with the "
                               "model config the checkpoint was trained with") from None
        raise CorruptCheckpoint(f"{path}: unreadable {DCP_DIR}/ ({type(err).__name__}: {err})") from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def _load_full_into_parallel(path: Path, model, optimizer, native_optim: dict) -> None:
    """A single-process checkpoint into a DDP/FSDP model: full state dicts, set (and sharded) by
    set_state_dict. The optimizer's saved state is keyed by parameter index; DCP wants names."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    try:
        weights = load_file(str(path / "model.safetensors"))
    except (SafetensorError, OSError) as err:
        raise CorruptCheckpoint(f"{path}: unreadable model.safetensors ({err})") from None
    from zeropad.parallel.sharding import unwrap

    full = StateDictOptions(full_state_dict=True)
    model_sd = unwrap(model).state_dict()  # only the names: FSDP2 keeps the model's own
    tied = {k for k in model_sd if k not in weights}
    missing = {k for k in tied if not _is_tied(model, k)}
    _check_fit(path, missing, set(weights) - set(model_sd))
    for key in tied - missing:  # stored once: the tied copy comes from its twin
        weights[key] = _tied_source(model, key, weights)
    names = {id(p): name for name, p in _named_parameters(model)}
    index_to_name = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    optim_sd = {
        "state": {index_to_name[i]: st for i, st in native_optim["state"].items()},
        "param_groups": [{**g, "params": [index_to_name[i] for i in g["params"]]} for g in native_optim["param_groups"]],
    }
    set_state_dict(model, optimizer, model_state_dict=weights, optim_state_dict=optim_sd, options=full)


def _named_parameters(model):
    from zeropad.parallel.sharding import unwrap

    return unwrap(model).named_parameters(remove_duplicate=True)


def _is_tied(model, key: str) -> bool:
    return _tied_twin(model, key) is not None


def _tied_twin(model, key: str) -> str | None:
    from zeropad.parallel.sharding import unwrap

    inner = unwrap(model)
    params = dict(inner.named_parameters(remove_duplicate=False))
    if key not in params:
        return None
    for name, p in params.items():
        if name != key and p is params[key]:
            return name
    return None


def _tied_source(model, key: str, weights: dict):
    return weights[_tied_twin(model, key)]


def resume_newest(root: Path, model, optimizer, scheduler, say=print) -> tuple[Path, Position] | None:
    """Load the newest usable checkpoint under root, falling back past unusable ones and saying why."""
    for _, path in reversed(step_dirs(root)):
        try:
            return path, load_checkpoint(path, model, optimizer, scheduler)
        except CorruptCheckpoint as err:
            say(f"resume: {path.name} is unusable: {err}; falling back to the previous checkpoint")
    return None


def supersede_newer(root: Path, step: int, say=print) -> None:
    """Move checkpoints newer than the one resumed from aside (never delete them): they belong to a
    later point of an earlier run, and `resume: auto` or pruning must not mix them with this one."""
    newer = [path for s, path in step_dirs(root) if s > step]
    if not newer:
        return
    aside = root / "superseded"
    aside.mkdir(exist_ok=True)
    for path in newer:
        shutil.rmtree(aside / path.name, ignore_errors=True)
        os.rename(path, aside / path.name)
    say(f"resume: moved {len(newer)} newer checkpoint(s) to {aside} (kept, not deleted)")
