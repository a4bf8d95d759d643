"""Shared fixtures for the data tests: an offline tokenizer, data files, a DataConfig with a private cache."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from zeropad.config import DataConfig

_CORPUS = [
    "Hello world, how are you today?",
    "The quick brown fox jumps over the lazy dog.",
    "system user assistant instruction input output",
    "Give three tips for staying healthy. Eat well, sleep, and exercise.",
    "What is the capital of France? The capital of France is Paris.",
]


@pytest.fixture(scope="session")
def _base_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2 style: any text encodes) with ChatML special tokens, trained in ms."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # trim_offsets=True as in GPT-2: the mask code must cope with trimmed (zero-width) offsets.
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 20, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", clean_up_tokenization_spaces=False
    )


@pytest.fixture
def tokenizer(_base_tokenizer) -> PreTrainedTokenizerFast:
    """A fresh copy per test: loading sets the chat template on the tokenizer it is given."""
    return copy.deepcopy(_base_tokenizer)


@pytest.fixture
def data_cfg(tmp_path):
    """DataConfig factory with the cache in tmp_path (never the user's ~/.cache) and no workers."""

    def make(**kwargs) -> DataConfig:
        kwargs.setdefault("cache_dir", str(tmp_path / "cache"))
        kwargs.setdefault("num_workers", 0)
        return DataConfig(**kwargs)

    return make


@pytest.fixture
def write_data(tmp_path):
    """write_data(name, records) -> path: a .json list or .jsonl file (by suffix) in tmp_path."""

    def write(name: str, records: list) -> Path:
        path = tmp_path / name
        if path.suffix == ".jsonl":
            path.write_text("".join(json.dumps(r) + "\n" for r in records))
        else:
            path.write_text(json.dumps(records))
        return path

    return write
