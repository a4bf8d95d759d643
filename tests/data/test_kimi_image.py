"""Kimi_K25ImageProcessorPil equals transformers' Kimi_K25ImageProcessor (pixel values bit for bit, and grids) on
the demo JPEGs and on generated sizes and image modes; saves and loads as transformers' processor does; is what
load_image_processor gives a kimi_k25 model; and feeds the data path and a tiny kimi_k25 model.

transformers' processor needs torchvision. Where torchvision imports, the reference is that processor itself.
Where it does not (here), the reference is transformers' own code for it: the kimi_k25 module's source (its
`navit_resize`, `_preprocess`, `patchify`) compiled on transformers' TorchvisionBackend (RGB conversion, fused
rescale and normalize), with only torchvision's three tensor kernels stood in for, as torchvision runs them on
CPU: `resize` on a uint8 image is torch's antialiased bicubic `interpolate` on that uint8 image (torchvision
0.2x `resize_image`: uint8 is native for bicubic on CPU), `pad` is constant zero padding, `normalize` is
sub(mean) then div(std) in the image's dtype."""

from __future__ import annotations

import ast
import copy
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers.image_processing_backends import TorchvisionBackend
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from zeropad.config import build_config
from zeropad.data.chat import ensure_chat_template
from zeropad.data.kimi_image import Kimi_K25ImageProcessorPil, navit_resize
from zeropad.data.multimodal import load_image_processor
from zeropad.data.vision import image_grid, read_image_conversation, record_to_vision_doc, vision_doc_length
from zeropad.errors import ConfigError

# (width, height): tiny, exact multiples of 28, odd, huge, extreme aspect ratios both ways
SIZES = [(1, 1), (2, 3), (13, 11), (28, 28), (84, 56), (37, 100), (101, 57), (640, 480), (4000, 3000),
         (2000, 30), (30, 2000), (5000, 2), (1, 999)]
# transformers' processor settings: its defaults, a small patch budget, a per-side cap, other mean/std as lists
SETTINGS = [{}, dict(max_patches=64), dict(max_patches=4096, size={"max_height": 12, "max_width": 12}),
            dict(max_patches=256, patch_size=16, merge_size=2, image_mean=list(OPENAI_CLIP_MEAN),
                 image_std=list(OPENAI_CLIP_STD))]


class _CpuTorchvisionKernels(TorchvisionBackend):
    """torchvision's tensor kernels the Kimi processor calls, as torchvision runs them on CPU (module docstring)."""

    def resize(self, image, size, resample=None, antialias=True, **kwargs):
        if tuple(image.shape[-2:]) == (size.height, size.width):
            return image
        assert image.dtype == torch.uint8  # native on CPU for bicubic: no float round trip
        return F.interpolate(image, size=[size.height, size.width], mode="bicubic", align_corners=False,
                             antialias=antialias)

    def pad(self, images, pad_size=None, fill_value=0, **kwargs):
        height, width = images.shape[-2:]
        return F.pad(images, (0, pad_size.width - width, 0, pad_size.height - height), value=fill_value)

    def normalize(self, image, mean, std, inplace=False, **kwargs):
        mean = torch.as_tensor(mean, dtype=image.dtype).view(-1, 1, 1)
        std = torch.as_tensor(std, dtype=image.dtype).view(-1, 1, 1)
        return image.sub(mean).div_(std)


def _transformers_kimi_class():
    """transformers' Kimi_K25ImageProcessor: imported where torchvision is, else compiled from its module's source
    on the CPU kernels above (its torchvision imports dropped, relative imports made absolute, the docs-only
    @auto_docstring decorators removed)."""
    if importlib.util.find_spec("torchvision") is not None:
        from transformers import Kimi_K25ImageProcessor

        return Kimi_K25ImageProcessor
    import transformers.models.kimi_k25 as kimi

    path = Path(kimi.__file__).parent / "image_processing_kimi_k25.py"
    body = []
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom):
            if node.module.startswith("torchvision") or node.module == "image_processing_backends":
                continue  # tvF, and TorchvisionBackend: the namespace's, on the CPU kernels
            if node.level:
                node = ast.ImportFrom(module=f"transformers.{node.module}", names=node.names, level=0)
        for sub in ast.walk(node):
            if isinstance(sub, ast.ClassDef | ast.FunctionDef):
                sub.decorator_list = []
        body.append(node)
    namespace = {"__name__": "kimi_k25_reference", "TorchvisionBackend": _CpuTorchvisionKernels}
    exec(compile(ast.fix_missing_locations(ast.Module(body, type_ignores=[])), str(path), "exec"), namespace)
    return namespace["Kimi_K25ImageProcessor"]


REFERENCE = _transformers_kimi_class()


def generated_images() -> list[Image.Image]:
    """Noise images of every size in SIZES (RGB), and of several modes transformers converts to RGB itself:
    grayscale, bilevel, palette (with and without a transparent index), RGBA and LA (composited onto white), CMYK."""
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in SIZES]
    rgba = Image.fromarray(rng.integers(0, 256, (45, 70, 4), dtype=np.uint8))
    palette = rgba.convert("RGB").quantize(16)
    transparent = palette.copy()
    transparent.info["transparency"] = 3
    images += [rgba, rgba.convert("LA"), rgba.convert("L"), rgba.convert("1"), palette, transparent,
               rgba.convert("CMYK")]
    return images + [images[4].copy()]  # a repeated size: transformers resizes same-sized images as one batch


def demo_images(shared_data: Path) -> list[Image.Image]:
    paths = sorted((shared_data / "mllm_demo_data").glob("*.jpg"))
    assert paths
    return [Image.open(path) for path in paths]


def assert_same_output(images, settings):
    ours = Kimi_K25ImageProcessorPil(**copy.deepcopy(settings))(images=images, return_tensors="pt")
    theirs = REFERENCE(**copy.deepcopy(settings))(images=images, return_tensors="pt")
    assert ours["image_grid_thw"].tolist() == theirs["image_grid_thw"].tolist()
    assert ours["pixel_values"].dtype == theirs["pixel_values"].dtype == torch.float32
    assert ours["pixel_values"].shape == theirs["pixel_values"].shape
    assert (ours["pixel_values"] - theirs["pixel_values"]).abs().max().item() == 0.0  # bit for bit
    return ours


@pytest.mark.parametrize("settings", SETTINGS)
def test_equals_transformers_on_generated_images(settings, one_thread):
    batch = assert_same_output(generated_images(), settings)
    assert batch["image_grid_thw"].shape == (len(SIZES) + 8, 3)


@pytest.mark.parametrize("settings", SETTINGS[:2])
def test_equals_transformers_on_the_demo_images(shared_data, settings, one_thread):
    assert_same_output(demo_images(shared_data), settings)


def test_layout_and_values():
    """Patches in raster order of the grid, [C, p, p] each, normalized; the padding is normalized zero."""
    image = np.zeros((20, 30, 3), dtype=np.uint8)  # 2x3 patches of 10 px: no resize, padded to 2x4
    image[:10, 10:20] = 255  # patch (0, 1) white
    batch = Kimi_K25ImageProcessorPil(patch_size=10, merge_size=2)(images=[Image.fromarray(image)],
                                                                   return_tensors="pt")
    assert batch["image_grid_thw"].tolist() == [[1, 2, 4]]
    assert batch["pixel_values"].shape == (8, 3, 10, 10)
    assert batch["pixel_values"][1].eq(1.0).all() and batch["pixel_values"][[0, 2, 4, 5, 6, 3, 7]].eq(-1.0).all()


def test_header_grid_equals_the_processor(one_thread):
    """vision.py counts tokens with the processor's own rule (navit_resize, shared), so the counts are exact."""
    processor = Kimi_K25ImageProcessorPil(max_patches=64)
    for image in generated_images():
        grid = processor(images=[image], return_tensors="pt")["image_grid_thw"][0].tolist()
        assert list(image_grid(*image.size, processor)) == grid, image.size
        _, (pad_h, pad_w) = navit_resize(image.height, image.width, 14, 2, 64, 512)
        assert grid == [1, pad_h // 14, pad_w // 14]


def tiny_kimi_config(tokenizer, **vision):
    from transformers import Kimi_K25Config

    ids = tokenizer.convert_tokens_to_ids(KIMI_TOKENS)
    return Kimi_K25Config(
        text_config=dict(model_type="deepseek_v3", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96,
                         moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                         n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, n_group=1, topk_group=1,
                         first_k_dense_replace=1, q_lora_rank=24, kv_lora_rank=16, qk_rope_head_dim=8,
                         qk_nope_head_dim=8, v_head_dim=12, max_position_embeddings=4096,
                         bos_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
        vision_config={**dict(patch_size=14, pos_emb_height=8, pos_emb_width=8, num_attention_heads=2,
                              num_hidden_layers=2, hidden_size=32, intermediate_size=48, merge_kernel_size=[2, 2],
                              rope_parameters=dict(rope_type="axial", rope_theta=10000.0)), **vision},
        projection_hidden_size=32, vision_start_token_id=ids[0], image_token_id=ids[3], vision_end_token_id=ids[2],
        video_token_id=len(tokenizer) - 5)


KIMI_TOKENS = ["<|media_begin|>", "<|media_content|>", "<|media_end|>", "<|media_pad|>"]


@pytest.fixture(scope="module")
def kimi_tokenizer(_base_tokenizer):
    tokenizer = copy.deepcopy(_base_tokenizer)
    tokenizer.add_tokens(KIMI_TOKENS, special_tokens=True)
    ensure_chat_template(tokenizer, None)
    return tokenizer


def run_config(tmp_path, **vision) -> object:
    return build_config({"model": {"config": {"model_type": "kimi_k25"}}, "output_dir": str(tmp_path),
                         "data": {"sources": [{"path": str(tmp_path / "data.json")}]}, "vision": vision})


def test_load_image_processor_builds_kimi_from_the_vision_config(tmp_path, kimi_tokenizer):
    config = tiny_kimi_config(kimi_tokenizer, patch_size=16, merge_kernel_size=[4, 4])
    processor = load_image_processor(run_config(tmp_path), config)
    assert isinstance(processor, Kimi_K25ImageProcessorPil)
    assert (processor.patch_size, processor.merge_size, processor.max_patches) == (16, 4, 16384)
    limited = load_image_processor(run_config(tmp_path, max_pixels=16 * 16 * 100 + 255), config)
    assert limited.max_patches == 100
    with pytest.raises(ConfigError, match="vision.min_pixels does not apply to Kimi.*only vision.max_pixels"):
        load_image_processor(run_config(tmp_path, min_pixels=1000), config)
    with pytest.raises(ConfigError, match=r"vision.max_pixels \(255\) is below one 16x16 patch"):
        load_image_processor(run_config(tmp_path, max_pixels=255), config)


def test_transformers_saved_config_loads_as_ours(tmp_path, kimi_tokenizer, one_thread):
    """A directory saved by transformers' processor (image_processor_type Kimi_K25ImageProcessor) loads as
    Kimi_K25ImageProcessorPil with its settings and gives its output; ours saves the same file back."""
    settings = dict(max_patches=100, image_mean=list(OPENAI_CLIP_MEAN), image_std=list(OPENAI_CLIP_STD))
    reference = REFERENCE(**copy.deepcopy(settings))
    reference.save_pretrained(tmp_path / "theirs")
    saved = json.loads((tmp_path / "theirs" / "preprocessor_config.json").read_text())
    assert saved["image_processor_type"] == "Kimi_K25ImageProcessor"
    processor = load_image_processor(run_config(tmp_path, processor=str(tmp_path / "theirs")),
                                     tiny_kimi_config(kimi_tokenizer))
    assert isinstance(processor, Kimi_K25ImageProcessorPil) and processor.max_patches == 100
    images = generated_images()[3:8]
    ours, theirs = (p(images=images, return_tensors="pt") for p in (processor, reference))
    assert torch.equal(ours["pixel_values"], theirs["pixel_values"])
    processor.save_pretrained(tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "preprocessor_config.json").read_text()) == saved
    reloaded = Kimi_K25ImageProcessorPil.from_pretrained(tmp_path / "ours")
    assert torch.equal(reloaded(images=images, return_tensors="pt")["pixel_values"], ours["pixel_values"])


def test_data_path_and_a_tiny_kimi_model(tmp_path, kimi_tokenizer, shared_data, one_thread):
    """An image conversation through record_to_vision_doc: as many patches as the header-based count says, each
    image's run of tokens its grid / 4, and a tiny kimi_k25 model's forward on them gives finite logits."""
    from transformers import Kimi_K25ForConditionalGeneration

    images = sorted((shared_data / "mllm_demo_data").glob("*.jpg"))
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (37, 250, 3), dtype=np.uint8)).save(tmp_path / "t.png")
    record = {"messages": [{"role": "user", "content": "<image><image>Which differ? <image><image>"},
                           {"role": "assistant", "content": "The last one."}],
              "images": [str(p) for p in images[:3]] + [str(tmp_path / "t.png")]}
    config = tiny_kimi_config(kimi_tokenizer)
    processor = load_image_processor(run_config(tmp_path, max_pixels=14 * 14 * 300), config)
    file = str(tmp_path / "data.json")
    conv = read_image_conversation(record, kimi_tokenizer, config, file=file, record_no=1)
    doc = record_to_vision_doc(record, kimi_tokenizer, processor, config, file=file, record_no=1)
    grids = doc.media["image_grid_thw"]
    assert len(doc.input_ids) == vision_doc_length(conv, processor, file=file, record_no=1)
    assert doc.media["pixel_values"].shape == (int(grids.prod(dim=1).sum()), 3, 14, 14)
    assert int((doc.input_ids == config.image_token_id).sum()) == int(grids.prod(dim=1).sum()) // 4
    assert processor.max_patches == 300 and grids.prod(dim=1).sum() < 4 * 400  # the budget reached the images

    torch.manual_seed(0)
    model = Kimi_K25ForConditionalGeneration(config).float().eval()
    with torch.no_grad():
        logits = model(input_ids=torch.as_tensor(doc.input_ids)[None], **doc.media).logits
    assert logits.shape == (1, len(doc.input_ids), len(kimi_tokenizer)) and torch.isfinite(logits).all()
