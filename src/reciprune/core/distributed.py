"""The few facts about the process group that modifiers and pipelines need.

A run is launched by `torchrun` (RANK / WORLD_SIZE / LOCAL_RANK in the environment) or is a plain
single process; both go through the same functions, which degrade to the single-process answer
when no process group is initialised.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True when a process group with more than one process is initialised."""
    return world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    return rank() == 0


def launched_by_torchrun() -> bool:
    """True in a process started by torchrun (or any launcher that sets its variables)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The part of `tensor` this process holds: the local shard of an FSDP2 DTensor parameter
    (or gradient), the tensor itself otherwise. In-place edits of the result edit the shard."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def _reduce(values: torch.Tensor) -> torch.Tensor:
    out = values.detach().clone()
    if not is_distributed():
        return out
    # NCCL reduces CUDA tensors only; gloo reduces CPU tensors.
    work = out.cuda() if dist.get_backend() == "nccl" else out.cpu()
    dist.all_reduce(work, op=dist.ReduceOp.SUM)
    return work.to(values.device)


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean of `values` over the processes (a copy; `values` itself is unchanged)."""
    return _reduce(values.double() if not values.is_floating_point() else values) / world_size()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum of `values` over the processes (a copy)."""
    return _reduce(values)
