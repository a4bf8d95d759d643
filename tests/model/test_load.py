"""The one model builder: meta models hold shapes and no storage, the Auto class follows the config (Chameleon
is image-text-to-text), a VLM gets varlen attention in its language model only, weights are read from
model.path or seeded, and LoRA is added when asked."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from tinymodels import TINY
from zeropad.config import ModelConfig, build_config
from zeropad.model.attention import ATTN_NAME
from zeropad.errors import ConfigError
from zeropad.model.load import build_model

QWEN3 = {"model_type": "qwen3", **TINY}
VLM = dict(model_type="qwen2_5_vl", image_token_id=97, video_token_id=98, vision_start_token_id=99,
           vision_end_token_id=100,
           text_config=dict(**{**TINY, "head_dim": 16}, rope_parameters=dict(rope_type="default", rope_theta=1e4,
                                                                            mrope_section=[2, 3, 3])),
           vision_config=dict(depth=1, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64))


def test_meta_model_has_shapes_and_no_storage():
    model = build_model(ModelConfig(config=VLM), device="meta")
    params = list(model.parameters())
    assert params and all(p.is_meta for p in params)
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert sum(p.numel() for p in params) == sum(p.numel() for p in build_model(ModelConfig(config=VLM)).parameters())


def test_vlm_attention_is_set_per_sub_config_and_the_cache_is_off():
    model = build_model(ModelConfig(config=VLM))
    assert model.config.text_config._attn_implementation == ATTN_NAME
    assert model.config.vision_config._attn_implementation == "sdpa"
    assert model.config.get_text_config().use_cache is False
    eager = build_model(ModelConfig(config=VLM), attn_implementation="eager")
    assert {eager.config.text_config._attn_implementation, eager.config.vision_config._attn_implementation} == {
        "eager"}


def test_chameleon_is_built_as_image_text_to_text():
    codes = {f"IMGIMG{c}Z": 90 + i for i, c in enumerate("ABCD")}
    config = dict(model_type="chameleon", **{k: v for k, v in TINY.items() if k != "head_dim"},
                  vocabulary_map={"<image>": 3, **codes},
                  vq_config=dict(resolution=32, channel_multiplier=[1, 1], base_channels=32, num_res_blocks=1,
                                 latent_channels=16, embed_dim=16, num_embeddings=4))
    model = build_model(ModelConfig(config=config), device="meta")
    assert type(model).__name__ == "ChameleonForConditionalGeneration"
    assert model.config._attn_implementation == ATTN_NAME  # early fusion: the whole model is one LM


def test_weights_from_path_or_seeded(tmp_path):
    saved = AutoModelForCausalLM.from_config(AutoConfig.for_model(**QWEN3))
    saved.save_pretrained(tmp_path)
    cfg = ModelConfig(path=str(tmp_path))
    read = build_model(cfg).state_dict()
    assert all(torch.equal(read[k], v) for k, v in saved.state_dict().items())
    seeded, again = build_model(cfg, seed=3, weights=False), build_model(cfg, seed=3, weights=False)
    emb = "model.embed_tokens.weight"
    assert torch.equal(seeded.state_dict()[emb], again.state_dict()[emb])
    assert not torch.equal(seeded.state_dict()[emb], read[emb])


def test_an_override_the_checkpoint_config_lacks_is_refused(tmp_path):
    """transformers drops an override its loaded config has no field for: a misspelt key changed nothing, silently."""
    AutoConfig.for_model(**QWEN3).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match=r"has no hiden_size \(did you mean hidden_size\?\)"):
        build_model(ModelConfig(path=str(tmp_path), config={"hiden_size": 32}), device="meta")
    model = build_model(ModelConfig(path=str(tmp_path), config={"num_hidden_layers": 1}), device="meta")
    assert model.config.num_hidden_layers == 1
    AutoConfig.for_model(**VLM).save_pretrained(tmp_path / "vlm")  # a VLM's language-model fields are nested
    with pytest.raises(ConfigError, match=r"has no max_position_embeddings \(did you mean text_config"):
        build_model(ModelConfig(path=str(tmp_path / "vlm"), config={"max_position_embeddings": 512}), device="meta")
    nested = {"text_config": {"max_position_embeddings": 512}}
    assert build_model(ModelConfig(path=str(tmp_path / "vlm"), config=nested), device="meta").config.text_config \
        .max_position_embeddings == 512


def test_a_tokenizer_path_with_a_tilde_is_expanded(tmp_path, monkeypatch):
    from zeropad.demo.tokenizer import build_tokenizer
    from zeropad.model.load import load_tokenizer

    build_tokenizer(tmp_path / "tok")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert len(load_tokenizer(ModelConfig(tokenizer="~/tok"))) > 0  # it was taken for a hub repo id


def test_lora_when_asked():
    pytest.importorskip("peft")
    cfg = build_config({"model": {"config": QWEN3, "lora": {"r": 4}}}).model
    assert not any("lora_" in n for n, _ in build_model(cfg).named_parameters())
    adapted = build_model(cfg, lora=True)
    trained = [n for n, p in adapted.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)
