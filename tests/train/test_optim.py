"""Parameter groups (vision / projector / language) of tiny random VLMs and text models, freezing, and
per-group learning rates through warmup and cosine."""

import pytest
import torch

from tinymodels import tiny_model
from zeropad.config import TrainConfig
from zeropad.errors import ConfigError
from zeropad.model.vlm import mm_token_type_ids
from zeropad.train.optim import (
    apply_freeze,
    build_optimizer,
    build_scheduler,
    count_groups,
    describe_groups,
    group_lrs,
    lr_factor,
    parameter_groups,
)

TEXT = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2)
SPECIAL = dict(image_token_id=120, video_token_id=121, vision_start_token_id=122, vision_end_token_id=123)
QWEN3_VISION = dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, patch_size=8, spatial_merge_size=2,
                    temporal_patch_size=2, num_position_embeddings=64, deepstack_visual_indexes=[0],
                    out_hidden_size=64)
QWEN3_ROPE = dict(rope_type="default", rope_theta=10000.0, mrope_section=[4, 2, 2], mrope_interleaved=True)


def tiny_qwen2_5_vl():
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text = dict(**TEXT, rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3]))
    vision = dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1], out_hidden_size=64)
    torch.manual_seed(0)
    return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision, **SPECIAL))


def tiny_qwen2_vl():
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    text = dict(**TEXT, rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3]))
    vision = dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, patch_size=14, spatial_merge_size=2)
    return Qwen2VLForConditionalGeneration(Qwen2VLConfig(text_config=text, vision_config=vision, **SPECIAL))


def tiny_qwen3_vl():
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    text = dict(**TEXT, head_dim=16, rope_parameters=QWEN3_ROPE)
    return Qwen3VLForConditionalGeneration(Qwen3VLConfig(text_config=text, vision_config=QWEN3_VISION, **SPECIAL))


def tiny_qwen3_vl_moe():
    from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

    text = dict(**TEXT, head_dim=16, rope_parameters=QWEN3_ROPE, num_experts=4, num_experts_per_tok=2,
                moe_intermediate_size=32, decoder_sparse_step=1)
    return Qwen3VLMoeForConditionalGeneration(Qwen3VLMoeConfig(text_config=text, vision_config=QWEN3_VISION,
                                                               **SPECIAL))


def tiny_kimi_k25():
    from transformers import Kimi_K25Config, Kimi_K25ForConditionalGeneration

    text = dict(model_type="deepseek_v3", **TEXT, moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2,
                n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8,
                qk_nope_head_dim=8, v_head_dim=16, n_group=1, topk_group=1)
    vision = dict(patch_size=14, num_attention_heads=2, num_hidden_layers=1, hidden_size=32, intermediate_size=48,
                  pos_emb_height=8, pos_emb_width=8)
    return Kimi_K25ForConditionalGeneration(Kimi_K25Config(text_config=text, vision_config=vision,
                                                           projection_hidden_size=32, **SPECIAL))


def tiny_chameleon():
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration

    vq = dict(embed_dim=8, num_embeddings=16, latent_channels=4, resolution=32, base_channels=32,
              channel_multiplier=[1, 2], num_res_blocks=1, attn_resolutions=[])
    return ChameleonForConditionalGeneration(ChameleonConfig(**TEXT, vq_config=vq, vocabulary_map={"<image>": 100}))


# family -> (builder, vision prefix, projector prefixes): the expected split, written out by name
QWEN_MERGERS = ("model.visual.merger.", "model.visual.deepstack_merger_list.")
FAMILIES = {
    "qwen2_vl": (tiny_qwen2_vl, "model.visual.", ("model.visual.merger.",)),
    "qwen2_5_vl": (tiny_qwen2_5_vl, "model.visual.", ("model.visual.merger.",)),
    "qwen3_vl": (tiny_qwen3_vl, "model.visual.", QWEN_MERGERS),
    "qwen3_vl_moe": (tiny_qwen3_vl_moe, "model.visual.", QWEN_MERGERS),
    "kimi_k25": (tiny_kimi_k25, "model.vision_tower.", ("model.mm_projector.",)),
    "chameleon": (tiny_chameleon, "model.vqmodel.", ()),
    "qwen3_text": (lambda: tiny_model("qwen3", attn_implementation="sdpa"), None, ()),
}


def expected_group(name: str, vision: str | None, projectors: tuple[str, ...]) -> str:
    if any(name.startswith(p) for p in projectors):
        return "projector"
    return "vision" if vision and name.startswith(vision) else "language"


@pytest.mark.parametrize("family", FAMILIES)
def test_groups_by_family(family):
    build, vision, projectors = FAMILIES[family]
    model = build()
    groups = parameter_groups(model)
    assert groups == {name: expected_group(name, vision, projectors) for name, _ in model.named_parameters()}
    assert set(groups.values()) == {"language"} | ({"vision"} if vision else set()) | (
        {"projector"} if projectors else set())


def test_groups_through_lora_checkpointing_and_ddp(tmp_path):
    """peft ('base_model.model.'), checkpoint wrappers ('_checkpoint_wrapped_module.') and DDP ('module.')
    prefixes: the same split, and LoRA adapters join the group of the layer they adapt."""
    import torch.distributed as dist
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    from zeropad.config import LoraConfig
    from zeropad.model.lora import apply_lora

    model = tiny_qwen2_5_vl()
    plain = parameter_groups(model)
    model = apply_lora(model, LoraConfig(r=2, target_modules=["q_proj", "qkv", "mlp.0"]))
    layers = model.base_model.model.model.language_model.layers
    layers[0] = checkpoint_wrapper(layers[0])
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
        groups = parameter_groups(wrapped)
    finally:
        dist.destroy_process_group()

    def unprefixed(name: str) -> str:
        name = name.removeprefix("module.base_model.model.").replace("_checkpoint_wrapped_module.", "")
        return name.replace(".base_layer.", ".")

    base = {name: g for name, g in groups.items() if "lora_" not in name}
    assert {unprefixed(n): g for n, g in base.items()} == plain
    lora = {name: g for name, g in groups.items() if "lora_" in name}
    assert {g for n, g in lora.items() if ".visual.merger." in n} == {"projector"}
    assert {g for n, g in lora.items() if ".visual.blocks." in n} == {"vision"}
    assert {g for n, g in lora.items() if ".language_model." in n} == {"language"}


def image_batch(model) -> dict:
    """One image of 4x4 patches between text tokens: the forward runs vision tower, projector and LM."""
    grid = torch.tensor([[1, 4, 4]])
    v = model.config.vision_config
    ids = torch.tensor([[5, 122] + [120] * 4 + [123, 6, 7, 8]])
    return dict(input_ids=ids, labels=ids, pixel_values=torch.randn(16, 3 * v.temporal_patch_size * v.patch_size**2),
                image_grid_thw=grid, mm_token_type_ids=mm_token_type_ids(ids, model.config))


@pytest.mark.parametrize("freeze", [["vision"], []])
def test_freezing_vision_keeps_it_bitwise(freeze):
    model = tiny_qwen2_5_vl()
    counts = apply_freeze(model, freeze)
    assert (counts["vision"].frozen > 0) == bool(freeze) and counts["projector"].frozen == 0
    optimizer = build_optimizer(model, TrainConfig(lr=1e-2, weight_decay=0.1))
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    groups = parameter_groups(model)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}

    model(**image_batch(model)).loss.backward()
    optimizer.step()

    changed = {g: [] for g in ("vision", "projector", "language")}
    for name, p in model.named_parameters():
        changed[groups[name]].append(not torch.equal(p, before[name]))
        if groups[name] == "vision":
            assert (id(p) in in_optimizer) != bool(freeze)
    assert not any(changed["vision"]) if freeze else all(changed["vision"])
    assert all(changed["projector"])
    assert any(changed["language"])  # embeddings of unused tokens, bias-free layers etc. may not move


def test_group_lrs_follow_warmup_and_cosine():
    model = tiny_qwen3_vl()
    peaks = {"language": 1e-3, "projector": 3e-4, "vision": 2e-5}
    cfg = TrainConfig(lr=peaks["language"], group_lr={"projector": peaks["projector"], "vision": peaks["vision"]},
                      steps=8, warmup_steps=2, min_lr_ratio=0.1)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    assert [g["group"] for g in optimizer.param_groups] == ["language"] * 2 + ["projector"] * 2 + ["vision"] * 2
    seen = []
    for step in range(cfg.steps):
        factor = lr_factor(step, cfg)
        assert scheduler.get_last_lr() == pytest.approx([peaks[g["group"]] * factor for g in optimizer.param_groups])
        assert group_lrs(optimizer) == pytest.approx({g: peak * factor for g, peak in peaks.items()})
        seen.append(factor)
        optimizer.step()
        scheduler.step()
    assert seen[:3] == [0.5, 1.0, 1.0] and 0.1 < seen[-1] < seen[3] < 1.0  # warmup, then cosine down


def test_text_model_optimizer_unchanged():
    """A text model gets the two param groups it always had: same parameters in the same order, same
    hyperparameters (resume compares optimizer state)."""
    model = tiny_model("qwen3", attn_implementation="sdpa")
    cfg = TrainConfig(lr=3e-3, weight_decay=0.1)
    optimizer = build_optimizer(model, cfg)
    params = [p for p in model.parameters()]
    expected = [([p for p in params if p.ndim >= 2], 0.1), ([p for p in params if p.ndim < 2], 0.0)]
    assert [(g["params"], g["weight_decay"]) for g in optimizer.param_groups] == expected
    for g in optimizer.param_groups:
        assert (g["lr"], g["betas"], g["eps"], g["group"]) == (3e-3, cfg.betas, 1e-8, "language")
    assert count_groups(model) == {"language": (sum(p.numel() for p in params), 0)}


def test_describe_groups():
    model = tiny_kimi_k25()
    line = describe_groups(apply_freeze(model, ["vision", "projector"]))
    assert line.startswith("language ") and "M trained, projector " in line and line.endswith("M frozen")


@pytest.mark.parametrize("build, section, value, message", [
    (FAMILIES["qwen3_text"][0], "freeze", ["vision"], "train.freeze: Qwen3ForCausalLM has no vision parameters"),
    (tiny_chameleon, "freeze", ["projector"], "train.freeze: ChameleonForConditionalGeneration has no projector"),
    (tiny_qwen2_5_vl, "freeze", ["vision", "projector", "language"], "leaves nothing to train"),
    (FAMILIES["qwen3_text"][0], "group_lr", {"vision": 1e-5}, "train.group_lr: Qwen3ForCausalLM has no vision"),
])
def test_bad_groups(build, section, value, message):
    model = build()
    with pytest.raises(ConfigError, match=message):
        if section == "freeze":
            apply_freeze(model, value)
        else:
            build_optimizer(model, TrainConfig(group_lr=value))


def test_group_lr_of_a_frozen_group():
    model = tiny_qwen2_5_vl()
    apply_freeze(model, ["vision"])
    with pytest.raises(ConfigError, match="train.group_lr: vision is also in train.freeze"):
        build_optimizer(model, TrainConfig(freeze=["vision"], group_lr={"vision": 1e-5}))


def test_freezing_lora_model_language_leaves_nothing():
    from zeropad.config import LoraConfig
    from zeropad.model.lora import apply_lora

    model = apply_lora(tiny_qwen2_5_vl(), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match="leaves nothing to train"):
        apply_freeze(model, ["language"])


@pytest.mark.parametrize("autocast", [False, True])
def test_fused_adamw_equals_foreach(autocast):
    """build_optimizer's fused AdamW (its CPU kernel) against torch's foreach path on the same groups: a few steps
    of a tiny model, fp32 weights, with and without bf16 autocast (train.dtype bf16)."""
    from zeropad.pack.collate import collate
    from zeropad.train.loss import lm_loss_sum
    from zeropad.verify import random_documents

    models = [tiny_model("qwen3") for _ in range(2)]
    initial = {n: p.detach().clone() for n, p in models[0].named_parameters()}
    fused = build_optimizer(models[0], TrainConfig(lr=1e-2))
    assert all(g["fused"] for g in fused.param_groups)
    names = {id(p): n for n, p in models[0].named_parameters()}
    ref_params = dict(models[1].named_parameters())
    groups = [{k: v for k, v in g.items() if k not in ("params", "fused", "foreach")}
              | {"params": [ref_params[names[id(p)]] for p in g["params"]]} for g in fused.param_groups]
    foreach = torch.optim.AdamW(groups, foreach=True)
    pack = collate(random_documents(models[0].config.vocab_size, [9, 14, 5]))
    for _ in range(4):
        for model, optimizer in zip(models, (fused, foreach)):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                lm_loss_sum(model, pack.model_inputs(), pack.target_ids[0]).backward()
            optimizer.step()
            optimizer.zero_grad()
    # Rounding only: measured 3.1e-6 (fp32) and 2.7e-7 (bf16 autocast) of the largest weight after 4 steps, Adam
    # dividing by the root of small second moments; bf16's bound allows a flipped bf16 activation.
    tol = 1e-2 if autocast else 1e-5
    for name, p in models[0].named_parameters():
        ref = ref_params[name]
        assert (p - ref).abs().max() <= tol * ref.abs().max(), name
    assert max((p - initial[n]).abs().max() for n, p in models[0].named_parameters()) > 1e-2  # far above tol
    # One state dict format: a checkpoint written by either optimizer resumes the other.
    saved, ref_saved = fused.state_dict(), foreach.state_dict()
    assert {i: (s.keys(), [t.shape for t in s.values()]) for i, s in saved["state"].items()} == \
        {i: (s.keys(), [t.shape for t in s.values()]) for i, s in ref_saved["state"].items()}
    foreach.load_state_dict(saved)
    fused.load_state_dict(ref_saved)
    assert all(torch.equal(foreach.state[p]["exp_avg"], fused_state["exp_avg"]) for p, fused_state in
               zip((p for g in foreach.param_groups for p in g["params"]), saved["state"].values()))
