"""Preference records -> tokenized pairs (chosen, rejected) that the planner keeps together.

Two record forms, detected from their keys:

- TRL's: `prompt`, `chosen`, `rejected`. Each is a string (the prompt a user turn, the answers assistant
  replies) or a list of {role, content} messages; without `prompt`, `chosen` and `rejected` are whole
  conversations whose shared leading messages are the prompt (TRL's implicit prompt).
- LLaMA-Factory's (its dpo_en_demo.json): `conversations` (ShareGPT turns, the prompt) with `chosen` and
  `rejected` each one {from, value} turn (or a string), and an optional `system`.

Both sides are rendered with the chat template as prompt + answer; only the answer's tokens are targets
(the log-probability DPO compares is that of the completion). A pair is one planning unit of its total
length, so its two documents always land in the same pack, on the same rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from zeropad.config import DataConfig, SourceConfig
from zeropad.data.chat import Sample, SampleError, ensure_chat_template, tokenize_conversation
from zeropad.data.dataset import BadSamplesError, SamplePolicy, SampleReport, weighted_copies
from zeropad.data.formats import ROLES, SHAREGPT_ROLES, Conversation, Message, _Checker, _sharegpt
from zeropad.data.sources import iter_records
from zeropad.errors import DataError


@dataclass(eq=False)
class Pair:
    """A preference pair: planned as one unit of its total length, collated as two documents (chosen first)."""

    chosen: Sample
    rejected: Sample
    # The frozen starting model's log-probability sums (chosen, rejected), set by train/preference.py for DPO.
    ref_logps: tuple[float, float] | None = None

    def __len__(self) -> int:
        return len(self.chosen) + len(self.rejected)

    @property
    def docs(self) -> tuple[Sample, Sample]:
        return self.chosen, self.rejected


def is_preference_record(record: dict) -> bool:
    return "chosen" in record and "rejected" in record


def to_pair_messages(record: dict, file: str, record_no: int) -> tuple[list[Message], list[Message], list[Message]]:
    """(prompt, chosen answer, rejected answer) messages of one record, or DataError saying what is wrong."""
    check = _Checker(record, file, record_no)
    if not is_preference_record(record):
        raise check.error(f"not a preference record (keys {sorted(record)}): expected 'chosen' and 'rejected' with "
                          "'prompt' (TRL) or 'conversations' (LLaMA-Factory)")
    if record.get("conversations") is not None:  # LLaMA-Factory (None: a column parquet fills in for TRL rows)
        prompt = _sharegpt(check)
        chosen, rejected = _turn(check, "chosen"), _turn(check, "rejected")
    elif record.get("prompt") is not None:  # TRL, explicit prompt
        prompt = _side(check, "prompt", "user")
        chosen, rejected = _side(check, "chosen", "assistant"), _side(check, "rejected", "assistant")
    else:  # TRL, implicit prompt: the shared leading messages
        full_chosen, full_rejected = _side(check, "chosen", "assistant"), _side(check, "rejected", "assistant")
        shared = 0
        while (shared < min(len(full_chosen), len(full_rejected)) - 1
               and full_chosen[shared] == full_rejected[shared]):
            shared += 1
        prompt, chosen, rejected = full_chosen[:shared], full_chosen[shared:], full_rejected[shared:]
    if not any(m.role == "user" for m in prompt):
        raise check.error("the prompt has no user turn")
    for name, answer in (("chosen", chosen), ("rejected", rejected)):
        if not answer or answer[-1].role != "assistant" or not answer[-1].content.strip():
            raise check.error(f"empty {name} answer (it must end with a non-empty assistant turn)")
    if chosen == rejected:
        raise check.error("chosen and rejected are identical")
    return prompt, chosen, rejected


def _turn(check: _Checker, key: str) -> list[Message]:
    """LLaMA-Factory's chosen/rejected: one {from, value} turn, or a plain string (an assistant reply)."""
    value = check.record.get(key)
    if isinstance(value, str):
        return [Message("assistant", value)]
    if not isinstance(value, dict):
        raise check.error(f"field '{key}' must be a {{from, value}} object or a string")
    speaker = check.field("from", str, value, f"{key}.")
    if SHAREGPT_ROLES.get(speaker) != "assistant":
        raise check.error(f"'{key}.from' must be an assistant speaker (gpt), got '{speaker}'")
    return [Message("assistant", check.field("value", str, value, f"{key}."))]


def _side(check: _Checker, key: str, role_of_string: str) -> list[Message]:
    """A TRL field: a string (one turn of `role_of_string`) or a list of {role, content} messages."""
    value = check.record.get(key)
    if isinstance(value, str):
        return [Message(role_of_string, value)]
    if not isinstance(value, list):
        raise check.error(f"field '{key}' must be a string or a list of messages")
    messages = []
    for i, item in enumerate(value, start=1):
        if not isinstance(item, dict):
            raise check.error(f"'{key}' item {i} must be an object")
        role = check.field("role", str, item, f"{key}[{i}].")
        if role not in ROLES:
            raise check.error(f"unknown role '{role}' in '{key}' (expected {', '.join(ROLES)})")
        messages.append(Message(role, check.field("content", str, item, f"{key}[{i}].")))
    return messages


def _completion(prompt: list[Message], answer: list[Message], tokenizer, template_kwargs: dict | None) -> Sample:
    """prompt + answer tokenized; targets only in the answer (assistant turns of the prompt are context)."""
    render = lambda messages: tokenize_conversation(Conversation(tuple(messages)), tokenizer, False,  # noqa: E731
                                                    template_kwargs)
    sample = render(prompt + answer)
    in_prompt = int(render(prompt).loss_mask.sum())
    mask = sample.loss_mask.copy()
    mask[np.flatnonzero(mask)[:in_prompt]] = False
    return Sample(sample.input_ids, mask)


def tokenize_pair(record: dict, file: str, record_no: int, tokenizer, template_kwargs: dict | None = None) -> Pair:
    """The pair's two sides, rendered as SFT renders a conversation (data.chat_template_kwargs included)."""
    prompt, chosen, rejected = to_pair_messages(record, file, record_no)
    try:
        pair = Pair(*(_completion(prompt, answer, tokenizer, template_kwargs) for answer in (chosen, rejected)))
    except SampleError as err:
        raise DataError(file, record_no, str(err)) from None
    for name, side in (("chosen", pair.chosen), ("rejected", pair.rejected)):
        if not side.loss_mask[1:].any():
            raise DataError(file, record_no, f"no target tokens in the {name} answer")
    return pair


def load_pairs(sources: list[SourceConfig], cfg: DataConfig, tokenizer, *, max_tokens: int,
               seed: int) -> tuple[list[Pair], SampleReport]:
    """Every source's pairs, weighted; a pair over max_tokens is a bad sample (a pair is never split or cut)."""
    ensure_chat_template(tokenizer, cfg.chat_template)
    report = SampleReport()
    policy = SamplePolicy(cfg.on_bad_sample, report, max_tokens, "drop", collect=True)
    pairs: list[Pair] = []
    for index, source in enumerate(sources):
        kept = []
        for record_no, record in iter_records(source.path):
            report.num_records += 1
            try:
                if isinstance(record, DataError):
                    raise record
                pair = tokenize_pair(record, source.path, record_no, tokenizer, cfg.chat_template_kwargs)
            except DataError as err:
                policy.bad(source.path, record_no, err.reason)
                continue
            if len(pair) > max_tokens:
                policy.bad(source.path, record_no, "pair longer than pack.max_tokens (a pair is never split)")
                continue
            kept.append(pair)
        if not kept and not policy.problems:
            raise DataError(source.path, None, f"no usable preference pairs; skipped: {dict(report.skipped)}")
        pairs += weighted_copies(kept, source.weight, np.random.default_rng([seed, index]))
    if policy.problems:
        raise BadSamplesError(sorted(policy.problems, key=lambda p: (p.file, p.record or 0)))
    report.num_samples = len(pairs)
    report.num_tokens = sum(len(pair) for pair in pairs)
    return pairs, report
