"""The exactness check: a packed forward/backward equals the per-document unpadded forward/backward.

The reference is the same Hugging Face model with eager attention, one document at a time, no padding.
Used by `zeropad verify MODEL_DIR` and by the test suite for every supported model family.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from zeropad.data.chat import Sample
from zeropad.model.attention import ATTN_NAME
from zeropad.family import media_family
from zeropad.model.vlm import packed_attn_implementation, position_rule, unpacked_inputs
from zeropad.pack.collate import IGNORE_INDEX, PositionRule, collate, shift_targets

TOLERANCE = 1e-5


@dataclass
class ExactnessReport:
    doc_lengths: list[int]
    max_logit_diff: float
    max_grad_diff: float
    worst_param: str
    tolerance: float = TOLERANCE

    @property
    def passed(self) -> bool:
        return self.max_logit_diff <= self.tolerance and self.max_grad_diff <= self.tolerance

    def summary(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        return (
            f"{verdict}: {len(self.doc_lengths)} documents {self.doc_lengths} in one pack; "
            f"max |logits diff| = {self.max_logit_diff:.3e}, max |grad diff| = {self.max_grad_diff:.3e} "
            f"(worst: {self.worst_param}), tolerance {self.tolerance:.0e}"
        )


def random_documents(vocab_size: int, doc_lengths: list[int], seed: int = 0) -> list[Sample]:
    rng = np.random.default_rng(seed)
    return [
        Sample(rng.integers(0, vocab_size, n, dtype=np.int32), np.ones(n, dtype=bool)) for n in doc_lengths
    ]


def parameter_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def packed_forward_backward(model, docs: list[Sample], positions: PositionRule | None = None
                            ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits [T, V] of the one packed sequence and the gradients of its summed token loss."""
    model.zero_grad(set_to_none=True)
    pack = collate(docs, positions).to(next(model.parameters()).device)
    logits = model(**pack.model_inputs()).logits[0]
    F.cross_entropy(logits.float(), pack.target_ids[0], ignore_index=IGNORE_INDEX, reduction="sum").backward()
    return logits.detach(), parameter_grads(model)


def reference_forward_backward(model, docs: list[Sample]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Each document alone, unpadded, with its own media and the model's own positions and mask; gradients
    summed over documents."""
    model.zero_grad(set_to_none=True)
    device = next(model.parameters()).device
    all_logits = []
    for doc in docs:
        inputs = {name: t.to(device) for name, t in unpacked_inputs(model, doc).items()}
        logits = model(**inputs).logits[0]
        targets = torch.from_numpy(shift_targets(doc)).to(device)
        F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum").backward()
        all_logits.append(logits.detach())
    return torch.cat(all_logits), parameter_grads(model)


def compare_passes(model, reference, packed, packed_attn, doc_lengths: list[int], tolerance: float = TOLERANCE,
                   restore_attn=None) -> ExactnessReport:
    """Runs `reference()` with eager attention and `packed()` with `packed_attn` on the same weights,
    each returning (logits, gradients), and reports the largest differences. The model's attention
    implementation is then set to `restore_attn` (default: what it was)."""
    was_training = model.training
    restore_attn = restore_attn or model.config._attn_implementation
    model.eval()  # no dropout, so both passes see the same function
    try:
        model.set_attn_implementation("eager")
        ref_logits, ref_grads = reference()
        model.set_attn_implementation(packed_attn)
        packed_logits, packed_grads = packed()
    finally:
        model.set_attn_implementation(restore_attn)
        model.train(was_training)
        model.zero_grad(set_to_none=True)
    assert ref_grads.keys() == packed_grads.keys(), "packed and reference passes reached different parameters"
    grad_diffs = {n: (packed_grads[n] - ref_grads[n]).abs().max().item() for n in ref_grads}
    worst = max(grad_diffs, key=grad_diffs.get)
    return ExactnessReport(
        doc_lengths=list(doc_lengths),
        max_logit_diff=(packed_logits - ref_logits).abs().max().item(),
        max_grad_diff=grad_diffs[worst],
        worst_param=worst,
        tolerance=tolerance,
    )


def packed_attn(model):
    """The attention the packed path sets: zeropad_varlen, or per sub-model for a VLM with a vision tower."""
    family = media_family(model.config)
    return packed_attn_implementation() if family is not None and family.fixed_image_tokens is None else ATTN_NAME


def check_documents(model, docs: list[Sample], tolerance: float = TOLERANCE) -> ExactnessReport:
    """Packed (the family's attention and position rule) against per-document eager, on the same weights."""
    attn = packed_attn(model)
    return compare_passes(model, lambda: reference_forward_backward(model, docs),
                          lambda: packed_forward_backward(model, docs, position_rule(model)), attn,
                          [len(d) for d in docs], tolerance, restore_attn=attn)


def check_exactness(model, doc_lengths: list[int], seed: int = 0, tolerance: float = TOLERANCE) -> ExactnessReport:
    """Compares packed (zeropad_varlen) against per-document eager on the same weights, in fp32."""
    docs = random_documents(model.config.get_text_config().vocab_size, doc_lengths, seed)
    return check_documents(model, docs, tolerance)
