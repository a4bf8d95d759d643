"""Where each assistant turn lies in one rendered conversation, for any chat template.

Templates may rewrite history (Qwen3 drops the <think> block of turns before the last user query, and
renders an empty one on the last turn), so prefixes of a conversation do not render as prefixes of it.
Nothing here assumes they do. Every turn is found in the one final rendering:

1. Each message's content gets a private-use character (a mark) after its last non-space character,
   and the conversation is rendered again. Removing the marks must give back the rendering exactly
   (a mark after the last non-space character survives `trim`, `strip`, `split('</think>')` and the like);
   the marks' positions are then where each message's content ends in the final rendering.
2. Turn i starts where the prompt for it ends. The text the template puts after the nearest earlier
   mark when it prompts for turn i (end of that message, the next headers, the generation prompt) is
   matched against the final rendering from that mark on; the turn starts where they part. So an
   empty `<think></think>` a template puts into the generation prompt stays prompt, while a header
   the earlier turns render differently is still found.
3. Turn i ends after the template's end-of-turn text (what follows an assistant reply in a two-message
   rendering, such as `<|im_end|>\\n`, `<|eot_id|>`, `<end_of_turn>\\n`, `</s>`), searched from the end of
   the turn's content (or its start, for a turn with no content, e.g. only tool calls) to the next mark. A
   template that writes the eos token once, after the last message (Phi-3, OLMo), ends the earlier turns
   without it.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from zeropad.errors import ZeropadError

Render = Callable[[list[dict], bool], str]  # (messages, add_generation_prompt) -> text

# The Supplementary Private Use Areas A and B: assigned to no script, so absent from real text (a conversation that
# uses one anyway gets its marks from the other).
_MARK_BASES = (0xF0000, 0x100000)


class ChatTemplateError(ZeropadError):
    """The chat template cannot give an assistant-only loss mask (a configuration problem)."""


def _cannot(reason: str) -> ChatTemplateError:
    return ChatTemplateError(f"{reason}, so the assistant-only loss mask cannot be derived; set data.chat_template "
                             "to a template whose assistant turns are wrapped in {% generation %} ... "
                             "{% endgeneration %}, or set data.train_on_prompt: true")


def assistant_spans(render: Render, messages: list[dict], full: str, eos_token: str | None = None
                    ) -> list[tuple[int, int]]:
    """[start, end) character spans of `full` (the rendering of `messages`) holding each assistant turn as
    the model must produce it: reasoning, content, tool calls and the end-of-turn text. `eos_token`: the
    tokenizer's, which some templates write once after the last message (see `_end_of_turn`)."""
    marks = next((m for m in ([chr(b + k) for k in range(len(messages))] for b in _MARK_BASES)
                  if not _mark_pattern(m).search(full)), None)
    if marks is None:
        raise _cannot("the conversation uses characters of both supplementary private-use areas, which zeropad "
                      "needs to find the assistant turns")
    # A template may inspect non-assistant content (Qwen3 tests user text for <tool_response>); if marks
    # there change the rendering, mark the assistant turns alone.
    for roles in (None, {"assistant"}):
        marked = [_with_mark(m, marks[k]) if roles is None or m["role"] in roles else m
                  for k, m in enumerate(messages)]
        text, found = _strip_marks(render(marked, False), marks)
        if text == full:
            break
    else:
        raise _cannot("the chat template changes the text of the messages it renders (a character appended to "
                      "a message's content did not come out where it went in)")
    footer = _end_of_turn(render)
    # Phi-3 and OLMo write the eos token after the conversation's last message: the two-message rendering's
    # end-of-turn then ends with it, and a turn before the last ends without it.
    footers = [footer, footer.removesuffix(eos_token)] if eos_token and footer.endswith(eos_token) else [footer]
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt, prompt_found = _strip_marks(render(marked[:i], True), marks[:i])
        anchor = max((k for k in range(i) if marks[k] in found and marks[k] in prompt_found), default=None)
        low, tail = (0, prompt) if anchor is None else (found[marks[anchor]], prompt[prompt_found[marks[anchor]]:])
        content_end = found.get(marks[i])
        if content_end is None and message.get("content") and not message.get("tool_calls"):
            raise _cannot(f"the chat template leaves out the content of assistant message {i + 1}")
        later = [found[m] for m in marks[i + 1:] if m in found]
        after = low if content_end is None else content_end
        bound = min((p for p in later if p >= after), default=len(full))
        start = low + _common_prefix(full[low:bound if content_end is None else content_end], tail)
        for turn_footer in footers:
            end = full.find(turn_footer, start if content_end is None else content_end, bound)
            if end >= 0:
                break
        if end < 0:
            raise _cannot(f"the end-of-turn text {footer!r} does not follow assistant message {i + 1}")
        spans.append((start, end + len(turn_footer)))
    return spans


def _with_mark(message: dict, mark: str) -> dict:
    content = message.get("content")
    if not isinstance(content, str) or not content:
        return message  # empty content: templates often test for it, so leave it alone
    core = len(content.rstrip())
    return {**message, "content": content[:core] + mark + content[core:]}


def _strip_marks(text: str, marks: list[str]) -> tuple[str, dict[str, int]]:
    """The text without marks, and each mark's position in it (its last occurrence). Marks are consecutive
    characters, so one character class finds them all."""
    if not marks:
        return text, {}
    pattern = _mark_pattern(marks)
    found = {}
    for removed, match in enumerate(pattern.finditer(text)):
        found[match.group()] = match.start() - removed
    return pattern.sub("", text), found


def _mark_pattern(marks: list[str]) -> re.Pattern:
    return re.compile(f"[{marks[0]}-{marks[-1]}]")


def _end_of_turn(render: Render) -> str:
    """The text the template puts after an assistant reply, from a two-message rendering."""
    user, reply = chr(_MARK_BASES[0]), chr(_MARK_BASES[0] + 1)
    try:
        probe = render([{"role": "user", "content": user}, {"role": "assistant", "content": reply}], False)
    except ZeropadError:
        raise _cannot("the chat template cannot render a plain user/assistant exchange (to learn its end-of-turn "
                      "text)") from None
    if reply not in probe:
        raise _cannot("the chat template does not render an assistant reply's content")
    return probe[probe.rindex(reply) + 1:]


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
