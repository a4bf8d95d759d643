"""A Hugging Face model directory written one shard at a time: final/ and `zeropad export` never hold the
whole model, on any rank.

`save_pretrained` needs the whole state dict at once (under FSDP: every weight gathered to one rank, into a
second model). `save_hf_model` writes the files it would write, planned from names, shapes and dtypes alone
(a model on the meta device is enough):

  - the names save_pretrained saves: tied weights once (the tied copy dropped, as `all_tied_weights_keys`
    says), transformers' own `revert_weight_conversion` applied (an MoE's fused experts saved per expert, a
    Qwen2.5-VL's `model.language_model.*` saved as `model.*`), LoRA adapters merged into their base weights
    (W + scaling * B A, peft's Linear merge) with no peft names left;
  - the same greedy split (huggingface_hub's, as `split_torch_state_dict_into_shards`): one `model.safetensors`
    when the model fits in `max_shard_size`, else `model-0000k-of-0000n.safetensors` and
    `model.safetensors.index.json`;
  - config.json (with save_pretrained's `dtype` and `architectures`) and generation_config.json.

Then it fills the shards in order: it loads the tensors one shard needs (under FSDP each is gathered alone,
`DTensor.full_tensor()`, a collective every rank calls in the same order; from a checkpoint only those keys
are read), writes the shard and lets it go. It holds at most one shard plus the one model tensor whose saved
pieces run over into the next shard (an MoE's fused experts); for a model whose conversion combines a layer's
tensors into one saved tensor (Kimi-K2.5's vision q, k, v saved as wqkv), one shard plus one layer.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
from huggingface_hub import get_torch_storage_size, split_state_dict_into_shards_factory
from safetensors.torch import save_file
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import _CHECKPOINT_PREFIX
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from transformers import PreTrainedModel
from transformers.core_model_loading import revert_weight_conversion
from transformers.dynamic_module_utils import custom_object_save

from zeropad.errors import ZeropadError
from zeropad.model.lora import is_adapted

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
_LAYER = re.compile(r".*?\.\d+\.")  # up to a layer's index: model.layers.3.

# State-dict names -> those tensors, whole (gathered if sharded). Under FSDP every rank calls it, with the same
# names in the same order.
Load = Callable[[list[str]], dict[str, torch.Tensor]]


class _Lora(NamedTuple):
    a: str  # state-dict names of the adapter's A and B
    b: str
    scaling: float
    fan_in_fan_out: bool


class _Tensor(NamedTuple):
    """One tensor of the Hugging Face model's own state dict: where it comes from in the trained model's."""

    name: str  # state-dict name of the base weight
    lora: _Lora | None  # the adapter merged into it, if any


def save_hf_model(model: torch.nn.Module, out_dir: str | Path, max_shard_size: int | str, *,
                  load: Load | None = None, write: bool = True) -> list[str]:
    """Write `model` to out_dir as save_pretrained would (see the module doc) and return the weight files.

    model: the model as trained (LoRA-adapted or not, activation-checkpointed or not; not DDP-wrapped): its
      tensors plain, FSDP-sharded DTensors, or on the meta device when `load` reads them elsewhere.
    load: the whole tensors by state-dict name (default: the model's own, each DTensor gathered).
    write: whether this rank writes; under FSDP every rank calls this (the gathers are collectives) and only
      one writes. The other ranks load and drop each tensor, and hold nothing longer."""
    hf_model = model.get_base_model() if is_adapted(model) else model
    own = model.state_dict()
    tensors = _hf_tensors(model, own)
    load = load or (lambda names: {name: _whole(own[name]) for name in names})
    meta = {name: torch.empty(own[t.name].shape, dtype=own[t.name].dtype, device="meta")
            for name, t in tensors.items()}
    namer = _unsharded(hf_model)
    whole = revert_weight_conversion(namer, dict(meta))  # the names and order save_pretrained writes
    groups, saved = _conversion_groups(namer, meta, whole)
    # Saved pieces that are views of one tensor (an MoE's experts, cut from their fused tensor) share a storage:
    # save_pretrained's split keeps them in one file and counts that storage once. Their meta views tell the same.
    split = split_state_dict_into_shards_factory(
        whole, get_storage_size=get_torch_storage_size, filename_pattern="model{suffix}.safetensors",
        get_storage_id=lambda t: id(t._base) if t._base is not None else id(t), max_shard_size=max_shard_size)
    files = list(split.filename_to_tensors)
    file_index = {key: files.index(file) for file, keys in split.filename_to_tensors.items() for key in keys}
    first_file = {group: files[min(file_index[key] for key in pieces)] for group, pieces in saved.items()}
    out = Path(out_dir)
    if write:
        _write_configs(hf_model, namer, out)
        _remove_stale_weights(out, set(files))
    pending: dict[str, torch.Tensor] = {}  # saved tensors loaded, not yet written
    for file, keys in split.filename_to_tensors.items():
        for group in [g for g in saved if first_file[g] == file]:
            for name in groups[group]:
                loaded = load(_sources(tensors[name]))  # every rank: the gathers are collectives
                if write:
                    pending[name] = _merged(tensors[name], loaded)
                del loaded
            if write:
                pending.update(revert_weight_conversion(namer, {n: pending.pop(n) for n in groups[group]}))
        if write:
            save_file({key: pending.pop(key).contiguous() for key in keys}, str(out / file), metadata={"format": "pt"})
    if write and split.is_sharded:
        total_parameters = sum(p.numel() for n, p in hf_model.named_parameters() if ".lora_" not in n)
        index = {"metadata": {"total_parameters": total_parameters, **split.metadata},
                 "weight_map": split.tensor_to_filename}
        (out / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return list(split.filename_to_tensors)


def _conversion_groups(hf_model, meta: dict[str, torch.Tensor], whole: dict[str, torch.Tensor]):
    """(group -> the model's tensor names, group -> its saved pieces), groups in save_pretrained's order, such
    that reverting each group alone gives what reverting the whole model gives. One tensor each when that holds
    (an MoE's fused experts split into pieces); else one layer each (Kimi's vision q, k, v saved as one wqkv)."""
    for unit in (lambda name: name, lambda name: _LAYER.match(name).group(0) if _LAYER.match(name) else name):
        groups: dict[str, list[str]] = {}
        for name in meta:
            groups.setdefault(unit(name), []).append(name)
        saved = {group: revert_weight_conversion(hf_model, {n: meta[n] for n in names}) for group, names in groups.items()}
        group_of = {key: group for group, pieces in saved.items() for key in pieces}
        order = list(dict.fromkeys(group_of[key] for key in whole if key in group_of))
        pieces = [(key, tuple(t.shape)) for group in order for key, t in saved[group].items()]
        if pieces == [(key, tuple(t.shape)) for key, t in whole.items()]:
            return groups, {group: saved[group] for group in order}
    raise ZeropadError(f"{type(hf_model).__name__}: transformers' weight conversion of this model combines tensors "
                       "of different layers; writing it one shard at a time is not supported")


def weight_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of a Hugging Face model directory, single file or sharded."""
    model_dir = Path(model_dir)
    if (model_dir / INDEX).is_file():
        files = json.loads((model_dir / INDEX).read_text())["weight_map"].values()
        return [model_dir / file for file in sorted(set(files))]
    return [model_dir / WEIGHTS]


def _hf_tensors(model: torch.nn.Module, own: dict[str, torch.Tensor]) -> dict[str, _Tensor]:
    """The Hugging Face model's state-dict names (no peft names, tied copies dropped) -> their sources."""
    adapted = is_adapted(model)
    hf_model = model.get_base_model() if adapted else model
    tied = set(getattr(hf_model, "all_tied_weights_keys", None) or {})
    modules = {name.replace(_CHECKPOINT_PREFIX, ""): m for name, m in model.named_modules()}
    tensors = {}
    for name in own:
        if adapted and ".lora_" in name:  # merged into their base weight below
            continue
        hf_name = name.removeprefix("base_model.model.").replace(".base_layer.", ".") if adapted else name
        if hf_name in tied:
            continue
        lora = None
        if adapted and name.endswith(".base_layer.weight"):
            lora = _adapter(name.removesuffix(".base_layer.weight"), modules)
        tensors[hf_name] = _Tensor(name, lora)
    return tensors


def _adapter(layer: str, modules: dict[str, torch.nn.Module]) -> _Lora | None:
    from peft.tuners.lora import Linear, LoraLayer

    module = modules[layer]
    if not isinstance(module, LoraLayer):
        return None
    if not isinstance(module, Linear):
        raise ZeropadError(f"{layer}: LoRA on {type(module).__name__} layers cannot be merged for export "
                           "(Linear layers only); set model.lora.target_modules to linear layers")
    (adapter,) = module.active_adapters  # zeropad adds one adapter
    return _Lora(f"{layer}.lora_A.{adapter}.weight", f"{layer}.lora_B.{adapter}.weight",
                 module.scaling[adapter], module.fan_in_fan_out)


def _sources(tensor: _Tensor) -> list[str]:
    return [tensor.name] if tensor.lora is None else [tensor.name, tensor.lora.a, tensor.lora.b]


def _merged(tensor: _Tensor, loaded: dict[str, torch.Tensor]) -> torch.Tensor:
    """The base weight with its adapter merged in (peft's Linear.get_delta_weight and merge), on the host."""
    weight = loaded[tensor.name].cpu()
    if tensor.lora is None:
        return weight
    delta = loaded[tensor.lora.b].cpu() @ loaded[tensor.lora.a].cpu()
    return weight + (delta.T if tensor.lora.fan_in_fan_out else delta) * tensor.lora.scaling


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    if not isinstance(tensor, DTensor):
        return tensor
    if tensor.device.type != tensor.device_mesh.device_type:  # cpu_offload: NCCL gathers on the device
        tensor = tensor.to(tensor.device_mesh.device_type)
    return tensor.full_tensor()


def _unsharded(hf_model):
    """The model as transformers knows it. FSDP2 swaps a sharded model's class for one it makes on the fly
    (FSDP<Name>, defined in torch), which transformers takes for remote code of an unknown class: its weight
    conversions (the names save_pretrained writes) and its architecture name would be lost. A meta-device
    instance of the original class (shapes only, no memory) answers for it."""
    if not isinstance(hf_model, FSDPModule):
        return hf_model
    cls = next(c for c in type(hf_model).__mro__ if issubclass(c, PreTrainedModel) and not issubclass(c, FSDPModule))
    with torch.device("meta"):
        return cls(hf_model.config)


def _write_configs(hf_model, unsharded, out: Path) -> None:
    """config.json and generation_config.json as save_pretrained writes them; `unsharded`: `_unsharded(hf_model)`."""
    out.mkdir(parents=True, exist_ok=True)
    config = hf_model.config
    config.dtype = str(hf_model.dtype).split(".")[1]  # as save_pretrained sets them
    config.architectures = [type(unsharded).__name__]
    if unsharded.is_remote_code():
        custom_object_save(unsharded, out, config=config)
    config.save_pretrained(out)
    if hf_model.can_generate():
        hf_model.generation_config.save_pretrained(out)


def _remove_stale_weights(out: Path, files: set[str]) -> None:
    """Weight files of an earlier save into the same directory that this one does not rewrite: left there,
    a stale index or shard would be loaded instead of, or beside, the new weights."""
    for path in [*out.glob("model*.safetensors"), out / INDEX]:
        if path.is_file() and path.name not in files:
            path.unlink()
