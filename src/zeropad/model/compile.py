"""`train.compile`: torch.compile per decoder layer, applied to the unchanged model (torchtitan's way).

Each decoder layer is compiled in place (`Module.compile`, so parameter names and state dicts stay those of
the Hugging Face model), after LoRA and activation checkpointing (a checkpointed layer is compiled with its
checkpoint, which dynamo traces as one region) and before DDP/FSDP wrapping. The embeddings, the loss and
everything between layers stay eager. Packed attention runs inside the compiled layers: on a CPU as one custom op
(model/attention.py), so the varlen boundaries never break the graph; on a GPU the varlen kernels (fp32 on a GPU, and
dropout, softcap or sinks anywhere, run per document as one graph break).

Every pack has its own length and document count: layers are compiled with dynamic shapes from the start, so
a new pack length reuses the graph instead of recompiling. The compiles are counted (`compile_stats`) and the
run's summary reports them.

The backend is inductor; ZEROPAD_COMPILE_BACKEND names another (the tests use aot_eager, which traces the
same graphs, forward and backward, without inductor's C++ build).
"""

from __future__ import annotations

import os

import torch

from zeropad.errors import ConfigError
from zeropad.model.checkpointing import decoder_layers


def _layer_slots(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The module in each decoder layer's place: the layer, or the checkpoint wrapper around it."""
    slots = []
    for name, _ in decoder_layers(model):
        name = name.removesuffix("._checkpoint_wrapped_module")
        slots.append(model.get_submodule(name))
    return slots


def compile_layers(model: torch.nn.Module, backend: str | None = None) -> int:
    """Compile every decoder layer of `model` in place; returns how many. `backend`: torch.compile's,
    default ZEROPAD_COMPILE_BACKEND or inductor."""
    layers = _layer_slots(model)
    if not layers:
        raise ConfigError(f"train.compile: {type(model).__name__} has no module whose class name ends with "
                          "'DecoderLayer', so there is nothing to compile; set train.compile: false")
    backend = backend or os.environ.get("ZEROPAD_COMPILE_BACKEND", "inductor")
    for layer in layers:
        layer.compile(backend=backend, dynamic=True)
    config = getattr(model, "config", None)
    if config is not None:
        # Training needs no KV cache, and a cache among a layer's inputs is guarded per layer index: with one,
        # every layer would compile its own graph (past dynamo's recompile limit, eager after the 8th).
        config.get_text_config().use_cache = False
    return len(layers)


def compile_stats() -> dict[str, int]:
    """Dynamo's counts in this process so far: frames compiled (`graphs`: one per layer class and graph
    break; every further one is a recompile) and graph breaks."""
    from torch._dynamo.utils import counters

    return {"graphs": int(counters["stats"]["unique_graphs"]),
            "graph_breaks": int(sum(counters["graph_break"].values()))}
