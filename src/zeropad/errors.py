"""User-facing errors. Each one says what is wrong and where, so the user knows what to change."""

from __future__ import annotations


class ZeropadError(Exception):
    """Base class for errors caused by user input (config, data, model directory)."""


class ConfigError(ZeropadError):
    """A config key is unknown or has a bad value."""


class DataError(ZeropadError):
    """A data record cannot be used. Names the file, the record (line for JSONL) and the reason."""

    def __init__(self, file: str, record: int | None, reason: str):
        self.file, self.record, self.reason = file, record, reason
        where = file if record is None else f"{file}, record {record}"
        super().__init__(f"{where}: {reason}")
