"""The built-in default run: a tiny Qwen3 learns two-digit addition from scratch in about two minutes of CPU.

Task: "Add: 37+45" -> "82". Every ordered pair of numbers 0..99 is a possible prompt; the held-out
pairs are removed from training in both orders (37+45 and 45+37), so a correct held-out answer
cannot come from a memorised table or from commutativity: the model has to add. Chance exact match
is about 1/200.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch

from zeropad.demo.tokenizer import build_tokenizer

MAX_OPERAND = 99

# About 0.8M parameters (0.79M without the tied 259-row embedding). Measured on 2 CPU cores:
# ~0.15 s per 2048-token step, so train.steps x 0.15 s is the training time.
MODEL_CONFIG: dict[str, Any] = {
    "model_type": "qwen3",
    "hidden_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "intermediate_size": 384,
    "max_position_embeddings": 256,
    "tie_word_embeddings": True,
}

TRAIN_FILE = "train.jsonl"
HELDOUT_FILE = "heldout.jsonl"


def make_record(x: int, y: int) -> dict:
    """One chat record in the `messages` format: the user asks for x+y, the assistant answers."""
    return {
        "messages": [
            {"role": "user", "content": f"Add: {x}+{y}"},
            {"role": "assistant", "content": str(x + y)},
        ]
    }


def _write_jsonl(path: Path, records: list[dict]) -> None:
    with path.open("w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def write_dataset(
    out_dir: str | Path, seed: int = 0, num_train: int | None = None, num_heldout: int = 200
) -> tuple[Path, list[dict]]:
    """Write OUT/train.jsonl and OUT/heldout.jsonl; return the train path and the held-out records.

    `num_heldout` unordered pairs are held out (never in train, in either order); `num_train`
    (default: all the rest, 9,600 with the defaults) ordered pairs are written to train, shuffled.
    """
    rng = random.Random(seed)
    unordered = [(x, y) for x in range(MAX_OPERAND + 1) for y in range(x, MAX_OPERAND + 1)]
    if not 0 < num_heldout < len(unordered):
        raise ValueError(f"num_heldout must be in 1..{len(unordered) - 1}, got {num_heldout}")
    rng.shuffle(unordered)
    heldout_pairs = unordered[:num_heldout]
    held = set(heldout_pairs)
    train_pairs = [
        (x, y)
        for x in range(MAX_OPERAND + 1)
        for y in range(MAX_OPERAND + 1)
        if (min(x, y), max(x, y)) not in held
    ]
    rng.shuffle(train_pairs)
    if num_train is not None:
        if not 0 < num_train <= len(train_pairs):
            raise ValueError(f"num_train must be in 1..{len(train_pairs)} with num_heldout={num_heldout}, got {num_train}")
        train_pairs = train_pairs[:num_train]
    heldout = [make_record(*(p if rng.random() < 0.5 else p[::-1])) for p in heldout_pairs]

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_path = out / TRAIN_FILE
    _write_jsonl(train_path, [make_record(x, y) for x, y in train_pairs])
    _write_jsonl(out / HELDOUT_FILE, heldout)
    return train_path, heldout


def load_heldout(path: str | Path) -> list[dict]:
    """Read held-out records written by `write_dataset` (OUT/heldout.jsonl)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def default_config(out_dir: str) -> dict:
    """The config dict of `zeropad train` with no config: builds the tokenizer and data under OUT/demo."""
    demo_dir = Path(out_dir) / "demo"
    tokenizer_dir = demo_dir / "tokenizer"
    tokenizer = build_tokenizer(tokenizer_dir)
    train_path, _ = write_dataset(demo_dir)
    model_config = dict(
        MODEL_CONFIG,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.pad_token_id,  # as Qwen3: <|endoftext|>; no BOS is ever inserted
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return {
        "model": {"config": model_config, "tokenizer": str(tokenizer_dir)},
        # In-process tokenization: 9.6k short samples take ~1 s, less than starting workers.
        "data": {"sources": [{"path": str(train_path), "format": "messages"}], "num_workers": 0},
        "pack": {"max_tokens": 2048},
        "train": {
            # Tuned for robustness across seeds and small numeric changes: lr 3e-3 / 500 steps
            # learned or not depending on the run (95.5% vs 19.5%); this gave 99.5% and 96.5%
            # on seeds 0 and 1, and 99.0% on seed 0 with the module-by-module init (model/init.py).
            "steps": 700,
            "lr": 2e-3,
            "warmup_steps": 30,
            "schedule": "cosine",
            "min_lr_ratio": 0.1,
            "weight_decay": 0.0,
            "seed": 0,
        },
        "eval": {"split": 0.01},
        # Running the default twice continues (or just re-reports) the same run instead of refusing.
        "resume": "auto",
        "output_dir": str(out_dir),
    }


def split_record(record: dict) -> tuple[list[dict], str]:
    """A record's prompt messages (all but the last) and its expected answer (the last, an assistant turn)."""
    messages = record["messages"]
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError(f"held-out record must end with an assistant message: {record!r}")
    return messages[:-1], messages[-1]["content"]


def decode_answer(token_ids: list[int], tokenizer) -> str:
    """Generated ids -> answer text: cut at the first end-of-turn token, drop special tokens, strip."""
    eos = tokenizer.eos_token_id
    if eos in token_ids:
        token_ids = token_ids[: token_ids.index(eos)]
    return tokenizer.decode(token_ids, skip_special_tokens=True).strip()


@torch.no_grad()
def _greedy(model, prompts_BT: torch.Tensor, max_new_tokens: int, eos_id: int) -> list[list[int]]:
    """Greedy decoding with full forward passes (no KV cache: answers are a few tokens)."""
    ids_BT = prompts_BT
    done_B = torch.zeros(ids_BT.shape[0], dtype=torch.bool, device=ids_BT.device)
    new_tokens = []
    for _ in range(max_new_tokens):
        next_B = model(input_ids=ids_BT, use_cache=False).logits[:, -1].argmax(-1)
        new_tokens.append(next_B)
        ids_BT = torch.cat([ids_BT, next_B[:, None]], dim=1)
        done_B |= next_B == eos_id
        if bool(done_B.all()):
            break
    return torch.stack(new_tokens, dim=1).tolist()


def exact_match(model, tokenizer, heldout: list[dict], max_new_tokens: int = 8, batch_size: int = 256) -> float:
    """Fraction of held-out records whose greedily generated answer equals the expected one (after strip).

    Prompts are batched by token length, so no padding is needed. The model runs with SDPA attention
    for the duration (the packed varlen backend expects pack metadata) and gets its previous
    implementation and train/eval mode back afterwards.
    """
    if not heldout:
        raise ValueError("exact_match needs at least one held-out record")
    device = next(model.parameters()).device
    by_length: dict[int, list[tuple[list[int], str]]] = {}
    for record in heldout:
        messages, answer = split_record(record)
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer.encode(text, add_special_tokens=False)
        by_length.setdefault(len(ids), []).append((ids, answer))

    previous_attn = getattr(model.config, "_attn_implementation", None)
    switch = previous_attn not in (None, "sdpa", "eager")
    was_training = model.training
    if switch:
        model.set_attn_implementation("sdpa")
    model.eval()
    try:
        num_correct = 0
        for group in by_length.values():
            for start in range(0, len(group), batch_size):
                chunk = group[start : start + batch_size]
                prompts_BT = torch.tensor([ids for ids, _ in chunk], device=device)
                generated = _greedy(model, prompts_BT, max_new_tokens, tokenizer.eos_token_id)
                num_correct += sum(
                    decode_answer(gen, tokenizer) == answer.strip() for gen, (_, answer) in zip(generated, chunk)
                )
    finally:
        if switch:
            model.set_attn_implementation(previous_attn)
        model.train(was_training)
    return num_correct / len(heldout)
