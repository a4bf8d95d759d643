"""The built-in default (`zeropad train` with no config), shortened through overrides."""

import json

from typer.testing import CliRunner

from zeropad.cli import app


def test_default_run_shortened_trains_and_writes_outputs(tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "train.steps=40", f"output_dir={out}",
                                      f"data.cache_dir={tmp_path / 'cache'}", "log.progress=false"])
    assert result.exit_code == 0, result.output
    assert "held-out exact match" in result.output
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0]  # it learns: loss falls well below its start
    summary = json.loads((out / "summary.json").read_text())
    assert 0.0 <= summary["heldout_exact_match"] <= 1.0 and summary["eval_loss"] < losses[0]
    for name in ["loss.png", "final/model.safetensors", "final/tokenizer.json", "final/config.json"]:
        assert (out / name).is_file(), name
