"""Image and video conversations -> one document (a `Sample` with media): tokens with every image and video placeholder expanded to its
exact tokens, the assistant-only loss mask, and the processor's pixel_values / image_grid_thw and
pixel_values_videos / video_grid_thw (+ second_per_grid_ts for Qwen2.5-VL).

Records hold `<image>` / `<video>` placeholders with `images` / `videos` path lists, or OpenAI-style content
parts, mixed freely (zeropad.data.media_parts rewrites both shapes to the first).

Each `<image>` becomes the model family's image marker (zeropad.family.MediaFamily) before the chat template
renders the conversation, exactly as the model's own template renders an image part:
  Qwen-VL   <|vision_start|><|image_pad|><|vision_end|>
  Kimi      <|media_begin|>image<|media_content|><|media_pad|><|media_end|>
(the start / pad / end strings are those of the config's token ids); each `<video>` likewise becomes
<|vision_start|><|video_pad|><|vision_end|> (Qwen only: Kimi takes no videos yet). zeropad.data.chat then
tokenizes and masks, and each single pad token is expanded afterwards: an image's to its visual tokens, a
video's to what its processor writes (zeropad.data.video.VideoClip.token_ids: Qwen3-VL adds timestamp text).
Marker and timestamp tokens are never targets.

Lengths before packing come from image headers and video metadata only: PIL's `Image.open` reads the size
without decoding pixels, and the processor's own resize rule gives the patch grid: Qwen's `smart_resize`, or
Kimi's `navit_resize` (shrink to a patch budget, pad to whole merged tokens). Kimi's image processor exists in
transformers only as a torchvision processor; zeropad.data.kimi_image restates its rule and its pipeline
(Kimi_K25ImageProcessorPil), and the tests check both against transformers' own code. A video is planned from
its container metadata when the record is read (`plan_video`: frames, timestamps), and decoded only in `to_vision_doc`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError
from transformers.image_transforms import convert_to_rgb

# The PIL-backend module: the torchvision one (image_processing_qwen2_vl) does not import without torchvision.
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

from zeropad.config import VideoConfig
from zeropad.data.chat import Sample, tokenize_conversation
from zeropad.data.formats import Text, to_conversation
from zeropad.data.kimi_image import navit_resize
from zeropad.data.media_parts import IMAGE_PLACEHOLDER  # noqa: F401  (part of this module's API)
from zeropad.data.media_parts import PLACEHOLDERS, MediaRefs, resolve, with_placeholders
from zeropad.data.sources import iter_records
from zeropad.data.video import BadVideoError, VideoClip, plan_video
from zeropad.errors import DataError, ZeropadError
from zeropad.family import MediaFamily, num_image_tokens, vision_family


class BadImageError(ZeropadError):
    """One image cannot be used; the caller adds the data file and record."""


def image_grid(width: int, height: int, processor) -> tuple[int, int, int]:
    """(t, h, w) patch grid the processor gives an image of this size (t = 1 for a still image)."""
    if _uses_navit_resize(processor):
        return (1, *_navit_grid(height, width, processor))
    factor = processor.patch_size * processor.merge_size
    try:
        resized_h, resized_w = smart_resize(height, width, factor=factor, min_pixels=processor.size["shortest_edge"],
                                            max_pixels=processor.size["longest_edge"])
    except ValueError as err:  # aspect ratio beyond 200:1
        raise BadImageError(f"{width}x{height}: {err}") from None
    return 1, resized_h // processor.patch_size, resized_w // processor.patch_size


def _uses_navit_resize(processor) -> bool:
    """Kimi's image processor (Kimi_K25ImageProcessor, or zeropad's Kimi_K25ImageProcessorPil) bounds images by a
    patch budget, `max_patches`."""
    return getattr(processor, "max_patches", None) is not None


def _navit_grid(height: int, width: int, processor) -> tuple[int, int]:
    """(h, w) patches of Kimi's image processor: `navit_resize` (zeropad.data.kimi_image, transformers' rule)
    shrinks the image to the patch budget and pads it to whole merge_size x merge_size blocks of patches."""
    patch = processor.patch_size
    _, (pad_h, pad_w) = navit_resize(height, width, patch, processor.merge_size, processor.max_patches,
                                     processor.size["max_height"])
    return pad_h // patch, pad_w // patch


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) as the image is shown (its EXIF orientation applied), from the header, without decoding
    pixels; BadImageError if unusable."""
    with _open(path) as image:
        width, height = image.size
        return (height, width) if _orientation(image) in (5, 6, 7, 8) else (width, height)  # turned a quarter


def visual_token_count(image_path: str | Path, processor, fixed: int | None = None) -> int:
    """Visual tokens the image takes in the text, from its header size and the processor's resize rule (early
    fusion: `fixed`, the header still read so a bad image is named before training)."""
    size = image_size(image_path)
    if fixed is not None:
        return fixed
    return num_image_tokens(image_grid(*size, processor), processor.merge_size)


def load_image(path: str | Path) -> Image.Image:
    """The decoded RGB image as it is shown: EXIF orientation applied (as transformers' and qwen-vl-utils'
    loaders do), transparency composited onto white (transformers' convert_to_rgb); BadImageError if missing,
    unreadable, empty or corrupt (also past the header), or of more than 8 bits a value (clipping would lose it)."""
    with _open(path) as image:
        try:
            image.load()
        except (OSError, ValueError, SyntaxError) as err:  # truncated or damaged pixel data
            raise BadImageError(f"corrupt image data: {err}") from None
        if image.mode.startswith(("I", "F")) and image.getextrema()[1] > 255:
            raise BadImageError(f"{image.mode} pixels (values up to {image.getextrema()[1]:g}): RGB keeps 8 bits, so "
                                "every value above 255 would turn white; convert the image to 8 bits first")
        if _orientation(image) != 1:
            image = ImageOps.exif_transpose(image)
        return Image.fromarray(convert_to_rgb(image, return_numpy=True))


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation (1: as stored) the header gives. A PNG's eXIf chunk counts only when it comes before
    the pixels (reading one after them decodes the image): the size planned from the header and the loaded
    image then agree."""
    if image.format == "PNG" and "exif" not in image.info:
        return 1
    return image.getexif().get(ExifTags.Base.Orientation, 1)


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
    except Image.DecompressionBombError as err:  # not an OSError: it would stop the whole data load
        raise BadImageError(f"too large to decode safely ({err})") from None
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
    """A checked record: text tokens with one pad token per image and per video, the images' resolved paths and
    the videos' plans (made from their metadata)."""

    sample: Sample  # ids with one marker (one pad token) per image and video, not yet expanded; markers not targets
    image_refs: tuple[str, ...]  # as written in the record, for messages
    image_paths: tuple[Path, ...]
    videos: tuple[VideoClip, ...] = ()
    fixed_image_tokens: int | None = None  # early fusion: every image takes this many tokens, whatever its size


def read_image_conversation(record: dict, tokenizer, config, *, file: str, record_no: int, fmt: str = "auto",
                            train_on_prompt: bool = False, video: VideoConfig | None = None,
                            template_kwargs: dict | None = None) -> ImageConversation:
    """Check and tokenize a record of shape (a) or (b) and plan its videos from their metadata with `video`'s fps,
    max_frames and max_pixels (default: VideoConfig()); DataError names the file, record and what is wrong."""
    record, refs = with_placeholders(record, file, record_no)
    conversation = to_conversation(record, fmt, file, record_no)
    if isinstance(conversation, Text):
        raise DataError(file, record_no, "a pretraining 'text' record cannot carry images or videos; use messages")
    family = _family(config)
    if any(m.role == "assistant" and PLACEHOLDERS["image"] in m.content for m in conversation.messages):
        why = ("transformers has no decoder for its VQ image tokens" if family.fixed_image_tokens is not None
               else "it writes text only")
        raise DataError(file, record_no, f"an image in an assistant turn would be a generation target, which "
                        f"{family.model_type} cannot learn ({why}); images belong in user turns (Emu3 trains "
                        "images as targets)")
    if refs.videos and family.video_token_id is None:
        raise ZeropadError(f"{file}, record {record_no}: {family.model_type} models take no videos yet; remove "
                           "the videos or train a Qwen2.5-VL / Qwen3-VL model")
    sample = _tokenize_with_markers(conversation, refs, tokenizer, family, train_on_prompt, file, record_no,
                                    template_kwargs)
    settings = video or VideoConfig()
    clips = []
    for i, ref in enumerate(refs.videos):
        path = resolve(ref, file)
        with _naming("video", i, refs.videos, path, file, record_no):
            clips.append(plan_video(ref, path, config, tokenizer, settings))
    return ImageConversation(sample, refs.images, tuple(resolve(ref, file) for ref in refs.images), tuple(clips),
                             family.fixed_image_tokens)


def _tokenize_with_markers(conversation, refs: MediaRefs, tokenizer, family: MediaFamily, train_on_prompt: bool,
                           file: str, record_no: int, template_kwargs: dict | None) -> Sample:
    """The conversation tokenized with each placeholder rendered as its marker; no marker token is a target."""
    num_refs = {"image": len(refs.images), "video": len(refs.videos)}
    for medium, count in num_refs.items():
        found = sum(m.content.count(PLACEHOLDERS[medium]) for m in conversation.messages)
        if found != count:
            raise DataError(file, record_no, f"{found} {PLACEHOLDERS[medium]} placeholder(s) in the text but "
                                             f"{count} {medium}(s) in '{medium}s'; they must match one to one")
    markers = [MediaMarker.of(tokenizer, family, "image")]
    if refs.videos:
        markers.append(MediaMarker.of(tokenizer, family, "video"))
    messages = []
    for m in conversation.messages:
        for marker in markers:
            m = dataclasses.replace(m, content=m.content.replace(PLACEHOLDERS[marker.medium], marker.text))
        messages.append(m)
    sample = tokenize_conversation(dataclasses.replace(conversation, messages=tuple(messages)), tokenizer,
                                   train_on_prompt, template_kwargs)
    if not refs.videos and family.video_token_id is not None:  # a literal <|video_pad|> would pass as a video's
        _pad_positions(sample.input_ids, family.video_token_id, "video", 0, file, record_no)
    is_marker = np.zeros(len(sample.input_ids), dtype=bool)
    for marker in markers:
        is_marker |= marker.locate(sample.input_ids, num_refs[marker.medium], file, record_no)
    return Sample(sample.input_ids, sample.loss_mask & ~is_marker)


def vision_doc_length(conv: ImageConversation, processor, *, file: str, record_no: int) -> int:
    """Exact token count of the document this conversation becomes, from image headers and video metadata only."""
    counts = []
    for i, path in enumerate(conv.image_paths):
        with _naming("image", i, conv.image_refs, path, file, record_no):
            counts.append(visual_token_count(path, processor, conv.fixed_image_tokens))
    for i, clip in enumerate(conv.videos):
        with _naming("video", i, [c.ref for c in conv.videos], clip.path, file, record_no):
            counts.append(len(clip.token_ids(clip.grid(processor))))
    return len(conv.sample) - len(counts) + sum(counts)


def to_vision_doc(conv: ImageConversation, processor, config, *, file: str, record_no: int) -> Sample:
    """Decode the images and videos, run the image processor and expand each pad token to its exact tokens."""
    family = _family(config)
    _check_processor(processor, family)
    media, runs = {}, {}  # the document's media; pad id -> the tokens each of its pads becomes, in order
    if conv.image_paths and family.fixed_image_tokens is not None:  # early fusion: N VQ codes per image
        images = []
        for i, path in enumerate(conv.image_paths):
            with _naming("image", i, conv.image_refs, path, file, record_no):
                images.append(load_image(path))
        media["pixel_values"] = processor(images=images, return_tensors="pt")["pixel_values"]
        runs[family.image_token_id] = [[family.image_token_id] * family.fixed_image_tokens] * len(images)
    elif conv.image_paths:
        images, grids = [], []
        for i, path in enumerate(conv.image_paths):
            with _naming("image", i, conv.image_refs, path, file, record_no):
                images.append(load_image(path))
                grids.append(image_grid(*images[-1].size, processor))  # before the processor: names a bad size
        batch = processor(images=images, return_tensors="pt")
        grid_thw = batch["image_grid_thw"].long()
        assert grid_thw.tolist() == [list(g) for g in grids], "header-based grids must equal the processor's"
        runs[family.image_token_id] = [[family.image_token_id] * family.num_image_tokens(g) for g in grid_thw]
        media.update(pixel_values=batch["pixel_values"], image_grid_thw=grid_thw)
    if conv.videos:
        pixels, grids = [], []
        for i, clip in enumerate(conv.videos):
            with _naming("video", i, [c.ref for c in conv.videos], clip.path, file, record_no):
                clip_pixels, clip_grid = clip.pixels(processor)
            assert clip_grid[0].tolist() == list(clip.grid(processor)), "metadata grids must equal the decoded ones"
            pixels.append(clip_pixels)
            grids.append(clip_grid)
        runs[family.video_token_id] = [clip.token_ids(g[0]) for clip, g in zip(conv.videos, grids)]
        media.update(pixel_values_videos=torch.cat(pixels), video_grid_thw=torch.cat(grids))
        if conv.videos[0].second_per_grid is not None:  # Qwen2.5-VL
            media["second_per_grid_ts"] = torch.tensor([c.second_per_grid for c in conv.videos], dtype=torch.float32)
    input_ids, loss_mask = _expand_pads(conv.sample.input_ids.astype(np.int64), conv.sample.loss_mask, runs)
    return Sample(input_ids, loss_mask, media)


def _expand_pads(ids: np.ndarray, mask: np.ndarray, runs: dict[int, list[list[int]]]
                 ) -> tuple[np.ndarray, np.ndarray]:
    """ids and loss mask with the k-th pad of each pad id replaced by runs[pad id][k]; no run token is a target."""
    queues = {pad: iter(pad_runs) for pad, pad_runs in runs.items()}
    id_parts, mask_parts, start = [], [], 0
    for p in np.flatnonzero(np.isin(ids, list(runs))):
        run = np.asarray(next(queues[int(ids[p])]), dtype=np.int64)
        id_parts += [ids[start:p], run]
        mask_parts += [mask[start:p], np.zeros(len(run), dtype=bool)]
        start = p + 1
    id_parts.append(ids[start:])
    mask_parts.append(mask[start:])
    return np.concatenate(id_parts), np.concatenate(mask_parts)


def record_to_vision_doc(record: dict, tokenizer, processor, config, *, file: str, record_no: int,
                         fmt: str = "auto", train_on_prompt: bool = False,
                         video: VideoConfig | None = None) -> Sample:
    """One record straight to a document (read_image_conversation, then to_vision_doc)."""
    conv = read_image_conversation(record, tokenizer, config, file=file, record_no=record_no, fmt=fmt,
                                   train_on_prompt=train_on_prompt, video=video)
    return to_vision_doc(conv, processor, config, file=file, record_no=record_no)


def iter_vision_docs(path: str | Path, tokenizer, processor, config, *, fmt: str = "auto",
                     train_on_prompt: bool = False, video: VideoConfig | None = None
                     ) -> Iterator[tuple[int, Sample | DataError]]:
    """(record number, document or the DataError saying why that record is unusable) for a data file, so the
    caller's on_bad_sample policy decides; image and video paths are relative to the file."""
    file = str(path)
    for record_no, record in iter_records(path):
        if isinstance(record, DataError):
            yield record_no, record
            continue
        try:
            yield record_no, record_to_vision_doc(record, tokenizer, processor, config, file=file,
                                                  record_no=record_no, fmt=fmt, train_on_prompt=train_on_prompt,
                                                  video=video)
        except DataError as err:
            yield record_no, err


@contextmanager
def _naming(medium: str, i: int, refs, path: Path, file: str, record_no: int) -> Iterator[None]:
    """A BadImageError / BadVideoError inside becomes a DataError naming the file, record and image or video."""
    try:
        yield
    except (BadImageError, BadVideoError) as err:
        raise DataError(file, record_no, f"{medium} {i + 1} of {len(refs)} ('{refs[i]}', {path}): {err}") from None


def _family(config) -> MediaFamily:
    try:
        return vision_family(config)
    except ValueError as err:
        raise ZeropadError(str(err)) from None


def _check_processor(processor, family: MediaFamily) -> None:
    """The processor makes the model's patches: one check for images and videos (videos go through the same
    image processor, `video_pixels`, so temporal_patch_size is among the Qwen settings)."""
    if family.vq_resolution is not None:  # early fusion: every image cropped to the VQ resolution
        side = family.vq_resolution
        if getattr(processor, "crop_size", None) != {"height": side, "width": side}:
            raise ZeropadError(f"the image processor ({type(processor).__name__}) does not crop to the model's VQ "
                               f"resolution {side}x{side}; use the model's preprocessor_config.json")
        return
    ours = {name: getattr(processor, name, None) for name in family.processor_settings}
    navit = family.model_type == "kimi_k25"  # Kimi's processor: patch budget, [N, 3, p, p] patches
    if ours != family.processor_settings or _uses_navit_resize(processor) != navit:
        raise ZeropadError(
            f"the image processor ({type(processor).__name__}, {ours}) does not match the model's vision config "
            f"({family.model_type}, {family.processor_settings}); use the model's preprocessor_config.json")


def _pad_positions(ids: np.ndarray, pad_id: int, medium: str, num_expected: int, file: str,
                   record_no: int) -> np.ndarray:
    """Positions of the pad tokens; DataError if the text holds more or fewer than its placeholders made."""
    pads = np.flatnonzero(ids == pad_id)
    if len(pads) != num_expected:
        raise DataError(file, record_no, f"the text holds {len(pads) - num_expected} literal {medium} token(s) "
                                         f"besides its {num_expected} {PLACEHOLDERS[medium]} placeholder(s)")
    return pads


@dataclass(frozen=True)
class MediaMarker:
    """One image or video as the chat template renders it (`text`), and the token ids around its pad token."""

    medium: str  # "image" or "video"
    text: str
    prefix_ids: tuple[int, ...]
    pad_id: int
    suffix_ids: tuple[int, ...]

    @classmethod
    def of(cls, tokenizer, family: MediaFamily, medium: str) -> MediaMarker:
        """Qwen's templates render a video as an image, with <|video_pad|> for <|image_pad|>."""
        pad_id = family.image_token_id if medium == "image" else family.video_token_id
        config_ids = dict(start=family.vision_start_token_id, image=pad_id, end=family.vision_end_token_id)
        names = dict(zip(config_ids, tokenizer.convert_ids_to_tokens(list(config_ids.values()))))
        if None in names.values():
            raise ZeropadError(f"the tokenizer has no tokens for the model's vision_start/{medium}/vision_end ids; "
                               "add the vision special tokens to the tokenizer")
        text = family.image_marker.format(**names)
        unknown = [t for t in re.findall(r"<\|[^<>|]+\|>", text)
                   if tokenizer.convert_tokens_to_ids(t) in (None, tokenizer.unk_token_id)]
        if unknown:
            raise ZeropadError(f"the tokenizer has no token for {unknown} of the {medium} marker {text!r}; "
                               "use the model's tokenizer")
        before, after = (part.format(**names) for part in family.image_marker.split("{image}"))
        encode = lambda part: tuple(tokenizer(part, add_special_tokens=False)["input_ids"])  # noqa: E731
        return cls(medium, text, encode(before), pad_id, encode(after))

    def locate(self, ids: np.ndarray, num_media: int, file: str, record_no: int) -> np.ndarray:
        """bool [L]: the tokens of the markers of a tokenized conversation with `num_media` images (videos). Each
        must have become exactly prefix, pad, suffix: the tokenizer knows the marker's tokens and the text holds no
        literal pad token."""
        if num_media and not (ids == self.pad_id).any():
            raise ZeropadError(f"the tokenizer does not encode the model's {self.medium} token (id {self.pad_id}) "
                               "as one token; add the vision special tokens to the tokenizer")
        pads = _pad_positions(ids, self.pad_id, self.medium, num_media, file, record_no)
        before, after = len(self.prefix_ids), len(self.suffix_ids)
        marked = np.zeros(len(ids), dtype=bool)
        for p in pads:
            if (tuple(ids[max(p - before, 0):p]) != self.prefix_ids
                    or tuple(ids[p + 1:p + 1 + after]) != self.suffix_ids):
                raise ZeropadError(f"the tokenizer does not encode the {self.medium} marker {self.text!r} as the "
                                   "model config's tokens; check vision_start_token_id / vision_end_token_id")
            marked[p - before:p + 1 + after] = True
        return marked
