"""parallel.cpu_offload on one CUDA GPU: GPU memory and speed with FSDP2 keeping the model states in host memory.

    python benchmarks/cpu_offload.py                  # a Qwen3-0.6B-shape model, 4 steps each
    python benchmarks/cpu_offload.py --layers 4        # a quick smoke run

The same random Qwen3-0.6B-shape model (from model.config: under FSDP it is built on the meta device and drawn
shard by shard) trains with `zeropad train` in one process, bf16 autocast, AdamW, packs of --max-tokens real
tokens of the built-in demo data: once with the model states on the GPU (parallel.strategy=none; the
baseline), once with parallel.strategy=fsdp and parallel.cpu_offload=true (weights, gradients and AdamW's
moments in host memory; each layer's weights copied in for its forward and backward, AdamW stepping on the
CPU). Reported per run, from metrics.jsonl of the steps after the first: GPU peak memory (max_memory_allocated)
and real tokens/s; and the ratio against the baseline measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

from zeropad.config import build_config
from zeropad.demo.task import default_config
from zeropad.train.loop import train

QWEN3_0_6B = dict(model_type="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                  num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                  max_position_embeddings=40960, tie_word_embeddings=True, pad_token_id=0, bos_token_id=1,
                  eos_token_id=2)


def _run(root: Path, name: str, layers: int, max_tokens: int, steps: int, **parallel) -> dict:
    demo = default_config(str(root / "demo"))  # the built-in run's data and tokenizer
    cfg = {
        "model": {"config": {**QWEN3_0_6B, "num_hidden_layers": layers}, "tokenizer": demo["model"]["tokenizer"]},
        "data": demo["data"],
        "pack": {"max_tokens": max_tokens},
        "train": {"steps": steps, "device": "cuda", "dtype": "bf16", "lr": 1e-4},
        "memory": {"chunked_loss": True},
        "checkpoint": {"every_steps": 0},
        "parallel": parallel,
        "log": {"progress": False},
        "output_dir": str(root / name),
    }
    torch.cuda.reset_peak_memory_stats()
    train(build_config(cfg))
    records = [json.loads(line) for line in (root / name / "metrics.jsonl").read_text().splitlines()]
    steps_ = [r for r in records if "loss" in r][1:]  # the first step warms up (allocator, kernels)
    return {"peak_gib": max(r["peak_mem_gb"] for r in steps_),
            "tok_s": statistics.median(r["tokens_per_s"] for r in steps_),
            "loss": steps_[-1]["loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=QWEN3_0_6B["num_hidden_layers"])
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/cpu_offload.py needs a CUDA GPU")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = _run(root, "gpu", args.layers, args.max_tokens, args.steps, strategy="none")
        offload = _run(root, "offload", args.layers, args.max_tokens, args.steps, strategy="fsdp", cpu_offload=True)
    print(f"Qwen3-0.6B shape, {args.layers} layers, bf16 autocast, packs of {args.max_tokens} tokens, "
          f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("\n| run | GPU peak GiB | real tok/s | vs states on GPU (memory, speed) | last loss |")
    print("|---|---|---|---|---|")
    for name, r in (("states on GPU", base), ("fsdp + cpu_offload", offload)):
        print(f"| {name} | {r['peak_gib']:.2f} | {r['tok_s']:,.0f} | {r['peak_gib'] / base['peak_gib']:.2f}x, "
              f"{r['tok_s'] / base['tok_s']:.2f}x | {r['loss']:.4f} |")


if __name__ == "__main__":
    main()
