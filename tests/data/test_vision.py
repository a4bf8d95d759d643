"""Image conversations -> documents: exact visual token counts from image headers, both record shapes,
assistant-only loss with placeholders never targets, clear errors for bad images, and the real demo data
packed exactly through a tiny Qwen2.5-VL, Qwen3-VL and Kimi (kimi_k25)."""

from __future__ import annotations

import ast
import copy
import importlib.util
import json
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Qwen2VLImageProcessorPil

from zeropad.data.chat import ensure_chat_template
from zeropad.data.vision import (
    BadImageError,
    image_grid,
    image_size,
    iter_vision_docs,
    load_image,
    read_image_conversation,
    record_to_vision_doc,
    to_vision_doc,
    vision_doc_length,
    visual_token_count,
)
from zeropad.data.kimi_image import Kimi_K25ImageProcessorPil
from zeropad.family import num_image_tokens
from zeropad.errors import DataError, ZeropadError
from zeropad.verify import TOLERANCE

from packing import n_images, pack_docs, same_doc

VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
UNIT = 28  # patch 14 x merge 2
SIZES = [(28, 28), (100, 37), (37, 100), (300, 168), (640, 480), (57, 913), (13, 11), (2000, 30)]  # (w, h)


def make_processor(min_pixels=UNIT * UNIT, max_pixels=UNIT * UNIT * 16) -> Qwen2VLImageProcessorPil:
    return Qwen2VLImageProcessorPil(patch_size=14, merge_size=2, temporal_patch_size=2, min_pixels=min_pixels,
                                    max_pixels=max_pixels)


@pytest.fixture(scope="module")
def vision_tokenizer(_base_tokenizer):
    tok = copy.deepcopy(_base_tokenizer)
    tok.add_tokens(VISION_TOKENS, special_tokens=True)
    ensure_chat_template(tok, None)
    return tok


@pytest.fixture(scope="module")
def model(vision_tokenizer):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = dict(zip(VISION_TOKENS, vision_tokenizer.convert_tokens_to_ids(VISION_TOKENS)))
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(vision_tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         bos_token_id=vision_tokenizer.pad_token_id, eos_token_id=vision_tokenizer.eos_token_id,
                         rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3])),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1],
                           out_hidden_size=64),
        image_token_id=ids["<|image_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], video_token_id=ids["<|video_pad|>"],
    )
    torch.manual_seed(0)
    return Qwen2_5_VLForConditionalGeneration(config).float()


@pytest.fixture(scope="module")
def qwen3_model(vision_tokenizer):
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    ids = dict(zip(VISION_TOKENS, vision_tokenizer.convert_tokens_to_ids(VISION_TOKENS)))
    config = Qwen3VLConfig(
        text_config=dict(vocab_size=len(vision_tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
                         bos_token_id=vision_tokenizer.pad_token_id, eos_token_id=vision_tokenizer.eos_token_id,
                         rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[4, 2, 2],
                                              mrope_interleaved=True)),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, patch_size=16,
                           spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                           deepstack_visual_indexes=[0], out_hidden_size=64),
        image_token_id=ids["<|image_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], video_token_id=ids["<|video_pad|>"],
    )
    torch.manual_seed(0)
    return Qwen3VLForConditionalGeneration(config).float()


KIMI_TOKENS = ["<|media_begin|>", "<|media_content|>", "<|media_end|>", "<|media_pad|>"]


def transformers_navit_resize():
    """transformers' own `navit_resize` (Kimi's resize rule). Its module imports torchvision at the top; where
    torchvision is absent the function (plain math) is compiled from that module's source instead."""
    if importlib.util.find_spec("torchvision") is not None:
        from transformers.models.kimi_k25.image_processing_kimi_k25 import navit_resize

        return navit_resize
    import transformers.models.kimi_k25 as kimi

    path = Path(kimi.__file__).parent / "image_processing_kimi_k25.py"
    function = next(node for node in ast.parse(path.read_text()).body
                    if isinstance(node, ast.FunctionDef) and node.name == "navit_resize")
    namespace = {"math": math}
    exec(compile(ast.Module([function], type_ignores=[]), str(path), "exec"), namespace)
    return namespace["navit_resize"]


def kimi_processor(max_patches=64, max_side=512):
    """Kimi's image processor on PIL/numpy (zeropad.data.kimi_image: bit for bit transformers' torchvision one,
    tests/data/test_kimi_image.py)."""
    return Kimi_K25ImageProcessorPil(max_patches=max_patches, size={"max_height": max_side, "max_width": max_side})


@pytest.fixture(scope="module")
def kimi_tokenizer(_base_tokenizer):
    tok = copy.deepcopy(_base_tokenizer)
    tok.add_tokens(KIMI_TOKENS, special_tokens=True)
    ensure_chat_template(tok, None)
    return tok


@pytest.fixture(scope="module")
def kimi_model(kimi_tokenizer):
    """Tiny kimi_k25: MoonViT (14-pixel patches, 2x2 merge), MLP projector, 2-layer DeepSeek-V3 MoE text model."""
    from transformers import Kimi_K25Config, Kimi_K25ForConditionalGeneration

    ids = dict(zip(KIMI_TOKENS, kimi_tokenizer.convert_tokens_to_ids(KIMI_TOKENS)))
    config = Kimi_K25Config(
        text_config=dict(model_type="deepseek_v3", vocab_size=len(kimi_tokenizer), hidden_size=64,
                         intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
                         n_group=1, topk_group=1, first_k_dense_replace=1, q_lora_rank=24, kv_lora_rank=16,
                         qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=12, max_position_embeddings=2048,
                         bos_token_id=kimi_tokenizer.pad_token_id, eos_token_id=kimi_tokenizer.eos_token_id,
                         rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
        vision_config=dict(patch_size=14, pos_emb_height=8, pos_emb_width=8, num_attention_heads=2,
                           num_hidden_layers=2, hidden_size=32, intermediate_size=48, merge_kernel_size=[2, 2],
                           rope_parameters=dict(rope_type="axial", rope_theta=10000.0)),
        projection_hidden_size=32, image_token_id=ids["<|media_pad|>"], vision_start_token_id=ids["<|media_begin|>"],
        vision_end_token_id=ids["<|media_end|>"], video_token_id=len(kimi_tokenizer) - 5,
    )
    torch.manual_seed(0)
    return Kimi_K25ForConditionalGeneration(config).float()


def save_image(path, size, seed=0):
    w, h = size
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def processor_tokens(path, processor) -> int:
    grid = processor(images=[Image.open(path).convert("RGB")], return_tensors="pt")["image_grid_thw"][0]
    return int(grid.prod()) // processor.merge_size**2


@pytest.mark.parametrize("limits", [(UNIT * UNIT, UNIT * UNIT * 16), (56 * 56, UNIT * UNIT * 1280)])
def test_visual_token_count_matches_processor_on_generated_images(tmp_path, limits):
    processor = make_processor(*limits)
    for i, size in enumerate(SIZES):
        path = save_image(tmp_path / f"{i}.png", size, seed=i)
        assert visual_token_count(path, processor) == processor_tokens(path, processor), size


@pytest.mark.parametrize("limits", [(UNIT * UNIT, UNIT * UNIT * 16), (56 * 56, UNIT * UNIT * 1280)])
def test_visual_token_count_matches_processor_on_real_jpegs(shared_data, limits):
    processor = make_processor(*limits)
    paths = sorted((shared_data / "mllm_demo_data").glob("*.jpg"))
    assert paths
    for path in paths:
        assert visual_token_count(path, processor) == processor_tokens(path, processor), path.name


def test_image_grid_follows_processor_patch_size():
    """Qwen3-VL's processors use patch 16: the grid comes from the processor's own settings."""
    processor = Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, min_pixels=32 * 32, max_pixels=32 * 32 * 64)
    image = Image.fromarray(np.zeros((150, 310, 3), dtype=np.uint8))
    grid = processor(images=[image], return_tensors="pt")["image_grid_thw"][0].tolist()
    assert list(image_grid(310, 150, processor)) == grid


@pytest.mark.parametrize("limits", [(64, 512), (16384, 512), (4096, 12)])
def test_kimi_grid_follows_transformers_navit_resize(limits):
    """Kimi's grid (shrink to max_patches and max_height patches a side, pad to whole 2x2 blocks) equals
    transformers' own rule, for small, large, thin and exact-multiple sizes; (4096, 12) caps the side."""
    max_patches, max_side = limits
    processor = kimi_processor(max_patches=max_patches, max_side=max_side)
    navit_resize = transformers_navit_resize()
    for w, h in SIZES + [(1, 1), (14, 14), (27, 29), (4000, 3000), (168, 1), (1000, 2)]:
        _, (pad_h, pad_w) = navit_resize(h, w, 14, 2, max_patches, max_side)
        assert image_grid(w, h, processor) == (1, pad_h // 14, pad_w // 14), (w, h)


def test_kimi_visual_token_count_matches_processor(tmp_path, shared_data):
    processor = kimi_processor(max_patches=64)
    paths = sorted((shared_data / "mllm_demo_data").glob("*.jpg"))
    paths += [save_image(tmp_path / f"{i}.png", size, seed=i) for i, size in enumerate(SIZES)]
    for path in paths:
        assert visual_token_count(path, processor) == processor_tokens(path, processor), path.name


def test_counting_reads_only_the_header(tmp_path):
    """A JPEG cut after its header still has a size (so it is counted without decoding) but no pixels."""
    good = save_image(tmp_path / "good.jpg", (200, 120))
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(good.read_bytes()[:1000])
    processor = make_processor()
    assert visual_token_count(cut, processor) == visual_token_count(good, processor)
    with pytest.raises(ZeropadError, match="corrupt image data"):
        load_image(cut)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK"])
def test_image_modes_count_and_convert(tmp_path, mode):
    path = tmp_path / ("a.jpg" if mode == "CMYK" else "a.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (75, 130, 3), dtype=np.uint8)).convert(mode).save(path)
    processor = make_processor()
    assert load_image(path).mode == "RGB"
    assert visual_token_count(path, processor) == processor_tokens(path, processor)


def test_an_image_is_loaded_as_it_is_shown(tmp_path):
    """EXIF orientation applied, in the planned size and the pixels alike (a phone photo was trained on its side);
    transparency on white, as transformers' convert_to_rgb puts it (it turned black: a drawing on a clear
    background was lost)."""
    photo = tmp_path / "photo.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 224 x 112, shown turned a quarter: 112 x 224
    Image.new("RGB", (224, 112), (200, 30, 30)).save(photo, exif=exif)
    assert image_size(photo) == load_image(photo).size == (112, 224)
    processor = make_processor()
    assert visual_token_count(photo, processor) == num_image_tokens(image_grid(112, 224, processor), 2)
    clear = tmp_path / "clear.png"
    Image.new("RGBA", (40, 30), (0, 0, 0, 0)).save(clear)
    assert np.asarray(load_image(clear)).min() == 255


def test_images_zeropad_cannot_keep_are_named(tmp_path, monkeypatch):
    """16-bit values past 255 (clipped to white by any RGB conversion) and images past PIL's decompression-bomb
    limit (its error is no OSError: it stopped the whole data load) are BadImageErrors, which name the record."""
    deep = tmp_path / "deep.png"
    Image.fromarray(np.arange(0, 65536, 256, dtype=np.uint16).reshape(16, 16)).save(deep)
    with pytest.raises(BadImageError, match="convert the image to 8 bits"):
        load_image(deep)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    big = save_image(tmp_path / "big.png", (40, 30))
    with pytest.raises(BadImageError, match="too large to decode safely"):
        image_size(big)


def conversation(*user_texts, reply="Paris is the capital.") -> list[dict]:
    messages = []
    for text in user_texts:
        messages += [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]
    return messages


def test_both_record_shapes_give_the_same_doc(tmp_path, vision_tokenizer, model):
    save_image(tmp_path / "a.png", (90, 60))
    save_image(tmp_path / "b.png", (40, 120), seed=1)
    file = str(tmp_path / "data.json")
    shape_a = {"messages": conversation("<image>What is this?", "And this<image>?"), "images": ["a.png", "b.png"]}
    parts_b = [[{"type": "image_url", "image_url": {"url": "a.png"}}, {"type": "text", "text": "What is this?"}],
               [{"type": "text", "text": "And this"}, {"type": "image", "image": f"file://{tmp_path / 'b.png'}"},
                {"type": "text", "text": "?"}]]
    shape_b = {"messages": [{**m, "content": parts_b[i // 2]} if m["role"] == "user" else m
                            for i, m in enumerate(shape_a["messages"])]}
    processor = make_processor()
    doc_a = record_to_vision_doc(shape_a, vision_tokenizer, processor, model.config, file=file, record_no=1)
    doc_b = record_to_vision_doc(shape_b, vision_tokenizer, processor, model.config, file=file, record_no=1)
    assert same_doc(doc_a, doc_b) and doc_a.media.keys() == {"pixel_values", "image_grid_thw"}


def test_placeholders_expand_exactly_and_are_never_targets(tmp_path, vision_tokenizer, model):
    processor = make_processor()
    sizes = [(90, 60), (300, 168), (33, 200)]
    for i, size in enumerate(sizes):
        save_image(tmp_path / f"{i}.png", size, seed=i)
    record = {"messages": conversation("<image><image>Compare.", "<image>Describe."),
              "images": ["0.png", "1.png", "2.png"]}
    file = str(tmp_path / "data.json")
    for train_on_prompt in (False, True):
        conv = read_image_conversation(record, vision_tokenizer, model.config, file=file, record_no=3,
                                       train_on_prompt=train_on_prompt)
        doc = to_vision_doc(conv, processor, model.config, file=file, record_no=3)
        counts = [visual_token_count(tmp_path / f"{i}.png", processor) for i in range(3)]
        cfg = model.config
        assert int((doc.input_ids == cfg.image_token_id).sum()) == sum(counts)
        assert int((doc.input_ids == cfg.vision_start_token_id).sum()) == 3 == n_images(doc)
        assert len(doc) == vision_doc_length(conv, processor, file=file, record_no=3)
        placeholder = np.isin(doc.input_ids, [cfg.image_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id])
        assert not (doc.loss_mask & placeholder).any()
        text = vision_tokenizer.decode(doc.input_ids[doc.loss_mask])
        assert text.count("Paris is the capital.") == 2
        assert ("Compare." in text) == train_on_prompt
        assert doc.media["pixel_values"].shape[0] == int(doc.media["image_grid_thw"].prod(dim=1).sum())


def check_error(record, tmp_path, tokenizer, model, *expected, processor=None):
    file = str(tmp_path / "data.json")
    with pytest.raises(DataError) as info:
        record_to_vision_doc(record, tokenizer, processor or make_processor(), model.config, file=file, record_no=7)
    message = str(info.value)
    assert info.value.file == file and info.value.record == 7
    for part in expected:
        assert part in message, message
    return message


def test_bad_images_name_file_record_and_image(tmp_path, vision_tokenizer, model):
    good = save_image(tmp_path / "good.jpg", (64, 64))
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "garbage.jpg").write_bytes(b"definitely not a jpeg" * 20)
    (tmp_path / "truncated.jpg").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (tmp_path / "folder.jpg").mkdir()
    save_image(tmp_path / "thin.png", (1000, 2))
    cases = {"missing.jpg": "no such file", "folder.jpg": "not a file", "empty.jpg": "empty file",
             "garbage.jpg": "not an image", "truncated.jpg": "corrupt image data", "thin.png": "aspect ratio"}
    (tmp_path / "zero_width.png").write_bytes(png_header(0, 10))
    cases["zero_width.png"] = "not an image"  # PIL refuses a 0-pixel-wide header
    for name, reason in cases.items():
        record = {"messages": conversation("<image>A", "<image>B"), "images": ["good.jpg", name]}
        check_error(record, tmp_path, vision_tokenizer, model, "record 7", f"image 2 of 2 ('{name}'", reason)


def test_unreadable_image(tmp_path, vision_tokenizer, model, monkeypatch):
    """Permission denied (simulated: tests may run as root, who can read anything)."""
    save_image(tmp_path / "locked.jpg", (64, 64))

    def denied(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(Image, "open", denied)
    record = {"messages": conversation("<image>A"), "images": ["locked.jpg"]}
    check_error(record, tmp_path, vision_tokenizer, model, "record 7", "image 1 of 1 ('locked.jpg'",
                "cannot read: Permission denied")


def png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_placeholder_count_must_match_images(tmp_path, vision_tokenizer, model):
    save_image(tmp_path / "a.jpg", (64, 64))
    too_few = {"messages": conversation("<image><image>Two?"), "images": ["a.jpg"]}
    check_error(too_few, tmp_path, vision_tokenizer, model, "2 <image> placeholder(s)", "1 image(s)")
    too_many = {"messages": conversation("No placeholder"), "images": ["a.jpg"]}
    check_error(too_many, tmp_path, vision_tokenizer, model, "0 <image> placeholder(s)")
    literal = {"messages": conversation("<image> and <|image_pad|>"), "images": ["a.jpg"]}
    check_error(literal, tmp_path, vision_tokenizer, model, "literal image token")


def test_malformed_content_parts(tmp_path, vision_tokenizer, model):
    def record(part):
        return {"messages": [{"role": "user", "content": [part]}, {"role": "assistant", "content": "ok"}]}

    check_error(record({"type": "audio", "audio": "a.wav"}), tmp_path, vision_tokenizer, model,
                "messages[1].content[1]", "type 'audio'")
    check_error(record({"type": "image_url", "image_url": {}}), tmp_path, vision_tokenizer, model, "no image path")
    check_error(record({"type": "image_url", "image_url": {"url": "https://x.org/a.jpg"}}), tmp_path,
                vision_tokenizer, model, "only local image files")
    both = {**record({"type": "image", "image": "a.jpg"}), "images": ["a.jpg"]}
    check_error(both, tmp_path, vision_tokenizer, model, "both as content parts and in 'images'")


def test_a_file_yields_docs_and_per_record_errors(tmp_path, write_data, vision_tokenizer, model):
    (tmp_path / "img").mkdir()
    save_image(tmp_path / "img" / "a.jpg", (64, 90))
    path = write_data("data.jsonl", [
        {"messages": conversation("<image>Hi"), "images": ["img/a.jpg"]},
        {"messages": conversation("<image>Hi"), "images": ["img/gone.jpg"]},
        {"messages": conversation("No image at all")},
    ])
    results = list(iter_vision_docs(path, vision_tokenizer, make_processor(), model.config))
    assert [r for r, _ in results] == [1, 2, 3]
    assert n_images(results[0][1]) == 1 and n_images(results[2][1]) == 0
    assert isinstance(results[1][1], DataError) and results[1][1].record == 2 and "img/gone.jpg" in str(results[1][1])


def test_processor_must_match_the_model(tmp_path, vision_tokenizer, model):
    save_image(tmp_path / "a.jpg", (64, 64))
    record = {"messages": conversation("<image>Hi"), "images": ["a.jpg"]}
    wrong = Qwen2VLImageProcessorPil(patch_size=16, merge_size=2)
    with pytest.raises(ZeropadError, match="does not match the model's vision config"):
        record_to_vision_doc(record, vision_tokenizer, wrong, model.config, file=str(tmp_path / "d.json"), record_no=1)


def test_tokenizer_without_vision_tokens_is_a_clear_error(tmp_path, _base_tokenizer, model):
    save_image(tmp_path / "a.jpg", (64, 64))
    record = {"messages": conversation("<image>Hi"), "images": ["a.jpg"]}
    with pytest.raises(ZeropadError, match="tokenizer"):
        read_image_conversation(record, _base_tokenizer, model.config, file=str(tmp_path / "d.json"), record_no=1)


def test_kimi_record_becomes_a_kimi_doc(tmp_path, kimi_tokenizer, kimi_model):
    """Each <image> is rendered as Kimi's template renders an image part, <|media_begin|>image<|media_content|>
    <|media_pad|>*n <|media_end|>, with n what the model's vision tower gives that image (its own placeholder check
    passes); no marker token is a target."""
    sizes = [(90, 60), (300, 168), (33, 200)]
    for i, size in enumerate(sizes):
        save_image(tmp_path / f"{i}.png", size, seed=i)
    record = {"messages": conversation("<image><image>Compare.", "<image>Describe."),
              "images": ["0.png", "1.png", "2.png"]}
    file, cfg, processor = str(tmp_path / "data.json"), kimi_model.config, kimi_processor(max_patches=64)
    for train_on_prompt in (False, True):
        conv = read_image_conversation(record, kimi_tokenizer, cfg, file=file, record_no=3,
                                       train_on_prompt=train_on_prompt)
        doc = to_vision_doc(conv, processor, cfg, file=file, record_no=3)
        assert len(doc) == vision_doc_length(conv, processor, file=file, record_no=3)
        counts = [visual_token_count(tmp_path / f"{i}.png", processor) for i in range(3)]
        text = kimi_tokenizer.decode(doc.input_ids, skip_special_tokens=False)
        for n in counts:
            assert f"<|media_begin|>image<|media_content|>{'<|media_pad|>' * n}<|media_end|>" in text
        assert text.count("<|media_begin|>") == 3 == n_images(doc)
        assert doc.media["pixel_values"].shape == (int(doc.media["image_grid_thw"].prod(dim=1).sum()), 3, 14, 14)
        targets = kimi_tokenizer.decode(doc.input_ids[doc.loss_mask])
        assert "<|media" not in targets and "image" not in targets and targets.count("Paris is the capital.") == 2
        assert ("Compare." in targets) == train_on_prompt
    with torch.no_grad():  # the model's own check: as many <|media_pad|> tokens as image features
        kimi_model(input_ids=torch.as_tensor(doc.input_ids)[None], **doc.media)


def test_kimi_needs_its_processor_and_marker_tokens(tmp_path, kimi_tokenizer, kimi_model, _base_tokenizer, model):
    save_image(tmp_path / "a.jpg", (64, 64))
    record = {"messages": conversation("<image>Hi"), "images": ["a.jpg"]}
    file = str(tmp_path / "d.json")
    with pytest.raises(ZeropadError, match="does not match the model's vision config"):  # Qwen's for Kimi
        record_to_vision_doc(record, kimi_tokenizer, make_processor(), kimi_model.config, file=file, record_no=1)
    with pytest.raises(ZeropadError, match="does not match the model's vision config"):  # Kimi's for Qwen
        record_to_vision_doc(record, kimi_tokenizer, kimi_processor(), model.config, file=file, record_no=1)
    without_content = copy.deepcopy(_base_tokenizer)
    without_content.add_tokens([t for t in KIMI_TOKENS if t != "<|media_content|>"], special_tokens=True)
    config = copy.deepcopy(kimi_model.config)
    config.image_token_id, config.vision_start_token_id, config.vision_end_token_id = \
        without_content.convert_tokens_to_ids(["<|media_pad|>", "<|media_begin|>", "<|media_end|>"])
    with pytest.raises(ZeropadError, match=r"no token for \['<\|media_content\|>'\]"):
        read_image_conversation(record, without_content, config, file=file, record_no=1)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "kimi_k25"])
def test_real_demo_data_packs_exactly(shared_data, family, request):
    """All 6 records of mllm_demo.json become documents whose lengths were known from image headers, and a pack
    of 3 of them (real JPEGs, several images) equals each document alone through a tiny Qwen2.5-VL, Qwen3-VL and
    Kimi (JPEGs shrunk to 64 patches and padded to whole merged tokens).

    Logits agree within the absolute 1e-5. Gradients of the summed token loss over these real-length documents
    (~370 targets) reach |g| ~ 55, where fp32 summation order alone moves the last few ulps (~2e-5 absolute):
    they are compared relative to the largest gradient (1e-6, ~8 ulps). That no document sees another is
    checked bitwise: changing one document's image leaves every other document's logits identical."""
    from zeropad.data.chat import Sample
    from zeropad.model.vlm import packed_attn_implementation
    from zeropad.verify import check_documents, reference_forward_backward

    tokenizer = request.getfixturevalue("vision_tokenizer")
    if family == "qwen2_5_vl":
        model, processor = request.getfixturevalue("model"), make_processor()
    elif family == "qwen3_vl":  # 16-pixel patches
        model = request.getfixturevalue("qwen3_model")
        processor = Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, temporal_patch_size=2, min_pixels=32 * 32,
                                             max_pixels=32 * 32 * 16)
    else:
        model, tokenizer = request.getfixturevalue("kimi_model"), request.getfixturevalue("kimi_tokenizer")
        processor = kimi_processor(max_patches=64)
    path = shared_data / "mllm_demo.json"
    docs = []
    for record_no, record in enumerate(json.loads(path.read_text()), start=1):
        conv = read_image_conversation(record, tokenizer, model.config, file=str(path), record_no=record_no)
        doc = to_vision_doc(conv, processor, model.config, file=str(path), record_no=record_no)
        assert len(doc) == vision_doc_length(conv, processor, file=str(path), record_no=record_no)
        assert n_images(doc) == len(record["images"]) and doc.loss_mask[1:].any()
        docs.append(doc)
    assert len(docs) == 6
    pack = [docs[0], docs[1], docs[2]]  # 2 + 1 + 1 real images of two sizes, three text lengths
    report = check_documents(model, pack)
    print(report.summary())
    assert report.max_logit_diff <= TOLERANCE, report.summary()
    model.set_attn_implementation("eager")
    largest_grad = max(g.abs().max().item() for g in reference_forward_backward(model, pack)[1].values())
    model.zero_grad(set_to_none=True)
    assert report.max_grad_diff <= 1e-6 * max(1.0, largest_grad), (report.summary(), largest_grad)

    model.eval()
    model.set_attn_implementation(packed_attn_implementation())
    changed = list(pack)
    changed[1] = Sample(pack[1].input_ids, pack[1].loss_mask,
                        {**pack[1].media, "pixel_values": torch.rand_like(pack[1].media["pixel_values"])})
    with torch.no_grad():
        before = model(**pack_docs(model, pack).model_inputs()).logits[0]
        after = model(**pack_docs(model, changed).model_inputs()).logits[0]
    bounds = np.cumsum([0] + [len(d) for d in pack])
    for i, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        diff = (before[start:end] - after[start:end]).abs().max().item()
        assert diff > 1e-4 if i == 1 else diff == 0.0, (i, diff)
