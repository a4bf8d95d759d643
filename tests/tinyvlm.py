"""A tiny multimodal run from scratch (the offline char tokenizer plus the family's image tokens): Qwen2.5-VL,
Qwen3-VL, Qwen3-VL-MoE, Kimi-K2.5 or Chameleon, shared by the image, video and distributed training tests."""

from pathlib import Path

from tinyvideo import VISION_TOKENS
from zeropad.demo.tokenizer import build_tokenizer
from zeropad.family import CHAMELEON_BOI, CHAMELEON_EOI

# Chameleon names VQ code k "IMGIMG<k's digits as letters A-J>Z"; the model finds its codes by that prefix.
CHAMELEON_CODES = ["IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(k)) + "Z" for k in range(32)]
CHAMELEON_TOKENS = ["<image>", CHAMELEON_BOI, CHAMELEON_EOI, *CHAMELEON_CODES]
KIMI_TOKENS = ["<|media_begin|>", "<|media_content|>", "<|media_end|>", "<|media_pad|>"]
FAMILY_TOKENS = {"chameleon": CHAMELEON_TOKENS, "kimi_k25": KIMI_TOKENS}


def _kimi(tokenizer) -> dict:
    """MoonViT (14-pixel patches, 2x2 merge), MLP projector, 2-layer DeepSeek-V3 text model (dense, then MoE with
    4 routed experts, 2 per token, 1 shared; MLA attention)."""
    ids = dict(zip(KIMI_TOKENS, tokenizer.convert_tokens_to_ids(KIMI_TOKENS)))
    text = dict(model_type="deepseek_v3", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96,
                moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, n_group=1, topk_group=1,
                first_k_dense_replace=1, q_lora_rank=24, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                v_head_dim=12, max_position_embeddings=4096, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, rope_parameters=dict(rope_type="default", rope_theta=10000.0))
    vision = dict(patch_size=14, pos_emb_height=8, pos_emb_width=8, num_attention_heads=2, num_hidden_layers=2,
                  hidden_size=32, intermediate_size=48, merge_kernel_size=[2, 2],
                  rope_parameters=dict(rope_type="axial", rope_theta=10000.0))
    return dict(model_type="kimi_k25", text_config=text, vision_config=vision, projection_hidden_size=32,
                image_token_id=ids["<|media_pad|>"], vision_start_token_id=ids["<|media_begin|>"],
                vision_end_token_id=ids["<|media_end|>"], video_token_id=ids["<|media_content|>"],
                eos_token_id=tokenizer.eos_token_id)


def _chameleon(tokenizer) -> dict:
    """32 px, three halvings: a 4 x 4 code grid, 16 tokens per image; 32 codes. GroupNorm(32) needs 32 channels."""
    vq = dict(resolution=32, channel_multiplier=[1, 1, 1, 1], base_channels=32, num_res_blocks=1,
              latent_channels=16, embed_dim=16, num_embeddings=len(CHAMELEON_CODES))
    return dict(model_type="chameleon", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                vocabulary_map=tokenizer.get_vocab(), image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.eos_token_id, vq_config=vq)


def vlm_run(root: Path, data_file: Path, family: str = "qwen2_5_vl", name: str = "out", **sections) -> dict:
    """A ~0.2M-parameter model of `family` from scratch with the offline char tokenizer plus its image tokens."""
    tokenizer_dir = root / "tokenizer"
    tokenizer = build_tokenizer(tokenizer_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": FAMILY_TOKENS.get(family, VISION_TOKENS)})
    tokenizer.save_pretrained(tokenizer_dir)
    cfg = {
        "model": {"tokenizer": str(tokenizer_dir)},
        "data": {"sources": [{"path": str(data_file), "format": "messages"}]},
        "pack": {"max_tokens": 8192},
        "train": {"steps": 2, "lr": 1e-3, "device": "cpu"},
        "log": {"progress": False},
        "output_dir": str(root / name),
    }
    if family == "chameleon":
        cfg["model"]["config"] = _chameleon(tokenizer)
    elif family == "kimi_k25":
        cfg["model"]["config"] = _kimi(tokenizer)
        cfg["vision"] = {"max_pixels": 14 * 14 * 64}  # <= 64 patches, 16 visual tokens per image
    else:
        cfg["model"]["config"], unit = _qwen_vl(family, tokenizer)
        cfg["vision"] = {"min_pixels": unit * unit, "max_pixels": unit * unit * 16}  # <= 16 visual tokens per image
        cfg["video"] = {"fps": 1.0, "max_frames": 4, "max_pixels": unit * unit * 4}  # <= 2 x 4 tokens per video
    for section, values in sections.items():
        cfg[section] = {**cfg.get(section, {}), **values}
    return cfg


def _qwen_vl(family: str, tokenizer) -> tuple[dict, int]:
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
    if family == "qwen3_vl_moe":  # 4 experts, 2 per token, in every text layer
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1)
    model = dict(model_type=family, vocab_size=len(tokenizer), image_token_id=ids["<|image_pad|>"],
                 video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                 vision_end_token_id=ids["<|vision_end|>"], eos_token_id=tokenizer.eos_token_id,
                 text_config=text, vision_config=vision)
    return model, vision["patch_size"] * 2
