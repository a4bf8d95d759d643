"""Faults around a run, injected with ZEROPAD_TEST_FAULT (zeropad/storage.py) and run through the command line in
this process: each ends in a named message and its exit code, no traceback, nothing half-written, and
resume=auto then gives bitwise the losses and final weights of the uninterrupted run."""

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tinyrun import run_config, step_records
from zeropad import cli
from zeropad.train.state import MANIFEST, checkpoint_root

STEPS = 5


def cli_train(monkeypatch, capsys, config: dict, *overrides: str, fault: str | None = None) -> tuple[int, str]:
    """`zeropad train` in this process: (exit code, stdout + stderr)."""
    path = Path(config["data"]["cache_dir"]).parent / f"{Path(config['output_dir']).name}.yaml"
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    if fault is None:
        monkeypatch.delenv("ZEROPAD_TEST_FAULT", raising=False)
    else:
        monkeypatch.setenv("ZEROPAD_TEST_FAULT", fault)
    monkeypatch.setattr(sys, "argv", ["zeropad", "train", str(path), *overrides])
    code = 0
    try:
        cli.main()
    except SystemExit as exit_:
        code = exit_.code
    out = capsys.readouterr()
    return code, out.out + out.err


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    cfg = run_config(root, root / "reference", train={"steps": STEPS}, checkpoint={"every_steps": 2})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    from zeropad.config import build_config
    from zeropad.train.loop import train

    train(build_config(cfg))
    torch.set_num_threads(threads)
    return root, cfg


def assert_same_as(out_dir, reference_dir) -> None:
    records, ref = step_records(out_dir), step_records(reference_dir)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for key in ["loss", "grad_norm", "lr", "tokens"]:
        assert [r[key] for r in records] == [r[key] for r in ref], key  # bitwise
    weights, ref_weights = load_file(out_dir / "final/model.safetensors"), load_file(reference_dir / "final/model.safetensors")
    assert weights.keys() == ref_weights.keys() and all(torch.equal(weights[k], ref_weights[k]) for k in weights)


# (fault, exit code, words of the message, the newest complete checkpoint left: step)
CASES = {
    "checkpoint-enospc": ("checkpoint:enospc@4", 5, ["could not write checkpoint step 4", "no space left"], 2),
    # torch.save's short write carries no errno: with (injected) no free space it is named "no space left"
    "checkpoint-shortwrite": ("checkpoint:shortwrite@4,free:0", 5, ["checkpoint step 4", "no space left"], 2),
    "metrics-erofs": ("metrics:erofs@3", 5, ["the metrics record of step 3", "read-only file system"], 2),
    "final-eio": ("final:eio", 5, ["could not write the final model", "I/O error"], 5),
    "cache-enospc": ("cache:enospc", 5, ["tokenized-sample cache", "no space left", "No checkpoint was written"], None),
    "step-oom": ("step:oom@4", 6, ["step 4 ran out of CUDA memory", "pack.max_tokens=96",
                                   "memory planner predicts a peak of", "it should fit", "state after step 3"], 3),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_fault_is_named_and_resume_continues_exactly(case, reference, monkeypatch, capsys):
    fault, exit_code, words, newest = CASES[case]
    root, ref_cfg = reference
    torch.set_num_threads(1)
    out = root / case
    # a fresh token cache, so that the cache is written (and faulted) in this run
    cfg = {**ref_cfg, "output_dir": str(out), "data": {**ref_cfg["data"], "cache_dir": str(root / f"cache-{case}")}}
    low_disk = ["checkpoint.on_low_disk=warn"] if "free:" in fault else []  # past the pre-flight check
    code, output = cli_train(monkeypatch, capsys, cfg, *low_disk, fault=fault)
    assert code == exit_code, output
    assert all(w in output for w in words), output
    assert "Traceback" not in output
    assert "to resume: zeropad train" in output and output.rstrip().endswith("resume=auto")
    ckpts = checkpoint_root(out)
    assert not list(ckpts.glob(".tmp-*")) and not list((root / f"cache-{case}").glob("*.tmp"))
    assert not (out / "final").exists()
    complete = sorted(p.name for p in ckpts.glob("step_*") if (p / MANIFEST).is_file())
    assert complete[-1:] == ([] if newest is None else [f"step_{newest:06d}"])
    if newest is not None:
        assert f"checkpoint is {ckpts / f'step_{newest:06d}'}" in output or f"saved to {ckpts}" in output

    code, output = cli_train(monkeypatch, capsys, cfg, "resume=auto")
    assert code == 0, output
    assert_same_as(out, root / "reference")


def test_an_oom_after_resuming_from_another_runs_checkpoint_saves_here(reference, monkeypatch, capsys):
    """resume=PATH from another output_dir, then an OOM: the state before the step is saved in this run's
    output_dir and resume=auto continues from it exactly (it named a checkpoint here that did not exist)."""
    root, ref_cfg = reference
    torch.set_num_threads(1)
    out = root / "from-elsewhere"
    cfg = {**ref_cfg, "output_dir": str(out)}
    start = checkpoint_root(root / "reference") / "step_000004"
    code, output = cli_train(monkeypatch, capsys, cfg, f"resume={start}", fault="step:oom@5")
    assert code == 6, output
    assert f"saved to {checkpoint_root(out) / 'step_000004'}" in output
    assert (checkpoint_root(out) / "step_000004" / MANIFEST).is_file()
    code, output = cli_train(monkeypatch, capsys, cfg, "resume=auto")
    assert code == 0, output
    ref = {r["step"]: r for r in step_records(root / "reference")}
    assert [(r["step"], r["loss"]) for r in step_records(out)] == [(5, ref[5]["loss"])]  # bitwise
    weights, ref_weights = (load_file(d / "final/model.safetensors") for d in (out, root / "reference"))
    assert all(torch.equal(weights[k], ref_weights[k]) for k in ref_weights)


def test_too_little_space_is_refused_before_any_compute(tiny_run, monkeypatch, capsys):
    cfg = tiny_run("low", checkpoint={"keep": 2})
    code, output = cli_train(monkeypatch, capsys, cfg, fault="free:100000")
    assert code == 5, output
    assert "has 100.0 kB free, but the run writes about" in output and "3 checkpoint(s) of" in output
    assert "checkpoint.on_low_disk=warn" in output and "Traceback" not in output
    assert not Path(cfg["output_dir"], "metrics.jsonl").exists()  # nothing ran
    # allowed: a warning, and the run goes on
    code, output = cli_train(monkeypatch, capsys, cfg, "checkpoint.on_low_disk=warn", "train.steps=1",
                             fault="free:100000")
    assert code == 0 and "warning: output_dir" in output, output


def test_the_predicted_bytes_match_what_the_run_writes(tiny_run):
    from zeropad.config import build_config
    from zeropad.train.loop import train
    from zeropad.train.preflight import disk_needs

    cfg = build_config(tiny_run("sized", train={"steps": 2}, checkpoint={"keep": 1}))
    needs = list(disk_needs(cfg).values())
    train(cfg)
    out = Path(cfg.output_dir)
    checkpoint = sum(f.stat().st_size for f in (out / "checkpoints/step_000002").rglob("*") if f.is_file())
    final = (out / "final/model.safetensors").stat().st_size
    # keep + 1 = 2 checkpoints; DCP adds ~0.5 kB per tensor, which only a model this small notices
    assert 0.8 < needs[0] / (2 * checkpoint) <= 1
    assert 0.9 < needs[1] / final < 1.1


def test_an_unwritable_output_dir_is_named(tiny_run, tmp_path, monkeypatch, capsys):
    (tmp_path / "a_file").write_text("")
    cfg = tiny_run("unused")
    cfg["output_dir"] = str(tmp_path / "a_file" / "run")  # a path through a file: no directory can be made there
    code, output = cli_train(monkeypatch, capsys, cfg)
    assert code == 5 and "could not write OUTPUT_DIR" in output and "Not a directory" in output, output
    assert "Traceback" not in output


def test_changed_data_is_refused_on_resume_unless_the_user_chooses(tiny_run, tmp_path, monkeypatch, capsys):
    cfg = tiny_run("changed", train={"steps": 3})
    code, output = cli_train(monkeypatch, capsys, cfg)
    assert code == 0, output
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Other {i}", "input": "", "output": "x " * (1 + i % 5)}) + "\n"
                            for i in range(30)))
    code, output = cli_train(monkeypatch, capsys, cfg, "resume=auto", "train.steps=5")
    assert code == 2, output
    assert "the data differs from what" in output and "data.jsonl is" in output and "records: 30, were 40" in output
    code, output = cli_train(monkeypatch, capsys, cfg, "resume=auto", "train.steps=5",
                             "checkpoint.resume_data=restart_epoch")
    assert code == 0, output
    note = [r for r in (json.loads(line) for line in open(f"{cfg['output_dir']}/metrics.jsonl")) if "resume_data" in r]
    assert note == [{"step": 3, "resume_data": "restart_epoch", "data_changed": note[0]["data_changed"]}]
    assert [r["step"] for r in step_records(cfg["output_dir"])] == [1, 2, 3, 4, 5]
    assert step_records(cfg["output_dir"])[3]["epoch"] == 1  # a new epoch of the new data


def test_a_checkpoint_without_a_fingerprint_still_resumes(tiny_run, monkeypatch, capsys):
    cfg = tiny_run("old", train={"steps": 2})
    code, output = cli_train(monkeypatch, capsys, cfg)
    assert code == 0, output
    ckpt = checkpoint_root(cfg["output_dir"]) / "step_000002"
    (ckpt / "data.json").unlink()  # as an earlier zeropad wrote it
    manifest = json.loads((ckpt / MANIFEST).read_text())
    del manifest["files"]["data.json"]
    (ckpt / MANIFEST).write_text(json.dumps(manifest))
    code, output = cli_train(monkeypatch, capsys, cfg, "resume=auto", "train.steps=3")
    assert code == 0 and "records no data fingerprint" in output, output


def test_a_full_disk_while_trimming_metrics_on_resume_is_named_and_leaves_no_partial_file(tmp_path, monkeypatch):
    """The trim guard.resume does is a write like any other: named (what, where) and its partial file removed."""
    import errno

    from zeropad.errors import StorageError
    from zeropad.train.guard import _trim_metrics

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 5)))
    real_write = Path.write_text

    def full_disk(self, text, *args, **kwargs):
        real_write(self, text[: len(text) // 2], *args, **kwargs)  # half of it lands, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(StorageError, match="metrics.jsonl, trimmed to the resumed step"):
        _trim_metrics(metrics, 2)
    monkeypatch.undo()
    assert not (tmp_path / "metrics.jsonl.tmp").exists()
    assert len(metrics.read_text().splitlines()) == 4  # untouched
