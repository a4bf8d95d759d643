from pathlib import Path

import pytest

from zeropad.data.sources import iter_records, read_records
from zeropad.errors import DataError

SHARED_DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


def _error(path) -> DataError:
    with pytest.raises(DataError) as info:
        list(read_records(path))
    return info.value


def test_json_list_numbers_records_from_one(write_data):
    path = write_data("a.json", [{"text": "a"}, {"text": "b"}])
    assert list(read_records(path)) == [(1, {"text": "a"}), (2, {"text": "b"})]


def test_jsonl_numbers_records_by_line_and_skips_blank_lines(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "a"}\n\n   \n{"text": "b"}\n')
    assert list(read_records(path)) == [(1, {"text": "a"}), (4, {"text": "b"})]


def test_invalid_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "a"}\n{"text": \n{"text": "c"}\n')
    err = _error(path)
    assert (err.file, err.record) == (str(path), 2)
    assert "invalid JSON" in str(err) and str(path) in str(err) and "record 2" in str(err)


def test_iter_records_yields_bad_lines_and_goes_on(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"text": "a"}\nnot json\n{"text": "\xff\xfe"}\n[1, 2]\n{"text": "e"}\n')
    results = list(iter_records(path))
    assert [n for n, _ in results] == [1, 2, 3, 4, 5]
    assert results[0][1] == {"text": "a"} and results[4][1] == {"text": "e"}
    reasons = [r.reason for _, r in results[1:4]]
    assert reasons[0].startswith("invalid JSON")
    assert "UTF-8" in reasons[1]
    assert "expected an object" in reasons[2]


def test_non_utf8_json_names_the_line(tmp_path):
    path = tmp_path / "a.json"
    path.write_bytes(b'[\n{"text": "a"},\n{"text": "\xff"}\n]')
    err = _error(path)
    assert err.file == str(path) and "UTF-8" in err.reason and "line 3" in err.reason


def test_broken_json_document_names_line_and_hints_at_jsonl(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('{"text": "a"}\n{"text": "b"}\n')
    err = _error(path)
    assert "line 2" in err.reason and ".jsonl" in err.reason


def test_json_must_be_a_list_of_objects(write_data, tmp_path):
    assert "expected a list" in _error(write_data("obj.json", {"text": "a"})).reason
    err = _error(write_data("items.json", [{"text": "a"}, "b"]))
    assert err.record == 2 and "string" in err.reason


def test_missing_path_and_unknown_suffix(tmp_path):
    missing = tmp_path / "nope.jsonl"
    err = _error(missing)
    assert err.file == str(missing) and "no such file" in err.reason
    odd = tmp_path / "data.csv"
    odd.write_text("a,b\n")
    assert "unsupported file type" in _error(odd).reason


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"instruction": ["q1", "q2"], "output": ["a1", "a2"]}), path)
    assert list(read_records(path)) == [
        (1, {"instruction": "q1", "output": "a1"}),
        (2, {"instruction": "q2", "output": "a2"}),
    ]


def test_a_parquet_file_mixing_formats_is_detected_record_by_record(tmp_path):
    """Parquet gives every record every column, None where the record has none: auto-detection reads None as
    absent (it used to send the alpaca and text rows to the messages reader, refused or silently skipped)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from zeropad.data.formats import Text, detect_format, to_conversation

    rows = [{"instruction": "Say hi", "output": "hi"}, {"text": "A pretraining document."},
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}]
    path = tmp_path / "mix.parquet"
    columns = ("instruction", "output", "text", "messages")
    pq.write_table(pa.Table.from_pydict({key: [row.get(key) for row in rows] for key in columns}), path)
    records = list(read_records(path))
    assert records[0][1]["messages"] is None and records[1][1]["instruction"] is None  # the columns parquet fills in
    assert [detect_format(r, str(path), n) for n, r in records] == ["alpaca", "text", "messages"]
    assert to_conversation(records[1][1], "auto", str(path), 2) == Text("A pretraining document.")


def test_a_byte_order_mark_opening_a_file_is_not_data(tmp_path):
    """UTF-8 with a BOM (as some editors save it): the first record is read, not refused as invalid JSON."""
    jsonl, whole = tmp_path / "a.jsonl", tmp_path / "b.json"
    jsonl.write_bytes(b"\xef\xbb\xbf" + b'{"text": "a"}\n{"text": "b"}\n')
    whole.write_bytes(b"\xef\xbb\xbf" + b'[{"text": "a"}]')
    assert list(read_records(jsonl)) == [(1, {"text": "a"}), (2, {"text": "b"})]
    assert list(read_records(whole)) == [(1, {"text": "a"})]


def test_save_to_disk_dataset_and_datasetdict_train_split(tmp_path):
    import datasets

    rows = {"text": ["one", "two"]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "ds"))
    assert list(read_records(tmp_path / "ds")) == [(1, {"text": "one"}), (2, {"text": "two"})]
    other = datasets.Dataset.from_dict({"text": ["x"]})
    datasets.DatasetDict(train=datasets.Dataset.from_dict(rows), test=other).save_to_disk(str(tmp_path / "dd"))
    assert [r["text"] for _, r in read_records(tmp_path / "dd")] == ["one", "two"]


def test_plain_directory_is_an_error(tmp_path):
    (tmp_path / "plain").mkdir()
    assert "save_to_disk" in _error(tmp_path / "plain").reason


def test_real_alpaca_and_c4_samples():
    alpaca, c4 = SHARED_DATA / "alpaca_en_demo.json", SHARED_DATA / "c4_demo.jsonl"
    if not (alpaca.exists() and c4.exists()):
        pytest.skip(f"real samples not present in {SHARED_DATA}")
    records = list(read_records(alpaca))
    assert len(records) == 999 and {"instruction", "output"} <= set(records[0][1])
    assert all("text" in r for _, r in read_records(c4))
