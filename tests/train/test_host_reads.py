"""A training step reads the device once: its statistics (loss, aux loss, grad norm, an MoE's expert load), in one
`.tolist()`.

Reads are counted with a public torch.overrides.TorchFunctionMode over one `train_step` on CPU, where a read is
any Tensor method that hands a value to Python (on a GPU each is a host sync). The pack's device copy of its
boundaries is a distinct tensor here (a clone), as it is on a GPU, so that a read of it would count; the one
read let through is of the pack's host copy (`Pack.cu_seqlens_cpu`), which never leaves the host. Syncs inside
an op (nonzero, boolean indexing, a blocking copy to the GPU) are no Python read and go uncounted here; the sync
check of benchmarks/gpu_throughput.py counts those on a GPU."""

import dataclasses

import pytest
import torch
from torch.overrides import TorchFunctionMode

from tinymodels import tiny_model
from zeropad.config import TrainConfig
from zeropad.data.preference import Pair
from zeropad.pack.collate import collate
from zeropad.train.step import StepSetup, train_step
from zeropad.train.moe import RouterStats
from zeropad.train.preference import PreferenceObjective, collate_pairs
from zeropad.train.optim import build_optimizer, build_scheduler
from zeropad.verify import random_documents

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__int__,
         torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.numpy, torch.Tensor.cpu}


class HostReads(TorchFunctionMode):
    """Records (method name, tensor) of every read of a tensor that is not one of `host` (by identity)."""

    def __init__(self, host: list[torch.Tensor]):
        super().__init__()
        self.host, self.reads = host, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in READS and not any(args[0] is t for t in self.host):
            self.reads.append(func.__name__)
        return func(*args, **(kwargs or {}))


def _packs(vocab_size: int, host_copy: bool = True, pairs: bool = False):
    """(packs, their host copies of the boundaries); without `host_copy` the packs' own is their device copy.
    With `pairs`, documents 2i and 2i+1 are a preference pair's answers."""
    docs = [random_documents(vocab_size, lengths, seed=i) for i, lengths in enumerate([[7, 12, 5, 6], [9, 4]])]
    packs = [collate_pairs([Pair(*d[i:i + 2]) for i in range(0, len(d), 2)]) if pairs else collate(d) for d in docs]
    host = [p.cu_seqlens_cpu for p in packs]
    # as after .to(cuda): the device copy is another tensor than the host copy
    device_copies = [p.cu_seqlens.clone() for p in packs]
    return [dataclasses.replace(p, cu_seqlens=cu, cu_seqlens_cpu=p.cu_seqlens_cpu if host_copy else cu)
            for p, cu in zip(packs, device_copies)], host


def _step(model_type: str, chunk_tokens: int | None = None, objective: str | None = None, host_copy: bool = True,
          hook=None, **overrides) -> list[str]:
    model = tiny_model(model_type, **overrides)
    cfg = TrainConfig(grad_clip=1.0)
    optimizer = build_optimizer(model, cfg)
    setup = StepSetup(model, optimizer, build_scheduler(optimizer, cfg), grad_clip=cfg.grad_clip,
                      loss_chunk_tokens=chunk_tokens, router=RouterStats.attach(model, None),
                      objective=objective and PreferenceObjective(objective, beta=0.1))
    packs, host = _packs(model.config.vocab_size, host_copy, pairs=objective is not None)
    handle = model.model.norm.register_forward_hook(hook) if hook else None
    with HostReads(host) as mode:
        result = train_step(setup, packs)
    if handle:
        handle.remove()
    assert not result.skipped and result.loss > 0 and result.grad_norm > 0
    moe = model_type == "qwen3_moe"
    assert (result.aux_loss > 0) == moe and (result.expert_load.get("expert_load_max", 0) > 1) == moe
    return mode.reads


@pytest.mark.parametrize("model_type, chunk_tokens, objective",
                         [("qwen3", None, None), ("qwen3_moe", None, None), ("qwen3", 8, None), ("qwen3", None, "simpo")])
def test_one_read_per_step(model_type, chunk_tokens, objective):
    assert _step(model_type, chunk_tokens, objective) == ["tolist"]  # the step's stats, once


def test_the_count_sees_other_reads():
    """Negative controls: a read injected through a public forward hook, and the attention reading the device
    copy of the boundaries (a pack without its host copy: once per layer and micro-step) are both counted. The
    latter with attention dropout, whose per-document loop runs in Python: the CPU kernel's loop runs inside a
    custom op, below this mode, and takes the same boundaries (model/attention.py picks them for every backend)."""
    def read(module, args, output):
        output.sum().item()

    assert _step("qwen3", hook=read) == ["item"] * 2 + ["tolist"]
    assert _step("qwen3", host_copy=False, attention_dropout=0.1) == ["tolist"] * (2 * 2 + 1)  # 2 layers x 2 packs
    assert _step("qwen3", attention_dropout=0.1) == ["tolist"]


def test_a_non_finite_step_changes_nothing():
    """The one read decides the update: a step whose loss is NaN leaves the weights, Adam's state and the
    schedule as they were."""
    model = tiny_model("qwen3")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = TrainConfig()
    optimizer = build_optimizer(model, cfg)
    setup = StepSetup(model, optimizer, build_scheduler(optimizer, cfg))
    handle = model.model.norm.register_forward_hook(lambda module, args, output: output * torch.nan)
    result = train_step(setup, _packs(model.config.vocab_size)[0])
    handle.remove()
    assert result.skipped and not optimizer.state and setup.scheduler.last_epoch == 0
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert not train_step(setup, _packs(model.config.vocab_size)[0]).skipped and len(optimizer.state) == len(before)
