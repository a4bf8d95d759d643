"""A model's initial weights from its config, one module at a time: the same weights however the model is laid
out (one process, or sharded over any number of ranks), and never more than one module's tensors at once.

Hugging Face's own per-module init (`_initialize_weights`, each sub-model by its own, children before parents,
as `initialize_weights` walks) runs on each module of a meta-device model in turn, on the CPU, from one random
stream seeded once. Each finished tensor either stays (the model itself is being built) or is handed to
`write` and the module goes back to meta (a sharded model takes its slice; parallel/materialize.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import PreTrainedModel


def init_weights(model: PreTrainedModel, seed: int,
                 write: Callable[[str, torch.Tensor], None] | None = None) -> None:
    """Initialise the meta-device `model` on the CPU, in place (write None), or stream each tensor by its
    state-dict name to `write` (the model stays on meta). Tied weights are initialised once, under their first
    name; in place they are tied again at the end (`tie_weights`)."""
    torch.manual_seed(seed)
    custom = model.is_custom_code()
    done: set[int] = set()  # ids of the meta tensors initialised so far: a tied weight is one of them

    def visit(prefix: str, module: torch.nn.Module, owner: PreTrainedModel) -> None:
        for name, child in module.named_children():
            visit(f"{prefix}{name}.", child, child if isinstance(child, PreTrainedModel) else owner)
        tensors = {name: t for name, t in [*module._parameters.items(), *module._buffers.items()] if t is not None}
        if not tensors:
            return
        tied = {name for name, t in module._parameters.items() if t is not None and id(t) in done}
        if tied and len(tied) == len(tensors):
            return  # e.g. a tied lm_head: nothing of its own to draw
        done.update(id(t) for t in tensors.values())
        module.to_empty(device="cpu", recurse=False)
        if hasattr(module, "_is_hf_initialized"):
            del module._is_hf_initialized  # set by the meta build, whose init wrote nothing
        owner._initialize_weights(module, custom)
        if write is None:
            return
        for name in tensors:
            if name not in tied:
                write(prefix + name, getattr(module, name))
        module.to_empty(device="meta", recurse=False)  # its memory goes back before the next module

    visit("", model, model)
    if write is None:
        model.tie_weights()
