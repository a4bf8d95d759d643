"""User-facing errors. Each one says what is wrong and where, so the user knows what to change."""

from __future__ import annotations


class ZeropadError(Exception):
    """Base class for errors caused by user input (config, data, model directory). The command line exits
    with `exit_code`."""

    exit_code = 2


class ConfigError(ZeropadError):
    """A config key is unknown or has a bad value."""


class DataError(ZeropadError):
    """A data record cannot be used. Names the file, the record (line for JSONL) and the reason."""

    def __init__(self, file: str, record: int | None, reason: str):
        self.file, self.record, self.reason = file, record, reason
        where = file if record is None else f"{file}, record {record}"
        super().__init__(f"{where}: {reason}")


class RunStopped(ZeropadError):
    """Training stopped early after saving a checkpoint it can resume from. The command line exits
    with `exit_code`, so a job scheduler can tell why without parsing text."""

    exit_code = 1

    def __init__(self, message: str, checkpoint: str | None):
        self.checkpoint = checkpoint
        super().__init__(message)


class Preempted(RunStopped):
    """SIGTERM or SIGINT: the current step finished and was checkpointed."""

    exit_code = 3


class TooManyBadSteps(RunStopped):
    """train.max_bad_steps consecutive steps had a non-finite loss or gradient norm."""

    exit_code = 4


class NotEnoughSpace(ZeropadError):
    """Refused before any compute: the output directory cannot be written, or has less free space than the
    run will write (train/preflight.py)."""

    exit_code = 5


class StorageError(RunStopped):
    """A file could not be written (no space, read-only, I/O error): says what, where, why and how much was
    needed; any partial checkpoint is removed and the last complete one (if any) is named."""

    exit_code = 5


class OutOfMemory(RunStopped):
    """A step ran out of device (CUDA) or host memory: says the step, the pack size, the planner's predicted
    peak and the setting that would fit; the last good state is checkpointed when that is possible."""

    exit_code = 6
