import pytest

from zeropad.data.formats import Conversation, Message, Text, detect_format, to_conversation
from zeropad.errors import DataError

FILE = "data/train.jsonl"


def _roles(conv: Conversation) -> list[tuple[str, str]]:
    return [(m.role, m.content) for m in conv.messages]


def test_alpaca_joins_instruction_and_input_after_system_and_history():
    record = {
        "instruction": "Translate.",
        "input": "Bonjour",
        "output": "Hello",
        "system": "Be brief.",
        "history": [["Hi", "Hey"]],
    }
    assert _roles(to_conversation(record, "alpaca", FILE, 1)) == [
        ("system", "Be brief."),
        ("user", "Hi"),
        ("assistant", "Hey"),
        ("user", "Translate.\nBonjour"),
        ("assistant", "Hello"),
    ]


def test_alpaca_without_optional_fields():
    conv = to_conversation({"instruction": "Say hi.", "output": "Hi!"}, "alpaca", FILE, 1)
    assert conv == Conversation((Message("user", "Say hi."), Message("assistant", "Hi!")))


def test_messages_multi_turn_with_system():
    record = {
        "messages": [
            {"role": "system", "content": "S"},
            {"role": "user", "content": "U1"},
            {"role": "assistant", "content": "A1"},
            {"role": "user", "content": "U2"},
            {"role": "assistant", "content": "A2"},
        ]
    }
    conv = to_conversation(record, "messages", FILE, 1)
    assert _roles(conv) == [("system", "S"), ("user", "U1"), ("assistant", "A1"), ("user", "U2"), ("assistant", "A2")]
    assert conv.as_dicts()[0] == {"role": "system", "content": "S"}


def test_sharegpt_maps_speakers_and_aliases():
    record = {
        "system": "S",
        "conversations": [
            {"from": "human", "value": "U1"},
            {"from": "gpt", "value": "A1"},
            {"from": "user", "value": "U2"},
            {"from": "assistant", "value": "A2"},
        ],
    }
    assert _roles(to_conversation(record, "sharegpt", FILE, 1)) == [
        ("system", "S"),
        ("user", "U1"),
        ("assistant", "A1"),
        ("user", "U2"),
        ("assistant", "A2"),
    ]


def test_text():
    assert to_conversation({"text": "Some document."}, "text", FILE, 1) == Text("Some document.")


@pytest.mark.parametrize(
    ("record", "fmt"),
    [
        ({"instruction": "q", "input": "", "output": "a"}, "alpaca"),
        ({"messages": [{"role": "user", "content": "q"}]}, "messages"),
        ({"conversations": [{"from": "human", "value": "q"}]}, "sharegpt"),
        ({"text": "t", "meta": 1}, "text"),
    ],
)
def test_auto_detects_format_from_keys(record, fmt):
    assert detect_format(record, FILE, 1) == fmt


def test_auto_converts_and_undetectable_keys_name_the_record():
    assert to_conversation({"text": "doc"}, "auto", FILE, 7) == Text("doc")
    with pytest.raises(DataError) as info:
        to_conversation({"prompt": "q", "completion": "a"}, "auto", FILE, 7)
    assert (info.value.file, info.value.record) == (FILE, 7)
    assert "cannot detect the format" in info.value.reason and "'completion'" in info.value.reason


@pytest.mark.parametrize(
    ("record", "fmt", "reason"),
    [
        ({"instruction": "q"}, "alpaca", "missing field 'output'"),
        ({"instruction": "q", "output": 3}, "alpaca", "field 'output' must be a string, got number"),
        ({"instruction": "", "input": "", "output": "a"}, "alpaca", "empty 'instruction' and 'input'"),
        ({"instruction": "q", "output": "a", "history": [["only one"]]}, "alpaca", "'history' item 1"),
        ({"instruction": "q", "output": ""}, "alpaca", "no assistant turn to learn from"),
        ({"messages": []}, "messages", "empty conversation"),
        ({"messages": "hi"}, "messages", "field 'messages' must be a list, got string"),
        ({"messages": ["hi"]}, "messages", "'messages' item 1 must be an object"),
        ({"messages": [{"role": "user"}]}, "messages", "missing field 'messages[1].content'"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "messages", "unknown role 'bot'"),
        ({"messages": [{"role": "user", "content": ["x"]}]}, "messages", "must be a string, got list"),
        ({"messages": [{"role": "system", "content": "s"}]}, "messages", "empty conversation"),
        ({"messages": [{"role": "user", "content": "q"}]}, "messages", "no assistant turn to learn from"),
        ({"conversations": [{"from": "bot", "value": "x"}]}, "sharegpt", "unknown speaker 'bot'"),
        ({"conversations": [{"from": "human"}]}, "sharegpt", "missing field 'conversations[1].value'"),
        ({"conversations": []}, "sharegpt", "empty conversation"),
        ({"text": "   "}, "text", "empty text"),
        ({"text": None}, "text", "missing field 'text'"),
        ({"body": "x"}, "text", "missing field 'text'"),
    ],
)
def test_malformed_records_raise_data_error_naming_file_and_record(record, fmt, reason):
    with pytest.raises(DataError) as info:
        to_conversation(record, fmt, FILE, 12)
    err = info.value
    assert reason in err.reason
    assert (err.file, err.record) == (FILE, 12)
    assert str(err).startswith(f"{FILE}, record 12: ")
