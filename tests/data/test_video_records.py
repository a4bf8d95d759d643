"""Video records -> documents: `<video>` placeholders with a `videos` list and video / video_url content parts,
mixed with images; the length known from metadata equals the decoded document's for both Qwen families and
several sampling settings; markers and timestamps are never targets; real decoded documents pack exactly; bad
videos and placeholder mismatches name the file, record and video."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Qwen2VLImageProcessorPil

from tinyvideo import VISION_TOKENS, tiny_qwen_vl, write_video
from zeropad.config import VideoConfig
from zeropad.data.chat import ensure_chat_template
from zeropad.data.vision import read_image_conversation, record_to_vision_doc, to_vision_doc, vision_doc_length
from zeropad.errors import ConfigError, DataError, ZeropadError
from zeropad.verify import check_documents

from packing import n_images, n_videos, same_doc
from zeropad.verify import TOLERANCE

FAMILIES = ["qwen2_5_vl", "qwen3_vl"]


@pytest.fixture(scope="module")
def tokenizer(_base_tokenizer):
    tok = copy.deepcopy(_base_tokenizer)
    tok.add_tokens(VISION_TOKENS, special_tokens=True)
    ensure_chat_template(tok, None)
    return tok


@pytest.fixture(scope="module", params=FAMILIES)
def model(request, tokenizer):
    return tiny_qwen_vl(request.param, tokenizer)


def processor_for(model) -> Qwen2VLImageProcessorPil:
    unit = model.config.vision_config.patch_size * 2  # patch x merge
    return Qwen2VLImageProcessorPil(patch_size=unit // 2, merge_size=2, temporal_patch_size=2, min_pixels=unit * unit,
                                    max_pixels=unit * unit * 16)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """Images, videos of different sizes, lengths, rates and containers, and broken files."""
    root = tmp_path_factory.mktemp("media")
    rng = np.random.default_rng(0)
    for name, (w, h) in {"a.png": (90, 60), "b.png": (40, 120)}.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / name)
    write_video(root / "short.mp4", (64, 48), num_frames=10, fps=10, seed=1)  # 1 s
    write_video(root / "long.avi", (80, 64), num_frames=75, fps=15, seed=2)  # 5 s
    write_video(root / "tall.mkv", (40, 100), num_frames=24, fps=8, seed=3)  # 3 s, Matroska: packets counted
    good = write_video(root / "whole.avi", (64, 48), num_frames=25, fps=10, seed=4)
    (root / "cut.avi").write_bytes(good.read_bytes()[: int(good.stat().st_size * 0.9)])  # header intact
    (root / "empty.mp4").write_bytes(b"")
    (root / "garbage.mp4").write_bytes(rng.bytes(3000))
    return root


def chat(*turns: str) -> list[dict]:
    messages = []
    for text in turns:
        messages += [{"role": "user", "content": text}, {"role": "assistant", "content": "A red ball rolls."}]
    return messages


MIXED = {"messages": chat("<image>Watch <video> then <video>.", "And <video> with <image>?"),
         "images": ["a.png", "b.png"], "videos": ["short.mp4", "long.avi", "tall.mkv"]}


def read(record, tokenizer, model, media, record_no=3, **kwargs):
    return read_image_conversation(record, tokenizer, model.config, file=str(media / "data.json"),
                                   record_no=record_no, **kwargs)


@pytest.mark.parametrize("settings", [VideoConfig(), VideoConfig(fps=1.0, max_frames=4),
                                      VideoConfig(fps=4.0, max_frames=32, max_pixels=28 * 28 * 4)])
def test_metadata_length_equals_decoded_doc(tokenizer, model, media, settings):
    processor, config, file = processor_for(model), model.config, str(media / "data.json")
    conv = read(MIXED, tokenizer, model, media, video=settings)
    doc = to_vision_doc(conv, processor, config, file=file, record_no=3)
    assert len(doc) == vision_doc_length(conv, processor, file=file, record_no=3)
    assert n_images(doc) == 2 and n_videos(doc) == 3
    assert [tuple(g) for g in doc.media["video_grid_thw"].tolist()] == [clip.grid(processor) for clip in conv.videos]
    assert doc.media["video_grid_thw"][:, 0].tolist() == [len(c.frame_indices) // 2 for c in conv.videos]
    assert max(len(c.frame_indices) for c in conv.videos) <= settings.max_frames
    assert doc.media["pixel_values_videos"].shape[0] == int(doc.media["video_grid_thw"].prod(dim=1).sum())
    assert int((doc.input_ids == config.video_token_id).sum()) == int(doc.media["video_grid_thw"].prod(dim=1).sum()) // 4
    text = tokenizer.decode(doc.input_ids, skip_special_tokens=False)
    targets = tokenizer.decode(doc.input_ids[doc.loss_mask])
    assert targets.count("A red ball rolls.") == 2 and "<|vision" not in targets and "seconds>" not in targets
    if config.model_type == "qwen3_vl":  # "<t seconds>" <start> pads <end> per temporal patch, inside <start>..<end>
        assert "second_per_grid_ts" not in doc.media
        assert text.count(" seconds><|vision_start|>") == int(doc.media["video_grid_thw"][:, 0].sum())
        assert text.count("<|vision_start|><0.") == 3  # each video's first patch sits right after its start
    else:
        assert doc.media["second_per_grid_ts"].shape == (3,) and "seconds" not in text
        assert text.count("<|vision_start|><|video_pad|>") == 3


def test_decoded_video_docs_pack_exactly(tokenizer, model, media):
    """A mixed image+video record, a video-only record and a text record, decoded from real files, packed: equal
    to each alone (the model's own placeholder checks pass on the unpacked documents)."""
    processor, file = processor_for(model), str(media / "data.json")
    records = [MIXED, {"messages": chat("What happens in <video>?"), "videos": ["tall.mkv"]},
               {"messages": chat("No media at all.")}]
    docs = [record_to_vision_doc(r, tokenizer, processor, model.config, file=file, record_no=i,
                                 video=VideoConfig(fps=1.0, max_frames=6)) for i, r in enumerate(records, 1)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        report = check_documents(model, docs)
    finally:
        torch.set_num_threads(threads)
        model.eval()
    print(model.config.model_type, report.summary())
    assert report.max_logit_diff <= TOLERANCE and report.max_grad_diff <= TOLERANCE, report.summary()


def test_content_parts_give_the_same_doc(tokenizer, model, media):
    parts = [[{"type": "image", "image": "a.png"}, {"type": "text", "text": "Watch "},
              {"type": "video_url", "video_url": {"url": f"file://{media / 'short.mp4'}"}},
              {"type": "text", "text": " then "}, {"type": "video", "video": "long.avi"},
              {"type": "text", "text": "."}],
             [{"type": "text", "text": "And "}, {"type": "video", "video": "tall.mkv"},
              {"type": "text", "text": " with "}, {"type": "image_url", "image_url": {"url": "b.png"}},
              {"type": "text", "text": "?"}]]
    shape_b = {"messages": [{**m, "content": parts[i // 2]} if m["role"] == "user" else m
                            for i, m in enumerate(MIXED["messages"])]}
    processor, file = processor_for(model), str(media / "data.json")
    doc_a, doc_b = (record_to_vision_doc(r, tokenizer, processor, model.config, file=file, record_no=1)
                    for r in (MIXED, shape_b))
    assert same_doc(doc_a, doc_b) and {"pixel_values", "pixel_values_videos"} <= doc_a.media.keys()


def check_error(record, tokenizer, model, media, *expected, stage="read"):
    file = str(media / "data.json")
    with pytest.raises(DataError) as info:
        conv = read(record, tokenizer, model, media, record_no=7)
        assert stage == "decode", "expected an error when the record is read"
        vision_doc_length(conv, processor_for(model), file=file, record_no=7)  # metadata only: no error yet
        to_vision_doc(conv, processor_for(model), model.config, file=file, record_no=7)
    assert info.value.file == file and info.value.record == 7
    for part in expected:
        assert part in str(info.value), str(info.value)


def test_placeholder_count_must_match_videos(tokenizer, model, media):
    check_error({"messages": chat("<video><video>Two?"), "videos": ["short.mp4"]}, tokenizer, model, media,
                "2 <video> placeholder(s) in the text but 1 video(s) in 'videos'")
    check_error({"messages": chat("<video>Which?")}, tokenizer, model, media, "1 <video> placeholder(s)",
                "0 video(s)")
    check_error({"messages": chat("<image>No video placeholder"), "images": ["a.png"], "videos": ["short.mp4"]},
                tokenizer, model, media, "0 <video> placeholder(s) in the text but 1 video(s)")
    check_error({"messages": chat("<video> and <|video_pad|>"), "videos": ["short.mp4"]}, tokenizer, model, media,
                "1 literal video token(s) besides its 1 <video> placeholder(s)")
    check_error({"messages": chat("Just <|video_pad|>")}, tokenizer, model, media, "1 literal video token(s)")
    check_error({"messages": [{"role": "user", "content": [{"type": "video", "video": "short.mp4"}]},
                              {"role": "assistant", "content": "ok"}], "videos": ["short.mp4"]},
                tokenizer, model, media, "both as content parts and in 'videos'")
    check_error({"messages": chat("<video>"), "videos": "short.mp4"}, tokenizer, model, media,
                "field 'videos' must be a list of path strings")


def test_bad_video_parts(tokenizer, model, media):
    def record(part):
        return {"messages": [{"role": "user", "content": [part]}, {"role": "assistant", "content": "ok"}]}

    check_error(record({"type": "video_url", "video_url": {}}), tokenizer, model, media, "messages[1].content[1]",
                "no video path")
    check_error(record({"type": "video_url", "video_url": {"url": "https://x.org/v.mp4"}}), tokenizer, model,
                media, "only local video files")


@pytest.mark.parametrize("name,reason", [("missing.mp4", "no such file"), ("empty.mp4", "empty file"),
                                         ("garbage.mp4", "not a video PyAV can read"),
                                         ("a.png", "this is an image"), (".", "not a file")])
def test_bad_videos_name_file_record_and_video(tokenizer, model, media, name, reason):
    record = {"messages": chat("<video>A", "<video>B"), "videos": ["short.mp4", name]}
    check_error(record, tokenizer, model, media, "record 7", f"video 2 of 2 ('{name}'", reason)


def test_video_corrupt_past_its_metadata_fails_when_decoded(tokenizer, model, media):
    """An AVI cut short keeps its header's frame count: its length is known at load, its frames fail at pack time."""
    record = {"messages": chat("<image><video>What happens?"), "images": ["a.png"], "videos": ["cut.avi"]}
    check_error(record, tokenizer, model, media, "video 1 of 1 ('cut.avi'", "ends after", stage="decode")


def test_bad_settings_and_unsupported_models_are_clear_errors(tokenizer, model, media):
    record = {"messages": chat("<video>What?"), "videos": ["short.mp4"]}
    with pytest.raises(ConfigError, match="max_frames"):
        read(record, tokenizer, model, media, video=VideoConfig(max_frames=1))
    from transformers import Kimi_K25Config

    ids = dict(zip(["vision_start_token_id", "vision_end_token_id", "image_token_id", "video_token_id"],
                   tokenizer.convert_tokens_to_ids(VISION_TOKENS)))
    kimi = Kimi_K25Config(**ids)
    with pytest.raises(ZeropadError, match="record 3: kimi_k25 models take no videos yet"):
        read_image_conversation(record, tokenizer, kimi, file=str(media / "data.json"), record_no=3)
