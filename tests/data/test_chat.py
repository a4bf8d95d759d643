import numpy as np
import pytest

from zeropad.data.chat import (
    DEFAULT_CHAT_TEMPLATE,
    ChatTemplateError,
    Sample,
    SampleError,
    ensure_chat_template,
    tokenize_conversation,
    tokenize_text,
)
from zeropad.data.formats import Conversation, Message

MULTI_TURN = Conversation(
    (
        Message("system", "You are helpful."),
        Message("user", "Hello world, how are you?"),
        Message("assistant", "Fine, thanks! And é you?"),
        Message("user", "What is the capital of France?"),
        Message("assistant", " The capital of France is Paris."),
    )
)


def _decode_targets(tokenizer, sample: Sample) -> str:
    return tokenizer.decode(sample.input_ids[sample.loss_mask].tolist(), skip_special_tokens=False)


def test_ensure_chat_template_defaults_to_chatml_keeps_existing_and_overrides(tokenizer):
    ensure_chat_template(tokenizer, None)
    assert tokenizer.chat_template == DEFAULT_CHAT_TEMPLATE
    tokenizer.chat_template = "{{ 'mine' }}"
    ensure_chat_template(tokenizer, None)
    assert tokenizer.chat_template == "{{ 'mine' }}"
    ensure_chat_template(tokenizer, "{{ 'override' }}")
    assert tokenizer.chat_template == "{{ 'override' }}"


def test_default_template_renders_chatml(tokenizer):
    ensure_chat_template(tokenizer, None)
    text = tokenizer.apply_chat_template(MULTI_TURN.as_dicts()[:2], tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are helpful.<|im_end|>\n"
        "<|im_start|>user\nHello world, how are you?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_assistant_only_mask_is_exactly_the_replies_and_end_of_turn(tokenizer):
    ensure_chat_template(tokenizer, None)
    sample = tokenize_conversation(MULTI_TURN, tokenizer, train_on_prompt=False)
    assert sample.input_ids.dtype == np.int32 and sample.loss_mask.dtype == bool
    assert len(sample) == len(sample.loss_mask)
    # The ids are exactly what inference with this template sees.
    reference = tokenizer.apply_chat_template(MULTI_TURN.as_dicts(), tokenize=True, return_dict=False)
    assert sample.input_ids.tolist() == list(reference)
    assert _decode_targets(tokenizer, sample) == (
        "Fine, thanks! And é you?<|im_end|>\n The capital of France is Paris.<|im_end|>\n"
    )
    # Each reply is one contiguous run of targets: 2 replies -> 2 runs.
    starts = np.flatnonzero(np.diff(sample.loss_mask.astype(np.int8)) == 1)
    assert len(starts) == 2


def test_first_reply_token_is_a_target_even_when_merged_with_the_prompt(tokenizer):
    # The generation prompt ends with a space that byte-level BPE glues to the reply's first
    # word (" world"), so the prompt's ids are not a prefix of the full ids: that token, which
    # carries the reply's first word, must still be a target.
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    conv = Conversation((Message("user", "quick fox"), Message("assistant", "world peace")))
    prompt = tokenizer.apply_chat_template(conv.as_dicts()[:1], tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer(prompt)
    sample = tokenize_conversation(conv, tokenizer, train_on_prompt=False)
    assert sample.input_ids[: len(prompt_ids["input_ids"])].tolist() != prompt_ids["input_ids"]
    assert _decode_targets(tokenizer, sample) == " world peace\n"


def test_train_on_prompt_marks_every_token(tokenizer):
    ensure_chat_template(tokenizer, None)
    prompt_too = tokenize_conversation(MULTI_TURN, tokenizer, train_on_prompt=True)
    assistant_only = tokenize_conversation(MULTI_TURN, tokenizer, train_on_prompt=False)
    assert prompt_too.loss_mask.all()
    assert np.array_equal(prompt_too.input_ids, assistant_only.input_ids)


def test_tokenize_text_appends_eos_and_trains_every_token(tokenizer):
    sample = tokenize_text("The quick brown fox.", tokenizer)
    assert sample.input_ids[-1] == tokenizer.eos_token_id
    assert sample.loss_mask.all() and sample.input_ids.dtype == np.int32
    assert tokenizer.decode(sample.input_ids[:-1].tolist()) == "The quick brown fox."


def test_template_leaving_out_earlier_replies_is_refused_with_the_fix(tokenizer):
    # Renders past assistant turns as a placeholder: there is no reply text to learn from.
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}{{ 'A: ...\n' }}"
        "{% else %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    with pytest.raises(ChatTemplateError, match="data.chat_template"):
        tokenize_conversation(MULTI_TURN, tokenizer, train_on_prompt=False)


def test_template_rejecting_a_conversation_is_a_sample_error(tokenizer):
    tokenizer.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(SampleError, match="roles must alternate"):
        tokenize_conversation(MULTI_TURN, tokenizer, train_on_prompt=False)


def test_conversation_opening_with_an_assistant_turn_is_a_sample_error(tokenizer):
    ensure_chat_template(tokenizer, None)
    conv = Conversation((Message("assistant", "Hi, how can I help?"), Message("user", "Hello")))
    with pytest.raises(SampleError, match="opens with an assistant turn"):
        tokenize_conversation(conv, tokenizer, train_on_prompt=False)
