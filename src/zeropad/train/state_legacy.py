"""The reader of the single-process checkpoint format zeropad wrote before it saved DCP at every world
size: model.safetensors (the model's state dict, tied tensors stored once) and optimizer.pt
(optimizer state keyed by parameter index, and the LR-schedule state); the other files are as today.
Read only, at any world size: a run resumed from one saves DCP checkpoints from then on."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import _CHECKPOINT_PREFIX
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, set_model_state_dict,
                                                     set_state_dict)


WEIGHTS = "model.safetensors"
TRAINER = "optimizer.pt"  # {"optimizer": ..., "scheduler": ...}


def read_weights(path: Path, model) -> dict[str, torch.Tensor]:
    """The stored weights, each tied parameter filled from its twin (the format stored tied tensors once)."""
    weights = load_file(str(path / WEIGHTS))
    expected = get_model_state_dict(model)
    for name, twin in _tied_names(model).items():
        if name in expected and name not in weights and twin in weights:
            weights[name] = weights[twin]
    return weights


def weight_reader(path: Path, model) -> Callable[[list[str]], dict[str, torch.Tensor]]:
    """Reads only the weights asked for, by name; a tied one from its stored twin."""
    twins = _tied_names(model)

    def read(names: list[str]) -> dict[str, torch.Tensor]:
        with safe_open(str(path / WEIGHTS), framework="pt") as stored:
            keys = set(stored.keys())
            return {name: stored.get_tensor(name if name in keys else twins[name]) for name in names}

    return read


def set_state(model, weights: dict[str, torch.Tensor], optimizer=None, optimizer_state: dict | None = None) -> None:
    """The weights (and, given an optimizer, its saved state) into the live objects, DDP/FSDP-wrapped or not:
    full state dicts, which set_state_dict shards as the run's strategy does."""
    full = StateDictOptions(full_state_dict=True)
    if optimizer is None:
        set_model_state_dict(model, weights, options=full)
        return
    # The saved state is keyed by the parameter's index in the optimizer's groups; set_state_dict wants names.
    name_of = {id(p): name for name, p in _named_parameters(model, remove_duplicate=True)}
    index_to_name = [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]
    optim_sd = {
        "state": {index_to_name[i]: st for i, st in optimizer_state["state"].items()},
        "param_groups": [{**g, "params": [index_to_name[i] for i in g["params"]]}
                         for g in optimizer_state["param_groups"]],
    }
    set_state_dict(model, optimizer, model_state_dict=weights, optim_state_dict=optim_sd, options=full)


def _named_parameters(model, remove_duplicate: bool):
    """(name, parameter) under the names state dicts use: no DDP prefix, no checkpoint-wrapper prefix."""
    from zeropad.parallel.sharding import unwrap

    for name, p in unwrap(model).named_parameters(remove_duplicate=remove_duplicate):
        yield name.replace(_CHECKPOINT_PREFIX, ""), p


def _tied_names(model) -> dict[str, str]:
    """Each tied parameter's name -> the name of another parameter that is the same tensor."""
    first: dict[int, str] = {}
    twins = {}
    for name, p in _named_parameters(model, remove_duplicate=False):
        if id(p) in first:
            twins[name] = first[id(p)]
            twins.setdefault(first[id(p)], name)
        else:
            first[id(p)] = name
    return twins
