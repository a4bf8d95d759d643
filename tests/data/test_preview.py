"""pack-stats --show: samples as text with their target runs marked (vision samples as tokenized, copies once)."""

import numpy as np

from zeropad.data.chat import Sample
from zeropad.data.multimodal import VisionSample
from zeropad.data.preview import marked_text, preview
from zeropad.data.vision import ImageConversation
from zeropad.demo.tokenizer import build_tokenizer


def test_preview_marks_target_runs_shows_copies_once_and_vision_samples_as_tokenized(tmp_path):
    tokenizer = build_tokenizer(tmp_path, vision=True)
    ids = tokenizer("Q<|image_pad|>?A!B", add_special_tokens=False)["input_ids"]
    sample = Sample(np.asarray(ids), np.asarray([0, 0, 0, 1, 1, 0], dtype=bool))
    assert marked_text(sample, tokenizer) == "Q<|image_pad|>?⟦A!⟧B"
    assert marked_text(sample, tokenizer, color=True) == "Q<|image_pad|>?\033[32m⟦A!⟧\033[0mB"
    vision = VisionSample(ImageConversation(sample, ("a.png",), (tmp_path / "a.png",)), 21, "d.json", 1)
    assert preview([vision, vision, sample], tokenizer, 5) == (
        "--- sample 1: 21 tokens, 2 trained ---\nQ<|image_pad|>?⟦A!⟧B\n"
        "--- sample 2: 6 tokens, 2 trained ---\nQ<|image_pad|>?⟦A!⟧B")
    assert preview([sample, sample], tokenizer, 1).count("--- sample") == 1
