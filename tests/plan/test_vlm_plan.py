"""`zeropad plan` on every supported image model family, from `model.config` alone: the meta model holds every
parameter (vision tower, projector, VQ-VAE included), the model states are exactly 16 bytes per parameter
(fp32 weights and gradients, AdamW m and v), and the plan says in one line what it leaves out."""

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForImageTextToText
from typer.testing import CliRunner

from zeropad.cli import app
from zeropad.config import build_config
from zeropad.plan.report import run

SPECIAL = dict(image_token_id=120, video_token_id=121, vision_start_token_id=122, vision_end_token_id=123)
TEXT = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2)
QWEN3_TEXT = dict(**TEXT, head_dim=16, rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                                            mrope_section=[4, 2, 2], mrope_interleaved=True))
QWEN3_VISION = dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, patch_size=8, spatial_merge_size=2,
                    temporal_patch_size=2, num_position_embeddings=64, deepstack_visual_indexes=[0],
                    out_hidden_size=64)
CODES = ["IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(k)) + "Z" for k in range(16)]

CONFIGS = {
    "qwen2_5_vl": dict(
        **SPECIAL, text_config=dict(**TEXT, rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                                                 mrope_section=[2, 3, 3])),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1],
                           out_hidden_size=64)),
    "qwen3_vl": dict(**SPECIAL, text_config=QWEN3_TEXT, vision_config=QWEN3_VISION),
    "qwen3_vl_moe": dict(**SPECIAL, vision_config=QWEN3_VISION, text_config=dict(
        **QWEN3_TEXT, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1)),
    "kimi_k25": dict(
        **SPECIAL, projection_hidden_size=32,
        text_config=dict(model_type="deepseek_v3", **{**TEXT, "num_key_value_heads": 4}, moe_intermediate_size=32,
                         n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, n_group=1, topk_group=1,
                         first_k_dense_replace=1, q_lora_rank=24, kv_lora_rank=16, qk_rope_head_dim=8,
                         qk_nope_head_dim=8, v_head_dim=12, rope_parameters=dict(rope_type="default",
                                                                                 rope_theta=10000.0)),
        vision_config=dict(patch_size=8, pos_emb_height=8, pos_emb_width=8, num_attention_heads=2,
                           num_hidden_layers=2, hidden_size=32, intermediate_size=48, merge_kernel_size=[2, 2],
                           rope_parameters=dict(rope_type="axial", rope_theta=10000.0))),
    "chameleon": dict(**TEXT, vocabulary_map={"<image>": 3, **{c: 100 + i for i, c in enumerate(CODES)}},
                      vq_config=dict(resolution=32, channel_multiplier=[1, 1, 1, 1], base_channels=32,
                                     num_res_blocks=1, latent_channels=16, embed_dim=16, num_embeddings=16)),
}
# The image side, by the families' own module names: what the plan must count beside the language model.
IMAGE_MODULES = {"qwen2_5_vl": ["visual"], "qwen3_vl": ["visual"], "qwen3_vl_moe": ["visual"],
                 "kimi_k25": ["vision_tower", "mm_projector"], "chameleon": ["vqmodel"]}
MOE = {"qwen3_vl_moe": (2, 4), "kimi_k25": (1, 4)}  # MoE layers, routed experts


def real_model(family: str) -> torch.nn.Module:
    """The model as transformers builds it from the same config, on the CPU, with no zeropad code involved."""
    config = AutoConfig.for_model(family, **CONFIGS[family])
    return AutoModelForImageTextToText.from_config(config)


def plan_json(family: str, **model) -> dict:
    cfg = build_config({"model": {"config": {"model_type": family, **CONFIGS[family]}, **model},
                        "pack": {"max_tokens": 512}, "train": {"device": "cpu"}})
    return json.loads(run(cfg, num_devices=1, device_memory="4GB", strategy=None, precision="fp32",
                          optimizer="adamw", as_json=True))


@pytest.mark.parametrize("family", list(CONFIGS))
def test_plan_counts_every_parameter_of_an_image_model(family):
    plan = plan_json(family)
    real = real_model(family)
    num_params = sum(p.numel() for p in real.parameters())
    image = sum(p.numel() for name in IMAGE_MODULES[family] for p in getattr(real.model, name).parameters())
    a = plan["model"]
    assert a["num_params"] == a["num_trainable_params"] == num_params
    assert 0 < a["num_image_params"] == image < num_params
    text = real.config.get_text_config()
    assert (a["num_layers"], a["hidden"], a["vocab"]) == (text.num_hidden_layers, text.hidden_size, text.vocab_size)
    assert (a["num_moe_layers"], a["num_experts"]) == MOE.get(family, (0, 0))
    states = {c["name"]: c["device"] for c in plan["components"][:3]}
    assert states == {"parameters": 4 * num_params, "gradients": 4 * num_params, "optimizer state": 8 * num_params}
    assert "not modelled" in a["image_side"] and f"{image / 1e6:.3g}M parameters" in a["image_side"]


def test_plan_with_lora_trains_only_the_adapters_of_a_vlm():
    plan = plan_json("qwen2_5_vl", lora={"r": 4, "target_modules": ["q_proj", "v_proj"]})
    real = real_model("qwen2_5_vl")
    a = plan["model"]
    # r x (in + out) per adapted projection: 2 layers x (q 64->64, v 64->32) in the language model; the vision
    # tower's fused qkv is not a target
    adapters = 2 * 4 * ((64 + 64) + (64 + 32))
    assert a["num_params"] == sum(p.numel() for p in real.parameters()) + adapters
    assert a["num_trainable_params"] == adapters
    states = {c["name"]: c["device"] for c in plan["components"][:3]}
    assert states == {"parameters": 4 * a["num_params"], "gradients": 4 * adapters, "optimizer state": 8 * adapters}


def test_plan_command_on_a_vlm_prints_the_image_line():
    overrides = ["model.config.model_type=qwen3_vl", *(f"model.config.{k}={json.dumps(v)}"
                                                       for k, v in CONFIGS["qwen3_vl"].items())]
    result = CliRunner().invoke(app, ["plan", *overrides, "pack.max_tokens=512", "train.device=cpu",
                                      "--device-memory", "4GB"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()  # model, setup, then the one image line
    assert lines[2].startswith("image encoder: its ") and "not modelled" in lines[2], result.output
    assert "recommendation: memory.checkpointing=none" in result.output
