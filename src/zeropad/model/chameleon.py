"""Early-fusion token models (Chameleon) on the one packed path.

Chameleon has no vision tower in the attention sense: its frozen VQ-VAE turns each image into a fixed grid of
discrete codes, and `ChameleonModel.forward` embeds those codes with the text embedding and scatters them, in
order, over the `<image>` placeholder tokens of input_ids. Everything after that is one causal language model,
so a Chameleon document is a text `Sample` whose media are its images:
  - input_ids: every image written as <boi> <image>*N <eoi>, the layout ChameleonProcessor produces, with
    N = (resolution / 2**(levels-1))**2 the VQ latent grid, the same for every image (zeropad.family);
  - media pixel_values [I, C, R, R]: the image processor resizes and center-crops every image, whatever its
    original size, to the VQ resolution R.
The pack is the text pack (positions restarting at 0 per document, targets shifted inside each document).

The whole model takes zeropad_varlen: the VQ encoder's attention is a plain per-image bmm that never reads
`attn_implementation`, and images are encoded independently of each other (GroupNorm, convolutions).
The VQ codes are discrete (argmin), so no gradient reaches the VQ-VAE; the code rows of the shared embedding
do get gradients. Placeholder tokens are never targets (Chameleon's head masks image codes out of the logits).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from transformers import ChameleonImageProcessorPil, ChameleonProcessor

from zeropad.data.chat import Sample
from zeropad.errors import ZeropadError
from zeropad.family import chameleon_image_tokens


def image_processor(config) -> ChameleonImageProcessorPil:
    """The PIL-backend image processor (the torchvision one needs torchvision), sized to the VQ resolution:
    shortest edge resized to R, then an R x R center crop, so every image gives the same number of codes."""
    side = config.vq_config.resolution
    return ChameleonImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side})


def chameleon_processor(tokenizer, config) -> ChameleonProcessor:
    """Tokenizer + image processor, with the placeholder count the model's VQ grid needs."""
    return ChameleonProcessor(image_processor(config), tokenizer, image_seq_length=chameleon_image_tokens(config))


def _open_image(image: str | Path | Image.Image) -> Image.Image:
    return image if isinstance(image, Image.Image) else Image.open(image)


def document_from_text(processor: ChameleonProcessor, text: str, images=()) -> Sample:
    """A pretraining document from text with one `<image>` per image (files or PIL images): the processor
    writes each as <boi> <image>*N <eoi>; eos is appended as for text documents; placeholders are not targets."""
    tokenizer = processor.tokenizer
    if tokenizer.eos_token_id is None:
        raise ZeropadError("the tokenizer has no eos_token; pretraining documents need one to mark their end")
    batch = processor(text=text, images=[_open_image(i) for i in images] or None, return_for_text_completion=True,
                      return_tensors="pt")
    ids = batch["input_ids"][0].tolist()
    if ids[-1] != tokenizer.eos_token_id:
        ids.append(tokenizer.eos_token_id)
    input_ids = np.asarray(ids, dtype=np.int64)
    media = {"pixel_values": batch["pixel_values"]} if "pixel_values" in batch else {}
    return Sample(input_ids, input_ids != processor.image_token_id, media)
