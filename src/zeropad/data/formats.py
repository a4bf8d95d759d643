"""alpaca / messages / sharegpt / text records -> one Conversation type (or Text, for pretraining).

Tool calling comes in two shapes, both read into the same Conversation: ShareGPT as LLaMA-Factory writes
it (`function_call` turns whose value is the JSON string {"name", "arguments"}, `observation` turns for
results, a `tools` field holding a JSON string of function specs) and OpenAI's (`tool_calls` on assistant
messages, `role: tool` results, a `tools` list). Tool specs are kept in OpenAI's {"type": "function",
"function": spec} shape and call arguments as objects, which is what Hugging Face chat templates expect.

Each record is checked completely here, so tokenization only ever sees well-formed input,
and every problem becomes DataError(file, record, reason). Reasons name the field but not the
offending value's position in the file, so `on_bad_sample: skip` can count them by reason.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from zeropad.data.sources import json_type
from zeropad.errors import DataError

FORMATS = ("alpaca", "messages", "sharegpt", "text")
ROLES = ("system", "user", "assistant", "tool")
# ShareGPT speaker names, with the OpenAI names some exports use instead; function_call and
# observation are LLaMA-Factory's tool-call and tool-result turns.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
                  "function_call": "assistant", "observation": "tool"}


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict  # the call's arguments as an object (templates render it with tojson)
    id: str | None = None

    def as_dict(self) -> dict:
        call = {"type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return call if self.id is None else {"id": self.id, **call}


@dataclass(frozen=True)
class Message:
    role: str  # one of ROLES
    content: str
    tool_calls: tuple[ToolCall, ...] = ()  # assistant only
    reasoning_content: str | None = None  # assistant only; templates such as Qwen3's render it in <think>
    tool_call_id: str | None = None  # tool only, when the data names the call it answers

    def as_dict(self) -> dict:
        # Keys are present only when set: templates test `'tool_calls' in message` (Llama 3) or
        # `message.reasoning_content is defined` (Qwen3).
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            out["tool_calls"] = [call.as_dict() for call in self.tool_calls]
        if self.reasoning_content is not None:
            out["reasoning_content"] = self.reasoning_content
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


@dataclass(frozen=True)
class Conversation:
    messages: tuple[Message, ...]
    tools: tuple[dict, ...] = ()  # function specs, each {"type": "function", "function": {...}}

    def as_dicts(self) -> list[dict[str, Any]]:
        """The messages in the shape `tokenizer.apply_chat_template` takes."""
        return [m.as_dict() for m in self.messages]

    @property
    def uses_tools(self) -> bool:
        return bool(self.tools) or any(m.tool_calls or m.role == "tool" for m in self.messages)


@dataclass(frozen=True)
class Text:
    """A pretraining document: every token is a target."""

    text: str


def detect_format(record: dict, file: str, record_no: int) -> str:
    """The format a record's keys point to; a record missing a required field of that format
    is still detected, so the error it gets names the missing field. A key whose value is None counts as absent:
    parquet files and saved datasets give every record every column, None where it has none."""
    def has(key: str) -> bool:
        return record.get(key) is not None

    if has("messages"):
        return "messages"
    if has("conversations"):
        return "sharegpt"
    if has("instruction") or has("output"):
        return "alpaca"
    if has("text"):
        return "text"
    raise DataError(
        file,
        record_no,
        f"cannot detect the format from keys {sorted(record)}: expected 'messages' (messages), "
        "'conversations' (sharegpt), 'instruction' + 'output' (alpaca) or 'text'; or set the source's format",
    )


def to_conversation(record: dict, fmt: str, file: str, record_no: int,
                    require_reply: bool = True) -> Conversation | Text:
    """Convert one record of format `fmt` (or "auto") or raise DataError saying what is wrong.
    require_reply=False accepts a conversation with no assistant turn yet (a prompt to generate from)."""
    if fmt == "auto":
        fmt = detect_format(record, file, record_no)
    check = _Checker(record, file, record_no)
    if fmt == "text":
        text = check.field("text", str)
        if not text.strip():
            raise check.error("empty text")
        return Text(text)
    tools: tuple[dict, ...] = ()
    if fmt == "alpaca":
        messages = _alpaca(check)
    elif fmt == "messages":
        messages, tools = _messages(check), _tools(check, json_string=False)
    elif fmt == "sharegpt":
        messages, tools = _sharegpt(check), _tools(check, json_string=True)
    else:
        raise ValueError(f"unknown format {fmt!r}; expected auto or one of {FORMATS}")
    if all(m.role == "system" for m in messages):
        raise check.error("empty conversation")
    if require_reply and not any(m.role == "assistant" and (m.content.strip() or m.tool_calls) for m in messages):
        raise check.error("no assistant turn to learn from")
    _check_tool_results(check, messages)
    return Conversation(tuple(messages), tools)


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
        label = f"messages[{i}]."
        role = check.field("role", str, item, label)
        if role not in ROLES:
            raise check.error(f"unknown role '{role}' (expected {', '.join(ROLES)})")
        raw_calls = check.optional("tool_calls", list, item, label) if role == "assistant" else None
        calls = tuple(_openai_call(check, call, f"{label}tool_calls[{k}]") for k, call in
                      enumerate(raw_calls or [], start=1))
        # OpenAI writes content: null on an assistant message that only calls tools.
        content = check.optional("content", str, item, label) if calls else check.field("content", str, item, label)
        messages.append(Message(role, content or "", calls, check.optional("reasoning_content", str, item, label),
                                check.optional("tool_call_id", str, item, label) if role == "tool" else None))
    return messages


def _openai_call(check: _Checker, call: Any, label: str) -> ToolCall:
    if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
        raise check.error(f"'{label}' must be an object with a 'function' object")
    function = call["function"]
    name = check.field("name", str, function, f"{label}.function.")
    return ToolCall(name, _arguments(check, function.get("arguments"), f"{label}.function.arguments"),
                    check.optional("id", str, call, f"{label}."))


def _arguments(check: _Checker, arguments: Any, label: str) -> dict:
    """A call's arguments: an object, or (as OpenAI and glaive write them) a JSON string of one."""
    if arguments is None:
        return {}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            raise check.error(f"'{label}' is not valid JSON") from None
    if not isinstance(arguments, dict):
        raise check.error(f"'{label}' must be a JSON object, got {json_type(arguments)}")
    return arguments


def _sharegpt(check: _Checker) -> list[Message]:
    system = check.optional("system", str)
    messages = [Message("system", system)] if system else []
    for i, item in enumerate(check.items("conversations"), start=1):
        label = f"conversations[{i}]."
        speaker = check.field("from", str, item, label)
        if speaker not in SHAREGPT_ROLES:
            raise check.error(f"unknown speaker '{speaker}' (expected {', '.join(SHAREGPT_ROLES)})")
        value = check.field("value", str, item, label)
        if speaker == "function_call":
            messages.append(Message("assistant", "", _sharegpt_calls(check, value, f"{label}value")))
        else:
            messages.append(Message(SHAREGPT_ROLES[speaker], value))
    return messages


def _sharegpt_calls(check: _Checker, value: str, label: str) -> tuple[ToolCall, ...]:
    """A function_call turn's value: the JSON string of one {"name", "arguments"} object or a list of them."""
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        raise check.error(f"function_call '{label}' is not valid JSON") from None
    calls = parsed if isinstance(parsed, list) and parsed else [parsed]
    out = []
    for call in calls:
        if not (isinstance(call, dict) and isinstance(call.get("name"), str)):
            raise check.error(f"function_call '{label}' must be a JSON object with a string 'name' and 'arguments'")
        out.append(ToolCall(call["name"], _arguments(check, call.get("arguments"), f"{label}.arguments")))
    return tuple(out)


def _tools(check: _Checker, json_string: bool) -> tuple[dict, ...]:
    """The record's function specs ('tools': a list, or in ShareGPT a JSON string of one), each wrapped as
    {"type": "function", "function": spec} unless it already is."""
    tools = check.record.get("tools")
    if tools is None or tools == "":
        return ()
    if json_string and isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError:
            raise check.error("'tools' is not valid JSON") from None
    if not isinstance(tools, list):
        raise check.error(f"'tools' must be a list of function specs, got {json_type(tools)}")
    out = []
    for k, spec in enumerate(tools, start=1):
        function = spec.get("function") if isinstance(spec, dict) and spec.get("type") == "function" else spec
        if not (isinstance(function, dict) and isinstance(function.get("name"), str)):
            raise check.error(f"'tools' item {k} must be a function spec with a string 'name'")
        out.append({"type": "function", "function": function})
    return tuple(out)


def _check_tool_results(check: _Checker, messages: list[Message]) -> None:
    """Each tool result answers a call: it follows an assistant turn with calls (or another result), and a
    turn's calls get at most one result each."""
    open_calls = 0
    for message in messages:
        if message.role == "tool":
            if open_calls == 0:
                raise check.error("a tool result (observation) with no tool call before it")
            open_calls -= 1
        else:
            open_calls = len(message.tool_calls)
