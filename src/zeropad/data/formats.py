"""alpaca / messages / sharegpt / text records -> one Conversation type (or Text, for pretraining).

Each record is checked completely here, so tokenization only ever sees well-formed input,
and every problem becomes DataError(file, record, reason). Reasons name the field but not the
offending value's position in the file, so `on_bad_sample: skip` can count them by reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from zeropad.data.sources import json_type
from zeropad.errors import DataError

FORMATS = ("alpaca", "messages", "sharegpt", "text")
ROLES = ("system", "user", "assistant")
# ShareGPT speaker names, with the OpenAI names some exports use instead.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass(frozen=True)
class Message:
    role: str  # one of ROLES
    content: str


@dataclass(frozen=True)
class Conversation:
    messages: tuple[Message, ...]

    def as_dicts(self) -> list[dict[str, str]]:
        """The shape `tokenizer.apply_chat_template` takes."""
        return [{"role": m.role, "content": m.content} for m in self.messages]


@dataclass(frozen=True)
class Text:
    """A pretraining document: every token is a target."""

    text: str


def detect_format(record: dict, file: str, record_no: int) -> str:
    """The format a record's keys point to; a record missing a required field of that format
    is still detected, so the error it gets names the missing field."""
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record or "output" in record:
        return "alpaca"
    if "text" in record:
        return "text"
    raise DataError(
        file,
        record_no,
        f"cannot detect the format from keys {sorted(record)}: expected 'messages' (messages), "
        "'conversations' (sharegpt), 'instruction' + 'output' (alpaca) or 'text'; or set the source's format",
    )


def to_conversation(record: dict, fmt: str, file: str, record_no: int) -> Conversation | Text:
    """Convert one record of format `fmt` (or "auto") or raise DataError saying what is wrong."""
    if fmt == "auto":
        fmt = detect_format(record, file, record_no)
    check = _Checker(record, file, record_no)
    if fmt == "text":
        text = check.field("text", str)
        if not text.strip():
            raise check.error("empty text")
        return Text(text)
    if fmt == "alpaca":
        messages = _alpaca(check)
    elif fmt == "messages":
        messages = _messages(check)
    elif fmt == "sharegpt":
        messages = _sharegpt(check)
    else:
        raise ValueError(f"unknown format {fmt!r}; expected auto or one of {FORMATS}")
    if all(m.role == "system" for m in messages):
        raise check.error("empty conversation")
    if not any(m.role == "assistant" and m.content.strip() for m in messages):
        raise check.error("no assistant turn to learn from")
    return Conversation(tuple(messages))


class _Checker:
    """Typed field access that turns every problem into a DataError for this record."""

    def __init__(self, record: dict, file: str, record_no: int):
        self.record, self.file, self.record_no = record, file, record_no

    def error(self, reason: str) -> DataError:
        return DataError(self.file, self.record_no, reason)

    def field(self, key: str, kind: type, where: dict | None = None, label: str = "") -> Any:
        value = self.optional(key, kind, where, label)
        if value is None:
            raise self.error(f"missing field '{label}{key}'")
        return value

    def optional(self, key: str, kind: type, where: dict | None = None, label: str = "") -> Any:
        # Parquet and saved datasets fill absent columns with None: treat None as absent.
        value = (self.record if where is None else where).get(key)
        if value is not None and not isinstance(value, kind):
            # json_type(kind()): an empty instance of the expected type names it as JSON does.
            raise self.error(f"field '{label}{key}' must be a {json_type(kind())}, got {json_type(value)}")
        return value

    def items(self, key: str) -> list[dict]:
        """A required list field whose elements must be objects."""
        items = self.field(key, list)
        for i, item in enumerate(items, start=1):
            if not isinstance(item, dict):
                raise self.error(f"'{key}' item {i} must be an object, got {json_type(item)}")
        return items


def _alpaca(check: _Checker) -> list[Message]:
    instruction = check.field("instruction", str)
    extra_input = check.optional("input", str) or ""
    output = check.field("output", str)
    system = check.optional("system", str)
    history = check.optional("history", list) or []
    prompt = "\n".join(part for part in (instruction, extra_input) if part)
    if not prompt.strip():
        raise check.error("empty 'instruction' and 'input'")
    messages = [Message("system", system)] if system else []
    for i, turn in enumerate(history, start=1):
        if not (isinstance(turn, list) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
            raise check.error(f"'history' item {i} must be a [prompt, response] pair of strings")
        messages += [Message("user", turn[0]), Message("assistant", turn[1])]
    return messages + [Message("user", prompt), Message("assistant", output)]


def _messages(check: _Checker) -> list[Message]:
    messages = []
    for i, item in enumerate(check.items("messages"), start=1):
        role = check.field("role", str, item, f"messages[{i}].")
        if role not in ROLES:
            raise check.error(f"unknown role '{role}' (expected {', '.join(ROLES)})")
        messages.append(Message(role, check.field("content", str, item, f"messages[{i}].")))
    return messages


def _sharegpt(check: _Checker) -> list[Message]:
    system = check.optional("system", str)
    messages = [Message("system", system)] if system else []
    for i, item in enumerate(check.items("conversations"), start=1):
        speaker = check.field("from", str, item, f"conversations[{i}].")
        if speaker not in SHAREGPT_ROLES:
            raise check.error(f"unknown speaker '{speaker}' (expected {', '.join(SHAREGPT_ROLES)})")
        messages.append(Message(SHAREGPT_ROLES[speaker], check.field("value", str, item, f"conversations[{i}].")))
    return messages
