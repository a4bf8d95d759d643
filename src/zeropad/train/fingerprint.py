"""What data a run trains on, recorded in each checkpoint (data.json), so that resuming on other data is
refused, or continued as the user chose (checkpoint.resume_data), never silently.

A source's fingerprint is its path and, per file (a saved-dataset directory has several), the size and a
SHA-256 of a sample of the content: the first, middle and last MiB, so that a multi-GB file is fingerprinted
in milliseconds while any replacement of its records shows (a same-size in-place edit between the samples
would not). The run's record count, the tokenizer and the chat template are recorded beside them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from zeropad.config import Config
from zeropad.data.cache import _tokenizer_fingerprint
from zeropad.errors import ConfigError
from zeropad.train.state import Position

DATA_FILE = "data.json"
_SAMPLE = 2**20  # bytes hashed at each of the start, middle and end of a file


def _sample_hash(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for offset in sorted({0, max(0, size // 2 - _SAMPLE // 2), max(0, size - _SAMPLE)}):
            f.seek(offset)
            digest.update(f.read(_SAMPLE))
    return digest.hexdigest()


def source_fingerprint(path: str) -> dict:
    root = Path(path)
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    return {"path": path, "files": {str(p.relative_to(root)) if root.is_dir() else p.name:
                                    {"size": p.stat().st_size, "sample_sha256": _sample_hash(p, p.stat().st_size)}
                                    for p in files}}


def run_fingerprint(cfg: Config, tokenizer, num_records: int) -> dict:
    """The data this run trains on. num_records: the data report's count (0 when not known up front, as
    when streaming: then it is not compared)."""
    template = tokenizer.chat_template or ""
    return {"sources": [source_fingerprint(source.path) for source in cfg.data.sources],
            "records": num_records or None, "tokenizer": _tokenizer_fingerprint(tokenizer),
            "chat_template": hashlib.sha256(template.encode()).hexdigest()}


def changes(saved: dict, now: dict) -> list[str]:
    """What differs between two fingerprints, in words; [] when the data is the same."""
    found = []
    before, after = saved.get("sources", []), now["sources"]
    if len(before) != len(after):
        found.append(f"data.sources: {len(before)} source(s) then, {len(after)} now")
    for i, (old, new) in enumerate(zip(before, after)):
        if old["path"] != new["path"]:
            found.append(f"source {i}: path {old['path']} -> {new['path']}")
        for name in sorted(old["files"].keys() | new["files"].keys()):
            a, b = old["files"].get(name), new["files"].get(name)
            if a is None or b is None:
                found.append(f"source {i} ({new['path']}): {name} {'added' if a is None else 'removed'}")
            elif a["size"] != b["size"]:
                found.append(f"source {i} ({new['path']}): {name} is {b['size']:,} bytes, was {a['size']:,}")
            elif a["sample_sha256"] != b["sample_sha256"]:
                found.append(f"source {i} ({new['path']}): {name}: content changed (same size)")
    if saved.get("records") and now["records"] and saved["records"] != now["records"]:
        found.append(f"records: {now['records']:,}, were {saved['records']:,}")
    for key, what in (("tokenizer", "the tokenizer"), ("chat_template", "the chat template")):
        if saved.get(key) != now[key]:
            found.append(f"{what} changed")
    return found


def check_resume_data(path: Path, now: dict, choice: str, position: Position, say=print) -> dict | None:
    """Resuming from checkpoint `path` on the data `now`: ConfigError listing what changed when
    checkpoint.resume_data is refuse; with restart_epoch the position moves to the start of the next epoch,
    with continue it stays. Returns the record metrics.jsonl keeps of that choice (None: nothing changed)."""
    file = path / DATA_FILE
    if not file.is_file():
        say(f"resume: {path.name} records no data fingerprint (written by an earlier zeropad); the data cannot be "
            "checked against the one it trained on")
        return None
    found = changes(json.loads(file.read_text()), now)
    if not found:
        return None
    listed = "; ".join(found)
    if choice == "refuse":
        raise ConfigError(
            f"resume: the data differs from what {path} trained on: {listed}. Resume with that data, or say how to "
            "continue: checkpoint.resume_data=restart_epoch (start a new epoch of this data) or "
            "checkpoint.resume_data=continue (keep the data position, epoch "
            f"{position.epoch}, {position.index} packs into it)")
    if choice == "restart_epoch" and position.index > 0:
        position.epoch, position.index = position.epoch + 1, 0
    say(f"resume: the data changed ({listed}); checkpoint.resume_data={choice}: continuing at epoch "
        f"{position.epoch}, {position.index} packs into it")
    return {"step": position.step, "resume_data": choice, "data_changed": found}
