"""The process group, the device, and rank/world helpers.

Under torchrun (RANK, WORLD_SIZE, LOCAL_RANK in the environment) `init` joins the default process
group: NCCL on CUDA, gloo on CPU. Without torchrun the run is one process and nothing is
initialised; every helper then answers as rank 0 of 1. Errors are not caught here: an exception
on any rank ends that rank with its traceback, and torchrun (or the test launcher) ends the others.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

# How long a collective waits for a missing rank before failing (instead of hanging forever).
DEFAULT_TIMEOUT = timedelta(minutes=10)


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Rank 0: the one process that prints the progress bar and writes logs, plots and the final model."""
    return rank() == 0


def device_for(requested: str) -> torch.device:
    """`train.device` resolved for this process: under torchrun on CUDA, the GPU of LOCAL_RANK."""
    kind = ("cuda" if torch.cuda.is_available() else "cpu") if requested == "auto" else requested
    if kind == "cuda" and under_torchrun():
        return torch.device("cuda", local_rank())
    return torch.device(kind)


def init(device: torch.device, timeout: timedelta = DEFAULT_TIMEOUT, single: bool = False) -> None:
    """Join the torchrun process group (once); a no-op for a single process, unless `single`: then a group of
    this process alone (FSDP2 on one GPU, for parallel.cpu_offload, needs a process group)."""
    if is_initialized() or not (under_torchrun() or single):
        return
    store = {} if under_torchrun() else {"store": dist.HashStore(), "rank": 0, "world_size": 1}
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
        torch.cuda.set_device(device)
        # gloo beside NCCL: parallel.cpu_offload keeps FSDP shards in host memory, and gathering them (final/,
        # checkpoints) is a collective on CPU tensors
        dist.init_process_group("cpu:gloo,cuda:nccl", timeout=timeout, device_id=device, **store)
    else:
        dist.init_process_group("gloo", timeout=timeout, **store)


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def teardown() -> None:
    if is_initialized():
        dist.destroy_process_group()


def host_collective_device(device: torch.device) -> torch.device:
    """Where a collective over host numbers runs: the CPU where the group has a CPU backend (gloo: on CPU, and
    beside NCCL as `init` joins on CUDA), so the device is never waited for; else `device`."""
    return torch.device("cpu") if is_initialized() and "cpu:" in dist.get_backend_config() else device


def all_reduce_sum(value: float | int, device: torch.device) -> float:
    """The sum over ranks of a host number, through torch.distributed.all_reduce (float64), on the CPU where the
    group allows (host_collective_device): each step sums its target count and the stop flag this way."""
    if not is_initialized():
        return value
    t = torch.tensor(float(value), dtype=torch.float64, device=host_collective_device(device))
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.item()


def sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` summed over ranks (all_reduce, in place; on NCCL it is queued on the device, no host sync);
    itself in one process."""
    if is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def data_parallel_mesh(device: torch.device, replicate: int, shard: int | None):
    """The 2-D (replicate, shard) DeviceMesh for HSDP over all ranks; ValueError naming the numbers when they do
    not multiply to the world size."""
    from torch.distributed.device_mesh import init_device_mesh

    shard = shard or world_size() // replicate
    if replicate * shard != world_size():
        raise ValueError(f"parallel.replicate ({replicate}) x parallel.shard ({shard}) must equal the number of "
                         f"processes ({world_size()})")
    return init_device_mesh(device.type, (replicate, shard), mesh_dim_names=("replicate", "shard"))
