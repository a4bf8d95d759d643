"""A checkpoint in the single-process format of earlier versions (model.safetensors + optimizer.pt)
resumes bitwise exactly and exports; the run then saves the one (DCP) format."""

import json
import shutil

import torch
from safetensors.torch import load_file, save_model
from transformers import AutoModelForCausalLM

from tinymodels import TINY
from tinyrun import step_records
from zeropad.config import build_config
from zeropad.model.load import build_model
from zeropad.train.export import export_checkpoint
from zeropad.train.loop import train
from zeropad.train.optim import build_optimizer, build_scheduler
from zeropad.train.state import MANIFEST, checkpoint_root, load_checkpoint


def write_legacy_checkpoint(ckpt, cfg) -> dict[str, torch.Tensor]:
    """Turn `ckpt` into what the single-process save of earlier versions wrote for the same state:
    model.safetensors (safetensors' save_model: tied tensors once) and optimizer.pt (the optimizer's
    own state dict, keyed by index, with the scheduler's) instead of dcp/ and scheduler.pt. Returns
    the weights."""
    model = build_model(cfg.model, seed=cfg.train.seed)
    optimizer = build_optimizer(model, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train)
    load_checkpoint(ckpt, model, optimizer, scheduler)
    shutil.rmtree(ckpt / "dcp")
    (ckpt / "scheduler.pt").unlink()
    save_model(model, str(ckpt / "model.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, ckpt / "optimizer.pt")
    files = {str(f.relative_to(ckpt)): f.stat().st_size for f in sorted(ckpt.rglob("*"))
             if f.is_file() and f.name != MANIFEST}
    (ckpt / MANIFEST).write_text(json.dumps({"step": json.loads((ckpt / "state.json").read_text())["step"],
                                             "files": files}))
    return model.state_dict()


def test_a_legacy_checkpoint_resumes_bitwise_and_exports(tiny_run, tmp_path):
    tied = {"model_type": "qwen3", **TINY, "vocab_size": 259, "tie_word_embeddings": True}
    cfg = build_config(tiny_run(model={"config": tied}, checkpoint={"every_steps": 2, "keep": 2}))
    train(cfg)
    out, root = tmp_path / "out", checkpoint_root(cfg.output_dir)
    records, final = step_records(out), load_file(out / "final/model.safetensors")
    ckpt = root / "step_000006"
    weights = write_legacy_checkpoint(ckpt, cfg)
    assert len(load_file(ckpt / "model.safetensors")) == len(weights) - 1  # the tied tensor is stored once

    export_checkpoint(ckpt, tmp_path / "hf")
    exported = load_file(tmp_path / "hf" / "model.safetensors")
    assert exported and all(torch.equal(t, weights[k]) for k, t in exported.items())
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "hf").config.tie_word_embeddings

    train(cfg.model_copy(update={"resume": str(ckpt)}))
    keys = ("step", "loss", "grad_norm", "lr", "tokens")
    assert [[r[k] for k in keys] for r in step_records(out)] == [[r[k] for k in keys] for r in records]  # bitwise
    resumed = load_file(out / "final/model.safetensors")
    assert resumed.keys() == final.keys() and all(torch.equal(resumed[k], final[k]) for k in final)
    assert (root / "step_000008" / "dcp").is_dir() and not (root / "step_000008" / "model.safetensors").exists()
