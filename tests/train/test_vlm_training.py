"""Image conversations through the real training loop: the packed step's loss equals the per-document
reference, the real demo data trains end to end, a saved VLM directory trains again, bad images are
named or counted."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from packing import n_images
from tinyvlm import vlm_run
from zeropad.config import build_config
from zeropad.data.dataset import BadSamplesError
from zeropad.data.multimodal import load_image_processor
from zeropad.data.vision import read_image_conversation, to_vision_doc
from zeropad.model.load import build_model, build_model_config
from zeropad.pack.collate import IGNORE_INDEX, shift_targets
from zeropad.train.metrics import FlopCounter, media_grids
from zeropad.verify import reference_forward_backward
from zeropad.train.loop import train

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"


def write_images_data(root: Path, records: list[dict], sizes: dict[str, tuple[int, int]]) -> Path:
    for i, (name, size) in enumerate(sizes.items()):
        Image.new("RGB", size, (40 * i, 100, 200 - 30 * i)).save(root / name)
    data = root / "data.json"
    data.write_text(json.dumps(records))
    return data


def conversation(question: str, answer: str, images: list[str]) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
            "images": images}


GOOD = [conversation("<image>What colour?", "blue", ["a.png"]),
        conversation("Compare <image> and <image>.", "the first is wider", ["a.png", "b.png"]),
        conversation("No image here.", "fine", []),
        conversation("<image>Size?", "tall", ["b.png"])]


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl_moe", "kimi_k25", "chameleon"])
def test_first_step_loss_equals_per_document_reference(tmp_path, one_thread, family):
    """One path for a dense VLM, MoE VLMs (aux loss and expert load logged; Kimi's routing is aux-loss-free) and an
    early-fusion model (images become VQ codes in the text; image tokens are not targets)."""
    data = write_images_data(tmp_path, GOOD, {"a.png": (90, 40), "b.png": (30, 70)})
    cfg = build_config(vlm_run(tmp_path, data, family, train={"steps": 1}))
    train(cfg)
    step1 = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()][1]
    if family == "qwen3_vl_moe":
        assert step1["aux_loss"] > 0 and step1["expert_load_max"] >= 1.0 and "expert_load_max/layer_1" in step1
    if family == "kimi_k25":  # dense layer 0, routed layer 1
        assert step1["aux_loss"] == 0 and "expert_load_max/layer_1" in step1 and "expert_load_max/layer_0" not in step1

    # The same fresh model (same seed) and documents, each alone, unpacked, eager attention.
    model_config = build_model_config(cfg.model)
    processor = load_image_processor(cfg, model_config)
    model = build_model(cfg.model, seed=cfg.train.seed)
    model.set_attn_implementation("eager")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer)
    docs = [to_vision_doc(read_image_conversation(r, tokenizer, model.config, file=str(data), record_no=i),
                          processor, model.config, file=str(data), record_no=i) for i, r in enumerate(GOOD, 1)]
    assert sum(n_images(d) for d in docs) == 4 and step1["tokens"] == sum(len(d) for d in docs)
    logits, _ = reference_forward_backward(model, docs)
    targets = torch.cat([torch.from_numpy(shift_targets(d)) for d in docs])
    masks = targets != IGNORE_INDEX
    image_token = model.config.image_token_id
    assert not (targets == image_token).any() and sum(int((d.input_ids == image_token).sum()) for d in docs) > 0
    expected = torch.nn.functional.cross_entropy(logits[masks], targets[masks]).item()
    assert step1["target_tokens"] == int(masks.sum())
    assert step1["loss"] == pytest.approx(expected, rel=1e-5)

    # the logged FLOPs count the language model per token and the vision tower per image patch
    counter = FlopCounter(model)
    grids = [g for d in docs for g in media_grids(d.media)]
    assert (len(grids) == 4) == (family != "chameleon")  # Chameleon's images are VQ codes in the text
    logged = step1["tflops"] * 1e12 * step1["tokens"] / step1["tokens_per_s"]
    assert logged == pytest.approx(counter([len(d) for d in docs], grids), rel=1e-9)


@pytest.mark.skipif(not (SHARED / "mllm_demo.json").is_file(), reason="../shared/data is absent")
@pytest.mark.parametrize("family", ["qwen2_5_vl", "kimi_k25"])
def test_real_demo_data_trains_and_the_saved_directory_trains_again(tmp_path, one_thread, family):
    cfg = vlm_run(tmp_path, SHARED / "mllm_demo.json", family, train={"steps": 6, "lr": 3e-3},
                  pack={"max_tokens": 1024})
    result = train(build_config(cfg))
    losses = [json.loads(line)["loss"] for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
              if "loss" in line]
    assert result.report.num_samples == 6 and len(losses) == 6
    assert losses[-1] < losses[0]
    final = tmp_path / "out" / "final"
    assert (final / "preprocessor_config.json").is_file() and (final / "config.json").is_file()

    # A model directory with config, weights, tokenizer and preprocessor_config.json trains as it is.
    again = {**cfg, "model": {"path": str(final)}, "output_dir": str(tmp_path / "again")}
    again["train"] = {**cfg["train"], "steps": 1, "lr": 1e-9}
    del again["vision"]  # the saved processor's own limits
    resumed = train(build_config(again))
    assert resumed.final_loss == pytest.approx(losses[-1], rel=0.2)


def test_bad_images_are_named_or_counted(tmp_path, one_thread):
    records = GOOD + [conversation("<image>Missing?", "yes", ["missing.png"]),
                      conversation("<image><image>Two?", "one image only", ["a.png"]),
                      conversation("<image>Corrupt?", "yes", ["broken.png"])]
    data = write_images_data(tmp_path, records, {"a.png": (90, 40), "b.png": (30, 70), "broken.png": (64, 64)})
    raw = (tmp_path / "broken.png").read_bytes()
    (tmp_path / "broken.png").write_bytes(raw[: len(raw) // 2])  # header intact, pixel data cut

    with pytest.raises(BadSamplesError) as err:
        train(build_config(vlm_run(tmp_path, data)))
    message = str(err.value)
    assert "2 unusable record(s)" in message and "record 5" in message and "missing.png" in message
    assert "record 6" in message and "2 <image> placeholder(s)" in message

    result = train(build_config(vlm_run(tmp_path, data, name="skip", data={"on_bad_sample": "skip"})))
    counts = json.loads((tmp_path / "skip" / "summary.json").read_text())["data_counts"]
    # two found while loading, the corrupt pixels when its pack was built
    assert result.report.skipped.total() == 3 and counts["skipped"] == 3
    assert any("broken.png" in reason and "corrupt" in reason for reason in counts["skipped_by_reason"])


def test_frozen_vision_tower_stays_bitwise_and_groups_get_their_own_lr(tmp_path, one_thread):
    from transformers import AutoModelForImageTextToText

    data = write_images_data(tmp_path, GOOD, {"a.png": (90, 40), "b.png": (30, 70)})
    cfg = build_config(vlm_run(tmp_path, data, train={"steps": 3, "freeze": ["vision"], "warmup_steps": 1,
                                                      "group_lr": {"projector": 5e-3}}))
    train(cfg)
    initial = build_model(cfg.model, seed=cfg.train.seed).state_dict()
    final = AutoModelForImageTextToText.from_pretrained(tmp_path / "out" / "final").state_dict()
    vision = [k for k in final if k.startswith("model.visual.") and ".merger." not in k]
    changed = {k for k in final if not torch.equal(final[k], initial[k])}
    assert vision and not changed & set(vision)
    assert any(".merger." in k for k in changed) and any("language_model" in k for k in changed)
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()][1:]
    assert records[0]["lr_projector"] == pytest.approx(5e-3) and records[0]["lr_language"] == pytest.approx(1e-3)
    assert "lr_vision" not in records[0]


def test_pack_stats_reads_image_data(tmp_path):
    import yaml
    from typer.testing import CliRunner

    from zeropad.cli import app

    data = write_images_data(tmp_path, GOOD, {"a.png": (90, 40), "b.png": (30, 70)})
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(vlm_run(tmp_path, data)))
    result = CliRunner().invoke(app, ["pack-stats", str(config)])
    assert result.exit_code == 0, result.output
    assert "4 records -> 4 samples, 177 tokens" in result.output
