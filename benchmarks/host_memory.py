"""Peak host memory (RSS) per rank when a model from safetensors trains: one process, and FSDP on 2 ranks.

    python benchmarks/host_memory.py                 # a 266M-parameter Qwen3 (about 6 minutes on 2 CPU cores)
    python benchmarks/host_memory.py --layers 2      # a quick smoke run

A random Qwen3-architecture model (hidden 1024, 16 layers, intermediate 3072, vocab 32,000, untied: 266M
parameters, 1.07 GB in fp32) is saved once as Hugging Face safetensors. Then `zeropad train` (model.path set,
fp32, AdamW, 2 optimizer steps of one small pack per rank, final/ written in shards of --shard-mb) runs in one
process (parallel.strategy=none) and under torchrun on 2 gloo ranks (parallel.strategy=fsdp); each process
reports its peak resident set size (VmHWM). The "loading" rows run the loop's own steps up to the
first optimizer step (build, LoRA/checkpointing, FSDP, weights) and stop there. Under FSDP every rank builds the model on the meta
device, shards it, and reads only its shards' slices of the safetensors files (zeropad/parallel/materialize.py).

The bound each rank should stay under: model-state bytes / N (fp32 weights, gradients and AdamW's two moments:
16 bytes per parameter) + the largest single tensor + the framework's own footprint, measured in the same run as
the peak RSS of the same command on a tiny model (python, torch, transformers, the data path, gloo).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml

MiB = 2**20
MODEL = dict(model_type="qwen3", vocab_size=32000, hidden_size=1024, intermediate_size=3072, num_hidden_layers=16,
             num_attention_heads=16, num_key_value_heads=8, head_dim=64, max_position_embeddings=4096,
             tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
TINY = {**MODEL, "vocab_size": 512, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 1,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}


def _worker(mode: str, cfg_path: str, out_dir: str) -> None:
    """One rank: load the model as the loop does (mode load) or train (mode train), then report this process's
    peak RSS."""
    from zeropad.config import load_config

    cfg = load_config(cfg_path)
    if mode == "load":  # the loop's own steps up to the first optimizer step, nothing else
        from zeropad.model.load import load_tokenizer
        from zeropad.parallel import distributed
        from zeropad.parallel.materialize import materialize
        from zeropad.parallel.sharding import parallelize
        from zeropad.train.loop import _build_model

        device = torch.device("cpu")
        distributed.init(device)
        _, model, _, slots = _build_model(cfg, load_tokenizer(cfg.model), None, device)
        model = parallelize(model, cfg.parallel, cfg.train.dtype, device)
        if slots is not None:
            materialize(model, slots, cfg.model, seed=cfg.train.seed, device=device, parallel=cfg.parallel)
    else:
        from zeropad.train.loop import train

        train(cfg)  # tears the process group down at the end: the rank comes from torchrun's env
    # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss across exec, so a child started by a parent that
    # holds the whole model would report the parent's size; VmHWM belongs to this address space alone
    hwm_kib = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
    peak = hwm_kib * 1024
    Path(out_dir, f"rss_{mode}_{os.environ.get('RANK', '0')}.json").write_text(json.dumps({"peak": peak}))


def _save_model(config: dict, directory: Path, seed: int = 0) -> tuple[int, int]:
    """(parameters, bytes of the largest tensor) of the random model saved under directory."""
    from zeropad.config import ModelConfig
    from zeropad.model.load import build_model

    model = build_model(ModelConfig(config=config), seed=seed)
    model.save_pretrained(directory)
    return sum(p.numel() for p in model.parameters()), max(p.numel() * p.element_size() for p in model.parameters())


def _run(root: Path, name: str, model_dir: Path, nproc: int, shard_mb: int, mode: str = "train") -> list[int]:
    from zeropad.demo.tokenizer import build_tokenizer

    tokenizer_dir = root / "tokenizer"
    if not tokenizer_dir.is_dir():
        build_tokenizer(tokenizer_dir)
        with (root / "data.jsonl").open("w") as f:
            for i in range(16):
                f.write(json.dumps({"instruction": f"Repeat {i}", "input": "", "output": f"{i} " * 20}) + "\n")
    out = root / name
    cfg = {
        "model": {"path": str(model_dir), "tokenizer": str(tokenizer_dir), "attn_implementation": "eager"},
        "data": {"sources": [{"path": str(root / "data.jsonl"), "format": "alpaca"}], "num_workers": 0},
        "pack": {"max_tokens": 128},
        "train": {"steps": 2, "grad_accum": 1, "device": "cpu"},
        "memory": {"chunked_loss": False},
        "checkpoint": {"every_steps": 0, "max_shard_size": shard_mb * MiB},
        "parallel": {"strategy": "fsdp" if nproc > 1 else "none"},
        "log": {"progress": False},
        "output_dir": str(out),
    }
    cfg_path = root / f"{name}.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    out.mkdir(parents=True, exist_ok=True)
    me = [str(Path(__file__).resolve()), "--worker", mode, str(cfg_path), str(out)]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *me]
    else:
        cmd = [sys.executable, *me]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return [json.loads((out / f"rss_{mode}_{r}.json").read_text())["peak"] for r in range(nproc)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=MODEL["num_hidden_layers"])
    parser.add_argument("--shard-mb", type=int, default=128, help="final/ safetensors shard size")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return _worker(*args.worker)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        params, largest = _save_model({**MODEL, "num_hidden_layers": args.layers}, root / "model")
        _save_model(TINY, root / "tiny")
        rows = {
            "framework (tiny model, 1 process)": _run(root, "tiny1", root / "tiny", 1, args.shard_mb),
            "framework (tiny model, FSDP 2 ranks)": _run(root, "tiny2", root / "tiny", 2, args.shard_mb),
            "one process, loading": _run(root, "one-load", root / "model", 1, args.shard_mb, "load"),
            "FSDP, 2 ranks, loading": _run(root, "fsdp2-load", root / "model", 2, args.shard_mb, "load"),
            "one process": _run(root, "one", root / "model", 1, args.shard_mb),
            "FSDP, 2 ranks": _run(root, "fsdp2", root / "model", 2, args.shard_mb),
        }
    states = 16 * params
    framework2 = max(rows["framework (tiny model, FSDP 2 ranks)"])
    bound = states / 2 + largest + framework2
    print(f"model: Qwen3 shape, {args.layers} layers, {params / 1e6:.1f}M parameters; model states (fp32 weights, "
          f"gradients, AdamW moments) {states / MiB:,.0f} MiB; largest tensor {largest / MiB:,.0f} MiB; "
          f"torch {torch.__version__}, {os.cpu_count()} CPUs")
    print("\n| run | peak RSS per rank (MiB) | vs one process |")
    print("|---|---|---|")
    one = rows["one process"][0]
    for name, peaks in rows.items():
        text = ", ".join(f"{p / MiB:,.0f}" for p in peaks)
        print(f"| {name} | {text} | {max(peaks) / one:.2f}x |")
    print(f"\nbound per rank at 2 ranks: states/2 {states / 2 / MiB:,.0f} + largest tensor {largest / MiB:,.0f} + "
          f"framework {framework2 / MiB:,.0f} = {bound / MiB:,.0f} MiB; FSDP peak / bound: loading "
          f"{max(rows['FSDP, 2 ranks, loading']) / bound:.2f}, training {max(rows['FSDP, 2 ranks']) / bound:.2f}")


if __name__ == "__main__":
    main()
