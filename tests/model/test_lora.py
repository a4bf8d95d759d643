"""LoRA through peft: packed exactness holds with adapters, only adapters train, and the export
merges them into a plain Hugging Face model with the same logits."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from tinymodels import tiny_model
from zeropad.config import LoraConfig, build_config
from zeropad.demo.tokenizer import build_tokenizer
from zeropad.errors import ConfigError
from zeropad.model.checkpointing import apply_checkpointing
from zeropad.model.lora import apply_lora, is_adapted, merged_for_export
from zeropad.pack.collate import collate
from zeropad.train.loop import train
from zeropad.verify import check_exactness, random_documents

LORA = LoraConfig(r=4, alpha=8.0, target_modules="all-linear")


def _adapted(family="qwen3"):
    model = apply_lora(tiny_model(family), LORA)
    # peft starts B at zero (the adapter is a no-op); make it non-zero so the adapters matter
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    return model


def test_only_adapters_train():
    model = _adapted()
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)
    assert not any("lm_head" in n for n in trained)  # all-linear leaves the output layer alone


@pytest.mark.parametrize("family", ["qwen3", "qwen3_moe"])
def test_packed_exactness_holds_with_adapters(family):
    report = check_exactness(_adapted(family), [7, 33, 1, 64, 19])
    assert report.passed, report.summary()
    assert "lora_" in report.worst_param  # the gradients compared are the adapters'


def test_merged_export_is_a_plain_model_with_the_same_logits(tmp_path):
    model = _adapted().eval()
    apply_checkpointing(model, "full")  # the loop's order: adapters, then checkpointing
    pack = collate(random_documents(model.config.vocab_size, [9, 30, 4], seed=2))
    with torch.no_grad():
        adapted_logits = model(**pack.model_inputs()).logits
    merged = merged_for_export(model)
    assert not is_adapted(merged)
    merged.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="zeropad_varlen")
    assert not any("lora" in n for n, _ in loaded.named_parameters())
    with torch.no_grad():
        assert (loaded(**pack.model_inputs()).logits - adapted_logits).abs().max().item() <= 1e-5


def test_unknown_target_module_is_a_config_error():
    with pytest.raises(ConfigError, match="model.lora.target_modules"):
        apply_lora(tiny_model("qwen3"), LoraConfig(target_modules=["no_such_proj"]))


@pytest.mark.parametrize("target", ["lm_head", "embed_tokens"])
def test_an_adapter_on_a_tied_weight_is_refused(target):
    """The LM head and the input embedding share one weight: an adapter on either use could not be merged into it
    for final/ (the head's adapter was silently dropped there). Untied, the head is adapted as any Linear."""
    with pytest.raises(ConfigError, match=rf"adapts .*{target}, whose weight is the input embedding's too"):
        apply_lora(tiny_model("qwen3", tie_word_embeddings=True), LoraConfig(target_modules=["q_proj", target]))
    apply_lora(tiny_model("qwen3", tie_word_embeddings=False), LoraConfig(target_modules=["q_proj", target]))


def test_training_with_lora_checkpointing_and_offload_exports_merged_weights(tmp_path):
    model_dir = tmp_path / "model"
    build_tokenizer(model_dir)
    base = tiny_model("qwen3", vocab_size=259)
    base.save_pretrained(model_dir)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(f'{{"text": "{i} plus {i} is {2 * i}"}}\n' for i in range(30)))
    cfg = build_config({
        "model": {"path": str(model_dir), "lora": {"r": 4}},
        "data": {"sources": [{"path": str(data), "format": "text"}], "cache_dir": str(tmp_path / "cache"),
                 "num_workers": 0},
        "pack": {"max_tokens": 128},
        "train": {"steps": 3, "lr": 1e-2},
        "memory": {"checkpointing": "selective", "offload_activations": True, "loss_chunk_tokens": 32},
        "log": {"progress": False},
        "output_dir": str(tmp_path / "out"),
    })
    result = train(cfg)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "final")
    assert not any("lora" in n for n, _ in loaded.named_parameters())
    trained = dict(loaded.named_parameters())["model.layers.0.mlp.up_proj.weight"]
    initial = dict(base.named_parameters())["model.layers.0.mlp.up_proj.weight"]
    assert not torch.equal(trained, initial)  # the trained adapters were merged in
    assert torch.equal(dict(loaded.named_parameters())["model.embed_tokens.weight"],
                       dict(base.named_parameters())["model.embed_tokens.weight"])  # frozen, not adapted
    assert result.final_loss == result.final_loss  # not NaN
