"""VLM training throughput: zeropad's packed image conversations against padded batches.

Run from the repository root (2-5 minutes on a shared two-core CPU machine, depending on its load):

    python benchmarks/vlm_throughput.py                       # CPU, fp32, 200 records, 0.3 epochs each
    python benchmarks/vlm_throughput.py --epochs 0.15         # quicker, noisier
    python benchmarks/vlm_throughput.py --device cuda --dtype bf16 --epochs 2 --records 2000
    python benchmarks/vlm_throughput.py --device cuda --dtype bf16 --model 3b --max-tokens 16384 --batch-sizes "" \
        --records 1000 --steps 8 --warmup 2      # issue 16's VLM figure: Qwen2.5-VL-3B shape, zeropad alone

Data: --records image conversations written to a temp dir. The 6 real conversations of
../shared/data/mllm_demo.json (with its 3 JPEGs) come first; the rest are generated: 0-3 images
each (15/45/25/15%), every image a JPEG of its own with sides drawn from 64-448 px (one in five
one of the real demo JPEGs instead), the question and answer an Alpaca instruction and response
(../shared/data/alpaca_en_demo.json; synthetic words when it is absent), a second turn from another
Alpaca record in a third of them. Tokenizer: throughput.py's byte-level BPE (8k vocab) trained on
those texts, plus Qwen-VL's four vision tokens. Everything is loaded by zeropad's own data path
(load_vision_samples: exact lengths from image headers; samples over the budget are dropped, for
every method alike) and both methods train on exactly those samples.

Model: a random Qwen2.5-VL from a config (--model small, 15.6M parameters: text hidden 384, 6 layers, 6 heads,
2 KV heads, vocab 8196, untied; vision depth 4, hidden 128; or --model 3b, Qwen2.5-VL-3B's shape, 3.75B: text
hidden 2048, 36 layers, vocab 151,936, tied; vision depth 32, hidden 1280), the same initial weights and AdamW
for every method. The vision tower is small against the language model, as in real VLMs.

  zeropad     plan_packs (best-fit, seeded) at --max-tokens real tokens, the MultimodalCollator (decode
              the images, image processor, expand, mRoPE positions per document), text attention
              zeropad_varlen, vision sdpa; one optimizer step per pack: zeropad.train.step.train_step
              (summed CE / targets, backward, clip, AdamW).
  padded-B    what a stock trainer does: B records per step in a seeded random order, each turned into
              a document by the same code, right-padded to the longest in the batch with an
              attention_mask, labels -100 on pad and prompt, mm_token_type_ids, the batch's images
              concatenated; sdpa for text and vision; the model's own loss (mean over targets).

Before timing, the first padded batch's records go through both methods at the shared initial
weights; their mean token losses must agree (1e-4 relative, 2e-2 under bf16), or the run stops:
a method fed wrongly (labels, positions, masks, attention backend) would time a different model.

Timing: --warmup untimed steps per method, then timed steps until each method has trained on
--epochs epochs' worth of real tokens (the same amount for all; or exactly --steps). Methods are
interleaved by progress (the one furthest behind in its share of that work steps next), so a load
spike from other processes falls on the same share of every method's work. A step's time covers
data (image decoding, processor, collation), forward, backward, clip and the optimizer. "real
tok/s" is real tokens over timed seconds; MFU is the model FLOPs of the real tokens and images (zeropad's own
count, train/metrics.py: the language model per real token, the vision tower per patch) over the timed seconds
and the peak (a GPU's dense bf16 datasheet figure; a CPU's best 2048 x 2048 fp32 matmul, before and after); "median-step tok/s" is mean real tokens per step over the
median step time (robust to other processes' spikes; for padded batches, whose step times are
right-skewed by the batches holding a long record, it favours the baseline). The vision tower sees
the same images unpadded in every method: only the language model's tokens are padded.

Threads: one by default. On a two-core machine shared with other jobs, two torch threads wait at
every op's barrier for a sibling the scheduler has parked, so a step's time follows its number of
ops rather than its work: measured 2026-11-22 at load ~3, two threads ran 3-7x slower than one and
turned zeropad / padded from 1.8-1.9x into 0.65-0.8x (packs run more, smaller ops: per-document
attention). Use --threads 2 (or more) on a machine of your own.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from transformers import AutoModelForImageTextToText, Qwen2_5_VLConfig

# throughput.py (beside this file) holds the text benchmark's tokenizer, optimizer and step timing.
from throughput import (ALPACA, GRAD_CLIP, SEED, Meter, Result, Stepper, build_optimizer, build_tokenizer,
                        matmul_peak)

import zeropad.model.attention  # noqa: F401  (registers attn_implementation="zeropad_varlen")
from zeropad.config import build_config
from zeropad.data.dataset import SampleReport
from zeropad.data.multimodal import MultimodalCollator, load_image_processor, load_vision_samples
from zeropad.data.vision import IMAGE_PLACEHOLDER, to_vision_doc
from zeropad.demo.tokenizer import IMAGE_PAD_TOKEN, VIDEO_PAD_TOKEN, VISION_END_TOKEN, VISION_START_TOKEN
from zeropad.data.chat import Sample
from zeropad.model.vlm import check_attn_implementation, mm_token_type_ids, packed_attn_implementation, position_rule
from zeropad.pack.collate import collate
from zeropad.pack.planner import pack_stats, plan_packs, shuffle_packs
from zeropad.train.metrics import FlopCounter, media_grids, peak_tflops
from zeropad.train.step import StepSetup, train_step
from zeropad.train.loss import lm_loss_sum

MLLM_DEMO = ALPACA.parent / "mllm_demo.json"
IMAGES_PER_RECORD_P = (0.15, 0.45, 0.25, 0.15)  # 0, 1, 2, 3 images
IMAGE_SIDES = (64, 448)  # px, each side drawn independently
REAL_IMAGE_P = 0.2  # share of generated records' images that are copies of the real demo JPEGs
SECOND_TURN_P = 1 / 3

SMALL_TEXT = dict(hidden_size=384, intermediate_size=768, num_hidden_layers=6, num_attention_heads=6,
                   num_key_value_heads=2, max_position_embeddings=8192, tie_word_embeddings=False,
                   use_cache=False, rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                                         mrope_section=[8, 12, 12]))  # head_dim 64: 2 x 32
# A small tower against the language model, as in real VLMs: per visual token (4 patches) it costs ~40% of
# the language model's compute, as Qwen2.5-VL-7B's does (4 patches x 0.67B against 7B).
SMALL_VISION = dict(depth=4, hidden_size=128, intermediate_size=512, num_heads=2, patch_size=14,
                     spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[1, 3],
                     out_hidden_size=384)
# Qwen2.5-VL-3B-Instruct's config.json (the vocabulary is the shape's; the benchmark's tokenizer uses its first 8k ids)
QWEN2_5_VL_3B_TEXT = dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                          num_key_value_heads=2, max_position_embeddings=128000, vocab_size=151936,
                          tie_word_embeddings=True, use_cache=False,
                          rope_parameters=dict(rope_type="default", rope_theta=1000000.0, mrope_section=[16, 24, 24]))
QWEN2_5_VL_3B_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
                            spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                            fullatt_block_indexes=[7, 15, 23, 31], out_hidden_size=2048)
MODELS = {"small": (SMALL_TEXT, SMALL_VISION), "3b": (QWEN2_5_VL_3B_TEXT, QWEN2_5_VL_3B_VISION)}


# ---------------------------------------------------------------- data


def text_pairs(rng: np.random.Generator) -> list[tuple[str, str]]:
    """(question, answer) pairs: Alpaca's instructions and responses, or synthetic ones of lognormal length."""
    if ALPACA.is_file():
        return [((r["instruction"] + ("\n" + r["input"] if r.get("input") else "")), r["output"])
                for r in json.loads(ALPACA.read_text()) if r["output"]]
    words = "the a image shows of on in with and colour left right near large small red blue people".split()
    sentence = lambda n: " ".join(rng.choice(words, size=max(1, n))).capitalize() + "."  # noqa: E731
    return [(sentence(int(rng.integers(4, 30))), sentence(int(rng.lognormal(4.5, 1.0)))) for _ in range(1000)]


def generated_image(rng: np.random.Generator, path: Path) -> None:
    """A JPEG of random size with a gradient and a few shapes: decodes like a photo, compresses small."""
    width, height = (int(x) for x in rng.integers(IMAGE_SIDES[0], IMAGE_SIDES[1] + 1, size=2))
    ramp = np.linspace(0, 255, width, dtype=np.float32)[None, :, None] * rng.random(3, dtype=np.float32)
    image = Image.fromarray(np.broadcast_to(ramp, (height, width, 3)).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        x0, y0 = int(rng.integers(width)), int(rng.integers(height))
        box = (x0, y0, x0 + int(rng.integers(8, width // 2 + 9)), y0 + int(rng.integers(8, height // 2 + 9)))
        draw.rectangle(box, fill=tuple(int(c) for c in rng.integers(0, 256, size=3)))
    image.save(path, quality=90)


def make_records(num_records: int, pairs: list[tuple[str, str]], image_dir: Path,
                 rng: np.random.Generator) -> list[dict]:
    """The real demo conversations, then generated ones, in LLaMA-Factory's messages + images shape."""
    records, real_images = [], []
    if MLLM_DEMO.is_file():
        for record in json.loads(MLLM_DEMO.read_text()):
            records.append({"messages": record["messages"],
                            "images": [str(MLLM_DEMO.parent / ref) for ref in record["images"]]})
        real_images = sorted(str(p) for p in (MLLM_DEMO.parent / "mllm_demo_data").glob("*.jpg"))
    while len(records) < num_records:
        images = []
        for _ in range(rng.choice(len(IMAGES_PER_RECORD_P), p=IMAGES_PER_RECORD_P)):
            if real_images and rng.random() < REAL_IMAGE_P:
                images.append(real_images[rng.integers(len(real_images))])
                continue
            path = image_dir / f"{len(records)}_{len(images)}.jpg"
            generated_image(rng, path)
            images.append(str(path))
        question, answer = pairs[rng.integers(len(pairs))]
        messages = [{"role": "user", "content": IMAGE_PLACEHOLDER * len(images) + question},
                    {"role": "assistant", "content": answer}]
        if rng.random() < SECOND_TURN_P:
            question, answer = pairs[rng.integers(len(pairs))]
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        records.append({"messages": messages, "images": images})
    return records[:num_records]


def build_vlm_tokenizer(pairs: list[tuple[str, str]]):
    tokenizer = build_tokenizer([{"instruction": q, "output": a} for q, a in pairs])
    tokenizer.add_special_tokens({"additional_special_tokens": [VISION_START_TOKEN, VISION_END_TOKEN,
                                                                IMAGE_PAD_TOKEN, VIDEO_PAD_TOKEN]})
    return tokenizer


# ---------------------------------------------------------------- model


def model_config(tokenizer, model: str = "small") -> Qwen2_5_VLConfig:
    token = tokenizer.convert_tokens_to_ids
    text, vision = MODELS[model]
    return Qwen2_5_VLConfig(
        text_config=dict(text, vocab_size=max(len(tokenizer), text.get("vocab_size", 0)),
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None, eos_token_id=tokenizer.eos_token_id),
        vision_config=vision, image_token_id=token(IMAGE_PAD_TOKEN), video_token_id=token(VIDEO_PAD_TOKEN),
        vision_start_token_id=token(VISION_START_TOKEN), vision_end_token_id=token(VISION_END_TOKEN),
        tie_word_embeddings=text["tie_word_embeddings"],
    )


def build_model(config, attn_implementation, device: torch.device, state_dict: dict | None = None):
    torch.manual_seed(SEED)
    # A copy each: the model keeps its config object and reads the attention backend from it at every call,
    # so a shared config would give every model the backend of the last one built.
    with device:  # a 3B model is drawn where it trains
        model = AutoModelForImageTextToText.from_config(copy.deepcopy(config), dtype=torch.float32,
                                                        attn_implementation=attn_implementation)
    if state_dict is not None:
        model.load_state_dict(state_dict)
    return model.train()


# ---------------------------------------------------------------- the methods


class QuotaMeter(Meter):
    """Timed steps until `quota` real tokens (the same for every method), or exactly `steps` when given; the
    timed steps' model FLOPs."""

    def __init__(self, name: str, args, quota: int):
        super().__init__(name, args)
        self.quota = quota
        self.flops = 0.0

    def record(self, seconds: float, real: int, computed: int, flops: float = 0.0) -> None:
        if not self.warming_up:
            self.flops += flops
        super().record(seconds, real, computed)

    def needs_more(self) -> bool:
        if self.warming_up:
            return True
        r = self.result
        return r.steps < self.steps if self.steps is not None else r.real_tokens < self.quota

    @property
    def progress(self) -> float:
        """Share of the timed work done."""
        r = self.result
        return r.steps / self.steps if self.steps is not None else r.real_tokens / self.quota


class VLMStepper(Stepper):
    def __init__(self, name: str, args, quota: int, counter: FlopCounter):
        super().__init__(name, args)
        self.meter = QuotaMeter(name, args, quota)
        self.counter = counter
        self.device = torch.device(args.device)
        self.autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if args.dtype == "bf16"
                         else contextlib.nullcontext())

    def step(self) -> None:
        t0 = time.perf_counter()
        real, computed, lengths, grids = self.train_one()
        if self.device.type == "cuda":  # the step's kernels are done before its time is read
            torch.cuda.synchronize()
        self.meter.record(time.perf_counter() - t0, real, computed, self.counter(lengths, grids))


def _cycle(items):
    while True:
        yield from items


class ZeropadStepper(VLMStepper):
    def __init__(self, samples, config, state_dict, processor, args, quota: int, counter: FlopCounter):
        super().__init__("zeropad", args, quota, counter)
        self.samples = samples
        plan = shuffle_packs(plan_packs([len(s) for s in samples], args.max_tokens, seed=SEED), SEED)
        self.model = build_model(config, packed_attn_implementation("sdpa"), self.device, state_dict)
        self.optimizer, self.scheduler = build_optimizer(self.model, len(plan))
        self.collate = MultimodalCollator(self.model.config, position_rule(self.model), processor, "error",
                                          SampleReport())  # "error": never counts
        self.packs = _cycle(plan)
        fill = pack_stats([len(s) for s in samples], plan, args.max_tokens).utilization
        self.meter.result.note = (f"packs of <= {args.max_tokens} real tokens ({len(plan)} packs/epoch, budget fill "
                                  f"{100 * fill:.1f}%), text zeropad_varlen, vision sdpa")

    def train_one(self) -> tuple[int, int, list[int], list]:
        check_attn_implementation(self.model)  # text zeropad_varlen, vision a stock backend
        pack = self.collate([self.samples[i] for i in next(self.packs)])
        grids = media_grids(pack.media)  # on the host
        pack = pack.to(self.device)
        tokens = int(pack.input_ids.numel())
        train_step(StepSetup(self.model, self.optimizer, self.scheduler, self.autocast, GRAD_CLIP), [pack],
                   num_tokens=tokens)
        return tokens, tokens, pack.doc_lengths, grids


def padded_vlm_batch(docs: list[Sample], pad_id: int, config) -> dict[str, torch.Tensor]:
    """Right-padded batch with attention_mask, HF labels (the model shifts them), mm_token_type_ids for its
    mRoPE, and the batch's images concatenated in row order."""
    width = max(len(d) for d in docs)
    input_ids = torch.full((len(docs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(docs), width), dtype=torch.long)
    labels = torch.full((len(docs), width), -100, dtype=torch.long)
    for row, doc in enumerate(docs):
        n = len(doc)
        ids, mask = torch.as_tensor(doc.input_ids), torch.as_tensor(doc.loss_mask)
        input_ids[row, :n] = ids
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.where(mask, ids, -100)
    batch = dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                 mm_token_type_ids=mm_token_type_ids(input_ids, config))
    with_images = [d for d in docs if "image_grid_thw" in d.media]
    if with_images:
        batch.update(pixel_values=torch.cat([d.media["pixel_values"] for d in with_images]),
                     image_grid_thw=torch.cat([d.media["image_grid_thw"] for d in with_images]))
    return batch


def padded_batches(num_samples: int, batch_size: int) -> list[list[int]]:
    order = np.random.default_rng(SEED).permutation(num_samples).tolist()
    return [order[i:i + batch_size] for i in range(0, num_samples, batch_size)]


class PaddedStepper(VLMStepper):
    def __init__(self, samples, config, state_dict, processor, pad_id: int, batch_size: int, args, quota: int,
                 counter: FlopCounter):
        super().__init__(f"padded-{batch_size}", args, quota, counter)
        self.samples, self.processor, self.pad_id = samples, processor, pad_id
        self.epoch = padded_batches(len(samples), batch_size)
        self.model = build_model(config, "sdpa", self.device, state_dict)
        self.optimizer, self.scheduler = build_optimizer(self.model, len(self.epoch))
        self.batches = _cycle(self.epoch)
        self.meter.result.note = f"batches of {batch_size} records in random order, padded to the longest, sdpa"

    def docs(self, indices: list[int]) -> list[Sample]:
        return [to_vision_doc(s.conversation, self.processor, self.model.config, file=s.file, record_no=s.record_no)
                for s in (self.samples[i] for i in indices)]

    def batch(self, docs: list[Sample]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device) for k, v in padded_vlm_batch(docs, self.pad_id, self.model.config).items()}

    def train_one(self) -> tuple[int, int, list[int], list]:
        docs = self.docs(next(self.batches))
        batch = self.batch(docs)
        with self.autocast:
            loss = self.model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), GRAD_CLIP)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss.item()  # as a trainer logging its loss would
        return (int(batch["attention_mask"].sum()), batch["input_ids"].numel(), [len(d) for d in docs],
                [g for d in docs for g in media_grids(d.media)])


@torch.no_grad()
def check_same_loss(packed: ZeropadStepper, padded: PaddedStepper) -> str:
    """The mean token loss of the baseline's first batch, padded and packed, at the shared initial weights:
    equal unless one method feeds the model wrongly (labels, positions, masks, attention backend)."""
    docs = padded.docs(padded.epoch[0])
    with padded.autocast:
        padded_loss = padded.model(**padded.batch(docs)).loss.item()
        pack = collate(docs, position_rule(packed.model)).to(packed.device)
        packed_loss = (lm_loss_sum(packed.model, pack.model_inputs(), pack.target_ids[0]) / pack.num_targets).item()
    difference = abs(packed_loss - padded_loss) / abs(padded_loss)
    if difference > (1e-4 if isinstance(packed.autocast, contextlib.nullcontext) else 2e-2):
        raise SystemExit(f"vlm_throughput.py: the methods compute different losses on the same records "
                         f"(packed {packed_loss:.6f}, padded {padded_loss:.6f}): one of them is set up wrongly")
    return f"{len(docs)} records: packed loss {packed_loss:.6f}, padded {padded_loss:.6f} (relative {difference:.1e})"


# ---------------------------------------------------------------- report


def median_tokens_per_s(r: Result) -> float:
    return r.real_tokens / r.steps / statistics.median(r.step_seconds)


def table(results: list[Result], flops: list[float], peak: float) -> str:
    """`flops`: each method's timed model FLOPs; `peak`: FLOP/s."""
    zp = results[0]
    head = ("method", "steps", "real tokens", "computed", "fill", "seconds", "real tok/s", "median-step tok/s",
            "zeropad / this", "zeropad / this, median", "MFU")
    rows = [(r.method, str(r.steps), f"{r.real_tokens:,}", f"{r.computed_tokens:,}", f"{100 * r.fill:.1f}%",
             f"{r.seconds:.1f}", f"{r.tokens_per_s:,.0f}", f"{median_tokens_per_s(r):,.0f}",
             f"{zp.tokens_per_s / r.tokens_per_s:.2f}x", f"{median_tokens_per_s(zp) / median_tokens_per_s(r):.2f}x",
             f"{100 * f / r.seconds / peak:.1f}%") for r, f in zip(results, flops)]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                           for i, (c, w) in enumerate(zip(cells, widths))) + " |"
    out = [line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(row) for row in rows]
    out += [""] + [f"{r.method}: {r.note}" for r in results]
    out.append("seconds per timed step (a shared machine shows here as uneven steps):")
    out += [f"  {r.method}: {', '.join(f'{t:.1f}' for t in r.step_seconds)}" for r in results]
    return "\n".join(out)


def epoch_padding(lengths: np.ndarray, batch_size: int) -> float:
    """Pad share of the token positions of one epoch of padded batches (the order the baseline uses)."""
    positions = sum(len(b) * lengths[b].max() for b in padded_batches(len(lengths), batch_size))
    return 1 - lengths.sum() / positions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=200, help="image conversations in the data")
    parser.add_argument("--epochs", type=float, default=0.3, help="timed epochs' worth of real tokens per method")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per method (overrides --epochs)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per method")
    parser.add_argument("--max-tokens", type=int, default=2048, help="zeropad's pack budget (real tokens)")
    parser.add_argument("--batch-sizes", default="4,8",
                        help='records per padded batch, one baseline each; "" for zeropad alone (no loss check)')
    parser.add_argument("--model", default="small", choices=sorted(MODELS), help="small (15.6M) or 3b (Qwen2.5-VL-3B)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="bf16: autocast, fp32 weights")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (see the module docstring)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    args.seconds = None  # throughput.Meter's time limit: unused, QuotaMeter stops on tokens or steps
    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    if batch_sizes and min(batch_sizes) < 1:
        parser.error(f"--batch-sizes takes positive batch sizes, got {args.batch_sizes!r}")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    rng = np.random.default_rng(SEED)
    pairs = text_pairs(rng)
    tokenizer = build_vlm_tokenizer(pairs)
    with tempfile.TemporaryDirectory(prefix="zeropad-vlm-throughput-") as work_dir:
        work = Path(work_dir)
        records = make_records(args.records, pairs, work, rng)
        data_file = work / "data.json"
        data_file.write_text(json.dumps(records))
        cfg = build_config({"data": {"sources": [{"path": str(data_file), "format": "messages"}], "num_workers": 0},
                            "pack": {"max_tokens": args.max_tokens}, "train": {"seed": SEED}})
        config = model_config(tokenizer, args.model)
        processor = load_image_processor(cfg, config)
        samples, report = load_vision_samples(cfg, cfg.data.sources, tokenizer, processor, config)
        lengths = np.array([len(s) for s in samples])
        num_images = sum(len(s.conversation.image_paths) for s in samples)
        image_tokens = int(lengths.sum()) - sum(len(s.conversation.sample) - len(s.conversation.image_paths)
                                                for s in samples)

        device = torch.device(args.device)
        # FLOP/s: a GPU's datasheet bf16 peak (nan for one not in the table), a CPU's measured fp32 matmul peak
        peak = (peak_tflops(device, None) or math.nan) * 1e12 if device.type == "cuda" else matmul_peak(args.threads)
        reference = build_model(config, "sdpa", device)
        num_params = sum(p.numel() for p in reference.parameters())
        vision_params = sum(p.numel() for p in reference.model.visual.parameters())
        counter = FlopCounter(reference)
        # every method starts from the same weights (one method alone: none to copy)
        state_dict = {k: v.clone() for k, v in reference.state_dict().items()} if batch_sizes else None
        del reference
        quota = int(args.epochs * lengths.sum())
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()} "
              f"{platform.processor() or ''}, device {args.device}, {args.dtype}".rstrip())
        print(f"model: Qwen2.5-VL ({args.model}), {num_params / 1e6:.1f}M parameters ({vision_params / 1e6:.1f}M vision), "
              f"tokenizer {len(tokenizer)} tokens (setup {time.perf_counter() - started:.0f}s)")
        print(f"data: {args.records} records ({'with' if MLLM_DEMO.is_file() else 'without'} the real mllm demo, "
              f"{'Alpaca' if ALPACA.is_file() else 'synthetic'} texts): {report.summary()}; {num_images} images, "
              f"{100 * image_tokens / lengths.sum():.0f}% of tokens visual; length mean {lengths.mean():.0f}, "
              f"median {np.median(lengths):.0f}, max {lengths.max()}, total {lengths.sum():,}")
        for b in batch_sizes:
            print(f"padded batches of {b} over one epoch: {100 * epoch_padding(lengths, b):.1f}% padding")
        print(f"timing: {args.warmup} warm-up steps, then "
              f"{f'{args.steps} steps' if args.steps else f'{args.epochs} epochs ({quota:,} real tokens)'} "
              "per method, methods interleaved by progress\n", flush=True)

        load_before = os.getloadavg()[0]
        steppers: list[VLMStepper] = [ZeropadStepper(samples, config, state_dict, processor, args, quota, counter)]
        steppers += [PaddedStepper(samples, config, state_dict, processor, tokenizer.pad_token_id, b, args, quota,
                                   counter) for b in batch_sizes]
        if batch_sizes:
            print(f"check, initial weights, the first padded batch's {check_same_loss(steppers[0], steppers[1])}",
                  flush=True)
        for stepper in steppers:
            while stepper.meter.warming_up:
                stepper.step()
        # Always step the method furthest behind in its share of the work: a busy minute on the shared machine
        # then falls on the same share of every method's tokens (one step of each in turn would not do that,
        # as their steps carry different numbers of tokens).
        while active := [s for s in steppers if s.meter.needs_more()]:
            min(active, key=lambda s: s.meter.progress).step()
        results = [s.meter.result for s in steppers]
        if device.type == "cpu":
            peak = max(peak, matmul_peak(args.threads))
        print(f"load average (1 min) before {load_before:.2f}, after {os.getloadavg()[0]:.2f}; "
              f"total {time.perf_counter() - started:.0f}s\n")
        print(table(results, [s.meter.flops for s in steppers], peak))
        print(f"MFU: model FLOPs of the real tokens and images over the timed seconds and a peak of "
              f"{peak / 1e12:.3g} TFLOP/s ({'dense bf16, datasheet' if device.type == 'cuda' else 'fp32 matmul'})")
        if device.type == "cuda":
            print(f"peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")
        if args.json:
            args.json.write_text(json.dumps([vars(r) for r in results], indent=1))


if __name__ == "__main__":
    main()
