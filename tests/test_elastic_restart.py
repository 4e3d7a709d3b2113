"""torchrun's elastic restart (`train.max_restarts`): a worker SIGKILLed mid-epoch makes torchrun
restart the whole group, which resumes from the last checkpoint and ends with the weights of an
uninterrupted 2-process run (bit for bit on CPU). Without TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1,
which the stage gives torchrun, the restarted group usually failed to connect or hung here
(see fcn.train.distributed.UNSHARED_STORE)."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest
import torch

from fcn import checkpoint as ckpt
from fcn.train.distributed import needs_launch

from trainset import tiny_params, write_params

STAGE = Path(__file__).resolve().parents[1] / "stages" / "train.py"
EPOCHS = 2


def _command(run: Path) -> list[str]:
    return [sys.executable, str(STAGE), "--params", str(run / "params.yaml"),
            "--live-dir", str(run / "live")]


def _setup(tiny_dataset: Path, masks: Path, run: Path, max_restarts: int) -> Path:
    run.mkdir(parents=True)
    # no system monitor: its samples (times, loads) differ between any two runs
    write_params(run / "params.yaml",
                 tiny_params(tiny_dataset, masks, run / "models", epochs=EPOCHS, nproc=2,
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
def test_a_killed_worker_restarts_the_group_which_resumes_bit_identical(tiny_dataset, masks,
                                                                         tmp_path):
    whole = _setup(tiny_dataset, masks, tmp_path / "whole", max_restarts=0)
    done = subprocess.run(_command(whole), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    cut = _setup(tiny_dataset, masks, tmp_path / "cut", max_restarts=1)
    stage = subprocess.Popen(_command(cut), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
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
