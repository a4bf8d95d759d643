"""Packed, padding-free forward for early-fusion token models (Chameleon) through their public inputs.

Chameleon has no vision tower in the attention sense: its frozen VQ-VAE turns each image into a fixed grid of
discrete codes, and `ChameleonModel.forward` embeds those codes with the text embedding and scatters them, in
order, over the `<image>` placeholder tokens of input_ids. Everything after that is one causal language model,
so a pack is exactly a text pack (zeropad.pack.collate: positions restarting at 0 per document, targets shifted
inside each document, cu_seqlens from `varlen_metadata`) plus the pack's images:
  - input_ids [1, T]: every image written as <boi> <image>*N <eoi>, the layout ChameleonProcessor produces,
    with N = (resolution / 2**(levels-1))**2 the VQ latent grid, the same for every image;
  - pixel_values [I, C, R, R]: all images of the pack in document order (the image processor resizes and
    center-crops every image, whatever its original size, to the VQ resolution R);
  - position_ids [1, T] and cu_seq_lens_q/k, max_length_q/k from the text packer.

The whole model takes zeropad_varlen: the VQ encoder's attention is a plain per-image bmm that never reads
`attn_implementation`, and images are encoded independently of each other (GroupNorm, convolutions).
The VQ codes are discrete (argmin), so no gradient reaches the VQ-VAE; the code rows of the shared embedding
do get gradients. Placeholder tokens are never targets (Chameleon's head masks image codes out of the logits).

Suffixes: T tokens of the pack, I images, C channels, R the VQ resolution.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import ChameleonImageProcessorPil, ChameleonProcessor

from zeropad.data.chat import Sample
from zeropad.errors import DataError, ZeropadError
from zeropad.model.attention import ATTN_NAME
from zeropad.pack.collate import IGNORE_INDEX, Pack, collate
from zeropad.verify import TOLERANCE, ExactnessReport, compare_passes, parameter_grads

# The image sentinels ChameleonProcessor inserts around each image when its tokenizer names none.
BOI_TOKEN, EOI_TOKEN = "<racm3:break>", "<eoss>"


@dataclass(frozen=True)
class ChameleonDoc(Sample):
    """A document whose images are already placeholders in its tokens; a Sample, so the text packer takes it."""

    pixel_values: torch.Tensor | None = None  # float [I_doc, C, R, R], in the order of the document's images

    @property
    def num_images(self) -> int:
        return 0 if self.pixel_values is None else int(self.pixel_values.shape[0])


def image_seq_length(config) -> int:
    """Tokens one image takes: the VQ latent grid, the resolution halved at every level but the last."""
    vq = config.vq_config
    side = vq.resolution // 2 ** (len(vq.channel_multiplier) - 1)
    return side * side


def image_placeholder(config) -> list[int]:
    """<boi> <image>*N <eoi> for one image, ids from the model's vocabulary map (the tokenizer's vocabulary)."""
    vocab = config.vocabulary_map
    return [vocab[BOI_TOKEN]] + [config.image_token_id] * image_seq_length(config) + [vocab[EOI_TOKEN]]


def image_processor(config) -> ChameleonImageProcessorPil:
    """The PIL-backend image processor (the torchvision one needs torchvision), sized to the VQ resolution:
    shortest edge resized to R, then an R x R center crop, so every image gives the same number of codes."""
    side = config.vq_config.resolution
    return ChameleonImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side})


def chameleon_processor(tokenizer, config) -> ChameleonProcessor:
    """Tokenizer + image processor, with the placeholder count the model's VQ grid needs."""
    return ChameleonProcessor(image_processor(config), tokenizer, image_seq_length=image_seq_length(config))


def _open_image(image: str | Path | Image.Image) -> Image.Image:
    return image if isinstance(image, Image.Image) else Image.open(image)


def image_pixels(image: str | Path | Image.Image, processor: ChameleonImageProcessorPil) -> torch.Tensor:
    """One image file or PIL image -> pixel_values [1, C, R, R] as the model takes them."""
    return processor(images=[_open_image(image)], return_tensors="pt")["pixel_values"]


def document_from_text(processor: ChameleonProcessor, text: str, images=()) -> ChameleonDoc:
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
    input_ids = np.asarray(ids, dtype=np.int32)
    return ChameleonDoc(input_ids, input_ids != processor.image_token_id, batch.get("pixel_values"))


def check_image_placeholders(doc: ChameleonDoc, config, file: str = "<in-memory>", record: int | None = None) -> None:
    """Each image must own one unbroken run of exactly N placeholders: the model only checks the total count,
    so a run split in two would silently give one image's codes to the wrong place."""
    is_placeholder = np.concatenate([[False], doc.input_ids == config.image_token_id, [False]])
    edges = np.flatnonzero(np.diff(is_placeholder.astype(np.int8)))
    runs = (edges[1::2] - edges[::2]).tolist()
    need = image_seq_length(config)
    if runs != [need] * doc.num_images:
        raise DataError(file, record, f"the document has image placeholder runs of lengths {runs}, but its "
                                      f"{doc.num_images} image(s) need {doc.num_images} run(s) of {need} tokens each")


@dataclass
class ChameleonPack:
    text: Pack  # tokens, positions, targets and document boundaries, exactly as for text
    pixel_values: torch.Tensor | None  # float [I, C, R, R]: all images of the pack in document order

    def to(self, device: torch.device | str) -> ChameleonPack:
        pixels = None if self.pixel_values is None else self.pixel_values.to(device, non_blocking=True)
        return ChameleonPack(self.text.to(device), pixels)

    def model_inputs(self) -> dict:
        """Keyword arguments for `ChameleonForConditionalGeneration.forward`: no attention mask, varlen kwargs."""
        inputs = self.text.model_inputs()
        if self.pixel_values is not None:
            inputs["pixel_values"] = self.pixel_values
        return inputs


def pack_chameleon(docs: list[ChameleonDoc], config) -> ChameleonPack:
    """Documents (with their images) -> one packed sequence; a document with misplaced placeholders is an error
    naming its index in the pack."""
    for i, doc in enumerate(docs):
        check_image_placeholders(doc, config, file="pack", record=i)
    images = [d.pixel_values for d in docs if d.num_images]
    return ChameleonPack(collate(docs), torch.cat(images) if images else None)


# -- exactness: packed (zeropad_varlen) == each document alone with eager attention -------------------------------


def packed_forward_backward(model, docs: list[ChameleonDoc]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits [T, V] of the packed sequence and the gradients of its summed token loss."""
    if model.config._attn_implementation != ATTN_NAME:
        raise ValueError(f"a packed Chameleon needs attn_implementation={ATTN_NAME!r}, "
                         f"got {model.config._attn_implementation!r}; call model.set_attn_implementation(...)")
    model.zero_grad(set_to_none=True)
    pack = pack_chameleon(docs, model.config).to(next(model.parameters()).device)
    logits = model(**pack.model_inputs()).logits[0]
    F.cross_entropy(logits.float(), pack.text.target_ids[0], ignore_index=IGNORE_INDEX, reduction="sum").backward()
    return logits.detach(), parameter_grads(model)


def reference_forward_backward(model, docs: list[ChameleonDoc]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Each document alone, unpadded, with its own images and the model's default positions and mask."""
    model.zero_grad(set_to_none=True)
    device = next(model.parameters()).device
    all_logits = []
    for doc in docs:
        alone = collate([doc]).to(device)  # only for its targets: one document's shifted, masked next tokens
        pixels = None if doc.pixel_values is None else doc.pixel_values.to(device)
        logits = model(input_ids=alone.input_ids, pixel_values=pixels).logits[0]
        F.cross_entropy(logits.float(), alone.target_ids[0], ignore_index=IGNORE_INDEX, reduction="sum").backward()
        all_logits.append(logits.detach())
    return torch.cat(all_logits), parameter_grads(model)


def check_chameleon_exactness(model, docs: list[ChameleonDoc], tolerance: float = TOLERANCE) -> ExactnessReport:
    """Packed (zeropad_varlen) against per-document eager, on the same fp32 weights."""
    return compare_passes(model, lambda: reference_forward_backward(model, docs),
                          lambda: packed_forward_backward(model, docs), ATTN_NAME, [len(d) for d in docs],
                          tolerance)
