"""Images as generation targets (Emu3): text-to-image and interleaved records on the one packed text path.

A record such as `{"messages": [{"role": "user", "content": "a cat"}, {"role": "assistant", "content":
"<image>"}], "images": ["cat.jpg"]}` trains the model to write the image's VQ tokens. Each image of an assistant
turn becomes, in Emu3's layout (zeropad.family.ImageTargets), `<|image start|>{rows}*{cols}<|image token|>` (the
prompt `zeropad generate` writes too, so never a target) followed by its targets: rows of visual tokens each
ended by end-of-line, then end of frame and end of image; the chat template's end of turn follows as for text.

Where the frozen VQ encoder runs: the image's tokens are the *targets*, so they must be token ids before the
forward (the loss reads them), unlike Chameleon's input images, which the model encodes inside its forward.
Encoding with a frozen encoder is tokenization, so it happens where documents are made. data/ may not import
model/, so the collator takes `encode`, a callable the model side gives (zeropad.model.emu3.image_encoder).
As for vision-language data, loading reads only image headers (the processor's resize rule gives the code grid,
hence the exact length the packer plans with) and the pack's images are decoded and encoded when the pack is
built, so memory holds one step's pixels. Each image is encoded alone: a batch pads images to a common size,
and padding would change the codes near the edges of the smaller ones. The pack that reaches the model holds
tokens only, so the text collate, the loss and the exactness harness apply unchanged.

Not supported (refused with the reason): images in user turns (Emu3 image understanding inputs), videos.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoImageProcessor, PretrainedConfig
from transformers.models.emu3.image_processing_emu3 import Emu3ImageProcessor, smart_resize

from zeropad.config import Config
from zeropad.data.chat import Sample, tokenize_conversation
from zeropad.data.dataset import SampleReport
from zeropad.data.formats import Text, to_conversation
from zeropad.data.media_parts import IMAGE_PLACEHOLDER, resolve, with_placeholders
from zeropad.data.multimodal import CorruptSkippingCollator, load_vision_samples
from zeropad.data.vision import BadImageError, image_size, load_image
from zeropad.errors import ConfigError, DataError
from zeropad.family import ImageTargets, image_targets, images_are_targets

# pixel_values [1, 3, H, W] and image_sizes [1, 2] of one image -> its rows-with-end-of-line token ids
Encode = Callable[[torch.Tensor, torch.Tensor], np.ndarray]


def image_target_processor(cfg: Config, model_config: PretrainedConfig) -> Emu3ImageProcessor:
    """Emu3's image processor (numpy/PIL, no torchvision needed): from `vision.processor` or model.path, else
    built for a model from scratch with the VQ model's spatial factor; `vision.min/max_pixels` override."""
    targets = _targets(model_config)
    source = cfg.vision.processor or cfg.model.path
    if source is not None:
        if not (Path(source).expanduser() / "preprocessor_config.json").is_file():
            raise ConfigError(f"vision.processor: no preprocessor_config.json in {source}")
        processor = AutoImageProcessor.from_pretrained(source, backend="pil")
    else:
        processor = Emu3ImageProcessor(spatial_factor=targets.spatial_factor)
    if not isinstance(processor, Emu3ImageProcessor):
        raise ConfigError(f"vision.processor: {type(processor).__name__} is not Emu3's image processor")
    if processor.spatial_factor != targets.spatial_factor:
        raise ConfigError(f"vision.processor: spatial_factor {processor.spatial_factor} does not match the VQ model's "
                          f"{targets.spatial_factor} (2 ** (len(vq_config.channel_multiplier) - 1))")
    lower = cfg.vision.min_pixels or processor.min_pixels
    upper = cfg.vision.max_pixels or processor.max_pixels
    if lower > upper:
        raise ConfigError(f"vision.min_pixels ({lower}) is above vision.max_pixels ({upper})")
    processor.min_pixels, processor.max_pixels = lower, upper
    processor.size = {"min_pixels": lower, "max_pixels": upper}
    return processor


def code_grid(width: int, height: int, processor: Emu3ImageProcessor) -> tuple[int, int]:
    """(rows, cols) of VQ codes an image of this size gives: the processor's resize rule, over the factor."""
    try:
        h, w = smart_resize(height, width, processor.spatial_factor, processor.min_pixels, processor.max_pixels)
    except ValueError as err:  # aspect ratio beyond 200:1
        raise BadImageError(f"{width}x{height}: {err}") from None
    return h // processor.spatial_factor, w // processor.spatial_factor


@dataclass(frozen=True)
class TargetSample:
    """A checked, tokenized record: one placeholder per target image (its prefix already written, not a target),
    the images' paths and code grids; its exact packed length. Pixels are decoded and encoded at pack time."""

    sample: Sample
    image_refs: tuple[str, ...]
    image_paths: tuple[Path, ...]
    grids: tuple[tuple[int, int], ...]
    file: str
    record_no: int

    def __len__(self) -> int:
        return len(self.sample) - len(self.grids) + sum(ImageTargets.num_body_tokens(*g) for g in self.grids)


def read_target_record(record: dict, tokenizer, config, processor: Emu3ImageProcessor, *, file: str,
                       record_no: int, fmt: str = "auto", train_on_prompt: bool = False,
                       template_kwargs: dict | None = None) -> TargetSample:
    """Check and tokenize a record whose assistant turns hold `<image>` placeholders; DataError names the file,
    record and what is wrong (a missing or unreadable image, an image outside an assistant turn, ...)."""
    targets = _targets(config)
    record, refs = with_placeholders(record, file, record_no)
    if refs.videos:
        raise DataError(file, record_no, f"{targets.model_type} takes no videos")
    conversation = to_conversation(record, fmt, file, record_no)
    if isinstance(conversation, Text):
        raise DataError(file, record_no, "a pretraining 'text' record cannot carry images; use messages")
    elsewhere = [m.role for m in conversation.messages if m.role != "assistant" and IMAGE_PLACEHOLDER in m.content]
    if elsewhere:
        raise DataError(file, record_no, f"an image in a {elsewhere[0]} turn: {targets.model_type} images are "
                        "trained as generation targets only (assistant turns); image understanding inputs are not "
                        "supported yet")
    found = sum(m.content.count(IMAGE_PLACEHOLDER) for m in conversation.messages)
    if found != len(refs.images):
        raise DataError(file, record_no, f"{found} {IMAGE_PLACEHOLDER} placeholder(s) in the assistant turns but "
                        f"{len(refs.images)} image(s) in 'images'; they must match one to one")
    paths = tuple(resolve(ref, file) for ref in refs.images)
    grids = []
    for i, path in enumerate(paths):
        try:
            grids.append(code_grid(*image_size(path), processor))
        except BadImageError as err:
            raise DataError(file, record_no, _image_problem(i, refs.images, path, err)) from None
    prefixes = iter([targets.prefix_text(*g) for g in grids])
    messages = []
    for m in conversation.messages:  # each placeholder in order gets its own image's prefix
        parts = m.content.split(IMAGE_PLACEHOLDER)
        content = parts[0] + "".join(next(prefixes) + IMAGE_PLACEHOLDER + part for part in parts[1:])
        messages.append(dataclasses.replace(m, content=content))
    sample = tokenize_conversation(dataclasses.replace(conversation, messages=tuple(messages)), tokenizer,
                                   train_on_prompt, template_kwargs)
    mask = sample.loss_mask.copy()
    pads = np.flatnonzero(sample.input_ids == targets.placeholder_id)
    if len(pads) != len(grids):
        raise DataError(file, record_no, f"the text holds {len(pads)} {IMAGE_PLACEHOLDER} token(s) for "
                        f"{len(grids)} image(s): the tokenizer must encode {IMAGE_PLACEHOLDER} as the model's "
                        "image token, and the text may hold no other")
    for pad, grid in zip(pads, grids):  # the prefix is the generation prompt's, never a target
        prefix = tokenizer(targets.prefix_text(*grid), add_special_tokens=False)["input_ids"]
        if sample.input_ids[pad - len(prefix):pad].tolist() != prefix:
            raise DataError(file, record_no, f"the image prefix {targets.prefix_text(*grid)!r} did not tokenize "
                            "apart from its neighbours; use the model's tokenizer")
        mask[pad - len(prefix):pad + 1] = False
    return TargetSample(Sample(sample.input_ids, mask), refs.images, paths, tuple(grids), file, record_no)


def to_target_doc(ts: TargetSample, processor: Emu3ImageProcessor, encode: Encode, targets: ImageTargets) -> Sample:
    """Decode and encode the images; each placeholder becomes its image's tokens, every one a target."""
    ids, mask = ts.sample.input_ids.astype(np.int64), ts.sample.loss_mask
    id_parts, mask_parts, start = [], [], 0
    for i, (pad, grid) in enumerate(zip(np.flatnonzero(ids == targets.placeholder_id), ts.grids)):
        try:
            image = load_image(ts.image_paths[i])
            if code_grid(*image.size, processor) != grid:
                raise BadImageError(f"decoded size {image.size[0]}x{image.size[1]} differs from its header's")
        except BadImageError as err:
            raise DataError(ts.file, ts.record_no, _image_problem(i, ts.image_refs, ts.image_paths[i], err)) from None
        batch = processor(images=[image], return_tensors="pt")
        body = targets.body(encode(batch["pixel_values"], batch["image_sizes"]))
        assert len(body) == targets.num_body_tokens(*grid), "the encoder's grid must equal the header's"
        id_parts += [ids[start:pad], body]
        mask_parts += [mask[start:pad], np.ones(len(body), dtype=bool)]
        start = pad + 1
    return Sample(np.concatenate([*id_parts, ids[start:]]), np.concatenate([*mask_parts, mask[start:]]))


def load_target_samples(cfg: Config, sources, tokenizer, processor: Emu3ImageProcessor,
                        model_config: PretrainedConfig) -> tuple[list[TargetSample], SampleReport]:
    """Every record of `sources` checked and measured from image headers (load_vision_samples' policy)."""
    def measure(record, source, record_no):
        sample = read_target_record(record, tokenizer, model_config, processor, file=source.path,
                                    record_no=record_no, fmt=source.format, train_on_prompt=cfg.data.train_on_prompt,
                                    template_kwargs=cfg.data.chat_template_kwargs)
        if not sample.sample.loss_mask[1:].any() and not sample.grids:
            raise DataError(source.path, record_no, "no target tokens")
        return sample

    return load_vision_samples(cfg, sources, tokenizer, processor, model_config, measure=measure)


class ImageTargetCollator(CorruptSkippingCollator):
    """TargetSamples of one pack -> the text Pack: images decoded and encoded, corrupt ones by data.on_bad_sample."""

    corrupt = "a corrupt image"

    def __init__(self, config: PretrainedConfig, processor: Emu3ImageProcessor, encode: Encode, on_bad_sample: str,
                 report: SampleReport):
        super().__init__(None, on_bad_sample, report)
        self.targets, self.processor, self.encode = _targets(config), processor, encode

    def to_doc(self, sample: TargetSample) -> Sample:
        return to_target_doc(sample, self.processor, self.encode, self.targets)


def _targets(config) -> ImageTargets:
    try:
        targets = image_targets(config)
    except ValueError as err:
        raise ConfigError(f"model: {err}") from None
    if targets is None:
        raise ConfigError(f"model: {config.model_type} has no image decoder, so images cannot be its targets")
    return targets


def _image_problem(i: int, refs, path: Path, err: Exception) -> str:
    return f"image {i + 1} of {len(refs)} ('{refs[i]}', {path}): {err}"


def image_target_setup(cfg: Config, model_config: PretrainedConfig) -> Emu3ImageProcessor | None:
    """For a model whose images are targets (Emu3), its image processor after refusing what the run cannot do
    with it; None for every other model."""
    if not images_are_targets(model_config):
        return None
    targets = _targets(model_config)
    # The collator encodes with the VQ model outside the forward: every rank needs it whole and unsplit.
    if cfg.parallel.strategy == "fsdp":
        raise ConfigError(f"parallel.strategy=fsdp: {targets.model_type}'s VQ encoder runs when packs are built, "
                          "where a sharded VQ model cannot run; use ddp")
    if cfg.parallel.sp_size > 1:
        raise ConfigError(f"parallel.sp_size={cfg.parallel.sp_size}: sequence parallelism does not support "
                          f"{targets.model_type} yet; use sp_size=1")
    if cfg.train.objective != "sft" or cfg.pack.streaming:
        raise ConfigError(f"{targets.model_type} trains images as targets with train.objective=sft and "
                          "pack.streaming=false only")
    return image_target_processor(cfg, model_config)
