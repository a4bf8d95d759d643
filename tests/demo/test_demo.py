"""The demo's tokenizer, data and exact-match metric (fast: no training)."""

from __future__ import annotations

import json
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3Config

from zeropad.config import build_config
from zeropad.demo.task import (
    MODEL_CONFIG,
    decode_answer,
    default_config,
    exact_match,
    load_heldout,
    split_record,
    write_dataset,
)
from zeropad.demo.tokenizer import build_tokenizer


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    build_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    train_path, heldout = write_dataset(out, seed=0)
    train = [json.loads(line) for line in train_path.read_text().splitlines()]
    return out, train, heldout


def test_tokenizer_round_trip_and_one_token_per_char(tokenizer):
    text = "Add: 37+45\n\t Hello, World! ~{}[] <|im_end|> é 中"
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
    ascii_text = "Add: 37+45 xyz"
    assert len(tokenizer.encode(ascii_text, add_special_tokens=False)) == len(ascii_text)
    assert tokenizer.encode("<|im_start|>", add_special_tokens=False) == [tokenizer.convert_tokens_to_ids("<|im_start|>")]


def test_tokenizer_special_tokens_survive_save_load(tokenizer_dir, tokenizer, tmp_path):
    built = build_tokenizer(tmp_path)
    assert tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.eos_token == "<|im_end|>"
    assert len(tokenizer) == len(built) == 259
    for token in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        assert tokenizer.convert_tokens_to_ids(token) == built.convert_tokens_to_ids(token)
    assert tokenizer.encode("ab", add_special_tokens=False) == built.encode("ab", add_special_tokens=False)


def test_chat_template_is_chatml(tokenizer):
    messages = [{"role": "user", "content": "Add: 1+2"}, {"role": "assistant", "content": "3"}]
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    assert full == "<|im_start|>user\nAdd: 1+2<|im_end|>\n<|im_start|>assistant\n3<|im_end|>\n"
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nAdd: 1+2<|im_end|>\n<|im_start|>assistant\n"
    assert full.startswith(prompt)


def test_dataset_answers_are_correct(dataset):
    _, train, heldout = dataset
    assert len(train) == 100 * 100 - (2 * 200 - sum(1 for r in heldout if _operands(r)[0] == _operands(r)[1]))
    for record in train + heldout:
        assert [m["role"] for m in record["messages"]] == ["user", "assistant"]
        x, y = _operands(record)
        assert 0 <= x <= 99 and 0 <= y <= 99
        assert record["messages"][1]["content"] == str(x + y)


def test_heldout_is_disjoint_from_train_in_both_orders(dataset):
    out, train, heldout = dataset
    assert len(heldout) == 200
    train_pairs = {frozenset(_operands(r)) for r in train}
    heldout_pairs = {frozenset(_operands(r)) for r in heldout}
    assert len(heldout_pairs) == 200
    assert not train_pairs & heldout_pairs
    assert load_heldout(out / "heldout.jsonl") == heldout


def test_dataset_is_deterministic_and_sized(tmp_path):
    _, a = write_dataset(tmp_path / "a", seed=3, num_train=50, num_heldout=10)
    _, b = write_dataset(tmp_path / "b", seed=3, num_train=50, num_heldout=10)
    assert a == b and len(a) == 10
    assert (tmp_path / "a" / "train.jsonl").read_text() == (tmp_path / "b" / "train.jsonl").read_text()
    assert len((tmp_path / "a" / "train.jsonl").read_text().splitlines()) == 50
    with pytest.raises(ValueError, match="num_train"):
        write_dataset(tmp_path / "c", num_train=10**6)


def test_decode_answer_cuts_at_end_of_turn(tokenizer):
    ids = tokenizer.encode("82", add_special_tokens=False) + [tokenizer.eos_token_id] + tokenizer.encode("junk")
    assert decode_answer(ids, tokenizer) == "82"
    assert decode_answer(tokenizer.encode(" 82 ", add_special_tokens=False), tokenizer) == "82"
    assert split_record({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}) == (
        [{"role": "user", "content": "q"}],
        "a",
    )


class _OracleLM(torch.nn.Module):
    """Predicts the known answer of each prompt, then <|im_end|>: an upper bound for exact_match."""

    def __init__(self, tokenizer, heldout, corrupt: bool = False):
        super().__init__()
        self.config = Qwen3Config(vocab_size=len(tokenizer))
        self.config._attn_implementation = "sdpa"
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.vocab_size = len(tokenizer)
        self.targets: dict[tuple[int, ...], list[int]] = {}
        for record in heldout:
            messages, answer = split_record(record)
            if corrupt:
                answer = answer + "0"
            prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            ids = tuple(tokenizer.encode(prompt, add_special_tokens=False))
            self.targets[ids] = tokenizer.encode(answer, add_special_tokens=False) + [tokenizer.eos_token_id]

    def forward(self, input_ids, **kwargs):
        logits = torch.zeros(*input_ids.shape, self.vocab_size)
        for b, row in enumerate(input_ids.tolist()):
            for prompt, target in self.targets.items():
                if tuple(row[: len(prompt)]) == prompt:
                    logits[b, -1, target[min(len(row) - len(prompt), len(target) - 1)]] = 1.0
        return type("Output", (), {"logits": logits})()


def test_exact_match_is_one_for_an_oracle(tokenizer, dataset):
    heldout = dataset[2][:20]
    assert exact_match(_OracleLM(tokenizer, heldout), tokenizer, heldout) == 1.0
    assert exact_match(_OracleLM(tokenizer, heldout, corrupt=True), tokenizer, heldout) == 0.0


def test_exact_match_is_near_zero_for_an_untrained_model_and_restores_it(tokenizer, dataset):
    torch.manual_seed(0)
    config = dict(MODEL_CONFIG, hidden_size=64, num_hidden_layers=1, intermediate_size=128, head_dim=16)
    config.update(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id)
    model = AutoModelForCausalLM.from_config(Qwen3Config(**config), attn_implementation="eager")
    model.train()
    heldout = dataset[2][:32]
    assert exact_match(model, tokenizer, heldout, max_new_tokens=4) <= 0.05
    assert model.training
    assert model.config._attn_implementation == "eager"


def test_default_config_validates(tmp_path):
    data = default_config(str(tmp_path))
    config = build_config(data)
    assert config.output_dir == str(tmp_path)
    assert config.model.config["model_type"] == "qwen3"
    assert config.model.config["vocab_size"] == 259
    tokenizer = AutoTokenizer.from_pretrained(config.model.tokenizer)
    assert config.model.config["eos_token_id"] == tokenizer.eos_token_id
    assert config.model.config["pad_token_id"] == tokenizer.pad_token_id
    assert [s.format for s in config.data.sources] == ["messages"]
    assert (tmp_path / "demo" / "train.jsonl").is_file() and (tmp_path / "demo" / "heldout.jsonl").is_file()
    n_params = sum(p.numel() for p in AutoModelForCausalLM.from_config(Qwen3Config(**{
        k: v for k, v in config.model.config.items() if k != "model_type"})).parameters())
    assert 0.5e6 <= n_params <= 3e6


def _operands(record: dict) -> tuple[int, int]:
    match = re.fullmatch(r"Add: (\d+)\+(\d+)", record["messages"][0]["content"])
    assert match, record
    return int(match[1]), int(match[2])
