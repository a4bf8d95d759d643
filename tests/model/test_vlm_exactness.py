"""Invariants 2-3 for VLMs: a pack of documents with several images of different sizes, forward and backward,
equals each document alone (unpadded, eager attention, its own images), for Qwen2.5-VL and Qwen3-VL."""

import numpy as np
import pytest
import torch

import zeropad.model.attention  # noqa: F401  (registers zeropad_varlen)
from zeropad.model.vlm import (
    VisionDoc,
    check_multimodal_exactness,
    image_placeholder,
    mrope_position_ids,
    pack_multimodal,
    packed_attn_implementation,
)
from zeropad.verify import TOLERANCE

VOCAB = 128
SPECIAL = dict(image_token_id=120, video_token_id=121, vision_start_token_id=122, vision_end_token_id=123)
TEXT_TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2)


def tiny_qwen2_5_vl():
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(
        text_config=dict(**TEXT_TINY, rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                                           mrope_section=[2, 3, 3])),
        # window 56 px = 2x2 merged tokens per window, so the larger images exercise window attention too;
        # block 1 is a full-attention block
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1],
                           out_hidden_size=64),
        **SPECIAL,
    )
    torch.manual_seed(0)
    return Qwen2_5_VLForConditionalGeneration(config).float()


def tiny_qwen3_vl():
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    config = Qwen3VLConfig(
        text_config=dict(**TEXT_TINY, head_dim=16, rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                                                         mrope_section=[4, 2, 2],
                                                                         mrope_interleaved=True)),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, patch_size=8,
                           spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                           deepstack_visual_indexes=[0], out_hidden_size=64),
        **SPECIAL,
    )
    torch.manual_seed(0)
    return Qwen3VLForConditionalGeneration(config).float()


FAMILIES = {"qwen2_5_vl": tiny_qwen2_5_vl, "qwen3_vl": tiny_qwen3_vl}

# (t, h, w) patch grids: different sizes and aspect ratios; h, w multiples of spatial_merge_size
GRIDS = [(1, 4, 6), (1, 8, 6), (1, 2, 2), (1, 6, 10)]


def processor_images(model, sizes: list[tuple[int, int]], seed=0) -> list[tuple[torch.Tensor, tuple]]:
    """Generated PIL images of different (height, width) through the PIL-backend image processor, configured
    from the model's vision config: [(pixel_values, grid_thw)] per image."""
    from PIL import Image
    from transformers import Qwen2VLImageProcessorPil

    v = model.config.vision_config
    unit = v.patch_size * v.spatial_merge_size
    processor = Qwen2VLImageProcessorPil(patch_size=v.patch_size, merge_size=v.spatial_merge_size,
                                         temporal_patch_size=v.temporal_patch_size, min_pixels=unit * unit,
                                         max_pixels=unit * unit * 16)
    rng = np.random.default_rng(seed)
    out = []
    for h, w in sizes:
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        batch = processor(images=[image], return_tensors="pt")
        out.append((batch["pixel_values"], tuple(batch["image_grid_thw"][0].tolist())))
    return out


def fake_image(model, grid, generator) -> torch.Tensor:
    """pixel_values for one image: [t*h*w, C*temporal_patch*patch*patch], as the image processors lay it out."""
    v = model.config.vision_config
    t, h, w = grid
    return torch.randn(t * h * w, v.in_channels * v.temporal_patch_size * v.patch_size**2, generator=generator)


def make_doc(model, text_runs: list[int], grids: list[tuple[int, int, int]], generator, pixels=None) -> VisionDoc:
    """text, [image, text]*: len(text_runs) == len(grids) + 1. Image tokens are not targets.
    `pixels`: the images' pixel_values (default: random ones of the layout the model expects)."""
    ids = [torch.randint(0, 100, (text_runs[0],), generator=generator)]
    for grid, n in zip(grids, text_runs[1:]):
        ids.append(torch.tensor(image_placeholder(model.config, grid)))
        ids.append(torch.randint(0, 100, (n,), generator=generator))
    input_ids = torch.cat(ids).long()
    loss_mask = input_ids != model.config.image_token_id
    if not grids:
        return VisionDoc(input_ids, loss_mask)
    pixels = pixels if pixels is not None else [fake_image(model, grid, generator) for grid in grids]
    return VisionDoc(input_ids, loss_mask, torch.cat(pixels), torch.tensor(grids, dtype=torch.long))


def make_docs(model, seed=0, source="random") -> list[VisionDoc]:
    """4 documents: one image, text only, two images of different sizes, one image; 4 images in all."""
    g = torch.Generator().manual_seed(seed)
    if source == "random":
        images = [(None, grid) for grid in GRIDS]
    else:
        unit = model.config.vision_config.patch_size * model.config.vision_config.spatial_merge_size
        images = processor_images(model, [(2 * unit, 3 * unit + 5), (4 * unit - 3, 3 * unit), (unit, unit),
                                          (3 * unit, 5 * unit)], seed)

    def doc(text_runs, idx):
        pixels = None if source == "random" or not idx else [images[i][0] for i in idx]
        return make_doc(model, text_runs, [images[i][1] for i in idx], g, pixels)

    return [doc([5, 7], [0]), doc([9], []), doc([3, 4, 6], [1, 2]), doc([2, 5], [3])]


@pytest.fixture(scope="module", params=list(FAMILIES))
def model(request):
    return FAMILIES[request.param]()


@pytest.mark.parametrize("source", ["random", "processor"])
def test_packed_equals_per_document_reference(model, source):
    docs = make_docs(model, source=source)
    assert sum(d.num_images for d in docs) >= 3 and any(d.num_images == 0 for d in docs)
    assert len({tuple(g.tolist()) for d in docs if d.num_images for g in d.image_grid_thw}) >= 3
    report = check_multimodal_exactness(model, docs)
    print(type(model).__name__, report.summary())
    assert report.max_logit_diff <= TOLERANCE, report.summary()
    assert report.max_grad_diff <= TOLERANCE, report.summary()


def test_positions_restart_per_document(model):
    docs = make_docs(model)
    pos = mrope_position_ids(model, docs)
    assert pos.shape == (3, 1, sum(len(d) for d in docs))
    start = 0
    for d in docs:
        assert pos[:, 0, start].tolist() == [0, 0, 0]
        start += len(d)


def test_changing_one_image_changes_no_other_document(model):
    model.eval()
    model.set_attn_implementation(packed_attn_implementation())
    docs = make_docs(model)
    changed = list(docs)
    d = docs[2]  # two images: replace the second one's pixels
    g = torch.Generator().manual_seed(99)
    n_first = int(torch.prod(d.image_grid_thw[0]))
    pixels = torch.cat([d.pixel_values[:n_first], fake_image(model, GRIDS[2], g)])
    changed[2] = VisionDoc(d.input_ids, d.loss_mask, pixels, d.image_grid_thw)
    with torch.no_grad():
        before = model(**pack_multimodal(docs, model).model_inputs()).logits[0]
        after = model(**pack_multimodal(changed, model).model_inputs()).logits[0]
    bounds = pack_multimodal(docs, model).cu_seqlens.tolist()
    for i, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        diff = (before[start:end] - after[start:end]).abs().max().item()
        if i == 2:
            assert diff > 1e-4, "the changed document's own logits must change"
        else:
            assert diff == 0.0, f"document {i} saw document 2's image (max diff {diff})"


def test_mismatched_placeholders_are_an_error(model):
    docs = make_docs(model)
    d = docs[0]
    bad = VisionDoc(d.input_ids[:-9], d.loss_mask[:-9], d.pixel_values, d.image_grid_thw)  # cuts into the image run
    with pytest.raises(ValueError, match="image tokens"):
        pack_multimodal([bad, docs[1]], model)


def test_check_catches_text_positions_on_image_documents(model):
    """Not vacuous: the plain 1D per-document positions the text packer gives (instead of the 3D multimodal
    ones) change the logits of every document with an image, and of no text-only one."""
    model.eval()
    model.set_attn_implementation(packed_attn_implementation())
    docs = make_docs(model)
    pack = pack_multimodal(docs, model)
    flat = torch.cat([torch.arange(len(d)) for d in docs])[None]
    with torch.no_grad():
        exact = model(**pack.model_inputs()).logits[0]
        flat_logits = model(**{**pack.model_inputs(), "position_ids": flat}).logits[0]
    bounds = pack.cu_seqlens.tolist()
    for d, start, end in zip(docs, bounds[:-1], bounds[1:]):
        diff = (exact[start:end] - flat_logits[start:end]).abs().max().item()
        assert diff > 1e-4 if d.num_images else diff <= 1e-6, (d.num_images, diff)
