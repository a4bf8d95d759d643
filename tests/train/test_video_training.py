"""Video conversations through the real training loop (tiny Qwen2.5-VL and Qwen3-VL from scratch): records with
a generated video and an image train, the first step's loss equals the per-document reference decoded with the
run's `video` settings, and bad videos are named or counted."""

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer

from tinyvideo import VISION_TOKENS, write_video
from zeropad.config import build_config
from zeropad.data.dataset import BadSamplesError
from zeropad.data.multimodal import load_image_processor
from zeropad.data.vision import read_image_conversation, to_vision_doc, vision_doc_length
from zeropad.demo.tokenizer import build_tokenizer
from zeropad.model.load import build_model, build_model_config
from zeropad.model.vlm import reference_forward_backward
from zeropad.train.loop import train


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def vlm_run(root: Path, data_file: Path, family: str = "qwen2_5_vl", name: str = "out", **sections) -> dict:
    """A ~0.2M-parameter Qwen2.5-VL or Qwen3-VL from scratch with the offline char tokenizer plus vision tokens."""
    tokenizer_dir = root / "tokenizer"
    tokenizer = build_tokenizer(tokenizer_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": VISION_TOKENS})
    tokenizer.save_pretrained(tokenizer_dir)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS}
    text = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    vision = dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=64)
    if family == "qwen2_5_vl":
        text["rope_parameters"] = dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3])
        vision.update(patch_size=14, window_size=56, fullatt_block_indexes=[1])
    else:
        text.update(head_dim=16, rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                                      mrope_section=[4, 2, 2], mrope_interleaved=True))
        vision.update(patch_size=16, num_position_embeddings=64, deepstack_visual_indexes=[0])
    unit = vision["patch_size"] * 2
    model = dict(model_type=family, vocab_size=len(tokenizer), image_token_id=ids["<|image_pad|>"],
                 video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                 vision_end_token_id=ids["<|vision_end|>"], eos_token_id=tokenizer.eos_token_id,
                 text_config=text, vision_config=vision)
    cfg = {
        "model": {"config": model, "tokenizer": str(tokenizer_dir)},
        "data": {"sources": [{"path": str(data_file), "format": "messages"}]},
        "vision": {"min_pixels": unit * unit, "max_pixels": unit * unit * 16},  # <= 16 visual tokens per image
        "video": {"fps": 1.0, "max_frames": 4, "max_pixels": unit * unit * 4},  # <= 2 x 4 tokens per video
        "pack": {"max_tokens": 8192},
        "train": {"steps": 2, "lr": 1e-3, "device": "cpu"},
        "log": {"progress": False},
        "output_dir": str(root / name),
    }
    for section, values in sections.items():
        cfg[section] = {**cfg.get(section, {}), **values}
    return cfg


def record(question: str, answer: str, images=(), videos=()) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
            "images": list(images), "videos": list(videos)}


GOOD = [record("<image>What is in <video>?", "a ball", ["a.png"], ["clip.mp4"]),
        record("What happens in <video>?", "it rolls", videos=["long.avi"]),
        record("No media here.", "fine"),
        record("<image>Colour?", "blue", ["a.png"])]


def write_data(root: Path, records: list[dict]) -> Path:
    Image.new("RGB", (90, 40), (40, 100, 200)).save(root / "a.png")
    write_video(root / "clip.mp4", (64, 48), num_frames=20, fps=10, seed=1)  # 2 s
    whole = write_video(root / "long.avi", (80, 56), num_frames=60, fps=10, seed=2)  # 6 s
    (root / "cut.avi").write_bytes(whole.read_bytes()[: int(whole.stat().st_size * 0.9)])  # metadata intact
    data = root / "data.json"
    data.write_text(json.dumps(records))
    return data


def step_records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_videos_train_and_the_first_loss_equals_the_reference(tmp_path, one_thread, family):
    data = write_data(tmp_path, GOOD)
    cfg = build_config(vlm_run(tmp_path, data, family))
    result = train(cfg)
    steps = step_records(tmp_path / "out")
    assert len(steps) == 2 and all(math.isfinite(s["loss"]) for s in steps)

    # The same fresh model (same seed) and documents, decoded with the run's video settings, each alone, eager.
    model_config = build_model_config(cfg.model)
    processor = load_image_processor(cfg, model_config)
    model = build_model(cfg.model, seed=cfg.train.seed)
    model.set_attn_implementation("eager")
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer)
    convs = [read_image_conversation(r, tokenizer, model.config, file=str(data), record_no=i, video=cfg.video)
             for i, r in enumerate(GOOD, 1)]
    docs = [to_vision_doc(c, processor, model.config, file=str(data), record_no=i) for i, c in enumerate(convs, 1)]
    assert sum(d.num_videos for d in docs) == 2 and sum(d.num_images for d in docs) == 2
    assert steps[0]["tokens"] == sum(len(d) for d in docs) == result.report.num_tokens
    # the video settings reached the run: the defaults (2 fps, 32 frames) would have made other lengths
    defaults = [read_image_conversation(r, tokenizer, model.config, file=str(data), record_no=i)
                for i, r in enumerate(GOOD, 1)]
    assert sum(vision_doc_length(c, processor, file=str(data), record_no=1) for c in defaults) != steps[0]["tokens"]
    logits, _ = reference_forward_backward(model, docs)
    targets = torch.cat([torch.cat([d.input_ids[1:], d.input_ids[:1]]) for d in docs])
    masks = torch.cat([torch.cat([d.loss_mask[1:], torch.tensor([False])]) for d in docs])
    assert steps[0]["target_tokens"] == int(masks.sum())
    expected = torch.nn.functional.cross_entropy(logits[masks], targets[masks]).item()
    assert steps[0]["loss"] == pytest.approx(expected, rel=1e-5)


def test_bad_videos_are_named_or_counted(tmp_path, one_thread):
    records = GOOD + [record("<video>Missing?", "yes", videos=["missing.mp4"]),
                      record("<video>Cut?", "yes", videos=["cut.avi"])]
    data = write_data(tmp_path, records)
    with pytest.raises(BadSamplesError) as err:
        train(build_config(vlm_run(tmp_path, data)))
    message = str(err.value)
    assert "1 unusable record(s)" in message and "record 5" in message and "missing.mp4" in message

    result = train(build_config(vlm_run(tmp_path, data, name="skip", data={"on_bad_sample": "skip"})))
    counts = json.loads((tmp_path / "skip" / "summary.json").read_text())["data_counts"]
    assert result.report.skipped.total() == 2 and counts["skipped"] == 2  # missing at load, cut at pack time
    assert any("cut.avi" in reason and "ends after" in reason for reason in counts["skipped_by_reason"])
    assert all(math.isfinite(s["loss"]) for s in step_records(tmp_path / "skip"))
