"""`zeropad verify MODEL_DIR`: per-tensor relative errors, PASS/FAIL, the negative control, exit codes."""

import sys

import pytest
from transformers import AutoConfig
from typer.testing import CliRunner

from tinymodels import tiny_model
from zeropad.cli import app, main
from zeropad.errors import ConfigError

runner = CliRunner()


@pytest.fixture(scope="module")
def gemma2_dir(tmp_path_factory):
    """Softcap and a sliding window: the features a random-weight check would never reach."""
    path = tmp_path_factory.mktemp("gemma2")
    tiny_model("gemma2").save_pretrained(path)
    return path


def test_verify_passes_and_reports_the_control(gemma2_dir):
    result = runner.invoke(app, ["verify", str(gemma2_dir), "--lengths", "5,17,3"])
    assert result.exit_code == 0, result.output
    out = result.output
    listed = out.split("per tensor):\n")[1].split("PASS")[0].splitlines()
    assert len(listed) == 5 and all(float(line.split()[0]) < 1e-4 for line in listed), out
    assert out.count("PASS") == 1 and "negative control" in out and "failed, as it must" in out
    assert "softcap [50.0]" in out and "sliding windows [8] < longest document 17" in out
    assert "float64" in out and "(eager attention)" in out


def test_verify_exit_code_is_1_on_fail(gemma2_dir):
    # float64 packed vs per-document differ by rounding (~1e-16 .. 1e-6), so a zero tolerance must FAIL
    result = runner.invoke(app, ["verify", str(gemma2_dir), "--lengths", "5,17,3", "--tolerance", "0"])
    assert result.exit_code == 1, result.output
    assert "FAIL" in result.output


@pytest.mark.parametrize("lengths", ["7,,3", "0,5", "x"])
def test_bad_lengths_are_a_usage_error_not_a_fail(gemma2_dir, lengths):
    """Exit 1 means the check failed: a bad --lengths is refused naming it (it was a traceback, exit 1)."""
    result = runner.invoke(app, ["verify", str(gemma2_dir), "--lengths", lengths])
    assert isinstance(result.exception, ConfigError) and "--lengths" in str(result.exception), result.output


@pytest.mark.parametrize("model_type, reason", [("mamba", "state-space"), ("qwen3_next", "linear-attention")])
def test_verify_refuses_unsupported_families_with_exit_2(tmp_path, monkeypatch, capsys, model_type, reason):
    AutoConfig.for_model(model_type).save_pretrained(tmp_path)  # refused from the config, before any weights
    monkeypatch.setattr(sys, "argv", ["zeropad", "verify", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert model_type in err and reason in err and "not be exact" in err
