"""The ceiling under a CPU step's MFU: the step's own matmul and attention kernels, each run alone, against the step.

Run from the repository root (about 3 minutes on a two-core CPU, most of it the compile):

    python benchmarks/mfu_ceiling.py                     # issue 16's configuration: 5m model, 8,192-token packs
    python benchmarks/mfu_ceiling.py --packs 8 --no-compiled

throughput.py reports MFU against the 2048 x 2048 matmul peak. No step reaches that peak: a step is made of the
model's own matmul shapes (K = 256 for the 5m model; the LM head's logits write [C, 8192] per chunk) and of causal
attention over documents of a few hundred tokens, and even alone those kernels run below it. This script measures how
far below, per pack, in one run:

  1. one zeropad step of the pack, timed: eager (what `zeropad train` runs) and, unless --no-compiled, with
     train.compile, each its own model with the same weights (as throughput.py's methods);
  2. one more eager step of the same pack, untimed, recorded op by op (a TorchDispatchMode): every matmul
     (aten.mm / addmm / addmm_: the Linear layers forward and backward, the chunked loss's three per chunk) and
     zeropad's attention ops (the CPU flash kernel per document, forward and backward), with copies of their inputs;
  3. each recorded kernel run again alone, the best of --reps runs, times its number of calls. Their sum is the
     step's ceiling: the step as if every elementwise op, norm, softmax pass of the loss, the optimizer and Python
     took no time.

MFU counts the model's FLOPs as throughput.py does (6 x the Linear parameters per real token plus causal attention),
for each pack its own documents' attention (throughput.py's per-token figure averages it over the data), over the
peak measured before and after (the higher). "of ceiling" is the step's time over the ceiling's: how much of
what its kernels allow the step reaches, a figure the machine's drifting speed moves less (each pack's step and
kernels are timed seconds apart).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import types

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

from zeropad.train.metrics import FlopCounter

import throughput as tp  # this folder's throughput.py: the same data, model, packs and FLOP count

aten = torch.ops.aten
MATMULS = frozenset({aten.mm.default, aten.addmm.default, aten.addmm_.default, aten.bmm.default})
ATTENTION = frozenset({torch.ops.zeropad.cpu_flash_per_doc.default,
                       torch.ops.zeropad.cpu_flash_per_doc_backward.default})


def _signature(x):
    """What decides a kernel's time: shapes, strides, dtypes, and the values of small integer tensors (a pack's
    document boundaries)."""
    if not isinstance(x, torch.Tensor):
        return x
    values = tuple(x.tolist()) if not x.is_floating_point() and x.numel() <= 4096 else None
    return tuple(x.shape), x.stride(), x.dtype, values


class KernelRecorder(TorchDispatchMode):
    """Records each distinct matmul and attention call of a step: (op, copies of its inputs, number of calls)."""

    def __init__(self):
        super().__init__()
        self.calls: dict[tuple, list] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in MATMULS or func in ATTENTION:
            key = (func, repr(tree_map(_signature, (args, kwargs))))
            if key in self.calls:
                self.calls[key][3] += 1
            else:
                copy = lambda x: x.detach().clone() if isinstance(x, torch.Tensor) else x  # noqa: E731
                self.calls[key] = [func, tree_map(copy, args), tree_map(copy, kwargs), 1]
        return func(*args, **kwargs)


def kernel_seconds(recorder: KernelRecorder, reps: int) -> tuple[float, float, float]:
    """(matmul seconds, matmul FLOPs, attention seconds) of the recorded step, each kernel run alone."""
    matmul_s = matmul_flops = attention_s = 0.0
    for func, args, kwargs, count in recorder.calls.values():
        func(*args, **kwargs)  # warm: caches, the allocator
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            func(*args, **kwargs)
            best = min(best, time.perf_counter() - t0)
        if func in MATMULS:
            a, b = args[-2:]  # mm(a, b), addmm(c, a, b): [m, k] @ [k, n]; bmm over a batch
            matmul_s += best * count
            matmul_flops += 2 * a.shape[:-1].numel() * a.shape[-1] * b.shape[-1] * count
        else:
            attention_s += best * count
    return matmul_s, matmul_flops, attention_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(tp.MODEL_PRESETS), default="5m")
    parser.add_argument("--max-tokens", type=int, default=8192, help="pack budget (throughput.py's --max-tokens)")
    parser.add_argument("--packs", type=int, default=6, help="packs measured (after the warm-up steps)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (the compile falls here)")
    parser.add_argument("--reps", type=int, default=3, help="runs of each recorded kernel; the best is kept")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-compiled", action="store_true", help="skip the train.compile step")
    parser.add_argument("--json", default=None, help="also write the per-pack figures here")
    args = parser.parse_args()
    tp.MODEL_CONFIG = tp.MODEL_PRESETS[args.model]
    if not tp.ALPACA.is_file():
        sys.exit(f"mfu_ceiling.py: the Alpaca sample is missing: expected {tp.ALPACA}")
    torch.set_num_threads(args.threads)
    tp.keep_freed_memory()  # as `zeropad train` on a CPU

    records = json.loads(tp.ALPACA.read_text())
    tokenizer = tp.build_tokenizer(records)
    with tempfile.TemporaryDirectory(prefix="zeropad-ceiling-") as work_dir:
        samples, _ = tp.load_alpaca_samples(tokenizer, f"{work_dir}/cache")
    reference = tp.build_model("sdpa")
    flops = tp.model_flops(reference, [len(s) for s in samples])
    counter = FlopCounter(reference)
    state_dict = {k: v.clone() for k, v in reference.state_dict().items()}
    del reference

    # Each stepper cycles through the same shuffled packs, so stepping them in turn gives each the same pack.
    step_args = types.SimpleNamespace(max_tokens=args.max_tokens, warmup=args.warmup, seconds=0.0, steps=None)
    eager = tp.ZeropadStepper(samples, state_dict, step_args)
    recording = tp.ZeropadStepper(samples, state_dict, step_args)
    compiled = None if args.no_compiled else tp.ZeropadStepper(samples, state_dict, step_args, compiled=True)
    steppers = [s for s in (eager, compiled, recording) if s is not None]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; model {args.model} "
          f"({flops.per_token / 1e6:.1f} MFLOP per real token), packs of <= {args.max_tokens} tokens; "
          f"{args.warmup} warm-up steps{'' if compiled is None else ' (the compile)'}, then {args.packs} packs",
          flush=True)
    for _ in range(args.warmup):
        for stepper in steppers:
            stepper.train_one()

    peak = tp.matmul_peak(args.threads)
    rows = []
    for _ in range(args.packs):
        timed = {}
        for name, stepper in (("eager", eager), ("compiled", compiled)):
            if stepper is not None:
                t0 = time.perf_counter()
                tokens, _ = stepper.train_one()
                timed[name] = time.perf_counter() - t0
        recorder = KernelRecorder()
        with recorder:
            recording.train_one()
        lengths = [len(samples[i]) for i in recording.last_pack]
        matmul_s, matmul_flops, attention_s = kernel_seconds(recorder, args.reps)
        rows.append(dict(tokens=tokens, docs=len(lengths), flops=counter(lengths), **timed, matmul_s=matmul_s,
                         attention_s=attention_s,
                         matmul_gflops=matmul_flops / matmul_s / 1e9,
                         matmul_counted=matmul_flops / (6 * flops.matmul_params * tokens),
                         attention_gflops=3 * counter.text_forward(lengths)[1] / attention_s / 1e9))
    peak = max(peak, tp.matmul_peak(args.threads))

    mfu = lambda row, seconds: row["flops"] / seconds / peak  # noqa: E731
    steps = [name for name in ("eager", "compiled") if name in rows[0]]
    head = ("pack", "tokens", "docs", *(f"{n} s" for n in steps), "ceiling s (matmuls + attention)",
            "matmuls alone GFLOP/s", "attention alone GFLOP/s", *(f"MFU {n}" for n in steps), "MFU ceiling",
            *(f"{n} of ceiling" for n in steps))
    table = []
    for i, row in enumerate(rows):
        ceiling = row["matmul_s"] + row["attention_s"]
        table.append((str(i + 1), f"{row['tokens']:,}", str(row["docs"]), *(f"{row[n]:.2f}" for n in steps),
                      f"{ceiling:.2f} ({row['matmul_s']:.2f} + {row['attention_s']:.2f})",
                      f"{row['matmul_gflops']:.0f}", f"{row['attention_gflops']:.0f}",
                      *(f"{100 * mfu(row, row[n]):.1f}%" for n in steps), f"{100 * mfu(row, ceiling):.1f}%",
                      *(f"{100 * ceiling / row[n]:.0f}%" for n in steps)))
    median = lambda f: statistics.median(f(row) for row in rows)  # noqa: E731
    ceiling_of = lambda row: row["matmul_s"] + row["attention_s"]  # noqa: E731
    table.append(("**median**", "", "", *(f"{median(lambda r, n=n: r[n]):.2f}" for n in steps),
                  f"{median(ceiling_of):.2f}", f"{median(lambda r: r['matmul_gflops']):.0f}",
                  f"{median(lambda r: r['attention_gflops']):.0f}",
                  *(f"**{100 * median(lambda r, n=n: mfu(r, r[n])):.1f}%**" for n in steps),
                  f"**{100 * median(lambda r: mfu(r, ceiling_of(r))):.1f}%**",
                  *(f"**{100 * median(lambda r, n=n: ceiling_of(r) / r[n]):.0f}%**" for n in steps)))
    print()
    print("\n".join(tp.markdown(head, table)))
    print(f"\nfp32 matmul peak {peak / 1e9:.0f} GFLOP/s (best of 2048 x 2048 matmuls, before and after the packs). "
          f"The recorded matmuls did {100 * median(lambda r: r['matmul_counted']):.1f}% (median) of the model's "
          "6 x Linear parameters x tokens (below 100%: the LM head runs on target positions only)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"peak": peak, "per_token": flops.per_token, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
