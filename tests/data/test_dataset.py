import collections
import os
from pathlib import Path

import numpy as np
import pytest

from zeropad.config import SourceConfig
from zeropad.data import dataset
from zeropad.data.dataset import BadSamplesError, SampleReport, load_samples, split_eval, stream_samples
from zeropad.errors import DataError

SHARED_DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
BIG = 10**6  # max_tokens that never truncates


def _alpaca(i: int) -> dict:
    return {"instruction": f"What is {i} plus {i}?", "input": "", "output": f"It is {2 * i}."}


def _load(sources, cfg, tokenizer, max_tokens=BIG, overlong="truncate", seed=0):
    return load_samples(sources, cfg, tokenizer, max_tokens=max_tokens, overlong=overlong, seed=seed)


def _stream(sources, cfg, tokenizer, report, max_tokens=BIG):
    return stream_samples(sources, cfg, tokenizer, max_tokens=max_tokens, overlong="truncate", seed=0, report=report)


def _key(sample) -> tuple:
    return tuple(sample.input_ids.tolist()), tuple(sample.loss_mask.tolist())


def _forbid_tokenizing(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the tokenizer was called on a cache hit")

    monkeypatch.setattr(dataset, "tokenize_conversation", fail)
    monkeypatch.setattr(dataset, "tokenize_text", fail)


def test_load_alpaca_and_text_sources(write_data, data_cfg, tokenizer):
    chat = write_data("chat.json", [_alpaca(i) for i in range(5)])
    docs = write_data("docs.jsonl", [{"text": f"Document number {i}."} for i in range(3)])
    sources = [SourceConfig(path=str(chat)), SourceConfig(path=str(docs), format="text")]
    samples, report = _load(sources, data_cfg(), tokenizer)
    assert (report.num_records, report.num_samples) == (8, 8)
    assert report.num_tokens == sum(len(s) for s in samples)
    assert all(s.loss_mask[1:].any() and not s.loss_mask.all() for s in samples[:5])
    assert all(s.loss_mask.all() and s.input_ids[-1] == tokenizer.eos_token_id for s in samples[5:])
    assert tokenizer.decode(samples[0].input_ids[samples[0].loss_mask].tolist()) == "It is 0.<|im_end|>\n"
    assert "8 records -> 8 samples" in report.summary()


def test_error_mode_lists_every_bad_record_in_one_error(tmp_path, data_cfg, tokenizer):
    path = tmp_path / "mixed.jsonl"
    lines = ['{"instruction": "q", "output": "a"}', "{broken", '{"instruction": "q"}', '{"text": ""}']
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(BadSamplesError) as info:
        _load([SourceConfig(path=str(path))], data_cfg(), tokenizer)
    err = info.value
    assert isinstance(err, DataError)
    assert [(p.record, p.reason.split(":")[0]) for p in err.problems] == [
        (2, "invalid JSON"),
        (3, "missing field 'output'"),
        (4, "empty text"),
    ]
    message = str(err)
    assert message.startswith("3 unusable record(s)")
    assert f"{path}, record 2: invalid JSON" in message and "on_bad_sample: skip" in message


def test_error_mode_lists_the_first_ten_and_the_total(write_data, data_cfg, tokenizer):
    path = write_data("bad.json", [{"instruction": "q"}] * 25 + [_alpaca(1)])
    with pytest.raises(BadSamplesError) as info:
        _load([SourceConfig(path=str(path))], data_cfg(), tokenizer)
    message = str(info.value)
    assert message.startswith("25 unusable") and "record 10:" in message
    assert "record 11:" not in message and "... and 15 more" in message


def test_skip_mode_counts_by_reason_and_keeps_valid_samples(tmp_path, data_cfg, tokenizer):
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(
        b'{"instruction": "q", "output": "a"}\n{broken\n{"instruction": "q"}\n{"instruction": "r"}\n'
        b'{"messages": [{"role": "user", "content": "q"}]}\n\xff\n{"instruction": "z", "output": "b"}\n'
    )
    samples, report = _load([SourceConfig(path=str(path))], data_cfg(on_bad_sample="skip"), tokenizer)
    assert len(samples) == 2 and report.num_records == 7
    assert report.skipped["missing field 'output'"] == 2
    assert report.skipped["no assistant turn to learn from"] == 1
    assert report.skipped.total() == 5
    assert "skipped 5 bad" in report.summary()


def test_source_without_usable_samples_is_an_error(write_data, data_cfg, tokenizer):
    path = write_data("bad.json", [{"instruction": "q"}])
    with pytest.raises(DataError, match="no usable samples"):
        _load([SourceConfig(path=str(path))], data_cfg(on_bad_sample="skip"), tokenizer)


def test_missing_source_names_the_path(tmp_path, data_cfg, tokenizer):
    with pytest.raises(DataError, match="nope.jsonl: no such file"):
        _load([SourceConfig(path=str(tmp_path / "nope.jsonl"))], data_cfg(), tokenizer)


@pytest.mark.parametrize(("weight", "expected"), [(0.5, 5), (0.25, 2), (1.0, 10), (2.5, 25), (3.0, 30)])
def test_weights_draw_round_w_times_n_samples(write_data, data_cfg, tokenizer, weight, expected):
    path = write_data("a.json", [_alpaca(i) for i in range(10)])
    samples, report = _load([SourceConfig(path=str(path), weight=weight)], data_cfg(), tokenizer, seed=3)
    assert len(samples) == report.num_samples == expected
    distinct = {_key(s) for s in samples}
    assert len(distinct) == min(expected, 10)  # no sample repeats before all are used
    again, _ = _load([SourceConfig(path=str(path), weight=weight)], data_cfg(), tokenizer, seed=3)
    assert [_key(s) for s in again] == [_key(s) for s in samples]


def test_weight_subsample_depends_on_seed(write_data, data_cfg, tokenizer):
    path = write_data("a.json", [_alpaca(i) for i in range(40)])
    half = [SourceConfig(path=str(path), weight=0.5)]
    picks = [{_key(s) for s in _load(half, data_cfg(), tokenizer, seed=seed)[0]} for seed in (0, 1)]
    assert picks[0] != picks[1]


def test_overlong_truncate_and_drop(write_data, data_cfg, tokenizer):
    long_doc = {"text": "The quick brown fox jumps over the lazy dog. " * 20}
    path = write_data("docs.jsonl", [long_doc, {"text": "Hi."}])
    samples, report = _load([SourceConfig(path=str(path))], data_cfg(), tokenizer, max_tokens=32, overlong="truncate")
    assert [len(s) for s in samples][0] == 32 and report.truncated == 1 and len(samples) == 2
    samples, report = _load([SourceConfig(path=str(path))], data_cfg(), tokenizer, max_tokens=32, overlong="drop")
    assert len(samples) == 1 and report.dropped_overlong == 1 and "dropped 1 overlong" in report.summary()


def test_truncation_that_removes_every_target_is_a_bad_sample(write_data, data_cfg, tokenizer):
    long_prompt = {"instruction": "The quick brown fox jumps over the lazy dog. " * 20, "output": "Yes."}
    path = write_data("a.json", [long_prompt, _alpaca(1)])
    with pytest.raises(BadSamplesError, match="record 1: no target tokens within the first 32"):
        _load([SourceConfig(path=str(path))], data_cfg(), tokenizer, max_tokens=32)
    samples, report = _load([SourceConfig(path=str(path))], data_cfg(on_bad_sample="skip"), tokenizer, max_tokens=32)
    assert len(samples) == 1 and report.skipped.total() == 1 and report.truncated == 0


def test_cache_hit_does_not_tokenize_and_survives_new_weights_and_budget(write_data, data_cfg, tokenizer, monkeypatch):
    path = write_data("a.jsonl", [_alpaca(i) for i in range(6)] + [{"instruction": "q"}])
    cfg = data_cfg(on_bad_sample="skip")
    first, first_report = _load([SourceConfig(path=str(path))], cfg, tokenizer)
    assert len(list(Path(cfg.cache_dir).glob("*.npz"))) == 1
    _forbid_tokenizing(monkeypatch)
    again, report = _load([SourceConfig(path=str(path))], cfg, tokenizer)
    assert [_key(s) for s in again] == [_key(s) for s in first]
    assert report == first_report
    # Weights, the token budget and the bad-sample policy apply after the cache.
    budget = min(len(s) for s in first) - 2  # cuts every sample but leaves some target tokens
    weighted, weighted_report = _load([SourceConfig(path=str(path), weight=2.0)], cfg, tokenizer, max_tokens=budget)
    assert len(weighted) == 12 and all(len(s) == budget for s in weighted) and weighted_report.truncated == 6
    with pytest.raises(BadSamplesError, match="record 7: missing field 'output'"):
        _load([SourceConfig(path=str(path))], data_cfg(), tokenizer)


def test_cache_misses_when_data_template_or_prompt_training_change(write_data, data_cfg, tokenizer, monkeypatch):
    path = write_data("a.jsonl", [_alpaca(i) for i in range(3)])
    _load([SourceConfig(path=str(path))], data_cfg(), tokenizer)
    write_data("a.jsonl", [_alpaca(i) for i in range(4)])
    os.utime(path, ns=(1, 1))  # a different mtime even on coarse-clock filesystems
    samples, _ = _load([SourceConfig(path=str(path))], data_cfg(), tokenizer)
    assert len(samples) == 4
    trained_prompt, _ = _load([SourceConfig(path=str(path))], data_cfg(train_on_prompt=True), tokenizer)
    assert all(s.loss_mask.all() for s in trained_prompt)
    other_template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
    other_template += "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    templated, _ = _load([SourceConfig(path=str(path))], data_cfg(chat_template=other_template), tokenizer)
    assert tokenizer.decode(templated[0].input_ids.tolist()).startswith("user: ")
    assert len(list(Path(data_cfg().cache_dir).glob("*.npz"))) == 4


def test_damaged_cache_entry_is_rebuilt(write_data, data_cfg, tokenizer):
    path = write_data("a.jsonl", [_alpaca(i) for i in range(3)])
    cfg = data_cfg()
    first, _ = _load([SourceConfig(path=str(path))], cfg, tokenizer)
    [entry] = Path(cfg.cache_dir).glob("*.npz")
    entry.write_bytes(b"not a zip")
    again, _ = _load([SourceConfig(path=str(path))], cfg, tokenizer)
    assert [_key(s) for s in again] == [_key(s) for s in first]


def test_worker_processes_give_the_same_samples(write_data, data_cfg, tokenizer, monkeypatch, tmp_path):
    path = write_data("a.jsonl", [_alpaca(i) for i in range(600)] + [{"instruction": "q"}])
    in_process, report = _load([SourceConfig(path=str(path))], data_cfg(on_bad_sample="skip"), tokenizer)
    monkeypatch.setattr(dataset, "PARALLEL_MIN_RECORDS", 0)
    cfg = data_cfg(on_bad_sample="skip", num_workers=2, cache_dir=str(tmp_path / "other_cache"))
    parallel, parallel_report = _load([SourceConfig(path=str(path))], cfg, tokenizer)
    assert [_key(s) for s in parallel] == [_key(s) for s in in_process]
    assert parallel_report == report


def test_parquet_and_save_to_disk_sources(tmp_path, data_cfg, tokenizer):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [_alpaca(i) for i in range(4)]
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "a.parquet")
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "saved"))
    from_parquet, _ = _load([SourceConfig(path=str(tmp_path / "a.parquet"))], data_cfg(), tokenizer)
    from_disk, _ = _load([SourceConfig(path=str(tmp_path / "saved"))], data_cfg(), tokenizer)
    assert len(from_parquet) == 4 and [_key(s) for s in from_parquet] == [_key(s) for s in from_disk]


def test_split_eval_is_seeded_disjoint_and_keeps_weighted_copies_together(write_data, data_cfg, tokenizer):
    path = write_data("a.json", [_alpaca(i) for i in range(20)])
    samples, _ = _load([SourceConfig(path=str(path), weight=2.0)], data_cfg(), tokenizer)
    train, held_out = split_eval(samples, 0.2, seed=5)
    assert len(held_out) == 4 and len(train) == 32
    assert not {id(s) for s in train} & {id(s) for s in held_out}
    assert [id(s) for s in split_eval(samples, 0.2, seed=5)[1]] == [id(s) for s in held_out]
    assert [id(s) for s in split_eval(samples, 0.2, seed=6)[1]] != [id(s) for s in held_out]
    assert split_eval(samples, 0.0, seed=5) == (samples, [])


def test_stream_yields_the_loaded_samples_for_weight_one(write_data, data_cfg, tokenizer):
    chat = write_data("chat.json", [_alpaca(i) for i in range(7)] + [{"instruction": "q"}])
    docs = write_data("docs.jsonl", [{"text": f"Document {i}. " * (i + 1) * 5} for i in range(5)])
    sources = [SourceConfig(path=str(chat)), SourceConfig(path=str(docs))]
    cfg = data_cfg(on_bad_sample="skip")
    loaded, load_report = _load(sources, cfg, tokenizer, max_tokens=40)
    assert load_report.truncated > 0 and load_report.skipped.total() == 1
    report = SampleReport()
    streamed = list(_stream(sources, cfg, tokenizer, report, max_tokens=40))
    assert collections.Counter(map(_key, streamed)) == collections.Counter(map(_key, loaded))
    assert report == load_report


def test_stream_weights_and_error_mode(write_data, data_cfg, tokenizer):
    path = write_data("a.json", [_alpaca(i) for i in range(10)])
    report = SampleReport()
    samples = list(_stream([SourceConfig(path=str(path), weight=2.0)], data_cfg(), tokenizer, report))
    assert len(samples) == 20 and report.num_records == 10
    assert collections.Counter(map(_key, samples)).most_common(1)[0][1] == 2
    bad = write_data("bad.json", [_alpaca(1), {"instruction": "q"}])
    with pytest.raises(BadSamplesError, match="record 2: missing field 'output'"):
        list(_stream([SourceConfig(path=str(bad))], data_cfg(), tokenizer, SampleReport()))


def test_real_alpaca_and_c4(data_cfg, tokenizer):
    alpaca, c4 = SHARED_DATA / "alpaca_en_demo.json", SHARED_DATA / "c4_demo.jsonl"
    if not (alpaca.exists() and c4.exists()):
        pytest.skip(f"real samples not present in {SHARED_DATA}")
    sources = [SourceConfig(path=str(alpaca)), SourceConfig(path=str(c4), weight=0.5)]
    samples, report = _load(sources, data_cfg(), tokenizer, max_tokens=1024)
    assert report.num_records == 999 + 300 and report.skipped.total() == 0
    assert report.num_samples == len(samples) == 999 + 150
    assert all(len(s) <= 1024 and s.loss_mask[1:].any() for s in samples)
    assert np.mean([s.loss_mask.mean() for s in samples[:999]]) < 1.0


def test_stream_with_worker_processes_and_early_stop(write_data, data_cfg, tokenizer):
    path = write_data("a.jsonl", [_alpaca(i) for i in range(300)])
    sources = [SourceConfig(path=str(path))]
    in_process = list(_stream(sources, data_cfg(), tokenizer, SampleReport()))
    report = SampleReport()
    parallel = list(_stream(sources, data_cfg(num_workers=2), tokenizer, report))
    assert [_key(s) for s in parallel] == [_key(s) for s in in_process] and report.num_samples == 300
    stream = _stream(sources, data_cfg(num_workers=1), tokenizer, SampleReport())
    assert _key(next(stream)) == _key(in_process[0])
    stream.close()  # shuts the workers down instead of hanging
