"""Exact resume, as real processes: a run killed with SIGKILL (between checkpoints, and halfway
through writing one) or stopped with SIGTERM, then resumed with resume=auto, gives bitwise the
same per-step losses, gradient norms and final weights as the same run uninterrupted."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tinyrun import run_config, step_records, write_run_files
from zeropad.train.state import MANIFEST, checkpoint_root

STEPS = 60
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    write_run_files(root)
    cfg = run_config(root, root / "unused", train={"steps": STEPS}, checkpoint={"every_steps": 5, "keep": 2})
    del cfg["output_dir"]
    (root / "run.yaml").write_text(yaml.safe_dump(cfg))
    return root


def launch(root, name, *overrides, env=ENV) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "zeropad", "train", str(root / "run.yaml"), f"output_dir={root / name}", *overrides]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out + err


def wait_for_step(out_dir, step: int, proc: subprocess.Popen) -> None:
    """Block until metrics.jsonl shows `step` (the run is then somewhere past it)."""
    metrics = out_dir / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:
        assert proc.poll() is None, finish(proc)[1]
        if metrics.is_file() and f'"step": {step},' in metrics.read_text():
            return
        time.sleep(0.002)
    raise TimeoutError(f"step {step} never logged")


def assert_same_as_reference(out_dir, reference) -> None:
    records, ref_records = step_records(out_dir), step_records(reference)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for key in ["loss", "grad_norm", "lr", "tokens"]:
        assert [r[key] for r in records] == [r[key] for r in ref_records], key  # bitwise: exact floats
    weights = load_file(out_dir / "final/model.safetensors")
    ref_weights = load_file(reference / "final/model.safetensors")
    assert weights.keys() == ref_weights.keys()
    assert all(torch.equal(weights[k], ref_weights[k]) for k in weights)


@pytest.fixture(scope="module")
def reference(root):
    code, output = finish(launch(root, "reference"))
    assert code == 0, output
    return root / "reference"


def test_sigkill_between_checkpoints_then_resume_is_bitwise_exact(root, reference):
    out = root / "killed"
    proc = launch(root, "killed")
    wait_for_step(out, 32, proc)  # in the second epoch: an epoch holds 20 packs
    proc.send_signal(signal.SIGKILL)
    code, _ = finish(proc)
    assert code == -signal.SIGKILL
    killed_at = step_records(out)[-1]["step"]
    assert 32 <= killed_at < STEPS
    code, output = finish(launch(root, "killed", "resume=auto"))
    assert code == 0, output
    resumed = re.search(r"resumed from \S+step_(\d+) at step \d+ \(epoch (\d+)", output)
    assert 30 <= int(resumed.group(1)) <= killed_at  # the newest complete one (the kill may land in a save)
    assert int(resumed.group(2)) >= 1
    assert_same_as_reference(out, reference)


def test_sigkill_during_a_checkpoint_save_loses_nothing(root, reference):
    out = root / "killed_in_save"
    code, _ = finish(launch(root, "killed_in_save", env={**ENV, "ZEROPAD_TEST_KILL_DURING_SAVE": "25"}))
    assert code == -signal.SIGKILL
    ckpts = checkpoint_root(out)
    assert (ckpts / ".tmp-step_000025" / "dcp" / ".metadata").is_file()  # died halfway through the save
    assert not (ckpts / ".tmp-step_000025" / "state.json").exists()
    assert not (ckpts / "step_000025").exists() and (ckpts / "step_000020" / MANIFEST).is_file()
    code, output = finish(launch(root, "killed_in_save", "resume=auto"))
    assert code == 0, output
    assert "step_000020 at step 20 (epoch 0, 20 packs into it)" in output  # resumes at an epoch's very end
    assert not list(ckpts.glob(".tmp-*"))
    assert_same_as_reference(out, reference)


def test_sigterm_checkpoints_exits_3_and_prints_the_resume_command(root, reference):
    out = root / "preempted"
    proc = launch(root, "preempted")
    wait_for_step(out, 7, proc)
    proc.send_signal(signal.SIGTERM)
    code, output = finish(proc)
    assert code == 3, output
    stopped_at = step_records(out)[-1]["step"]
    assert stopped_at < STEPS
    saved = checkpoint_root(out) / f"step_{stopped_at:06d}"
    assert f"SIGTERM after step {stopped_at}: checkpoint saved to {saved}" in output and (saved / MANIFEST).is_file()
    command = output.split("to resume: ")[1].splitlines()[0]
    assert command == f"zeropad train {root / 'run.yaml'} output_dir={out} resume=auto"
    code, output = finish(launch(root, "preempted", "resume=auto"))
    assert code == 0, output
    assert f"at step {stopped_at} " in output
    assert_same_as_reference(out, reference)
