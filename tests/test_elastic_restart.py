"""Faults under torchrun.

- Elastic restart (`train.max_restarts`): a worker SIGKILLed mid-epoch makes torchrun restart
  the whole group, which resumes from the last checkpoint and ends with the weights of an
  uninterrupted 2-process run (bit for bit on CPU). Without TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1,
  which the stage gives torchrun, the restarted group usually failed to connect or hung here
  (see fcn.train.distributed.UNSHARED_STORE).
- No orphans: a SIGKILLed stage (or torchrun) takes every process below it along, and the
  training state's lock is free again; before, torchrun's workers, in sessions of their own,
  trained on.
"""

from __future__ import annotations

import fcntl
import signal
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch

from fcn import checkpoint as ckpt
from fcn.train.distributed import needs_launch
from fcn.train.resume import LOCK

from conftest import TWO_PROCESS_EPOCHS as EPOCHS
from trainset import state_folder, tiny_params, train_command, write_params

def _setup(tiny_dataset: Path, masks: Path, run: Path, max_restarts: int,
           epochs: int = EPOCHS) -> Path:
    """As conftest's two_process_run, with torchrun's restarts and `epochs`."""
    run.mkdir(parents=True)
    write_params(run / "params.yaml",
                 tiny_params(tiny_dataset, masks, run / "models", epochs=epochs, nproc=2,
                             max_restarts=max_restarts, monitor_system=False))
    return run


def _kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL `process` and every process below it (torchrun's workers have sessions of
    their own, so killing a process group would miss them)."""
    try:
        tree = [*psutil.Process(process.pid).children(recursive=True), psutil.Process(process.pid)]
    except psutil.NoSuchProcess:
        return
    for proc in tree:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass


def _worker(stage: subprocess.Popen, rank: int) -> psutil.Process:
    """The training process of global rank `rank` below the stage (stage → torchrun →
    workers)."""
    for proc in psutil.Process(stage.pid).children(recursive=True):
        try:
            if proc.environ().get("RANK") == str(rank) and "LOCAL_RANK" in proc.environ():
                return proc
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    raise AssertionError(f"no worker of rank {rank} below pid {stage.pid}")


@pytest.mark.slow
def test_a_killed_worker_restarts_the_group_which_resumes_bit_identical(
        tiny_dataset, masks, two_process_run, tmp_path):
    whole = two_process_run  # uninterrupted
    cut = _setup(tiny_dataset, masks, tmp_path / "cut", max_restarts=1)
    stage = subprocess.Popen(train_command(cut), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)
    watchdog = threading.Timer(600, _kill_tree, [stage])
    watchdog.start()
    lines, killed = [], None
    try:
        assert stage.stderr is not None
        for line in stage.stderr:  # rank 0 logs this after epoch 1's checkpoint is written
            lines.append(line)
            if killed is None and f"epoch 1/{EPOCHS}" in line:
                killed = _worker(stage, rank=1)  # mid-epoch 2 (it needs rank 1's gradients)
                killed.send_signal(signal.SIGKILL)
        stage.wait(timeout=60)
    finally:
        watchdog.cancel()
        _kill_tree(stage)
    log = "".join(lines)
    assert killed is not None, log[-3000:]
    assert stage.returncode == 0, log[-3000:]
    # torchrun saw that worker die of the signal ...
    assert f"failed (exitcode: -{int(signal.SIGKILL)}) local_rank: 1 (pid: {killed.pid})" in log
    assert "torchrun restart 1 of 1" in log  # ... restarted the group ...
    assert "may fail to connect or hang" not in log  # (on a fresh rendezvous store: UNSHARED_STORE)
    assert log.count("resuming from") == 1 and f"after epoch 1 of {EPOCHS}" in log  # ... resumed

    for name in (ckpt.BEST, ckpt.LAST):
        a, b = ckpt.load(whole / "models" / name), ckpt.load(cut / "models" / name)
        assert a["epoch"] == b["epoch"] and a["model"].keys() == b["model"].keys()
        for key in a["model"]:
            assert torch.equal(a["model"][key], b["model"][key]), f"{name}: {key} differs"
    a, b = ckpt.load(whole / "models" / ckpt.LAST), ckpt.load(cut / "models" / ckpt.LAST)
    assert a["epoch"] == EPOCHS and a["scheduler"] == b["scheduler"]
    untimed = [[{k: v for k, v in r.items() if not k.startswith("time/")} for r in c["history"]]
               for c in (a, b)]
    assert repr(untimed[0]) == repr(untimed[1])  # the same metrics, epoch by epoch (NaN too)


def test_restarts_relaunch_under_torchrun_even_for_one_process(monkeypatch):
    for var in ("LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert not needs_launch(1, 0)  # plain: trains in this process
    assert needs_launch(2, 0) and needs_launch(1, 1)  # DDP, or torchrun to restart one process
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not needs_launch(2, 1)  # already under torchrun (e.g. started by hand on each node)


def _wait_for(path: Path, text: str, stage: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in path.read_text(errors="replace"):
            return
        assert stage.poll() is None, path.read_text(errors="replace")[-3000:]
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not logged within {timeout} s")


@pytest.mark.slow
@pytest.mark.parametrize("victim", ["stage", "torchrun"])
def test_a_killed_stage_or_torchrun_leaves_no_worker_behind(tiny_dataset, masks, tmp_path,
                                                            victim):
    """SIGKILL (the OOM killer's signal) the stage process, or torchrun below it, while the 2
    workers train a run that would last minutes: within seconds no process of the run is left
    and the training state's lock can be taken, so the next `dvc repro` resumes."""
    run = _setup(tiny_dataset, masks, tmp_path / "run", max_restarts=0, epochs=500)
    log = tmp_path / "stage.log"
    with log.open("w") as stderr:
        stage = subprocess.Popen(train_command(run), stdout=subprocess.DEVNULL, stderr=stderr,
                                 start_new_session=True)
    tree: list[psutil.Process] = []
    try:
        _wait_for(log, "epoch 1/500", stage)  # the group formed and trains
        tree = psutil.Process(stage.pid).children(recursive=True)
        torchrun = [p for p in tree if p.ppid() == stage.pid]
        workers = [p for p in tree if "LOCAL_RANK" in p.environ()]
        assert len(torchrun) == 1 and len(workers) == 2, tree
        (psutil.Process(stage.pid) if victim == "stage" else torchrun[0]).kill()

        gone, alive = psutil.wait_procs([*torchrun, *workers], timeout=60)
        assert not alive, f"left running after the {victim} was killed: {alive}"
        assert stage.wait(timeout=60) != 0
        with (state_folder(run / "resume") / LOCK).open("a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free: nobody trains on
    finally:
        for proc in [*tree, psutil.Process(stage.pid) if stage.poll() is None else None]:
            try:
                if proc is not None:
                    proc.kill()
            except psutil.NoSuchProcess:
                pass
