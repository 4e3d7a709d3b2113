"""Faults under torchrun.

- Elastic restart (`train.max_restarts`): a worker SIGKILLed mid-epoch makes torchrun restart
  the whole group, which resumes from the last checkpoint and ends with the weights of an
  uninterrupted 2-process run (bit for bit on CPU). Without TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1,
  which the stage gives torchrun, the restarted group usually failed to connect or hung here
  (see fcn.train.distributed.UNSHARED_STORE).
- No orphans: whichever process of the chain `dvc repro` → its shell → the stage → torchrun →
  workers is SIGKILLed, every other one is gone within a minute and the training state's lock
  is free again; before, the stage trained on when DVC was killed, and torchrun's workers, in
  sessions of their own, when the stage was.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch

from fcn import checkpoint as ckpt
from fcn.train.distributed import needs_launch
from fcn.train.resume import LOCK

from helpers.processes import kill_tree
from helpers.tiny import TWO_PROCESS_EPOCHS as EPOCHS
from helpers.trainset import train_command, two_process_params, write_params

def _setup(tiny_dataset: Path, masks: Path, run: Path, max_restarts: int,
           epochs: int = EPOCHS) -> Path:
    """As conftest's two_process_run, with torchrun's restarts and `epochs`."""
    run.mkdir(parents=True)
    write_params(run / "params.yaml",
                 two_process_params(tiny_dataset, masks, run / "models", epochs=epochs,
                                    max_restarts=max_restarts))
    return run


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
    watchdog = threading.Timer(600, kill_tree, [stage])
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
        kill_tree(stage)
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


FORKING_SHELL = """#!/bin/sh
# A shell that forks the command DVC gives it instead of exec'ing it (as some shells do, as
# CI's did): the chain then has a shell between DVC and the stage.
/bin/sh -c "$2"
status=$?
exit $status
"""


@pytest.fixture(scope="module")
def chain_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny DVC project whose train stage runs 2 processes for 500 epochs, its upstream
    stages done, and a forking $SHELL for DVC."""
    from helpers.dvc_repo import commit_all, copy_project, dvc, make_tiny, set_param

    repo = copy_project(tmp_path_factory.mktemp("chain") / "project")
    make_tiny(repo)
    for key, value in (("train.nproc", 2), ("train.epochs", 500),
                       ("train.monitor_system", False)):
        set_param(repo, key, value)
    commit_all(repo, "a long 2-process training")
    dvc(repo, "repro", "class_weights", "decode")
    shell = repo.parent / "forking-sh"
    shell.write_text(FORKING_SHELL)
    shell.chmod(0o755)
    return repo


def _chain(dvc_pid: int) -> dict[str, list[psutil.Process]]:
    """The processes below `dvc repro`, by role."""
    below = psutil.Process(dvc_pid).children(recursive=True)
    stage = [p for p in below if p.cmdline()[-1:] == ["stages/train.py"]]
    return {"dvc": [psutil.Process(dvc_pid)], "stage": stage,
            "shell": [p for p in below if "forking-sh" in " ".join(p.cmdline())],
            "torchrun": [p for p in below if stage and p.ppid() == stage[0].pid],
            "worker": [p for p in below if p.environ().get("RANK") == "1"],
            "every": below}


@pytest.mark.slow
@pytest.mark.parametrize("victim", ["dvc", "shell", "stage", "torchrun", "worker"])
def test_killing_any_process_of_the_chain_leaves_nothing_behind(chain_repo, victim):
    """`dvc repro` → DVC's shell → the stage → torchrun → 2 workers, training for minutes:
    SIGKILL one of them (the OOM killer's signal) and within 60 s no process of the run is
    left, and the training state's lock can be taken, so the next `dvc repro` resumes."""
    from helpers.dvc_repo import environment

    repo = chain_repo
    (repo / ".dvc" / "tmp" / "rwlock").unlink(missing_ok=True)  # left by a killed dvc
    log = repo.parent / f"{victim}.log"
    env = {**environment(repo), "SHELL": str(repo.parent / "forking-sh")}
    with log.open("w") as out:
        dvc = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "train"], cwd=repo,
                               env=env, stdout=out, stderr=subprocess.STDOUT,
                               start_new_session=True)
    every: list[psutil.Process] = []
    try:
        _wait_for(log, "/500 (", dvc)  # an epoch logged: the group formed and trains
        chain = _chain(dvc.pid)
        every = [chain["dvc"][0], *chain["every"]]
        assert len(chain["stage"]) == len(chain["shell"]) == len(chain["torchrun"]) == 1, chain
        assert len(chain["worker"]) == 1 and len(chain["every"]) >= 5, chain
        chain[victim][0].kill()
        gone, alive = psutil.wait_procs(every, timeout=60)
        assert not alive, f"left running after the {victim} was killed: {alive}"
        folders = [p for p in (Path(os.environ["XDG_CACHE_HOME"]) / "fcn-cityscapes" /
                               "resume").iterdir() if (p / LOCK).exists()]
        for folder in folders:
            with (folder / LOCK).open("a+") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free: nobody trains on
    finally:
        for proc in every + [psutil.Process(dvc.pid)] if dvc.poll() is None else every:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        dvc.wait(timeout=60)


def test_a_stage_started_by_hand_is_left_alone_and_one_under_dvc_finds_its_owners(monkeypatch):
    """Only a stage run by DVC dies with its owners (nohup python stages/train.py & must
    survive its terminal); `owners` climbs the processes carrying DVC_STAGE up to DVC."""
    from fcn import lifetime

    monkeypatch.delenv("DVC_STAGE", raising=False)
    assert lifetime.watch_owners() is None
    code = ("import json, os; from fcn.lifetime import owners; "
            "print(json.dumps([pid for pid, _ in owners()]))")
    shell = subprocess.Popen(["/bin/sh", "-c", f"{sys.executable} -c '{code}'; true"],
                             env={**os.environ, "DVC_STAGE": "train"},
                             stdout=subprocess.PIPE, text=True)
    out, _ = shell.communicate(timeout=60)
    assert json.loads(out) == [shell.pid, os.getpid()]  # the shell, then "DVC" (this process)
