"""Storage faults, named: a failed write says what could not be written, where, why (no space, read-only,
I/O error) and how much it needed, never a traceback; and the one test-only switch that injects faults.

Test hook: ZEROPAD_TEST_FAULT=POINT:KIND[@STEP][,POINT:KIND[@STEP]...] raises KIND when the process reaches
POINT (at optimizer step STEP only, where given):

    cache        writing a source's token cache (data/cache.py)
    checkpoint   rank 0's files of a checkpoint, after every rank has written dcp/ (train/state.py)
    metrics      a metrics.jsonl record (train/metrics.py)
    final        final/, after its weights are written (train/loop.py)
    step         an optimizer step, before its forward (train/loop.py)

KIND: enospc, eio, erofs (an OSError with that errno), shortwrite (the RuntimeError torch.save raises for a
short write, which carries no errno) or oom (torch.OutOfMemoryError). The entry free:BYTES makes free_bytes()
report BYTES, so the pre-flight space check (train/preflight.py) is testable without a small filesystem.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch

from zeropad.errors import StorageError
from zeropad.parallel import distributed

FAULT_ENV = "ZEROPAD_TEST_FAULT"
_ERRNOS = {"enospc": errno.ENOSPC, "eio": errno.EIO, "erofs": errno.EROFS}
_REASONS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
            errno.EROFS: "read-only file system", errno.EIO: "I/O error", errno.EACCES: "permission denied",
            errno.EPERM: "operation not permitted", errno.EFBIG: "file too large for the file system"}
# torch.save's zip writer reports a short write as a RuntimeError without an errno (the issue's
# "[enforce fail at inline_container.cc:672] . unexpected pos"): recognised by these words.
_TORCH_WRITE_FAILURE = ("inline_container", "PytorchStreamWriter", "file write failed")
_LOW_SPACE = 2**20  # after a short write, this little free space means the disk is what filled up


def _switch() -> dict[str, str]:
    """POINT -> KIND[@STEP] from ZEROPAD_TEST_FAULT (empty outside tests)."""
    entries = {}
    for item in filter(None, os.environ.get(FAULT_ENV, "").split(",")):
        point, _, kind = item.strip().partition(":")
        entries[point] = kind
    return entries


def inject(point: str, step: int | None = None) -> None:
    """Raise the fault ZEROPAD_TEST_FAULT names for `point` (at `step`, when it names one)."""
    spec = _switch().get(point)
    if spec is None:
        return
    kind, _, at = spec.partition("@")
    if at and step != int(at):
        return
    note = f"injected by {FAULT_ENV}"
    if kind == "oom":
        raise torch.OutOfMemoryError(f"CUDA out of memory ({note})")
    if kind == "shortwrite":
        raise RuntimeError(f"[enforce fail at inline_container.cc:672] . unexpected pos 320 vs 256 ({note})")
    if kind not in _ERRNOS:
        raise ValueError(f"{FAULT_ENV}: unknown fault {kind!r} at {point}; use enospc, eio, erofs, shortwrite or oom")
    raise OSError(_ERRNOS[kind], f"{os.strerror(_ERRNOS[kind])} ({note})")


def free_bytes(path: str | Path) -> int:
    """Free bytes on the filesystem that holds `path` (or would: its nearest existing parent)."""
    override = _switch().get("free")
    if override is not None:
        return int(override)
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def fmt_bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{int(n)} B"


def why(err: BaseException, where: Path, needed: int | None = None) -> str | None:
    """Why a write failed, in words; None when `err` is not a storage failure."""
    if isinstance(err, OSError):
        return _REASONS.get(err.errno, err.strerror or str(err))
    if isinstance(err, RuntimeError) and any(words in str(err) for words in _TORCH_WRITE_FAILURE):
        if free_bytes(where) < max(needed or 0, _LOW_SPACE):
            return "no space left on the device"
        return f"the write failed ({str(err).splitlines()[0].strip()})"
    return None


def storage_error(err: BaseException, what: str, where: str | Path, needed: int | None = None) -> StorageError | None:
    """The named StorageError for a failed write of `what` to `where`; None when `err` is not a storage failure."""
    reason = why(err, Path(where), needed)
    if reason is None:
        return None
    message = f"could not write {what} to {where}: {reason}"
    if needed:
        message += f" (it needs about {fmt_bytes(needed)}; {fmt_bytes(free_bytes(where))} free there)"
    return StorageError(message, None)


def remove(path: Path) -> None:
    """A partial write, removed so that it holds no space and is never mistaken for a complete one."""
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def writing(what: str, where: str | Path, needed: int | None = None, partial: Path | None = None):
    """Around a write: a storage failure becomes a StorageError naming what, where, why and how much, and the
    `partial` file or directory it leaves is removed. Other errors pass unchanged."""
    try:
        yield
    except (OSError, RuntimeError) as err:
        named = storage_error(err, what, where, needed)
        if named is None:
            raise
        if partial is not None:
            remove(partial)
        raise named from None


def agreed(action: Callable[[], object], what: str, where: str | Path, needed: int | None = None) -> None:
    """action() on this rank (some ranks may have nothing to do), then the same outcome on every rank: when a
    write failed on any rank, every rank raises that rank's StorageError, with the same message, instead of
    waiting in the next collective for a rank that stopped. One process: action() under `writing`."""
    error = None
    try:
        with writing(what, where, needed):
            action()
    except StorageError as err:
        if not distributed.is_initialized():
            raise
        error = str(err)
    error = on_any_rank(error)
    if error is not None:
        raise StorageError(error, None)


def on_any_rank(message: str | None) -> str | None:
    """The first rank's message that is not None, on every rank (a collective under torchrun)."""
    if not distributed.is_initialized():
        return message
    messages: list[str | None] = [None] * distributed.world_size()
    torch.distributed.all_gather_object(messages, message)
    return next((m for m in messages if m is not None), None)
