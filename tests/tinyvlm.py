"""A tiny Qwen2.5-VL or Qwen3-VL run from scratch (the offline char tokenizer plus the vision tokens), shared by
the image, video and distributed training tests."""

from pathlib import Path

from tinyvideo import VISION_TOKENS
from zeropad.demo.tokenizer import build_tokenizer


def vlm_run(root: Path, data_file: Path, family: str = "qwen2_5_vl", name: str = "out", **sections) -> dict:
    """A ~0.2M-parameter Qwen2.5-VL or Qwen3-VL from scratch with the offline char tokenizer plus vision tokens."""
    tokenizer_dir = root / "tokenizer"
    tokenizer = build_tokenizer(tokenizer_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": VISION_TOKENS})
    tokenizer.save_pretrained(tokenizer_dir)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS}
    text = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    vision = dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=64)
    if family == "qwen2_5_vl":
        text["rope_parameters"] = dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3])
        vision.update(patch_size=14, window_size=56, fullatt_block_indexes=[1])
    else:
        text.update(head_dim=16, rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                                      mrope_section=[4, 2, 2], mrope_interleaved=True))
        vision.update(patch_size=16, num_position_embeddings=64, deepstack_visual_indexes=[0])
    unit = vision["patch_size"] * 2
    model = dict(model_type=family, vocab_size=len(tokenizer), image_token_id=ids["<|image_pad|>"],
                 video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                 vision_end_token_id=ids["<|vision_end|>"], eos_token_id=tokenizer.eos_token_id,
                 text_config=text, vision_config=vision)
    cfg = {
        "model": {"config": model, "tokenizer": str(tokenizer_dir)},
        "data": {"sources": [{"path": str(data_file), "format": "messages"}]},
        "vision": {"min_pixels": unit * unit, "max_pixels": unit * unit * 16},  # <= 16 visual tokens per image
        "video": {"fps": 1.0, "max_frames": 4, "max_pixels": unit * unit * 4},  # <= 2 x 4 tokens per video
        "pack": {"max_tokens": 8192},
        "train": {"steps": 2, "lr": 1e-3, "device": "cpu"},
        "log": {"progress": False},
        "output_dir": str(root / name),
    }
    for section, values in sections.items():
        cfg[section] = {**cfg.get(section, {}), **values}
    return cfg
