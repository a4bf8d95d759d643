"""Conversation -> token ids + loss mask (assistant-only by default); Text -> ids + eos.

The conversation is rendered once with the chat template (with its tools, when it has any) and
tokenized once, so the ids are those inference sees. Which tokens are targets comes from that one
rendering: a template with {% generation %} markers says so itself (transformers'
return_assistant_tokens_mask); for any other template each assistant turn is located in the
rendering (zeropad.data.turns), which works for templates that rewrite earlier turns. A token is a
target when the character it ends on lies in an assistant span. Attributing a token by its end keeps
the first reply token a target even when the tokenizer merges it with the preceding prompt text, and
survives byte-level offset trimming.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import jinja2
import numpy as np

from zeropad.data.formats import Conversation
from zeropad.data.turns import ChatTemplateError, assistant_spans
from zeropad.errors import ZeropadError

# ChatML, for tokenizers that ship no template, with tool calls in the Hermes style Qwen uses: the function
# specs in the system turn inside <tools></tools>, each call as {"name", "arguments"} JSON inside
# <tool_call></tool_call>, results as a user turn of <tool_response></tool_response> blocks. Without
# tools it renders exactly as plain ChatML. If the tokenizer lacks the <|im_start|> and <|im_end|> special
# tokens they are tokenized as plain text, which still trains consistently.
DEFAULT_CHAT_TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\n\n' }}{%- endif %}"
    "{{- '# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>' }}"
    "{%- for tool in tools %}{{- '\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\n</tools>\n\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, "
    "\"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' and loop.first and tools %}"
    "{%- elif message['role'] == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\n<tool_response>\n' + message['content'] + '\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}{{- '<|im_end|>\n' }}{%- endif %}"
    "{%- else %}{{- '<|im_start|>' + message['role'] + '\n' + message['content'] }}"
    "{%- for call in message['tool_calls'] or [] %}"
    "{%- if message['content'] or not loop.first %}{{- '\n' }}{%- endif %}"
    "{{- '<tool_call>\n{\"name\": \"' + call['function']['name'] + '\", \"arguments\": ' "
    "+ (call['function']['arguments'] | tojson) + '}\n</tool_call>' }}"
    "{%- endfor %}{{- '<|im_end|>\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)
_GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")


class SampleError(ZeropadError):
    """This one conversation cannot be rendered (the template rejected it)."""


@dataclass(frozen=True)
class Sample:
    """One document: its tokens (every image already expanded to its tokens), which are targets, its media."""

    input_ids: np.ndarray  # int32/int64 [L]
    loss_mask: np.ndarray  # bool [L]; True where token i is a target, predicted from tokens < i
    # The document's images and videos as model forward kwargs (pixel_values, image_grid_thw, ...), each
    # concatenated over the pack's documents along dim 0 in document order; empty for text.
    media: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.input_ids)


def ensure_chat_template(tokenizer, override: str | None) -> None:
    """Use `override` when given, else keep the tokenizer's template, else ChatML."""
    if override is not None:
        tokenizer.chat_template = override
    elif not tokenizer.chat_template:
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE


def tokenize_text(text: str, tokenizer) -> Sample:
    """A pretraining document: the tokenizer's own special tokens (e.g. BOS), the text, then eos."""
    if tokenizer.eos_token_id is None:
        raise ZeropadError("the tokenizer has no eos_token; pretraining documents need one to mark their end")
    ids = list(tokenizer(text)["input_ids"])
    if not ids or ids[-1] != tokenizer.eos_token_id:
        ids.append(tokenizer.eos_token_id)
    return Sample(np.asarray(ids, dtype=np.int32), np.ones(len(ids), dtype=bool))


def chat_template_for(conv: Conversation, tokenizer) -> str:
    """The template this conversation renders with: the tokenizer's (its tool-use one when the conversation
    uses tools and it has one); for a tool conversation and a ChatML template that cannot render tool calls,
    the built-in ChatML template with Hermes tool calls."""
    template = tokenizer.get_chat_template(None, list(conv.tools) or None)
    if not conv.uses_tools or "tool_calls" in template:
        return template
    if "<|im_start|>" in template:
        return DEFAULT_CHAT_TEMPLATE
    raise ChatTemplateError(
        "this conversation has tool calls or tool results but the chat template does not render them (it never "
        "mentions tool_calls); set data.chat_template to a template that renders the `tools` list, assistant "
        "`tool_calls` and `tool` messages"
    )


def tokenize_conversation(conv: Conversation, tokenizer, train_on_prompt: bool,
                          template_kwargs: dict | None = None) -> Sample:
    """The conversation's ids and targets. template_kwargs go to the template (e.g. enable_thinking)."""
    template = chat_template_for(conv, tokenizer)

    def render(messages: list[dict], add_generation_prompt: bool) -> str:
        return _render(tokenizer, messages, add_generation_prompt, template, conv.tools, template_kwargs)

    messages = conv.as_dicts()
    full = render(messages, False)
    if train_on_prompt:
        ids = tokenizer(full, add_special_tokens=False)["input_ids"]
        return Sample(np.asarray(ids, dtype=np.int32), np.ones(len(ids), dtype=bool))
    if not tokenizer.is_fast:
        raise ZeropadError(
            "assistant-only loss needs a fast tokenizer (a tokenizer.json) for character offsets; "
            "convert the tokenizer, or set data.train_on_prompt: true"
        )
    if _GENERATION_MARKER.search(template):  # the template marks its assistant turns itself
        out = tokenizer.apply_chat_template(messages, tools=list(conv.tools) or None, chat_template=template,
                                            return_dict=True, return_assistant_tokens_mask=True,
                                            **(template_kwargs or {}))
        return Sample(np.asarray(out["input_ids"], dtype=np.int32), np.asarray(out["assistant_masks"], dtype=bool))
    if messages[0]["role"] == "assistant":  # no prompt precedes it, so no rendering says where it starts
        raise SampleError("the conversation opens with an assistant turn: put the user turn it answers before it")
    spans = assistant_spans(render, messages, full, tokenizer.eos_token)
    encoding = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    token_ends = np.asarray(encoding["offset_mapping"], dtype=np.int64).reshape(-1, 2)[:, 1]
    loss_mask = np.zeros(len(token_ends), dtype=bool)
    for start, end in spans:
        loss_mask |= (token_ends > start) & (token_ends <= end)
    return Sample(np.asarray(encoding["input_ids"], dtype=np.int32), loss_mask)


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool, template: str, tools: tuple[dict, ...],
            template_kwargs: dict | None) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tools=list(tools) or None, chat_template=template,
                                             tokenize=False, add_generation_prompt=add_generation_prompt,
                                             **(template_kwargs or {}))
    except jinja2.TemplateError as err:
        raise SampleError(f"the chat template rejected this conversation: {err}") from None
