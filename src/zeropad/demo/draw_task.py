"""The built-in drawing run (`zeropad train --default draw`): a tiny decoder-only model learns to draw
handwritten digits from scratch, in a few minutes of CPU.

Every document is one early-fusion sequence: the user's text "draw a 7", then the assistant's image, the
8x8 digit as 64 discrete pixel tokens (its grey levels 0..16 quantised to LEVELS levels) between image
markers. The model learns p(image | text) autoregressively, pixel by pixel, through the ordinary packed SFT
path (the image is the assistant's reply, so its pixels are the targets).

Data: the 1,797 real handwritten digits shipped in the package (demo/data/digits.csv.gz; see the README
there). NUM_HELDOUT of them never reach the generator: an independent classifier (multinomial logistic
regression on the 64 pixels) is fitted on those alone, and its accuracy on real digits it was not fitted
on (the generator's training digits) is reported beside the score. The score: how often the classifier
recognises the requested digit in generated images, against chance (10%).
"""

from __future__ import annotations

import gzip
import json
import re
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

from zeropad.demo.task import MODEL_CONFIG as ADDITION_MODEL_CONFIG
from zeropad.demo.tokenizer import build_tokenizer
from zeropad.images import ImageSpec, contact_sheet, sample_images, to_png

SPEC = ImageSpec(height=8, width=8, levels=4)
MAX_GREY = 16  # the data's grey levels are 0..16
NUM_HELDOUT = 500
TRAIN_FILE = "train.jsonl"
HELDOUT_FILE = "heldout.jsonl"
SAMPLES_PER_DIGIT = 50  # generated images per digit for the score; the grid shows the first GRID_COLUMNS
GRID_COLUMNS = 10

# The text default's model (about 0.8M parameters); documents are 95 tokens (27 prompt, 68 targets).
MODEL_CONFIG: dict[str, Any] = {**ADDITION_MODEL_CONFIG, "max_position_embeddings": 128}


def prompt(digit: int) -> str:
    # "a" for every digit, 8 included: every prompt then has the same length, and all sample in one batch
    return f"draw a {digit}"


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """The shipped digits: grey levels [1797, 8, 8] (0..16) and labels [1797]."""
    raw = resources.files("zeropad.demo").joinpath("data/digits.csv.gz").read_bytes()
    table = np.loadtxt(gzip.decompress(raw).decode().splitlines(), delimiter=",", dtype=np.int64)
    return table[:, :64].reshape(-1, SPEC.height, SPEC.width), table[:, 64]


def quantise(grey: np.ndarray) -> np.ndarray:
    """Grey levels 0..16 -> the nearest of SPEC.levels evenly spaced levels (0 .. levels-1)."""
    return np.rint(np.asarray(grey) * (SPEC.levels - 1) / MAX_GREY).astype(np.int64)


def make_record(levels_HW: np.ndarray, digit: int) -> dict:
    """One chat record in the `messages` format: the user asks for a digit, the assistant draws it."""
    return {"messages": [{"role": "user", "content": prompt(digit)},
                         {"role": "assistant", "content": SPEC.to_text(levels_HW)}]}


def parse_record(record: dict) -> tuple[np.ndarray, int]:
    """A record's image (levels [8, 8]) and digit: the inverse of make_record."""
    user, assistant = record["messages"]
    digit = int(re.fullmatch(r"draw a (\d)", user["content"]).group(1))
    levels = [int(v) for v in re.findall(r"<px(\d+)>", assistant["content"])]
    return np.asarray(levels).reshape(SPEC.height, SPEC.width), digit


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))


def load_records(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def write_dataset(out_dir: str | Path, seed: int = 0, num_heldout: int = NUM_HELDOUT) -> Path:
    """Write OUT/train.jsonl (the generator's digits) and OUT/heldout.jsonl (the classifier's), shuffled with
    `seed`; return the train path."""
    grey, labels = load_digits()
    if not 0 < num_heldout < len(labels):
        raise ValueError(f"num_heldout must be in 1..{len(labels) - 1}, got {num_heldout}")
    order = np.random.default_rng(seed).permutation(len(labels))
    records = [make_record(quantise(grey[i]), int(labels[i])) for i in order]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_jsonl(out / HELDOUT_FILE, records[:num_heldout])
    _write_jsonl(out / TRAIN_FILE, records[num_heldout:])
    return out / TRAIN_FILE


def default_config(out_dir: str) -> dict:
    """The config dict of `zeropad train --default draw`: builds the tokenizer and data under OUT/demo_draw."""
    demo_dir = Path(out_dir) / "demo_draw"
    tokenizer = build_tokenizer(demo_dir / "tokenizer", extra_tokens=SPEC.special_tokens())
    train_path = write_dataset(demo_dir)
    model_config = dict(
        MODEL_CONFIG,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return {
        "model": {"config": model_config, "tokenizer": str(demo_dir / "tokenizer")},
        "data": {"sources": [{"path": str(train_path), "format": "messages"}], "num_workers": 0},
        "pack": {"max_tokens": 2048},
        "train": {
            "steps": 600,
            "lr": 2e-3,
            "warmup_steps": 30,
            "schedule": "cosine",
            "min_lr_ratio": 0.1,
            "weight_decay": 0.0,
            "seed": 0,
        },
        "eval": {"split": 0.02},
        "resume": "auto",
        "output_dir": str(out_dir),
    }


def _features(levels_NHW: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.asarray(levels_NHW).reshape(len(levels_NHW), -1), dtype=torch.float32) / (
        SPEC.levels - 1)


class DigitClassifier:
    """Multinomial logistic regression on the 64 pixels (L2-regularised, fitted to convergence with L-BFGS):
    independent of the generator, it only ever sees real digits."""

    def __init__(self, levels_NHW: np.ndarray, digits: np.ndarray, l2: float = 1e-3):
        x, y = _features(levels_NHW), torch.as_tensor(digits)
        self.linear = torch.nn.Linear(x.shape[1], 10)
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)
        optimizer = torch.optim.LBFGS(self.linear.parameters(), max_iter=100, line_search_fn="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(self.linear(x), y) + l2 * self.linear.weight.square().sum()
            loss.backward()
            return loss

        optimizer.step(closure)

    @torch.no_grad()
    def predict(self, levels_NHW: np.ndarray) -> np.ndarray:
        return self.linear(_features(levels_NHW)).argmax(-1).numpy()


def draw_report(model, tokenizer, data_dir: str | Path, out_dir: str | Path,
                samples_per_digit: int = SAMPLES_PER_DIGIT, temperature: float = 1.0, top_k: int | None = None,
                seed: int = 0) -> dict:
    """Sample `samples_per_digit` images of every digit, write OUT/samples/grid.png (row d: digit d) and score
    them with the classifier fitted on the held-out real digits. Returns the summary numbers."""
    data_dir = Path(data_dir)
    classifier = DigitClassifier(*_arrays(load_records(data_dir / HELDOUT_FILE)))
    real_levels, real_digits = _arrays(load_records(data_dir / TRAIN_FILE))
    real_accuracy = float((classifier.predict(real_levels) == real_digits).mean())
    requested = np.repeat(np.arange(10), samples_per_digit)
    levels = sample_images(model, tokenizer, SPEC, [prompt(d) for d in requested], temperature, top_k, seed)
    recognised = classifier.predict(levels) == requested
    per_digit = [float(recognised[requested == d].mean()) for d in range(10)]
    rows = [[to_png(image, SPEC) for image in levels[requested == d][:GRID_COLUMNS]] for d in range(10)]
    samples_dir = Path(out_dir) / "samples"
    samples_dir.mkdir(parents=True, exist_ok=True)
    contact_sheet(rows).save(samples_dir / "grid.png")
    return {"draw_recognised": float(np.mean(per_digit)), "draw_recognised_per_digit": per_digit,
            "draw_chance": 0.1, "classifier_real_accuracy": real_accuracy,
            "draw_samples": 10 * samples_per_digit}


def _arrays(records: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    pairs = [parse_record(record) for record in records]
    return np.stack([levels for levels, _ in pairs]), np.asarray([digit for _, digit in pairs])
