"""Invariants 2-3 for VLMs: a pack of documents with several images of different sizes, forward and backward,
equals each document alone (unpadded, eager attention, its own images), for Qwen2.5-VL, Qwen3-VL and the Kimi-VL
design (transformers' kimi_k25: MoonViT, MLP projector, DeepSeek-V3 MoE language model with MLA attention); and
a pack mixing images and videos of different lengths and sizes does too, for Qwen2.5-VL and Qwen3-VL."""

import numpy as np
import pytest
import torch

import zeropad.model.attention  # noqa: F401  (registers zeropad_varlen)
from zeropad.data.chat import Sample
from zeropad.family import vision_family
from zeropad.model.vlm import (
    check_attn_implementation,
    image_placeholder,
    mm_token_type_ids,
    packed_attn_implementation,
)
from zeropad.pack.collate import collate
from zeropad.verify import TOLERANCE, check_documents, check_exactness

from packing import n_images, n_videos, pack_docs

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


def tiny_qwen3_vl(moe: bool = False):
    from transformers import AutoConfig, AutoModelForImageTextToText

    # Qwen3-VL-MoE: the same vision tower and mRoPE, sparse MLPs (4 experts, 2 per token) in every text layer
    sparse = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1) if moe else {}
    config = AutoConfig.for_model(
        "qwen3_vl_moe" if moe else "qwen3_vl",
        text_config=dict(**TEXT_TINY, **sparse, head_dim=16,
                         rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[4, 2, 2],
                                              mrope_interleaved=True)),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, patch_size=8,
                           spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                           deepstack_visual_indexes=[0], out_hidden_size=64),
        **SPECIAL,
    )
    torch.manual_seed(0)
    return AutoModelForImageTextToText.from_config(config).float()


def tiny_kimi_k25():
    """Kimi's shape at toy size: 2 language layers, the first dense (first_k_dense_replace=1) and the second a
    DeepSeek-V3 MoE (4 routed experts, 2 per token, 1 shared) with MLA attention (q/kv LoRA ranks, split rope and
    nope head dims, a value head dim of its own)."""
    from transformers import Kimi_K25Config, Kimi_K25ForConditionalGeneration

    text = dict(model_type="deepseek_v3", vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, n_group=1, topk_group=1,
                first_k_dense_replace=1, q_lora_rank=24, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                v_head_dim=12, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
                rope_parameters=dict(rope_type="default", rope_theta=10000.0))
    config = Kimi_K25Config(
        text_config=text,
        # an 8x8 learned position grid, bicubically resampled to each image's own grid
        vision_config=dict(patch_size=8, pos_emb_height=8, pos_emb_width=8, num_attention_heads=2,
                           num_hidden_layers=2, hidden_size=32, intermediate_size=48, merge_kernel_size=[2, 2],
                           rope_parameters=dict(rope_type="axial", rope_theta=10000.0)),
        projection_hidden_size=32,
        **SPECIAL,
    )
    torch.manual_seed(0)
    return Kimi_K25ForConditionalGeneration(config).float()


FAMILIES = {"qwen2_5_vl": tiny_qwen2_5_vl, "qwen3_vl": tiny_qwen3_vl, "qwen3_vl_moe": lambda: tiny_qwen3_vl(moe=True),
            "kimi_k25": tiny_kimi_k25}

# (t, h, w) patch grids: different sizes and aspect ratios; h, w multiples of spatial_merge_size
GRIDS = [(1, 4, 6), (1, 8, 6), (1, 2, 2), (1, 6, 10)]


def image_processor(model):
    """The model's image processor, configured from its vision config: Qwen's PIL backend; Kimi's on PIL/numpy
    (zeropad.data.kimi_image, transformers' own exists only for torchvision)."""
    family = vision_family(model.config)
    unit = family.processor_settings["patch_size"] * family.merge_size
    if family.model_type == "kimi_k25":
        from zeropad.data.kimi_image import Kimi_K25ImageProcessorPil

        return Kimi_K25ImageProcessorPil(**family.processor_settings, max_patches=64)
    from transformers import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(**family.processor_settings, min_pixels=unit * unit, max_pixels=unit * unit * 16)


def processor_images(model, sizes: list[tuple[int, int]], seed=0) -> list[tuple[torch.Tensor, tuple]]:
    """Generated PIL images of different (height, width) through the model's image processor:
    [(pixel_values, grid_thw)] per image."""
    from PIL import Image

    processor = image_processor(model)
    rng = np.random.default_rng(seed)
    out = []
    for h, w in sizes:
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        batch = processor(images=[image], return_tensors="pt")
        out.append((batch["pixel_values"], tuple(batch["image_grid_thw"][0].tolist())))
    return out


def fake_image(model, grid, generator) -> torch.Tensor:
    """pixel_values for one image, as the family's image processor lays it out: Qwen [t*h*w, C*tp*p*p] rows
    (temporal patch flattened in), Kimi [t*h*w, 3, p, p] patches (MoonViT's Conv2d patch embedding)."""
    v = model.config.vision_config
    t, h, w = grid
    if vision_family(model.config).model_type == "kimi_k25":
        return torch.randn(t * h * w, 3, v.patch_size, v.patch_size, generator=generator)
    return torch.randn(t * h * w, v.in_channels * v.temporal_patch_size * v.patch_size**2, generator=generator)


def make_doc(model, text_runs: list[int], grids: list[tuple[int, int, int]], generator, pixels=None) -> Sample:
    """text, [image, text]*: len(text_runs) == len(grids) + 1. Image tokens are not targets.
    `pixels`: the images' pixel_values (default: random ones of the layout the model expects)."""
    ids = [torch.randint(0, 100, (text_runs[0],), generator=generator)]
    for grid, n in zip(grids, text_runs[1:]):
        ids.append(torch.tensor(image_placeholder(model.config, grid)))
        ids.append(torch.randint(0, 100, (n,), generator=generator))
    input_ids = torch.cat(ids).long()
    loss_mask = input_ids != model.config.image_token_id
    if not grids:
        return Sample(input_ids, loss_mask)
    pixels = pixels if pixels is not None else [fake_image(model, grid, generator) for grid in grids]
    return Sample(input_ids, loss_mask, dict(pixel_values=torch.cat(pixels), image_grid_thw=torch.tensor(grids)))


def make_docs(model, seed=0, source="random") -> list[Sample]:
    """4 documents: one image, text only, two images of different sizes, one image; 4 images in all."""
    g = torch.Generator().manual_seed(seed)
    if source == "random":
        images = [(None, grid) for grid in GRIDS]
    else:
        family = vision_family(model.config)
        unit = family.processor_settings["patch_size"] * family.merge_size
        images = processor_images(model, [(2 * unit, 3 * unit + 5), (4 * unit - 3, 3 * unit), (unit, unit),
                                          (3 * unit, 5 * unit)], seed)

    def doc(text_runs, idx):
        pixels = None if source == "random" or not idx else [images[i][0] for i in idx]
        return make_doc(model, text_runs, [images[i][1] for i in idx], g, pixels)

    return [doc([5, 7], [0]), doc([9], []), doc([3, 4, 6], [1, 2]), doc([2, 5], [3])]


@pytest.fixture(scope="module", params=list(FAMILIES))
def model(request):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # toy shapes: more threads only contend (see video_model)
    yield FAMILIES[request.param]()
    torch.set_num_threads(threads)


@pytest.mark.parametrize("source", ["random", "processor"])
def test_packed_equals_per_document_reference(model, source):
    docs = make_docs(model, source=source)
    assert sum(n_images(d) for d in docs) >= 3 and any(n_images(d) == 0 for d in docs)
    assert len({tuple(g.tolist()) for d in docs if n_images(d) for g in d.media["image_grid_thw"]}) >= 3
    report = check_documents(model, docs)
    print(type(model).__name__, report.summary())
    assert report.max_logit_diff <= TOLERANCE, report.summary()
    assert report.max_grad_diff <= TOLERANCE, report.summary()


def test_positions_restart_per_document(model):
    """Qwen: 3-D mRoPE [3, 1, T]; Kimi: 1-D [1, T], 0..n-1 in every document (its reference, position_ids=None,
    is arange)."""
    docs = make_docs(model)
    pos = pack_docs(model, docs).position_ids
    total = sum(len(d) for d in docs)
    start = 0
    if vision_family(model.config).mrope:
        assert pos.shape == (3, 1, total)
        for d in docs:
            assert pos[:, 0, start].tolist() == [0, 0, 0]
            start += len(d)
    else:
        assert pos.shape == (1, total)
        for d in docs:
            assert pos[0, start:start + len(d)].tolist() == list(range(len(d)))
            start += len(d)


def test_changing_one_image_changes_no_other_document(model):
    model.eval()
    model.set_attn_implementation(packed_attn_implementation())
    docs = make_docs(model)
    changed = list(docs)
    d = docs[2]  # two images: replace the second one's pixels
    g = torch.Generator().manual_seed(99)
    n_first = int(torch.prod(d.media["image_grid_thw"][0]))
    pixels = torch.cat([d.media["pixel_values"][:n_first], fake_image(model, GRIDS[2], g)])
    changed[2] = Sample(d.input_ids, d.loss_mask, {**d.media, "pixel_values": pixels})
    with torch.no_grad():
        before = model(**pack_docs(model, docs).model_inputs()).logits[0]
        after = model(**pack_docs(model, changed).model_inputs()).logits[0]
    bounds = pack_docs(model, docs).cu_seqlens.tolist()
    for i, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        diff = (before[start:end] - after[start:end]).abs().max().item()
        if i == 2:
            assert diff > 1e-4, "the changed document's own logits must change"
        else:
            assert diff == 0.0, f"document {i} saw document 2's image (max diff {diff})"


def test_mismatched_placeholders_are_an_error(model):
    docs = make_docs(model)
    d = docs[0]
    bad = Sample(d.input_ids[:-9], d.loss_mask[:-9], d.media)  # cuts into the image run
    with pytest.raises(ValueError, match="image tokens"):
        pack_docs(model, [bad, docs[1]])


def test_check_catches_text_positions_on_image_documents(model):
    """Not vacuous: the plain 1D per-document positions the text packer gives (instead of the 3D multimodal
    ones) change the logits of every document with an image, and of no text-only one. For a 1-D family (Kimi)
    they are exactly the positions its rule gives."""
    if not vision_family(model.config).mrope:
        pack = pack_docs(model, make_docs(model))
        assert torch.equal(pack.position_ids, collate(make_docs(model)).position_ids)
        return
    model.eval()
    model.set_attn_implementation(packed_attn_implementation())
    docs = make_docs(model)
    pack = pack_docs(model, docs)
    flat = torch.cat([torch.arange(len(d)) for d in docs])[None]
    with torch.no_grad():
        exact = model(**pack.model_inputs()).logits[0]
        flat_logits = model(**{**pack.model_inputs(), "position_ids": flat}).logits[0]
    bounds = pack.cu_seqlens.tolist()
    for d, start, end in zip(docs, bounds[:-1], bounds[1:]):
        diff = (exact[start:end] - flat_logits[start:end]).abs().max().item()
        assert diff > 1e-4 if n_images(d) else diff <= 1e-6, (n_images(d), diff)


def test_check_catches_attention_across_documents(model):
    """Not vacuous: without the document boundaries (one causal sequence over the whole pack) every document after
    the first changes, and the first (a prefix either way) does not."""
    model.eval()
    model.set_attn_implementation(packed_attn_implementation())
    docs = make_docs(model)
    pack = pack_docs(model, docs)
    inputs = pack.model_inputs()
    joined = {k: v for k, v in inputs.items() if not k.startswith(("cu_seq_lens", "max_length"))}
    with torch.no_grad():
        exact = model(**inputs).logits[0]
        leaky = model(**joined).logits[0]
    bounds = pack.cu_seqlens.tolist()
    for i, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        diff = (exact[start:end] - leaky[start:end]).abs().max().item()
        assert diff <= 1e-5 if i == 0 else diff > 1e-4, (i, diff)


def test_text_boundaries_reach_the_vision_tower_only_where_the_family_says(model):
    """What `vision_gets_text_kwargs` states, observed: a recording vision backend (sdpa underneath, registered by
    name) sees the text's cu_seq_lens_q in Kimi (its get_image_features passes the forward's kwargs on) and not
    in Qwen (dropped by transformers); so Kimi's vision tower refuses a flash backend, which would get them twice."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    seen = set()

    def recording_sdpa(module, query, key, value, attention_mask, **kwargs):
        seen.update(kwargs)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("recording_sdpa", recording_sdpa)
    family = vision_family(model.config)
    model.eval()
    model.set_attn_implementation(packed_attn_implementation("recording_sdpa"))
    try:
        with torch.no_grad():
            model(**pack_docs(model, make_docs(model)).model_inputs())
    finally:
        model.set_attn_implementation(packed_attn_implementation())
    assert seen and ("cu_seq_lens_q" in seen) == family.vision_gets_text_kwargs, sorted(seen)
    model.config.vision_config._attn_implementation = "flash_attention_2"  # the check reads the name only
    try:
        if family.vision_gets_text_kwargs:
            with pytest.raises(ValueError, match="twice"):
                check_attn_implementation(model)
        else:
            check_attn_implementation(model)
    finally:
        model.set_attn_implementation(packed_attn_implementation())


# -- videos (Qwen2.5-VL, Qwen3-VL) ----------------------------------------------------------------------------------

# (t, h, w) video grids: 1, 2 and 3 temporal patches, different frame sizes
VIDEO_GRIDS = [(2, 4, 6), (3, 2, 4), (1, 6, 4), (2, 2, 2)]


def video_tokens(model, grid, generator) -> list[int]:
    """<vision_start> video <vision_end> as the family's processor writes it: Qwen2.5-VL <video>*(t*h*w/4);
    Qwen3-VL per temporal patch some timestamp text (random ids here), <vision_start> <video>*(h*w/4) <vision_end>."""
    c = model.config
    t, h, w = grid
    if model.config.model_type == "qwen2_5_vl":
        inner = [c.video_token_id] * (t * h * w // 4)
    else:
        inner = []
        for _ in range(t):
            stamp = torch.randint(0, 100, (int(torch.randint(3, 6, (1,), generator=generator)),), generator=generator)
            inner += stamp.tolist() + [c.vision_start_token_id] + [c.video_token_id] * (h * w // 4) + [
                c.vision_end_token_id]
    return [c.vision_start_token_id] + inner + [c.vision_end_token_id]


def make_media_doc(model, parts: list, generator) -> Sample:
    """parts: ints (that many random text tokens), ("image", grid) or ("video", grid, second_per_grid). Only
    text tokens are targets (markers, timestamps and visual tokens are not)."""
    ids, is_target, images, videos, seconds = [], [], [], [], []
    for part in parts:
        if isinstance(part, int):
            run = torch.randint(0, 100, (part,), generator=generator).tolist()
        elif part[0] == "image":
            run, _ = image_placeholder(model.config, part[1]), images.append(part[1])
        else:
            run, _ = video_tokens(model, part[1], generator), videos.append(part[1])
            seconds.append(part[2])
        ids += run
        is_target += [isinstance(part, int)] * len(run)
    doc = dict(input_ids=torch.tensor(ids), loss_mask=torch.tensor(is_target))
    if images:
        doc.update(pixel_values=torch.cat([fake_image(model, g, generator) for g in images]),
                   image_grid_thw=torch.tensor(images))
    if videos:
        doc.update(pixel_values_videos=torch.cat([fake_image(model, g, generator) for g in videos]),
                   video_grid_thw=torch.tensor(videos))
        if model.config.model_type == "qwen2_5_vl":
            doc.update(second_per_grid_ts=torch.tensor(seconds, dtype=torch.float32))
    return Sample(doc.pop("input_ids"), doc.pop("loss_mask"), doc)


def make_video_docs(model, seed=0) -> list[Sample]:
    """5 documents: image + video, text only, two videos + image, video alone, image + video + image: 5 videos of
    1-3 temporal patches and 4 sizes, 4 images of 4 sizes, second_per_grid_ts from 0.5 to 2 s."""
    g = torch.Generator().manual_seed(seed)
    return [make_media_doc(model, [4, ("image", GRIDS[0]), 3, ("video", VIDEO_GRIDS[0], 1.0), 5], g),
            make_media_doc(model, [11], g),
            make_media_doc(model, [2, ("video", VIDEO_GRIDS[1], 0.5), ("image", GRIDS[2]), 4,
                                   ("video", VIDEO_GRIDS[2], 2.0), 3], g),
            make_media_doc(model, [("video", VIDEO_GRIDS[3], 0.75), 6], g),
            make_media_doc(model, [3, ("image", GRIDS[1]), ("video", VIDEO_GRIDS[0], 1.5), 2, ("image", GRIDS[3]), 4],
                           g)]


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen3_vl"])
def video_model(request):
    """One intra-op thread: these toy shapes gain nothing from more, and on a shared machine extra threads contend
    (the Qwen2.5-VL exactness check took 25 s with 2 contended threads, 0.1 s with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield FAMILIES[request.param]()
    torch.set_num_threads(threads)


def test_videos_and_images_packed_equal_per_document_reference(video_model):
    docs = make_video_docs(video_model)
    assert sum(n_videos(d) for d in docs) == 5 and sum(n_images(d) for d in docs) == 4
    assert len({tuple(g.tolist()) for d in docs if n_videos(d) for g in d.media["video_grid_thw"]}) == 4
    assert any(n_images(d) == n_videos(d) == 0 for d in docs)
    report = check_documents(video_model, docs)
    print(type(video_model).__name__, "with videos:", report.summary())
    assert report.max_logit_diff <= TOLERANCE, report.summary()
    assert report.max_grad_diff <= TOLERANCE, report.summary()


def test_video_positions_are_the_models_own(video_model):
    """Per document, the packed positions are get_rope_index's on that document alone, videos included; and they
    depend on what the family reads: Qwen2.5-VL's second_per_grid_ts spacing, Qwen3-VL's per-patch split."""
    model = video_model
    docs = make_video_docs(model)
    pos = pack_docs(model, docs).position_ids
    bounds = np.cumsum([0] + [len(d) for d in docs])
    for doc, start, end in zip(docs, bounds[:-1], bounds[1:]):
        ids = doc.input_ids[None]
        types = mm_token_type_ids(ids, model.config)
        grids = {k: v for k, v in doc.media.items() if k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts")}
        expected = model.model.get_rope_index(ids, types, **grids)[0] if grids else None
        if expected is None:
            assert pos[:, 0, start:end].tolist() == [list(range(len(doc)))] * 3
        else:
            assert torch.equal(pos[:, :, start:end], expected)
    video = docs[3]  # one video, 2 temporal patches
    is_video = video.input_ids == model.config.video_token_id
    temporal = pack_docs(model, [video]).position_ids[0, 0, is_video].view(2, -1)[:, 0]
    if model.config.model_type == "qwen2_5_vl":  # spaced by tokens_per_second * second_per_grid_ts
        assert (temporal[1] - temporal[0]).item() == int(model.config.vision_config.tokens_per_second * 0.75)
    else:  # the second patch starts after the first patch's block, its <vision_end> and the timestamp text
        assert (temporal[1] - temporal[0]).item() > 1 + 3


def test_changing_one_video_changes_no_other_document(video_model):
    model = video_model
    model.eval()
    model.set_attn_implementation(packed_attn_implementation())
    docs = make_video_docs(model)
    changed = list(docs)
    d = docs[2]  # two videos: replace the second one's pixels
    n_first = int(torch.prod(d.media["video_grid_thw"][0]))
    g = torch.Generator().manual_seed(99)
    pixels = torch.cat([d.media["pixel_values_videos"][:n_first], fake_image(model, VIDEO_GRIDS[2], g)])
    changed[2] = Sample(d.input_ids, d.loss_mask, {**d.media, "pixel_values_videos": pixels})
    with torch.no_grad():
        before = model(**pack_docs(model, docs).model_inputs()).logits[0]
        after = model(**pack_docs(model, changed).model_inputs()).logits[0]
    bounds = np.cumsum([0] + [len(doc) for doc in docs])
    for i, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        diff = (before[start:end] - after[start:end]).abs().max().item()
        assert diff > 1e-4 if i == 2 else diff == 0.0, (i, diff)


def test_mismatched_video_tokens_and_mixed_timing_are_errors(video_model):
    model = video_model
    docs = make_video_docs(model)
    d = docs[3]
    short = Sample(d.input_ids, d.loss_mask, {**d.media, "video_grid_thw": torch.tensor([[2, 2, 4]])})  # 2x the tokens
    with pytest.raises(ValueError, match="video tokens but its 1 videos need"):
        pack_docs(model, [short])
    if model.config.model_type == "qwen2_5_vl":
        untimed = Sample(d.input_ids, d.loss_mask, {k: v for k, v in d.media.items() if k != "second_per_grid_ts"})
        with pytest.raises(ValueError, match="second_per_grid_ts"):
            pack_docs(model, [docs[0], untimed])


def test_kimi_refuses_videos():
    model = tiny_kimi_k25()
    g = torch.Generator().manual_seed(0)
    doc = make_doc(model, [5, 7], [GRIDS[0]], g)
    c = model.config
    video = [c.vision_start_token_id] + [c.video_token_id] * 6 + [c.vision_end_token_id]
    with_video = Sample(torch.cat([doc.input_ids, torch.tensor(video)]),
                        torch.cat([doc.loss_mask, torch.zeros(len(video), dtype=torch.bool)]),
                        {**doc.media, "pixel_values_videos": torch.randn(24, 3 * 8 * 8),
                         "video_grid_thw": torch.tensor([[1, 4, 6]])})
    with pytest.raises(ValueError, match="kimi_k25: the packed path takes no videos"):
        pack_docs(model, [with_video])


def test_text_boundaries_do_not_reach_the_video_tower(video_model):
    """As for images: Qwen's get_video_features drops the forward's kwargs, so the vision attention never sees the
    text's cu_seq_lens_q (a flash vision backend stays possible with videos)."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    seen = []

    def recording_sdpa(module, query, key, value, attention_mask, **kwargs):
        seen.append(set(kwargs))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("recording_sdpa_videos", recording_sdpa)
    model = video_model
    model.eval()
    model.set_attn_implementation(packed_attn_implementation("recording_sdpa_videos"))
    try:
        docs = [d for d in make_video_docs(model) if n_videos(d) and not n_images(d)]  # the video tower only
        with torch.no_grad():
            model(**pack_docs(model, docs).model_inputs())
    finally:
        model.set_attn_implementation(packed_attn_implementation())
    assert seen and not any("cu_seq_lens_q" in kwargs for kwargs in seen)


def test_verify_passes_every_vlm_family_and_its_negative_control_fails(model):
    """`zeropad verify`'s check on a multimodal model: random documents, every other one with an image, in
    float64 with attention driven into the trained range; a one-token leak across documents must fail."""
    report = check_exactness(model, [9, 14, 5, 11], seed=3)
    print(type(model).__name__, report.summary())
    assert report.passed and report.max_rel <= 1e-6, report.summary()
    assert report.control is not None and report.control.max_rel > 1e-3, report.summary()


def test_verify_cli_on_a_saved_vlm(tmp_path):
    from typer.testing import CliRunner

    from zeropad.cli import app

    tiny_qwen2_5_vl().save_pretrained(tmp_path)
    result = CliRunner().invoke(app, ["verify", str(tmp_path), "--lengths", "9,14,5"])
    assert result.exit_code == 0, result.output
    assert "PASS" in result.output and "negative control" in result.output and "failed, as it must" in result.output
