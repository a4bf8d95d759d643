"""Invariants 2-3: packed forward/backward == per-document unpadded forward/backward, checked in
float64 with attention driven into the trained range, and a negative control that must fail."""

import numpy as np
import pytest
import torch

from tinymodels import EXACT_FAMILIES, tiny_model
from zeropad.data.chat import Sample
from zeropad.errors import ConfigError
from zeropad.pack.collate import collate
from zeropad.verify import EAGER_TOLERANCE, FLOAT64_TOLERANCE, check_exactness, leaky_lengths, random_documents

LENGTHS = [7, 23, 1, 40, 12, 2]


@pytest.mark.parametrize("model_type", list(EXACT_FAMILIES))
def test_packed_equals_per_document_reference(model_type):
    report = check_exactness(tiny_model(model_type), LENGTHS, seed=1)
    assert report.tolerance in (FLOAT64_TOLERANCE, EAGER_TOLERANCE)
    assert report.max_rel <= report.tolerance, report.summary()
    # the negative control (one token leaked across a boundary) is far outside the tolerance
    assert report.control is not None and report.control.max_rel > 1e3 * report.tolerance, report.summary()
    assert report.passed, report.summary()


def test_windows_and_softcap_are_exercised():
    """Random weights give attention logits of order 1: verify scales them to 3x the softcap and
    packs a document longer than the sliding window, and says so."""
    report = check_exactness(tiny_model("gemma2"), [5, 3], seed=0)
    assert report.doc_lengths == [5, 3, 13]  # window 8 + 5 was added
    assert "softcap [50.0]" in report.setup and "sliding windows [8]" in report.setup
    assert "driven to 150" in report.setup


def test_leaky_lengths_moves_one_boundary():
    assert leaky_lengths([7, 23, 1]) == [8, 22, 1]
    assert leaky_lengths([4, 1, 5]) == [4, 2, 4]  # a 1-token document cannot give a token away
    with pytest.raises(ConfigError, match="second document"):
        leaky_lengths([9])


def test_check_catches_cross_document_attention():
    """The check is not vacuous: one pack treated as one long document (cross-document attention,
    positions not restarted) must fail it."""
    model = tiny_model("qwen3").eval()
    docs = random_documents(model.config.vocab_size, [9, 17, 5], seed=2)
    merged = Sample(np.concatenate([d.input_ids for d in docs]), np.ones(31, dtype=bool))
    with torch.no_grad():
        leaky = model(**collate([merged]).model_inputs()).logits[0]
        exact = model(**collate(docs).model_inputs()).logits[0]
    assert (leaky[9:] - exact[9:]).abs().max() > 1e-3
    assert torch.allclose(leaky[:9], exact[:9], atol=1e-6)  # the first document sees nothing before it


@pytest.mark.parametrize("model_type", ["qwen3", "qwen3_moe"])
def test_changing_one_document_changes_no_other(model_type):
    model = tiny_model(model_type).eval()
    docs = random_documents(model.config.vocab_size, [11, 30, 6, 19], seed=3)
    changed = list(docs)
    rng = np.random.default_rng(4)
    changed[1] = Sample(rng.integers(0, model.config.vocab_size, 30, dtype=np.int32), docs[1].loss_mask)
    with torch.no_grad():
        before = model(**collate(docs).model_inputs()).logits[0]
        after = model(**collate(changed).model_inputs()).logits[0]
    spans = np.cumsum([0, 11, 30, 6, 19])
    for i, (start, end) in enumerate(zip(spans[:-1], spans[1:])):
        diff = (before[start:end] - after[start:end]).abs().max().item()
        if i == 1:
            assert diff > 1e-3, "the changed document's own logits must change"
        else:
            assert diff == 0.0, f"document {i} saw document 1 (max diff {diff})"
