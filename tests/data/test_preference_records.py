"""Preference records (TRL's and LLaMA-Factory's forms) -> tokenized pairs; bad pairs named or counted."""

from __future__ import annotations

import json

import numpy as np
import pytest

from zeropad.config import DataConfig, SourceConfig
from zeropad.data.dataset import BadSamplesError
from zeropad.data.preference import load_pairs, tokenize_pair, to_pair_messages
from zeropad.demo.tokenizer import build_tokenizer
from zeropad.errors import DataError


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


LLAMA_FACTORY = {"conversations": [{"from": "human", "value": "2+2?"}],
                 "chosen": {"from": "gpt", "value": "4"}, "rejected": {"from": "gpt", "value": "five"}}
EQUIVALENT = [
    LLAMA_FACTORY,
    {"prompt": "2+2?", "chosen": "4", "rejected": "five"},  # TRL, standard strings
    {"prompt": [{"role": "user", "content": "2+2?"}],  # TRL, conversational
     "chosen": [{"role": "assistant", "content": "4"}], "rejected": [{"role": "assistant", "content": "five"}]},
    {"chosen": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],  # TRL, implicit prompt
     "rejected": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "five"}]},
    # a TRL row of a parquet file or saved dataset that also holds LLaMA-Factory rows: the column is there, None
    {"conversations": None, "prompt": "2+2?", "chosen": "4", "rejected": "five"},
]


def _targets(sample, tokenizer) -> str:
    return tokenizer.decode(np.asarray(sample.input_ids)[sample.loss_mask])


def test_every_form_gives_the_same_pair_with_answer_only_targets(tokenizer):
    pairs = [tokenize_pair(record, "f.json", i, tokenizer) for i, record in enumerate(EQUIVALENT)]
    for pair in pairs[1:]:
        for doc, first in zip(pair.docs, pairs[0].docs):
            np.testing.assert_array_equal(doc.input_ids, first.input_ids)
            np.testing.assert_array_equal(doc.loss_mask, first.loss_mask)
    assert _targets(pairs[0].chosen, tokenizer) == "4<|im_end|>\n"
    assert _targets(pairs[0].rejected, tokenizer) == "five<|im_end|>\n"
    assert len(pairs[0]) == len(pairs[0].chosen) + len(pairs[0].rejected)


def test_pairs_render_with_the_chat_template_kwargs_as_sft_does(tmp_path):
    """data.chat_template_kwargs reach the pairs' rendering (Qwen3's enable_thinking=false: the empty think block
    in the prompt), as they reach an SFT conversation's; they were left out."""
    from chat_templates import QWEN3, char_tokenizer

    from zeropad.data.chat import tokenize_conversation
    from zeropad.data.formats import to_conversation

    tokenizer = char_tokenizer(QWEN3, None, "<|im_end|>")
    kwargs = {"enable_thinking": False}
    pair = tokenize_pair(EQUIVALENT[1], "f.json", 1, tokenizer, kwargs)
    conversation = {"messages": EQUIVALENT[2]["prompt"] + EQUIVALENT[2]["chosen"]}
    sft = tokenize_conversation(to_conversation(conversation, "messages", "f.json", 1), tokenizer, False, kwargs)
    np.testing.assert_array_equal(pair.chosen.input_ids, sft.input_ids)
    np.testing.assert_array_equal(pair.chosen.loss_mask, sft.loss_mask)
    # without it the empty think block is the answer's: the kwarg shows in the targets, so dropping it would show
    without = tokenize_pair(EQUIVALENT[1], "f.json", 1, tokenizer)
    assert without.chosen.loss_mask.sum() > pair.chosen.loss_mask.sum()


def test_a_multi_turn_prompt_trains_only_the_final_answer(tokenizer):
    record = {"system": "Be brief.", "conversations": [
        {"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}, {"from": "human", "value": "1+1?"}],
        "chosen": {"from": "gpt", "value": "2"}, "rejected": {"from": "gpt", "value": "11"}}
    prompt, _, _ = to_pair_messages(record, "f.json", 1)
    assert [m.role for m in prompt] == ["system", "user", "assistant", "user"]
    pair = tokenize_pair(record, "f.json", 1, tokenizer)
    assert _targets(pair.chosen, tokenizer) == "2<|im_end|>\n"
    assert _targets(pair.rejected, tokenizer) == "11<|im_end|>\n"


@pytest.mark.parametrize("record, reason", [
    ({"prompt": "q", "chosen": "", "rejected": "b"}, "empty chosen answer"),
    ({"prompt": "q", "chosen": "a", "rejected": "  "}, "empty rejected answer"),
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "chosen and rejected are identical"),
    ({"conversations": [{"from": "human", "value": "q"}], "chosen": {"from": "human", "value": "a"},
      "rejected": "b"}, "'chosen.from' must be an assistant speaker"),
    ({"prompt": "q", "chosen": "a"}, "not a preference record"),
])
def test_bad_pairs_are_named(tokenizer, record, reason):
    with pytest.raises(DataError, match=reason) as err:
        tokenize_pair(record, "f.json", 7, tokenizer)
    assert err.value.record == 7 and err.value.file == "f.json"


def test_load_pairs_errors_or_counts_bad_and_over_budget_pairs(tokenizer, tmp_path):
    records = [LLAMA_FACTORY, {"prompt": "q", "chosen": "x", "rejected": "x"},
               {"prompt": "q " * 40, "chosen": "long", "rejected": "longer"}]
    path = tmp_path / "dpo.json"
    path.write_text(json.dumps(records))
    sources = [SourceConfig(path=str(path))]
    with pytest.raises(BadSamplesError) as err:
        load_pairs(sources, DataConfig(), tokenizer, max_tokens=60, seed=0)
    assert [p.record for p in err.value.problems] == [2, 3]
    assert "pair longer than pack.max_tokens" in str(err.value)
    pairs, report = load_pairs(sources, DataConfig(on_bad_sample="skip"), tokenizer, max_tokens=60, seed=0)
    assert len(pairs) == 1 and report.num_records == 3 and report.skipped.total() == 2
    assert report.num_tokens == len(pairs[0])
