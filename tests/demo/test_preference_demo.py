"""The built-in preference run's data: LLaMA-Factory pairs to train on, TRL pairs held out, disjoint numbers."""

from __future__ import annotations

import json

from zeropad.config import DataConfig, SourceConfig
from zeropad.data.preference import load_pairs
from zeropad.demo.preference_task import default_config, write_pairs
from zeropad.demo.tokenizer import build_tokenizer


def test_demo_pairs_load_in_both_forms_and_hold_out_unseen_numbers(tmp_path):
    train_path, heldout_path = write_pairs(tmp_path, num_train=50, num_heldout=20)
    train = json.loads(train_path.read_text())
    heldout = [json.loads(line) for line in heldout_path.read_text().splitlines()]
    assert len(train) == 50 and len(heldout) == 20
    assert train[0]["rejected"]["value"] == train[0]["conversations"][0]["value"].removeprefix("Add: ") + "=" + \
        train[0]["chosen"]["value"]

    def operands(prompt: str) -> frozenset:
        return frozenset(prompt.removeprefix("Add: ").split("+"))

    assert not {operands(r["conversations"][0]["value"]) for r in train} & {operands(r["prompt"]) for r in heldout}
    tokenizer = build_tokenizer(tmp_path / "tok")
    for path, count in ((train_path, 50), (heldout_path, 20)):
        pairs, report = load_pairs([SourceConfig(path=str(path))], DataConfig(), tokenizer, max_tokens=2048, seed=0)
        assert len(pairs) == count and report.skipped.total() == 0
    config = default_config(str(tmp_path / "run"))
    assert config["train"]["objective"] == "dpo" and config["eval"]["sources"]
