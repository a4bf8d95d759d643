import pytest

from zeropad.config import build_config, describe_keys, load_config, parse_overrides
from zeropad.errors import ConfigError


def test_defaults_validate():
    cfg = build_config({})
    assert cfg.pack.max_tokens == 8192 and cfg.train.dtype == "fp32"


def test_unknown_key_names_it_and_suggests():
    with pytest.raises(ConfigError, match=r"unknown key 'train.stpes'; did you mean 'steps'"):
        build_config({"train": {"stpes": 3}})
    with pytest.raises(ConfigError, match=r"unknown key 'pack.max_token'; did you mean 'max_tokens'"):
        build_config({}, ["pack.max_token=4"])
    with pytest.raises(ConfigError, match=r"'data.sources.0.formt'; did you mean 'format'"):
        build_config({"data": {"sources": [{"path": "x.json", "formt": "alpaca"}]}})


def test_bad_value_names_key():
    with pytest.raises(ConfigError, match=r"'train.dtype'"):
        build_config({}, ["train.dtype=fp8"])
    with pytest.raises(ConfigError, match=r"'pack.max_tokens'"):
        build_config({}, ["pack.max_tokens=-1"])


def test_overrides_parse_yaml_scalars():
    assert parse_overrides(["train.lr=0.001", "log.tensorboard=true", "output_dir=x"]) == {
        "train": {"lr": 1e-3}, "log": {"tensorboard": True}, "output_dir": "x"}
    assert build_config({}, ["train.lr=1e-3"]).train.lr == 1e-3
    with pytest.raises(ConfigError, match="key.sub=value"):
        parse_overrides(["train.steps"])
    # YAML 1.2's floats in untyped places too (PyYAML alone reads 1e-5 as a string, which reached transformers)
    assert parse_overrides(["model.config.rms_norm_eps=1e-5", "model.config.rope_theta=1e6", "x=1e"]) == {
        "model": {"config": {"rms_norm_eps": 1e-5, "rope_theta": 1e6}}, "x": "1e"}


def test_yaml_file_and_the_issue_example(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "model:\n  path: ./my-model\ndata:\n  sources:\n"
        "    - {path: ../shared/data/alpaca_en_demo.json, format: alpaca, weight: 1.0}\n"
        "  on_bad_sample: error\npack:\n  max_tokens: 8192\n"
        "train:\n  steps: 100\n  lr: 1.0e-3\n  grad_accum: 1\n  seed: 0\n  dtype: fp32\n"
        "log:\n  tensorboard: false\noutput_dir: runs/example\n"
    )
    cfg = load_config(path, ["train.steps=5"])
    assert cfg.train.steps == 5 and cfg.train.lr == 1e-3 and cfg.data.sources[0].format == "alpaca"
    floats = tmp_path / "floats.yaml"
    floats.write_text("model:\n  config: {model_type: qwen3, rms_norm_eps: 1e-6}\n")
    assert load_config(floats).model.config == {"model_type": "qwen3", "rms_norm_eps": 1e-6}
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_every_key_is_documented():
    text = describe_keys()
    for key in ["pack.max_tokens", "train.grad_accum", "data.on_bad_sample", "log.tensorboard", "output_dir"]:
        assert key in text


def test_example_configs_validate():
    from pathlib import Path

    examples = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml"))
    assert examples
    for path in examples:
        load_config(path)


def test_readme_documents_every_key():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for line in describe_keys().splitlines():
        key = line.split(" = ")[0]
        assert f"`{key}`" in readme, f"README config reference misses {key}"


def test_combinations_are_refused_from_the_config_alone():
    with pytest.raises(ConfigError) as err:
        build_config({"parallel": {"strategy": "ddp", "replicate": 2}})
    assert str(err.value) == ("config error: parallel.replicate / parallel.shard (HSDP) are FSDP options: set "
                              "parallel.strategy=fsdp")


def test_lora_combines_with_every_parallel_strategy():
    for strategy in ("none", "ddp", "fsdp"):
        cfg = build_config({"model": {"lora": {}}, "parallel": {"strategy": strategy}})
        assert cfg.model.lora is not None and cfg.parallel.strategy == strategy
