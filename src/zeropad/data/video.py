"""Videos for Qwen-VL training (Qwen2.5-VL, Qwen3-VL): metadata, frame sampling, exact visual token counts
from metadata alone, and pixel_values_videos in the layout transformers' Qwen video processors produce.

Lengths before packing come from container/stream metadata (`video_info`), never from decoded frames: the
frame indices (`sample_frame_indices`) and the resized frame size (the processor's `smart_resize`) give the
grid (t, h, w) exactly, so `video_grid` equals the grid of the pixel path.

The pixel path reuses the model's PIL image processor (`Qwen2VLImageProcessorPil`; the torchvision video
processors do not import without torchvision). transformers' video `patchify` views the frames as
(T/tp, tp, C, H/(m*p), m, p, W/(m*p), m, p) and permutes them to rows (T/tp, H/(m*p), W/(m*p), m, m) and
features (C, tp, p, p). The image processor lays out an image's rows as (H/(m*p), W/(m*p), m, m) and its
features as (C, tp, p, p) with the image repeated tp times. So each group of tp consecutive frames goes
through the image processor, one copy of each frame is kept, and the tp frames are put in the tp slot in
order: row layout and feature layout are those of the video processor (checked against its `patchify`).

Sampling follows Qwen3VLVideoProcessor.sample_frames (int(num_frames / video_fps * fps) frames, at least
min_frames, at most max_frames and the frame count, `linspace(0, n - 1, k).round()`), then repeats the last
index up to a multiple of temporal_patch_size, as its `patchify` repeats the last frame. Differences from
transformers, all deliberate:
  - max_frames is rounded down to a multiple of temporal_patch_size first, so the padded count never exceeds
    it (transformers pads past an odd max_frames);
  - Qwen2VLVideoProcessor rounds the count down to the patch size and spaces indices by total/k; we use the
    linspace rule of Qwen3-VL and qwen-vl-utils (the reference the Qwen2.5-VL models were trained with);
  - frames are resized with PIL bicubic (the image processor) rather than torchvision's bicubic: the same
    size, slightly different pixel values;
  - max_pixels is a per-frame budget (Qwen2-VL video rule). Qwen3VLVideoProcessor budgets its longest_edge
    over all sampled frames: pass max_pixels = longest_edge / num_frames for the same size, except for frames
    under one patch unit on a side, which it scales up before resizing;
  - no cap_pixels_per_frame (whole-video token cap): choose max_pixels instead.

Timestamps: Qwen2.5-VL spaces temporal positions by second_per_grid_ts (`seconds_per_temporal_patch`);
Qwen3-VL writes "<t seconds>" text before each temporal patch (`patch_timestamps`, `VideoClip.token_ids`).

A record's video is planned once, when the data is loaded (`plan_video` -> `VideoClip`: metadata, frame indices,
the timestamp tokens), so its length before packing and its pixels at pack time follow one plan.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image
from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

# The PIL-backend module: the torchvision one (image_processing_qwen2_vl) does not import without torchvision.
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

from zeropad.config import VideoConfig
from zeropad.errors import ConfigError, ZeropadError
from zeropad.family import num_image_tokens

MIN_FRAMES = 4  # transformers' Qwen2-VL and Qwen3-VL video processors' default min_frames


class BadVideoError(ZeropadError):
    """One video cannot be used; the caller adds the data file and record."""


@dataclass(frozen=True)
class VideoInfo:
    """Stream metadata of a video; duration is num_frames / fps, the span transformers' VideoMetadata uses."""

    width: int
    height: int
    num_frames: int
    fps: float
    duration: float  # seconds


def video_info(path: str | Path) -> VideoInfo:
    """Size, frame count and frame rate from the container and stream headers, without decoding frames (the
    packets are counted, not decoded, when the container stores no frame count, as Matroska/WebM do)."""
    with _open(path) as container:
        stream = container.streams.video[0]
        try:
            num_frames = stream.frames or sum(1 for packet in container.demux(stream) if packet.size)
        except (av.FFmpegError, OSError) as err:
            raise BadVideoError(f"corrupt video data while counting frames: {err}") from None
        rate = stream.average_rate or stream.guessed_rate  # average_rate: what transformers' PyAV reader uses
        width, height = stream.codec_context.width, stream.codec_context.height
    if num_frames <= 0:
        raise BadVideoError("the video stream has no frames")
    if not rate:
        raise BadVideoError("the video stream has no frame rate in its metadata")
    if width <= 0 or height <= 0:
        raise BadVideoError(f"zero-size video frames ({width}x{height})")
    fps = float(rate)
    return VideoInfo(width, height, num_frames, fps, num_frames / fps)


def sample_frame_indices(info: VideoInfo, fps: float, max_frames: int, temporal_patch_size: int, *,
                         min_frames: int = MIN_FRAMES) -> list[int]:
    """Indices of the frames to use: `fps` per second of video, evenly spread, at most max_frames; the count is
    a multiple of temporal_patch_size, the last index repeated to get there (short videos repeat frames)."""
    if fps <= 0:
        raise ConfigError(f"video frames per second must be positive, got {fps}")
    if max_frames < temporal_patch_size:
        raise ConfigError(f"video max_frames ({max_frames}) must be at least temporal_patch_size "
                          f"({temporal_patch_size}): every temporal patch holds that many frames")
    max_frames = max_frames // temporal_patch_size * temporal_patch_size
    wanted = int(info.num_frames / info.fps * fps)
    count = min(max(wanted, min_frames, 1), max_frames, info.num_frames)
    indices = np.linspace(0, info.num_frames - 1, count).round().astype(int).tolist()
    return indices + indices[-1:] * (-count % temporal_patch_size)


def video_grid(info: VideoInfo, processor, fps: float, max_frames: int, max_pixels: int | None = None, *,
               min_frames: int = MIN_FRAMES) -> tuple[int, int, int]:
    """(t, h, w) patch grid of the video's pixel path (`load_video_frames` + `video_pixels`), from metadata."""
    num_frames = len(sample_frame_indices(info, fps, max_frames, processor.temporal_patch_size,
                                          min_frames=min_frames))
    return _grid(num_frames, info, processor, max_pixels)


def num_video_tokens(grid_thw, merge_size: int) -> int:
    """<|video_pad|> tokens a video takes: t*h*w patches merged merge x merge (the image rule)."""
    return num_image_tokens(grid_thw, merge_size)


def load_video_frames(path: str | Path, indices: Sequence[int]) -> list[Image.Image]:
    """The RGB frames at `indices` (ascending, repeats allowed), decoded in one sequential pass with PyAV;
    BadVideoError if the data is corrupt or the stream ends before the last index."""
    if not indices or any(b < a for a, b in zip(indices, indices[1:])) or indices[0] < 0:
        raise ValueError(f"frame indices must be a non-empty ascending list of frame numbers, got {indices}")
    frames: list[Image.Image] = []
    num_decoded = 0
    with _open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # frame-level threads; the frames are the same, decoding is faster
        try:
            for frame in container.decode(stream):
                while len(frames) < len(indices) and indices[len(frames)] == num_decoded:
                    frames.append(frame.to_image())
                num_decoded += 1
                if len(frames) == len(indices):
                    break
        except (av.FFmpegError, OSError) as err:
            raise BadVideoError(f"corrupt video data after frame {num_decoded}: {err}") from None
    if len(frames) < len(indices):
        raise BadVideoError(f"the video ends after {num_decoded} decodable frames but frame {indices[len(frames)]} "
                            "is needed (truncated file, or its metadata overstates the frame count)")
    if len({frame.size for frame in frames}) > 1:
        raise BadVideoError(f"the frame size changes within the video ({sorted({f.size for f in frames})})")
    return frames


def video_pixels(frames: Sequence[Image.Image], processor, max_pixels: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixel_values_videos [P, C*tp*p*p], video_grid_thw [1, 3]) of one video, in transformers' Qwen video
    layout: every frame resized to one smart_resize size, rescaled and normalized by `processor` (the model's
    Qwen2VLImageProcessorPil), tp consecutive frames per temporal patch (the last frame repeated if needed)."""
    if not frames:
        raise ValueError("a video needs at least one frame")
    if len({frame.size for frame in frames}) > 1:
        raise ValueError("all frames of a video must have one size")
    tp = processor.temporal_patch_size
    frames = list(frames) + [frames[-1]] * (-len(frames) % tp)
    size = _size_limits(processor, max_pixels)
    patches = []
    for start in range(0, len(frames), tp):
        # The image processor gives each frame's patches with the frame repeated in all tp slots: keep slot 0
        # of every frame and put frame start+k in slot k.
        batch = processor(images=frames[start:start + tp], size=size, return_tensors="pt")
        _, grid_h, grid_w = batch["image_grid_thw"][0].tolist()
        pixels = batch["pixel_values"]
        per_frame = pixels.reshape(tp, grid_h * grid_w, -1, tp, processor.patch_size**2)[:, :, :, 0]
        patches.append(per_frame.permute(1, 2, 0, 3).reshape(grid_h * grid_w, pixels.shape[1]))
    grid_thw = torch.tensor([[len(frames) // tp, grid_h, grid_w]], dtype=torch.int64)
    return torch.cat(patches), grid_thw


def patch_timestamps(info: VideoInfo, indices: Sequence[int], temporal_patch_size: int) -> list[float]:
    """Seconds of each temporal patch, the mean time of its first and last frame (Qwen3VLProcessor's
    `_calculate_timestamps`); Qwen3-VL writes them as text, see `timestamp_text`."""
    indices = list(indices) + list(indices[-1:]) * (-len(indices) % temporal_patch_size)
    times = [i / info.fps for i in indices]
    return [(times[k] + times[k + temporal_patch_size - 1]) / 2 for k in range(0, len(times), temporal_patch_size)]


def seconds_per_temporal_patch(info: VideoInfo, indices: Sequence[int], temporal_patch_size: int) -> float:
    """Qwen2.5-VL's second_per_grid_ts: temporal_patch_size / sampled fps, the sampled fps being
    len(indices) / num_frames * fps (VideoMetadata.sampled_fps, as Qwen2_5_VLProcessor computes it)."""
    return temporal_patch_size / (len(indices) / info.num_frames * info.fps)


def timestamp_text(seconds: float) -> str:
    """The text Qwen3-VL puts before each temporal patch."""
    return f"<{seconds:.1f} seconds>"


def writes_timestamps(config) -> bool:
    """Whether the model family's processor writes per-patch timestamp text (Qwen3-VL and the models that use
    its processor) instead of passing second_per_grid_ts (Qwen2.5-VL)."""
    return PROCESSOR_MAPPING_NAMES.get(config.model_type) == "Qwen3VLProcessor"


@dataclass(frozen=True)
class VideoClip:
    """One video of a record, planned from metadata when the data is loaded (`plan_video`): the frames to decode
    and the tokens its one <|video_pad|> becomes, all but the frame size, which the processor decides (`grid`).
    Length (`token_ids(grid(processor))`) and pixels (`pixels(processor)`) come from the same plan."""

    ref: str  # as written in the record, for messages
    path: Path
    info: VideoInfo
    frame_indices: tuple[int, ...]  # a multiple of temporal_patch_size long
    max_pixels: int | None  # per frame; None: the processor's longest_edge
    pad_id: int  # <|video_pad|>
    merge_size: int
    frame_markers: tuple[int, int]  # <|vision_start|>, <|vision_end|>: around each temporal patch (Qwen3-VL)
    timestamp_ids: tuple[tuple[int, ...], ...] | None  # Qwen3-VL: "<t seconds>" ids per temporal patch
    second_per_grid: float | None  # Qwen2.5-VL: second_per_grid_ts

    def grid(self, processor) -> tuple[int, int, int]:
        """(t, h, w) patch grid of `pixels(processor)`, from metadata."""
        return _grid(len(self.frame_indices), self.info, processor, self.max_pixels)

    def token_ids(self, grid_thw) -> list[int]:
        """The ids that replace the one <|video_pad|> of `<|vision_start|><|video_pad|><|vision_end|>` (the chat
        templates' video part), as the family's processor's `replace_video_token` writes them:
          Qwen2.5-VL: <|video_pad|> * (t*h*w / merge^2);
          Qwen3-VL: for each temporal patch, "<{s:.1f} seconds>" <|vision_start|> <|video_pad|> * (h*w / merge^2)
          <|vision_end|> (nested inside the template's own start/end markers, as transformers writes it).
        Only <|video_pad|> tokens are visual (mm_token_type_ids 2); the rest is text, and none is a target."""
        t, h, w = (int(x) for x in grid_thw)
        if self.timestamp_ids is None:
            return [self.pad_id] * num_video_tokens((t, h, w), self.merge_size)
        assert len(self.timestamp_ids) == t, "one timestamp per temporal patch"
        start, end = self.frame_markers
        frame = [start] + [self.pad_id] * (h * w // self.merge_size**2) + [end]
        return [token for stamp in self.timestamp_ids for token in (*stamp, *frame)]

    def pixels(self, processor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pixel_values_videos [P, C*tp*p*p], video_grid_thw [1, 3]): the planned frames decoded and processed;
        BadVideoError if the data is corrupt past the metadata."""
        frames = load_video_frames(self.path, self.frame_indices)
        return video_pixels(frames, processor, self.max_pixels)


def plan_video(ref: str, path: str | Path, config, tokenizer, settings: VideoConfig) -> VideoClip:
    """The VideoClip of one video for a Qwen-VL `config`, from its metadata (no frame is decoded). BadVideoError
    if the file is unusable; ConfigError for sampling settings the model cannot take."""
    tp = config.vision_config.temporal_patch_size
    info = video_info(path)
    indices = sample_frame_indices(info, settings.fps, settings.max_frames, tp)
    stamps, second_per_grid = None, None
    if writes_timestamps(config):
        stamps = tuple(tuple(tokenizer.encode(timestamp_text(seconds), add_special_tokens=False))
                       for seconds in patch_timestamps(info, indices, tp))
    else:
        second_per_grid = seconds_per_temporal_patch(info, indices, tp)
    return VideoClip(ref, Path(path), info, tuple(indices), settings.max_pixels, config.video_token_id,
                     config.vision_config.spatial_merge_size,
                     (config.vision_start_token_id, config.vision_end_token_id), stamps, second_per_grid)


def _grid(num_frames: int, info: VideoInfo, processor, max_pixels: int | None) -> tuple[int, int, int]:
    resized_h, resized_w = _resized_frame_size(info.width, info.height, processor, max_pixels)
    return (num_frames // processor.temporal_patch_size, resized_h // processor.patch_size,
            resized_w // processor.patch_size)


def _size_limits(processor, max_pixels: int | None) -> dict[str, int]:
    return {"shortest_edge": processor.size["shortest_edge"],
            "longest_edge": processor.size["longest_edge"] if max_pixels is None else max_pixels}


def _resized_frame_size(width: int, height: int, processor, max_pixels: int | None) -> tuple[int, int]:
    limits = _size_limits(processor, max_pixels)
    try:
        return smart_resize(height, width, factor=processor.patch_size * processor.merge_size,
                            min_pixels=limits["shortest_edge"], max_pixels=limits["longest_edge"])
    except ValueError as err:  # aspect ratio beyond 200:1
        raise BadVideoError(f"{width}x{height} frames: {err}") from None


# Demuxers PyAV opens still images with (png_pipe, jpeg_pipe, image2, ...): a single picture, not a video.
def _is_image_format(name: str) -> bool:
    return name.startswith("image2") or name.endswith("_pipe")


def _open(path: str | Path) -> av.container.InputContainer:
    """The opened container, checked to hold a video stream; BadVideoError with the reason otherwise."""
    path = Path(path)
    if not path.exists():
        raise BadVideoError("no such file")
    if not path.is_file():
        raise BadVideoError("not a file")
    if path.stat().st_size == 0:
        raise BadVideoError("empty file (0 bytes)")
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError) as err:
        raise BadVideoError(f"not a video PyAV can read (corrupt, truncated or not a video): {err}") from None
    if _is_image_format(format_name := container.format.name):
        container.close()
        raise BadVideoError(f"this is an image ({format_name}), not a video; list it as an image")
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams}) or ["none"]
        container.close()
        raise BadVideoError(f"no video stream in the file (streams: {', '.join(kinds)})")
    return container
