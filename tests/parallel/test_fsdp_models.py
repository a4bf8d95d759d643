"""FSDP2 on 2 gloo ranks equals one process (losses, grad norms, final weights within 1e-5, fp32) for the models
the loop trains beyond a dense LM: an MoE LM (loaded from safetensors with per-expert tensors), and LoRA
(adapters trained, base frozen, final/ merged; the base drawn shard by shard from model.config)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from test_distributed import _hf_weights, _torchrun  # noqa: E402
from tinyrun import run_config, saved_initial_model, step_records  # noqa: E402
from zeropad.config import build_config  # noqa: E402
from zeropad.model.hf_writer import weight_files  # noqa: E402
from zeropad.model.load import build_model  # noqa: E402
from zeropad.train.loop import train  # noqa: E402

MOE = {"model_type": "qwen3_moe", "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
       "decoder_sparse_step": 1, "output_router_logits": True}
CASES = {
    "moe": {"model": {"config": MOE}},
    "lora": {"model": {"lora": {"r": 4, "alpha": 8.0}}},
}


def _config(root: Path, case: str, name: str, grad_accum: int, **parallel) -> dict:
    cfg = run_config(root, root / name, train={"steps": 2, "grad_accum": grad_accum},
                     memory={"chunked_loss": False}, parallel=parallel)
    extra = CASES[case]["model"]
    cfg["model"] = {**cfg["model"], **extra, "config": {**cfg["model"]["config"], **extra.get("config", {})}}
    return cfg


@pytest.mark.parametrize("case", list(CASES))
def test_fsdp_two_ranks_equal_one_process(tmp_path, case):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun rank (OMP_NUM_THREADS=1)
    try:  # one process, grad_accum 2: the packs 2 ranks x 1 micro-step see per step
        train(build_config(_config(tmp_path, case, "one", grad_accum=2)))
    finally:
        torch.set_num_threads(threads)
    cfg_path = tmp_path / "fsdp.yaml"
    fsdp = _config(tmp_path, case, "fsdp", grad_accum=1, strategy="fsdp")
    fsdp["checkpoint"] = {"max_shard_size": 20_000}  # final/ in shards, each weight gathered (and merged) alone
    if case == "moe":  # from safetensors, whose per-expert tensors each rank reads and fuses for its shards alone
        fsdp = saved_initial_model(fsdp, tmp_path / "initial")
    cfg_path.write_text(yaml.safe_dump(fsdp))
    done = _torchrun(["-m", "zeropad", "train", str(cfg_path)], cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]

    expected, got = step_records(tmp_path / "one"), step_records(tmp_path / "fsdp")
    assert len(got) == 2
    for e, g in zip(expected, got, strict=True):
        assert abs(e["loss"] - g["loss"]) <= 1e-5, (e["step"], e["loss"], g["loss"])
        assert abs(e["grad_norm"] - g["grad_norm"]) <= 1e-5
        assert (e["tokens"], e["target_tokens"]) == (g["tokens"], g["target_tokens"])
        if case == "moe":
            assert abs(e["aux_loss"] - g["aux_loss"]) <= 1e-5 and e["aux_loss"] > 0
    expected_w = load_file(str(tmp_path / "one" / "final" / "model.safetensors"))  # fits the default 5GB
    assert len(weight_files(tmp_path / "fsdp" / "final")) > 3
    got_w = _hf_weights(tmp_path / "fsdp" / "final")
    assert expected_w.keys() == got_w.keys() and not any("lora" in key for key in got_w)  # LoRA: merged
    for key in expected_w:
        assert (expected_w[key] - got_w[key]).abs().max().item() <= 1e-5, key
    if case == "lora":  # the adapters trained and were merged in; the embeddings (not adapted) stayed frozen
        initial = build_config(_config(tmp_path, case, "x", grad_accum=1))
        base = build_model(initial.model.model_copy(update={"lora": None}), seed=initial.train.seed).state_dict()
        name = "model.layers.0.mlp.up_proj.weight"
        assert (got_w[name] - base[name]).abs().max().item() > 1e-4
        assert torch.equal(got_w["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
