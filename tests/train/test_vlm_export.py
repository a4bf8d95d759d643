"""`zeropad export` of a vision-language run: the Hugging Face directory loads with
AutoModelForImageTextToText, its image processor with the PIL backend (the processor the run trained with) and
its tokenizer, and the exported model gives the trained model's logits on an input with an image."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer
from typer.testing import CliRunner

from tinyvlm import vlm_run
from zeropad.cli import app
from zeropad.config import build_config
from zeropad.data.chat import Sample
from zeropad.data.kimi_image import Kimi_K25ImageProcessorPil
from zeropad.data.multimodal import load_image_processor
from zeropad.model.vlm import image_placeholder, unpacked_inputs
from zeropad.train.loop import train


def write_data(root):
    Image.new("RGB", (60, 40), (200, 30, 30)).save(root / "a.png")
    records = [{"messages": [{"role": "user", "content": "<image>What colour?"},
                             {"role": "assistant", "content": "red"}], "images": ["a.png"]},
               {"messages": [{"role": "user", "content": "No image."}, {"role": "assistant", "content": "ok"}]}]
    (root / "data.json").write_text(json.dumps(records))
    return root / "data.json"


def exported_processor(out, family):
    """The exported image processor as a user loads it: the PIL backend (Kimi's is zeropad's PIL implementation,
    transformers' own needs torchvision)."""
    if family == "kimi_k25":
        return Kimi_K25ImageProcessorPil.from_pretrained(out)
    return AutoImageProcessor.from_pretrained(out, backend="pil")


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "kimi_k25", "chameleon"])
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
    processor = exported_processor(out, family)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert type(exported).__name__ == type(trained).__name__ and exported.config.get_text_config().use_cache
    image = Image.new("RGB", (90, 50), (10, 120, 250))
    inputs = processor(images=[image], return_tensors="pt")
    as_trained = load_image_processor(cfg, trained.config)(images=[image], return_tensors="pt")
    assert inputs.keys() == as_trained.keys() and all(torch.equal(inputs[k], as_trained[k]) for k in inputs)

    grid = inputs["image_grid_thw"][0] if "image_grid_thw" in inputs else None
    ids = tokenizer("Look: ")["input_ids"] + image_placeholder(exported.config, grid) + tokenizer(" what?")["input_ids"]
    forward = unpacked_inputs(exported, Sample(np.asarray(ids), np.ones(len(ids), dtype=bool), dict(inputs)))
    trained.set_attn_implementation("sdpa" if family != "chameleon" else "eager")  # no zeropad varlen kwargs here
    with torch.no_grad():
        diff = (trained(**forward).logits - exported(**forward).logits).abs().max().item()
    assert diff <= 1e-5, diff
