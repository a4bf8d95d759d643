"""Training throughput on CPU: zeropad's padding-free packs against padded batches (and TRL).

Run from the repository root (about 7 minutes on a busy two-core CPU machine, less on an idle one):

    python benchmarks/throughput.py                # all methods, ~40 s of timed steps each
    python benchmarks/throughput.py --seconds 20   # quicker, noisier
    python benchmarks/throughput.py --no-trl       # skip TRL even when it is installed
    python benchmarks/throughput.py --model 5m --max-tokens 8192 --runs 3   # issue 16's MFU goal, medians
    python benchmarks/throughput.py --model 5m --max-tokens 8192 --profile zeropad-compiled   # where a step goes

The same random Qwen3-architecture model (~32M parameters, or with --model 5m 5.2M: hidden 256, 4 layers,
tied embeddings; fp32, the same initial weights) is
trained on the same data, the 999 real Alpaca records in ../shared/data/alpaca_en_demo.json,
tokenized by zeropad's own data path (ChatML, assistant-only loss) with a byte-level BPE
tokenizer (8k vocab) trained here on those records, so nothing is downloaded. Methods:

  zeropad          plan_packs (best-fit-decreasing) into packs of at most --max-tokens real tokens
                   (default 2048, a fixed budget: about one padded batch's real tokens; on a
                   CPU, smaller packs run faster per token because activations stay in cache:
                   --max-tokens 4096 is ~25% slower per token here), collate,
                   attn_implementation="zeropad_varlen",
                   zeropad.train.step.train_step. No pad token enters the model.
  zeropad-compiled the same with train.compile (each decoder layer through torch.compile, inductor; only
                   when named in --methods: the compile takes minutes on a CPU, in the warm-up steps).
  padded           what the Hugging Face Trainer does by default: batches of --batch-size samples
                   in a seeded random order, right-padded to the longest in the batch, with an
                   attention_mask, labels -100 on pad and prompt, attn_implementation="sdpa"
                   (the fastest stock CPU attention), the model's own loss, the same optimizer.
  trl-padded       TRL's SFTTrainer, packing=False, per_device_train_batch_size=--batch-size.
  trl-packed       TRL's SFTTrainer, packing=True with its default strategy ("bfd", which turns on
                   padding_free): one packed row of up to --max-tokens tokens per step.

TRL is optional (`pip install trl`; it is not a zeropad dependency); when it cannot be imported
or run, the table says so and why. Both TRL runs get the same tokenized samples (input_ids and
labels), the same model weights, sdpa attention, AdamW with the same hyperparameters.

MFU: real tokens/s (median step) x the model's training FLOPs per real token (6 x every Linear's parameters,
LM head included, plus causal attention's two matmuls per document; pad positions count nothing) over this
CPU's fp32 matmul peak, measured in the same run before and after the methods (the best of 2048 x 2048
matmuls; the higher of the two). A VM's speed drifts with its neighbours' load within a run, so a second
figure takes each timed step's FLOP/s over the peak sampled right after it (the best of two such matmuls,
off the step's clock) and reports the median over steps. zeropad's own number is what `zeropad train` runs by default: the chunked
loss (memory.loss_chunk_tokens), per-document attention, AdamW.

The process keeps freed host memory for reuse (zeropad/train/host_alloc.py, as `zeropad train` on a CPU), which
every method here shares, TRL's included.

Each method runs --warmup untimed steps, then timed optimizer steps until --seconds have passed
(or exactly --steps when given). "real tokens" counts the tokens of the samples; "computed" the
token positions the model ran on (real + pad); fill = real / computed; "real tok/s" is real
tokens over the timed wall-clock seconds (data collation, forward, backward, clip, optimizer).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import os
import platform
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen3Config

import zeropad.model.attention  # noqa: F401  (registers attn_implementation="zeropad_varlen")
from zeropad.config import DataConfig, MemoryConfig, SourceConfig, TrainConfig
from zeropad.data.chat import ensure_chat_template
from zeropad.data.dataset import load_samples
from zeropad.model.compile import compile_layers
from zeropad.pack.collate import collate
from zeropad.pack.planner import plan_packs, shuffle_packs
from zeropad.train.metrics import FlopCounter
from zeropad.train.host_alloc import keep_freed_memory
from zeropad.train.step import StepSetup, train_step
from zeropad.train.optim import build_optimizer as zeropad_optimizer
from zeropad.train.optim import build_scheduler

ROOT = Path(__file__).resolve().parents[1]
ALPACA = ROOT.parent / "shared" / "data" / "alpaca_en_demo.json"

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN = "<|endoftext|>", "<|im_start|>", "<|im_end|>"  # ids 0, 1, 2
VOCAB_SIZE = 8192
MAX_SAMPLE_TOKENS = 1024  # per-sample truncation (overlong="truncate"); Alpaca samples are shorter
LR, BETAS, GRAD_CLIP, SEED = 1e-4, (0.9, 0.95), 1.0, 0
LOSS_CHUNK_TOKENS = MemoryConfig().loss_chunk_tokens  # zeropad's default loss: chunked (memory.chunked_loss: true)

_COMMON = dict(vocab_size=VOCAB_SIZE, max_position_embeddings=8192, use_cache=False, pad_token_id=0,
               bos_token_id=None, eos_token_id=2, head_dim=64)
# --model: "32m" (the default since the first benchmark), "5m" (issue 16's configuration, run with --max-tokens 8192)
MODEL_PRESETS = {
    "32m": dict(_COMMON, hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                intermediate_size=1408, tie_word_embeddings=False),
    "5m": dict(_COMMON, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=768, tie_word_embeddings=True),
}
MODEL_CONFIG = MODEL_PRESETS["32m"]  # main() sets the one --model names


METHODS = ("zeropad", "zeropad-compiled", "padded", "trl-padded", "trl-packed")


@dataclass
class Result:
    method: str
    steps: int = 0
    real_tokens: int = 0
    computed_tokens: int = 0
    seconds: float = 0.0
    note: str = ""
    data_seconds: list[float] = field(default_factory=list)  # per timed step: waiting for the batch (zeropad)
    step_seconds: list[float] = field(default_factory=list)
    step_tokens: list[int] = field(default_factory=list)  # real tokens of each timed step
    step_peaks: list[float] = field(default_factory=list)  # the matmul peak sampled right after each timed step

    @property
    def ok(self) -> bool:
        return self.steps > 0

    @property
    def fill(self) -> float:
        return self.real_tokens / self.computed_tokens

    @property
    def tokens_per_s(self) -> float:
        return self.real_tokens / self.seconds

    @property
    def median_tokens_per_s(self) -> float:
        """Mean real tokens per step over the median step time: robust to load spikes from other
        processes on a shared machine, which inflate a few steps of one method."""
        return self.real_tokens / self.steps / statistics.median(self.step_seconds)

    def median_step_mfu(self, per_token: float) -> float:
        """The median over steps of each step's model FLOP/s over the peak sampled right after it: on a machine
        whose speed drifts (a VM's neighbours), each step against what the CPU could do at that moment."""
        return statistics.median(n * per_token / (t * peak)
                                 for n, t, peak in zip(self.step_tokens, self.step_seconds, self.step_peaks))


@dataclass
class Flops:
    """Model FLOPs per real token and the machine's matmul peak: MFU = real tok/s x per_token / peak."""

    per_token: float
    matmul_params: int
    peak: float = 0.0  # FLOP/s
    threads: int = 1

    def mfu(self, tokens_per_s: float) -> float:
        return tokens_per_s * self.per_token / self.peak


def model_flops(model, lengths) -> Flops:
    """Training FLOPs (forward + backward = 3 x forward) per real token, counting only real tokens, as `zeropad train`
    counts them (train/metrics.py): 6 x the matmul parameters (every Linear: decoder layers and LM head; the
    embedding lookup is no matmul), plus causal attention."""
    counter = FlopCounter(model)
    return Flops(counter(lengths) / sum(lengths), counter.text_matmul_params)


def matmul_peak(threads: int, size: int = 2048, reps: int = 8, warmup: int = 2) -> float:
    """This CPU's fp32 matmul FLOP/s now: the best of `reps` size x size matmuls."""
    torch.set_num_threads(threads)
    a, b = _peak_operands(size)
    for _ in range(warmup):
        a @ b
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best


@functools.cache
def _peak_operands(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(size, size), torch.randn(size, size)


# ---------------------------------------------------------------- data and model (shared)


def build_tokenizer(records: list[dict]):
    """Byte-level BPE trained on the Alpaca texts, with ChatML special tokens; offline."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=[PAD_TOKEN, BOS_TOKEN, EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    texts = (r[key] for r in records for key in ("instruction", "input", "output") if r.get(key))
    tok.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD_TOKEN, eos_token=EOS_TOKEN, bos_token=None,
        model_max_length=MAX_SAMPLE_TOKENS, clean_up_tokenization_spaces=False,
    )
    ensure_chat_template(tokenizer, None)  # zeropad's default ChatML template
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 2), "MODEL_CONFIG names these ids"
    return tokenizer


def load_alpaca_samples(tokenizer, cache_dir: str):
    source = SourceConfig(path=str(ALPACA), format="alpaca")
    data_cfg = DataConfig(sources=[source], cache_dir=cache_dir, num_workers=0)
    samples, report = load_samples(
        [source], data_cfg, tokenizer, max_tokens=MAX_SAMPLE_TOKENS, overlong="truncate", seed=SEED
    )
    return samples, report


def build_model(attn_implementation: str, state_dict: dict | None = None):
    torch.manual_seed(SEED)
    config = Qwen3Config(**MODEL_CONFIG)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=attn_implementation)
    if state_dict is not None:
        model.load_state_dict(state_dict)
    model.train()
    return model


def build_optimizer(model, total_steps: int):
    cfg = TrainConfig(steps=max(1, total_steps), lr=LR, betas=BETAS, grad_clip=GRAD_CLIP, schedule="cosine")
    optimizer = zeropad_optimizer(model, cfg)
    return optimizer, build_scheduler(optimizer, cfg)


class Meter:
    """Per-method account: warm-up steps untimed, then timed steps until `seconds` (or `steps`) are reached."""

    def __init__(self, name: str, args):
        self.result = Result(name)
        self.warmup, self.seconds, self.steps = args.warmup, args.seconds, args.steps
        self.done = 0

    @property
    def warming_up(self) -> bool:
        return self.done < self.warmup

    def needs_more(self) -> bool:
        r = self.result
        if self.warming_up:
            return True
        return r.steps < self.steps if self.steps is not None else r.seconds < self.seconds

    def record(self, seconds: float, real: int, computed: int) -> None:
        if not self.warming_up:
            r = self.result
            r.steps, r.seconds = r.steps + 1, r.seconds + seconds
            r.step_seconds.append(seconds)
            r.step_tokens.append(real)
            r.step_peaks.append(matmul_peak(torch.get_num_threads(), reps=2, warmup=0))  # off the step's clock
            r.real_tokens, r.computed_tokens = r.real_tokens + real, r.computed_tokens + computed
        self.done += 1


class Stepper:
    """One training method driven step by step, so methods can be interleaved (see `interleave`)."""

    def __init__(self, name: str, args):
        self.meter = Meter(name, args)

    def train_one(self) -> tuple[int, int]:
        """One optimizer step; returns (real tokens, computed token positions)."""
        raise NotImplementedError

    def step(self) -> None:
        t0 = time.perf_counter()
        real, computed = self.train_one()
        self.meter.record(time.perf_counter() - t0, real, computed)


def interleave(steppers: list[Stepper]) -> None:
    """One step of every stepper that still needs one: methods share the machine's load equally."""
    for stepper in steppers:
        if stepper.meter.needs_more():
            stepper.step()


def _cycle(items):
    while True:
        yield from items


# ---------------------------------------------------------------- the methods


class ZeropadStepper(Stepper):
    def __init__(self, samples, state_dict, args, compiled: bool = False):
        super().__init__("zeropad-compiled" if compiled else "zeropad", args)
        self.samples = samples
        plan = shuffle_packs(plan_packs([len(s) for s in samples], args.max_tokens), SEED)
        self.model = build_model("zeropad_varlen", state_dict)
        if compiled:  # train.compile: each decoder layer (inductor); the compile falls in the warm-up steps
            compile_layers(self.model)
        self.optimizer, self.scheduler = build_optimizer(self.model, len(plan))
        self.packs = _cycle(plan)
        self.meter.result.note = (f"packs of <= {args.max_tokens} real tokens (BFD, {len(plan)} packs/epoch), "
                                  "zeropad_varlen (the CPU flash kernel per document), chunked loss (the default)"
                                  + (", train.compile" if compiled else ""))

    def train_one(self) -> tuple[int, int]:
        t0 = time.perf_counter()
        self.last_pack = next(self.packs)  # sample indices (mfu_ceiling.py reads the documents' lengths)
        pack = collate([self.samples[i] for i in self.last_pack])
        if not self.meter.warming_up:
            self.meter.result.data_seconds.append(time.perf_counter() - t0)
        train_step(StepSetup(self.model, self.optimizer, self.scheduler, grad_clip=GRAD_CLIP,
                             loss_chunk_tokens=LOSS_CHUNK_TOKENS), [pack])
        return pack.num_tokens, pack.num_tokens


def padded_batch(samples, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch as HF's DataCollatorWithPadding + label masking give it."""
    width = max(len(s) for s in samples)
    ids = np.full((len(samples), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(samples), width), dtype=np.int64)
    labels = np.full((len(samples), width), -100, dtype=np.int64)
    for row, s in enumerate(samples):
        n = len(s)
        ids[row, :n] = s.input_ids
        mask[row, :n] = 1
        labels[row, :n] = np.where(s.loss_mask, s.input_ids, -100)  # the model shifts labels itself
    return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask),
            "labels": torch.from_numpy(labels)}


class PaddedStepper(Stepper):
    def __init__(self, samples, state_dict, pad_id: int, args):
        super().__init__("padded", args)
        self.samples, self.pad_id = samples, pad_id
        order = np.random.default_rng(SEED).permutation(len(samples)).tolist()
        batches = [order[i : i + args.batch_size] for i in range(0, len(order), args.batch_size)]
        self.model = build_model("sdpa", state_dict)
        self.optimizer, self.scheduler = build_optimizer(self.model, len(batches))
        self.batches = _cycle(batches)
        self.meter.result.note = f"batches of {args.batch_size} samples, padded to the longest, sdpa"

    def train_one(self) -> tuple[int, int]:
        batch = padded_batch([self.samples[i] for i in next(self.batches)], self.pad_id)
        loss = self.model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), GRAD_CLIP)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return int(batch["attention_mask"].sum()), batch["input_ids"].numel()


def run_trl(samples, state_dict, tokenizer, packing: bool, args, work_dir: str, others: list[Stepper]) -> Result:
    """TRL's own SFTTrainer.train(); after each of its steps (off its clock) the other methods take one step."""
    name = "trl-packed" if packing else "trl-padded"
    try:
        import datasets
        import trl
        from datasets import Dataset
        from transformers import PrinterCallback, TrainerCallback
        from transformers.utils import logging as hf_logging
        from trl import SFTConfig, SFTTrainer
    except Exception as err:  # noqa: BLE001  (any import failure is reported, not hidden)
        return Result(name, note=f"TRL unavailable: {type(err).__name__}: {err}")
    datasets.disable_progress_bars()
    hf_logging.set_verbosity_error()

    meter = Meter(name, args)
    counts = {"real": 0, "computed": 0}

    def count_tokens(module, positional, kwargs):
        # Forward pre-hook on the backbone: every micro-batch the trainer runs passes through it.
        ids = kwargs.get("input_ids", positional[0] if positional else None)
        mask = kwargs.get("attention_mask")
        counts["computed"] += ids.numel()
        counts["real"] += int(mask.sum()) if mask is not None else ids.numel()

    class StepClock(TrainerCallback):
        # A step's time runs from the end of the previous one (after the interleaved steps of the
        # other methods), so it includes TRL's batch fetch and collation, as ours do.
        def on_train_begin(self, *a, **kw):
            self.mark = time.perf_counter()

        def on_step_end(self, _args, state, control, **kw):
            meter.record(time.perf_counter() - self.mark, counts["real"], counts["computed"])
            counts["real"] = counts["computed"] = 0
            interleave(others)
            if not meter.needs_more():
                control.should_training_stop = True
            self.mark = time.perf_counter()

    labels = [np.where(s.loss_mask, s.input_ids, -100).astype(np.int64).tolist() for s in samples]
    dataset = Dataset.from_dict({"input_ids": [s.input_ids.astype(np.int64).tolist() for s in samples],
                                 "labels": labels})
    with warnings.catch_warnings():  # transformers' own deprecation notices about TrainingArguments fields
        warnings.simplefilter("ignore", FutureWarning)
        config = SFTConfig(
            output_dir=f"{work_dir}/{name}", per_device_train_batch_size=1 if packing else args.batch_size,
            packing=packing, max_length=args.max_tokens if packing else MAX_SAMPLE_TOKENS,
            max_steps=1_000_000, learning_rate=LR, adam_beta1=BETAS[0], adam_beta2=BETAS[1], adam_epsilon=1e-8,
            weight_decay=0.0, max_grad_norm=GRAD_CLIP, lr_scheduler_type="cosine", warmup_steps=0,
            logging_steps=1_000_000, save_strategy="no", report_to="none", disable_tqdm=True,
            use_cpu=True, seed=SEED, dataloader_num_workers=0, bf16=False, fp16=False,
        )
    model = build_model("sdpa", state_dict)
    model.model.register_forward_pre_hook(count_tokens, with_kwargs=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                                 callbacks=[StepClock()])
        trainer.remove_callback(PrinterCallback)
        torch.set_num_threads(args.threads)  # the same thread count as the other methods
        trainer.train()
    except Exception as err:  # noqa: BLE001  (report why TRL could not run, do not fake a number)
        return Result(name, note=f"TRL {trl.__version__} failed: {type(err).__name__}: {err}")
    result = meter.result
    if packing:
        result.note = f"TRL {trl.__version__} SFTTrainer, packing=True, packing_strategy={config.packing_strategy} " \
                      f"(so padding_free): {len(trainer.train_dataset)} packed rows of <= {args.max_tokens}, " \
                      "1 row per step, sdpa (block-diagonal [T, T] mask from position_ids)"
    else:
        result.note = f"TRL {trl.__version__} SFTTrainer, packing=False, batches of {args.batch_size}, sdpa"
    return result


# ---------------------------------------------------------------- report


def markdown(head: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                           for i, (c, w) in enumerate(zip(cells, widths))) + " |"
    return [line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(row) for row in rows]


def table(results: list[Result], flops: Flops) -> str:
    base = next((r for r in results if r.method == "padded" and r.ok), None)
    trls = [r for r in results if r.ok and r.method.startswith("trl")]
    head = ("method", "steps", "real tokens", "computed", "fill", "seconds", "real tok/s", "vs padded",
            "median-step tok/s", "vs padded (median)", "MFU (median step)", "MFU (peak beside each step)")
    rows = []
    for r in results:
        if not r.ok:
            rows.append((r.method, *["-"] * (len(head) - 1)))
            continue
        ratio = f"{r.tokens_per_s / base.tokens_per_s:.2f}x" if base else "-"
        median_ratio = f"{r.median_tokens_per_s / base.median_tokens_per_s:.2f}x" if base else "-"
        rows.append((r.method, str(r.steps), f"{r.real_tokens:,}", f"{r.computed_tokens:,}", f"{100 * r.fill:.1f}%",
                     f"{r.seconds:.1f}", f"{r.tokens_per_s:,.0f}", ratio, f"{r.median_tokens_per_s:,.0f}",
                     median_ratio, f"{100 * flops.mfu(r.median_tokens_per_s):.1f}%",
                     f"{100 * r.median_step_mfu(flops.per_token):.1f}%"))
    out = markdown(head, rows)
    out.append(f"MFU: {flops.per_token / 1e6:.1f} MFLOP of matmul work per real token (6 x {flops.matmul_params / 1e6:.2f}M "
               f"matmul parameters + causal attention) over this CPU's fp32 matmul peak measured in the same run, "
               f"{flops.peak / 1e9:.1f} GFLOP/s (best of 2048 x 2048 matmuls, {flops.threads} threads, before and after); "
               f"beside each step: each step's FLOP/s over the best of two such matmuls right after it (median over steps; "
               f"sampled peaks {min(p for r in results for p in r.step_peaks) / 1e9:.0f}-"
               f"{max(p for r in results for p in r.step_peaks) / 1e9:.0f} GFLOP/s)")
    zp = next((r for r in results if r.method == "zeropad" and r.ok), None)
    out.append("")
    if zp and base:
        out.append(f"zeropad / padded: {zp.tokens_per_s / base.tokens_per_s:.2f}x overall, "
                   f"{zp.median_tokens_per_s / base.median_tokens_per_s:.2f}x by median step  (target >= 2.0x)")
    if zp and trls:
        best = max(trls, key=lambda r: r.tokens_per_s)
        best_median = max(trls, key=lambda r: r.median_tokens_per_s)
        out.append(f"zeropad / best TRL: {zp.tokens_per_s / best.tokens_per_s:.2f}x overall, "
                   f"{zp.median_tokens_per_s / best_median.median_tokens_per_s:.2f}x by median step  (target >= 1.2x)")
    for r in results:
        out.append(f"{r.method}: {r.note}")
        if r.ok and r.data_seconds:
            share = statistics.median(d / t for d, t in zip(r.data_seconds, r.step_seconds))
            out.append(f"  data (next pack + collate): median {statistics.median(r.data_seconds) * 1e3:.1f} ms, "
                       f"{100 * share:.3g}% of step time")
    out.append("seconds per timed step (a shared machine shows here as uneven steps):")
    for r in results:
        if r.ok:
            out.append(f"  {r.method}: {', '.join(f'{t:.1f}' for t in r.step_seconds)}")
    return "\n".join(out)


def run_once(samples, state_dict, tokenizer, methods: list[str], args, work_dir: str) -> list[Result]:
    """Every method once: warm-up, then timed steps, our methods interleaved (and between TRL's steps), so that
    a busy machine slows every method alike instead of whichever happened to run during the busy minute."""
    own: list[Stepper] = []
    if "zeropad" in methods:
        own.append(ZeropadStepper(samples, state_dict, args))
    if "zeropad-compiled" in methods:
        own.append(ZeropadStepper(samples, state_dict, args, compiled=True))
    if "padded" in methods:
        own.append(PaddedStepper(samples, state_dict, tokenizer.pad_token_id, args))
    for stepper in own:
        while stepper.meter.warming_up:
            stepper.step()
    trl_results = {}
    for method in ("trl-padded", "trl-packed"):
        if method in methods:
            trl_results[method] = run_trl(samples, state_dict, tokenizer, method == "trl-packed", args,
                                          work_dir, own)
            r = trl_results[method]
            print(f"  {method}: {f'{r.tokens_per_s:,.0f} real tok/s' if r.ok else r.note}", flush=True)
    while any(stepper.meter.needs_more() for stepper in own):
        interleave(own)
    by_name = {stepper.meter.result.method: stepper.meter.result for stepper in own} | trl_results
    return [by_name[m] for m in METHODS if m in by_name]


def profile_steps(samples, state_dict, args) -> None:
    """Where a step's time goes: torch.profiler's self CPU time by op over two steps, after the warm-up."""
    from torch.profiler import ProfilerActivity, profile

    stepper = ZeropadStepper(samples, state_dict, args, compiled=args.profile == "zeropad-compiled")
    while stepper.meter.warming_up:
        stepper.step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(2):
            stepper.train_one()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def summary(runs: list[tuple[list[Result], Flops]]) -> str:
    """Medians over the runs of each method's median-step tok/s, MFU, and ratios taken within each run."""
    head = ("method", "runs", "median-step tok/s", "MFU (run's peak)", "MFU (peak beside each step)", "vs padded",
            "vs best TRL")
    rows = []
    for method in [r.method for r in runs[0][0]]:
        tok, mfu, step_mfu, vs_padded, vs_trl = [], [], [], [], []
        for results, flops in runs:
            r = next(x for x in results if x.method == method)
            if not r.ok:
                continue
            tok.append(r.median_tokens_per_s)
            mfu.append(flops.mfu(r.median_tokens_per_s))
            step_mfu.append(r.median_step_mfu(flops.per_token))
            base = next((x for x in results if x.method == "padded" and x.ok), None)
            trls = [x.median_tokens_per_s for x in results if x.ok and x.method.startswith("trl")]
            if base:
                vs_padded.append(r.median_tokens_per_s / base.median_tokens_per_s)
            if trls:
                vs_trl.append(r.median_tokens_per_s / max(trls))
        med = lambda xs, fmt: fmt.format(statistics.median(xs)) if xs else "-"  # noqa: E731
        rows.append((method, str(len(tok)), med(tok, "{:,.0f}"), med([100 * m for m in mfu], "{:.1f}%"),
                     med([100 * m for m in step_mfu], "{:.1f}%"), med(vs_padded, "{:.2f}x"), med(vs_trl, "{:.2f}x")))
    return "\n".join(markdown(head, rows))


def main() -> None:
    global MODEL_CONFIG
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODEL_PRESETS), default="32m",
                        help="32m (hidden 512, 8 layers) or 5m (hidden 256, 4 layers, tied: issue 16's configuration)")
    parser.add_argument("--runs", type=int, default=1, help="repeat the whole comparison; medians are reported")
    parser.add_argument("--seconds", type=float, default=40.0, help="timed seconds per method")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per method (overrides --seconds)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per method")
    parser.add_argument("--max-tokens", type=int, default=2048, help="zeropad/TRL pack budget")
    parser.add_argument("--batch-size", type=int, default=8, help="samples per padded batch")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-trl", action="store_true", help="skip the TRL runs")
    parser.add_argument("--methods", default=",".join(m for m in METHODS if m != "zeropad-compiled"),
                        help=f"comma-separated subset of {', '.join(METHODS)}")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--profile", choices=["zeropad", "zeropad-compiled"], default=None,
                        help="instead of timing: torch.profiler's op table over two steps of this method")
    args = parser.parse_args()
    MODEL_CONFIG = MODEL_PRESETS[args.model]

    if not ALPACA.is_file():
        sys.exit(f"throughput.py: the Alpaca sample is missing: expected {ALPACA} "
                 "(the shared/data folder beside the repository root)")
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as `zeropad train` does on a CPU; every method here (TRL's too) shares this allocator
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.no_trl:
        methods = [m for m in methods if not m.startswith("trl")]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        sys.exit(f"throughput.py: unknown method(s) {unknown}; choose from {', '.join(METHODS)}")

    records = json.loads(ALPACA.read_text())
    t0 = time.perf_counter()
    tokenizer = build_tokenizer(records)
    runs: list[tuple[list[Result], Flops]] = []
    with tempfile.TemporaryDirectory(prefix="zeropad-throughput-") as work_dir:
        samples, report = load_alpaca_samples(tokenizer, f"{work_dir}/cache")
        lengths = np.array([len(s) for s in samples])
        reference = build_model("sdpa")
        num_params = sum(p.numel() for p in reference.parameters())
        flops = model_flops(reference, lengths)
        state_dict = {k: v.clone() for k, v in reference.state_dict().items()}
        del reference
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()} "
              f"{platform.processor() or ''}".rstrip())
        print(f"model: Qwen3 architecture ({args.model}), {num_params / 1e6:.1f}M parameters, fp32, "
              f"{flops.per_token / 1e6:.1f} MFLOP per real token; tokenizer: byte-level BPE "
              f"{len(tokenizer)} tokens (setup {time.perf_counter() - t0:.1f}s)")
        print(f"data: {ALPACA.name}: {report.summary()}; length mean {lengths.mean():.0f}, median {np.median(lengths):.0f}, max {lengths.max()}; "
              f"{sum(int(s.loss_mask.sum()) for s in samples):,} target tokens")
        order = np.random.default_rng(SEED).permutation(len(samples))
        padded_positions = sum(len(chunk) * lengths[chunk].max() for chunk in np.array_split(
            order, range(args.batch_size, len(order), args.batch_size)))
        print(f"over one epoch, batches of {args.batch_size} padded to the longest would be "
              f"{100 * lengths.sum() / padded_positions:.1f}% real tokens")
        print(f"timing: {args.runs} run(s); each {args.warmup} warm-up steps, then "
              f"{f'{args.steps} steps' if args.steps else f'~{args.seconds:.0f}s'} per method\n", flush=True)
        if args.profile:
            return profile_steps(samples, state_dict, args)
        for run in range(args.runs):
            load_before, peak_before = os.getloadavg()[0], matmul_peak(args.threads)
            results = run_once(samples, state_dict, tokenizer, methods, args, work_dir)
            peak = max(peak_before, matmul_peak(args.threads))  # the higher peak: the lower, safer MFU
            run_flops = Flops(flops.per_token, flops.matmul_params, peak, args.threads)
            runs.append((results, run_flops))
            print(f"\nrun {run + 1}/{args.runs}: load average (1 min) before {load_before:.2f}, after "
                  f"{os.getloadavg()[0]:.2f}; total {time.perf_counter() - t0:.0f}s")
            print(table(results, run_flops), flush=True)
    if args.runs > 1:
        print(f"\nmedians over {args.runs} runs (MFU against each run's own peak; ratios within each run):")
        print(summary(runs))
    if args.json:
        args.json.write_text(json.dumps([[{**r.__dict__, "tokens_per_s": r.tokens_per_s if r.ok else None,
                                           "mfu": f.mfu(r.median_tokens_per_s) if r.ok else None}
                                          for r in results] for results, f in runs], indent=2))


if __name__ == "__main__":
    main()
