"""The built-in preference run (`zeropad train --default dpo`): DPO teaches a tiny Qwen3 an answer format.

Prompts are the addition demo's ("Add: 37+45"); the chosen answer is the bare sum ("82"), the rejected one
the same sum written out ("37+45=82"). Both are correct, so what DPO must learn is the preference itself: a
randomly initialised model (the frozen reference too) starts at rewards/accuracy 0 (the rewards are equal)
and ends well above chance (50%) on held-out pairs whose numbers it never saw. The training pairs are in
LLaMA-Factory's form (dpo_en_demo.json), the held-out ones in TRL's, so both forms are read.
"""

from __future__ import annotations

import json
from pathlib import Path

from zeropad.demo.task import MODEL_CONFIG, write_dataset
from zeropad.demo.tokenizer import build_tokenizer

TRAIN_FILE = "dpo_train.json"
HELDOUT_FILE = "dpo_heldout.jsonl"


def _parts(record: dict) -> tuple[str, str, str]:
    """(prompt, chosen, rejected) of an addition demo record."""
    prompt = record["messages"][0]["content"]
    total = record["messages"][1]["content"]
    return prompt, total, f"{prompt.removeprefix('Add: ')}={total}"


def write_pairs(out_dir: str | Path, num_train: int = 1000, num_heldout: int = 200, seed: int = 0) -> tuple[Path, Path]:
    """OUT/dpo_train.json (LLaMA-Factory form) and OUT/dpo_heldout.jsonl (TRL form); held-out numbers never train."""
    out = Path(out_dir)
    train_path, heldout = write_dataset(out / "sft", seed=seed, num_train=num_train, num_heldout=num_heldout)
    train_records = [json.loads(line) for line in train_path.read_text().splitlines()]
    pairs = []
    for record in train_records:
        prompt, chosen, rejected = _parts(record)
        pairs.append({"conversations": [{"from": "human", "value": prompt}],
                      "chosen": {"from": "gpt", "value": chosen}, "rejected": {"from": "gpt", "value": rejected}})
    (out / TRAIN_FILE).write_text(json.dumps(pairs, indent=1))
    with (out / HELDOUT_FILE).open("w") as f:
        for record in heldout:
            prompt, chosen, rejected = _parts(record)
            f.write(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}) + "\n")
    return out / TRAIN_FILE, out / HELDOUT_FILE


def default_config(out_dir: str) -> dict:
    demo_dir = Path(out_dir) / "demo"
    tokenizer = build_tokenizer(demo_dir / "tokenizer")
    train_path, heldout_path = write_pairs(demo_dir)
    model_config = dict(MODEL_CONFIG, vocab_size=len(tokenizer), bos_token_id=tokenizer.pad_token_id,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return {
        "model": {"config": model_config, "tokenizer": str(demo_dir / "tokenizer")},
        "data": {"sources": [{"path": str(train_path)}], "num_workers": 0, "cache_dir": str(demo_dir / "cache")},
        "pack": {"max_tokens": 2048},
        "train": {"objective": "dpo", "beta": 0.1, "steps": 30, "lr": 1e-3, "warmup_steps": 5, "seed": 0},
        "eval": {"sources": [{"path": str(heldout_path)}], "every_steps": 10},
        "resume": "auto",
        "output_dir": str(out_dir),
    }
