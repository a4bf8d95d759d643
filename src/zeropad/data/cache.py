"""On-disk cache of one tokenized source, so a second run does not tokenize again.

An entry holds a source's samples before weighting and overlong handling, plus the record
numbers and reasons of its unusable records, so weights, max_tokens, overlong and
on_bad_sample can all change without re-tokenizing. It is keyed by everything that changes
the tokens: the data file (path, size, mtime), the format, the tokenizer, the chat template
and train_on_prompt. Entries are .npz files (flat ids + offsets + flat mask), written
atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from zeropad.config import DataConfig, SourceConfig
from zeropad.data.chat import Sample
from zeropad import storage

CACHE_VERSION = 2  # bump when the cached arrays or the tokenization change meaning
DEFAULT_CACHE_DIR = "~/.cache/zeropad/tokenized"


@dataclass
class TokenizedSource:
    """One source, tokenized: what the cache stores."""

    samples: list[Sample]
    record_nos: list[int]  # the record each sample came from, for problems found after caching
    problems: list[tuple[int, str]]  # (record number, reason) of unusable records
    num_records: int


def cache_file_for(source: SourceConfig, cfg: DataConfig, tokenizer) -> Path:
    """Where this source, tokenized this way, is cached (with the chat template already set)."""
    key = {
        "version": CACHE_VERSION,
        "data": _file_fingerprint(Path(source.path)),
        "format": source.format,
        "tokenizer": _tokenizer_fingerprint(tokenizer),
        "chat_template": tokenizer.chat_template,
        "train_on_prompt": cfg.train_on_prompt,
        "chat_template_kwargs": cfg.chat_template_kwargs,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    return Path(cfg.cache_dir or DEFAULT_CACHE_DIR).expanduser() / f"{digest}.npz"


def _file_fingerprint(path: Path) -> list:
    """(path, size, mtime_ns) of the file, or of every file in a saved-dataset directory."""
    path = path.resolve()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files]


def _tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    # The serialized fast tokenizer covers vocabulary, merges, normalizer and added tokens.
    vocab = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    specials = json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str)
    return hashlib.sha256(f"{type(tokenizer).__name__}\n{specials}\n{vocab}".encode()).hexdigest()


def read_cache(cache_file: Path) -> TokenizedSource | None:
    if not cache_file.exists():
        return None
    try:
        with np.load(cache_file) as arrays:
            ids, offsets, mask = arrays["input_ids"], arrays["offsets"], arrays["loss_mask"]
            record_nos = arrays["record_nos"].tolist()
            problems = list(zip(arrays["problem_records"].tolist(), arrays["problem_reasons"].tolist()))
            num_records = int(arrays["num_records"])
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return None  # a damaged entry is rebuilt, never trusted
    samples = [Sample(ids[a:b], mask[a:b]) for a, b in zip(offsets[:-1], offsets[1:])]
    return TokenizedSource(samples, record_nos, problems, num_records)


def write_cache(cache_file: Path, tokenized: TokenizedSource) -> None:
    lengths = [len(sample) for sample in tokenized.samples]
    arrays = {
        "input_ids": np.concatenate([s.input_ids for s in tokenized.samples] or [np.zeros(0, np.int32)]),
        "loss_mask": np.concatenate([s.loss_mask for s in tokenized.samples] or [np.zeros(0, bool)]),
        "offsets": np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]),
        "record_nos": np.asarray(tokenized.record_nos, dtype=np.int64),
        "problem_records": np.asarray([r for r, _ in tokenized.problems], dtype=np.int64),
        "problem_reasons": np.asarray([reason for _, reason in tokenized.problems], dtype=str),
        "num_records": np.asarray(tokenized.num_records, dtype=np.int64),
    }
    needed = sum(a.nbytes for a in arrays.values())
    with storage.writing("the tokenized-sample cache (set data.cache_dir to a folder with room)", cache_file.parent,
                        needed):
        storage.inject("cache")
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        # Write beside the target, then rename: readers (other ranks, later runs) never see a partial file.
        fd, tmp = tempfile.mkstemp(dir=cache_file.parent, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                np.savez(handle, **arrays)
            os.replace(tmp, cache_file)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
