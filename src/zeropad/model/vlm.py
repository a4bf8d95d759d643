"""Packed, padding-free forward for vision-language models through their public inputs: Qwen2.5-VL, Qwen3-VL and
the Kimi-VL design (MoonViT native-resolution encoder + MLP projector + DeepSeek-V3-style MoE language model,
transformers' `kimi_k25`).

A multimodal pack is one flat sequence [1, T] of documents, each with zero or more images and videos. It carries:
  - input_ids [1, T]: every document's tokens, image and video placeholders already expanded to their exact tokens;
  - pixel_values [P, ...] and image_grid_thw [I, 3]: all images of the pack, in document order
    (Qwen: [P, C*tp*p*p] rows; Kimi: [P, C, p, p] patches);
  - pixel_values_videos [Pv, C*tp*p*p] and video_grid_thw [V, 3]: all videos, in document order (Qwen only), and
    for Qwen2.5-VL second_per_grid_ts [V] (its temporal position spacing; Qwen3-VL writes timestamps as text);
  - position_ids restarting at 0 in every document: Qwen's multimodal RoPE [3, 1, T] (temporal, height, width),
    computed per document with the model's own `get_rope_index` (videos included); Kimi's plain 1-D positions
    [1, T], as for text;
  - cu_seq_lens_q/k, max_length_q/k: document boundaries for the language model (zeropad_varlen).

What differs between the designs is a small `VisionFamily` read from the model config (image token id, tokens per
image grid, position style, the chat template's image marker); everything else is one code path.

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

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from zeropad.model.attention import ATTN_NAME
from zeropad.pack.collate import IGNORE_INDEX, varlen_kwargs, varlen_metadata
from zeropad.verify import TOLERANCE, ExactnessReport, compare_passes, parameter_grads

TEXT, IMAGE, VIDEO = 0, 1, 2  # mm_token_type_ids values, as transformers' Qwen VL models expect


def num_image_tokens(grid_thw, spatial_merge_size: int) -> int:
    """Visual tokens one image takes in the text: t*h*w patches merged merge x merge."""
    t, h, w = (int(x) for x in grid_thw)
    return t * h * w // spatial_merge_size**2


@dataclass(frozen=True)
class VisionFamily:
    """What the packed path needs to know about one VLM design, read from its config by `vision_family`."""

    model_type: str
    image_token_id: int
    video_token_id: int | None  # None: the packed path takes no videos for this design (yet)
    vision_start_token_id: int  # the marker tokens around an image's run of image tokens
    vision_end_token_id: int
    merge_size: int  # merge_size x merge_size vision patches are pooled into one visual token
    mrope: bool  # 3-D multimodal RoPE from the model's get_rope_index (Qwen); else 1-D positions (Kimi)
    # How the model's chat template renders one image: {start}, {image}, {end} stand for the token strings of the
    # vision_start / image / vision_end ids, the rest is literal text. Its tokens are never training targets.
    image_marker: str
    vision_gets_text_kwargs: bool  # the text's varlen kwargs reach the vision attention (module docstring)
    processor_settings: dict[str, int]  # the image processor must be configured so

    def num_image_tokens(self, grid_thw) -> int:
        """Visual tokens one image of patch grid (t, h, w) takes in the text."""
        return num_image_tokens(grid_thw, self.merge_size)


def vision_family(config) -> VisionFamily:
    """The VisionFamily of a `*ForConditionalGeneration` config; ValueError for a design zeropad cannot pack."""
    vision = config.vision_config
    ids = dict(image_token_id=config.image_token_id, vision_start_token_id=config.vision_start_token_id,
               vision_end_token_id=config.vision_end_token_id)
    if config.model_type == "kimi_k25":
        rows, cols = vision.merge_kernel_size
        if rows != cols:  # Kimi's image processor pads to a square merge_size (and so do we)
            raise ValueError(f"kimi_k25: merge_kernel_size {vision.merge_kernel_size} must be square")
        # Kimi's chat template: <|media_begin|>image<|media_content|><|media_pad|><|media_end|> per image
        return VisionFamily(config.model_type, **ids, video_token_id=None, merge_size=rows, mrope=False,
                            image_marker="{start}image<|media_content|>{image}{end}", vision_gets_text_kwargs=True,
                            processor_settings=dict(patch_size=vision.patch_size, merge_size=rows))
    if config.model_type in ("qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"):
        merge = vision.spatial_merge_size
        return VisionFamily(config.model_type, **ids, video_token_id=config.video_token_id, merge_size=merge,
                            mrope=True,
                            image_marker="{start}{image}{end}", vision_gets_text_kwargs=False,
                            processor_settings=dict(patch_size=vision.patch_size, merge_size=merge,
                                                    temporal_patch_size=vision.temporal_patch_size))
    raise ValueError(f"no packed multimodal path for model_type {config.model_type!r} "
                     "(supported: qwen2_5_vl, qwen3_vl, qwen3_vl_moe, kimi_k25)")


def packed_attn_implementation(vision: str = "sdpa") -> dict[str, str]:
    """`attn_implementation` for a packed VLM: varlen for the language model, a stock backend for the vision
    tower (it does its own per-image segmentation)."""
    if vision == ATTN_NAME:
        raise ValueError(f"the vision tower cannot use {ATTN_NAME}: use 'sdpa', 'eager' or (Qwen only) a flash backend")
    return {"text_config": ATTN_NAME, "vision_config": vision}


def check_attn_implementation(model) -> None:
    text_impl = model.config.text_config._attn_implementation
    vision_impl = model.config.vision_config._attn_implementation
    if text_impl != ATTN_NAME or vision_impl == ATTN_NAME:
        raise ValueError(
            f"a packed VLM needs attn_implementation={packed_attn_implementation()} "
            f"(got text {text_impl!r}, vision {vision_impl!r}); call model.set_attn_implementation(...)"
        )
    family = vision_family(model.config)
    if family.vision_gets_text_kwargs and "flash" in vision_impl:
        raise ValueError(f"{family.model_type} passes the text's varlen kwargs into its vision tower, where "
                         f"{vision_impl!r} would get cu_seq_lens_q/k twice; use 'sdpa' or 'eager' for vision")


@dataclass
class VisionDoc:
    """One document: its tokens (placeholders expanded), which of them are targets, its images and videos."""

    input_ids: torch.Tensor  # int64 [n]
    loss_mask: torch.Tensor  # bool [n]: token is a training target (predicted from the token before it)
    pixel_values: torch.Tensor | None = None  # [P_doc, ...] in the layout the model's vision tower takes
    image_grid_thw: torch.Tensor | None = None  # int64 [I_doc, 3]
    pixel_values_videos: torch.Tensor | None = None  # [Pv_doc, C*tp*p*p] (Qwen)
    video_grid_thw: torch.Tensor | None = None  # int64 [V_doc, 3]
    second_per_grid_ts: torch.Tensor | None = None  # float [V_doc]: Qwen2.5-VL's seconds per temporal patch

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_images(self) -> int:
        return 0 if self.image_grid_thw is None else int(self.image_grid_thw.shape[0])

    @property
    def num_videos(self) -> int:
        return 0 if self.video_grid_thw is None else int(self.video_grid_thw.shape[0])


def image_placeholder(config, grid_thw) -> list[int]:
    """<vision_start> <image>*n <vision_end> for one image of grid (t, h, w): the token ids the config names.
    (Kimi's template also puts `image<|media_content|>` after the start token; the model does not read it.)"""
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


def _media_inputs(media: VisionDoc | MultimodalPack, pixels: bool = True) -> dict:
    """The images' and videos' forward keyword arguments that are set (grids only, for `get_rope_index`)."""
    names = ["image_grid_thw", "video_grid_thw", "second_per_grid_ts"]
    if pixels:
        names += ["pixel_values", "pixel_values_videos"]
    return {name: getattr(media, name) for name in names if getattr(media, name) is not None}


def check_media_tokens(doc: VisionDoc, family: VisionFamily) -> None:
    """ValueError unless the document holds exactly the image and video tokens its images and videos fill (a
    video of grid (t, h, w) fills t*h*w / merge^2, like an image), or has videos the design cannot take."""
    if doc.num_videos and family.video_token_id is None:
        raise ValueError(f"{family.model_type}: the packed path takes no videos yet (a document has "
                         f"{doc.num_videos})")
    media = [("image", family.image_token_id, doc.image_grid_thw)]
    if family.video_token_id is not None:
        media.append(("video", family.video_token_id, doc.video_grid_thw))
    for medium, token_id, grids in media:
        num_media = 0 if grids is None else len(grids)
        expected = sum(family.num_image_tokens(g) for g in grids) if num_media else 0
        found = int((doc.input_ids == token_id).sum())
        if found != expected:
            raise ValueError(f"a document has {found} {medium} tokens but its {num_media} {medium}s need {expected}")


def mrope_position_ids(model, docs: list[VisionDoc]) -> torch.Tensor:
    """[3, 1, T] multimodal RoPE positions: the model's own `get_rope_index` on each document alone, concatenated,
    so every document starts at 0 exactly as when it runs unpacked. Videos too: Qwen2.5-VL spaces a video's
    temporal patches by its second_per_grid_ts, Qwen3-VL splits each video into per-patch (1, h, w) grids
    itself (its timestamp text between them is plain text)."""
    parts = []
    for doc in docs:
        ids = doc.input_ids[None]
        if doc.num_images == 0 and doc.num_videos == 0:
            parts.append(torch.arange(len(doc), device=ids.device).view(1, 1, -1).expand(3, 1, -1))
            continue
        pos, _ = _base(model).get_rope_index(ids, mm_token_type_ids=mm_token_type_ids(ids, model.config),
                                             **_media_inputs(doc, pixels=False))
        parts.append(pos)
    return torch.cat(parts, dim=2)


def packed_position_ids(model, docs: list[VisionDoc]) -> torch.Tensor:
    """Positions restarting at 0 in every document: [3, 1, T] mRoPE (Qwen) or [1, T] (Kimi, as for text).
    Checks every document's image and video token counts first."""
    family = vision_family(model.config)
    for doc in docs:
        check_media_tokens(doc, family)
    if family.mrope:
        return mrope_position_ids(model, docs)
    return torch.cat([torch.arange(len(d), device=d.input_ids.device) for d in docs])[None]


@dataclass
class MultimodalPack:
    input_ids: torch.Tensor  # int64 [1, T]
    position_ids: torch.Tensor  # int64 [3, 1, T] (mRoPE) or [1, T], restarting per document
    target_ids: torch.Tensor  # int64 [1, T]: next token inside the document, or IGNORE_INDEX
    pixel_values: torch.Tensor | None  # [P, ...], all images of the pack in order
    image_grid_thw: torch.Tensor | None  # int64 [I, 3]
    cu_seqlens: torch.Tensor  # int32 [n_docs+1]
    max_seqlen: int
    doc_lengths: list[int]
    pixel_values_videos: torch.Tensor | None = None  # [Pv, C*tp*p*p], all videos of the pack in order
    video_grid_thw: torch.Tensor | None = None  # int64 [V, 3]
    second_per_grid_ts: torch.Tensor | None = None  # float [V] (Qwen2.5-VL)

    @property
    def num_targets(self) -> int:
        return int((self.target_ids != IGNORE_INDEX).sum())

    def to(self, device: torch.device | str) -> MultimodalPack:
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return MultimodalPack(move(self.input_ids), move(self.position_ids), move(self.target_ids),
                              move(self.pixel_values), move(self.image_grid_thw), move(self.cu_seqlens),
                              self.max_seqlen, self.doc_lengths, move(self.pixel_values_videos),
                              move(self.video_grid_thw), move(self.second_per_grid_ts))

    def model_inputs(self) -> dict:
        """Keyword arguments for `*ForConditionalGeneration.forward`: no attention mask, varlen kwargs instead."""
        inputs = dict(input_ids=self.input_ids, position_ids=self.position_ids,
                      **varlen_kwargs(self.cu_seqlens, self.max_seqlen))
        return {**inputs, **_media_inputs(self)}


def document_targets(doc: VisionDoc) -> torch.Tensor:
    """int64 [n]: token t predicts token t+1 of the same document where that token is a target."""
    targets = torch.full_like(doc.input_ids, IGNORE_INDEX)
    targets[:-1] = torch.where(doc.loss_mask[1:], doc.input_ids[1:], IGNORE_INDEX)
    return targets


def pack_multimodal(docs: list[VisionDoc], model) -> MultimodalPack:
    """Documents (with their images and videos) -> one packed sequence for `model` (a Qwen2.5-VL, Qwen3-VL or
    Kimi model)."""
    assert docs, "a pack holds at least one document"
    lengths = [len(d) for d in docs]
    cu_seqlens, max_seqlen = varlen_metadata(lengths)
    with_videos = [d for d in docs if d.num_videos]
    if len({d.second_per_grid_ts is None for d in with_videos}) > 1:
        raise ValueError("every video of a pack needs second_per_grid_ts (Qwen2.5-VL) or none does (Qwen3-VL)")
    return MultimodalPack(
        input_ids=torch.cat([d.input_ids for d in docs])[None],
        position_ids=packed_position_ids(model, docs),
        target_ids=torch.cat([document_targets(d) for d in docs])[None],
        pixel_values=_cat_present(d.pixel_values for d in docs if d.num_images),
        image_grid_thw=_cat_present(d.image_grid_thw for d in docs if d.num_images),
        cu_seqlens=cu_seqlens,
        max_seqlen=max_seqlen,
        doc_lengths=lengths,
        pixel_values_videos=_cat_present(d.pixel_values_videos for d in with_videos),
        video_grid_thw=_cat_present(d.video_grid_thw for d in with_videos),
        second_per_grid_ts=_cat_present(d.second_per_grid_ts for d in with_videos),
    )


def _cat_present(tensors) -> torch.Tensor | None:
    """The tensors concatenated, None where there are none (or they are None: no second_per_grid_ts)."""
    tensors = [t for t in tensors if t is not None]
    return torch.cat(tensors) if tensors else None


# -- exactness: packed (varlen text, per-image vision) == each document alone with eager attention ----------------


def packed_forward_backward(model, docs: list[VisionDoc]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits [T, V] of the packed sequence and the gradients of its summed token loss."""
    check_attn_implementation(model)
    model.zero_grad(set_to_none=True)
    pack = pack_multimodal(docs, model).to(next(model.parameters()).device)
    logits = model(**pack.model_inputs()).logits[0]
    F.cross_entropy(logits.float(), pack.target_ids[0], ignore_index=IGNORE_INDEX, reduction="sum").backward()
    return logits.detach(), parameter_grads(model)


def reference_forward_backward(model, docs: list[VisionDoc]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Each document alone, unpadded, its own images and videos, no positions given: the model computes its own
    (Qwen: 3-D from mm_token_type_ids), so the reference does not depend on `packed_position_ids`."""
    model.zero_grad(set_to_none=True)
    device = next(model.parameters()).device
    mrope = vision_family(model.config).mrope
    all_logits = []
    for doc in docs:
        ids = doc.input_ids[None].to(device)
        inputs = dict(input_ids=ids, **{k: v.to(device) for k, v in _media_inputs(doc).items()})
        if mrope and (doc.num_images or doc.num_videos):
            inputs.update(mm_token_type_ids=mm_token_type_ids(ids, model.config))
        logits = model(**inputs).logits[0]
        targets = document_targets(doc).to(device)
        F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum").backward()
        all_logits.append(logits.detach())
    return torch.cat(all_logits), parameter_grads(model)


def check_multimodal_exactness(model, docs: list[VisionDoc], tolerance: float = TOLERANCE,
                               vision_attn: str = "sdpa") -> ExactnessReport:
    """Packed (text zeropad_varlen, vision `vision_attn`) against per-document eager, on the same fp32 weights."""
    packed_attn = packed_attn_implementation(vision_attn)
    return compare_passes(model, lambda: reference_forward_backward(model, docs),
                          lambda: packed_forward_backward(model, docs), packed_attn, [len(d) for d in docs],
                          tolerance, restore_attn=packed_attn)
