"""The assistant-only mask on chat templates in the style of Qwen3, Llama 3, Gemma, Mistral and ChatML: the
target tokens, run by run, decode to exactly each assistant turn as it appears in the rendering."""

import pytest
from chat_templates import (
    CHATML,
    GEMMA,
    LLAMA3,
    MISTRAL,
    PHI3,
    QWEN3,
    char_tokenizer,
    target_runs,
)

from zeropad.data.chat import tokenize_conversation
from zeropad.data.formats import to_conversation

SYSTEM = [{"role": "system", "content": "Be brief."}]
TWO_TURNS = [
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello! \n"},  # trailing space: templates that trim must still match
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
]
REASONING = [
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!", "reasoning_content": "Greet back."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4", "reasoning_content": "2+2 is 4."},
]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
TOOL_CALL = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None,
     "tool_calls": [{"id": "c1", "type": "function",
                     "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
    {"role": "tool", "content": "{\"temp\": 21}", "tool_call_id": "c1"},
    {"role": "assistant", "content": "It is 21 C in Paris."},
]
# An agent step: reasoning before the call and before the answer, kept while no later user turn follows.
AGENT = [{**TOOL_CALL[0]}, {**TOOL_CALL[1], "reasoning_content": "Need the weather."}, TOOL_CALL[2],
         {**TOOL_CALL[3], "reasoning_content": "Got it."}]
AGENT_THEN_THANKS = AGENT + [{"role": "user", "content": "Thanks!"},
                             {"role": "assistant", "content": "You're welcome.", "reasoning_content": "Polite."}]
CALL_TEXT = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
HERMES_CALL = f"<tool_call>\n{CALL_TEXT}\n</tool_call><|im_end|>\n"

CASES = {
    # name: (template, bos, eos, messages, tools, template kwargs, expected assistant turns)
    "chatml": (CHATML, None, "<|im_end|>", SYSTEM + TWO_TURNS, None, {},
               ["Hello! \n<|im_end|>\n", "4<|im_end|>\n"]),
    "chatml-tools": (CHATML, None, "<|im_end|>", SYSTEM + TOOL_CALL, TOOLS, {},
                     [HERMES_CALL, "It is 21 C in Paris.<|im_end|>\n"]),
    # Earlier turns lose their reasoning; the last keeps it, and its <think> is the model's to write.
    "qwen3-reasoning": (QWEN3, None, "<|im_end|>", SYSTEM + REASONING, None, {},
                        ["Hello!<|im_end|>\n", "<think>\n2+2 is 4.\n</think>\n\n4<|im_end|>\n"]),
    "qwen3-think-in-content": (
        QWEN3, None, "<|im_end|>",
        [{"role": m["role"], "content": f"<think>\n{m['reasoning_content']}\n</think>\n\n{m['content']}"}
         if "reasoning_content" in m else m for m in REASONING], None, {},
        ["Hello!<|im_end|>\n", "<think>\n2+2 is 4.\n</think>\n\n4<|im_end|>\n"]),
    # Thinking off: the generation prompt holds the empty think block, so it is prompt, not target.
    "qwen3-no-thinking": (QWEN3, None, "<|im_end|>", TWO_TURNS, None, {"enable_thinking": False},
                          ["Hello! \n<|im_end|>\n", "4<|im_end|>\n"]),
    "qwen3-thinking-empty": (QWEN3, None, "<|im_end|>", TWO_TURNS, None, {},
                             ["Hello! \n<|im_end|>\n", "<think>\n\n</think>\n\n4<|im_end|>\n"]),
    "qwen3-tools": (QWEN3, None, "<|im_end|>", SYSTEM + TOOL_CALL, TOOLS, {},
                    [HERMES_CALL, "<think>\n\n</think>\n\nIt is 21 C in Paris.<|im_end|>\n"]),
    "qwen3-agent": (QWEN3, None, "<|im_end|>", AGENT, TOOLS, {},
                    ["<think>\nNeed the weather.\n</think>\n\n" + HERMES_CALL,
                     "<think>\nGot it.\n</think>\n\nIt is 21 C in Paris.<|im_end|>\n"]),
    # A later user turn: the agent step's reasoning is dropped from the rendering, and from the targets.
    "qwen3-agent-then-thanks": (QWEN3, None, "<|im_end|>", AGENT_THEN_THANKS, TOOLS, {},
                                [HERMES_CALL, "It is 21 C in Paris.<|im_end|>\n",
                                 "<think>\nPolite.\n</think>\n\nYou're welcome.<|im_end|>\n"]),
    # Tool results written as user text: Qwen3 tests that text's ends, so only assistant turns can be marked.
    "qwen3-tool-response-as-user": (
        QWEN3, None, "<|im_end|>",
        [REASONING[0], REASONING[1], {"role": "user", "content": "<tool_response>\nsunny\n</tool_response>"},
         REASONING[3]], None, {},
        ["<think>\nGreet back.\n</think>\n\nHello!<|im_end|>\n", "<think>\n2+2 is 4.\n</think>\n\n4<|im_end|>\n"]),
    "llama3": (LLAMA3, "<|begin_of_text|>", "<|eot_id|>", SYSTEM + TWO_TURNS, None, {},
               ["Hello!<|eot_id|>", "4<|eot_id|>"]),
    "llama3-tools": (LLAMA3, "<|begin_of_text|>", "<|eot_id|>", SYSTEM + TOOL_CALL, TOOLS, {},
                     ['{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>',
                      "It is 21 C in Paris.<|eot_id|>"]),
    "gemma": (GEMMA, "<bos>", "<eos>", TWO_TURNS, None, {}, ["Hello!<end_of_turn>\n", "4<end_of_turn>\n"]),
    "mistral": (MISTRAL, "<s>", "</s>", TWO_TURNS, None, {}, ["Hello! \n</s>", "4</s>"]),
    # The eos after the last message ends the last turn only (multi-turn records were refused).
    "phi3": (PHI3, None, "<|endoftext|>", SYSTEM + TWO_TURNS, None, {},
             ["Hello! \n<|end|>\n", "4<|end|>\n<|endoftext|>"]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_target_runs_are_exactly_the_assistant_turns(name):
    template, bos, eos, messages, tools, kwargs, expected = CASES[name]
    tokenizer = char_tokenizer(template, bos, eos)
    record = {"messages": messages, **({"tools": tools} if tools else {})}
    conv = to_conversation(record, "messages", "chat.jsonl", 1)
    sample = tokenize_conversation(conv, tokenizer, train_on_prompt=False, template_kwargs=kwargs)
    rendered = tokenizer.apply_chat_template(conv.as_dicts(), tools=tools, tokenize=False, **kwargs)
    # The ids are the one rendering's, as inference sees it; the targets are the assistant turns in it.
    assert sample.input_ids.tolist() == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert target_runs(sample, tokenizer) == expected
    for turn in expected:
        assert turn in rendered


def test_generation_markers_give_the_same_mask_as_locating_the_turns():
    marked = CHATML.replace("{%- else %}{{- '<|im_start|>' + message['role'] + '\n' + message['content'] }}",
                            "{%- elif message['role'] == 'assistant' %}{{- '<|im_start|>assistant\n' }}"
                            "{% generation %}{{- message['content'] + '<|im_end|>\n' }}{% endgeneration %}"
                            "{%- else %}{{- '<|im_start|>' + message['role'] + '\n' + message['content'] }}")
    assert marked != CHATML
    conv = to_conversation({"messages": SYSTEM + TWO_TURNS}, "messages", "chat.jsonl", 1)
    located = tokenize_conversation(conv, char_tokenizer(CHATML, None, "<|im_end|>"), False)
    tokenizer = char_tokenizer(marked, None, "<|im_end|>")
    generation = tokenize_conversation(conv, tokenizer, False)
    assert generation.input_ids.tolist() == located.input_ids.tolist()
    assert generation.loss_mask.tolist() == located.loss_mask.tolist()
    assert target_runs(generation, tokenizer) == ["Hello! \n<|im_end|>\n", "4<|im_end|>\n"]


def test_chat_template_kwargs_from_the_config_reach_the_template_and_key_the_cache(write_data, data_cfg):
    from zeropad.config import SourceConfig
    from zeropad.data.dataset import load_samples

    path = write_data("chat.jsonl", [{"messages": TWO_TURNS}])
    tokenizer = char_tokenizer(QWEN3, None, "<|im_end|>")
    runs = {}
    for thinking in (True, False):
        cfg = data_cfg(sources=[SourceConfig(path=str(path))], chat_template_kwargs={"enable_thinking": thinking})
        samples, _ = load_samples(cfg.sources, cfg, tokenizer, max_tokens=4096, overlong="drop", seed=0)
        runs[thinking] = target_runs(samples[0], tokenizer)[-1]
    assert runs == {True: "<think>\n\n</think>\n\n4<|im_end|>\n", False: "4<|im_end|>\n"}


def test_private_use_text_in_the_data_does_not_confuse_the_marks():
    tokenizer = char_tokenizer(CHATML, None, "<|im_end|>")
    text = "\U000f0000\U000f0001 odd glyphs"  # the first marks' characters, as content
    conv = to_conversation({"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": text}]},
                           "messages", "chat.jsonl", 1)
    sample = tokenize_conversation(conv, tokenizer, train_on_prompt=False)
    assert target_runs(sample, tokenizer) == [f"{text}<|im_end|>\n"]
