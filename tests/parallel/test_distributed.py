"""Multi-process training on CPU (gloo, 2 processes under torchrun): DDP and FSDP2 equal one
process over the same packs; ranks get balanced packs; a failure on one rank ends the run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))  # the tiny run shared with the train tests
from tinyrun import run_config, saved_initial_model, step_records, train_as_one_rank  # noqa: E402
from zeropad.config import build_config  # noqa: E402
from zeropad.model.hf_writer import weight_files  # noqa: E402
from zeropad.pack.planner import assign_packs_to_ranks, plan_packs, shuffle_packs  # noqa: E402
from zeropad.train.loop import train  # noqa: E402

STEPS = 4
CHECKPOINTS = {"every_steps": 2, "keep": 5}  # step 2 (resumed from below) and step 4
SMALL_SHARD = 20_000  # bytes: the tiny model's final/ and export in several files
LAUNCH_TIMEOUT_S = 300  # a hang (a rank waiting forever on a dead peer) fails the test instead


def _torchrun(args: list[str], cwd: Path, nproc: int = 2, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", **(env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)


def _config(root: Path, output_dir: Path, grad_accum: int, **parallel) -> dict:
    return run_config(root, output_dir, train={"steps": STEPS, "grad_accum": grad_accum},
                      memory={"chunked_loss": False}, parallel=parallel)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, Path]:
    """One process, grad_accum 4: the packs 2 ranks x 2 micro-steps see per step."""
    root = tmp_path_factory.mktemp("dist")
    out = root / "one"
    train_as_one_rank(_config(root, out, grad_accum=4) | {"checkpoint": CHECKPOINTS})
    return root, out


def _hf_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    """The weights of a Hugging Face directory, one model.safetensors or its shards."""
    return {name: t for file in weight_files(model_dir) for name, t in load_file(str(file)).items()}


def _final_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    return _hf_weights(output_dir / "final")


@pytest.mark.parametrize("parallel, compiled", [
    ({"strategy": "ddp"}, True),
    ({"strategy": "fsdp", "reshard_after_forward": True}, False),
    ({"strategy": "fsdp", "reshard_after_forward": False}, True),
], ids=["ddp-compiled", "fsdp-zero3", "fsdp-zero2-compiled"])
def test_two_ranks_equal_one_process(reference, parallel, compiled):
    """Against the reference (one process, eager). DDP and one FSDP case run train.compile (with dynamo's eager
    backend, as tests/train/test_compile.py: inductor's C++ build takes minutes here), so compiled layers are
    tested under both wrappers without a launch of their own."""
    root, one = reference
    name = "-".join(f"{v}" for v in parallel.values()) + ("-compiled" if compiled else "")
    out = root / name
    cfg_path = root / f"{name}.yaml"
    cfg = _config(root, out, grad_accum=2, **parallel)
    cfg["train"]["compile"] = compiled
    cfg_path.write_text(yaml.safe_dump(cfg))
    done = _torchrun(["-m", "zeropad", "train", str(cfg_path)], cwd=root, env={"ZEROPAD_COMPILE_BACKEND": "eager"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2
    if compiled:  # one graph for both layers and every pack, no break
        assert summary["compile"] == {"graphs": 1, "graph_breaks": 0}, summary["compile"]

    expected, got = step_records(one), step_records(out)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    for e, g in zip(expected, got):
        assert abs(e["loss"] - g["loss"]) <= 1e-5, (e["step"], e["loss"], g["loss"])
        assert abs(e["grad_norm"] - g["grad_norm"]) <= 1e-5
        assert (e["tokens"], e["target_tokens"]) == (g["tokens"], g["target_tokens"])
        assert g["rank_token_imbalance"] >= 1.0 and g["rank_attention_imbalance"] >= 1.0
    expected_w, got_w = _final_weights(one), _final_weights(out)
    assert expected_w.keys() == got_w.keys()
    for key in expected_w:
        assert (expected_w[key] - got_w[key]).abs().max().item() <= 1e-5, key


def test_hsdp_two_replicas_of_two_shards_equal_one_process(reference):
    """HSDP on a 2 x 2 mesh (4 ranks, one micro-step each: the 4 packs the reference takes per step): sharded
    within each replica, gradients all-reduced across replicas; the same training as one process. The model
    comes from safetensors (the reference's initial weights, saved): each rank reads its shards alone."""
    root, one = reference
    out = root / "hsdp"
    cfg_path = root / "hsdp.yaml"
    cfg = _config(root, out, grad_accum=1, strategy="fsdp", replicate=2, shard=2)
    cfg_path.write_text(yaml.safe_dump(saved_initial_model(cfg, root / "initial")))
    done = _torchrun(["-m", "zeropad", "train", str(cfg_path)], cwd=root, nproc=4)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    for e, g in zip(step_records(one), step_records(out), strict=True):
        assert abs(e["loss"] - g["loss"]) <= 1e-5 and abs(e["grad_norm"] - g["grad_norm"]) <= 1e-5, (e, g)
    expected_w, got_w = _final_weights(one), _final_weights(out)
    assert expected_w.keys() == got_w.keys()
    for key in expected_w:
        assert (expected_w[key] - got_w[key]).abs().max().item() <= 1e-5, key
    assert json.loads((out / "summary.json").read_text())["world_size"] == 4


def test_an_hsdp_mesh_that_does_not_fit_the_ranks_is_refused():
    from zeropad.parallel.distributed import data_parallel_mesh

    with pytest.raises(ValueError, match=r"parallel.replicate \(2\) x parallel.shard \(2\) must equal the number "
                                         r"of processes \(1\)"):
        data_parallel_mesh(torch.device("cpu"), 2, 2)


def test_fsdp_bf16_mixed_precision_trains_close_to_fp32(reference):
    root, one = reference
    out = root / "fsdp-bf16"
    cfg = _config(root, out, grad_accum=2, strategy="fsdp")
    cfg["train"]["dtype"] = "bf16"
    cfg_path = root / "fsdp-bf16.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    done = _torchrun(["-m", "zeropad", "train", str(cfg_path)], cwd=root)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    for e, g in zip(step_records(one), step_records(out), strict=True):
        assert abs(e["loss"] - g["loss"]) <= 0.05 * e["loss"], (e["step"], e["loss"], g["loss"])


def test_cpu_offload_is_refused_where_it_means_nothing():
    from zeropad.config import ParallelConfig
    from zeropad.errors import ConfigError
    from zeropad.parallel.sharding import parallelize

    model = torch.nn.Linear(2, 2)
    with pytest.raises(ConfigError, match="strategy=fsdp"):
        parallelize(model, ParallelConfig(strategy="ddp", cpu_offload=True), "fp32", torch.device("cpu"))
    with pytest.raises(ConfigError, match="cpu_offload=false"):
        parallelize(model, ParallelConfig(strategy="fsdp", cpu_offload=True), "fp32", torch.device("cpu"))
    assert parallelize(model, ParallelConfig(strategy="fsdp"), "fp32", torch.device("cpu")) is model  # 1 process


_FAILING_RANK = """
import os, sys
from zeropad.config import load_config
from zeropad.train.loop import train

overrides = ["data.sources=[{path: missing_on_rank_1.jsonl, format: alpaca}]"] if os.environ["RANK"] == "1" else []
train(load_config(sys.argv[1], overrides))
"""


def test_a_failure_on_one_rank_ends_all_ranks(reference):
    root, _ = reference
    cfg_path = root / "fail.yaml"
    cfg_path.write_text(yaml.safe_dump(_config(root, root / "fail", grad_accum=2, strategy="ddp")))
    script = root / "fail_on_rank_1.py"
    script.write_text(_FAILING_RANK)
    done = _torchrun([str(script), str(cfg_path)], cwd=root)  # TimeoutExpired here would be a hang
    assert done.returncode != 0
    assert "missing_on_rank_1.jsonl" in done.stdout + done.stderr


_FAILING_MID_RUN = """
import os, sys
import zeropad.train.loop as loop
from zeropad.config import load_config

calls = 0
real_step = loop.train_step

def failing_step(*args, **kwargs):  # test-only: rank 1 fails inside its second optimizer step
    global calls
    calls += 1
    if os.environ["RANK"] == "1" and calls == 2:
        raise RuntimeError("injected failure on rank 1 at step 2")
    return real_step(*args, **kwargs)

loop.train_step = failing_step
loop.train(load_config(sys.argv[1]))
"""


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_failure_mid_run_ends_all_ranks(reference, strategy):
    root, _ = reference
    cfg_path = root / f"fail-mid-{strategy}.yaml"
    cfg_path.write_text(yaml.safe_dump(_config(root, root / f"fail-mid-{strategy}", grad_accum=2, strategy=strategy)))
    script = root / "fail_mid_run.py"
    script.write_text(_FAILING_MID_RUN)
    done = _torchrun([str(script), str(cfg_path)], cwd=root)  # TimeoutExpired here would be a hang
    assert done.returncode != 0
    assert "injected failure on rank 1 at step 2" in done.stdout + done.stderr
    assert not (root / f"fail-mid-{strategy}" / "final").exists()


def _assert_continues(reference_dir: Path, resumed_dir: Path, from_step: int) -> None:
    """The resumed run's steps after `from_step` have the losses of the uninterrupted run."""
    expected = [r for r in step_records(reference_dir) if r["step"] > from_step]
    got = step_records(resumed_dir)
    assert [r["step"] for r in got] == list(range(from_step + 1, STEPS + 1))
    for e, g in zip(expected, got, strict=True):
        assert abs(e["loss"] - g["loss"]) <= 1e-5, (e["step"], e["loss"], g["loss"])
        assert abs(e["grad_norm"] - g["grad_norm"]) <= 1e-5, (e["step"], e["grad_norm"], g["grad_norm"])
        assert e["lr"] == pytest.approx(g["lr"], rel=1e-9)
        assert (e["tokens"], e["target_tokens"]) == (g["tokens"], g["target_tokens"])


def _resume_on_one_process(root: Path, resumed: Path, ckpt: Path) -> Path:
    """Continue from `ckpt` in this process, with the packs per step of 2 ranks x 2 micro-steps."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun rank (OMP_NUM_THREADS=1)
    try:
        train(build_config(_config(root, resumed, grad_accum=4) | {"resume": str(ckpt)}))
    finally:
        torch.set_num_threads(threads)
    return resumed


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_saved_on_two_ranks_resumes_on_one(reference, strategy, tmp_path):
    from zeropad.train.export import export_checkpoint

    root, one = reference
    two = root / f"save2-{strategy}"
    cfg_path = root / f"save2-{strategy}.yaml"
    # fsdp: final/ in shards, each weight gathered alone
    shards = {"max_shard_size": SMALL_SHARD} if strategy == "fsdp" else {}
    cfg_path.write_text(yaml.safe_dump(_config(root, two, grad_accum=2, strategy=strategy)
                                       | {"checkpoint": CHECKPOINTS | shards}))
    done = _torchrun(["-m", "zeropad", "train", str(cfg_path)], cwd=root)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    ckpt = two / "checkpoints" / "step_000002"
    assert (ckpt / "dcp").is_dir() and (ckpt / "COMPLETE").is_file() and not (ckpt / "model.safetensors").exists()
    assert not list((two / "checkpoints").glob(".tmp-*"))

    _assert_continues(one, _resume_on_one_process(root, root / f"resume1-{strategy}", ckpt), from_step=2)

    n_files = len(weight_files(two / "final"))
    assert n_files == 1 if strategy == "ddp" else n_files > 3
    # export reads every rank's shards, one output file at a time: the run's final weights
    done = export_checkpoint(two / "checkpoints" / "step_000004", tmp_path / "hf", max_shard_size=SMALL_SHARD)
    assert len(done.weight_files) > 3 and (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    exported, final = _hf_weights(tmp_path / "hf"), _final_weights(two)
    assert exported.keys() == final.keys()
    for key in final:
        assert torch.equal(exported[key], final[key]), key


@pytest.mark.parametrize("strategy,layout", [("ddp", "dcp"), ("fsdp", "dcp"), ("fsdp", "legacy")])
def test_saved_on_one_process_resumes_on_two_ranks(reference, strategy, layout):
    root, one = reference
    ckpt = one / "checkpoints" / "step_000002"
    assert (ckpt / "dcp").is_dir()  # the one format, also in one process
    if layout == "legacy":  # what earlier versions wrote in one process: full weights, optimizer by index
        from test_state_legacy import write_legacy_checkpoint

        ckpt = shutil.copytree(ckpt, root / "legacy" / ckpt.name)
        write_legacy_checkpoint(ckpt, build_config(_config(root, one, grad_accum=4)))
    resumed = root / f"resume2-{strategy}-{layout}"
    cfg_path = root / f"resume2-{strategy}-{layout}.yaml"
    cfg_path.write_text(yaml.safe_dump(_config(root, resumed, grad_accum=2, strategy=strategy)
                                       | {"resume": str(ckpt)}))
    done = _torchrun(["-m", "zeropad", "train", str(cfg_path)], cwd=root)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    _assert_continues(one, resumed, from_step=2)
    assert (resumed / "checkpoints" / "step_000004" / "dcp").is_dir()  # the end-of-run checkpoint, sharded


def _alpaca_lengths(shared_data: Path) -> list[int]:
    """A character-count proxy for token lengths (~4 characters a token), no tokenizer needed."""
    records = json.loads((shared_data / "alpaca_en_demo.json").read_text())
    return [max(1, len(r["instruction"] + r.get("input", "") + r["output"]) // 4) for r in records]


@pytest.mark.parametrize("world_size", [2, 8])
def test_rank_balance_on_alpaca(shared_data, world_size):
    lengths = _alpaca_lengths(shared_data)
    packs = shuffle_packs(plan_packs(lengths, 1024, seed=0), seed=0)
    for micro_steps in (1, 2, 4):
        per_step = world_size * micro_steps
        token_imbalance = []
        for start in range(0, len(packs) - per_step + 1, per_step):
            step = [[lengths[i] for i in pack] for pack in packs[start:start + per_step]]
            assignment = assign_packs_to_ranks(step, world_size)
            assert [len(ps) for ps in assignment.packs_by_rank] == [micro_steps] * world_size
            assert assignment == assign_packs_to_ranks(step, world_size)  # deterministic
            token_imbalance.append(assignment.token_imbalance)
        assert max(token_imbalance) <= 1.02, (world_size, micro_steps, max(token_imbalance))


def test_assignment_balances_attention_cost_and_covers_every_pack():
    # equal tokens per pack, very different Σ len²: one long document vs many short ones
    step = [[512], [64] * 8, [512], [64] * 8]
    assignment = assign_packs_to_ranks(step, 2)
    assert sorted(p for ps in assignment.packs_by_rank for p in ps) == [0, 1, 2, 3]
    assert assignment.token_imbalance == 1.0
    assert assignment.attention_imbalance == pytest.approx(1.0)
    with pytest.raises(ValueError, match="evenly"):
        assign_packs_to_ranks(step[:3], 2)
    assert np.isclose(assign_packs_to_ranks([[5], [3]], 1).token_imbalance, 1.0)


_SIGTERM_ONE_RANK = """
import os, signal, sys
import zeropad.train.loop as loop
from zeropad.config import load_config
from zeropad.errors import Preempted

calls = 0
real_step = loop.train_step

def step_then_signal(*args, **kwargs):  # test-only: only rank 1 is told to stop, during step 2
    global calls
    calls += 1
    if os.environ["RANK"] == "1" and calls == 2:
        os.kill(os.getpid(), signal.SIGTERM)
    return real_step(*args, **kwargs)

loop.train_step = step_then_signal
try:
    loop.train(load_config(sys.argv[1]))
except Preempted as err:
    print(f"rank {os.environ['RANK']}: {err}")
    sys.exit(3)
"""


def test_sigterm_on_one_rank_stops_all_ranks_at_the_same_step(reference):
    """The ranks agree on the stop: both save step 2 (DCP) and exit, no hang; the run resumes exactly."""
    root, one = reference
    out = root / "sigterm-ddp"
    cfg_path = root / "sigterm-ddp.yaml"
    cfg_path.write_text(yaml.safe_dump(_config(root, out, grad_accum=2, strategy="ddp")
                                       | {"checkpoint": {"every_steps": 0, "keep": 5}}))
    script = root / "sigterm_one_rank.py"
    script.write_text(_SIGTERM_ONE_RANK)
    done = _torchrun([str(script), str(cfg_path)], cwd=root)  # TimeoutExpired here would be a hang
    log = done.stdout + done.stderr
    assert done.returncode != 0, log[-3000:]
    assert "rank 0: stop requested on another rank after step 2" in log, log[-3000:]
    assert "rank 1: SIGTERM after step 2" in log, log[-3000:]
    ckpt = out / "checkpoints" / "step_000002"
    assert (ckpt / "COMPLETE").is_file() and (ckpt / "dcp").is_dir()

    _assert_continues(one, _resume_on_one_process(root, root / "sigterm-resumed", ckpt), from_step=2)
