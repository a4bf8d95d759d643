"""Videos: metadata without decoding, frame sampling against transformers' Qwen3-VL rule, metadata grid == pixel
path grid, the pixel layout of transformers' video `patchify`, timestamps, clear errors for bad files, and a video
through tiny Qwen2.5-VL and Qwen3-VL models."""

from __future__ import annotations

import copy
import fractions

import av
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Qwen2VLImageProcessorPil
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
from transformers.video_utils import VideoMetadata

from tinyvideo import VISION_TOKENS, tiny_qwen_vl, write_video
from zeropad.config import VideoConfig
from zeropad.data.video import (
    BadVideoError,
    VideoInfo,
    load_video_frames,
    num_video_tokens,
    patch_timestamps,
    plan_video,
    sample_frame_indices,
    seconds_per_temporal_patch,
    timestamp_text,
    video_grid,
    video_info,
    video_pixels,
    writes_timestamps,
)
from zeropad.errors import ConfigError, ZeropadError
from zeropad.model.vlm import mm_token_type_ids

CODECS = [c for c in ("mpeg4", "libx264") if c in av.codecs_available]


def make_processor(patch_size=14, min_pixels=28 * 28, max_pixels=28 * 28 * 16) -> Qwen2VLImageProcessorPil:
    return Qwen2VLImageProcessorPil(patch_size=patch_size, merge_size=2, temporal_patch_size=2,
                                    min_pixels=min_pixels, max_pixels=max_pixels)


def info(num_frames, fps=10.0, width=64, height=48) -> VideoInfo:
    return VideoInfo(width, height, num_frames, fps, num_frames / fps)


@pytest.mark.parametrize("name,codec", [("a.mp4", "mpeg4"), ("b.avi", "mpeg4"), ("c.mkv", "mpeg4"),
                                        ("d.webm", "libvpx"), ("e.mp4", "libx264")])
def test_video_info_from_metadata(tmp_path, name, codec):
    """Matroska/WebM store no frame count: those are counted from packets."""
    if codec not in av.codecs_available:
        pytest.skip(f"no {codec} encoder")
    path = write_video(tmp_path / name, (48, 32), num_frames=25, fps=10, codec=codec)
    assert video_info(path) == VideoInfo(48, 32, 25, 10.0, 2.5)


def test_video_info_ntsc_rate(tmp_path):
    got = video_info(write_video(tmp_path / "a.mp4", num_frames=12, fps=fractions.Fraction(30000, 1001)))
    assert got.num_frames == 12 and got.fps == pytest.approx(29.97, abs=1e-3)


def test_sampling_examples():
    tp = 2
    assert sample_frame_indices(info(25), 2, 768, tp) == [0, 6, 12, 18, 24, 24]  # 5 frames, last repeated
    assert sample_frame_indices(info(25), 1, 768, tp) == [0, 8, 16, 24]  # 2.5 wanted, min_frames 4
    assert sample_frame_indices(info(25), 1, 768, tp, min_frames=1) == [0, 24]
    assert sample_frame_indices(info(300, 30.0), 2, 768, tp) == np.linspace(0, 299, 20).round().astype(int).tolist()
    assert len(sample_frame_indices(info(300, 30.0), 2, 8, tp)) == 8
    assert len(sample_frame_indices(info(300, 30.0), 2, 9, tp)) == 8  # never past max_frames
    assert sample_frame_indices(info(1), 2, 768, tp) == [0, 0]  # a single frame fills a temporal patch
    assert sample_frame_indices(info(3), 2, 768, tp) == [0, 1, 2, 2]
    assert sample_frame_indices(info(3), 2, 768, 1) == [0, 1, 2]
    with pytest.raises(ConfigError, match="positive"):
        sample_frame_indices(info(25), 0, 768, tp)
    with pytest.raises(ConfigError, match="max_frames"):
        sample_frame_indices(info(25), 2, 1, tp)


def test_sampling_matches_qwen3_video_processor():
    """transformers' Qwen3VLVideoProcessor.sample_frames, then its patchify's repeat of the last frame."""
    cases = 0
    for num_frames in (1, 2, 3, 5, 8, 25, 61, 300, 1001):
        for video_fps in (1.0, 10.0, 23.976, 30.0, 60.0):
            for fps in (0.5, 1, 2, 4.5):
                for max_frames in (2, 4, 16, 768):
                    hf = Qwen3VLVideoProcessor(min_frames=4, max_frames=max_frames)
                    expected = hf.sample_frames(VideoMetadata(total_num_frames=num_frames, fps=video_fps), fps=fps)
                    expected = expected.tolist() + [int(expected[-1])] * (-len(expected) % 2)
                    got = sample_frame_indices(info(num_frames, video_fps), fps, max_frames, 2)
                    assert got == expected, (num_frames, video_fps, fps, max_frames)
                    assert len(got) % 2 == 0 and len(got) <= max_frames and 0 <= got[0] and got[-1] < num_frames
                    cases += 1
    assert cases == 720


@pytest.mark.parametrize("codec", CODECS)
def test_metadata_grid_equals_pixel_path(tmp_path, codec):
    processors = [make_processor(), make_processor(patch_size=16, min_pixels=32 * 32, max_pixels=32 * 32 * 12)]
    videos = [((32, 48), 3, 10), ((64, 80), 25, 10), ((50, 38), 13, 24), ((80, 64), 20, 30000 / 1001)]
    for i, (size, num_frames, fps) in enumerate(videos):
        path = write_video(tmp_path / f"{i}.mp4", size, num_frames, fps, codec, seed=i)
        meta = video_info(path)
        for processor in processors:
            for sample_fps, max_frames, max_pixels in ((2, 768, None), (4, 6, None), (1, 768, 28 * 28 * 4)):
                grid = video_grid(meta, processor, sample_fps, max_frames, max_pixels)
                indices = sample_frame_indices(meta, sample_fps, max_frames, processor.temporal_patch_size)
                pixels, grid_thw = video_pixels(load_video_frames(path, indices), processor, max_pixels)
                assert grid_thw.tolist() == [list(grid)], (size, num_frames, fps, sample_fps, max_pixels)
                assert pixels.shape == (grid[0] * grid[1] * grid[2], 3 * 2 * processor.patch_size**2)
                assert num_video_tokens(grid, 2) == grid[0] * grid[1] * grid[2] // 4


def test_identical_frames_equal_the_image_processor():
    """(a) The image processor tiles an image over the temporal_patch_size slots: a video of one repeated image
    gives that image's patches in every temporal patch."""
    processor = make_processor()
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (75, 130, 3), dtype=np.uint8))
    expected = processor(images=[image], return_tensors="pt")
    pixels, grid_thw = video_pixels([image] * 6, processor)
    _, h, w = expected["image_grid_thw"][0].tolist()
    assert grid_thw.tolist() == [[3, h, w]]
    assert torch.equal(pixels, expected["pixel_values"].repeat(3, 1))


def test_temporal_patch_holds_consecutive_frames_in_order():
    """(b) transformers' video patchify views frames as (T/tp, tp, C, H/(m*p), m, p, W/(m*p), m, p) and permutes
    to (T/tp, H/(m*p), W/(m*p), m, m, C, tp, p, p): row (g, by, bx, my, mx), feature (c, k, i, j) holds frame
    g*tp + k, channel c, pixel y = (by*m + my)*p + i, x = (bx*m + mx)*p + j."""
    processor = make_processor()
    p, m, tp = 14, 2, 2
    h, w = 56, 84  # a multiple of p*m and within the pixel limits: not resized, so pixels are compared exactly
    rng = np.random.default_rng(1)
    raw = rng.integers(0, 256, (4, h, w, 3), dtype=np.uint8)
    pixels, grid_thw = video_pixels([Image.fromarray(f) for f in raw], processor)
    assert grid_thw.tolist() == [[2, h // p, w // p]]
    mean, std = np.array(processor.image_mean, np.float32), np.array(processor.image_std, np.float32)
    normalized = (raw.astype(np.float32) / 255 - mean) / std  # [T, H, W, C]
    features = pixels.view(2, h // (p * m), w // (p * m), m, m, 3, tp, p, p)
    for g, by, bx, my, mx, c, k in [(0, 0, 0, 0, 0, 0, 0), (0, 0, 0, 0, 0, 0, 1), (1, 1, 2, 1, 0, 2, 1),
                                    (1, 0, 1, 0, 1, 1, 0), (0, 1, 1, 1, 1, 2, 1)]:
        y, x = (by * m + my) * p, (bx * m + mx) * p
        expected = normalized[g * tp + k, y:y + p, x:x + p, c]
        torch.testing.assert_close(features[g, by, bx, my, mx, c, k], torch.from_numpy(expected))
    # ... and the whole tensor equals transformers' own video patchify on the same normalized frames
    frames = torch.from_numpy(normalized).permute(0, 3, 1, 2)[None].contiguous()
    hf_pixels, *hf_grid = Qwen3VLVideoProcessor().patchify(frames, p, m, tp)
    assert hf_grid == grid_thw[0].tolist()
    torch.testing.assert_close(pixels, hf_pixels[0])


def test_timestamps():
    meta = info(25)
    indices = [0, 6, 12, 18, 24, 24]
    assert patch_timestamps(meta, indices, 2) == pytest.approx([0.3, 1.5, 2.4])
    assert patch_timestamps(meta, indices, 2) == Qwen3VLProcessor._calculate_timestamps(None, indices, 10.0, 2)
    assert patch_timestamps(meta, indices[:5], 2) == patch_timestamps(meta, indices, 2)  # padded like transformers
    assert [timestamp_text(t) for t in (0.3, 1.5, 2.45)] == ["<0.3 seconds>", "<1.5 seconds>", "<2.5 seconds>"]
    # 6 of 25 frames at 10 fps: sampled at 2.4 fps, so a temporal patch of 2 frames spans 2 / 2.4 seconds
    assert seconds_per_temporal_patch(meta, indices, 2) == pytest.approx(2 / 2.4)


def test_bad_videos(tmp_path):
    good = write_video(tmp_path / "good.mp4", num_frames=20)
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "random.mp4").write_bytes(np.random.default_rng(0).bytes(4000))
    (tmp_path / "cut.mp4").write_bytes(good.read_bytes()[: good.stat().st_size // 2])  # its index is at the end
    Image.new("RGB", (40, 30)).save(tmp_path / "image.png")
    Image.new("RGB", (40, 30)).save(tmp_path / "image.jpg")
    with av.open(str(tmp_path / "audio.wav"), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        container.mux(stream.encode(frame))
        container.mux(stream.encode())
    expected = {"missing.mp4": "no such file", "empty.mp4": "empty file", "random.mp4": "not a video PyAV can read",
                "cut.mp4": "not a video PyAV can read", "image.png": "this is an image", "image.jpg": "is an image",
                "audio.wav": r"no video stream in the file \(streams: audio\)", ".": "not a file"}
    for name, message in expected.items():
        with pytest.raises(BadVideoError, match=message):
            video_info(tmp_path / name)
        with pytest.raises(BadVideoError, match=message):
            load_video_frames(tmp_path / name, [0])
    assert issubclass(BadVideoError, ZeropadError)


def test_truncated_video_fails_when_decoding(tmp_path):
    """An AVI cut short keeps its header's frame count: the metadata is readable, decoding ends early."""
    good = write_video(tmp_path / "good.avi", num_frames=25)
    cut = tmp_path / "cut.avi"
    cut.write_bytes(good.read_bytes()[: int(good.stat().st_size * 0.9)])
    meta = video_info(cut)
    assert meta.num_frames == 25
    assert len(load_video_frames(cut, [0, 1, 1, 5])) == 4
    with pytest.raises(BadVideoError, match=r"ends after \d+ decodable frames but frame 24 is needed"):
        load_video_frames(cut, sample_frame_indices(meta, 2, 768, 2))


def test_decoded_frames_are_the_written_frames(tmp_path):
    """Sequential decode picks the asked frames, repeats included (mpeg4 is lossy: compare coarsely)."""
    raw = np.zeros((6, 48, 64, 3), np.uint8) + np.arange(6, dtype=np.uint8)[:, None, None, None] * 40
    path = tmp_path / "a.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for frame in raw:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    frames = load_video_frames(path, [1, 3, 3, 5])
    assert [f.size for f in frames] == [(64, 48)] * 4 and all(f.mode == "RGB" for f in frames)
    assert [round(float(np.asarray(f).mean()) / 40) for f in frames] == [1, 3, 3, 5]
    with pytest.raises(ValueError, match="ascending"):
        load_video_frames(path, [3, 1])


@pytest.fixture(scope="module")
def video_tokenizer(_base_tokenizer):
    tok = copy.deepcopy(_base_tokenizer)
    tok.add_tokens(VISION_TOKENS, special_tokens=True)
    return tok


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_video_through_tiny_model(tmp_path, video_tokenizer, family):
    """The expanded placeholder has exactly the tokens the model's video features fill, and get_rope_index places
    them: Qwen2.5-VL one (t, h, w) grid spaced by second_per_grid_ts, Qwen3-VL one (1, h, w) grid per patch."""
    model = tiny_qwen_vl(family, video_tokenizer)
    config = model.config
    patch = config.vision_config.patch_size
    processor = make_processor(patch_size=patch, min_pixels=(2 * patch) ** 2, max_pixels=(2 * patch) ** 2 * 4)
    path = write_video(tmp_path / "a.mp4", (64, 48), num_frames=30, fps=10)
    meta = video_info(path)
    indices = sample_frame_indices(meta, 2, 768, 2)  # 6 frames: 3 temporal patches
    clip = plan_video("a.mp4", path, config, video_tokenizer, VideoConfig(fps=2, max_frames=768))
    grid = clip.grid(processor)
    assert clip.frame_indices == tuple(indices) and grid == video_grid(meta, processor, 2, 768)
    pixels, grid_thw = clip.pixels(processor)
    assert torch.equal(pixels, video_pixels(load_video_frames(path, indices), processor)[0])
    assert writes_timestamps(config) == (family == "qwen3_vl")
    expansion = clip.token_ids(grid)
    before, after = video_tokenizer.encode("Look:"), video_tokenizer.encode("What happens?")
    ids = torch.tensor([before + [config.vision_start_token_id] + expansion + [config.vision_end_token_id] + after])
    types = mm_token_type_ids(ids, config)
    is_video = ids[0] == config.video_token_id
    assert int(is_video.sum()) == num_video_tokens(grid, 2) == pixels.shape[0] // 4
    inputs = dict(input_ids=ids, pixel_values_videos=pixels, video_grid_thw=grid_thw, mm_token_type_ids=types)
    rope_args = dict(mm_token_type_ids=types, video_grid_thw=grid_thw)
    if family == "qwen2_5_vl":
        assert clip.timestamp_ids is None
        spg = torch.tensor([clip.second_per_grid])
        assert clip.second_per_grid == seconds_per_temporal_patch(meta, indices, 2)
        inputs["second_per_grid_ts"] = rope_args["second_per_grid_ts"] = spg
    else:
        assert clip.second_per_grid is None
        stamps = [timestamp_text(t) for t in patch_timestamps(meta, indices, 2)]
        assert video_tokenizer.decode(expansion).startswith("<0.3 seconds><|vision_start|>")
        assert [video_tokenizer.decode(ids) for ids in clip.timestamp_ids] == stamps
        assert video_tokenizer.decode(expansion).count(" seconds>") == grid[0]
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, ids.shape[1], config.text_config.vocab_size) and torch.isfinite(logits).all()
    positions, _ = model.model.get_rope_index(ids, **rope_args)
    temporal = positions[0, 0, is_video].view(grid[0], -1)
    assert (temporal == temporal[:, :1]).all()  # one temporal position per patch
    if family == "qwen2_5_vl":  # patch k at k * tokens_per_second * second_per_grid_ts, truncated
        tokens_per_second = config.vision_config.tokens_per_second
        offsets = (temporal[:, 0] - temporal[0, 0]).tolist()
        assert offsets == [int(k * tokens_per_second * spg.item()) for k in range(grid[0])]
    else:  # each patch is a (1, h, w) block of its own, after its timestamp text
        assert ((temporal[1:, 0] - temporal[:-1, 0]) > grid[1] // 2).all()
