"""Image conversations -> VisionDoc: tokens with every image placeholder expanded to its exact number of
visual tokens, the assistant-only loss mask, and the image processor's pixel_values and image_grid_thw.

Two record shapes are read:
  (a) `messages` (or any format of zeropad.data.formats) whose text holds `<image>` placeholders, with an
      `images` list of paths relative to the data file (the shape of LLaMA-Factory's mllm_demo.json);
  (b) OpenAI-style content parts: a message's content is a list of {"type": "text", "text": ...},
      {"type": "image_url", "image_url": {"url": "path or file://..."}} or {"type": "image", "image": path}.
Shape (b) is rewritten into shape (a), so one path checks and tokenizes both.

Each `<image>` becomes `<|vision_start|><|image_pad|><|vision_end|>` (the token strings of the model config's
ids) before the chat template renders the conversation, exactly as Qwen-VL chat templates render an image
part; zeropad.data.chat then tokenizes and masks, and each image's single pad token is expanded afterwards.
Placeholder tokens are never targets.

Lengths before packing come from image headers only: PIL's `Image.open` reads the size without decoding
pixels, and the processor's own resize rule (`smart_resize`) gives the patch grid.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

# The PIL-backend module: the torchvision one (image_processing_qwen2_vl) does not import without torchvision.
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

from zeropad.data.chat import Sample, tokenize_conversation
from zeropad.data.formats import Text, to_conversation
from zeropad.data.sources import iter_records, json_type
from zeropad.errors import DataError, ZeropadError
from zeropad.model.vlm import VisionDoc, num_image_tokens

IMAGE_PLACEHOLDER = "<image>"


class BadImageError(ZeropadError):
    """One image cannot be used; the caller adds the data file and record."""


def image_grid(width: int, height: int, processor) -> tuple[int, int, int]:
    """(t, h, w) patch grid the processor gives an image of this size (t = 1 for a still image)."""
    factor = processor.patch_size * processor.merge_size
    try:
        resized_h, resized_w = smart_resize(height, width, factor=factor, min_pixels=processor.size["shortest_edge"],
                                            max_pixels=processor.size["longest_edge"])
    except ValueError as err:  # aspect ratio beyond 200:1
        raise BadImageError(f"{width}x{height}: {err}") from None
    return 1, resized_h // processor.patch_size, resized_w // processor.patch_size


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) from the image header, without decoding pixels; BadImageError if unusable."""
    with _open(path) as image:
        return image.size


def visual_token_count(image_path: str | Path, processor) -> int:
    """Visual tokens the image takes in the text, from its header size and the processor's resize rule."""
    return num_image_tokens(image_grid(*image_size(image_path), processor), processor.merge_size)


def load_image(path: str | Path) -> Image.Image:
    """The decoded RGB image; BadImageError if missing, unreadable, empty or corrupt (also past the header)."""
    with _open(path) as image:
        try:
            return image.convert("RGB")
        except (OSError, ValueError, SyntaxError) as err:  # truncated or damaged pixel data
            raise BadImageError(f"corrupt image data: {err}") from None


def _open(path: str | Path) -> Image.Image:
    path = Path(path)
    if not path.exists():
        raise BadImageError("no such file")
    if not path.is_file():
        raise BadImageError("not a file")
    try:
        if path.stat().st_size == 0:
            raise BadImageError("empty file (0 bytes)")
        image = Image.open(path)
    except UnidentifiedImageError:
        raise BadImageError("not an image format PIL can read (corrupt or not an image)") from None
    except OSError as err:
        raise BadImageError(f"cannot read: {err.strerror or err}") from None
    if min(image.size) <= 0:
        image.close()
        raise BadImageError(f"zero-size image ({image.size[0]}x{image.size[1]})")
    return image


@dataclass(frozen=True)
class ImageConversation:
    """A checked record: text tokens with one pad token per image, and the images' resolved paths."""

    sample: Sample  # ids with <|vision_start|><|image_pad|><|vision_end|> per image, not yet expanded
    image_refs: tuple[str, ...]  # as written in the record, for messages
    image_paths: tuple[Path, ...]


def read_image_conversation(record: dict, tokenizer, config, *, file: str, record_no: int, fmt: str = "auto",
                            train_on_prompt: bool = False) -> ImageConversation:
    """Check and tokenize a record of shape (a) or (b); DataError names the file, record and what is wrong."""
    record, refs = _with_placeholders(record, file, record_no)
    conversation = to_conversation(record, fmt, file, record_no)
    if isinstance(conversation, Text):
        raise DataError(file, record_no, "a pretraining 'text' record cannot carry images; use messages")
    num_placeholders = sum(m.content.count(IMAGE_PLACEHOLDER) for m in conversation.messages)
    if num_placeholders != len(refs):
        raise DataError(file, record_no, f"{num_placeholders} {IMAGE_PLACEHOLDER} placeholder(s) in the text but "
                                         f"{len(refs)} image(s) in 'images'; they must match one to one")
    marker_tokens = tokenizer.convert_ids_to_tokens(
        [config.vision_start_token_id, config.image_token_id, config.vision_end_token_id])
    if None in marker_tokens:
        raise ZeropadError("the tokenizer has no tokens for the model's vision_start/image/vision_end ids; "
                           "add the vision special tokens to the tokenizer")
    marker = "".join(marker_tokens)
    conversation = type(conversation)(tuple(
        type(m)(m.role, m.content.replace(IMAGE_PLACEHOLDER, marker)) for m in conversation.messages))
    sample = tokenize_conversation(conversation, tokenizer, train_on_prompt)
    _check_markers(sample.input_ids, len(refs), config, file, record_no)
    base = Path(file).parent
    paths = tuple(_resolve(ref, base) for ref in refs)
    return ImageConversation(sample, tuple(refs), paths)


def vision_doc_length(conv: ImageConversation, processor, *, file: str, record_no: int) -> int:
    """Exact token count of the VisionDoc this conversation becomes, from image headers only."""
    counts = []
    for i in range(len(conv.image_paths)):
        with _naming_image(conv, i, file, record_no) as path:
            counts.append(visual_token_count(path, processor))
    return len(conv.sample) - len(counts) + sum(counts)


def to_vision_doc(conv: ImageConversation, processor, config, *, file: str, record_no: int) -> VisionDoc:
    """Decode the images, run the image processor and expand each pad token to its exact visual token count."""
    _check_processor(processor, config)
    ids = torch.from_numpy(conv.sample.input_ids.astype(np.int64))
    mask = torch.from_numpy(conv.sample.loss_mask)
    placeholder = (ids == config.vision_start_token_id) | (ids == config.image_token_id) | (
        ids == config.vision_end_token_id)
    mask = mask & ~placeholder
    if not conv.image_paths:
        return VisionDoc(ids, mask)
    images, grids = [], []
    for i in range(len(conv.image_paths)):
        with _naming_image(conv, i, file, record_no) as path:
            images.append(load_image(path))
            grids.append(image_grid(*images[-1].size, processor))  # before the processor: names a bad size's image
    batch = processor(images=images, return_tensors="pt")
    grid_thw = batch["image_grid_thw"].long()
    assert grid_thw.tolist() == [list(g) for g in grids], "header-based grids must equal the processor's"
    repeats = torch.ones_like(ids)
    repeats[ids == config.image_token_id] = torch.tensor(
        [num_image_tokens(g, config.vision_config.spatial_merge_size) for g in grid_thw])
    return VisionDoc(ids.repeat_interleave(repeats), mask.repeat_interleave(repeats), batch["pixel_values"], grid_thw)


def record_to_vision_doc(record: dict, tokenizer, processor, config, *, file: str, record_no: int,
                         fmt: str = "auto", train_on_prompt: bool = False) -> VisionDoc:
    """One record straight to a VisionDoc (read_image_conversation, then to_vision_doc)."""
    conv = read_image_conversation(record, tokenizer, config, file=file, record_no=record_no, fmt=fmt,
                                   train_on_prompt=train_on_prompt)
    return to_vision_doc(conv, processor, config, file=file, record_no=record_no)


def iter_vision_docs(path: str | Path, tokenizer, processor, config, *, fmt: str = "auto",
                     train_on_prompt: bool = False) -> Iterator[tuple[int, VisionDoc | DataError]]:
    """(record number, VisionDoc or the DataError saying why that record is unusable) for a data file, so the
    caller's on_bad_sample policy decides; image paths are relative to the file."""
    file = str(path)
    for record_no, record in iter_records(path):
        if isinstance(record, DataError):
            yield record_no, record
            continue
        try:
            yield record_no, record_to_vision_doc(record, tokenizer, processor, config, file=file,
                                                  record_no=record_no, fmt=fmt, train_on_prompt=train_on_prompt)
        except DataError as err:
            yield record_no, err


@contextmanager
def _naming_image(conv: ImageConversation, i: int, file: str, record_no: int) -> Iterator[Path]:
    """Image i's path; a BadImageError inside becomes a DataError naming the file, record and image."""
    try:
        yield conv.image_paths[i]
    except BadImageError as err:
        raise DataError(file, record_no, f"image {i + 1} of {len(conv.image_paths)} ('{conv.image_refs[i]}', "
                                         f"{conv.image_paths[i]}): {err}") from None


def _check_processor(processor, config) -> None:
    vision = config.vision_config
    ours = (processor.patch_size, processor.merge_size, processor.temporal_patch_size)
    model = (vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size)
    if ours != model:
        raise ZeropadError(
            f"the image processor (patch_size, merge_size, temporal_patch_size = {ours}) does not match the model's "
            f"vision config ({model}); use the model's preprocessor_config.json")


def _check_markers(ids: np.ndarray, num_images: int, config, file: str, record_no: int) -> None:
    """Each image must have become exactly <start> <pad> <end>: the tokenizer knows the vision tokens and the
    text holds none of them literally."""
    pads = np.flatnonzero(ids == config.image_token_id)
    if len(pads) != num_images:
        if num_images and not len(pads):
            raise ZeropadError(f"the tokenizer does not encode the model's image token (id {config.image_token_id}) "
                               "as one token; add the vision special tokens to the tokenizer")
        raise DataError(file, record_no, f"the text holds {len(pads) - num_images} literal image token(s) "
                                         f"besides its {num_images} {IMAGE_PLACEHOLDER} placeholder(s)")
    ok = all(0 < p < len(ids) - 1 and ids[p - 1] == config.vision_start_token_id
             and ids[p + 1] == config.vision_end_token_id for p in pads)
    if not ok:
        raise ZeropadError("the tokenizer does not encode <vision_start><image><vision_end> as the model config's "
                           "three token ids; check vision_start_token_id / vision_end_token_id")


def _resolve(ref: str, base: Path) -> Path:
    if ref.startswith("file://"):
        ref = unquote(ref[len("file://"):])
    path = Path(ref)
    return path if path.is_absolute() else base / path


def _with_placeholders(record: dict, file: str, record_no: int) -> tuple[dict, list[str]]:
    """The record with content parts (shape b) rewritten as text with <image> placeholders, and its image refs."""
    images = record.get("images") or []
    if not isinstance(images, list) or not all(isinstance(x, str) for x in images):
        raise DataError(file, record_no, "field 'images' must be a list of path strings")
    messages = record.get("messages")
    if not isinstance(messages, list) or not any(isinstance(m, dict) and isinstance(m.get("content"), list)
                                                 for m in messages):
        return record, list(images)
    if images:
        raise DataError(file, record_no, "images given both as content parts and in 'images'; use one of them")
    rewritten, refs = [], []
    for i, message in enumerate(messages, start=1):
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            rewritten.append(message)
            continue
        texts = []
        for j, part in enumerate(content, start=1):
            where = f"messages[{i}].content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif kind in ("image_url", "image"):
                refs.append(_part_ref(part, kind, where, file, record_no))
                texts.append(IMAGE_PLACEHOLDER)
            else:
                got = f"type '{kind}'" if isinstance(kind, str) else f"a JSON {json_type(part)}"
                raise DataError(file, record_no, f"{where} must be a text, image_url or image part, got {got}")
        rewritten.append({**message, "content": "".join(texts)})
    return {**record, "messages": rewritten}, refs


def _part_ref(part: dict, kind: str, where: str, file: str, record_no: int) -> str:
    value = part.get(kind)
    url = value.get("url") if kind == "image_url" and isinstance(value, dict) else value
    if not isinstance(url, str) or not url:
        shape = "a path string" + (" or {'url': path}" if kind == "image_url" else "")
        raise DataError(file, record_no, f"{where} has no image path ('{kind}' must be {shape})")
    if url.startswith("data:") or ("://" in url and not url.startswith("file://")):
        raise DataError(file, record_no, f"{where}: only local image files are read (a path or file:// URL), "
                                         f"got '{url[:40]}'; download remote or inline images first")
    return url
