"""Packed, padding-free forward for Qwen-style VLMs (Qwen2.5-VL, Qwen3-VL) through their public inputs.

A multimodal pack is one flat sequence [1, T] of documents, each with zero or more images. It carries:
  - input_ids [1, T]: every document's tokens, image placeholders already expanded to their exact count;
  - pixel_values [P, C*tp*p*p] and image_grid_thw [I, 3]: all images of the pack, in document order;
  - position_ids [3, 1, T]: multimodal RoPE (temporal, height, width), computed per document with the
    model's own `get_rope_index`, so positions restart in every document;
  - cu_seq_lens_q/k, max_length_q/k: document boundaries for the language model (zeropad_varlen).

Attention is chosen per sub-model (`attn_implementation` dict): the language model gets zeropad_varlen;
the vision tower keeps a stock backend ("sdpa" by default). The vision tower already builds its own
per-image (and, in Qwen2.5-VL, per-window) cu_seqlens from image_grid_thw and runs each segment
bidirectionally, so images attend within themselves only and no change to our attention is needed.
It must NOT get zeropad_varlen: transformers' non-flash vision path calls the attention once per image
with the caller's kwargs, which hold the *text* boundaries (checked in `check_attn_implementation`).

Suffixes: T tokens of the pack, P image patches, I images.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from zeropad.model.attention import ATTN_NAME
from zeropad.pack.collate import IGNORE_INDEX, varlen_kwargs, varlen_metadata
from zeropad.verify import TOLERANCE, ExactnessReport, compare_passes

TEXT, IMAGE, VIDEO = 0, 1, 2  # mm_token_type_ids values, as transformers' Qwen VL models expect


def packed_attn_implementation(vision: str = "sdpa") -> dict[str, str]:
    """`attn_implementation` for a packed VLM: varlen for the language model, a stock backend for the vision
    tower (it does its own per-image segmentation)."""
    if vision == ATTN_NAME:
        raise ValueError(f"the vision tower cannot use {ATTN_NAME}: use 'sdpa', 'eager' or a flash backend")
    return {"text_config": ATTN_NAME, "vision_config": vision}


def check_attn_implementation(model) -> None:
    text_impl = model.config.text_config._attn_implementation
    vision_impl = model.config.vision_config._attn_implementation
    if text_impl != ATTN_NAME or vision_impl == ATTN_NAME:
        raise ValueError(
            f"a packed VLM needs attn_implementation={packed_attn_implementation()} "
            f"(got text {text_impl!r}, vision {vision_impl!r}); call model.set_attn_implementation(...)"
        )


@dataclass
class VisionDoc:
    """One document: its tokens (placeholders expanded), which of them are targets, and its images."""

    input_ids: torch.Tensor  # int64 [n]
    loss_mask: torch.Tensor  # bool [n]: token is a training target (predicted from the token before it)
    pixel_values: torch.Tensor | None = None  # [P_doc, C*tp*p*p]
    image_grid_thw: torch.Tensor | None = None  # int64 [I_doc, 3]

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_images(self) -> int:
        return 0 if self.image_grid_thw is None else int(self.image_grid_thw.shape[0])


def num_image_tokens(grid_thw, spatial_merge_size: int) -> int:
    """Visual tokens one image takes in the text: t*h*w patches merged merge x merge."""
    t, h, w = (int(x) for x in grid_thw)
    return t * h * w // spatial_merge_size**2


def image_placeholder(config, grid_thw) -> list[int]:
    """<vision_start> <image>*n <vision_end> for one image of grid (t, h, w)."""
    n = num_image_tokens(grid_thw, config.vision_config.spatial_merge_size)
    return [config.vision_start_token_id] + [config.image_token_id] * n + [config.vision_end_token_id]


def mm_token_type_ids(input_ids: torch.Tensor, config) -> torch.Tensor:
    """0 text, 1 image, 2 video per token, the modality map `get_rope_index` reads."""
    types = torch.full_like(input_ids, TEXT, dtype=torch.int32)
    types[input_ids == config.image_token_id] = IMAGE
    types[input_ids == config.video_token_id] = VIDEO
    return types


def _base(model):
    """The `*VLModel` that owns `get_rope_index` (ForConditionalGeneration wraps it as `.model`)."""
    inner = getattr(model, "model", model)
    return inner if hasattr(inner, "get_rope_index") else model


def mrope_position_ids(model, docs: list[VisionDoc]) -> torch.Tensor:
    """[3, 1, T] multimodal RoPE positions: the model's own `get_rope_index` on each document alone, concatenated,
    so every document starts at 0 exactly as when it runs unpacked."""
    config = model.config
    parts = []
    for doc in docs:
        ids = doc.input_ids[None]
        grids = doc.image_grid_thw if doc.num_images else []
        expected = sum(num_image_tokens(g, config.vision_config.spatial_merge_size) for g in grids)
        found = int((doc.input_ids == config.image_token_id).sum())
        if found != expected:
            raise ValueError(f"a document has {found} image tokens but its {doc.num_images} images need {expected}")
        if doc.num_images == 0:
            parts.append(torch.arange(len(doc), device=ids.device).view(1, 1, -1).expand(3, 1, -1))
            continue
        pos, _ = _base(model).get_rope_index(ids, mm_token_type_ids=mm_token_type_ids(ids, config),
                                             image_grid_thw=doc.image_grid_thw)
        parts.append(pos)
    return torch.cat(parts, dim=2)


@dataclass
class MultimodalPack:
    input_ids: torch.Tensor  # int64 [1, T]
    position_ids: torch.Tensor  # int64 [3, 1, T], restarting per document
    target_ids: torch.Tensor  # int64 [1, T]: next token inside the document, or IGNORE_INDEX
    pixel_values: torch.Tensor | None  # [P, C*tp*p*p], all images of the pack in order
    image_grid_thw: torch.Tensor | None  # int64 [I, 3]
    cu_seqlens: torch.Tensor  # int32 [n_docs+1]
    max_seqlen: int
    doc_lengths: list[int]

    @property
    def num_targets(self) -> int:
        return int((self.target_ids != IGNORE_INDEX).sum())

    def to(self, device: torch.device | str) -> MultimodalPack:
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return MultimodalPack(move(self.input_ids), move(self.position_ids), move(self.target_ids),
                              move(self.pixel_values), move(self.image_grid_thw), move(self.cu_seqlens),
                              self.max_seqlen, self.doc_lengths)

    def model_inputs(self) -> dict:
        """Keyword arguments for `*VLForConditionalGeneration.forward`: no attention mask, varlen kwargs instead."""
        inputs = dict(input_ids=self.input_ids, position_ids=self.position_ids,
                      **varlen_kwargs(self.cu_seqlens, self.max_seqlen))
        if self.pixel_values is not None:
            inputs.update(pixel_values=self.pixel_values, image_grid_thw=self.image_grid_thw)
        return inputs


def document_targets(doc: VisionDoc) -> torch.Tensor:
    """int64 [n]: token t predicts token t+1 of the same document where that token is a target."""
    targets = torch.full_like(doc.input_ids, IGNORE_INDEX)
    targets[:-1] = torch.where(doc.loss_mask[1:], doc.input_ids[1:], IGNORE_INDEX)
    return targets


def pack_multimodal(docs: list[VisionDoc], model) -> MultimodalPack:
    """Documents (with their images) -> one packed sequence for `model` (a Qwen2.5-VL / Qwen3-VL model)."""
    assert docs, "a pack holds at least one document"
    lengths = [len(d) for d in docs]
    with_images = [d for d in docs if d.num_images]
    cu_seqlens, max_seqlen = varlen_metadata(lengths)
    return MultimodalPack(
        input_ids=torch.cat([d.input_ids for d in docs])[None],
        position_ids=mrope_position_ids(model, docs),
        target_ids=torch.cat([document_targets(d) for d in docs])[None],
        pixel_values=torch.cat([d.pixel_values for d in with_images]) if with_images else None,
        image_grid_thw=torch.cat([d.image_grid_thw for d in with_images]) if with_images else None,
        cu_seqlens=cu_seqlens,
        max_seqlen=max_seqlen,
        doc_lengths=lengths,
    )


# -- exactness: packed (varlen text, per-image vision) == each document alone with eager attention ----------------


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def packed_forward_backward(model, docs: list[VisionDoc]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits [T, V] of the packed sequence and the gradients of its summed token loss."""
    check_attn_implementation(model)
    model.zero_grad(set_to_none=True)
    pack = pack_multimodal(docs, model).to(next(model.parameters()).device)
    logits = model(**pack.model_inputs()).logits[0]
    F.cross_entropy(logits.float(), pack.target_ids[0], ignore_index=IGNORE_INDEX, reduction="sum").backward()
    return logits.detach(), _grads(model)


def reference_forward_backward(model, docs: list[VisionDoc]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Each document alone, unpadded, its own images; the model computes its own 3D positions
    (from mm_token_type_ids), so the reference does not depend on `mrope_position_ids`."""
    model.zero_grad(set_to_none=True)
    device = next(model.parameters()).device
    all_logits = []
    for doc in docs:
        ids = doc.input_ids[None].to(device)
        inputs = dict(input_ids=ids)
        if doc.num_images:
            inputs.update(pixel_values=doc.pixel_values.to(device), image_grid_thw=doc.image_grid_thw.to(device),
                          mm_token_type_ids=mm_token_type_ids(ids, model.config))
        logits = model(**inputs).logits[0]
        targets = document_targets(doc).to(device)
        F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum").backward()
        all_logits.append(logits.detach())
    return torch.cat(all_logits), _grads(model)


def check_multimodal_exactness(model, docs: list[VisionDoc], tolerance: float = TOLERANCE,
                               vision_attn: str = "sdpa") -> ExactnessReport:
    """Packed (text zeropad_varlen, vision `vision_attn`) against per-document eager, on the same fp32 weights."""
    packed_attn = packed_attn_implementation(vision_attn)
    return compare_passes(model, lambda: reference_forward_backward(model, docs),
                          lambda: packed_forward_backward(model, docs), packed_attn, [len(d) for d in docs],
                          tolerance, restore_attn=packed_attn)
