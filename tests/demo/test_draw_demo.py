"""The drawing demo: digits data, pixel-token records, the classifier, the constrained sampler, and a shortened
`zeropad train --default draw` whose final/ feeds `zeropad draw`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForCausalLM, Qwen3Config
from typer.testing import CliRunner

from zeropad.cli import app
from zeropad.data.chat import tokenize_conversation
from zeropad.data.formats import to_conversation
from zeropad.demo.draw_task import (
    GRID_COLUMNS,
    HELDOUT_FILE,
    MODEL_CONFIG,
    NUM_HELDOUT,
    SPEC,
    TRAIN_FILE,
    DigitClassifier,
    _arrays,
    load_digits,
    load_records,
    make_record,
    parse_record,
    prompt,
    quantise,
    write_dataset,
)
from zeropad.demo.tokenizer import build_tokenizer
from zeropad.errors import ConfigError
from zeropad.images import GAP, IMAGE_END, IMAGE_START, SCALE, ImageSpec, sample_images

CELL = SPEC.width * SCALE + GAP


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("draw")
    write_dataset(out)
    return out


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok"), extra_tokens=SPEC.special_tokens())


def test_digits_are_shipped_real_and_split_disjointly(dataset):
    grey, labels = load_digits()
    assert grey.shape == (1797, 8, 8) and grey.min() == 0 and grey.max() == 16
    assert sorted(np.bincount(labels)) == [174, 177, 178, 179, 180, 181, 181, 182, 182, 183]
    train, heldout = load_records(dataset / TRAIN_FILE), load_records(dataset / HELDOUT_FILE)
    assert len(heldout) == NUM_HELDOUT and len(train) == 1797 - NUM_HELDOUT
    # every shipped digit is in exactly one split (as a multiset of images and labels)
    shipped = sorted((d, quantise(g).tobytes()) for g, d in zip(grey, labels.tolist()))
    written = sorted((d, levels.tobytes()) for levels, d in map(parse_record, train + heldout))
    assert written == shipped
    write_dataset(dataset / "again")
    assert (dataset / "again" / TRAIN_FILE).read_text() == (dataset / TRAIN_FILE).read_text()


def test_quantise_keeps_the_extremes_and_orders_levels():
    assert quantise(np.arange(17)).tolist() == [0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 3, 3, 3]


def test_a_record_is_prompt_then_64_pixel_targets(tokenizer):
    levels = quantise(load_digits()[0][0])
    record = make_record(levels, 8)
    assert record["messages"][0]["content"] == prompt(8) == "draw a 8"
    levels_back, digit = parse_record(record)
    assert digit == 8 and np.array_equal(levels_back, levels)
    conversation = to_conversation(record, "messages", "draw.jsonl", 1)
    sample = tokenize_conversation(conversation, tokenizer, train_on_prompt=False)
    targets = tokenizer.convert_ids_to_tokens(sample.input_ids[sample.loss_mask].tolist())
    # the targets: the image markers around one token per pixel, then the end of turn
    assert targets == [IMAGE_START, *[f"<px{v}>" for v in levels.reshape(-1)], IMAGE_END, "<|im_end|>", "Ċ"]
    assert tokenizer.convert_ids_to_tokens(sample.input_ids[~sample.loss_mask].tolist())[-1] == "Ċ"
    with pytest.raises(ValueError, match="levels in 0..3"):
        SPEC.to_text(levels + 1)


def test_classifier_recognises_real_digits_it_was_not_fitted_on(dataset, one_thread):
    classifier = DigitClassifier(*_arrays(load_records(dataset / HELDOUT_FILE)))
    levels, digits = _arrays(load_records(dataset / TRAIN_FILE))
    assert (classifier.predict(levels) == digits).mean() > 0.9
    assert (classifier.predict(np.roll(levels, 4, axis=2)) == digits).mean() < 0.5  # it reads the pictures


def test_sampler_draws_only_pixels_seeded_with_top_k_and_checks_arguments(tokenizer, one_thread):
    torch.manual_seed(0)
    config = dict(MODEL_CONFIG, hidden_size=32, num_hidden_layers=1, intermediate_size=64, head_dim=8,
                  vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = AutoModelForCausalLM.from_config(Qwen3Config(**config))
    # an untrained model prefers non-pixel tokens half the time: the constraint must still hold
    with torch.no_grad():
        model.lm_head.weight[: tokenizer.convert_tokens_to_ids("<px0>")] *= 30
    small = ImageSpec(height=2, width=3, levels=SPEC.levels)  # 6 steps a sample keep the test fast
    prompts = ["draw a 3"] * 4 + ["draw a longer thing"] * 3  # two prompt lengths: two groups
    first = sample_images(model, tokenizer, small, prompts, seed=1, batch_size=3)
    assert first.shape == (7, 2, 3) and first.min() >= 0 and first.max() < SPEC.levels
    assert len(np.unique(first)) == SPEC.levels  # sampled, not argmax
    assert np.array_equal(first, sample_images(model, tokenizer, small, prompts, seed=1, batch_size=3))
    greedy = [sample_images(model, tokenizer, small, prompts[:3], top_k=1, seed=s) for s in (0, 1)]
    assert np.array_equal(greedy[0], greedy[1]) and (greedy[0] == greedy[0][0]).all()
    for bad in ({"prompts": []}, {"temperature": 0.0}, {"top_k": SPEC.levels + 1}):
        with pytest.raises(ConfigError):
            sample_images(model, tokenizer, small, **{"prompts": prompts[:2], **bad})


def test_default_draw_shortened_writes_grid_score_and_final_that_draws(tmp_path, one_thread):
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--default", "draw", "train.steps=2", f"output_dir={out}",
                                      f"data.cache_dir={tmp_path / 'cache'}", "log.progress=false"])
    assert result.exit_code == 0, result.output
    assert "generated digits recognised as the requested digit" in result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["draw_samples"] == 500 and summary["draw_chance"] == 0.1
    assert 0.0 <= summary["draw_recognised"] <= 1.0 and len(summary["draw_recognised_per_digit"]) == 10
    assert summary["draw_recognised"] == pytest.approx(np.mean(summary["draw_recognised_per_digit"]))
    assert summary["classifier_real_accuracy"] > 0.9
    with Image.open(out / "samples" / "grid.png") as grid:
        assert grid.size == (GRID_COLUMNS * CELL + GAP, 10 * CELL + GAP)

    drawn = tmp_path / "drawn"
    result = CliRunner().invoke(app, ["generate", str(out / "final"), "--prompt", "draw a 3", "--num", "3",
                                      "--out", str(drawn), "--top-k", "2"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in drawn.iterdir()) == ["0000.png", "0001.png", "0002.png", "grid.png"]
    for name in ["0000.png", "0001.png", "0002.png"]:
        with Image.open(drawn / name) as picture:
            assert picture.size == (64, 64) and picture.mode == "L"
    with Image.open(drawn / "grid.png") as grid:
        assert grid.size == (3 * CELL + GAP, CELL + GAP)

    not_an_image_model = CliRunner().invoke(app, ["generate", str(tmp_path / "cache"), "--prompt", "x",
                                                  "--out", str(tmp_path / "no")])
    assert not_an_image_model.exit_code != 0
    assert "image_tokens.json" in str(not_an_image_model.exception) + not_an_image_model.output
