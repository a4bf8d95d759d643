"""LoRA adapters through peft (`model.lora`), and the export that merges them back into the weights.

Adapters are added after the model is built and before checkpointing wraps its layers, so peft
matches module names of the unwrapped model. Only the adapter weights train; the attention
backend and the packing path are unchanged, so packed exactness holds with adapters.
"""

from __future__ import annotations

import torch

from zeropad.config import LoraConfig
from zeropad.errors import ConfigError


def _peft():
    try:
        import peft
    except ImportError:
        raise ConfigError("model.lora needs peft: pip install 'zeropad[lora]' (or set model.lora: null)") from None
    return peft


def is_adapted(model: torch.nn.Module) -> bool:
    # The class's bases too: FSDP2's fully_shard gives the model a subclass of its class, defined in torch.
    return any(cls.__module__.startswith("peft.") for cls in type(model).__mro__)


def apply_lora(model: torch.nn.Module, cfg: LoraConfig | None, seed: int | None = None) -> torch.nn.Module:
    """The model with LoRA adapters on `cfg.target_modules` (base weights frozen), or `model` itself
    when `cfg` is None. peft's default init (B = 0) makes the adapted model start equal to the base; with `seed`,
    the adapters' random init depends on it alone, not on how the base model was built (meta or not)."""
    if cfg is None:
        return model
    peft = _peft()
    lora = peft.LoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=cfg.target_modules,
        task_type="CAUSAL_LM",
    )
    shared = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is shared
    try:
        model = peft.get_peft_model(model, lora)
    except ValueError as err:  # peft names unmatched target modules in its ValueError
        raise ConfigError(f"model.lora.target_modules: {err}") from None
    on_shared = [name for name, layer in adapter_layers(model)
                 if tied and getattr(layer.get_base_layer(), "weight", None) is shared]
    if on_shared:
        # Training adapts one use of the weight (the head's, or the lookup's); merging it for final/ changes both
        name = on_shared[0].removeprefix("base_model.model.")
        raise ConfigError(f"model.lora.target_modules adapts {name}, whose weight is the input embedding's too "
                          "(tie_word_embeddings): its adapter cannot be merged into the one shared weight; leave it "
                          "out of target_modules")
    if seed is not None:
        init_adapters(model, seed)
    return model


def adapter_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """peft's LoRA layers by name, in the order peft created (and initialised) them."""
    from peft.tuners.lora import LoraLayer

    return [(name, module) for name, module in model.named_modules() if isinstance(module, LoraLayer)]


def init_adapters(model: torch.nn.Module, seed: int) -> None:
    """peft's own adapter init (`reset_lora_parameters`), layer by layer in peft's order, from `seed` alone: the
    same adapters whether the base model was built whole or on the meta device and sharded."""
    torch.manual_seed(seed)
    for _, layer in adapter_layers(model):
        for adapter in layer.lora_A:
            layer.reset_lora_parameters(adapter, True)


def merged_for_export(model: torch.nn.Module) -> torch.nn.Module:
    """A plain Hugging Face model to save to final/: with adapters, they are merged into the base
    weights (W + alpha/r * B A) and removed, so `AutoModelForCausalLM.from_pretrained` loads it with
    no peft. The merge is in place (no second copy of the model): call it once training is over."""
    if not is_adapted(model):
        return model
    return model.merge_and_unload()
