"""The command line, end to end in subprocess-free form (typer's runner): pack-stats, train (verify: test_verify_cli)."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from tinymodels import tiny_model
from zeropad.cli import app
from zeropad.demo.tokenizer import build_tokenizer
from zeropad.errors import ConfigError

runner = CliRunner()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    build_tokenizer(path)
    tiny_model("qwen3", vocab_size=259).save_pretrained(path)
    return path


def _write_conversations(path, n=40):
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"instruction": f"Repeat {i}", "input": "", "output": f"{i} " * (1 + i % 7)}) + "\n")


def test_train_from_a_config_writes_outputs(model_dir, tmp_path):
    data = tmp_path / "data.jsonl"
    _write_conversations(data)
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model: {{path: {model_dir}}}\n"
        f"data: {{sources: [{{path: {data}, format: alpaca}}], cache_dir: {tmp_path / 'cache'}, num_workers: 0}}\n"
        "pack: {max_tokens: 256}\n"
        "train: {steps: 4, lr: 1.0e-3, grad_accum: 2}\n"
        "eval: {split: 0.1, every_steps: 2}\n"
        "log: {progress: false, tensorboard: true}\n"
    )
    out = tmp_path / "out"
    result = runner.invoke(app, ["train", str(config), f"output_dir={out}"])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for key in ["loss", "lr", "grad_norm", "tokens", "tokens_per_s", "pad_fraction"]:
        assert key in steps[0]
    assert all(0 < r["tokens"] <= 2 * 256 and r["pad_fraction"] == 0.0 for r in steps)
    assert any("eval_loss" in r for r in records)
    assert (out / "loss.png").stat().st_size > 1000
    assert any((out / "tb").iterdir())
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    AutoTokenizer.from_pretrained(out / "final")
    trained = dict(model.named_parameters())["model.layers.0.mlp.up_proj.weight"]
    initial = dict(tiny_model("qwen3", vocab_size=259).named_parameters())["model.layers.0.mlp.up_proj.weight"]
    assert not torch.equal(trained, initial)


def test_bad_config_key_is_named(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("train: {stepz: 3}\n")
    from zeropad.config import load_config
    from zeropad.errors import ConfigError

    with pytest.raises(ConfigError, match="did you mean 'steps'"):
        load_config(config)


def test_export_names_an_unreadable_shard_size(tmp_path):
    from zeropad.errors import ConfigError

    result = runner.invoke(app, ["export", str(tmp_path), str(tmp_path / "hf"), "--max-shard-size", "big"])
    assert isinstance(result.exception, ConfigError) and "--max-shard-size" in str(result.exception)


def test_pack_stats(model_dir, tmp_path):
    data = tmp_path / "data.jsonl"
    _write_conversations(data)
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model: {{path: {model_dir}}}\n"
        f"data: {{sources: [{{path: {data}}}], cache_dir: {tmp_path / 'cache'}, num_workers: 0}}\n"
        "pack: {max_tokens: 128}\n"
    )
    result = runner.invoke(app, ["pack-stats", str(config), "--show", "2"])
    assert result.exit_code == 0, result.output
    assert "lower" in result.output.lower() and "utilization" in result.output.lower()
    # the preview: the first two samples as text, the reply and its end of turn (only they) marked as trained
    preview = result.stdout[result.stdout.index("--- sample 1"):]
    assert preview == ("--- sample 1: 31 tokens, 4 trained ---\n<|im_start|>user\nRepeat 0<|im_end|>\n"
                       "<|im_start|>assistant\n⟦0 <|im_end|>\n⟧\n"
                       "--- sample 2: 33 tokens, 6 trained ---\n<|im_start|>user\nRepeat 1<|im_end|>\n"
                       "<|im_start|>assistant\n⟦1 1 <|im_end|>\n⟧\n")


def test_streaming_train_with_separate_eval_source(model_dir, tmp_path):
    data, held_out = tmp_path / "data.jsonl", tmp_path / "eval.jsonl"
    _write_conversations(data, n=30)
    _write_conversations(held_out, n=5)
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model: {{path: {model_dir}}}\n"
        f"data: {{sources: [{{path: {data}}}], cache_dir: {tmp_path / 'cache'}, num_workers: 0}}\n"
        f"eval: {{sources: [{{path: {held_out}}}]}}\n"
        "pack: {max_tokens: 128, streaming: true, buffer_samples: 8}\n"
        "train: {steps: 30}\n"  # more packs than one epoch: the stream starts a second epoch
        "log: {progress: false}\n"
    )
    out = tmp_path / "out"
    result = runner.invoke(app, ["train", str(config), f"output_dir={out}"])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(r.get("epoch", 0) for r in records) >= 1
    assert "eval_loss" in records[-1]
    assert all(r["tokens"] <= 128 for r in records if "tokens" in r)
    # eval.split cannot hold out part of a stream: refused (it trained on all the data, with no eval, silently)
    result = runner.invoke(app, ["train", str(config), f"output_dir={tmp_path / 'split'}", "eval.sources=[]",
                                 "eval.split=0.2"])
    assert isinstance(result.exception, ConfigError) and "give eval.sources" in str(result.exception), result.output
