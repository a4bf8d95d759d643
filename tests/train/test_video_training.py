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

from tinyvideo import write_video
from packing import n_images, n_videos
from tinyvlm import vlm_run
from zeropad.config import build_config
from zeropad.data.dataset import BadSamplesError
from zeropad.data.multimodal import load_image_processor
from zeropad.data.vision import read_image_conversation, to_vision_doc, vision_doc_length
from zeropad.model.load import build_model, build_model_config
from zeropad.pack.collate import IGNORE_INDEX, shift_targets
from zeropad.verify import reference_forward_backward
from zeropad.train.loop import train


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
    assert sum(n_videos(d) for d in docs) == 2 and sum(n_images(d) for d in docs) == 2
    assert steps[0]["tokens"] == sum(len(d) for d in docs) == result.report.num_tokens
    # the video settings reached the run: the defaults (2 fps, 32 frames) would have made other lengths
    defaults = [read_image_conversation(r, tokenizer, model.config, file=str(data), record_no=i)
                for i, r in enumerate(GOOD, 1)]
    assert sum(vision_doc_length(c, processor, file=str(data), record_no=1) for c in defaults) != steps[0]["tokens"]
    logits, _ = reference_forward_backward(model, docs)
    targets = torch.cat([torch.from_numpy(shift_targets(d)) for d in docs])
    masks = targets != IGNORE_INDEX
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
