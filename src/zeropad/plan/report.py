"""`zeropad plan`: the memory plan of a config as an aligned table (or JSON), with a recommendation."""

from __future__ import annotations

import json
from dataclasses import asdict, replace

import torch

from zeropad.config import Config
from zeropad.errors import ConfigError
from zeropad.model.load import build_model
from zeropad.parallel import ulysses
from zeropad.plan.arch import Arch, arch_of
from zeropad.plan.fit import (MARGIN, Option, budget_bytes, detect_device_bytes, options, parse_size, recommend,
                              setup_from_config)
from zeropad.plan.memory import (GB, OPTIMIZER_STATE_BYTES, PRECISIONS, STRATEGIES, Component, Setup, device_total,
                                 host_per_rank, model_states, plan)


def fmt_bytes(n: float) -> str:
    if n == 0:
        return "-"
    if n >= 0.1 * GB:
        return f"{n / GB:,.1f} GB"
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def describe_model(a: Arch) -> str:
    text = f"{a.num_params / 1e9:.3g}B parameters"
    if a.num_trainable_params != a.num_params:
        text += f" ({a.num_trainable_params / 1e6:.3g}M trained)"
    if a.num_experts:
        text += (f", {a.num_active_params / 1e9:.3g}B activated per token ({a.experts_per_token} of "
                 f"{a.num_experts} experts in {a.num_moe_layers} MoE layers)")
    return text


def describe_image_side(a: Arch) -> str | None:
    """The one line on what the plan leaves out for a model with an image encoder."""
    if not a.num_image_params:
        return None
    return (f"image encoder: its {a.num_image_params / 1e6:.3g}M parameters are counted in the model states; "
            "its activations (per image, set by image sizes) are not modelled: leave them room in the margin")


def describe_unmodelled(a: Arch) -> str | None:
    """The one line on a layer the activation model does not describe."""
    if a.unmodelled_layer is None:
        return None
    return (f"activations: this model's {a.unmodelled_layer} save more than the modelled Llama/Qwen-style layer "
            "(on tiny models: 30-47% more for DeepSeek-V3's MLA, ~38% for gpt-oss): leave them room in the margin")


def _states_by_strategy(a: Arch, setup: Setup) -> dict[str, tuple[float, float]]:
    out = {}
    for name in STRATEGIES:
        rows = model_states(a.num_params, replace(setup, strategy=name), a.num_trainable_params)
        out[name] = (sum(r.device for r in rows), sum(r.host for r in rows))
    return out


def build(a: Arch, setup: Setup, tokens: int, device_bytes: float | None, max_shard_bytes: int) -> dict:
    """Everything `zeropad plan` reports, as plain data (the --json output). With checkpointing
    `auto`, the table shows the policy auto would pick; `max_shard_bytes`: checkpoint.max_shard_size."""
    opts = best = None
    if device_bytes is not None:
        opts = options(a, setup, tokens, budget_bytes(device_bytes))
        best = recommend(opts, tokens)
    if setup.checkpointing == "auto":
        if device_bytes is None:
            raise ConfigError("memory.checkpointing=auto: give the device's memory (--device-memory or "
                              "memory.device_gb) so that the planner can choose")
        setup = replace(setup, checkpointing=best.policy if best else "full")
    rows = plan(a, setup, tokens)
    result = {
        "model": {**asdict(a), "description": describe_model(a), "image_side": describe_image_side(a),
                  "unmodelled": describe_unmodelled(a)},
        "setup": asdict(setup),
        "tokens": tokens,
        "components": [asdict(r) for r in rows],
        "total_device_bytes": device_total(rows),
        "total_host_bytes": sum(r.host for r in rows),
        "model_states_by_strategy": {k: {"device_bytes": d, "host_bytes": h}
                                     for k, (d, h) in _states_by_strategy(a, setup).items()},
        "device_memory_bytes": device_bytes,
        "host_per_rank_bytes": host_per_rank(a.num_params, max(a.num_head_params, a.vocab * a.hidden), setup,
                                             max_shard_bytes),
    }
    if opts is not None:
        result["options"] = [asdict(o) for o in opts]
        result["recommendation"] = asdict(best) if best else None
    return result


def _table(header: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return ["  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
            for r in [header, *rows]]


def render(result: dict) -> str:
    s, a = result["setup"], result["model"]
    lines = [
        f"model: {a['description']}, {a['num_layers']} layers, hidden {a['hidden']}, vocab {a['vocab']}",
        f"setup: {s['precision']}, {s['optimizer']}, {s['strategy']} on {s['num_devices']} device(s)"
        + (f" as {s['replicate']} HSDP replicas of {s['num_devices'] // s['replicate']}" if s["replicate"] > 1 else "")
        + (f", sequence parallel x {s['sp_size']}: {-(-result['tokens'] // s['sp_size'])} tokens per device"
           if s["sp_size"] > 1 else "")
        + ", "
        f"pack.max_tokens={result['tokens']}, checkpointing {s['checkpointing']}, "
        f"{'chunked' if s['chunked_loss'] else 'plain'} loss",
    ]
    lines += [note for note in (a["image_side"], a["unmodelled"]) if note]
    lines.append("")
    components = [Component(**c) for c in result["components"]]
    rows = [[c.name, c.phase, fmt_bytes(c.device), fmt_bytes(c.host), c.note] for c in components]
    rows.append(["peak", "", fmt_bytes(result["total_device_bytes"]), fmt_bytes(result["total_host_bytes"]),
                 "always + the larger phase (fwd/bwd or step)"])
    lines += _table(["component", "phase", "per device", "host", "note"], rows, right={2, 3})
    by_strategy = "  ".join(
        f"{k} {fmt_bytes(v['device_bytes'])}" + (f" (+{fmt_bytes(v['host_bytes'])} host)" if v["host_bytes"] else "")
        for k, v in result["model_states_by_strategy"].items())
    lines += ["", f"model states per device by strategy: {by_strategy}"]
    host = result["host_per_rank_bytes"]
    lines.append(f"host memory per rank: loading {fmt_bytes(host['load'])} (weights"
                 + (" sharded on the meta device, then each rank reads its shards" if host["export"] else "")
                 + f"); final/ {fmt_bytes(host['export'])} per rank (one weight gathered at a time), rank 0 "
                 f"{fmt_bytes(host['export_rank0'])} (one file of checkpoint.max_shard_size + one weight)")
    device_bytes = result["device_memory_bytes"]
    if device_bytes is None:
        lines += ["", "no device memory known: pass --device-memory (e.g. 80GB) for a recommendation"]
        return "\n".join(lines)
    lines += ["", f"device memory {fmt_bytes(device_bytes)}; plans must fit {fmt_bytes(budget_bytes(device_bytes))} "
              f"(a {MARGIN:.0%} margin)", ""]
    opts = [Option(**o) for o in result["options"]]
    rows = [[o.policy, f"{o.recompute:.0%}", fmt_bytes(o.device_bytes), f"{o.largest_tokens:,}" if o.largest_tokens
             else "does not fit"] for o in opts]
    lines += _table(["checkpointing", "recompute", f"memory at {result['tokens']:,} tokens",
                     "largest pack.max_tokens"], rows, right={1, 2, 3})
    best = result["recommendation"]
    if best is None:
        lines += ["", "recommendation: the model states alone do not fit; shard them over more devices "
                  "(--devices, --strategy zero3), offload them, or train with LoRA"]
    elif best["largest_tokens"] < result["tokens"]:
        lines += ["", f"recommendation: pack.max_tokens={best['largest_tokens']} memory.checkpointing={best['policy']}"
                  f" ({result['tokens']} tokens do not fit with any policy)"]
    else:
        lines += ["", f"recommendation: memory.checkpointing={best['policy']} (least recompute that fits "
                  f"{result['tokens']} tokens); with it, up to pack.max_tokens={best['largest_tokens']}"]
    return "\n".join(lines)


def run(cfg: Config, *, num_devices: int, device_memory: str | None, strategy: str | None, precision: str | None,
        optimizer: str, as_json: bool) -> str:
    """`zeropad plan`'s output for a config. The device budget: --device-memory, else
    memory.device_gb, else this machine's GPU (or its RAM for a CPU run); without one, no recommendation."""
    for name, value, known in (("--strategy", strategy, STRATEGIES), ("--precision", precision, PRECISIONS),
                               ("--optimizer", optimizer, OPTIMIZER_STATE_BYTES)):
        if value is not None and value not in known:
            raise ConfigError(f"{name} {value}: must be one of {', '.join(known)}")
    on_cpu = cfg.train.device == "cpu"
    replicate = cfg.parallel.replicate if num_devices > 1 else 1
    if num_devices % replicate:
        raise ConfigError(f"parallel.replicate ({replicate}) must divide --devices ({num_devices})")
    if num_devices % cfg.parallel.sp_size:
        raise ConfigError(f"parallel.sp_size ({cfg.parallel.sp_size}) must divide --devices ({num_devices}): "
                          "each pack is shared by sp_size devices")
    setup = setup_from_config(
        cfg, num_devices=num_devices, optimizer=optimizer, replicate=replicate,
        strategy=strategy or ("none" if num_devices == 1 else "zero3"), precision=precision or cfg.train.dtype)
    if device_memory is not None:
        device_bytes = parse_size(device_memory)
    elif cfg.memory.device_gb:
        device_bytes = cfg.memory.device_gb * GB
    elif on_cpu or torch.cuda.is_available():
        device_bytes = detect_device_bytes(torch.device("cpu" if on_cpu else "cuda"))
    else:
        device_bytes = None
    model = build_model(cfg.model, device="meta", lora=True)  # shapes only: no weights are read or allocated
    ulysses.check_heads(model.config, cfg.parallel.sp_size)
    result = build(arch_of(model), setup, cfg.pack.max_tokens, device_bytes, cfg.checkpoint.max_shard_size)
    return json.dumps(result, indent=2) if as_json else render(result)
