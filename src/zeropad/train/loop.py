"""The training loop, and nothing else: set up, step, log, evaluate, save. Reads top to bottom."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from zeropad.config import Config
from zeropad.data.chat import ensure_chat_template
from zeropad.errors import ConfigError
from zeropad.data.dataset import SampleReport, load_samples, split_eval, stream_samples
from zeropad.data.image_targets import ImageTargetCollator, image_target_setup, load_target_samples
from zeropad.data.multimodal import MultimodalCollator, load_image_processor, load_vision_samples
from zeropad.family import QWEN_VL, images_are_targets, is_multimodal, media_family
from zeropad.model.load import build_model, build_model_config, check_vocab, load_tokenizer
from zeropad.pack.collate import collate
from zeropad.pack.loader import PackLoader, Prefetch, StepPacks, StreamingPackLoader, eval_packs, step_packs
from zeropad.model.checkpointing import activation_context, apply_checkpointing
from zeropad.model.compile import compile_layers, compile_stats
from zeropad.model.emu3 import image_encoder
from zeropad.model.attention import ATTN_NAME
from zeropad.model.hf_writer import save_hf_model
from zeropad.model.lora import apply_lora
from zeropad.model.support import check_packable
from zeropad.model.vlm import check_attn_implementation, packed_attn_implementation, position_rule
from zeropad.parallel import distributed, ulysses
from zeropad.plan.fit import resolve_checkpointing
from zeropad.parallel.materialize import materialize, weight_slots
from zeropad.parallel.sharding import VisionCalls, check_parallel, parallelize, unwrap
from zeropad.train.loss import loss_chunking
from zeropad import storage
from zeropad.train import preflight
from zeropad.train.fingerprint import run_fingerprint
from zeropad.train.host_alloc import keep_freed_memory
from zeropad.train.guard import RunGuard, StopSignals, named_storage_faults
from zeropad.train.oom import StepMemory
from zeropad.train.metrics import FlopCounter, MetricsLogger, Progress, media_grids, peak_tflops, plot_losses
from zeropad.train.moe import RouterStats
from zeropad.train.preference import (attach_reference, build_objective, check_preference, collate_pairs,
                                      disable_dropout, prepare_pairs)
from zeropad.train.optim import apply_freeze, build_optimizer, build_scheduler, describe_groups, group_lrs
from zeropad.train.step import StepResult, StepSetup, evaluate, train_step


@dataclass
class TrainResult:
    model: torch.nn.Module
    tokenizer: object
    output_dir: Path
    final_loss: float
    eval_loss: float | None
    report: SampleReport


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _autocast(cfg: Config, device: torch.device):
    if cfg.train.dtype == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _prepare_data(cfg: Config, tokenizer, processor=None, model_config=None
                  ) -> tuple[PackLoader | StreamingPackLoader, list, SampleReport]:
    """Training loader, eval samples and the data report; image conversations when `processor` is given."""
    if not cfg.data.sources:
        raise ConfigError("data.sources is empty: give at least one dataset")
    if cfg.train.objective != "sft":
        return prepare_pairs(cfg, tokenizer)
    common = dict(max_tokens=cfg.pack.max_tokens, overlong=cfg.pack.overlong, seed=cfg.train.seed)
    if processor is None:
        load = lambda sources: load_samples(sources, cfg.data, tokenizer, **common)  # noqa: E731
    elif cfg.pack.streaming:
        raise ConfigError("pack.streaming is not supported for image data yet: set pack.streaming=false")
    else:
        loader = load_target_samples if images_are_targets(model_config) else load_vision_samples
        load = lambda sources: loader(cfg, sources, tokenizer, processor, model_config)  # noqa: E731
    if cfg.pack.streaming and cfg.eval.split > 0:  # before any data is read (it trained on all of it, silently)
        raise ConfigError("eval.split holds out part of the data, but pack.streaming never has the data in hand to "
                          "hold any out: give eval.sources (held-out files) instead, or set pack.streaming=false")
    eval_samples = load(cfg.eval.sources)[0] if cfg.eval.sources else []
    if cfg.pack.streaming:
        report = SampleReport()
        loader = StreamingPackLoader(
            lambda epoch: stream_samples(cfg.data.sources, cfg.data, tokenizer, report=report,
                                         **{**common, "seed": cfg.train.seed + epoch}),
            cfg.pack.max_tokens, cfg.pack.buffer_samples, cfg.train.seed,
        )
        return loader, eval_samples, report
    samples, report = load(cfg.data.sources)
    if cfg.eval.split > 0:
        samples, held_out = split_eval(samples, cfg.eval.split, cfg.train.seed)
        eval_samples += held_out
    return PackLoader(samples, cfg.pack.max_tokens, cfg.train.seed), eval_samples, report


def _check_parallel(cfg: Config, device: torch.device) -> None:
    """Parallel settings that cannot run here, refused before any work."""
    check_parallel(cfg.parallel, device)
    if distributed.world_size() == 1:
        return
    if cfg.parallel.strategy == "none":
        raise ConfigError(f"running under torchrun with {distributed.world_size()} processes: "
                          "set parallel.strategy to ddp or fsdp")


def _check_sequence_parallel(cfg: Config, model_config) -> None:
    """What parallel.sp_size > 1 does not support (yet), refused before any data is read."""
    sp_size = cfg.parallel.sp_size
    if sp_size == 1:
        return
    family = media_family(model_config)
    if family is not None and family.model_type not in QWEN_VL:
        raise ConfigError(f"parallel.sp_size={sp_size}: sequence parallelism supports the vision-language models "
                          f"{', '.join(QWEN_VL)}, not {family.model_type} yet; use sp_size=1")
    if cfg.model.attn_implementation != ATTN_NAME:
        raise ConfigError(f"parallel.sp_size={sp_size} runs packed attention ({ATTN_NAME}) across ranks; "
                          f"model.attn_implementation={cfg.model.attn_implementation} cannot be split")
    ulysses.check_heads(model_config, sp_size)


def train(cfg: Config) -> TrainResult:
    device = distributed.device_for(cfg.train.device)
    joined = not distributed.is_initialized()
    distributed.init(device, single=cfg.parallel.cpu_offload and device.type == "cuda")
    try:
        # the stop signals are armed only while steps run (the previous handlers come back after)
        with named_storage_faults(cfg.output_dir), StopSignals() as stop, \
                ulysses.sequence_parallel(cfg.parallel.sp_size):
            result = _train(cfg, stop, device)
        distributed.barrier()  # no rank destroys the group while another still has collectives in flight
        return result
    finally:
        if joined:
            distributed.teardown()


def _train(cfg: Config, stop: StopSignals, device: torch.device) -> TrainResult:
    _check_parallel(cfg, device)
    main, world, rank = distributed.is_main(), distributed.world_size(), distributed.rank()
    output_dir = Path(cfg.output_dir)
    preflight.check(cfg)  # writable, with room for what the run writes: refused before any compute
    if device.type == "cpu":
        keep_freed_memory()  # each step's large buffers reuse the last step's pages (train/host_alloc.py)
    _seed_everything(cfg.train.seed)

    tokenizer = load_tokenizer(cfg.model)
    ensure_chat_template(tokenizer, cfg.data.chat_template)
    model_config = build_model_config(cfg.model)
    check_packable(model_config)  # a family packing cannot keep exact is refused before any data is read
    _check_sequence_parallel(cfg, model_config)
    check_preference(cfg, is_multimodal(model_config))
    processor = image_target_setup(cfg, model_config)  # Emu3: images in assistant turns are VQ-token targets
    if processor is None and is_multimodal(model_config):
        processor = load_image_processor(cfg, model_config)
    loader, eval_samples, report = _prepare_data(cfg, tokenizer, processor, model_config)
    base_model, model, groups, slots = _build_model(cfg, tokenizer, processor, device)
    collate_fn = collate if processor is None else MultimodalCollator(
        base_model.config, position_rule(base_model), processor, cfg.data.on_bad_sample, report
    ) if not images_are_targets(model_config) else ImageTargetCollator(  # Emu3: encodes the pack's images
        base_model.config, processor, image_encoder(base_model), cfg.data.on_bad_sample, report)
    objective = build_objective(cfg)
    dropout_off = 0
    if objective is not None:  # a pair's chosen and rejected answers, two documents of one pack
        collate_fn = collate_pairs
        dropout_off = disable_dropout(model)
    sp = ulysses.active()
    if sp is not None:  # every rank of an SP group collates the same pack and keeps its token range
        if processor is not None:  # a VLM embeds the whole pack (all its images); its decoder keeps the range
            ulysses.keep_token_range(base_model)
        collate_fn = lambda docs, whole=collate_fn: ulysses.split_pack(  # noqa: E731
            whole(docs), sp.rank, sp.size, whole_inputs=processor is not None)
    flops = FlopCounter(model)
    num_params = sum(p.numel() for p in model.parameters())
    num_trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    loss_chunk_tokens, chunked_off = loss_chunking(cfg.memory, model)
    model = parallelize(model, cfg.parallel, cfg.train.dtype, device)  # the last change to the model
    if slots is not None:  # built on meta and sharded there: each rank now reads or draws its shards alone
        materialize(model, slots, cfg.model, seed=cfg.train.seed, device=device, parallel=cfg.parallel)
    if objective is not None and objective.needs_reference:  # before resume: the frozen *starting* model
        for pairs in (loader.samples, eval_samples):
            attach_reference(cfg, model, pairs, device, _autocast(cfg, device))
    eval_set = eval_packs(eval_samples, cfg.pack.max_tokens, collate_fn) if eval_samples else []
    optimizer = build_optimizer(model, cfg.train)
    setup = StepSetup(model, optimizer, build_scheduler(optimizer, cfg.train), _autocast(cfg, device),
                      cfg.train.grad_clip, loss_chunk_tokens, activation_context(cfg.memory, device),
                      RouterStats.attach(model, cfg.train.router_aux_loss_coef), VisionCalls.attach(model), objective)
    guard = RunGuard(cfg, model, optimizer, setup.scheduler, loader, tokenizer, stop)
    guard.data = run_fingerprint(cfg, tokenizer, report.num_records)
    start = guard.resume()  # before the logger appends: metrics.jsonl keeps only records up to `start`
    if main:  # once resume has accepted the run: a refused one leaves the earlier run's config.json as it was
        with storage.writing("the run's config.json", output_dir):
            (output_dir / "config.json").write_text(cfg.model_dump_json(indent=2))
    logger = MetricsLogger(output_dir, cfg.log.tensorboard, enabled=main, start=start)
    if start == 0:
        logger.log({"step": 0, "data": report.counts()})
    if guard.data_note is not None:  # resumed on changed data, as checkpoint.resume_data chose
        logger.log(guard.data_note)
    progress = Progress(cfg.train.steps, cfg.log.progress and main, initial=start, quiet=not main)
    guard.say = progress.write
    ranks = f" x {world} ranks ({cfg.parallel.strategy})" if world > 1 else ""
    progress.write(f"zeropad: {num_params / 1e6:.2f}M parameters ({num_trained / 1e6:.2f}M trained) on {device}"
                   f"{ranks}; data: {report.summary()}")
    if len(groups) > 1:
        progress.write(f"zeropad: parameter groups: {describe_groups(groups)}")
    if chunked_off:
        progress.write(f"zeropad: memory.chunked_loss is off for this model: {chunked_off}")
    if dropout_off:
        progress.write(f"zeropad: dropout off in {dropout_off} module(s) for train.objective={cfg.train.objective}, "
                       "as TRL's trainers do: the policy and its reference compare on the same forward")
    peak = peak_tflops(device, cfg.log.peak_tflops)

    memory = StepMemory(cfg, model, optimizer, guard, device)
    # the next step's packs are built (on a GPU also pinned) on a background thread while this step runs
    steps_iter = Prefetch(step_packs(loader, cfg.train.grad_accum, world, rank, collate_fn, cfg.parallel.sp_size),
                          _pinned if device.type == "cuda" else None)
    result, eval_loss = StepResult(math.nan, math.nan, math.nan), None
    if start == cfg.train.steps:  # resumed at its last step: none to train; the loss that step logged is reported
        progress.write(f"zeropad: the run is already at train.steps={start}: no step to train; final/ and "
                       "summary.json are written again from that checkpoint")
        result = StepResult(logger.logged_loss(start), math.nan, math.nan)
    stop.arm()
    try:
        for step in range(start + 1, cfg.train.steps + 1):
            t0 = time.perf_counter()
            step_data = next(steps_iter)
            guard.taking(step_data.start, step_data.end)
            lr, lrs = setup.scheduler.get_last_lr()[0], group_lrs(optimizer)
            with memory.step(step, [p.num_tokens for p in step_data.packs]):  # OOM: named, last good state saved
                storage.inject("step", step)
                packs = [p.to(device) for p in step_data.packs]
                data_s = time.perf_counter() - t0  # waiting for this step's packs: planning, collation, device copy
                # before backward; the loss is a mean over target tokens, or over pairs for a preference objective
                num_targets = int(distributed.all_reduce_sum(sum(p.num_pairs or p.num_targets for p in packs), device))
                result = train_step(setup, packs, num_targets, step_data.num_tokens)
            # No device sync for the clock: train_step's one read waits for this step's backward, queued behind the
            # previous step's update, so from step to step this is the device's period.
            seconds = time.perf_counter() - t0

            tokens = step_data.num_tokens  # all ranks
            record = {
                "step": step, "loss": result.loss, "lr": lr, "grad_norm": result.grad_norm, "tokens": tokens,
                "target_tokens" if objective is None else "pairs": num_targets, "tokens_per_s": tokens / seconds,
                "pad_fraction": 0.0,  # no pad token ever enters the model
                "budget_fill": tokens / (cfg.pack.max_tokens * len(packs) * (world // cfg.parallel.sp_size)),
                "epoch": step_data.end[0], "data_s": data_s,
            }
            if objective is not None:
                record.update(objective.metrics(device))
            if len(lrs) > 1:
                record.update({f"lr_{group}": value for group, value in lrs.items()})
            if setup.router is not None:
                record["aux_loss"] = result.aux_loss
                if cfg.log.expert_load:
                    record.update(result.expert_load)
            if world > 1:
                record["rank_token_imbalance"] = step_data.assignment.token_imbalance
                record["rank_attention_imbalance"] = step_data.assignment.attention_imbalance
            # per device: the step's text over all ranks, and this rank's images (an SP group embeds its pack's
            # images on each of its ranks: counted once)
            step_flops = (flops(step_data.doc_lengths) / world
                          + flops((), [g for p in step_data.packs for g in media_grids(p.media)]) / cfg.parallel.sp_size)
            record["tflops"] = step_flops / seconds / 1e12
            if peak:
                record["mfu"] = record["tflops"] / peak
            if device.type == "cuda":
                record["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
            if eval_set and cfg.eval.every_steps and step % cfg.eval.every_steps == 0:
                eval_loss = record["eval_loss"] = evaluate(model, eval_set, device, setup.autocast, loss_chunk_tokens,
                                                           objective)
                record.update(objective.metrics(device, "eval_") if objective is not None else {})
            guard.observe(record, result.skipped)
            logger.log(record)
            progress.update(result.loss, record["tokens_per_s"], record["pad_fraction"], record.get("rewards/accuracy"))
            guard.end_step(step)  # checkpoint when due; on SIGTERM/SIGINT or too many bad steps, also stop
    finally:
        steps_iter.close()
    guard.finish()
    progress.close()

    if eval_set and (not cfg.eval.every_steps or cfg.train.steps % cfg.eval.every_steps):
        eval_loss = evaluate(model, eval_set, device, setup.autocast, loss_chunk_tokens, objective)
        if start < cfg.train.steps:  # a finished run resumed at its end has this record already
            logger.log({"step": cfg.train.steps, "eval_loss": eval_loss,
                        **(objective.metrics(device, "eval_") if objective is not None else {})})
    logger.close()
    return _save_final(cfg, model, tokenizer, processor, logger, guard, report, result.loss, eval_loss)


def _pinned(step_data: StepPacks) -> StepPacks:
    return dataclasses.replace(step_data, packs=[p.pin_memory() for p in step_data.packs])


def _build_model(cfg: Config, tokenizer, processor, device: torch.device):
    """(base model, trained model, parameter groups, weight slots): LoRA, freezing and activation checkpointing
    applied, the model checked against the tokenizer and the packed path; not yet wrapped for DDP/FSDP. Under
    FSDP on several ranks (or with parallel.cpu_offload) the model is on the meta device, and `slots` (parallel/materialize.py) say where its
    weights go once it is sharded; otherwise it holds its weights and `slots` is None."""
    sharded = cfg.parallel.strategy == "fsdp" and (distributed.world_size() > 1 or cfg.parallel.cpu_offload)
    attn = None
    if cfg.parallel.sp_size > 1:  # the varlen attention across the SP group (a VLM's language model only)
        attn = ulysses.ULYSSES_NAME if processor is None else packed_attn_implementation(text=ulysses.ULYSSES_NAME)
    base_model = build_model(cfg.model, seed=cfg.train.seed, device="meta" if sharded else "cpu",
                             attn_implementation=attn)
    slots = weight_slots(base_model) if sharded else None
    model = apply_lora(base_model, cfg.model.lora, seed=cfg.train.seed)
    if not sharded:
        model = model.to(device)  # in place: base_model moves too
    groups = apply_freeze(model, cfg.train.freeze)  # before parallelize: DDP/FSDP register trained weights only
    check_vocab(model, tokenizer)
    vlm = processor is not None and not images_are_targets(base_model.config)  # Emu3's packs are plain tokens
    if vlm and cfg.model.attn_implementation == ATTN_NAME:
        try:  # a VLM design zeropad cannot pack, or a vision backend that would break, stops before any step
            check_attn_implementation(base_model, ulysses.ULYSSES_NAME if cfg.parallel.sp_size > 1 else ATTN_NAME)
        except ValueError as err:
            raise ConfigError(f"model: {err}") from None
    apply_checkpointing(model, resolve_checkpointing(cfg, model))
    if cfg.train.compile:  # after checkpointing (each layer compiles with its checkpoint), before DDP/FSDP
        compile_layers(model)
    model.train()
    return base_model, model, groups, slots


def _save_final(cfg: Config, model, tokenizer, processor, logger: MetricsLogger, guard: RunGuard,
                report: SampleReport, loss: float, eval_loss: float | None) -> TrainResult:
    """final/ as a plain Hugging Face directory (LoRA adapters merged in; rank 0 writes it, one shard at a time),
    loss.png and summary.json."""
    output_dir = Path(cfg.output_dir)
    final_dir = output_dir / "final"
    model = unwrap(model)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    # A failed write removes final/ (it is written again on resume); the end-of-run checkpoint is complete.
    with storage.writing("the final model", final_dir, weights, partial=final_dir):
        # Every rank: under FSDP each weight is gathered in turn (collectives), only rank 0 keeps and writes it.
        save_hf_model(model, final_dir, cfg.checkpoint.max_shard_size, write=distributed.is_main())
        if not distributed.is_main():
            return TrainResult(model, tokenizer, output_dir, loss, eval_loss, report)
        storage.inject("final")
        tokenizer.save_pretrained(final_dir)
        if processor is not None:
            processor.save_pretrained(final_dir)  # final/ is a complete VLM directory: it trains and loads again
    with storage.writing("the loss plot", output_dir / "loss.png", partial=output_dir / "loss.png"):
        plot_losses(logger.path, output_dir / "loss.png")
    summary = {"steps": cfg.train.steps, "final_loss": loss, "eval_loss": eval_loss, "data": report.summary(),
               "data_counts": report.counts(), "bad_steps": guard.position.bad_steps,
               "world_size": distributed.world_size(), **({"compile": compile_stats()} if cfg.train.compile else {})}
    with storage.writing("summary.json", output_dir, partial=output_dir / "summary.json"):
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    eval_text = f", eval loss {eval_loss:.4f}" if eval_loss is not None else ""
    print(f"done: {cfg.train.steps} steps, final loss {loss:.4f}{eval_text}")
    print(f"data: {report.summary()}")
    print(f"wrote {output_dir}/metrics.jsonl, {output_dir}/loss.png, model in {final_dir}")
    return TrainResult(model, tokenizer, output_dir, loss, eval_loss, report)
