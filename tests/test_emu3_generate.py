"""A tiny Emu3 trains on text-to-image records (`zeropad train`: the packed text path, images as VQ-token targets)
and `zeropad generate OUTPUT/final --prompt ...` writes PNGs and a contact sheet from it, with and without
classifier-free guidance; bad input stops with a clear message."""

import json

import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from tinyemu3 import SIDE, emu3_config, emu3_tokenizer, text_to_image_records
from zeropad.cli import app
from zeropad.config import build_config
from zeropad.errors import ConfigError
from zeropad.train.loop import train


@pytest.fixture(scope="module")
def final(tmp_path_factory):
    root = tmp_path_factory.mktemp("emu3run")
    emu3_tokenizer(root / "tokenizer")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
    run = {
        "model": {"tokenizer": str(root / "tokenizer"), "config": emu3_config(tokenizer)},
        "data": {"sources": [{"path": str(text_to_image_records(root)), "format": "messages"}]},
        "vision": {"min_pixels": 16 * 16, "max_pixels": SIDE * SIDE},
        "pack": {"max_tokens": 256}, "train": {"steps": 1, "lr": 1e-3, "device": "cpu"},
        "log": {"progress": False}, "output_dir": str(root / "out"),
    }
    (root / "run.yaml").write_text(yaml.safe_dump(run))
    result = train(build_config(run))
    first = json.loads((root / "out" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["data"]["samples"] == 4
    assert 0 < result.final_loss < 20  # a number, not NaN
    return root / "out" / "final"


@pytest.mark.parametrize("guidance", [[], ["--guidance-scale", "3", "--negative-prompt", "blurry"]])
def test_generate_writes_pngs_of_the_trained_size(final, tmp_path, guidance):
    out = tmp_path / "images"
    result = CliRunner().invoke(app, ["generate", str(final), "--prompt", "draw picture 1", "--num", "3", "--out",
                                      str(out), "--top-k", "8", "--seed", "1", *guidance])
    assert result.exit_code == 0, result.output
    pngs = sorted(out.glob("0*.png"))
    assert len(pngs) == 3
    pictures = [Image.open(p) for p in pngs]
    assert all(p.size == (SIDE, SIDE) and p.mode == "RGB" for p in pictures)
    assert len({p.tobytes() for p in pictures}) == 3  # sampled, not copies
    assert Image.open(out / "grid.png").size == (3 * (SIDE + 2) + 2, SIDE + 4)


def test_generate_refuses_bad_input(final, tmp_path):
    from zeropad.model.emu3 import generate_emu3_images

    runner = CliRunner()
    negative_alone = runner.invoke(app, ["generate", str(final), "--prompt", "x", "--out", str(tmp_path / "a"),
                                         "--negative-prompt", "blurry"])
    assert negative_alone.exit_code != 0 and "needs classifier-free guidance" in str(negative_alone.exception)
    with pytest.raises(ConfigError, match="guidance_scale must be at least 1"):
        generate_emu3_images(final, "x", 1, tmp_path / "b", guidance_scale=0.5)
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "config.json").write_text((final / "config.json").read_text())
    with pytest.raises(ConfigError, match="no preprocessor_config.json"):
        generate_emu3_images(tmp_path / "bare", "x", 1, tmp_path / "c")


def test_pack_stats_plans_from_image_headers(final):
    result = CliRunner().invoke(app, ["pack-stats", str(final.parents[1] / "run.yaml"), "--show", "1"])
    assert result.exit_code == 0, result.output
    assert "4 records -> 4 samples, 230 tokens" in result.output  # the lengths training packed
    assert "<|image start|>4*4<|image token|>" in result.output
