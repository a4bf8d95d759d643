"""DPO training throughput on CPU: zeropad's packed pairs against padded per-pair batches.

Run from the repository root (a few minutes on a busy two-core machine):

    python benchmarks/preference.py                 # ~30 s of timed steps per method, interleaved
    python benchmarks/preference.py --seconds 60    # steadier

Data: preference pairs built from the 999 real Alpaca records in ../shared/data/alpaca_en_demo.json:
the prompt is a record's instruction (and input), the chosen answer its output, the rejected answer the
output of another record (seeded), so the lengths are real answer lengths. Tokenized by zeropad's own
preference path (ChatML, answer-only targets) with benchmarks/throughput.py's offline BPE tokenizer; pairs
over --max-tokens are skipped. The same random Qwen3-architecture model (benchmarks/throughput.py's, 32M
parameters, fp32, the same initial weights), the same AdamW; reference log-probs are computed once before timing for both methods
(TRL's precompute_ref_log_probs), so the timed steps are the policy's forward, backward and update.

  zeropad   pairs planned as units of their total length into packs of at most --max-tokens real tokens,
            collate_pairs, attn_implementation="zeropad_varlen", train_step with train.objective dpo.
  padded    what TRL's DPOTrainer does without padding_free: batches of --batch-size pairs, the chosen and
            rejected sequences concatenated into one batch of 2 x batch-size rows right-padded to the
            longest, an attention_mask, sdpa attention, masked per-sequence log-prob sums, the same loss.

TRL itself is not installed here (it is not a zeropad dependency), so the padded baseline is written out
above instead of run from TRL. "pairs/s" is pairs over the timed wall-clock seconds; "fill" real tokens
over the token positions the model ran on.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, Qwen3Config

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import ALPACA, MODEL_CONFIG, build_tokenizer  # noqa: E402  (the SFT benchmark's 32M model)

import zeropad.model.attention  # noqa: E402,F401  (registers zeropad_varlen)
from zeropad.config import DataConfig, SourceConfig, TrainConfig  # noqa: E402
from zeropad.data.preference import load_pairs  # noqa: E402
from zeropad.pack.planner import plan_packs, shuffle_packs  # noqa: E402
from zeropad.train.step import StepSetup, train_step  # noqa: E402
from zeropad.train.optim import build_optimizer, build_scheduler  # noqa: E402
from zeropad.train.preference import PreferenceObjective, collate_pairs, compute_reference  # noqa: E402

SEED, BETA = 0, 0.1


def make_pairs(tokenizer, max_tokens: int, work: str):
    records = json.loads(ALPACA.read_text())
    rng = np.random.default_rng(SEED)
    other = rng.permutation(len(records))
    rows = [{"prompt": "\n".join(p for p in (r["instruction"], r.get("input", "")) if p), "chosen": r["output"],
             "rejected": records[j]["output"]} for r, j in zip(records, other) if r["output"] != records[j]["output"]]
    path = Path(work) / "pairs.json"
    path.write_text(json.dumps(rows))
    cfg = DataConfig(on_bad_sample="skip", num_workers=0)
    return load_pairs([SourceConfig(path=str(path))], cfg, tokenizer, max_tokens=max_tokens, seed=SEED)


def build_model(attn: str, state: dict | None = None):
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(Qwen3Config(**MODEL_CONFIG), dtype=torch.float32, attn_implementation=attn)
    if state is not None:
        model.load_state_dict(state)
    return model.train()


def optimizer_for(model):
    cfg = TrainConfig(steps=10_000, lr=1e-4, grad_clip=1.0)
    optimizer = build_optimizer(model, cfg)
    return optimizer, build_scheduler(optimizer, cfg)


def padded_step(model, optimizer, scheduler, pairs) -> int:
    """One DPO step on a padded batch: chosen rows then rejected rows; returns the token positions computed."""
    docs = [pair.chosen for pair in pairs] + [pair.rejected for pair in pairs]
    width = max(len(d) for d in docs)
    ids = torch.zeros(len(docs), width, dtype=torch.long)
    mask = torch.zeros(len(docs), width, dtype=torch.long)
    loss_mask = torch.zeros(len(docs), width, dtype=torch.bool)
    for row, doc in enumerate(docs):
        ids[row, :len(doc)] = torch.as_tensor(np.asarray(doc.input_ids, dtype=np.int64))
        mask[row, :len(doc)] = 1
        loss_mask[row, :len(doc)] = torch.as_tensor(doc.loss_mask)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    logp = torch.gather(logits.log_softmax(-1), 2, ids[:, 1:, None])[..., 0]
    seq_logp = (logp * loss_mask[:, 1:]).sum(-1)
    ref = torch.tensor([p.ref_logps[0] for p in pairs] + [p.ref_logps[1] for p in pairs])
    n = len(pairs)
    z = BETA * ((seq_logp[:n] - ref[:n]) - (seq_logp[n:] - ref[n:]))
    (-F.logsigmoid(z)).mean().backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return ids.numel()


class Timed:
    """One method's timed steps; `interleave` runs the methods step by step, so load spikes hit all of them."""

    def __init__(self, name: str, step_fn, batches, warmup: int):
        self.name, self.step_fn, self.batches, self.warmup = name, step_fn, batches, warmup
        self.steps = self.pairs = self.tokens = self.computed = 0
        self.elapsed = 0.0

    def step(self) -> None:
        batch = next(self.batches)
        t0 = time.perf_counter()
        positions = self.step_fn(batch)
        dt = time.perf_counter() - t0
        if self.warmup > 0:
            self.warmup -= 1
            return
        self.elapsed += dt
        self.steps += 1
        self.pairs += len(batch)
        self.tokens += sum(len(p) for p in batch)
        self.computed += positions


def interleave(methods: list[Timed], seconds: float) -> None:
    while any(m.warmup > 0 or m.elapsed < seconds for m in methods):
        min(methods, key=lambda m: (m.warmup <= 0, m.elapsed)).step()  # the one furthest behind goes next


def cycle(items):
    while True:
        yield from items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=4, help="pairs per padded batch")
    parser.add_argument("--pairs", type=int, default=200, help="pairs used (the first of the seeded data)")
    args = parser.parse_args()
    if not ALPACA.is_file():
        sys.exit(f"needs {ALPACA} (the shared sample data)")
    torch.manual_seed(SEED)
    records = json.loads(ALPACA.read_text())
    tokenizer = build_tokenizer(records)
    with tempfile.TemporaryDirectory() as work:
        pairs, report = make_pairs(tokenizer, args.max_tokens, work)
    pairs = pairs[:args.pairs]
    print(f"data: {report.summary()}; {len(pairs)} pairs used, {sum(map(len, pairs)):,} tokens")

    packed = build_model("zeropad_varlen")
    state = {k: v.clone() for k, v in packed.state_dict().items()}
    logps = compute_reference(packed, pairs, args.max_tokens, SEED, torch.device("cpu"),
                              torch.autocast("cpu", enabled=False))
    for pair, (chosen, rejected) in zip(pairs, logps.tolist()):
        pair.ref_logps = (chosen, rejected)

    optimizer, scheduler = optimizer_for(packed)
    setup = StepSetup(packed, optimizer, scheduler, grad_clip=1.0, objective=PreferenceObjective("dpo", BETA))
    plan = shuffle_packs(plan_packs([len(p) for p in pairs], args.max_tokens, seed=SEED), SEED)
    packs = [[pairs[i] for i in pack] for pack in plan]

    def zeropad_step(batch):
        pack = collate_pairs(batch)
        train_step(setup, [pack])
        return pack.num_tokens

    padded = build_model("sdpa", state)
    popt, psched = optimizer_for(padded)
    order = np.random.default_rng(SEED).permutation(len(pairs))
    batches = [[pairs[i] for i in order[s:s + args.batch_size]] for s in range(0, len(pairs), args.batch_size)]

    methods = [Timed("zeropad (packed pairs)", zeropad_step, cycle(packs), args.warmup),
               Timed(f"padded, {args.batch_size} pairs/batch", lambda b: padded_step(padded, popt, psched, b),
                     cycle(batches), args.warmup)]
    interleave(methods, args.seconds)
    print(f"\n{platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, max_tokens {args.max_tokens}")
    print(f"{'method':<26} {'steps':>6} {'pairs':>6} {'pairs/s':>8} {'real tok/s':>11} {'fill':>6}")
    for m in methods:
        print(f"{m.name:<26} {m.steps:>6} {m.pairs:>6} {m.pairs / m.elapsed:>8.2f} {m.tokens / m.elapsed:>11,.0f} "
              f"{m.tokens / m.computed:>6.1%}")
    ratio = (methods[0].pairs / methods[0].elapsed) / (methods[1].pairs / methods[1].elapsed)
    print(f"\nzeropad / padded pairs/s: {ratio:.2f}x")


if __name__ == "__main__":
    main()
