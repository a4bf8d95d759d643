"""What keeping freed host memory (zeropad/train/host_alloc.py) is worth to a CPU training step, in one process.

    python benchmarks/host_alloc.py              # issue 16's configuration: 5.2M Qwen3, one 8k-token Alpaca pack
    python benchmarks/host_alloc.py --pairs 10   # steadier median

One pack of benchmarks/throughput.py's configuration (--model 5m, --max-tokens 8192: the same model, tokenizer,
data and zeropad step) trains repeatedly; each pair of steps runs once with glibc's defaults (large buffers
mmap'd and unmapped on free) and once with `keep_freed_memory` (served from the heap and kept), in alternating
order, so both see the same machine. Prints the time to allocate and fill one 128 MB buffer (a loss chunk) both
ways (each in a fresh process), each pair of steps, and the median ratio (default / kept step time). In one
process the default steps can reuse heap memory the kept steps left behind, so the ratio understates the gain.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput as T  # noqa: E402  (the same model, data and step as the MFU benchmark)

from zeropad.pack.collate import collate  # noqa: E402
from zeropad.train.host_alloc import _M_MMAP_MAX, _M_TRIM_THRESHOLD, _libc, keep_freed_memory  # noqa: E402
from zeropad.train.step import StepSetup, train_step  # noqa: E402


def glibc_defaults() -> None:
    """glibc's own settings back (mmap up to its default count, trim past 128 KB), as in a fresh process."""
    libc = _libc()
    libc.mallopt(_M_MMAP_MAX, 65536)
    libc.mallopt(_M_TRIM_THRESHOLD, 128 * 1024)


_FILL = """
import sys, time, torch
from zeropad.train.host_alloc import keep_freed_memory
if sys.argv[1] == "keep":
    keep_freed_memory()
torch.empty(4096, 8192).fill_(1.0)  # a loss chunk's [4096, 8192] fp32 logits, allocated and freed
best = float("inf")
for _ in range(5):
    t0 = time.perf_counter()
    torch.empty(4096, 8192).fill_(1.0)
    best = min(best, time.perf_counter() - t0)
print(1e3 * best)
"""


def _fill_ms(keep: bool) -> float:
    """The cause, apart from any step: in a fresh process, a freed 128 MB buffer allocated again and filled."""
    out = subprocess.run([sys.executable, "-c", _FILL, "keep" if keep else "default"], capture_output=True,
                         text=True, check=True).stdout
    return float(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if _libc() is None:
        sys.exit("host_alloc.py: no glibc here; keep_freed_memory does nothing on this system")
    torch.set_num_threads(args.threads)
    T.MODEL_CONFIG = T.MODEL_PRESETS["5m"]
    tokenizer = T.build_tokenizer(json.loads(T.ALPACA.read_text()))
    with tempfile.TemporaryDirectory() as work_dir:
        samples, _ = T.load_alpaca_samples(tokenizer, f"{work_dir}/cache")
    model = T.build_model("zeropad_varlen")
    optimizer, scheduler = T.build_optimizer(model, 1000)
    plan = T.shuffle_packs(T.plan_packs([len(s) for s in samples], 8192), T.SEED)  # the first 8k-token pack
    pack = collate([samples[i] for i in plan[0]])
    setup = StepSetup(model, optimizer, scheduler, grad_clip=T.GRAD_CLIP, loss_chunk_tokens=T.LOSS_CHUNK_TOKENS)
    for _ in range(2):
        train_step(setup, [pack])  # warm-up
    print(f"one pack of {pack.num_tokens} tokens, {args.threads} threads, torch {torch.__version__}")
    fill = {keep: _fill_ms(keep) for keep in (False, True)}
    print(f"a 128 MB buffer allocated and filled, after one was freed (fresh processes): {fill[False]:.1f} ms with "
          f"glibc's defaults, {fill[True]:.1f} ms with freed memory kept")
    print("| pair | glibc defaults s | memory kept s | ratio |\n|---|---|---|---|")
    ratios = []
    for i in range(args.pairs):
        seconds = {}
        for keep in ((True, False) if i % 2 else (False, True)):
            keep_freed_memory() if keep else glibc_defaults()
            t0 = time.perf_counter()
            train_step(setup, [pack])
            seconds[keep] = time.perf_counter() - t0
        ratios.append(seconds[False] / seconds[True])
        print(f"| {i + 1} | {seconds[False]:.3f} | {seconds[True]:.3f} | {ratios[-1]:.3f}x |")
    print(f"median: memory kept is {statistics.median(ratios):.2f}x a step "
          f"({min(ratios):.2f}-{max(ratios):.2f}x over {args.pairs} pairs)")


if __name__ == "__main__":
    main()
