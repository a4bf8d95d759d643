"""Packed, padding-free forward for vision-language models through their public inputs: Qwen2.5-VL, Qwen3-VL and
the Kimi-VL design (MoonViT native-resolution encoder + MLP projector + DeepSeek-V3-style MoE language model,
transformers' `kimi_k25`).

A multimodal pack is the one `Pack` (zeropad.pack.collate) of documents, each with zero or more images and videos.
Its media, each document's concatenated in document order, and positions are:
  - input_ids [1, T]: every document's tokens, image and video placeholders already expanded to their exact tokens;
  - pixel_values [P, ...] and image_grid_thw [I, 3]: all images of the pack, in document order
    (Qwen: [P, C*tp*p*p] rows; Kimi: [P, C, p, p] patches);
  - pixel_values_videos [Pv, C*tp*p*p] and video_grid_thw [V, 3]: all videos, in document order (Qwen only), and
    for Qwen2.5-VL second_per_grid_ts [V] (its temporal position spacing; Qwen3-VL writes timestamps as text);
  - position_ids restarting at 0 in every document: Qwen's multimodal RoPE [3, 1, T] (temporal, height, width),
    computed per document with the model's own `get_rope_index` (videos included); Kimi's plain 1-D positions
    [1, T], as for text;
  - cu_seq_lens_q/k, max_length_q/k: document boundaries for the language model (zeropad_varlen).

What differs between the designs is a small `MediaFamily` read from the model config (zeropad.family: image token
id, tokens per image grid, position style, the chat template's image marker) and the position rule here
(`position_rule`); everything else is the text path.

Attention is chosen per sub-model (`attn_implementation` dict): the language model gets zeropad_varlen (Kimi's
MLA attention included; its routed experts choose per token, so packing does not change routing); the vision
tower keeps a stock backend ("sdpa" by default). Every vision tower here builds its own per-image (Qwen2.5-VL:
also per-window; a Qwen video: per temporal patch) cu_seqlens from image_grid_thw / video_grid_thw and runs each
segment bidirectionally, so images and videos attend within themselves only. The forward passes its kwargs,
which hold the *text* boundaries, on to `get_image_features` (and Qwen's to `get_video_features`): Qwen's drops
them there (transformers' `accepts_precomputed_kwargs`), Kimi's does not, so in Kimi they reach every vision
attention call. The stock non-flash backends, called once per image, ignore them; zeropad_varlen
would read them, and a flash backend would get cu_seq_lens_q/k twice (a TypeError). So the vision tower never
gets zeropad_varlen, and Kimi's gets no flash backend (`check_attn_implementation`).

Suffixes: T tokens of the pack, P image patches, I images, Pv video patches, V videos.
"""

from __future__ import annotations

import torch

from zeropad.data.chat import Sample
from zeropad.family import media_family, vision_family
from zeropad.model.attention import ATTN_NAME
from zeropad.pack.collate import PositionRule

TEXT, IMAGE, VIDEO = 0, 1, 2  # mm_token_type_ids values, as transformers' Qwen VL models expect


def packed_attn_implementation(vision: str = "sdpa", text: str = ATTN_NAME) -> dict[str, str]:
    """`attn_implementation` for a packed VLM: varlen for the language model (`text`: zeropad_ulysses under
    sequence parallelism), a stock backend for the vision tower (it does its own per-image segmentation)."""
    if vision == ATTN_NAME:
        raise ValueError(f"the vision tower cannot use {ATTN_NAME}: use 'sdpa', 'eager' or (Qwen only) a flash backend")
    return {"text_config": text, "vision_config": vision}


def check_attn_implementation(model, text: str = ATTN_NAME) -> None:
    """ValueError unless the model's attention is set as the packed path needs (per sub-model for a VLM; `text`,
    the language model's packed backend)."""
    family = vision_family(model.config)
    if family.fixed_image_tokens is not None:  # early fusion: one causal LM, its VQ encoder reads no backend
        if model.config._attn_implementation != ATTN_NAME:
            raise ValueError(f"a packed {family.model_type} needs attn_implementation={ATTN_NAME!r}, got "
                             f"{model.config._attn_implementation!r}; call model.set_attn_implementation(...)")
        return
    text_impl = model.config.text_config._attn_implementation
    vision_impl = model.config.vision_config._attn_implementation
    if text_impl != text or vision_impl == ATTN_NAME:
        raise ValueError(
            f"a packed VLM needs attn_implementation={packed_attn_implementation(text=text)} "
            f"(got text {text_impl!r}, vision {vision_impl!r}); call model.set_attn_implementation(...)"
        )
    if family.vision_gets_text_kwargs and "flash" in vision_impl:
        raise ValueError(f"{family.model_type} passes the text's varlen kwargs into its vision tower, where "
                         f"{vision_impl!r} would get cu_seq_lens_q/k twice; use 'sdpa' or 'eager' for vision")


def image_placeholder(config, grid_thw=None) -> list[int]:
    """<vision_start> <image>*n <vision_end> for one image of grid (t, h, w) (early fusion: no grid, a fixed n):
    the token ids the config names. (Kimi's template also puts `image<|media_content|>` after the start token;
    the model does not read it.)"""
    family = vision_family(config)
    n = family.num_image_tokens(grid_thw)
    return [family.vision_start_token_id] + [family.image_token_id] * n + [family.vision_end_token_id]


def mm_token_type_ids(input_ids: torch.Tensor, config) -> torch.Tensor:
    """0 text, 1 image, 2 video per token, the modality map Qwen's `get_rope_index` reads."""
    types = torch.full_like(input_ids, TEXT, dtype=torch.int32)
    types[input_ids == config.image_token_id] = IMAGE
    types[input_ids == config.video_token_id] = VIDEO
    return types


def _base(model):
    """The `*VLModel` that owns `get_rope_index` (ForConditionalGeneration wraps it as `.model`)."""
    inner = getattr(model, "model", model)
    return inner if hasattr(inner, "get_rope_index") else model


def _grids(sample: Sample) -> dict:
    """The media keyword arguments `get_rope_index` reads (grids and timing, no pixels)."""
    names = ("image_grid_thw", "video_grid_thw", "second_per_grid_ts")
    return {name: sample.media[name] for name in names if name in sample.media}


def position_rule(model) -> PositionRule | None:
    """The family's positions for one document, after checking its image and video tokens against its media:
    Qwen's [3, 1, n] mRoPE from the model's own `get_rope_index` on the document alone, so every document starts
    at 0 exactly as when it runs unpacked (Qwen2.5-VL spaces a video's temporal patches by its
    second_per_grid_ts; Qwen3-VL splits each video into per-patch (1, h, w) grids itself, its timestamp text
    between them plain text); 1-D 0..n-1 for the other families. None for a text-only model."""
    family = media_family(model.config)
    if family is None:
        return None

    def positions(sample: Sample) -> torch.Tensor:
        ids = torch.as_tensor(sample.input_ids, dtype=torch.long)[None]
        family.check_media_tokens(ids[0], sample.media)
        if not family.mrope:
            return torch.arange(ids.shape[1])[None]
        if not _grids(sample):
            return torch.arange(ids.shape[1]).view(1, 1, -1).expand(3, 1, -1)
        pos, _ = _base(model).get_rope_index(ids, mm_token_type_ids=mm_token_type_ids(ids, model.config),
                                             **_grids(sample))
        return pos

    return positions


def unpacked_inputs(model, sample: Sample) -> dict:
    """Forward kwargs for one document alone, unpadded, with no positions given: the model computes its own (Qwen:
    3-D from mm_token_type_ids), so an exactness reference built on these does not depend on `position_rule`."""
    ids = torch.as_tensor(sample.input_ids, dtype=torch.long)[None]
    inputs = dict(input_ids=ids, **sample.media)
    family = media_family(model.config)
    if family is not None and family.mrope and _grids(sample):
        inputs.update(mm_token_type_ids=mm_token_type_ids(ids, model.config))
    return inputs
