"""What a run learns, before it spends compute: samples as text with their target tokens marked
(`zeropad pack-stats CONFIG --show N`)."""

from __future__ import annotations

from itertools import pairwise

import numpy as np

from zeropad.data.chat import Sample

OPEN, CLOSE = "⟦", "⟧"  # around every run of target tokens; rare in real text, so a run's edges stay visible
_GREEN, _RESET = "\033[32m", "\033[0m"


def marked_text(sample: Sample, tokenizer, color: bool = False) -> str:
    """The sample decoded (special tokens kept), each maximal run of target tokens wrapped in ⟦ ⟧ (and green
    when `color`)."""
    ids, mask = np.asarray(sample.input_ids), np.asarray(sample.loss_mask, dtype=bool)
    edges = [0, *(np.flatnonzero(np.diff(mask.astype(np.int8))) + 1).tolist(), len(ids)]
    parts = []
    for start, end in pairwise(edges):
        text = tokenizer.decode(ids[start:end].tolist(), skip_special_tokens=False)
        if mask[start]:
            text = f"{_GREEN}{OPEN}{text}{CLOSE}{_RESET}" if color else f"{OPEN}{text}{CLOSE}"
        parts.append(text)
    return "".join(parts)


def preview(samples: list, tokenizer, count: int, color: bool = False) -> str:
    """The first `count` distinct samples (copies made by a source weight are shown once), each with a header."""
    shown, seen = [], set()
    for item in samples:
        if len(shown) == count:
            break
        if id(item) in seen:
            continue
        seen.add(id(item))
        # A vision sample is shown as tokenized: one pad token per image or video (an Emu3 TargetSample: one
        # <image> per target image, its tokens made when its pack is built).
        sample = item.conversation.sample if hasattr(item, "conversation") else getattr(item, "sample", item)
        header = f"--- sample {len(shown) + 1}: {len(item)} tokens, {int(sample.loss_mask.sum())} trained ---"
        shown.append(f"{header}\n{marked_text(sample, tokenizer, color)}")
    return "\n".join(shown)
