"""The training loop, and nothing else: set up, step, log, evaluate, save. Reads top to bottom."""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from zeropad.config import Config
from zeropad.data.chat import Sample, ensure_chat_template
from zeropad.errors import ConfigError
from zeropad.data.dataset import SampleReport, load_samples, split_eval, stream_samples
from zeropad.model.load import build_model, check_vocab, load_tokenizer
from zeropad.pack.collate import Pack
from zeropad.pack.loader import PackLoader, StreamingPackLoader, eval_packs
from zeropad.model.checkpointing import activation_context, apply_checkpointing, resolve_checkpointing
from zeropad.model.lora import apply_lora, merged_for_export
from zeropad.train.loss import chunked_loss_unsupported, lm_loss_sum
from zeropad.train.guard import RunGuard, StopSignals
from zeropad.train.metrics import FlopCounter, MetricsLogger, Progress, peak_tflops, plot_losses
from zeropad.train.optim import build_optimizer, build_scheduler


@dataclass
class TrainResult:
    model: torch.nn.Module
    tokenizer: object
    output_dir: Path
    final_loss: float
    eval_loss: float | None
    report: SampleReport


def _device(cfg: Config) -> torch.device:
    if cfg.train.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.train.device)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _autocast(cfg: Config, device: torch.device):
    if cfg.train.dtype == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def forward_loss_sum(model, pack: Pack, autocast, loss_chunk_tokens: int | None = None) -> torch.Tensor:
    """Summed token loss of one pack; with loss_chunk_tokens the [T, V] logits are never built."""
    with autocast:
        return lm_loss_sum(model, pack.model_inputs(), pack.target_ids[0], loss_chunk_tokens)


def accumulate_gradients(model, packs: list[Pack], autocast, loss_chunk_tokens: int | None = None,
                         activations=contextlib.nullcontext()) -> float:
    """Backward over the micro-steps of one optimizer step. Each pack's loss sum is divided by the
    step's total target count, so the summed gradient is that of the token mean over the step.
    `activations` (checkpointing.activation_context) holds each micro-step's saved tensors."""
    num_targets = sum(p.num_targets for p in packs)
    assert num_targets > 0, "every sample carries at least one target token"
    loss_total = torch.zeros(())
    for pack in packs:
        with activations:
            loss = forward_loss_sum(model, pack, autocast, loss_chunk_tokens) / num_targets
            loss.backward()
        loss_total += loss.detach().cpu()
    return loss_total.item()


def train_step(model, packs: list[Pack], optimizer, scheduler, grad_clip: float, autocast,
               loss_chunk_tokens: int | None = None, activations=contextlib.nullcontext()) -> tuple[float, float]:
    loss = accumulate_gradients(model, packs, autocast, loss_chunk_tokens, activations)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else math.inf)
    if math.isfinite(loss) and math.isfinite(grad_norm.item()):  # else skip: NaN would poison weights and Adam
        optimizer.step()
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, grad_norm.item()


@torch.no_grad()
def evaluate(model, packs: list[Pack], device: torch.device, autocast, loss_chunk_tokens: int | None = None) -> float:
    model.eval()
    loss_sum, num_targets = 0.0, 0
    for pack in packs:
        loss_sum += forward_loss_sum(model, pack.to(device), autocast, loss_chunk_tokens).item()
        num_targets += pack.num_targets
    model.train()
    return loss_sum / max(1, num_targets)


def _prepare_data(cfg: Config, tokenizer) -> tuple[PackLoader | StreamingPackLoader, list[Sample], SampleReport]:
    common = dict(max_tokens=cfg.pack.max_tokens, overlong=cfg.pack.overlong, seed=cfg.train.seed)
    if not cfg.data.sources:
        raise ConfigError("data.sources is empty: give at least one dataset")
    eval_samples: list[Sample] = []
    if cfg.eval.sources:
        eval_samples, _ = load_samples(cfg.eval.sources, cfg.data, tokenizer, **common)
    if cfg.pack.streaming:
        report = SampleReport()
        loader = StreamingPackLoader(
            lambda epoch: stream_samples(cfg.data.sources, cfg.data, tokenizer, report=report,
                                         **{**common, "seed": cfg.train.seed + epoch}),
            cfg.pack.max_tokens, cfg.pack.buffer_samples, cfg.train.seed,
        )
        return loader, eval_samples, report
    samples, report = load_samples(cfg.data.sources, cfg.data, tokenizer, **common)
    if cfg.eval.split > 0:
        samples, held_out = split_eval(samples, cfg.eval.split, cfg.train.seed)
        eval_samples += held_out
    return PackLoader(samples, cfg.pack.max_tokens, cfg.train.seed), eval_samples, report


def train(cfg: Config) -> TrainResult:
    with StopSignals() as stop:  # armed only while steps run; the previous handlers come back after
        return _train(cfg, stop)


def _train(cfg: Config, stop: StopSignals) -> TrainResult:
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config.json").write_text(cfg.model_dump_json(indent=2))
    _seed_everything(cfg.train.seed)
    device = _device(cfg)
    autocast = _autocast(cfg, device)

    tokenizer = load_tokenizer(cfg.model)
    ensure_chat_template(tokenizer, cfg.data.chat_template)
    loader, eval_samples, report = _prepare_data(cfg, tokenizer)
    eval_set = eval_packs(eval_samples, cfg.pack.max_tokens) if eval_samples else []

    model = apply_lora(build_model(cfg.model, seed=cfg.train.seed), cfg.model.lora).to(device)
    check_vocab(model, tokenizer)
    apply_checkpointing(model, resolve_checkpointing(cfg, model))
    activations = activation_context(cfg.memory, device)
    model.train()
    optimizer = build_optimizer(model, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train)
    flops = FlopCounter(model)
    peak = peak_tflops(device, cfg.log.peak_tflops)
    guard = RunGuard(cfg, model, optimizer, scheduler, loader, tokenizer, stop)
    start = guard.resume()  # before the logger appends: metrics.jsonl keeps only records up to `start`
    logger = MetricsLogger(output_dir, cfg.log.tensorboard)
    if start == 0:
        logger.log({"step": 0, "data": report.counts()})
    progress = Progress(cfg.train.steps, cfg.log.progress, initial=start)
    guard.say = progress.write
    num_params = sum(p.numel() for p in model.parameters())
    num_trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    progress.write(f"zeropad: {num_params / 1e6:.2f}M parameters ({num_trained / 1e6:.2f}M trained) on {device}; "
                   f"data: {report.summary()}")
    loss_chunk_tokens = cfg.memory.loss_chunk_tokens if cfg.memory.chunked_loss else None
    if loss_chunk_tokens and (reason := chunked_loss_unsupported(model)):
        progress.write(f"zeropad: memory.chunked_loss is off for this model: {reason}")
        loss_chunk_tokens = None

    packs_iter = iter(loader)
    loss, eval_loss = math.nan, None
    stop.arm()
    for step in range(start + 1, cfg.train.steps + 1):
        t0 = time.perf_counter()
        packs = [next(packs_iter).to(device) for _ in range(cfg.train.grad_accum)]
        lr = scheduler.get_last_lr()[0]
        loss, grad_norm = train_step(model, packs, optimizer, scheduler, cfg.train.grad_clip, autocast,
                                     loss_chunk_tokens, activations)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0

        tokens = sum(p.num_tokens for p in packs)
        record = {
            "step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": tokens,
            "target_tokens": sum(p.num_targets for p in packs), "tokens_per_s": tokens / seconds,
            "pad_fraction": 0.0,  # no pad token ever enters the model
            "budget_fill": tokens / (cfg.pack.max_tokens * len(packs)),
            "epoch": loader.epoch,
        }
        step_flops = sum(flops(p.doc_lengths) for p in packs)
        record["tflops"] = step_flops / seconds / 1e12
        if peak:
            record["mfu"] = record["tflops"] / peak
        if device.type == "cuda":
            record["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        if eval_set and cfg.eval.every_steps and step % cfg.eval.every_steps == 0:
            eval_loss = record["eval_loss"] = evaluate(model, eval_set, device, autocast, loss_chunk_tokens)
        guard.observe(record)
        logger.log(record)
        progress.update(loss, record["tokens_per_s"], record["pad_fraction"])
        guard.end_step(step)  # checkpoint when due; on SIGTERM/SIGINT or too many bad steps, also stop
    guard.finish()
    progress.close()

    if eval_set and (not cfg.eval.every_steps or cfg.train.steps % cfg.eval.every_steps):
        eval_loss = evaluate(model, eval_set, device, autocast, loss_chunk_tokens)
        logger.log({"step": cfg.train.steps, "eval_loss": eval_loss})
    logger.close()

    final_dir = output_dir / "final"
    model = merged_for_export(model)  # LoRA adapters merged in: final/ is a plain Hugging Face model
    model.save_pretrained(final_dir)
    tokenizer.save_pretrained(final_dir)
    plot_losses(logger.path, output_dir / "loss.png")
    summary = {"steps": cfg.train.steps, "final_loss": loss, "eval_loss": eval_loss, "data": report.summary(),
               "data_counts": report.counts(), "bad_steps": guard.position.bad_steps}
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    eval_text = f", eval loss {eval_loss:.4f}" if eval_loss is not None else ""
    print(f"done: {cfg.train.steps} steps, final loss {loss:.4f}{eval_text}")
    print(f"data: {report.summary()}")
    print(f"wrote {output_dir}/metrics.jsonl, {output_dir}/loss.png, model in {final_dir}")
    return TrainResult(model, tokenizer, output_dir, loss, eval_loss, report)
