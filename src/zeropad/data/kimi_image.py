"""Kimi's image processor without torchvision: `Kimi_K25ImageProcessorPil`, the pipeline of transformers'
Kimi_K25ImageProcessor (models/kimi_k25/image_processing_kimi_k25.py), which exists only for the torchvision
backend.

transformers' rule, step by step, and how it is run here:
  - convert to RGB (transparency composited onto white): transformers' own PIL conversion (PilBackend);
  - `navit_resize`: shrink (never enlarge) to at most `max_patches` patches and `size["max_height"]` patches a
    side, then zero-pad bottom and right to whole merge_size x merge_size blocks of patches;
  - resize: torchvision's `resize` on a uint8 tensor on CPU calls torch's antialiased bicubic `interpolate`
    directly on the uint8 image (its native uint8 path); the same torch call is made here, so pixels are equal bit
    for bit. PIL's own bicubic differs from it by one level of 255 on 0.1-0.6% of the values (measured on the demo
    JPEGs and generated images), so it is not used. (transformers' processor processes on CPU unless given a
    `device`; on CUDA torchvision resizes through float32 instead, which this processor does not follow);
  - rescale and normalize fused as transformers fuses them: (x - mean / rescale_factor) / (std / rescale_factor)
    in float32, the padding included;
  - patches [P, C, p, p] in raster order of the (h, w) patch grid, and image_grid_thw [I, 3] = (1, h, w).

`save_pretrained` writes the preprocessor_config.json transformers' processor writes (image_processor_type
Kimi_K25ImageProcessor, as every `*Pil` processor does), and `from_pretrained` reads those files back, so
checkpoints move both ways.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers.image_processing_backends import PilBackend
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD, PILImageResampling, SizeDict
from transformers.processing_utils import ImagesKwargs

from zeropad.errors import ConfigError

# The name transformers' torchvision processor saves under, and the one this processor saves under too.
KIMI_PROCESSOR_TYPE = "Kimi_K25ImageProcessor"


class KimiImagesKwargs(ImagesKwargs, total=False):
    """Kimi_K25ImageProcessorKwargs (restated: its module imports torchvision). max_patches: the patch budget an
    image is shrunk to; patch_size: the vision encoder's patch side; merge_size: patches merged per token side."""

    max_patches: int
    patch_size: int
    merge_size: int


def navit_resize(height: int, width: int, patch_size: int, merge_size: int, max_patches: int,
                 max_side: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """((resized h, w), (padded h, w)) in pixels: transformers' kimi_k25 `navit_resize`, max_side in patches."""
    num_patches = max(1.0, height // patch_size) * max(1.0, width // patch_size)
    scale = min(1.0, math.sqrt(max_patches / num_patches), max_side * patch_size / height,
                max_side * patch_size / width)
    resized_h = min(max(1, int(height * scale)), max_side * patch_size)
    resized_w = min(max(1, int(width * scale)), max_side * patch_size)
    factor = patch_size * merge_size
    return (resized_h, resized_w), (-(-resized_h // factor) * factor, -(-resized_w // factor) * factor)


class Kimi_K25ImageProcessorPil(PilBackend):  # noqa: N801  (transformers' name, with its PIL-backend suffix)
    """Kimi_K25ImageProcessor's output, without torchvision: `processor(images=[...], return_tensors="pt")` ->
    pixel_values [P, 3, patch_size, patch_size] float32 and image_grid_thw [I, 3]. Settings and defaults are
    transformers': max_patches 16384, size {"max_height": 512, "max_width": 512} (patches a side), patch_size
    14, merge_size 2, bicubic, rescale 1/255, IMAGENET_STANDARD mean and std."""

    do_resize = True
    resample = PILImageResampling.BICUBIC
    size = {"max_height": 512, "max_width": 512}
    max_patches = 16384
    do_rescale = True
    do_normalize = True
    image_mean = IMAGENET_STANDARD_MEAN
    image_std = IMAGENET_STANDARD_STD
    do_convert_rgb = True
    patch_size = 14
    merge_size = 2
    valid_kwargs = KimiImagesKwargs
    model_input_names = ["pixel_values", "image_grid_thw"]

    def _validate_preprocess_kwargs(self, size: SizeDict | None = None, resample=None, **kwargs) -> None:
        if size is not None and (size.max_height is None or size.max_height != size.max_width):
            raise ValueError(f"size must contain 'max_height' and 'max_width' keys with identical values but got "
                             f"{size}.")
        if resample not in (None, PILImageResampling.BICUBIC):  # the one mode with torchvision's kernel in torch
            raise ValueError(f"{type(self).__name__} resizes with bicubic only (resample=3, Kimi's); got {resample}")
        super()._validate_preprocess_kwargs(size=size, resample=resample, **kwargs)

    def _preprocess(self, images: list[np.ndarray], do_resize: bool, size: SizeDict, do_rescale: bool,
                    rescale_factor: float, do_normalize: bool, image_mean, image_std, patch_size: int,
                    merge_size: int, max_patches: int, return_tensors=None, **kwargs) -> BatchFeature:
        pixels, grids = [], []
        for image in images:
            x = torch.from_numpy(np.ascontiguousarray(image))[None]  # [1, C, H, W], the backend's channels-first
            if do_resize:
                (height, width), (pad_h, pad_w) = navit_resize(x.shape[2], x.shape[3], patch_size, merge_size,
                                                               max_patches, size.max_height)
                x = F.pad(_bicubic(x, height, width), (0, pad_w - width, 0, pad_h - height))
            x = _rescale_and_normalize(x, do_rescale, rescale_factor, do_normalize, image_mean, image_std)
            _, channels, height, width = x.shape
            grid_h, grid_w = height // patch_size, width // patch_size
            patches = x.reshape(channels, grid_h, patch_size, grid_w, patch_size).permute(1, 3, 0, 2, 4)
            pixels.append(patches.reshape(grid_h * grid_w, channels, patch_size, patch_size))
            grids.append([1, grid_h, grid_w])
        return BatchFeature(data={"pixel_values": torch.cat(pixels),
                                  "image_grid_thw": torch.tensor(grids, dtype=torch.long)}, tensor_type=return_tensors)


def _bicubic(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """torchvision's tensor `resize` (bicubic, antialias) as it runs on CPU: the same size is returned as is;
    uint8, float32 and float64 are resized natively, other dtypes through float32, rounded back if integer."""
    if x.shape[-2:] == (height, width):
        return x
    native = x.dtype in (torch.uint8, torch.float32, torch.float64)
    y = F.interpolate(x if native else x.float(), size=[height, width], mode="bicubic", align_corners=False,
                      antialias=True)
    if native:
        return y
    return (y.round_() if not x.dtype.is_floating_point else y).to(x.dtype)


def _rescale_and_normalize(x: torch.Tensor, do_rescale: bool, rescale_factor: float, do_normalize: bool,
                           mean, std) -> torch.Tensor:
    """transformers' TorchvisionBackend.rescale_and_normalize: rescale folded into mean and std (float32)."""
    if do_normalize:
        mean, std = torch.tensor(mean), torch.tensor(std)
        if do_rescale:
            mean, std = mean * (1.0 / rescale_factor), std * (1.0 / rescale_factor)
        return x.float().sub(mean.reshape(-1, 1, 1)).div_(std.reshape(-1, 1, 1))
    return x * rescale_factor if do_rescale else x


def names_kimi_processor(directory: str | Path) -> bool:
    """Whether the directory's preprocessor_config.json is Kimi's image processor (either backend)."""
    path = Path(directory).expanduser() / "preprocessor_config.json"
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"vision.processor: {path} is not valid JSON: {err}") from None
    return config.get("image_processor_type", "").removesuffix("Pil") == KIMI_PROCESSOR_TYPE


def limit_kimi_pixels(processor: Kimi_K25ImageProcessorPil, min_pixels: int | None, max_pixels: int | None) -> None:
    """`vision.max_pixels` as Kimi's pixel budget: max_patches = max_pixels // patch_size**2 (navit_resize shrinks
    the image to about that area). Kimi never enlarges an image, so `vision.min_pixels` has no equivalent."""
    if min_pixels:
        raise ConfigError("vision.min_pixels does not apply to Kimi's image processor (it never enlarges an image); "
                          "of vision.min_pixels / max_pixels, Kimi takes only vision.max_pixels (its patch budget)")
    if max_pixels:
        if max_pixels < processor.patch_size**2:
            raise ConfigError(f"vision.max_pixels ({max_pixels}) is below one {processor.patch_size}x"
                              f"{processor.patch_size} patch of Kimi's image processor")
        processor.max_patches = max_pixels // processor.patch_size**2
