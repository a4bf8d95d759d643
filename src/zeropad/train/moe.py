"""MoE routers during packed training: the load-balancing (aux) loss and per-layer expert load.

`RouterStats.attach(model, coef)` puts a public forward hook on every router module of the model.
The routers are the modules Hugging Face itself records `router_logits` from: the class (and the
index of the logits in its output) named by `_can_record_outputs["router_logits"]` of the decoder
(`model.get_decoder()`). A dense model has none, and gets None.

Aux loss of one forward (one pack), `pack_aux_loss()`: the Switch Transformer loss exactly as
transformers' `load_balancing_loss_func` computes it over one forward's rows,

    aux = coef * E * sum_e f_e * P_e,   f_e = (top-k assignments to e) / (L * T),
                                         P_e = (sum of softmax(router logits)[e]) / (L * T),

pooled over the L routed layers and the T tokens of the pack (every token of a pack is real: no
padding, so no attention mask). The assignments are the router's own selected experts; HF re-runs
top-k on its softmax, which selects the same experts (they differ only where bf16 logits tie).

Normalisation, consistent with the token loss (train/loss.py): each micro-step (one pack, one
forward) adds `pack_aux_loss() * T_pack / T_step`, where T_step is the number of tokens of the
whole optimizer step (all micro-steps, all ranks; tokens, not targets, since the router routes
prompt tokens too). The step's aux loss is then the token-weighted mean of the packs' HF values:
with one pack per step it is HF's value, and it does not depend on how the packs are spread over
micro-steps or ranks. It does depend on which documents share a pack: like HF's loss over a
micro-batch, it is the product of two pack-level means, so balance is asked of each pack as a
whole, not of each document. What is additive over documents is the routing itself: a pack's
expert counts are the sums of its documents' counts, since routing is per token.

Families whose config has no `router_aux_loss_coef` define no such loss in transformers; these
are the aux-loss-free routers (DeepSeek-V3, Kimi: sigmoid scores, group-limited top-k, an
`e_score_correction_bias` adjusted from the expert load). For them expert load is counted from
the selected experts and the aux loss is zero; a coef given there is ignored, with a warning.

Recording is on only inside a training-mode forward of the decoder (a pre-hook and a hook on
it), so evaluation forwards, and the layers that activation checkpointing re-runs in backward,
are not counted twice. Suffixes: T tokens, E experts, K selected experts per token, L layers.
"""

from __future__ import annotations

import math
import warnings

import torch

from zeropad.parallel import distributed, ulysses
from zeropad.parallel.sharding import unwrap


def _layer_number(qualified_name: str, ordinal: int) -> int:
    """The decoder layer index in a router's module name ("model.layers.3.mlp.gate" -> 3),
    so layers without a router (dense first layers) keep their real numbers in the metrics."""
    numbers = [part for part in qualified_name.split(".") if part.isdigit()]
    return int(numbers[-1]) if numbers else ordinal


def _router_recorders(decoder: torch.nn.Module) -> list:
    """HF's OutputRecorder(s) for `router_logits` of this decoder class; empty for a dense model."""
    recorders = getattr(type(decoder), "_can_record_outputs", None) or {}
    found = recorders.get("router_logits", [])
    return list(found) if isinstance(found, (list, tuple)) else [found]


def _selected_experts(output: tuple, logits_TE: torch.Tensor, top_k: int) -> torch.Tensor:
    """The experts the router chose [T, K]: its integer output (top-k indices), or top-k of the
    logits for a router that returns none."""
    for item in reversed(output):
        if isinstance(item, torch.Tensor) and not item.is_floating_point() and item.shape[0] == logits_TE.shape[0]:
            return item.reshape(logits_TE.shape[0], -1)
    return logits_TE.topk(top_k, dim=-1).indices


class RouterStats:
    """Collects router outputs of an MoE model during forwards, via register_forward_hook on the
    router modules (public hooks; no patching). See the module docstring for the formulas."""

    def __init__(self, decoder: torch.nn.Module, routers: list[tuple[int, torch.nn.Module, int]],
                 coef: float, top_k: int):
        self.coef, self.top_k = coef, top_k
        self._recording = False
        # per forward (aux loss): each routed layer's logits, kept by reference. The softmax runs in
        # pack_aux_loss, after the forward: an op run here would save tensors for backward that
        # activation checkpointing's recomputation (which is not recorded) would not save again.
        self._logits: list[torch.Tensor] = []
        self._assigned_E: torch.Tensor | None = None
        # since the last expert_load(): per layer, exact integer counts, on the device (no host sync)
        self._load_E: dict[int, torch.Tensor] = {}
        self._handles = [
            decoder.register_forward_pre_hook(self._start_forward),
            decoder.register_forward_hook(self._end_forward),
        ]
        for layer, router, logits_index in routers:
            self._handles.append(router.register_forward_hook(self._recorder(layer, logits_index)))

    @classmethod
    def attach(cls, model: torch.nn.Module, coef: float | None) -> RouterStats | None:
        """Hooks on the routers of `model` (a DDP wrapper, PEFT model or FSDP2 model is fine);
        None for a dense model. coef None: the text config's router_aux_loss_coef."""
        model = unwrap(model)
        decoder = model.get_decoder()
        classes = {rec.target_class: rec.index for rec in _router_recorders(decoder) if rec.target_class}
        routers = [
            (name, module, classes[type(module)]) for name, module in decoder.named_modules()
            if type(module) in classes
        ]
        if not routers:
            return None
        config = model.config.get_text_config()
        defines_aux = hasattr(config, "router_aux_loss_coef")
        if not defines_aux and coef:
            warnings.warn(f"moe: {config.model_type} defines no load-balancing loss (aux-loss-free routing); "
                          f"coef={coef} is ignored, expert load is still counted", stacklevel=2)
        coef = (config.router_aux_loss_coef if coef is None else coef) if defines_aux else 0.0
        numbered = [(_layer_number(name, i), module, index) for i, (name, module, index) in enumerate(routers)]
        return cls(decoder, numbered, float(coef), config.num_experts_per_tok)

    def detach(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _start_forward(self, decoder: torch.nn.Module, args) -> None:
        self._recording = decoder.training
        self._clear_forward()

    def _end_forward(self, decoder: torch.nn.Module, args, output) -> None:
        self._recording = False

    def _clear_forward(self) -> None:
        self._logits, self._assigned_E = [], None

    def _recorder(self, layer: int, logits_index: int):
        def record(router: torch.nn.Module, args, output) -> None:
            if not self._recording:
                return
            output = output if isinstance(output, tuple) else (output,)
            logits = output[logits_index]
            with torch.no_grad():  # scatter_add_, not bincount: no device-to-host sync
                logits_TE = logits.reshape(-1, logits.shape[-1])
                selected_TK = _selected_experts(output, logits_TE, self.top_k).reshape(-1)
                counts_E = torch.zeros(logits_TE.shape[-1], dtype=torch.int64, device=logits_TE.device)
                counts_E.scatter_add_(0, selected_TK, torch.ones_like(selected_TK))
            self._load_E[layer] = self._load_E[layer] + counts_E if layer in self._load_E else counts_E
            if self.coef:
                self._logits.append(logits)
                self._assigned_E = counts_E if self._assigned_E is None else self._assigned_E + counts_E
        return record

    def pack_aux_loss(self) -> torch.Tensor:
        """The load-balancing loss of the forward that just ran, coef included (a scalar with a graph
        to the router weights; zero when coef is 0 or the family has none); clears it."""
        if not self._logits:
            device = next(iter(self._load_E.values())).device if self._load_E else None
            return torch.zeros((), device=device)
        # as load_balancing_loss_func: both means pooled over all routed layers' rows
        logits_LTE = [logits.reshape(-1, logits.shape[-1]).float() for logits in self._logits]
        prob_sum_E = sum(torch.softmax(logits_TE, dim=-1).sum(0) for logits_TE in logits_LTE)
        # new_full, not new_tensor: a fill on the device, where a copy from the host would wait for it
        num_rows = prob_sum_E.new_full((), float(sum(logits_TE.shape[0] for logits_TE in logits_LTE)))
        sums = torch.cat([prob_sum_E, self._assigned_E.float(), num_rows[None]])
        # sequence parallelism: the pack's sums over its SP group's token ranges; each rank adds 1/K of the loss
        sums = ulysses.group_sum(sums)
        share = 1 if ulysses.active() is None else ulysses.active().size
        num_experts = prob_sum_E.shape[0]
        prob_E, fraction_E = sums[:num_experts] / sums[-1], sums[num_experts:-1] / sums[-1]
        loss = self.coef * num_experts * (fraction_E * prob_E).sum() / share
        self._clear_forward()
        return loss

    def take_counts(self) -> tuple[list[int], torch.Tensor] | None:
        """(routed layer numbers, this process's expert counts [L, E] as float64 on the device) over every
        training forward since the last call, then reset; None when nothing was routed. Nothing is read to the
        host: the training step sums these over ranks and reads them with its other statistics (train/step.py)."""
        if not self._load_E:
            return None
        layers = sorted(self._load_E)
        counts_LE = torch.stack([self._load_E[layer] for layer in layers]).double()
        self._load_E = {}
        return layers, counts_LE

    def expert_load(self) -> dict[str, float]:
        """`load_metrics` of the counts since the last call (`take_counts`), summed over ranks under torchrun
        (a collective: call it on every rank); {} when nothing was routed."""
        taken = self.take_counts()
        if taken is None:
            return {}
        layers, counts_LE = taken
        return load_metrics(layers, distributed.sum_over_ranks(counts_LE).flatten().tolist())


def load_metrics(layers: list[int], counts: list[float]) -> dict[str, float]:
    """Per routed layer, from the expert counts (host numbers, [L, E] flattened): the busiest expert's token count
    over the mean count (1.0: balanced; E/K: every token to the same K experts). Also `expert_load_max` (the worst
    layer) and `expert_load_min` (the idlest expert of any layer over its layer's mean; 0.0: an expert got no
    token)."""
    num_experts = len(counts) // len(layers)
    metrics, idlest = {}, math.inf
    for i, layer in enumerate(layers):
        counts_E = counts[i * num_experts:(i + 1) * num_experts]
        mean = sum(counts_E) / len(counts_E)
        metrics[f"expert_load_max/layer_{layer}"] = max(counts_E) / mean
        idlest = min(idlest, min(counts_E) / mean)
    metrics["expert_load_max"] = max(metrics.values())
    metrics["expert_load_min"] = idlest
    return metrics
