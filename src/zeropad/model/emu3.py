"""Emu3 (early fusion that generates images): its frozen VQ encoder as the data path's image tokenizer, and
`zeropad generate --prompt` for an Emu3 model directory.

Training: an image in an assistant turn becomes its VQ tokens as targets (zeropad.data.image_targets, which says
why the encoder runs where documents are made); `image_encoder` is the callable it takes. The packed forward is
Emu3's language model on plain tokens, so it runs zeropad_varlen like any causal LM; the VQ model keeps a stock
attention (its attention blocks are bidirectional, within one image).

Generation follows Emu3's documented recipe: the prompt is the user's text through the chat template, then
`<|image start|>{rows}*{cols}<|image token|>`; Hugging Face `generate` samples under a public
`prefix_allowed_tokens_fn` that allows only visual tokens inside a row, end-of-line at each row's end, then end of
frame, end of image and end of turn (zeropad.family.ImageTargets.allowed_next); classifier-free guidance is
generate's own (`guidance_scale` with `negative_prompt_ids`); `decode_image_tokens` turns the tokens into pixels
and the image processor's `postprocess` into pictures. The image is the largest square the run's image processor
makes (its max_pixels), the size training images were brought to.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer, Emu3Model

from zeropad.data.chat import ensure_chat_template
from zeropad.data.image_targets import Encode, code_grid
from zeropad.errors import ConfigError
from zeropad.family import ImageTargets, image_targets
from zeropad.images import inference, save_pictures
from zeropad.model.attention import ATTN_NAME
from zeropad.model.load import auto_class, emu3_attn_implementation


def _emu3(model: torch.nn.Module) -> Emu3Model:
    found = next((m for m in model.modules() if isinstance(m, Emu3Model)), None)
    if found is None:
        raise ConfigError(f"{type(model).__name__} holds no Emu3Model")
    return found


def image_encoder(model: torch.nn.Module) -> Encode:
    """pixel_values [1, 3, H, W], image_sizes [1, 2] -> the image's rows of visual tokens, each row ended by
    end-of-line (`Emu3Model.get_image_tokens`, Emu3's own layout), int64 on the CPU. The VQ model is frozen:
    its codes come from an argmin, and requires_grad=False also keeps DDP from waiting for its gradients."""
    emu3 = _emu3(model)
    vq = emu3.vqmodel
    vq.requires_grad_(False)
    if vq.config._attn_implementation == ATTN_NAME:
        raise ConfigError(f"Emu3's VQ model cannot use {ATTN_NAME} (its attention is bidirectional): build it with "
                          f"attn_implementation={emu3_attn_implementation()}")

    @torch.no_grad()
    def encode(pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> np.ndarray:
        was_training = vq.training
        vq.eval()  # no dropout in a tokenizer
        try:
            weight = next(vq.parameters())
            ids = emu3.get_image_tokens(pixel_values.to(weight.device, weight.dtype), image_sizes)
        finally:
            vq.train(was_training)
        return ids.cpu().numpy().astype(np.int64)

    return encode


def generation_grid(processor) -> tuple[int, int]:
    """(rows, cols) of a generated image: the largest square the processor makes (side sqrt(max_pixels))."""
    side = math.isqrt(processor.max_pixels)
    return code_grid(side, side, processor)


def prompt_ids(tokenizer, prompt: str, targets: ImageTargets, grid: tuple[int, int]) -> list[int]:
    """The user's prompt as a chat turn, the assistant's turn opened, and the image's prefix (as in training)."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer.encode(text + targets.prefix_text(*grid), add_special_tokens=False)


@torch.no_grad()
def sample_emu3_images(model, tokenizer, processor, prompt: str, num: int, temperature: float = 1.0,
                       top_k: int | None = None, seed: int = 0, guidance_scale: float | None = None,
                       negative_prompt: str | None = None) -> list:
    """`num` PIL images for `prompt`. guidance_scale > 1: classifier-free guidance against `negative_prompt`
    (default: an empty prompt). Seeded; the global random state is left as it was."""
    if temperature <= 0:
        raise ConfigError(f"temperature must be positive, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ConfigError(f"top_k must be at least 1, got {top_k}")
    if guidance_scale is not None and guidance_scale < 1:
        raise ConfigError(f"guidance_scale must be at least 1 (1: no guidance), got {guidance_scale}")
    guided = guidance_scale is not None and guidance_scale > 1
    if negative_prompt is not None and not guided:
        raise ConfigError("a negative prompt needs classifier-free guidance: give a guidance scale above 1")
    targets = image_targets(model.config)
    rows, cols = generation_grid(processor)
    end = tokenizer.eos_token_id  # the end of turn training targets after the image (ChatML: <|im_end|>)
    pad = end if tokenizer.pad_token_id is None else tokenizer.pad_token_id
    ids = prompt_ids(tokenizer, prompt, targets, (rows, cols))
    device = next(model.parameters()).device
    batch = torch.tensor([ids] * num, device=device)
    kwargs = {}
    if guided:
        negative = torch.tensor([prompt_ids(tokenizer, negative_prompt or "", targets, (rows, cols))] * num,
                                device=device)
        kwargs = dict(guidance_scale=guidance_scale, negative_prompt_ids=negative,
                      negative_prompt_attention_mask=torch.ones_like(negative))
    body = targets.num_body_tokens(rows, cols)

    def allowed(batch_id: int, row: torch.Tensor) -> list[int]:
        return targets.allowed_next(row.shape[0] - len(ids), rows, cols, end)

    with inference(model), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = model.generate(input_ids=batch, attention_mask=torch.ones_like(batch), do_sample=True,
                             max_new_tokens=body + 1, prefix_allowed_tokens_fn=allowed, temperature=temperature,
                             top_k=top_k or 0, top_p=1.0, pad_token_id=pad, eos_token_id=end, **kwargs)
    # rows with end-of-line, end of frame, end of image, end of turn: the layout decode_image_tokens reads
    pixels = model.decode_image_tokens(image_tokens=out[:, len(ids):], height=rows, width=cols)
    return processor.postprocess(list(pixels.float().cpu()), return_tensors="PIL.Image.Image")["pixel_values"]


def is_emu3_dir(model_dir: str | Path) -> bool:
    path = Path(model_dir) / "config.json"
    return path.is_file() and json.loads(path.read_text()).get("model_type") == "emu3"


def generate_emu3_images(model_dir: str | Path, prompt: str, num: int, out_dir: str | Path, temperature: float = 1.0,
                         top_k: int | None = None, seed: int = 0, guidance_scale: float | None = None,
                         negative_prompt: str | None = None, columns: int = 10, device: str = "auto") -> list[Path]:
    """Sample `num` images for `prompt` from an Emu3 model directory (its weights, tokenizer and
    preprocessor_config.json, as zeropad's final/ and export write them) on `device` (auto: the GPU if there is
    one); write OUT/0000.png, ... and the contact sheet OUT/grid.png. Returns the image paths (not the grid)."""
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    if num < 1:
        raise ConfigError(f"the number of images must be at least 1, got {num}")
    model_dir = Path(model_dir)
    if not (model_dir / "preprocessor_config.json").is_file():
        raise ConfigError(f"{model_dir} has no preprocessor_config.json (Emu3's image processor), which gives the "
                          "image size and turns generated pixels into pictures")
    config = AutoConfig.from_pretrained(model_dir)
    model = auto_class(config).from_pretrained(model_dir, dtype=torch.float32).to(device)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ensure_chat_template(tokenizer, None)  # the template training used when the tokenizer had none
    processor = AutoImageProcessor.from_pretrained(model_dir, backend="pil")
    pictures = sample_emu3_images(model, tokenizer, processor, prompt, num, temperature, top_k, seed,
                                  guidance_scale, negative_prompt)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return save_pictures(pictures, out, columns)
