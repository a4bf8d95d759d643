"""bf16 (autocast, fp32 weights): each weight is cast to bf16 once per optimizer step, however many micro-steps,
and the gradients are those of casting it in every micro-step."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tinymodels import tiny_model
from zeropad.model.checkpointing import activation_context, apply_checkpointing
from zeropad.config import MemoryConfig
from zeropad.pack.collate import collate
from zeropad.train.step import StepSetup, accumulate_gradients
from zeropad.verify import random_documents

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class WeightCasts(TorchDispatchMode):
    """Counts fp32 -> bf16 copies of the model's weights (matched by storage)."""

    def __init__(self, model):
        super().__init__()
        self.weights = {p.data_ptr() for p in model.parameters()}
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (func is torch.ops.aten._to_copy.default and kwargs.get("dtype") == torch.bfloat16
                and args[0].data_ptr() in self.weights):
            self.count += 1
        return func(*args, **kwargs)


def _grads(checkpointing: str, cache: bool) -> tuple[list[torch.Tensor], int, int]:
    """(gradients, weight casts, matmul weights) of one optimizer step of three micro-steps under bf16 autocast."""
    model = tiny_model("qwen3")
    if checkpointing != "none":
        apply_checkpointing(model, checkpointing)
    packs = [collate(random_documents(model.config.vocab_size, lengths, seed=i))
             for i, lengths in enumerate([[9, 14], [11], [6, 8, 5]])]
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=cache)
    setup = StepSetup(model, autocast=autocast, activations=activation_context(MemoryConfig(checkpointing=checkpointing),
                                                                               torch.device("cpu")))
    with WeightCasts(model) as casts:
        accumulate_gradients(setup, packs)
    linears = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    return [p.grad.clone() for p in model.parameters()], casts.count, linears


@pytest.mark.parametrize("checkpointing", ["none", "full"])
def test_weights_are_cast_once_per_step(checkpointing):
    grads, casts, linears = _grads(checkpointing, cache=True)
    assert casts == linears  # each Linear's weight, once for three micro-steps (and the recomputes)
    # negative control: without autocast's cache every forward (and recompute) casts again, and the count sees it
    reference, uncached, _ = _grads(checkpointing, cache=False)
    assert uncached >= 3 * linears
    assert all(torch.equal(g, r) for g, r in zip(grads, reference, strict=True))
