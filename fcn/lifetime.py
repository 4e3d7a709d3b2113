"""No process of a run outlives the process that owns it (Linux).

The chain of a training run under DVC is: `dvc repro` → the shell DVC starts the stage's
command in (`$SHELL -c`, which may exec the command or fork it) → the stage's python → (with
`train.nproc > 1` or `train.max_restarts > 0`) torchrun → its workers. A SIGKILL of any link
(the OOM killer, `kill -9`, a queue stopping its worker) used to leave the links below it
running: training on, holding their GPUs and the state folder's lock, so the next `dvc repro`
was refused. Each link now dies with the one above it:

- a stage run by DVC (`DVC_STAGE` in its environment) watches its owners, every process above
  it up to DVC itself (`watch_owners`): the kernel signals it when its parent dies
  (PR_SET_PDEATHSIG), and a thread notices any other owner gone (DVC, when a shell sits
  between); it then sends itself SIGTERM, which stops torchrun, which stops its workers;
- torchrun gets SIGTERM when the stage dies, each worker SIGKILL when torchrun dies
  (`die_with_parent`, set up in `fcn.train.distributed`).

A stage started by hand (no `DVC_STAGE`) is left alone, so `nohup python stages/train.py &`
survives its terminal. Off Linux nothing happens.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1  # prctl(2)
POLL_S = 0.5
"""How often the owners are looked at."""
MAX_OWNERS = 6
"""How far up the process tree the owners are sought (DVC is at most a few shells up)."""


def prctl() -> Callable[..., int] | None:
    """libc's prctl, looked up before any fork (a forked child must not load libraries);
    None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def die_with_parent(prctl_: Callable[..., int] | None, signum: int, parent: int) -> None:
    """Have Linux send `signum` to this process when its parent exits (PR_SET_PDEATHSIG), and
    send it now if its parent is no longer `parent` (it died before this call). Only a call
    through `prctl_` (from `prctl`, looked up beforehand) and system calls: safe between fork
    and exec. Nothing happens where `prctl_` is None (not Linux)."""
    if prctl_ is not None and prctl_(_PR_SET_PDEATHSIG, signum, 0, 0, 0) == 0 \
            and os.getppid() != parent:
        os.kill(os.getpid(), signum)


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, start time in clock ticks) of a process, or None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # the name (field 2) may hold spaces
    return fields[0], int(fields[1]), int(fields[19])


def _has_dvc_stage(pid: int) -> bool:
    try:
        return b"\0DVC_STAGE=" in b"\0" + Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False


def owners(pid: int | None = None) -> list[tuple[int, int]]:
    """(pid, start time) of every process above `pid` (default: this one) up to and including
    the first that does not carry `DVC_STAGE`, i.e. DVC itself: the shells DVC started, then
    DVC. Empty off Linux."""
    found: list[tuple[int, int]] = []
    current = os.getpid() if pid is None else pid
    for _ in range(MAX_OWNERS):
        stat = _stat(current)
        if stat is None or stat[1] <= 1:
            break
        parent = stat[1]
        parent_stat = _stat(parent)
        if parent_stat is None:
            break
        found.append((parent, parent_stat[2]))
        if not _has_dvc_stage(parent):
            break
        current = parent
    return found


def alive(pid: int, start: int) -> bool:
    """Whether the process `pid` that started at `start` still runs (not gone, not a zombie,
    its pid not reused)."""
    stat = _stat(pid)
    return stat is not None and stat[2] == start and stat[0] != "Z"


def watch_owners() -> threading.Thread | None:
    """Under DVC (`DVC_STAGE` set) on Linux: SIGTERM to this process when its parent dies, and
    a daemon thread that sends it when any other owner (`owners`) is gone. None otherwise."""
    if "DVC_STAGE" not in os.environ or not Path("/proc/self/stat").exists():
        return None
    chain = owners()
    if not chain:
        return None
    die_with_parent(prctl(), int(signal.SIGTERM), chain[0][0])

    def watch() -> None:
        event = threading.Event()
        while not event.wait(POLL_S):
            gone = [pid for pid, start in chain if not alive(pid, start)]
            if gone:
                log.error("the process that ran this stage (pid %s) is gone: stopping", gone[0])
                os.kill(os.getpid(), signal.SIGTERM)
                return

    thread = threading.Thread(target=watch, name="owner-watch", daemon=True)
    thread.start()
    return thread
