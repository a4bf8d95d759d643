"""Read raw records from JSON, JSONL, parquet files and `datasets.save_to_disk` directories.

Every record comes with its number, so an error can name it: the 1-based line for JSONL,
the 1-based position for JSON lists, parquet rows and saved datasets.

Problems that make a whole file unreadable (missing file, broken JSON document, unreadable
parquet) raise DataError at once. Problems confined to one record (a broken JSONL line, a
record that is not an object) are yielded by `iter_records` as DataError values, so that
`on_bad_sample: skip` can skip them and `error` can list them all; `read_records` raises them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from zeropad.errors import DataError

SUPPORTED = ".json (a list of objects), .jsonl (one object per line), .parquet, or a datasets.save_to_disk directory"


def read_records(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(record number, record) for every record; the first problem raises DataError."""
    for record_no, record in iter_records(path):
        if isinstance(record, DataError):
            raise record
        yield record_no, record


def iter_records(path: str | Path) -> Iterator[tuple[int, dict | DataError]]:
    """(record number, record or the DataError explaining why that record is unusable)."""
    path = Path(path)
    if not path.exists():
        raise DataError(str(path), None, "no such file or directory")
    if path.is_dir():
        yield from _saved_dataset_records(path)
    elif path.suffix == ".jsonl":
        yield from _jsonl_records(path)
    elif path.suffix == ".json":
        yield from _json_records(path)
    elif path.suffix == ".parquet":
        yield from _parquet_records(path)
    else:
        raise DataError(str(path), None, f"unsupported file type '{path.suffix}'; use {SUPPORTED}")


_JSON_TYPES = {str: "string", list: "list", dict: "object", bool: "boolean", int: "number", float: "number"}


def json_type(value: object) -> str:
    """The JSON name of a parsed value's type, for messages users read."""
    return "null" if value is None else _JSON_TYPES.get(type(value), type(value).__name__)


def _object_or_error(value: object, file: str, record_no: int) -> dict | DataError:
    if not isinstance(value, dict):
        return DataError(file, record_no, f"record is a JSON {json_type(value)}, expected an object")
    if _has_lone_surrogate(value):
        return DataError(file, record_no, "not valid UTF-8: a \\ud800-\\udfff escape encodes half a character")
    return value


def _has_lone_surrogate(value: object) -> bool:
    """JSON escapes such as "\\ud800" decode to a lone surrogate: text no tokenizer can encode."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(_has_lone_surrogate(k) or _has_lone_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_lone_surrogate(v) for v in value)
    return False


def _jsonl_records(path: Path) -> Iterator[tuple[int, dict | DataError]]:
    file = str(path)
    # Binary mode so one bad byte costs one line, not the whole file.
    with path.open("rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")  # a byte-order mark may open the file
            except UnicodeDecodeError as err:
                yield line_no, DataError(file, line_no, f"not valid UTF-8 (byte {err.start + 1} of the line)")
                continue
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                yield line_no, DataError(file, line_no, f"invalid JSON: {err.msg}")
                continue
            yield line_no, _object_or_error(value, file, line_no)


def _json_records(path: Path) -> Iterator[tuple[int, dict | DataError]]:
    file = str(path)
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")  # a byte-order mark may open the file
    except UnicodeDecodeError as err:
        line_no = data[: err.start].count(b"\n") + 1
        raise DataError(file, None, f"not valid UTF-8 at line {line_no}") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        # The most common cause: a JSON-lines file named .json.
        hint = "; one object per line? name the file .jsonl" if err.msg == "Extra data" else ""
        raise DataError(file, None, f"invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}{hint}") from None
    if not isinstance(value, list):
        raise DataError(file, None, f"the top level is a JSON {json_type(value)}; expected a list of records")
    for record_no, item in enumerate(value, start=1):
        yield record_no, _object_or_error(item, file, record_no)


def _parquet_records(path: Path) -> Iterator[tuple[int, dict]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        record_no = 0
        for batch in pq.ParquetFile(path).iter_batches():
            for row in batch.to_pylist():
                record_no += 1
                yield record_no, row
    except (pa.ArrowException, OSError) as err:
        raise DataError(str(path), None, f"cannot read parquet: {err}") from None


def _saved_dataset_records(path: Path) -> Iterator[tuple[int, dict]]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise DataError(str(path), None, f"directory is not a datasets.save_to_disk folder; use {SUPPORTED}") from None
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise DataError(str(path), None, f"saved DatasetDict has no 'train' split (splits: {', '.join(loaded)})")
        loaded = loaded["train"]
    for record_no, row in enumerate(loaded, start=1):
        yield record_no, row
