"""Conversation -> token ids + loss mask (assistant-only by default); Text -> ids + eos.

The assistant-only mask comes from rendering prefixes of the conversation with the chat
template: for assistant turn i, the text between render(messages[:i], add_generation_prompt)
and render(messages[:i+1]) is that turn's reply plus its end-of-turn marker, which is exactly
what the model must learn to produce. The whole conversation is then tokenized once (so the ids
are those inference sees) and a token is a target when the character it ends on lies in a
reply span. Attributing a token by its end keeps the first reply token a target even when the
tokenizer merges it with the preceding prompt text, and survives byte-level offset trimming.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import jinja2
import numpy as np

from zeropad.data.formats import Conversation
from zeropad.errors import ZeropadError

# ChatML, for tokenizers that ship no template. If the tokenizer lacks the <|im_start|> and
# <|im_end|> special tokens they are tokenized as plain text, which still trains consistently.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class ChatTemplateError(ZeropadError):
    """The chat template cannot give an assistant-only loss mask (a configuration problem)."""


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


def tokenize_conversation(conv: Conversation, tokenizer, train_on_prompt: bool) -> Sample:
    messages = conv.as_dicts()
    full = _render(tokenizer, messages, add_generation_prompt=False)
    if train_on_prompt:
        ids = tokenizer(full, add_special_tokens=False)["input_ids"]
        return Sample(np.asarray(ids, dtype=np.int32), np.ones(len(ids), dtype=bool))
    spans = _reply_spans(tokenizer, messages, full)
    if not tokenizer.is_fast:
        raise ZeropadError(
            "assistant-only loss needs a fast tokenizer (a tokenizer.json) for character offsets; "
            "convert the tokenizer, or set data.train_on_prompt: true"
        )
    encoding = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    token_ends = np.asarray(encoding["offset_mapping"], dtype=np.int64).reshape(-1, 2)[:, 1]
    loss_mask = np.zeros(len(token_ends), dtype=bool)
    for start, end in spans:
        loss_mask |= (token_ends > start) & (token_ends <= end)
    return Sample(np.asarray(encoding["input_ids"], dtype=np.int32), loss_mask)


def _render(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except jinja2.TemplateError as err:
        raise SampleError(f"the chat template rejected this conversation: {err}") from None


def _reply_spans(tokenizer, messages: list[dict[str, str]], full: str) -> list[tuple[int, int]]:
    """[start, end) character spans of `full` holding the assistant replies (with end-of-turn)."""
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], add_generation_prompt=True)
        upto_reply = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not (upto_reply.startswith(prompt) and full.startswith(upto_reply)):
            raise ChatTemplateError(
                f"the chat template does not render conversations turn by turn: the rendering up to "
                f"message {i + 1} is not a prefix of the longer one (templates that rewrite earlier turns, "
                "e.g. dropping past reasoning, do this), so the assistant-only loss mask cannot be derived; "
                "set data.chat_template to a template that renders each turn once, "
                "or set data.train_on_prompt: true"
            )
        spans.append((len(prompt), len(upto_reply)))
    return spans
