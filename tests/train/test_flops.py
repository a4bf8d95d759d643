"""train/metrics.py's model FLOPs against torch.utils.flop_counter, which counts every matmul, convolution and
attention product a real forward dispatches: the Hugging Face model alone (eager attention), one document at a
time. Dense and MoE text models, and the VLM families with their images (Qwen2.5-VL's windows included)."""

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from zeropad.train.metrics import FlopCounter, media_grids
from zeropad.data.chat import Sample
from zeropad.model.vlm import unpacked_inputs

from model.test_vlm_exactness import FAMILIES, make_doc, make_media_doc
from tinymodels import tiny_model

aten = torch.ops.aten
MATMUL_OPS = {aten.mm, aten.addmm, aten.convolution, aten._grouped_mm}
ATTENTION_OPS = {aten.bmm, aten._scaled_dot_product_efficient_attention, aten._scaled_dot_product_flash_attention}


def counted(model, doc) -> tuple[int, int]:
    """(matmul and convolution, attention) forward FLOPs torch counts for one document alone."""
    inputs = unpacked_inputs(model, doc)
    with torch.no_grad(), FlopCounterMode(display=False) as mode:
        model(**inputs)
    by_op = {getattr(op, "overloadpacket", op): n for op, n in mode.get_flop_counts()["Global"].items()}
    unknown = set(by_op) - MATMUL_OPS - ATTENTION_OPS
    assert not unknown, f"ops this test does not classify: {unknown}"
    return (sum(n for op, n in by_op.items() if op in MATMUL_OPS),
            sum(n for op, n in by_op.items() if op in ATTENTION_OPS))


def _eager(model):
    model.set_attn_implementation("eager")
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation("eager")  # routed tokens through each expert: what a token runs
    return model.eval()


@pytest.mark.parametrize("model_type", ["qwen3", "qwen3_moe", "deepseek_v3", "llama", "gpt_oss"])
def test_text_flops_equal_torch_count(model_type, one_thread):
    model = _eager(tiny_model(model_type, attn_implementation="eager"))
    counter = FlopCounter(model)
    # eager attention scores whole squares, also past a sliding window (gpt_oss: 8): lengths within it
    for length in (1, 7, 40) if model_type != "gpt_oss" else (1, 5, 8):
        ids = np.arange(length) % 90 + 3
        doc = Sample(ids, np.ones(length, dtype=bool))
        matmuls, attention = counter.text_forward([length])
        # eager attention computes the whole square and masks it; the model's FLOPs count the causal half
        assert counted(model, doc) == (matmuls, 2 * attention), model_type
    if model_type in ("qwen3_moe", "deepseek_v3", "gpt_oss"):  # a token runs top-k of the routed experts
        dense = sum(p.numel() for n, p in model.named_parameters() if p.ndim >= 2) - (
            0 if model.config.tie_word_embeddings else model.get_input_embeddings().weight.numel())
        assert counter.text_matmul_params < dense


@pytest.mark.parametrize("family", list(FAMILIES))
def test_vlm_flops_equal_torch_count(family, one_thread):
    model = _eager(FAMILIES[family]())
    counter = FlopCounter(model)
    g = torch.Generator().manual_seed(0)
    # grids of several windows, with cut windows at the edges (Qwen2.5-VL: 2 x 2 merged tokens per window)
    grids = [(1, 4, 6), (1, 10, 6), (1, 2, 2)]
    doc = make_doc(model, [5, 3, 4, 6], grids, g)
    assert media_grids(doc.media) == [list(grid) for grid in grids]
    text = counter.text_forward([len(doc)])
    vision = counter.vision_forward(grids)
    assert vision[0] > 0 and vision[1] > 0
    assert counted(model, doc) == (text[0] + vision[0], 2 * text[1] + vision[1]), family
    # the same document's text alone: the vision terms are what the images add
    text_only = make_doc(model, [len(doc)], [], g)
    assert counted(model, text_only) == (text[0], 2 * text[1])


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_video_flops_equal_torch_count(family, one_thread):
    """A video of t temporal patches: the tower attends within each of its frames."""
    model = _eager(FAMILIES[family]())
    counter = FlopCounter(model)
    g = torch.Generator().manual_seed(0)
    doc = make_media_doc(model, [4, ("video", (3, 6, 4), 1.0), 2, ("image", (1, 4, 6)), 3], g)
    grids = media_grids(doc.media)
    assert sorted(grids) == [[1, 4, 6], [3, 6, 4]]
    text, vision = counter.text_forward([len(doc)]), counter.vision_forward(grids)
    assert counted(model, doc) == (text[0] + vision[0], 2 * text[1] + vision[1])


def test_training_flops_are_three_forwards():
    model = tiny_model("qwen3", attn_implementation="eager")
    counter = FlopCounter(model)
    forward = sum(counter.text_forward([5, 9]))
    assert counter([5, 9]) == 3 * forward
    assert counter([5, 9]) == counter([9, 5]) and counter([14]) > counter([5, 9])  # attention: within documents


def test_sliding_window_layers_count_their_band():
    model = tiny_model("gemma3_text", attn_implementation="eager")  # layers: a window of 8, then full attention
    counter = FlopCounter(model)
    assert counter.text_windows == {8: 1, None: 1}
    per_pair = 2.0 * counter.text_attn_width  # forward FLOPs per (query, key) pair and layer: scores and values
    attention = lambda n: counter.text_forward([n])[1]  # noqa: E731
    assert attention(8) == per_pair * (32 + 32)  # within the window both layers score the causal half
    # one token more than 40 scores 8 keys in the windowed layer, and 40.5 more in the full one (n^2 / 2)
    assert attention(41) - attention(40) == per_pair * (8 + 40.5)
