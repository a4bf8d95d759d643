"""Checkpoints in-process: contents and loading rules, keep-last-N, fallback past a corrupt newest
one, resume refusals, and the export round trip."""

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
from typer.testing import CliRunner

from tinyrun import step_records
from zeropad.cli import app
from zeropad.config import build_config
from zeropad.errors import ConfigError, ZeropadError
from zeropad.train import guard
from zeropad.train.guard import StopSignals
from zeropad.train.loop import train
from zeropad.train.state import MANIFEST, CorruptCheckpoint, checkpoint_root, step_dirs


@pytest.fixture
def trained(tiny_run):
    """A finished 8-step run with a checkpoint every 2 steps, keep 2."""
    cfg = build_config(tiny_run(checkpoint={"every_steps": 2, "keep": 2}))
    result = train(cfg)
    return cfg, result


def test_checkpoint_holds_everything_and_keeps_the_last_two(trained):
    cfg, result = trained
    root = checkpoint_root(cfg.output_dir)
    assert [step for step, _ in step_dirs(root)] == [6, 8]
    assert not list(root.glob(".tmp-*"))
    ckpt = root / "step_000008"
    manifest = json.loads((ckpt / MANIFEST).read_text())
    for name in ["dcp/.metadata", "dcp/__0_0.distcp", "scheduler.pt", "rng.pt", "state.json", "config.json",
                 "model/config.json", "model/generation_config.json", "tokenizer/tokenizer.json"]:
        assert manifest["files"][name] == (ckpt / name).stat().st_size
    # the one format at every world size: DCP holds every weight and the optimizer state, by name
    stored = FileSystemReader(str(ckpt / "dcp")).read_metadata().state_dict_metadata
    weights = {name: tuple(t.shape) for name, t in result.model.state_dict().items()}
    assert {k.removeprefix("model."): tuple(m.size) for k, m in stored.items() if k.startswith("model.")} == weights
    assert {f"optimizer.state.{name}.exp_avg" for name in weights} <= set(stored)
    # weights_only: loading runs no pickled code
    assert torch.load(ckpt / "scheduler.pt", weights_only=True)["scheduler"]["last_epoch"] == 8
    rng = torch.load(ckpt / "rng.pt", weights_only=True)
    assert set(rng) >= {"python", "numpy", "torch"}
    state = json.loads((ckpt / "state.json").read_text())
    assert state["step"] == 8 and state["tokens_seen"] > 0 and state["bad_steps"] == 0
    assert json.loads((ckpt / "config.json").read_text())["checkpoint"]["every_steps"] == 2


def test_data_counts_reach_metrics_and_summary(trained):
    cfg, result = trained
    first = json.loads(open(f"{cfg.output_dir}/metrics.jsonl").readline())
    assert first["step"] == 0 and first["data"]["records"] == 40 and first["data"]["skipped"] == 0
    summary = json.loads(open(f"{cfg.output_dir}/summary.json").read())
    assert summary["data_counts"]["samples"] == 40 and summary["bad_steps"] == 0


def test_a_fresh_run_refuses_to_mix_with_an_earlier_ones_checkpoints(trained):
    cfg, _ = trained
    written = (Path(cfg.output_dir) / "config.json").read_text()
    other = cfg.model_copy(update={"train": cfg.train.model_copy(update={"lr": 1e-5})})
    with pytest.raises(ConfigError, match="resume=auto"):
        train(other)
    assert (Path(cfg.output_dir) / "config.json").read_text() == written  # the refused run's config is not written


def test_resume_auto_falls_back_past_a_truncated_newest_and_says_why(trained, capsys):
    cfg, _ = trained
    root = checkpoint_root(cfg.output_dir)
    shard = root / "step_000008" / "dcp" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:1000])
    capsys.readouterr()
    resumed = train(cfg.model_copy(update={"resume": "auto"}))
    out = capsys.readouterr().out
    assert "step_000008 is unusable" in out and "truncated" in out and "falling back" in out
    assert "resumed from" in out and "step_000006" in out
    assert [r["step"] for r in step_records(cfg.output_dir)] == list(range(1, 9))
    assert (root / "step_000008" / MANIFEST).is_file()  # re-saved, complete
    assert resumed.final_loss == step_records(cfg.output_dir)[-1]["loss"]


def test_missing_marker_means_unfinished(trained, capsys):
    cfg, _ = trained
    (checkpoint_root(cfg.output_dir) / "step_000008" / MANIFEST).unlink()
    train(cfg.model_copy(update={"resume": "auto"}))
    assert "no COMPLETE marker" in capsys.readouterr().out


def test_resume_path_to_a_bad_checkpoint_is_a_clear_error(trained, tmp_path):
    cfg, _ = trained
    with pytest.raises(CorruptCheckpoint, match="no such checkpoint directory"):
        train(cfg.model_copy(update={"resume": str(tmp_path / "nope")}))
    ckpt = checkpoint_root(cfg.output_dir) / "step_000006"
    for name, message in [("scheduler.pt", "unreadable training state"), ("dcp/.metadata", "unreadable dcp/")]:
        original = (ckpt / name).read_bytes()
        (ckpt / name).write_bytes(b"x" * len(original))  # same size, garbage
        with pytest.raises(CorruptCheckpoint, match=message):
            train(cfg.model_copy(update={"resume": str(ckpt)}))
        (ckpt / name).write_bytes(original)


def test_a_checkpoint_of_another_model_is_refused_naming_the_difference(trained):
    cfg, _ = trained
    ckpt = checkpoint_root(cfg.output_dir) / "step_000008"
    for change, named in [({"num_hidden_layers": 3}, "missing ['model.layers.2."),
                          ({"intermediate_size": 128}, "other shape ['model.layers.0.mlp.down_proj.weight (64, 96) "
                                                       "vs (64, 128)")]:
        other = cfg.model.model_copy(update={"config": {**cfg.model.config, **change}})
        with pytest.raises(ZeropadError, match="does not fit this model") as info:
            train(cfg.model_copy(update={"model": other, "resume": str(ckpt)}))
        assert named in str(info.value)


class _PrintsWhenUnpickled:
    def __reduce__(self):
        return print, ("pickled code ran",)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # the test's own one-process dcp.save
def test_loading_a_checkpoint_runs_no_pickled_code(trained, tmp_path, capsys):
    """DCP unpickles its non-tensor values; a checkpoint whose optimizer hyperparameter is a pickled
    call is refused as unreadable, and the call never runs."""
    cfg, _ = trained
    ckpt = checkpoint_root(cfg.output_dir) / "step_000008"
    dcp_to_torch_save(ckpt / "dcp", tmp_path / "full.pt")
    state = torch.load(tmp_path / "full.pt", weights_only=True)
    state["optimizer"]["param_groups"][0]["lr"] = _PrintsWhenUnpickled()
    shutil.rmtree(ckpt / "dcp")
    dcp.save(state, checkpoint_id=str(ckpt / "dcp"))
    manifest = json.loads((ckpt / MANIFEST).read_text())
    manifest["files"] = {str(f.relative_to(ckpt)): f.stat().st_size for f in ckpt.rglob("*")
                         if f.is_file() and f.name != MANIFEST}
    (ckpt / MANIFEST).write_text(json.dumps(manifest))
    capsys.readouterr()
    with pytest.raises(CorruptCheckpoint, match="pickled object that is not plain data"):
        train(cfg.model_copy(update={"resume": str(ckpt)}))
    assert "pickled code ran" not in capsys.readouterr().out


def test_resume_from_an_older_checkpoint_moves_newer_ones_aside(trained, capsys):
    cfg, _ = trained
    root = checkpoint_root(cfg.output_dir)
    train(cfg.model_copy(update={"resume": str(root / "step_000006")}))
    assert "moved 1 newer checkpoint(s)" in capsys.readouterr().out
    assert (root / "superseded" / "step_000008" / MANIFEST).is_file()
    assert [step for step, _ in step_dirs(root)] == [6, 8]
    # Resumed from step 6 again: the step 8 it wrote goes aside beside the first one, which is kept (it was deleted)
    first = (root / "superseded" / "step_000008" / MANIFEST).read_text()
    train(cfg.model_copy(update={"resume": str(root / "step_000006")}))
    assert (root / "superseded" / "step_000008" / MANIFEST).read_text() == first
    assert (root / "superseded" / "step_000008.1" / MANIFEST).is_file()


def test_no_usable_checkpoint_at_all_is_an_error(trained):
    cfg, _ = trained
    for _, path in step_dirs(checkpoint_root(cfg.output_dir)):
        (path / MANIFEST).unlink()
    with pytest.raises(ZeropadError, match="no usable checkpoint"):
        train(cfg.model_copy(update={"resume": "auto"}))


def test_export_round_trip_logits_equal(trained, tmp_path):
    cfg, result = trained
    out = tmp_path / "hf"
    # an output dir: its newest checkpoint; read and written one shard at a time
    cli = CliRunner().invoke(app, ["export", cfg.output_dir, str(out), "--max-shard-size", "20KB"])
    assert cli.exit_code == 0, cli.output
    assert "step_000008" in cli.output
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 3 and f"as {len(shards)} safetensors file(s)" in cli.output
    for name in ["model.safetensors.index.json", "config.json", "generation_config.json", "tokenizer.json"]:
        assert (out / name).is_file(), name
    assert not (out / "model.safetensors").exists()
    assert "zeropad" not in (out / "config.json").read_text()  # loads without zeropad's attention
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    GenerationConfig.from_pretrained(out)
    AutoTokenizer.from_pretrained(out)
    ids = torch.randint(0, 259, (1, 37), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        trained_logits = result.model.eval()(input_ids=ids, position_ids=torch.arange(37)[None]).logits
        exported_logits = exported(input_ids=ids).logits
    assert (trained_logits - exported_logits).abs().max().item() <= 1e-6


def test_export_of_a_truncated_checkpoint_names_the_file(trained, tmp_path):
    """Every file is checked against the manifest before any is read: a truncated config.json is named, not left to
    a JSON parser's traceback."""
    cfg, _ = trained
    ckpt = tmp_path / "step_000008"
    shutil.copytree(checkpoint_root(cfg.output_dir) / "step_000008", ckpt)
    config = ckpt / "config.json"
    config.write_text(config.read_text()[:40])
    cli = CliRunner().invoke(app, ["export", str(ckpt), str(tmp_path / "hf")])  # main() prints it, exit code 2
    assert isinstance(cli.exception, CorruptCheckpoint), cli.output
    assert "config.json is 40 bytes" in str(cli.exception) and "truncated" in str(cli.exception)
    assert not (tmp_path / "hf").exists()


def test_a_second_sigint_exits_at_once(monkeypatch):
    exits = []
    monkeypatch.setattr(guard.os, "_exit", lambda code: exits.append(code))
    before = signal.getsignal(signal.SIGINT)
    with StopSignals() as stop:
        stop.arm()
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested == "SIGINT" and not exits
        os.kill(os.getpid(), signal.SIGINT)
        assert exits == [guard.SECOND_INTERRUPT_EXIT]
    assert signal.getsignal(signal.SIGINT) is before  # the previous handler is back


def test_lora_with_activation_checkpointing_resumes_exactly_and_exports_merged(tiny_run, tmp_path):
    pytest.importorskip("peft")
    cfg = build_config(tiny_run(model={"lora": {"r": 4}}, memory={"checkpointing": "selective"},
                                train={"steps": 4}, checkpoint={"every_steps": 2}))
    train(cfg)
    out = tmp_path / "out"
    final = load_file(out / "final/model.safetensors")
    export_dir = tmp_path / "hf"
    assert CliRunner().invoke(app, ["export", str(out / "checkpoints/step_000004"), str(export_dir)]).exit_code == 0
    exported = load_file(export_dir / "model.safetensors")
    assert not any("lora" in k for k in exported)
    assert final.keys() == exported.keys() and all(torch.equal(final[k], exported[k]) for k in final)
    losses = [r["loss"] for r in step_records(out)]
    shutil.rmtree(out / "checkpoints/step_000004")
    train(cfg.model_copy(update={"resume": "auto"}))
    assert [r["loss"] for r in step_records(out)] == losses
    resumed = load_file(out / "final/model.safetensors")
    assert all(torch.equal(final[k], resumed[k]) for k in final)


def test_resuming_a_finished_run_re_reports_it_and_past_its_steps_is_refused(trained, capsys):
    """At train.steps, nothing trains and the summary keeps the last step's loss (it became NaN); with train.steps
    below the checkpoint's step the run is refused before anything moves (it reported a step count final/ lacked)."""
    cfg, _ = trained
    summary = json.loads((Path(cfg.output_dir) / "summary.json").read_text())
    again = cfg.model_copy(update={"resume": "auto"})
    result = train(again)
    assert "already at train.steps=8" in capsys.readouterr().out
    assert result.final_loss == summary["final_loss"] == step_records(cfg.output_dir)[-1]["loss"]
    assert json.loads((Path(cfg.output_dir) / "summary.json").read_text())["final_loss"] == summary["final_loss"]
    fewer = cfg.model_copy(update={"resume": "auto", "train": cfg.train.model_copy(update={"steps": 6})})
    with pytest.raises(ConfigError, match=r"step_000008 is at step 8, past train.steps=6"):
        train(fewer)
    assert [step for step, _ in step_dirs(checkpoint_root(cfg.output_dir))] == [6, 8]


def test_a_finished_run_resumed_logs_its_final_eval_once(tiny_run):
    """metrics.jsonl reads as one run: the end-of-run eval record is not written a second time."""
    cfg = build_config(tiny_run(train={"steps": 4}, eval={"split": 0.1}))
    train(cfg)
    train(cfg.model_copy(update={"resume": "auto"}))
    lines = (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()
    assert sum("eval_loss" in json.loads(line) for line in lines) == 1


def test_resume_with_more_steps_continues_and_names_the_config_change(trained, capsys):
    cfg, _ = trained
    longer = cfg.model_copy(update={"resume": "auto", "train": cfg.train.model_copy(update={"steps": 10})})
    train(longer)
    assert "config differs from the checkpoint's in train.steps" in capsys.readouterr().out
    assert [r["step"] for r in step_records(cfg.output_dir)] == list(range(1, 11))
