"""Multi-process training plumbing: torchrun launch, process group, exact reductions.

A stage started with `train.nproc > 1` outside torchrun re-launches itself under
`python -m torch.distributed.run --standalone` (a free rendezvous port, so concurrent runs
never collide). Each process then joins a process group: gloo on CPU, nccl on CUDA.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from fcn.device import resolve_device
from fcn.errors import FcnError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Context:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def under_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def relaunch(nproc: int, script: str, args: Sequence[str]) -> int:
    """Run `script args` in `nproc` processes under torchrun; its exit code."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", script, *args]
    log.info("launching %d processes: %s", nproc, " ".join(command))
    return subprocess.run(command, check=False).returncode


def setup(device_choice: str) -> Context:
    """Join the process group when under torchrun; a 1-process context otherwise."""
    if not under_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return Context(0, 1, resolve_device(device_choice, setting="train.device"))
    local_rank = int(os.environ["LOCAL_RANK"])
    device = resolve_device(device_choice, local_rank, "train.device")
    if device.type == "cuda":
        if int(os.environ["LOCAL_WORLD_SIZE"]) > torch.cuda.device_count():
            raise FcnError(f"train.nproc {os.environ['LOCAL_WORLD_SIZE']} exceeds the "
                           f"{torch.cuda.device_count()} CUDA device(s) here: NCCL needs one "
                           "GPU per process (lower train.nproc, or set train.device to cpu)")
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Context(dist.get_rank(), dist.get_world_size(), device)


def teardown(context: Context) -> None:
    if context.distributed and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor, context: Context) -> torch.Tensor:
    """Sum over ranks, in place (int64 counts add up exactly)."""
    if context.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_rank(flag: bool, context: Context) -> bool:
    """True on every rank if it is True on any rank (so all ranks stop together)."""
    if not context.distributed:
        return flag
    value = torch.tensor([int(flag)], device=context.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def broadcast_buffers(module: nn.Module, context: Context) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank.

    Each rank updates its running statistics from its own batches, so after training they
    differ; validation on every rank must use the model rank 0 saves.
    """
    if context.distributed:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)
