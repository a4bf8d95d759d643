"""Property-based fuzzing of the inputs users hand us: JSONL bytes, records, config dicts and
overrides. Every malformed input ends in a zeropad error or a counted skip, never another
exception; valid samples are never dropped."""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from zeropad.config import Config, DataConfig, SourceConfig, build_config
from zeropad.data.dataset import BadSamplesError, load_samples
from zeropad.data.sources import iter_records
from zeropad.errors import ConfigError, DataError, ZeropadError

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
BIG = 10**6

# Any text, lone surrogates included (JSON's \ud800 escapes decode to them: text that is not UTF-8),
# with the characters most likely to break something drawn often.
tricky = st.sampled_from(["\ud800", "\udfff", "\x00", "<|im_end|>", "{{", "\n", " ", "user", "assistant"])
any_text = st.lists(st.characters(exclude_categories=()) | tricky, max_size=8).map("".join)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | any_text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(any_text, inner, max_size=3),
    max_leaves=6,
)
FIELDS = ["instruction", "input", "output", "system", "history", "messages", "conversations", "text",
          "role", "content", "from", "value"]
roles = st.sampled_from(["user", "assistant", "system", "human", "gpt", "bot", ""])
message = st.dictionaries(st.sampled_from(["role", "content", "from", "value"]), roles | any_text | json_values,
                          max_size=3)
field_value = json_values | any_text | st.lists(message, max_size=3) | st.lists(st.lists(any_text, max_size=3))
records = st.dictionaries(st.sampled_from(FIELDS) | any_text, field_value, max_size=4)
nice_text = st.text(st.characters(exclude_categories=("Cs", "Cc")), min_size=1, max_size=20).filter(str.strip)
valid_records = st.builds(lambda q, a: {"instruction": q, "input": "", "output": a}, nice_text, nice_text)


def _load(path: Path, tokenizer, on_bad_sample: str, cache: Path):
    cfg = DataConfig(on_bad_sample=on_bad_sample, cache_dir=str(cache), num_workers=0)
    return load_samples([SourceConfig(path=str(path))], cfg, tokenizer, max_tokens=BIG, overlong="truncate", seed=0)


def _write_lines(tmp: Path, lines: list[bytes]) -> Path:
    path = tmp / "data.jsonl"
    path.write_bytes(b"".join(line.replace(b"\n", b" ") + b"\n" for line in lines))
    return path


@FUZZ
@example(lines=[b'{"text": "a\\ud800"}', b'{"messages": [{"role": "user", "content": "\\udfff"}]}'])
@given(lines=st.lists(st.binary(max_size=40) | records.map(lambda r: json.dumps(r).encode()), max_size=8))
def test_random_lines_and_records_give_samples_counted_skips_or_a_zeropad_error(lines, _base_tokenizer):
    tokenizer = copy.deepcopy(_base_tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        path = _write_lines(Path(tmp), lines)
        for record_no, record in iter_records(path):
            assert isinstance(record, (dict, DataError))
        try:
            samples, report = _load(path, tokenizer, "skip", Path(tmp) / "cache")
        except DataError as err:  # nothing usable at all: named, with the reasons
            assert err.file == str(path) and "no usable samples" in err.reason
        else:
            assert report.skipped.total() + len(samples) == report.num_records
        try:
            _load(path, tokenizer, "error", Path(tmp) / "cache")
        except BadSamplesError as err:
            assert all(p.file == str(path) and p.record >= 1 and p.reason for p in err.problems)
        except DataError as err:
            assert "no usable samples" in err.reason


@FUZZ
@given(valid=st.lists(valid_records, min_size=1, max_size=5), junk=st.lists(records, max_size=5),
       order=st.randoms(use_true_random=False))
def test_valid_samples_are_never_dropped(valid, junk, order, _base_tokenizer):
    tokenizer = copy.deepcopy(_base_tokenizer)
    tagged = [(True, r) for r in valid] + [(False, r) for r in junk]
    order.shuffle(tagged)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "mixed").mkdir()
        (tmp / "clean").mkdir()
        mixed = _write_lines(tmp / "mixed", [json.dumps(r).encode() for _, r in tagged])
        clean = _write_lines(tmp / "clean", [json.dumps(r).encode() for ok, r in tagged if ok])
        mixed_samples, report = _load(mixed, tokenizer, "skip", tmp / "cache")
        clean_samples, _ = _load(clean, tokenizer, "error", tmp / "cache")
    # junk may happen to be valid too; every valid record's sample is there, in file order
    kept = iter((s.input_ids.tolist(), s.loss_mask.tolist()) for s in mixed_samples)
    for sample in clean_samples:
        assert (sample.input_ids.tolist(), sample.loss_mask.tolist()) in kept
    assert report.num_records == len(tagged)


SECTIONS = {name: list(field.annotation.model_fields) if hasattr(field.annotation, "model_fields") else []
            for name, field in Config.model_fields.items()}
keys = st.sampled_from([f"{s}.{k}" for s, ks in SECTIONS.items() for k in ks] + list(SECTIONS)) | any_text


@FUZZ
@given(tree=st.dictionaries(st.sampled_from(list(SECTIONS)) | any_text,
                            st.dictionaries(st.sampled_from(sum(SECTIONS.values(), [])) | any_text, json_values,
                                            max_size=3) | json_values, max_size=3),
       overrides=st.lists(st.builds(lambda k, v: f"{k}={v}", keys, any_text) | any_text, max_size=3))
def test_random_configs_validate_or_name_the_problem(tree, overrides):
    for args in [(tree, []), ({}, overrides), (tree, overrides)]:
        try:
            assert isinstance(build_config(*args), Config)
        except ConfigError as err:
            assert str(err)
        except ZeropadError:
            raise AssertionError("config problems are ConfigError") from None
