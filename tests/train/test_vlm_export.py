"""`zeropad export` of a vision-language run: the Hugging Face directory loads with
AutoModelForImageTextToText, its image processor with the PIL backend (the processor the run trained with) and
its tokenizer, and the exported model gives the trained model's logits on an input with an image."""

import json

import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer
from typer.testing import CliRunner

from tinyvlm import vlm_run
from zeropad.cli import app
from zeropad.config import build_config
from zeropad.data.multimodal import load_image_processor
from zeropad.model.vlm import image_placeholder, mm_token_type_ids
from zeropad.train.loop import train


def write_data(root):
    Image.new("RGB", (60, 40), (200, 30, 30)).save(root / "a.png")
    records = [{"messages": [{"role": "user", "content": "<image>What colour?"},
                             {"role": "assistant", "content": "red"}], "images": ["a.png"]},
               {"messages": [{"role": "user", "content": "No image."}, {"role": "assistant", "content": "ok"}]}]
    (root / "data.json").write_text(json.dumps(records))
    return root / "data.json"


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_vlm_export_loads_with_its_processor_and_gives_the_trained_logits(tmp_path, one_thread, family):
    cfg = build_config(vlm_run(tmp_path, write_data(tmp_path), family=family, train={"steps": 2},
                               checkpoint={"every_steps": 2}))
    trained = train(cfg).model.eval()  # == the step-2 checkpoint's weights
    out = tmp_path / "hf"
    cli = CliRunner().invoke(app, ["export", cfg.output_dir, str(out)])
    assert cli.exit_code == 0, cli.output
    assert "step_000002" in cli.output and "AutoModelForImageTextToText.from_pretrained loads it" in cli.output
    assert "zeropad" not in (out / "config.json").read_text()  # loads without zeropad's attention

    exported = AutoModelForImageTextToText.from_pretrained(out).eval()
    processor = AutoImageProcessor.from_pretrained(out, backend="pil")
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert type(exported).__name__ == type(trained).__name__ and exported.config.get_text_config().use_cache
    image = Image.new("RGB", (90, 50), (10, 120, 250))
    inputs = processor(images=[image], return_tensors="pt")
    as_trained = load_image_processor(cfg, trained.config)(images=[image], return_tensors="pt")
    assert torch.equal(inputs["pixel_values"], as_trained["pixel_values"])
    assert torch.equal(inputs["image_grid_thw"], as_trained["image_grid_thw"])

    ids = (tokenizer("Look: ")["input_ids"] + image_placeholder(exported.config, inputs["image_grid_thw"][0])
           + tokenizer(" what colour?")["input_ids"])
    ids = torch.tensor([ids])
    forward = dict(input_ids=ids, pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"],
                   mm_token_type_ids=mm_token_type_ids(ids, exported.config))
    trained.set_attn_implementation("sdpa")  # the exported model's default; no zeropad varlen kwargs here
    with torch.no_grad():
        diff = (trained(**forward).logits - exported(**forward).logits).abs().max().item()
    assert diff <= 1e-5, diff
