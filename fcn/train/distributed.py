"""Multi-process training plumbing: torchrun launch, process group, exact reductions.

A stage started outside torchrun with `train.nproc > 1` or `train.max_restarts > 0` re-launches
itself under `python -m torch.distributed.run --standalone` (a free rendezvous port, so
concurrent runs never collide). Each process then joins a process group: gloo on CPU, nccl on
CUDA. With `--max-restarts N`, torchrun stops the whole group when any worker fails and starts
it again, up to N times; every restarted process resumes from the run's last checkpoint (the
end of the last completed epoch), so a restart costs at most one epoch.

No process outlives the one that started it (Linux, `fcn.lifetime`): torchrun gets SIGTERM
when the stage process dies, and each worker SIGKILL when torchrun dies; the stage itself dies
with DVC. Without that, a stage killed by SIGKILL (the OOM killer, `kill -9` of `dvc repro`'s
process group) left torchrun's workers training on in sessions of their own, holding their
GPUs and the training state's lock.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from fcn.device import cuda_count, resolve_device, set_current
from fcn.errors import FcnError
from fcn.lifetime import die_with_parent, prctl

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


UNSHARED_STORE = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"
"""By default (torch >= 2.5) torchrun's c10d rendezvous shares one store with the workers and
keeps it across restarts, so a restarted group can read the addresses the failed group
published and its process group fails to connect or hangs (pytorch/pytorch#135712; seen with
torch 2.14 in 3 of 4 gloo restarts). Set to 1, each rendezvous round gets a fresh store."""


def under_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def needs_launch(nproc: int, max_restarts: int) -> bool:
    """Whether a stage must re-launch itself under torchrun: several processes, or torchrun's
    restarts asked for (one process included: torchrun then restarts it after a crash)."""
    return (nproc > 1 or max_restarts > 0) and not under_torchrun()


def relaunch(nproc: int, script: str, args: Sequence[str], max_restarts: int = 0) -> int:
    """Run `script args` in `nproc` processes under torchrun on this machine; its exit code
    (0 once a group finishes; non-zero when a worker fails after `max_restarts` restarts).

    With restarts, torchrun gets `TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1` (unless set): see
    UNSHARED_STORE.

    torchrun starts each worker in a session of its own, so a signal for this process does not
    reach them: SIGTERM is passed on to torchrun, which stops its workers before it exits, and
    SIGINT is ignored here while torchrun runs (as `dvc repro` does for a stage's command: a
    terminal's Ctrl-C reaches torchrun directly, and a second signal would cut short its
    shutdown of the workers).
    """
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", f"--max-restarts={max_restarts}", script, *args]
    env = dict(os.environ)
    if max_restarts > 0:
        env.setdefault(UNSHARED_STORE, "1")
    log.info("launching %d process%s (torchrun, %d restart%s): %s", nproc,
             "" if nproc == 1 else "es", max_restarts, "" if max_restarts == 1 else "s",
             " ".join(command))
    # torchrun gets SIGTERM when this process dies (it then stops its workers); started
    # before the handlers below, it keeps the default ones
    die_with_stage = functools.partial(die_with_parent, prctl(), int(signal.SIGTERM),
                                       os.getpid())
    process = subprocess.Popen(command, env=env, preexec_fn=die_with_stage)
    if threading.current_thread() is not threading.main_thread():  # no handlers here
        return process.wait()

    def forward(signum: int, _frame: object) -> None:
        process.send_signal(signum)

    previous = (signal.signal(signal.SIGTERM, forward),
                signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        return process.wait()
    finally:
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGINT, previous[1])


def setup(device_choice: str) -> Context:
    """Join the process group when under torchrun; a 1-process context otherwise. A process
    that torchrun restarted says so (rank 0): the run then resumes from its last checkpoint.
    Under torchrun the process dies with torchrun (SIGKILL): an orphaned worker would train
    on alone, or wait forever in a collective, holding its GPU and the state folder's lock."""
    if under_torchrun():
        die_with_parent(prctl(), int(signal.SIGKILL), os.getppid())
    if not under_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        _log_restart(0)
        return Context(0, 1, resolve_device(device_choice, setting="train.device"))
    local_rank = int(os.environ["LOCAL_RANK"])
    device = resolve_device(device_choice, local_rank, "train.device")
    if device.type == "cuda":
        if int(os.environ["LOCAL_WORLD_SIZE"]) > cuda_count():
            raise FcnError(f"train.nproc {os.environ['LOCAL_WORLD_SIZE']} exceeds the "
                           f"{cuda_count()} CUDA device(s) here: NCCL needs one "
                           "GPU per process (lower train.nproc, or set train.device to cpu)")
        set_current(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    _log_restart(dist.get_rank())
    return Context(dist.get_rank(), dist.get_world_size(), device)


def _log_restart(rank: int) -> None:
    """On rank 0: say that this is a restart, and warn where restarts can hang."""
    if rank != 0:
        return
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if restart > 0:
        log.warning("torchrun restart %d of %s: a worker failed; every process starts again "
                    "and resumes from the last checkpoint", restart,
                    os.environ.get("TORCHELASTIC_MAX_RESTARTS", "?"))
    if (int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0
            and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"):
        log.warning("torchrun --max-restarts with its rendezvous store shared with the workers: "
                    "a restarted group may fail to connect or hang; start torchrun with "
                    "%s=1 (docs/multi-gpu.md)", UNSHARED_STORE)


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
