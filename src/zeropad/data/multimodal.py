"""Image and video conversations for training: exact lengths when the data is loaded, pixels only when a pack
is built.

Loading reads every record, checks it (placeholders against images and videos, image headers, video metadata)
and tokenizes it into a `VisionSample`: the tokens with one pad per image or video and the exact length the
document will have once each pad is expanded (from the image header or the video's metadata, sampled with
`video.fps` / `video.max_frames` / `video.max_pixels`, and the processor's resize rule). The packer plans on
those lengths; no decoded pixels are kept. `MultimodalCollator` decodes a pack's images and video frames and
builds the `Pack` when the pack is trained on, so memory holds one step's pixels at a time. The video
settings travel with each sample (its `VideoClip`s), so the collator decodes the frames its length counted.

An image or video that passes the header check but is corrupt further in is found at pack time: with
`data.on_bad_sample: skip` that document leaves its pack and is counted; with `error` the run stops naming
the file, record and image or video.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from transformers import AutoImageProcessor, ChameleonImageProcessorPil, PretrainedConfig

# The PIL backend: the torchvision image processors do not import without torchvision.
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from zeropad.config import Config
from zeropad.data.chat import Sample, ensure_chat_template
from zeropad.data.dataset import BadSamplesError, SamplePolicy, SampleReport, weighted_copies
from zeropad.data.kimi_image import Kimi_K25ImageProcessorPil, limit_kimi_pixels, names_kimi_processor
from zeropad.data.sources import iter_records
from zeropad.data.vision import ImageConversation, read_image_conversation, to_vision_doc, vision_doc_length
from zeropad.errors import ConfigError, DataError
from zeropad.family import vision_family
from zeropad.pack.collate import Pack, PositionRule, collate


@dataclass(frozen=True)
class VisionSample:
    """A checked, tokenized image/video conversation and its exact packed length; pixels are decoded later."""

    conversation: ImageConversation
    length: int
    file: str
    record_no: int

    def __len__(self) -> int:
        return self.length


def load_image_processor(cfg: Config, model_config: PretrainedConfig):
    """The PIL image processor: from `vision.processor` or the model directory's preprocessor_config.json;
    for a model trained from scratch, built from its vision config. `vision.min/max_pixels` override (Kimi: only
    max_pixels, its patch budget). Kimi's processor, torchvision-only in transformers, is zeropad's
    Kimi_K25ImageProcessorPil, loaded from the same preprocessor_config.json."""
    try:
        family = vision_family(model_config)
    except ValueError as err:
        raise ConfigError(f"model: {err}") from None
    source = cfg.vision.processor or cfg.model.path
    if source is not None:
        if not (Path(source).expanduser() / "preprocessor_config.json").is_file():
            raise ConfigError(f"vision.processor: no preprocessor_config.json in {source}")
        if names_kimi_processor(source):
            processor = Kimi_K25ImageProcessorPil.from_pretrained(source)
        else:
            try:
                processor = AutoImageProcessor.from_pretrained(source, backend="pil",
                                                               trust_remote_code=cfg.model.trust_remote_code)
            except ImportError as err:  # an image processor that exists only for the torchvision backend
                raise ConfigError(f"vision.processor: the image processor in {source} cannot load here: "
                                  f"{err}") from None
    elif family.model_type == "kimi_k25":
        processor = Kimi_K25ImageProcessorPil(**family.processor_settings)
    elif family.vq_resolution is not None:  # early fusion: shortest edge to R, then an R x R centre crop
        side = family.vq_resolution
        processor = ChameleonImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    else:  # the Qwen-VL processors
        processor = Qwen2VLImageProcessorPil(**family.processor_settings)
    if isinstance(processor, Kimi_K25ImageProcessorPil):
        limit_kimi_pixels(processor, cfg.vision.min_pixels, cfg.vision.max_pixels)
    elif family.vq_resolution is not None and (cfg.vision.min_pixels or cfg.vision.max_pixels):
        raise ConfigError(f"vision.min_pixels/max_pixels: {family.model_type} resizes and crops every image to "
                          f"{family.vq_resolution}x{family.vq_resolution}; remove them")
    elif cfg.vision.min_pixels or cfg.vision.max_pixels:
        lower = cfg.vision.min_pixels or processor.size["shortest_edge"]
        upper = cfg.vision.max_pixels or processor.size["longest_edge"]
        if lower > upper:
            raise ConfigError(f"vision.min_pixels ({lower}) is above vision.max_pixels ({upper})")
        processor.size = {"shortest_edge": lower, "longest_edge": upper}
    return processor


def load_vision_samples(cfg: Config, sources, tokenizer, processor, model_config: PretrainedConfig, measure=None
                        ) -> tuple[list[VisionSample], SampleReport]:
    """Every record of `sources` checked and measured; bad records follow data.on_bad_sample. A sample over
    pack.max_tokens is dropped (counted): cutting it could split an image or video from its tokens. `measure`
    (record, source, record_no) -> sample replaces the image-conversation reader (zeropad.data.image_targets)."""
    ensure_chat_template(tokenizer, cfg.data.chat_template)
    report = SampleReport()
    policy = SamplePolicy(cfg.data.on_bad_sample, report, cfg.pack.max_tokens, "drop", collect=True)
    samples: list[VisionSample] = []
    for index, source in enumerate(sources):
        if not Path(source.path).exists():
            raise DataError(source.path, None, "no such file or directory")
        kept = []
        for record_no, record in iter_records(source.path):
            report.num_records += 1
            try:
                if isinstance(record, DataError):
                    raise record
                sample = (measure(record, source, record_no) if measure is not None else
                          _measure(record, source, cfg, tokenizer, processor, model_config, record_no))
            except DataError as err:
                policy.bad(source.path, record_no, err.reason)
                continue
            if len(sample) > cfg.pack.max_tokens:
                report.dropped_overlong += 1
                continue
            kept.append(sample)
        if not kept and not policy.problems:
            raise DataError(source.path, None, f"no usable samples ({report.summary()})")
        samples += weighted_copies(kept, source.weight, np.random.default_rng([cfg.train.seed, index]))
    if policy.problems:
        raise BadSamplesError(sorted(policy.problems, key=lambda p: (p.file, p.record or 0)))
    report.num_samples = len(samples)
    report.num_tokens = sum(len(s) for s in samples)
    return samples, report


def _measure(record: dict, source, cfg: Config, tokenizer, processor, model_config, record_no: int) -> VisionSample:
    conversation = read_image_conversation(record, tokenizer, model_config, file=source.path, record_no=record_no,
                                           fmt=source.format, train_on_prompt=cfg.data.train_on_prompt,
                                           video=cfg.video, template_kwargs=cfg.data.chat_template_kwargs)
    if not conversation.sample.loss_mask[1:].any():
        raise DataError(source.path, record_no, "no target tokens")
    length = vision_doc_length(conversation, processor, file=source.path, record_no=record_no)
    return VisionSample(conversation, length, source.path, record_no)


class CorruptSkippingCollator:
    """Samples of one pack -> Pack through `to_doc`; a document whose media turn out corrupt when decoded is
    handled by data.on_bad_sample: raised, or counted once in the report and skipped every epoch after."""

    corrupt = "a corrupt image or video"

    def __init__(self, positions: PositionRule | None, on_bad_sample: str, report: SampleReport):
        self.positions, self.on_bad_sample, self.report = positions, on_bad_sample, report
        self.bad: set[tuple[str, int]] = set()  # (file, record) found corrupt: counted once, skipped every epoch

    def to_doc(self, sample):
        raise NotImplementedError

    def __call__(self, samples) -> Pack:
        docs = []
        for sample in samples:
            if (sample.file, sample.record_no) in self.bad:
                continue
            try:
                docs.append(self.to_doc(sample))
            except DataError as err:
                if self.on_bad_sample == "error":
                    raise
                self.report.skipped[err.reason] += 1
                self.bad.add((sample.file, sample.record_no))
        if not docs:
            raise DataError(samples[0].file, samples[0].record_no, f"every document of this pack has {self.corrupt}")
        return collate(docs, self.positions)


class MultimodalCollator(CorruptSkippingCollator):
    """VisionSamples of one pack -> Pack: decode the images and frames, run the processor, expand, pack with the
    family's position rule (zeropad.model.vlm.position_rule)."""

    def __init__(self, config: PretrainedConfig, positions: PositionRule, processor, on_bad_sample: str,
                 report: SampleReport):
        super().__init__(positions, on_bad_sample, report)
        self.config, self.processor = config, processor

    def to_doc(self, sample: VisionSample) -> Sample:
        return to_vision_doc(sample.conversation, self.processor, self.config, file=sample.file,
                             record_no=sample.record_no)
