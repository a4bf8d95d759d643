"""Images as discrete pixel tokens: sample them from a causal LM, decode them, save PNGs and a contact sheet.

A pixel-token image model (the built-in drawing run, `zeropad train --default draw`) writes an image of
height x width pixels, each one of `levels` grey levels, as the text
`<|image_start|><pxA><pxB>...<|image_end|>` (row by row, one special token per pixel). Its model directory
holds `image_tokens.json` ({"height", "width", "levels"}) beside the weights and tokenizer, so sampling
needs nothing but the directory and a prompt.

Sampling is Hugging Face `generate` with a public LogitsProcessor that allows only pixel tokens, for
exactly height x width steps, with temperature and top-k applied among the pixel tokens.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
)

from zeropad.errors import ConfigError

IMAGE_START = "<|image_start|>"
IMAGE_END = "<|image_end|>"
SPEC_FILE = "image_tokens.json"
SCALE = 8  # a pixel token becomes an 8x8 block in the PNGs
GAP = 2  # pixels of grey between contact-sheet cells, so white backgrounds stay apart


@dataclass(frozen=True)
class ImageSpec:
    """The shape of a pixel-token image: height x width pixels, each one of `levels` grey levels."""

    height: int
    width: int
    levels: int

    @property
    def num_pixels(self) -> int:
        return self.height * self.width

    def pixel_tokens(self) -> tuple[str, ...]:
        """The pixel tokens, level 0 (background) first."""
        return tuple(f"<px{level}>" for level in range(self.levels))

    def special_tokens(self) -> tuple[str, ...]:
        """Every special token the tokenizer needs: the image markers, then the pixel tokens."""
        return (IMAGE_START, IMAGE_END) + self.pixel_tokens()

    def to_text(self, levels_HW: np.ndarray) -> str:
        """An image of grey levels as the assistant's text: markers around one pixel token per pixel."""
        flat = np.asarray(levels_HW).reshape(-1)
        if flat.size != self.num_pixels or flat.min() < 0 or flat.max() >= self.levels:
            raise ValueError(f"expected {self.height}x{self.width} levels in 0..{self.levels - 1}, got {levels_HW!r}")
        return IMAGE_START + "".join(f"<px{int(v)}>" for v in flat) + IMAGE_END

    def save(self, model_dir: str | Path) -> None:
        (Path(model_dir) / SPEC_FILE).write_text(json.dumps(asdict(self)) + "\n")

    @classmethod
    def load(cls, model_dir: str | Path) -> ImageSpec:
        path = Path(model_dir) / SPEC_FILE
        if not path.is_file():
            raise ConfigError(f"{model_dir} has no {SPEC_FILE}: it is not a pixel-token image model "
                              "(`zeropad train --default draw` makes one in OUTPUT_DIR/final)")
        return cls(**json.loads(path.read_text()))


def pixel_token_ids(tokenizer, spec: ImageSpec) -> list[int]:
    """The tokenizer's ids of the pixel tokens, by level; a clear error when one is missing."""
    ids = [tokenizer.convert_tokens_to_ids(token) for token in spec.pixel_tokens()]
    unknown = tokenizer.unk_token_id
    missing = [t for t, i in zip(spec.pixel_tokens(), ids) if i is None or (unknown is not None and i == unknown)]
    if missing:
        raise ConfigError(f"the tokenizer has no pixel token(s) {missing[:3]}; it was not built for {spec}")
    return ids


class AllowOnly(LogitsProcessor):
    """Every token but the allowed ones gets a score of -inf, so sampling can only pick an allowed one."""

    def __init__(self, allowed_ids: list[int]):
        self.allowed_ids = torch.as_tensor(allowed_ids)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        allowed = torch.zeros(scores.shape[-1], dtype=torch.bool, device=scores.device)
        allowed[self.allowed_ids.to(scores.device)] = True
        return scores.masked_fill(~allowed, float("-inf"))


@contextlib.contextmanager
def inference(model):
    """Eval mode with SDPA attention for the duration (the packed varlen backend expects pack metadata); the
    model gets its previous attention implementation and train/eval mode back afterwards."""
    previous = getattr(model.config, "_attn_implementation", None)
    switch = previous not in (None, "sdpa", "eager")
    was_training = model.training
    if switch:
        model.set_attn_implementation("sdpa")
    model.eval()
    try:
        yield model
    finally:
        if switch:
            model.set_attn_implementation(previous)
        model.train(was_training)


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The user's prompt as a chat turn, the assistant's turn opened, and the image opened."""
    messages = [{"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + IMAGE_START
    return tokenizer.encode(text, add_special_tokens=False)


@torch.no_grad()
def sample_images(model, tokenizer, spec: ImageSpec, prompts: list[str], temperature: float = 1.0,
                  top_k: int | None = None, seed: int = 0, batch_size: int = 500) -> np.ndarray:
    """One image per prompt, as grey levels [len(prompts), height, width]: exactly height x width pixel tokens
    each, sampled at `temperature` from the `top_k` most likely pixel tokens (all when None). Prompts of the
    same token length are sampled together (no padding). Seeded; the global random state is left as it was."""
    if not prompts:
        raise ConfigError("no prompts: nothing to draw")
    if temperature <= 0:
        raise ConfigError(f"temperature must be positive, got {temperature}")
    if top_k is not None and not 1 <= top_k <= spec.levels:
        raise ConfigError(f"top_k must be in 1..{spec.levels} (the pixel levels), got {top_k}")
    pixel_ids = pixel_token_ids(tokenizer, spec)
    processors = LogitsProcessorList([AllowOnly(pixel_ids), TemperatureLogitsWarper(temperature)])
    if top_k is not None:
        processors.append(TopKLogitsWarper(top_k))
    level_of = torch.full((max(pixel_ids) + 1,), -1, dtype=torch.long)
    level_of[torch.tensor(pixel_ids)] = torch.arange(spec.levels)
    device = next(model.parameters()).device
    by_length: dict[int, list[int]] = {}
    encoded = [prompt_ids(tokenizer, prompt) for prompt in prompts]
    for i, ids in enumerate(encoded):
        by_length.setdefault(len(ids), []).append(i)
    levels = torch.empty(len(prompts), spec.num_pixels, dtype=torch.long)
    with inference(model), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for length, rows in by_length.items():
            for start in range(0, len(rows), batch_size):
                chunk = rows[start:start + batch_size]
                batch = torch.tensor([encoded[i] for i in chunk], device=device)
                # Temperature and top-k live in `processors`, after the pixel-only mask (generate's own are off),
                # and end of turn is never allowed, so every sample is exactly num_pixels tokens.
                out = model.generate(input_ids=batch, attention_mask=torch.ones_like(batch), do_sample=True,
                                     max_new_tokens=spec.num_pixels, logits_processor=processors, temperature=1.0,
                                     top_k=0, top_p=1.0, pad_token_id=tokenizer.pad_token_id)
                levels[chunk] = level_of[out[:, length:].cpu()]
    return levels.reshape(len(prompts), spec.height, spec.width).numpy()


def to_png(levels_HW: np.ndarray, spec: ImageSpec) -> Image.Image:
    """Grey levels as a greyscale picture, ink dark on white, each pixel a SCALE x SCALE block."""
    grey = 255 - np.rint(np.asarray(levels_HW, dtype=np.float64) * 255 / (spec.levels - 1)).astype(np.uint8)
    image = Image.fromarray(grey, mode="L")
    return image.resize((spec.width * SCALE, spec.height * SCALE), Image.Resampling.NEAREST)


def contact_sheet(rows: list[list[Image.Image]]) -> Image.Image:
    """One row of pictures per list (all the same size), GAP pixels of grey around each."""
    cell_w, cell_h = rows[0][0].size
    columns = max(len(row) for row in rows)
    mode = rows[0][0].mode  # greyscale (pixel-token drawings) or RGB (Emu3)
    grey = 160 if mode == "L" else (160,) * len(mode)
    sheet = Image.new(mode, (columns * (cell_w + GAP) + GAP, len(rows) * (cell_h + GAP) + GAP), grey)
    for r, row in enumerate(rows):
        for c, picture in enumerate(row):
            sheet.paste(picture, (GAP + c * (cell_w + GAP), GAP + r * (cell_h + GAP)))
    return sheet


def generate_images(model_dir: str | Path, prompt: str, num: int, out_dir: str | Path, temperature: float = 1.0,
                    top_k: int | None = None, seed: int = 0, columns: int = 10) -> list[Path]:
    """Sample `num` images for `prompt` from a pixel-token image model directory; write OUT/0000.png, ... and
    the contact sheet OUT/grid.png (`columns` pictures a row). Returns the image paths (not the grid)."""
    if num < 1:
        raise ConfigError(f"the number of images must be at least 1, got {num}")
    spec = ImageSpec.load(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    levels = sample_images(model, tokenizer, spec, [prompt] * num, temperature, top_k, seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return save_pictures([to_png(image, spec) for image in levels], out, columns)


def save_pictures(pictures: list[Image.Image], out: Path, columns: int) -> list[Path]:
    """`out`/0000.png, 0001.png, ... and their contact sheet `out`/grid.png, `columns` pictures a row."""
    paths = []
    for i, picture in enumerate(pictures):
        paths.append(out / f"{i:04d}.png")
        picture.save(paths[-1])
    contact_sheet([pictures[i:i + columns] for i in range(0, len(pictures), columns)]).save(out / "grid.png")
    return paths
