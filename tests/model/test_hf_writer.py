"""The streaming Hugging Face writer: the files save_pretrained writes (byte for byte, sharded or single), which
from_pretrained loads to the same logits, written while holding one shard plus one tensor at a time."""

import json
import weakref

import pytest
import torch
from transformers import AutoConfig, AutoModelForImageTextToText

from tinymodels import tiny_model
from tinyvlm import vlm_run
from zeropad.config import CheckpointConfig, LoraConfig, build_config, parse_shard_size
from zeropad.errors import ConfigError
from zeropad.model.checkpointing import apply_checkpointing
from zeropad.model.hf_writer import INDEX, WEIGHTS, save_hf_model, weight_files
from zeropad.model.load import auto_class, build_model
from zeropad.model.lora import apply_lora, merged_for_export

SHARD = 40_000  # bytes: the tiny models below need 6 to 30 files


def _qwen2_5_vl():
    text = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                                            mrope_section=[2, 3, 3]))
    vision = dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, spatial_merge_size=2, patch_size=14,
                  temporal_patch_size=2, out_hidden_size=64, window_size=56, fullatt_block_indexes=[1])
    config = AutoConfig.for_model("qwen2_5_vl", text_config=text, vision_config=vision, image_token_id=100,
                                  video_token_id=99, vision_start_token_id=98, vision_end_token_id=97)
    torch.manual_seed(0)
    return AutoModelForImageTextToText.from_config(config, attn_implementation="eager")


def _lora():
    model = apply_lora(tiny_model("qwen3", attn_implementation="eager"), LoraConfig(r=4, alpha=8.0))
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero: make the adapters matter
            torch.nn.init.normal_(p, std=0.1)
    apply_checkpointing(model, "full")  # as the loop: its wrapper is in the module names, not the state dict
    return model


def _tinyvlm(family: str, root):
    root.mkdir()
    (root / "data.json").write_text("[]")
    cfg = build_config(vlm_run(root, root / "data.json", family=family))
    return build_model(cfg.model, attn_implementation="eager")


MODELS = {
    "qwen3": lambda _: tiny_model("qwen3", attn_implementation="eager"),
    "qwen3_tied": lambda _: tiny_model("qwen3", attn_implementation="eager", tie_word_embeddings=True),
    "qwen3_moe": lambda _: tiny_model("qwen3_moe", attn_implementation="eager"),  # fused experts saved per expert
    "qwen2_5_vl": lambda _: _qwen2_5_vl(),  # model.language_model.* saved as model.*
    "kimi_k25": lambda root: _tinyvlm("kimi_k25", root),  # a vision layer's q, k, v saved as one wqkv
    "qwen3_vl_moe": lambda root: _tinyvlm("qwen3_vl_moe", root),
    "chameleon": lambda root: _tinyvlm("chameleon", root),
    "lora": lambda _: _lora(),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_shards_are_save_pretrained_files_and_load_to_the_same_logits(tmp_path, one_thread, name):
    model = MODELS[name](tmp_path / "model").eval()
    ids = torch.randint(0, 97, (1, 23), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    files = save_hf_model(model, tmp_path / "ours", SHARD)
    n = len(files)
    assert n > 3 and files == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    assert [p.name for p in weight_files(tmp_path / "ours")] == files
    # the same files as save_pretrained (of the merged model, for LoRA), byte for byte
    reference = merged_for_export(model) if name == "lora" else model
    reference.save_pretrained(tmp_path / "hf", max_shard_size=SHARD)
    written = sorted(p.name for p in (tmp_path / "ours").iterdir())
    assert written == sorted(p.name for p in (tmp_path / "hf").iterdir())
    assert {INDEX, "config.json", "generation_config.json"} <= set(written)
    for file in written:
        assert (tmp_path / "ours" / file).read_bytes() == (tmp_path / "hf" / file).read_bytes(), file
    weight_map = json.loads((tmp_path / "ours" / INDEX).read_text())["weight_map"]
    assert not any("lora" in key for key in weight_map)
    if name in ("qwen3", "qwen3_tied"):  # a tied weight is written once
        assert ("lm_head.weight" in weight_map) == (name == "qwen3")
    loaded = auto_class(model.config).from_pretrained(tmp_path / "ours", attn_implementation="eager").eval()
    with torch.no_grad():
        diff = (loaded(input_ids=ids).logits - logits).abs().max().item()
    # the same files as save_pretrained: what is left is the loaded model's kernels (an MoE's expert backend) and,
    # for LoRA, the rounding of W + BA
    assert diff <= (1e-5 if name == "lora" else 1e-6), diff


def test_a_model_that_fits_one_shard_is_one_file_and_stale_shards_go(tmp_path):
    model = tiny_model("qwen3")
    save_hf_model(model, tmp_path, SHARD)
    assert save_hf_model(model, tmp_path, "5GB") == [WEIGHTS]
    assert not (tmp_path / INDEX).exists() and sorted(p.name for p in tmp_path.glob("*.safetensors")) == [WEIGHTS]
    assert weight_files(tmp_path) == [tmp_path / WEIGHTS]


def test_the_writer_holds_one_shard_plus_one_tensor(tmp_path):
    model = tiny_model("qwen3_moe")
    own = model.state_dict()
    handed_out: list[weakref.ref] = []
    alive_at_load = []

    def load(names):  # fresh copies, so that only the writer can keep them alive
        alive_at_load.append(sum(t().nbytes for t in handed_out if t() is not None))
        tensors = {name: own[name].clone() for name in names}
        handed_out.extend(weakref.ref(t) for t in tensors.values())
        return tensors

    shard = 60_000
    files = save_hf_model(model, tmp_path, shard, load=load)
    largest = max(t.nbytes for t in own.values())
    assert len(files) > 3 and len(alive_at_load) == len(own)
    # bounded by a shard plus the one tensor running into the next, well under the whole model
    assert max(alive_at_load) <= shard + largest < sum(t.nbytes for t in own.values()) / 2
    assert max(alive_at_load) > 0  # within a shard the tensors are kept until it is written
    assert all(t() is None for t in handed_out)  # nothing kept once written


def test_shard_sizes_read_as_hugging_face_writes_them():
    assert parse_shard_size("5GB") == 5 * 10**9 and parse_shard_size("2GiB") == 2 * 2**30
    assert parse_shard_size(40_000) == 40_000 and parse_shard_size("500 MB") == 5 * 10**8
    assert CheckpointConfig().max_shard_size == 5 * 10**9
    with pytest.raises(ValueError, match="5GB"):
        parse_shard_size("five gigs")
    with pytest.raises(ConfigError, match="max_shard_size"):
        build_config({"checkpoint": {"max_shard_size": "0MB"}})
