"""Checkpoints: one format at every world size, written atomically, validated on load, resumed exactly.

A checkpoint is a directory OUTPUT_DIR/checkpoints/step_000123/ holding

    dcp/                 model and optimizer, written by torch.distributed.checkpoint (DCP): each rank
                         its own shards (one process: all of it) under plain parameter names
    scheduler.pt         the LR-schedule state
    rng.pt               python, numpy, torch CPU (and CUDA) generator states
    state.json           step, token and bad-step counters, data position (epoch, packs done)
    config.json          the resolved zeropad config of the run
    model/, tokenizer/   Hugging Face model config, generation config and tokenizer, for export
    COMPLETE             manifest of every file with its size, written last

Model and optimizer reach DCP as Stateful objects (ModelState, OptimizerState) built on
torch.distributed.checkpoint.state_dict, so the same save and load serve one process (no process
group: DCP then reads and writes alone) and any DDP/FSDP run, and a checkpoint saved at one world
size loads at any other. Every rank writes its shards; rank 0 writes the small files.

It is written into `.tmp-step_000123`, every file and directory fsynced, then renamed into place by
rank 0 once every rank has written, so it is never half-visible: a crash during a save leaves the
previous checkpoint as it was. No pickled code runs on load: the small files load with
torch.load(weights_only=True), and DCP's non-tensor values are read as plain data the same way.

The single-process format of earlier versions (model.safetensors + optimizer.pt) still resumes, at
any world size, through zeropad.train.state_legacy; new checkpoints are always DCP.

A write that fails (no space, read-only, I/O error) stops the run with a StorageError on every rank
naming what, where and why, and the temporary directory is removed (train/storage.py).

Test hooks: ZEROPAD_TEST_FAULT=checkpoint:KIND[@STEP] (train/storage.py); ZEROPAD_TEST_KILL_DURING_SAVE=STEP makes the process SIGKILL itself halfway through
writing checkpoint STEP (model and optimizer written, manifest not), to test that a crash there loses
nothing.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import re
import shutil
import signal
import warnings
from contextlib import contextmanager
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError
from torch.distributed.checkpoint import CheckpointException, DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.checkpoint.stateful import Stateful

from zeropad.errors import StorageError, ZeropadError
from zeropad.parallel import distributed
from zeropad import storage
from zeropad.train import state_legacy

MANIFEST = "COMPLETE"
DCP_DIR = "dcp"
SCHEDULER = "scheduler.pt"
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
    # The grouping that wrote it (None: a checkpoint from before it was recorded). Packs are planned
    # from data and seed alone, so (epoch, index) is the same data position under any grouping.
    world_size: int | None = None
    grad_accum: int | None = None
    sp_size: int = 1  # the ranks of a sequence-parallel group share each pack


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


# ------------------------------------------------------------------------------- what dcp/ holds


class ModelState(Stateful):
    """The model as DCP saves and loads it: each rank's own shards under their plain parameter names
    (no DDP/FSDP prefixes), so any world size and strategy reads them."""

    def __init__(self, model):
        self.model = model

    def state_dict(self) -> dict:
        return get_model_state_dict(self.model)

    def load_state_dict(self, state_dict: dict) -> None:
        set_model_state_dict(self.model, state_dict)


class OptimizerState(Stateful):
    """The optimizer as DCP saves and loads it: state keyed by parameter name, not by index."""

    def __init__(self, model, optimizer):
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict:
        return get_optimizer_state_dict(self.model, self.optimizer)

    def load_state_dict(self, state_dict: dict) -> None:
        set_optimizer_state_dict(self.model, self.optimizer, state_dict)


def _app_state(model, optimizer) -> dict[str, Stateful]:
    return {"model": ModelState(model), "optimizer": OptimizerState(model, optimizer)}


# ---------------------------------------------------------------------------------------------- saving


def save_checkpoint(output_dir: str | Path, position: Position, model, optimizer, scheduler, tokenizer,
                    config_json: str, extra_files: dict[str, str] | None = None) -> Path:
    """Write checkpoint `position.step` atomically and return its directory. Every rank calls this
    (DCP's collectives): each writes its shards of model and optimizer, rank 0 the rest (with `extra_files`,
    name -> text), and rank 0 renames the directory into place once every rank has written.

    A failed write (no space, read-only, I/O error) on any rank raises the same StorageError on every rank
    (storage.agreed, which also stands in for the barriers), and the partial directory is removed."""
    from zeropad.parallel.sharding import unwrap

    root = checkpoint_root(output_dir)
    final = root / f"step_{position.step:06d}"
    tmp = root / f".tmp-{final.name}"
    main = distributed.is_main()
    what, needed = f"checkpoint step {position.step}", _expected_bytes(root, model, optimizer)

    def start() -> None:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-step_*"):  # left by a crash during an earlier save
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()

    def shards() -> None:
        with _dcp_call():
            dcp.save(_app_state(model, optimizer), checkpoint_id=str(tmp / DCP_DIR))
        if os.environ.get("ZEROPAD_TEST_KILL_DURING_SAVE") == str(position.step):
            os.kill(os.getpid(), signal.SIGKILL)

    def small_files() -> None:
        storage.inject("checkpoint", position.step)
        torch.save({"scheduler": scheduler.state_dict()}, tmp / SCHEDULER)
        _write_small_files(tmp, position, unwrap(model), tokenizer, config_json)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)

    try:
        for stage in (start, shards, small_files, lambda: _commit(tmp, final, root, position.step)):
            # rank 0 alone makes the directory and writes the small files; every rank writes its shards
            storage.agreed(stage if main or stage is shards else lambda: None, what, tmp, needed)
    except StorageError:
        if main:
            storage.remove(tmp)
        raise
    return final


def _expected_bytes(root: Path, model, optimizer) -> int:
    """About what a checkpoint takes: the newest complete one's size, or (none yet) this rank's weights and
    optimizer state."""
    for _, path in reversed(step_dirs(root)):
        try:
            return sum(json.loads((path / MANIFEST).read_text())["files"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
    tensors = list(model.parameters()) + [v for state in optimizer.state.values() for v in state.values()
                                          if isinstance(v, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


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


@contextmanager
def _dcp_call():
    """Around every DCP save and load. Without a process group DCP works in this process alone, as
    intended here, and warns about it on every call: noise. Its failures come as CheckpointException,
    a BaseException that `except Exception` misses: the first failing rank's own error is raised."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        try:
            yield
        except CheckpointException as err:
            raise next(iter(err.failures.values()))[0] from err


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
    """Restore everything from checkpoint `path` into the live objects, resharded to this run's world
    size and strategy. CorruptCheckpoint when a file cannot be read; nothing is changed before every
    small file has been read and the stored weights have been checked against the model's.

    Under torchrun the ranks agree at each stage (`_on_every_rank`): when the checkpoint is unusable on
    any rank, every rank raises CorruptCheckpoint at the same point, so all of them fall back to the same
    previous checkpoint, and none keeps another's schedule or RNG state."""
    device = next(model.parameters()).device
    legacy = _is_legacy(path)
    trainer, rng, position, weights = _on_every_rank(path, device, lambda: _read_local(path, model, legacy))
    if legacy:
        state_legacy.set_state(model, weights, optimizer, trainer["optimizer"])
    else:
        _on_every_rank(path, device, lambda: _load_dcp(path, _app_state(model, optimizer)))
    scheduler.load_state_dict(trainer["scheduler"])
    _set_rng_state(rng)
    return position


def _read_local(path: Path, model, legacy: bool) -> tuple[dict, dict, Position, dict | None]:
    """(trainer state, RNG states, position, legacy full weights or None): everything this rank reads
    alone, no collective, with the stored weights checked against the model's."""
    verify(path)
    try:
        trainer = torch.load(path / (state_legacy.TRAINER if legacy else SCHEDULER), weights_only=True)
        rng = torch.load(path / "rng.pt", weights_only=True)
        position = Position(**json.loads((path / "state.json").read_text()))
    except Exception as err:  # any failure to read means the files are damaged, whatever its type
        raise CorruptCheckpoint(f"{path}: unreadable training state ({type(err).__name__}: {err})") from None
    if legacy:
        return trainer, rng, position, _legacy_weights(path, model)
    _check_dcp_fits(path, model)
    return trainer, rng, position, None


def _on_every_rank(path: Path, device: torch.device, read):
    """read() on this rank, then an all-reduce of every rank's outcome, so that no rank commits to a
    checkpoint another could not read. A failing rank raises its own error; the others raise
    CorruptCheckpoint when some rank found the checkpoint damaged (all fall back together) or ZeropadError
    when some rank failed otherwise (all stop). One process: read() as it is."""
    try:
        result, error = read(), None
    except Exception as err:
        result, error = None, err
    damaged = isinstance(error, CorruptCheckpoint)
    n_damaged = distributed.all_reduce_sum(int(damaged), device)
    n_failed = distributed.all_reduce_sum(int(error is not None and not damaged), device)
    if n_failed:
        if error is not None and not damaged:
            raise error
        raise ZeropadError(f"{path}: loading failed on {n_failed:.0f} other rank(s) (the error is printed there)")
    if error is not None:
        raise error
    if n_damaged:
        raise CorruptCheckpoint(f"{path}: unusable on {n_damaged:.0f} other rank(s) (the reason is printed there)")
    return result


def load_weights(path: Path, model) -> None:
    """Only the trained weights of checkpoint `path`, into `model` (for export: a plain model in one
    process, whatever world size saved them)."""
    verify(path)
    if _is_legacy(path):
        state_legacy.set_state(model, _legacy_weights(path, model))
    else:
        _check_dcp_fits(path, model)
        _load_dcp(path, {"model": ModelState(model)})


def weight_reader(path: Path, model) -> Callable[[list[str]], dict[str, torch.Tensor]]:
    """For export: a reader of checkpoint `path`'s trained weights by state-dict name that reads only the
    tensors asked for, so that no more than those are in memory. `model` (on the meta device is enough) gives
    the names, shapes and dtypes; the stored weights are checked against them first. One process."""
    verify(path)
    if _is_legacy(path):
        return state_legacy.weight_reader(path, model)
    _check_dcp_fits(path, model)
    like = get_model_state_dict(model)

    def read(names: list[str]) -> dict[str, torch.Tensor]:
        state = {f"model.{name}": torch.empty(like[name].shape, dtype=like[name].dtype) for name in names}
        _load_dcp(path, state)
        return {name: state[f"model.{name}"] for name in names}

    return read


def _is_legacy(path: Path) -> bool:
    """A checkpoint of the single-process format zeropad wrote before DCP at every world size."""
    return (path / state_legacy.WEIGHTS).is_file() and not (path / DCP_DIR).exists()


def _legacy_weights(path: Path, model) -> dict[str, torch.Tensor]:
    try:
        weights = state_legacy.read_weights(path, model)
    except (SafetensorError, OSError) as err:
        raise CorruptCheckpoint(f"{path}: unreadable {state_legacy.WEIGHTS} ({err})") from None
    expected = {name: tuple(t.shape) for name, t in get_model_state_dict(model).items()}
    check_fit(path, expected, {name: tuple(t.shape) for name, t in weights.items()})
    return weights


def check_fit(path: Path, expected: dict[str, tuple], stored: dict[str, tuple]) -> None:
    """ZeropadError unless the stored weights (name -> shape) are those the model expects."""
    missing, unexpected = expected.keys() - stored.keys(), stored.keys() - expected.keys()
    reshaped = [f"{k} {stored[k]} vs {expected[k]}" for k in sorted(expected.keys() & stored.keys())
                if stored[k] != expected[k]]
    if missing or unexpected or reshaped:
        raise ZeropadError(
            f"{path}: the checkpoint does not fit this model (missing {sorted(missing)[:3]}, unexpected "
            f"{sorted(unexpected)[:3]}, other shape {reshaped[:3]}); use the model config the checkpoint "
            "was trained with"
        )


def _check_dcp_fits(path: Path, model) -> None:
    """The stored weights of the checkpoint's dcp/ are this model's (DCP itself ignores stored tensors
    the model lacks); reads only the metadata, on this rank alone."""
    try:
        stored = dcp.FileSystemReader(str(path / DCP_DIR)).read_metadata().state_dict_metadata
    except Exception as err:  # a damaged or missing .metadata, whatever its type
        raise CorruptCheckpoint(f"{path}: unreadable {DCP_DIR}/ ({type(err).__name__}: {err})") from None
    check_fit(path, {name: tuple(t.shape) for name, t in get_model_state_dict(model).items()},
              {key.removeprefix("model."): tuple(getattr(meta, "size", ())) for key, meta in stored.items()
               if key.startswith("model.")})


def _load_dcp(path: Path, state: dict[str, Stateful | torch.Tensor]) -> None:
    """`state` (ModelState, OptimizerState, or tensors by stored key) from the checkpoint's DCP shards (a collective: every rank
    calls it), once _check_dcp_fits has passed."""
    try:
        with _dcp_call():
            dcp.load(state, checkpoint_id=str(path / DCP_DIR), planner=_PlainDataLoadPlanner())
    except pickle.UnpicklingError:
        raise CorruptCheckpoint(f"{path}: {DCP_DIR}/ holds a pickled object that is not plain data (refused: "
                                "loading it could run code)") from None
    except Exception as err:  # the weights fit, so a missing key is the optimizer's; anything else, damage
        if "missing key" in str(err).lower():
            raise ZeropadError(f"{path}: the checkpoint's optimizer state does not fit this run's trained "
                               f"parameters ({err}); resume with the train.freeze it was trained with") from None
        raise CorruptCheckpoint(f"{path}: unreadable {DCP_DIR}/ ({type(err).__name__}: {err})") from None


class _PlainDataLoadPlanner(DefaultLoadPlanner):
    """DCP stores non-tensor values (the optimizer's hyperparameters) pickled and reads them back with
    torch.load(weights_only=False); this reads them as plain data first, so loading a checkpoint runs
    no pickled code."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        plain = torch.load(value, weights_only=True)  # refuses anything but tensors and plain data
        checked = io.BytesIO()
        torch.save(plain, checked)
        checked.seek(0)
        super().load_bytes(read_item, checked)


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
        # a second resume from the same point supersedes a second step_N: .1, .2, ... beside the first, kept too
        target, k = aside / path.name, 0
        while target.exists():
            k += 1
            target = aside / f"{path.name}.{k}"
        os.rename(path, target)
    say(f"resume: moved {len(newer)} newer checkpoint(s) to {aside} (kept, not deleted)")


def last_complete_checkpoint(output_dir: str | Path) -> Path | None:
    complete = [path for _, path in step_dirs(checkpoint_root(output_dir)) if (path / MANIFEST).is_file()]
    return complete[-1] if complete else None
