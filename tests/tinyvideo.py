"""Generated videos (PyAV) and tiny Qwen2.5-VL / Qwen3-VL models for a tokenizer, shared by the video tests."""

import fractions

import av
import numpy as np
import torch

VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]


def write_video(path, size=(64, 48), num_frames=10, fps=10, codec="mpeg4", seed=0):
    """A video of random frames; returns its path."""
    w, h = size
    frames = np.random.default_rng(seed).integers(0, 256, (num_frames, h, w, 3), dtype=np.uint8)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fractions.Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def tiny_qwen_vl(family: str, tokenizer, num_layers: int = 1):
    """A tiny fp32 Qwen2.5-VL (14-pixel patches) or Qwen3-VL (16-pixel patches) with the tokenizer's vision ids."""
    import transformers

    ids = dict(zip(VISION_TOKENS, tokenizer.convert_tokens_to_ids(VISION_TOKENS)))
    text = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=num_layers,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                bos_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    vision = dict(depth=1, hidden_size=32, intermediate_size=48, num_heads=2, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=64)
    if family == "qwen2_5_vl":
        text["rope_parameters"] = dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3])
        vision.update(patch_size=14, window_size=56, fullatt_block_indexes=[0], tokens_per_second=2)
        config_class, model_class = transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration
    else:
        text.update(head_dim=16, rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                                      mrope_section=[4, 2, 2], mrope_interleaved=True))
        vision.update(patch_size=16, num_position_embeddings=64, deepstack_visual_indexes=[0])
        config_class, model_class = transformers.Qwen3VLConfig, transformers.Qwen3VLForConditionalGeneration
    config = config_class(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                          video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                          vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(0)
    return model_class(config).float().eval()
