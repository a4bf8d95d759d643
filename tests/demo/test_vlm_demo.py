"""The vision demo's data, tokenizer, tiny model and answer-accuracy metric (fast: a few training steps only)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoConfig, AutoModelForImageTextToText, AutoTokenizer, Qwen2VLImageProcessorPil

from zeropad.config import build_config
from zeropad.data.vision import read_image_conversation, to_vision_doc
from packing import pack_docs
from zeropad.demo import vlm_task
from zeropad.demo.tokenizer import VISION_TOKENS, build_tokenizer
from zeropad.demo.vlm_task import (
    COLOURS,
    HELDOUT_FILE,
    IMAGE_PLACEHOLDER,
    MODEL_CONFIG,
    QUESTIONS,
    SHAPES,
    TRAIN_FILE,
    answer_accuracy,
    blind_baseline,
    default_config,
    load_records,
    question_answers,
    write_dataset,
)
from zeropad.model.vlm import packed_attn_implementation
from zeropad.pack.collate import IGNORE_INDEX

NUM_TRAIN, NUM_HELDOUT = 24, 6


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    build_tokenizer(path, vision=True)
    return AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    train_path, heldout_path = write_dataset(out, seed=0, num_train_images=NUM_TRAIN, num_heldout_images=NUM_HELDOUT)
    return out, load_records(train_path), load_records(heldout_path)


def model_config(tokenizer, **text_overrides):
    text = dict(MODEL_CONFIG["text_config"], vocab_size=len(tokenizer), bos_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **text_overrides)
    kwargs = {k: v for k, v in MODEL_CONFIG.items() if k != "model_type"}
    return AutoConfig.for_model(MODEL_CONFIG["model_type"], **dict(kwargs, text_config=text))


def make_processor(config) -> Qwen2VLImageProcessorPil:
    """As the training loop builds it for a model from scratch: from the vision config and the demo's pixel range."""
    v = config.vision_config
    return Qwen2VLImageProcessorPil(patch_size=v.patch_size, merge_size=v.spatial_merge_size,
                                    temporal_patch_size=v.temporal_patch_size, min_pixels=vlm_task.MIN_PIXELS,
                                    max_pixels=vlm_task.MAX_PIXELS)


@pytest.fixture(scope="module")
def config(tokenizer):
    return model_config(tokenizer)


@pytest.fixture(scope="module")
def processor(config):
    return make_processor(config)


def vision_docs(records, path: Path, tokenizer, processor, config):
    docs = []
    for record_no, record in enumerate(records, start=1):
        conv = read_image_conversation(record, tokenizer, config, file=str(path), record_no=record_no)
        docs.append(to_vision_doc(conv, processor, config, file=str(path), record_no=record_no))
    return docs


def test_tokenizer_vision_tokens_come_after_the_text_ones(tokenizer, tmp_path):
    text_only = build_tokenizer(tmp_path)
    assert len(text_only) == 259 and len(tokenizer) == 263
    assert text_only.get_vocab() == {t: i for t, i in tokenizer.get_vocab().items() if t not in VISION_TOKENS}
    for name, token in zip(("vision_start", "vision_end", "image", "video"), VISION_TOKENS):
        assert tokenizer.encode(token, add_special_tokens=False) == [MODEL_CONFIG[f"{name}_token_id"]]
    text = "<|vision_start|><|image_pad|><|vision_end|>What colour?"
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_dataset_is_deterministic(dataset, tmp_path):
    out, train, heldout = dataset
    again = tmp_path / "again"
    write_dataset(again, seed=0, num_train_images=NUM_TRAIN, num_heldout_images=NUM_HELDOUT)
    for name in (TRAIN_FILE, HELDOUT_FILE):
        assert (again / name).read_text() == (out / name).read_text()
    for ref in {r["images"][0] for r in train + heldout}:
        assert (again / ref).read_bytes() == (out / ref).read_bytes()
    write_dataset(tmp_path / "other", seed=1, num_train_images=NUM_TRAIN, num_heldout_images=NUM_HELDOUT)
    assert (tmp_path / "other" / TRAIN_FILE).read_text() != (out / TRAIN_FILE).read_text()


def test_dataset_is_well_formed(dataset):
    out, train, heldout = dataset
    assert len(train) == NUM_TRAIN and len(heldout) == len(QUESTIONS) * NUM_HELDOUT
    valid = {"colour": set(COLOURS), "shape": set(SHAPES)}
    kind_of = {question: kind for kind, question in QUESTIONS.items()}
    for record in train + heldout:
        text = "".join(m["content"] for m in record["messages"])
        assert text.count(IMAGE_PLACEHOLDER) == len(record["images"]) == 1
        assert record["messages"][0]["content"].startswith(IMAGE_PLACEHOLDER)
        assert [m["role"] for m in record["messages"]] == ["user", "assistant"] * (len(record["messages"]) // 2)
        image = Image.open(out / record["images"][0])
        assert vlm_task.MIN_SIDE <= min(image.size) and max(image.size) <= vlm_task.MAX_SIDE
        pixels = {rgb for _, rgb in image.convert("RGB").getcolors(maxcolors=image.width * image.height)}
        for question, answer in question_answers(record):
            assert answer in valid[kind_of[question]]
            if kind_of[question] == "colour":  # the answer's colour is drawn and no other shape colour is
                assert {c for c, rgb in COLOURS.items() if rgb in pixels} == {answer}
    # every training record asks every question, in a varying order; held-out records ask one
    assert all(sorted(q for q, _ in question_answers(r)) == sorted(QUESTIONS.values()) for r in train)
    assert len({tuple(q for q, _ in question_answers(r)) for r in train}) > 1
    assert all(len(r["messages"]) == 2 for r in heldout)


def test_heldout_images_are_unseen(dataset):
    out, train, heldout = dataset
    digest = lambda ref: hashlib.sha256((out / ref).read_bytes()).hexdigest()  # noqa: E731
    train_refs = {r["images"][0] for r in train}
    heldout_refs = {r["images"][0] for r in heldout}
    assert len(train_refs) == NUM_TRAIN and len(heldout_refs) == NUM_HELDOUT
    assert not train_refs & heldout_refs
    assert not {digest(ref) for ref in train_refs} & {digest(ref) for ref in heldout_refs}


def test_every_record_becomes_a_vision_doc(dataset, tokenizer, processor, config):
    out, train, heldout = dataset
    docs = vision_docs(train, out / TRAIN_FILE, tokenizer, processor, config)
    docs += vision_docs(heldout, out / HELDOUT_FILE, tokenizer, processor, config)
    merge = config.vision_config.spatial_merge_size
    visual_counts = set()
    for doc, record in zip(docs, train + heldout):
        t, h, w = doc.media["image_grid_thw"][0].tolist()
        num_visual = int((doc.input_ids == config.image_token_id).sum())
        assert num_visual == t * h * w // merge**2
        visual_counts.add(num_visual)
        # the targets are exactly the answers, each with its end of turn as the chat template renders it
        expected = "".join(f"{a}{tokenizer.eos_token}\n" for _, a in question_answers(record))
        assert tokenizer.decode(doc.input_ids[doc.loss_mask]) == expected
    assert min(visual_counts) >= 16 and max(visual_counts) <= 64 and len(visual_counts) >= 3


def test_a_few_training_steps_lower_the_loss(dataset, tokenizer, processor, config):
    out, train, _ = dataset
    docs = vision_docs(train[:8], out / TRAIN_FILE, tokenizer, processor, config)
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config, attn_implementation=packed_attn_implementation())
    packs = [pack_docs(model, docs[:4]), pack_docs(model, docs[4:])]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(8):
        pack = packs[step % 2]
        logits = model(**pack.model_inputs()).logits[0]
        loss = F.cross_entropy(logits, pack.target_ids[0], ignore_index=IGNORE_INDEX, reduction="sum")
        loss = loss / pack.num_targets
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-2] + losses[-1] < 0.7 * (losses[0] + losses[1]), losses


class _OracleVL(torch.nn.Module):
    """Answers every held-out question from a table keyed by (prompt ids, image pixels); `corrupt` answers wrong.
    Stands in for a trained model: answer_accuracy only calls generate, the attention switch and train/eval."""

    def __init__(self, config, tokenizer, docs_and_answers, corrupt: bool = False):
        super().__init__()
        self.config = config
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.table = {}
        for doc, answer in docs_and_answers:
            prompt = doc.input_ids[: int(doc.loss_mask.argmax())]
            reply = ("x" if corrupt else "") + answer
            key = (tuple(prompt.tolist()), _pixel_key(doc.media["pixel_values"]))
            self.table[key] = tokenizer.encode(reply, add_special_tokens=False) + [tokenizer.eos_token_id]
        self.attn_calls = []

    def set_attn_implementation(self, implementation):
        self.attn_calls.append(implementation)
        for name, value in implementation.items():
            getattr(self.config, name)._attn_implementation = value

    def generate(self, input_ids, pixel_values, image_grid_thw, max_new_tokens, **kwargs):
        assert self.config.text_config._attn_implementation == "sdpa" and not self.training
        sizes = image_grid_thw.prod(-1).tolist()
        rows = []
        for ids, pixels in zip(input_ids.tolist(), torch.split(pixel_values, sizes)):
            rows.append(ids + self.table[(tuple(ids), _pixel_key(pixels))][:max_new_tokens])
        width = max(map(len, rows))
        return torch.tensor([row + [kwargs["pad_token_id"]] * (width - len(row)) for row in rows])


def _pixel_key(pixels: torch.Tensor) -> str:
    return hashlib.sha256(pixels.numpy().tobytes()).hexdigest()


def test_answer_accuracy_of_an_oracle_and_a_wrong_oracle(dataset, tokenizer, processor, config):
    out, _, heldout = dataset
    docs = vision_docs(heldout, out / HELDOUT_FILE, tokenizer, processor, config)
    answers = [r["messages"][1]["content"] for r in heldout]
    for corrupt, expected in ((False, 1.0), (True, 0.0)):
        model_config = config.__class__.from_dict(config.to_dict())
        model_config.text_config._attn_implementation = "zeropad_varlen"
        oracle = _OracleVL(model_config, tokenizer, list(zip(docs, answers)), corrupt=corrupt)
        oracle.train()
        assert answer_accuracy(oracle, tokenizer, processor, heldout, out) == expected
        assert oracle.training and model_config.text_config._attn_implementation == "zeropad_varlen"


def test_answer_accuracy_of_an_untrained_model_is_low_and_restores_it(dataset, tokenizer, processor, config):
    out, train, heldout = dataset
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config, attn_implementation=packed_attn_implementation())
    model.train()
    assert answer_accuracy(model, tokenizer, processor, heldout, out, max_new_tokens=3) <= 0.2
    assert model.training
    assert model.config.text_config._attn_implementation == "zeropad_varlen"
    assert model.config.vision_config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match="one question"):
        answer_accuracy(model, tokenizer, processor, train[:1], out)
    assert 0.0 <= blind_baseline(train, heldout) <= 1.0


def test_default_config_validates_and_builds(tmp_path, monkeypatch):
    monkeypatch.setattr(vlm_task, "NUM_TRAIN_IMAGES", 5)
    monkeypatch.setattr(vlm_task, "NUM_HELDOUT_IMAGES", 2)
    cfg = build_config(default_config(str(tmp_path)))
    assert cfg.output_dir == str(tmp_path)
    demo_dir = tmp_path / "demo_vlm"
    assert len(load_records(demo_dir / TRAIN_FILE)) == 5 and len(load_records(demo_dir / HELDOUT_FILE)) == 2 * len(QUESTIONS)
    assert [s.path for s in cfg.data.sources] == [str(demo_dir / TRAIN_FILE)]
    assert (cfg.vision.min_pixels, cfg.vision.max_pixels) == (vlm_task.MIN_PIXELS, vlm_task.MAX_PIXELS)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer)
    overrides = dict(cfg.model.config)
    config = AutoConfig.for_model(overrides.pop("model_type"), **overrides)
    assert config.text_config.vocab_size == len(tokenizer) == 263
    assert config.text_config.eos_token_id == tokenizer.eos_token_id
    ids = tokenizer.convert_tokens_to_ids(["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"])
    assert [config.vision_start_token_id, config.vision_end_token_id, config.image_token_id,
            config.video_token_id] == ids
    assert config.vision_config.out_hidden_size == config.text_config.hidden_size
    with torch.device("meta"):
        n_params = sum(p.numel() for p in AutoModelForImageTextToText.from_config(config).parameters())
    assert 0.3e6 <= n_params <= 3e6
