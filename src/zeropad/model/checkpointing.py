"""Activation memory levers: checkpointing policies, offload to host, and the saved-activation meter.

Policies (`memory.checkpointing`), all non-reentrant `torch.utils.checkpoint`, applied by wrapping
modules with torch's `checkpoint_wrapper` (the model's code is untouched; the wrapper's state-dict
hooks strip its name prefix, so checkpoints and `save_pretrained` see the usual parameter names):

  none        autograd keeps everything it saves for backward.
  full        every decoder layer is recomputed in backward; only each layer's input is kept.
  every:K     decoder layers 0, K, 2K, ... are recomputed; the others keep their activations.
  selective   only the MLP block of every decoder layer is recomputed; the attention block keeps
              all it saves, attention outputs included. Why this split: per token and layer a
              SwiGLU MLP saves its input plus four intermediate-size tensors (gate, up, act(gate),
              their product), with intermediate ~3x hidden the largest share of a layer's
              activations, and recomputing it costs its three matmuls, linear in tokens. The
              attention core costs O(len^2) per document to recompute, so it is the one worth
              keeping. (Op-level selective checkpointing, which caches chosen op outputs, was not
              taken: its cache bypasses saved-tensor hooks, so it could be neither offloaded by
              `save_on_cpu` nor measured by `saved_activation_bytes`.)
  auto        the memory planner picks one of the above (zeropad.plan.fit.resolve_checkpointing).

Recomputation replays the same ops on the same inputs (with the RNG state restored), so losses
and gradients equal those of `none`. Same inputs includes no KV cache: the policies turn the
model's `use_cache` off (a layer replayed against the cache its first pass filled attends over
other keys).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper, checkpoint_wrapper

from zeropad.config import MemoryConfig
from zeropad.errors import ConfigError


def decoder_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(qualified name, module) of every decoder layer, in model order: modules whose class name
    ends with 'DecoderLayer', the Hugging Face naming for the repeated transformer block."""
    return [
        (name, module) for name, module in model.named_modules()
        if type(module).__name__.endswith("DecoderLayer")
    ]


def _wrap(model: torch.nn.Module, name: str) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    module = getattr(parent, child)
    assert not isinstance(module, CheckpointWrapper), f"{name} is already checkpointed"
    setattr(parent, child, checkpoint_wrapper(module))


def _every(policy: str) -> int:
    return int(policy.split(":", 1)[1])


def apply_checkpointing(model: torch.nn.Module, policy: str) -> None:
    """Wrap the model's modules for `policy` (none, full, every:K or selective; resolve auto first).
    Call once, after the model is built (and adapters added), before sharding and the optimizer.
    A policy that recomputes also sets the model's (text) config `use_cache` to False."""
    assert policy != "auto", "resolve 'auto' with zeropad.plan.fit.resolve_checkpointing() first"
    if policy == "none":
        return
    layers = decoder_layers(model)
    if not layers:
        raise ConfigError(
            f"memory.checkpointing: {type(model).__name__} has no module whose class name ends with "
            "'DecoderLayer', so there is nothing to checkpoint; set memory.checkpointing: none"
        )
    if policy == "full":
        targets = [name for name, _ in layers]
    elif policy.startswith("every:"):
        k = _every(policy)
        targets = [name for i, (name, _) in enumerate(layers) if i % k == 0]
    elif policy == "selective":
        missing = [name for name, layer in layers if not isinstance(getattr(layer, "mlp", None), torch.nn.Module)]
        if missing:
            raise ConfigError(
                f"memory.checkpointing: selective recomputes each decoder layer's `mlp`, but {missing[0]} "
                f"({type(layers[0][1]).__name__}) has none; use full or every:K"
            )
        targets = [f"{name}.mlp" for name, _ in layers]
    else:
        raise AssertionError(f"unvalidated checkpointing policy {policy!r}")
    for name in targets:
        _wrap(model, name)
    config = getattr(model, "config", None)
    if config is not None:
        # A recomputed layer would write its keys and values into the forward's KV cache a second time and
        # attend over what the cache returns: for a sliding-window layer, the window's last tokens from the
        # first pass followed by the pack, so the recomputation (and every gradient) shifts. Training needs
        # no cache; this is what transformers' own gradient checkpointing does too.
        config.get_text_config().use_cache = False


def activation_context(memory: MemoryConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """The context the loop runs each micro-step's forward and backward in. With
    `memory.offload_activations`, every tensor autograd saves for backward is copied to host memory
    (pinned when training on CUDA, so the copies back overlap compute) and the device copy is freed;
    checkpointed layers' inputs are offloaded too. Reusable: enter it once per micro-step."""
    if memory.offload_activations:
        return torch.autograd.graph.save_on_cpu(pin_memory=device.type == "cuda")
    return contextlib.nullcontext()


def saved_activation_bytes(fn: Callable[[], Any], params: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the distinct storages autograd saves for backward while `fn` runs: what a forward
    (`fn`) leaves held until its backward, i.e. the activation memory the checkpointing policies
    trade for recompute. Counted with `saved_tensors_hooks`, deduplicated by storage (views of one
    tensor, or one tensor saved by several ops, count once). Storages of `params` are left out:
    weights saved for their matmul's backward are model state, not activations.

    Saves made under an inner hook are not seen: inside a checkpointed region only checkpoint's
    own placeholders are saved (its inputs are saved outside it, and counted), and under
    `save_on_cpu` the device keeps nothing. Tensors kept alive otherwise than by autograd's saved
    tensors (e.g. by Python references) are not counted."""
    skip = {p.untyped_storage().data_ptr() for p in params}
    seen: dict[tuple[torch.device, int], int] = {}
    held: list[torch.Tensor] = []  # keep counted storages alive, so no address is reused while counting

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[(t.device, storage.data_ptr())] = storage.nbytes()
            held.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())
