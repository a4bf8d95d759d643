"""A tiny Emu3 from config (the offline char tokenizer plus Emu3's image layout tokens and 32 visual tokens), its
image processor and text-to-image records with generated PNGs; shared by the Emu3 training and generation tests."""

import json
from pathlib import Path

import numpy as np
from PIL import Image

from zeropad.demo.tokenizer import build_tokenizer
from zeropad.family import EMU3_BOI, EMU3_EOF, EMU3_EOI, EMU3_EOL, EMU3_IMAGE, EMU3_WRAPPER

NUM_CODES = 32
EMU3_TOKENS = (EMU3_IMAGE, EMU3_BOI, EMU3_WRAPPER, EMU3_EOL, EMU3_EOF, EMU3_EOI,
               *(f"<|visual token {k:06d}|>" for k in range(NUM_CODES)))
SIDE = 32  # largest image side after resizing: 4 x 4 codes (four VQ levels, spatial factor 8)


def emu3_tokenizer(out_dir: Path):
    return build_tokenizer(out_dir, extra_tokens=EMU3_TOKENS)


def emu3_config(tokenizer) -> dict:
    """model.config for zeropad (model_type + kwargs): 2-layer Llama-like text model, 4-level VQ-VAE with one
    attention level; pad/bos/eos inside the vocabulary."""
    ids = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.eos_token_id,
               eos_token_id=tokenizer.eos_token_id)
    text = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, attention_dropout=0.0,
                **ids)
    vq = dict(codebook_size=NUM_CODES, embed_dim=8, latent_channels=8, base_channels=32,
              channel_multiplier=[1, 1, 1, 1], num_res_blocks=1, attn_resolutions=[3], hidden_size=32,
              num_attention_heads=1)
    return dict(model_type="emu3", text_config=text, vq_config=vq, vocabulary_map=tokenizer.get_vocab(), **ids)


def emu3_processor():
    from transformers.models.emu3.image_processing_emu3 import Emu3ImageProcessor

    return Emu3ImageProcessor(spatial_factor=8, min_pixels=16 * 16, max_pixels=SIDE * SIDE)


def write_image(path: Path, height: int, width: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return path.name


def text_to_image_records(root: Path, sizes=((32, 32), (40, 57), (64, 32), (24, 24))) -> Path:
    """One record per image size: a user prompt, the image as the assistant's reply; written as root/data.jsonl."""
    lines = []
    for i, (h, w) in enumerate(sizes):
        name = write_image(root / f"img{i}.png", h, w, seed=i)
        lines.append({"messages": [{"role": "user", "content": f"draw picture {i}"},
                                   {"role": "assistant", "content": "<image>"}], "images": [name]})
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return data
