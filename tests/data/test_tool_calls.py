"""Tool-calling conversations in ShareGPT (LLaMA-Factory's function_call / observation / tools) and OpenAI
(tool_calls / role tool / tools) form: read, checked, rendered with the template's tools, and trained."""

import json

import pytest
from chat_templates import CHATML, GEMMA, char_tokenizer, target_runs

from zeropad.config import SourceConfig
from zeropad.data.chat import ChatTemplateError, tokenize_conversation
from zeropad.data.dataset import load_samples
from zeropad.data.formats import Conversation, Message, ToolCall, to_conversation
from zeropad.demo.tokenizer import CHAT_TEMPLATE as PLAIN_CHATML
from zeropad.errors import DataError

SPEC = {"name": "convert_currency", "description": "Convert an amount between currencies",
        "parameters": {"type": "object", "properties": {"amount": {"type": "number"}, "to": {"type": "string"}},
                       "required": ["amount", "to"]}}
# Modelled on LLaMA-Factory's glaive_toolcall_en_demo.json: tools and call values are JSON strings.
SHAREGPT = {
    "conversations": [
        {"from": "human", "value": "How much is 50 dollars in euros?"},
        {"from": "function_call", "value": json.dumps({"name": "convert_currency",
                                                       "arguments": {"amount": 50, "to": "EUR"}})},
        {"from": "observation", "value": json.dumps({"converted": 46.2})},
        {"from": "gpt", "value": "50 dollars is about 46.20 euros."},
    ],
    "tools": json.dumps([SPEC]),
}
OPENAI = {
    "messages": [
        {"role": "user", "content": "How much is 50 dollars in euros?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"type": "function", "function": {"name": "convert_currency",
                                              "arguments": json.dumps({"amount": 50, "to": "EUR"})}}]},
        {"role": "tool", "content": json.dumps({"converted": 46.2})},
        {"role": "assistant", "content": "50 dollars is about 46.20 euros."},
    ],
    "tools": [{"type": "function", "function": SPEC}],
}
EXPECTED = Conversation(
    (Message("user", "How much is 50 dollars in euros?"),
     Message("assistant", "", (ToolCall("convert_currency", {"amount": 50, "to": "EUR"}),)),
     Message("tool", '{"converted": 46.2}'),
     Message("assistant", "50 dollars is about 46.20 euros.")),
    ({"type": "function", "function": SPEC},),
)
CALL = '<tool_call>\n{"name": "convert_currency", "arguments": {"amount": 50, "to": "EUR"}}\n</tool_call><|im_end|>\n'


def test_both_forms_read_into_the_same_conversation():
    assert to_conversation(SHAREGPT, "auto", "glaive.json", 1) == EXPECTED
    assert to_conversation(OPENAI, "auto", "openai.jsonl", 1) == EXPECTED


@pytest.mark.parametrize("template", [CHATML, PLAIN_CHATML])
def test_calls_are_trained_and_tool_list_and_results_are_not(template):
    # PLAIN_CHATML cannot render tools: a ChatML template gets the built-in Hermes tool calls instead.
    tokenizer = char_tokenizer(template, None, "<|im_end|>")
    sample = tokenize_conversation(EXPECTED, tokenizer, train_on_prompt=False)
    text = tokenizer.decode(sample.input_ids.tolist())
    assert '"name": "convert_currency", "description"' in text and "<tool_response>\n" in text
    assert target_runs(sample, tokenizer) == [CALL, "50 dollars is about 46.20 euros.<|im_end|>\n"]


def test_template_without_tool_support_names_the_field_to_set():
    with pytest.raises(ChatTemplateError, match="data.chat_template"):
        tokenize_conversation(EXPECTED, char_tokenizer(GEMMA, "<bos>", "<eos>"), train_on_prompt=False)


def _with(record: dict, path: tuple, value) -> dict:
    record = json.loads(json.dumps(record))
    target = record
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return record


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        (_with(SHAREGPT, ("conversations", 1, "value"), "{not json"),
         "function_call 'conversations[2].value' is not valid JSON"),
        (_with(SHAREGPT, ("conversations", 1, "value"), '{"name": "f", "arguments": "{bad"}'),
         "'conversations[2].value.arguments' is not valid JSON"),
        (_with(SHAREGPT, ("conversations", 1, "value"), '{"arguments": {}}'), "with a string 'name'"),
        (_with(SHAREGPT, ("tools",), "[{"), "'tools' is not valid JSON"),
        (_with(SHAREGPT, ("tools",), '[{"description": "no name"}]'), "'tools' item 1 must be a function spec"),
        (_with(SHAREGPT, ("conversations", 1), {"from": "human", "value": "hi"}),
         "a tool result (observation) with no tool call before it"),
        (_with(OPENAI, ("messages", 1, "tool_calls", 0, "function", "arguments"), "{\"amount\": 50,"),
         "'messages[2].tool_calls[1].function.arguments' is not valid JSON"),
        (_with(OPENAI, ("messages", 1, "tool_calls", 0, "function", "arguments"), "[1]"), "must be a JSON object"),
        (_with(OPENAI, ("messages", 1, "tool_calls", 0), "call"), "'messages[2].tool_calls[1]' must be an object"),
        (_with(OPENAI, ("messages", 1), {"role": "assistant", "content": "ok"}), "no tool call before it"),
    ],
)
def test_bad_tool_calls_are_data_errors_naming_file_and_record(record, reason):
    with pytest.raises(DataError) as info:
        to_conversation(record, "auto", "tools.json", 4)
    assert reason in info.value.reason
    assert (info.value.file, info.value.record) == ("tools.json", 4)


def test_tool_data_trains_and_bad_calls_are_counted_skips(write_data, data_cfg):
    bad = _with(SHAREGPT, ("conversations", 1, "value"), "{not json")
    path = write_data("glaive.json", [SHAREGPT, bad, SHAREGPT])
    tokenizer = char_tokenizer(CHATML, None, "<|im_end|>")
    cfg = data_cfg(sources=[SourceConfig(path=str(path))], on_bad_sample="skip")
    samples, report = load_samples(cfg.sources, cfg, tokenizer, max_tokens=4096, overlong="drop", seed=0)
    assert len(samples) == 2 and report.skipped.total() == 1
    assert report.skipped["function_call 'conversations[2].value' is not valid JSON"] == 1
    assert target_runs(samples[0], tokenizer) == target_runs(tokenize_conversation(EXPECTED, tokenizer, False), tokenizer)
