"""What the packed path must know about a model family, read from its config alone.

These facts sit below both `data/` (which writes markers and counts visual tokens) and `model/` (which runs
the packed forward), so data never imports model. A text-only model has no media family (`media_family` gives
None); a vision-language or early-fusion design has one `MediaFamily`; a design zeropad cannot pack is refused
with the reason. Emu3, which learns to write images, has `ImageTargets` instead: its images become target
tokens before packing, so its packs hold no media and it has no MediaFamily. Positions that need the model
itself (Qwen's 3-axis mRoPE from `get_rope_index`) come from `zeropad.model.vlm.position_rule`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

# The image sentinels ChameleonProcessor inserts around each image when its tokenizer names none.
CHAMELEON_BOI, CHAMELEON_EOI = "<racm3:break>", "<eoss>"

# Emu3's image layout tokens, as its tokenizer names them (Emu3Processor, Emu3ImageVocabularyMapping):
# <|image start|>{h}*{w}<|image token|> then h rows of w visual tokens each ended by <|extra_200|>, then
# <|extra_201|> (end of frame) <|image end|>.
EMU3_BOI, EMU3_WRAPPER, EMU3_EOL, EMU3_EOF, EMU3_EOI = (
    "<|image start|>", "<|image token|>", "<|extra_200|>", "<|extra_201|>", "<|image end|>")
EMU3_IMAGE = "<image>"  # Emu3's placeholder token (config.image_token_id)

QWEN_VL = ("qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")
SUPPORTED = (*QWEN_VL, "kimi_k25", "chameleon")


def num_image_tokens(grid_thw, spatial_merge_size: int) -> int:
    """Visual tokens one image takes in the text: t*h*w patches merged merge x merge."""
    t, h, w = (int(x) for x in grid_thw)
    return t * h * w // spatial_merge_size**2


@dataclass(frozen=True)
class MediaFamily:
    """One multimodal design: its marker tokens, how many tokens an image takes, its position style."""

    model_type: str
    image_token_id: int
    video_token_id: int | None  # None: the packed path takes no videos for this design (yet)
    vision_start_token_id: int  # the marker tokens around an image's run of image tokens
    vision_end_token_id: int
    merge_size: int  # merge_size x merge_size vision patches are pooled into one visual token
    mrope: bool  # 3-D multimodal RoPE from the model's get_rope_index (Qwen); else 1-D positions
    # How the model's chat template renders one image: {start}, {image}, {end} stand for the token strings of the
    # vision_start / image / vision_end ids, the rest is literal text. Its tokens are never training targets.
    image_marker: str
    vision_gets_text_kwargs: bool  # the text's varlen kwargs reach the vision attention (model/vlm.py)
    processor_settings: dict[str, int] = field(default_factory=dict)  # the image processor must be configured so
    video_timing: bool = False  # every video carries second_per_grid_ts, its temporal spacing (Qwen2.5-VL)
    fixed_image_tokens: int | None = None  # early fusion (Chameleon): every image is this many VQ codes
    vq_resolution: int | None = None  # early fusion: images are resized and cropped to this square side

    def num_image_tokens(self, grid_thw=None) -> int:
        """Visual tokens one image of patch grid (t, h, w) takes in the text."""
        if self.fixed_image_tokens is not None:
            return self.fixed_image_tokens
        return num_image_tokens(grid_thw, self.merge_size)

    def check_media_tokens(self, input_ids, media: dict) -> None:
        """ValueError unless a document holds exactly the image and video tokens its media fill (a video of grid
        (t, h, w) fills t*h*w / merge^2, like an image), or has videos the design cannot take."""
        videos = media.get("video_grid_thw")
        if videos is not None and self.video_token_id is None:
            raise ValueError(f"{self.model_type}: the packed path takes no videos (a document has {len(videos)})")
        if videos is not None and self.video_timing != ("second_per_grid_ts" in media):
            raise ValueError(f"{self.model_type}: every video needs second_per_grid_ts" if self.video_timing else
                             f"{self.model_type} takes no second_per_grid_ts (its videos carry timestamps as text)")
        if self.fixed_image_tokens is not None:
            pixels = media.get("pixel_values")
            self._check_runs(input_ids, 0 if pixels is None else len(pixels))
            return
        else:
            counts = [("image", self.image_token_id, *_grids(media.get("image_grid_thw")))]
            if self.video_token_id is not None:
                counts.append(("video", self.video_token_id, *_grids(videos)))
        for medium, token_id, num_media, grids in counts:
            expected = sum(self.num_image_tokens(g) for g in grids)
            found = int((input_ids == token_id).sum())
            if found != expected:
                raise ValueError(f"a document has {found} {medium} tokens but its {num_media} {medium}s need "
                                 f"{expected}")

    def _check_runs(self, input_ids, num_images: int) -> None:
        """Early fusion: each image must own one unbroken run of exactly N placeholders. The model only checks the
        total count, so a run split in two would silently give one image's codes to the wrong place."""
        is_placeholder = np.concatenate([[False], np.asarray(input_ids) == self.image_token_id, [False]])
        edges = np.flatnonzero(np.diff(is_placeholder.astype(np.int8)))
        runs = (edges[1::2] - edges[::2]).tolist()
        if runs != [self.fixed_image_tokens] * num_images:
            raise ValueError(f"a document has image placeholder runs of lengths {runs}, but its {num_images} "
                             f"image(s) need {num_images} run(s) of {self.fixed_image_tokens} tokens each")


def _grids(grids) -> tuple[int, list]:
    return (0, []) if grids is None else (len(grids), list(grids))


def random_pixels(config, family: MediaFamily, grid, rng: np.random.Generator) -> torch.Tensor:
    """pixel_values of one image of patch grid (t, h, w) in the layout the family's vision side takes: Qwen
    [t*h*w, C*tp*p*p] rows, Kimi [t*h*w, 3, p, p] patches, early fusion [1, 3, R, R]."""
    if family.vq_resolution is not None:
        shape = (1, 3, family.vq_resolution, family.vq_resolution)
    else:
        vision, (t, h, w) = config.vision_config, grid
        p = vision.patch_size
        if family.mrope:
            shape = (t * h * w, getattr(vision, "in_channels", 3) * vision.temporal_patch_size * p * p)
        else:
            shape = (t * h * w, 3, p, p)
    return torch.from_numpy(rng.standard_normal(shape).astype(np.float32))


def chameleon_image_tokens(config) -> int:
    """Tokens one Chameleon image takes: the VQ latent grid, the resolution halved at every level but the last."""
    vq = config.vq_config
    side = vq.resolution // 2 ** (len(vq.channel_multiplier) - 1)
    return side * side


def is_multimodal(config) -> bool:
    """A model that takes images: a vision tower (vision_config) or early-fusion VQ codes (Chameleon)."""
    return getattr(config, "vision_config", None) is not None or config.model_type == "chameleon"


def media_family(config) -> MediaFamily | None:
    """The MediaFamily of a model config; None for a text-only model; ValueError for a multimodal design zeropad
    cannot pack."""
    if config.model_type == "chameleon":
        vocab = config.vocabulary_map or {}
        missing = [t for t in (CHAMELEON_BOI, CHAMELEON_EOI) if t not in vocab]
        if missing:
            raise ValueError(f"chameleon: the config's vocabulary_map has no {missing} (the image sentinels)")
        return MediaFamily(config.model_type, config.image_token_id, None, vocab[CHAMELEON_BOI], vocab[CHAMELEON_EOI],
                           merge_size=1, mrope=False, image_marker="{start}{image}{end}",
                           vision_gets_text_kwargs=False, fixed_image_tokens=chameleon_image_tokens(config),
                           vq_resolution=config.vq_config.resolution)
    vision = getattr(config, "vision_config", None)
    if vision is None:
        return None
    ids = dict(image_token_id=config.image_token_id, vision_start_token_id=config.vision_start_token_id,
               vision_end_token_id=config.vision_end_token_id)
    if config.model_type == "kimi_k25":
        rows, cols = vision.merge_kernel_size
        if rows != cols:  # Kimi's image processor pads to a square merge_size (and so do we)
            raise ValueError(f"kimi_k25: merge_kernel_size {vision.merge_kernel_size} must be square")
        # Kimi's chat template: <|media_begin|>image<|media_content|><|media_pad|><|media_end|> per image
        return MediaFamily(config.model_type, **ids, video_token_id=None, merge_size=rows, mrope=False,
                           image_marker="{start}image<|media_content|>{image}{end}", vision_gets_text_kwargs=True,
                           processor_settings=dict(patch_size=vision.patch_size, merge_size=rows))
    if config.model_type in QWEN_VL:
        merge = vision.spatial_merge_size
        return MediaFamily(config.model_type, **ids, video_token_id=config.video_token_id, merge_size=merge,
                           mrope=True, image_marker="{start}{image}{end}", vision_gets_text_kwargs=False,
                           video_timing=config.model_type == "qwen2_5_vl",
                           processor_settings=dict(patch_size=vision.patch_size, merge_size=merge,
                                                   temporal_patch_size=vision.temporal_patch_size))
    raise ValueError(f"no packed multimodal path for model_type {config.model_type!r} "
                     f"(supported: {', '.join(SUPPORTED)})")


def vision_family(config) -> MediaFamily:
    """The MediaFamily of a multimodal config; ValueError for a text-only or unsupported one."""
    family = media_family(config)
    if family is None:
        raise ValueError(f"{config.model_type} is a text-only model: it has no images to pack")
    return family


@dataclass(frozen=True)
class ImageTargets:
    """An early-fusion family whose image tokens are generation targets (Emu3): images in an assistant turn
    become their VQ tokens, in the layout the family's decoder reads back (`decode_image_tokens`).

    One image of a (rows x cols) code grid is `prefix_text(rows, cols)` (the generation prompt writes it, so it
    is never a target) then `num_body_tokens(rows, cols)` target tokens: each row's visual tokens and an
    end-of-line token, then end of frame and end of image."""

    model_type: str
    placeholder_id: int  # stands for an image's body until its codes are known (pack time)
    eol_id: int
    eof_id: int
    eoi_id: int
    visual_ids: tuple[int, ...]  # the token id of VQ code k is visual_ids[k]
    spatial_factor: int  # an image of H x W pixels gives a (H / f) x (W / f) code grid

    def prefix_text(self, rows: int, cols: int) -> str:
        return f"{EMU3_BOI}{rows}*{cols}{EMU3_WRAPPER}"

    @staticmethod
    def num_body_tokens(rows: int, cols: int) -> int:
        return rows * (cols + 1) + 2

    def body(self, row_ids) -> np.ndarray:
        """The target tokens of one image from its rows-with-end-of-line ids (Emu3Model.get_image_tokens)."""
        return np.concatenate([np.asarray(row_ids, dtype=np.int64), [self.eof_id, self.eoi_id]])

    def allowed_next(self, step: int, rows: int, cols: int, end_id: int) -> list[int]:
        """The tokens generation may pick `step` tokens after the prefix: visual tokens inside a row,
        end-of-line at each row's end, then end of frame, end of image and `end_id` (end of turn)."""
        row_len = cols + 1
        if step < rows * row_len:
            return [self.eol_id] if step % row_len == cols else list(self.visual_ids)
        return [[self.eof_id, self.eoi_id, end_id][min(step - rows * row_len, 2)]]


def images_are_targets(config) -> bool:
    """A model that trains on images as generation targets (Emu3: its documents reach the pack as plain tokens,
    so it has no MediaFamily). Chameleon's VQ model has no decoder in transformers: understanding only."""
    return config.model_type == "emu3"


def image_targets(config) -> ImageTargets | None:
    """The ImageTargets of an Emu3 config (read from its vocabulary_map); None for every other model.
    ValueError when the vocabulary map lacks the layout's tokens."""
    if not images_are_targets(config):
        return None
    vocab = config.vocabulary_map or {}
    names = (EMU3_IMAGE, EMU3_BOI, EMU3_WRAPPER, EMU3_EOL, EMU3_EOF, EMU3_EOI)
    missing = [t for t in names if t not in vocab]
    visual = {int(name[-8:-2]): i for name, i in vocab.items() if name.startswith("<|visual token")}
    if missing or not visual:
        raise ValueError(f"emu3: the config's vocabulary_map has no {missing or 'visual tokens'} (Emu3's image "
                         "layout tokens); use the model's tokenizer vocabulary")
    codebook = config.vq_config.codebook_size
    if sorted(visual) != list(range(codebook)):
        raise ValueError(f"emu3: the vocabulary_map has {len(visual)} visual tokens but the VQ codebook has "
                         f"{codebook} codes")
    return ImageTargets(config.model_type, vocab[EMU3_IMAGE], vocab[EMU3_EOL], vocab[EMU3_EOF], vocab[EMU3_EOI],
                        tuple(visual[k] for k in range(codebook)),
                        spatial_factor=2 ** (len(config.vq_config.channel_multiplier) - 1))
