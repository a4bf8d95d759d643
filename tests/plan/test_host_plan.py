"""`zeropad plan` beyond one device: model states per device under FSDP and HSDP (sharded within a replica), and
host memory per rank for loading (sharded on the meta device) and for writing final/ (one file at a time)."""

import json

import pytest

from zeropad.config import build_config
from zeropad.errors import ConfigError
from zeropad.plan.report import run

QWEN3 = dict(model_type="qwen3", vocab_size=1000, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16, bos_token_id=1, eos_token_id=2)


def plan(devices: int, as_json: bool = True, checkpoint: dict | None = None, **parallel):
    cfg = build_config({"model": {"config": QWEN3}, "pack": {"max_tokens": 256}, "train": {"device": "cpu"},
                        "parallel": {"strategy": "fsdp", **parallel}, "checkpoint": checkpoint or {}})
    out = run(cfg, num_devices=devices, device_memory="4GB", strategy=None, precision="fp32", optimizer="adamw",
              as_json=as_json)
    return json.loads(out) if as_json else out


def test_hsdp_shards_the_states_within_a_replica():
    fsdp, hsdp = plan(4), plan(4, replicate=2)
    n = fsdp["model"]["num_params"]
    states = lambda p: {c["name"]: c["device"] for c in p["components"][:3]}  # noqa: E731
    assert states(fsdp) == {"parameters": 4 * n / 4, "gradients": 4 * n / 4, "optimizer state": 8 * n / 4}
    assert states(hsdp) == {"parameters": 4 * n / 2, "gradients": 4 * n / 2, "optimizer state": 8 * n / 2}
    assert "HSDP: 2 replicas" in hsdp["components"][0]["note"]
    with pytest.raises(ConfigError, match=r"parallel.replicate \(3\) must divide --devices \(4\)"):
        plan(4, replicate=3)


def test_host_memory_per_rank_for_loading_and_final():
    one, sharded = plan(1), plan(4)
    n, embedding = one["model"]["num_params"], QWEN3["vocab_size"] * QWEN3["hidden_size"]
    # one process: the whole model and one tensor being read; final/ one file (here the whole model) + one weight
    assert one["host_per_rank_bytes"] == {"load": 4 * n + 4 * embedding, "export": 0.0,
                                          "export_rank0": 4 * n + 4 * embedding}
    # FSDP on 4: its shards twice (model and loading copy) + one tensor; final/ one weight per rank, and on rank 0
    # one file of checkpoint.max_shard_size + one weight
    assert sharded["host_per_rank_bytes"] == {"load": 2 * 4 * n / 4 + 4 * embedding, "export": 4 * embedding,
                                              "export_rank0": 4 * n + 4 * embedding}
    small = plan(4, checkpoint={"max_shard_size": 1000})
    assert small["host_per_rank_bytes"]["export_rank0"] == 1000 + 4 * embedding
    text = plan(4, as_json=False, replicate=2)
    assert "zero3 on 4 device(s) as 2 HSDP replicas of 2" in text.splitlines()[1], text
    assert "host memory per rank: loading" in text and "each rank reads its shards" in text
