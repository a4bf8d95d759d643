"""Sequence parallelism's memory: saved-tensor bytes per rank at sp_size 1 and 2, beside the planner's prediction.

One forward + loss of a Qwen3-shape model (hidden 256, 4 layers, 8 heads, 4 KV heads, vocab 2048; fp32, CPU) on
one pack of --tokens tokens (random documents of 32-2048 tokens, so that documents cross the split). Measured:
the bytes autograd saves for backward (zeropad.model.checkpointing.saved_activation_bytes: saved-tensor hooks,
deduplicated by storage, weights excluded), at sp_size=1 in one process and at sp_size=2 in two gloo processes
(torchrun; each rank its own token range, Ulysses attention over the whole pack, parallel/ulysses.py), each rank
reporting its own bytes; one torchrun launch, whose rank 0 measures sp_size 1 alone first. Predicted: the
planner's activations row (zeropad.plan.memory.activations) for the same pack and sp_size. From the repository root:

    python benchmarks/sp_memory.py                    # 16,384 tokens, about 3.5 minutes on two busy cores
    python benchmarks/sp_memory.py --tokens 1024 --runs none:chunked
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tinymodels import tiny_model  # noqa: E402

from zeropad.model.attention import ATTN_NAME  # noqa: E402
from zeropad.model.checkpointing import apply_checkpointing, saved_activation_bytes  # noqa: E402
from zeropad.pack.collate import collate  # noqa: E402
from zeropad.parallel import distributed, ulysses  # noqa: E402
from zeropad.plan.arch import arch_of  # noqa: E402
from zeropad.plan.memory import Setup, activations  # noqa: E402
from zeropad.train.step import forward_loss_sum  # noqa: E402
from zeropad.verify import random_documents  # noqa: E402

MODEL = dict(vocab_size=2048, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=4, head_dim=32, max_position_embeddings=65536)
RUNS = ["none:plain", "none:chunked", "full:chunked"]  # checkpointing policy : loss
LOSS_CHUNK = 4096


def doc_lengths(total: int, seed: int = 0) -> list[int]:
    """Random lengths of 32-2048 tokens (up to a quarter of `total` in a small pack) filling `total` exactly."""
    gen = torch.Generator().manual_seed(seed)
    longest = min(2048, max(64, total // 4))
    lengths: list[int] = []
    while sum(lengths) < total:
        lengths.append(min(int(torch.randint(32, longest + 1, (1,), generator=gen)), total - sum(lengths)))
    return lengths


def measure(tokens: int, run: str, sp: ulysses.SequenceParallel | None) -> dict:
    """This process's saved bytes for one forward + loss, and the planner's prediction for it."""
    policy, loss = run.split(":")
    chunk = LOSS_CHUNK if loss == "chunked" else None
    model = tiny_model("qwen3", attn_implementation=ulysses.ULYSSES_NAME if sp else ATTN_NAME, **MODEL)
    apply_checkpointing(model, policy)
    pack = collate(random_documents(MODEL["vocab_size"], doc_lengths(tokens)))
    size, rank = (sp.size, sp.rank) if sp else (1, 0)
    split_inside = ulysses.token_sizes(tokens, 2)[0] not in pack.cu_seqlens.tolist()
    local = ulysses.split_pack(pack, rank, size) if sp else pack
    no_autocast = torch.autocast("cpu", enabled=False)
    measured = saved_activation_bytes(lambda: forward_loss_sum(model, local, no_autocast, chunk), model.parameters())
    setup = Setup(precision="fp32", checkpointing=policy, chunked_loss=chunk is not None,
                  loss_chunk_tokens=chunk or 1, sp_size=size)
    predicted = {r.name: r.device for r in activations(arch_of(model), setup, tokens)}[f"activations ({policy})"]
    return {"run": run, "sp_size": size, "rank": rank, "tokens": tokens, "rank_tokens": local.input_ids.shape[1],
            "split_inside_document": split_inside, "measured": measured, "predicted": predicted}


def worker(tokens: int, runs: list[str]) -> None:
    """One rank (under torchrun, 2 processes): rank 0 first measures sp_size 1 alone, then both ranks sp_size 2;
    one JSON line per measurement."""
    distributed.init(torch.device("cpu"))
    try:
        if distributed.rank() == 0:
            for run in runs:
                print("RESULT " + json.dumps(measure(tokens, run, None)) + "\n", end="", flush=True)  # one write per line
        with ulysses.sequence_parallel(2) as sp:
            for run in runs:
                print("RESULT " + json.dumps(measure(tokens, run, sp)) + "\n", end="", flush=True)
    finally:
        distributed.teardown()


def launch(tokens: int, runs: list[str]) -> list[dict]:
    """The rows of `worker` on 2 gloo ranks (one torchrun launch)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
           "--worker", "--tokens", str(tokens), "--runs", ",".join(runs)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode:
        raise SystemExit(f"torchrun failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}")
    return parse_results(done.stdout)


def parse_results(stdout: str) -> list[dict]:
    """Every rank's RESULT record; two ranks share the pipe, so a record need not start or end its line."""
    decoder = json.JSONDecoder()
    return [decoder.raw_decode(part)[0] for part in stdout.split("RESULT ")[1:]]


def table(rows: list[dict]) -> str:
    one = {r["run"]: r["measured"] for r in rows if r["sp_size"] == 1}
    lines = ["| checkpointing:loss | sp_size | rank | tokens on rank | measured | predicted | measured/predicted "
             "| SP2/SP1 measured |", "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (RUNS.index(r["run"]) if r["run"] in RUNS else 0, r["sp_size"], r["rank"])):
        ratio = f"{r['measured'] / one[r['run']]:.3f}" if r["sp_size"] > 1 and r["run"] in one else ""
        lines.append(f"| {r['run']} | {r['sp_size']} | {r['rank']} | {r['rank_tokens']:,} "
                     f"| {r['measured'] / 1e6:.2f} MB "
                     f"| {r['predicted'] / 1e6:.2f} MB | {r['measured'] / r['predicted']:.3f} | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--runs", default=",".join(RUNS), help="policy:loss pairs, comma-separated")
    parser.add_argument("--worker", action="store_true", help="be one rank (run under torchrun, 2 processes)")
    args = parser.parse_args()
    runs = args.runs.split(",")
    if args.worker:
        return worker(args.tokens, runs)
    rows = launch(args.tokens, runs)
    inside = rows[0]["split_inside_document"]
    print(f"torch {torch.__version__}; qwen3 h256, 4 layers, 8 heads, 4 KV heads, vocab 2048, fp32, CPU; "
          f"{args.tokens:,} tokens in {len(doc_lengths(args.tokens))} documents (the SP=2 split "
          f"{'inside' if inside else 'at the boundary of'} a document); chunked loss {LOSS_CHUNK} tokens")
    print(table(rows))


if __name__ == "__main__":
    main()
