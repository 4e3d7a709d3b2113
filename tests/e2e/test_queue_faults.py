"""Queued experiments when one of them is killed: what DVC does, through the real CLI.

Two experiments are queued (`dvc exp run --queue`) in a copy of the project and run by one
worker (`dvc queue start -j 1`); the first one's training process (the train stage's command,
as an out-of-memory kill would) is SIGKILLed mid-epoch. DVC 3.67 then:
- fails that task: its log says "failed to reproduce 'train' ... exited with -9" (137 where
  the shell DVC runs the command in forks instead of exec-ing it) and `dvc queue status`
  lists it as Failed;
- goes on with the queue: the second experiment runs to completion (Success);
- reruns the first when it is queued again with the same name and parameters and the queue is
  started again; the run resumes from the training state the killed one left in
  `$XDG_CACHE_HOME/fcn-cityscapes/resume/` (DVC deleted the temporary workspace). The failed
  entry stays listed beside the new, successful one.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from helpers.dvc_repo import (PIPELINE, commit_all, copy_project, dvc, environment, make_tiny, run,
                      set_param, stages)

from fcn import checkpoint as ckpt
from fcn.train.resume import default_resume_root

pytestmark = pytest.mark.slow

EPOCHS = 3
LR = 0.0015  # the first experiment's, to find its state folder among the session's
FIRST = ("-n", "first", "train", "-S", f"train.lr={LR}")
SECOND = ("-n", "second", "train", "-S", "train.lr=0.004", "-S", "train.epochs=1")


def _start_queue(repo: Path, log: Path) -> None:
    """`dvc queue start -j 1`. Its output goes to a file: the worker it spawns keeps the
    descriptors open, so a pipe would not close until the worker exits."""
    with log.open("a") as out:
        subprocess.run([sys.executable, "-m", "dvc", "queue", "start", "-j", "1"], cwd=repo,
                       env=environment(repo), stdin=subprocess.DEVNULL, stdout=out,
                       stderr=subprocess.STDOUT, timeout=120, check=True)


def _statuses(repo: Path) -> list[tuple[str, str]]:
    """(name, status) of every task `dvc queue status` lists, sorted."""
    lines = dvc(repo, "queue", "status").stdout.splitlines()
    rows = [line.split() for line in lines[1:] if line.strip() and not line.startswith("Worker")]
    return sorted((row[1], row[-1]) for row in rows)


def _wait_until_idle(repo: Path, timeout: float = 300) -> list[tuple[str, str]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        statuses = _statuses(repo)
        if not any(status in ("Queued", "Running") for _, status in statuses):
            return statuses
        time.sleep(3)
    raise AssertionError(f"queue still busy after {timeout} s: {statuses}")


def _training_process(repo: Path, pattern: str, timeout: float = 300) -> psutil.Process:
    """The queued run's train stage process, once its task log (what `dvc queue logs`
    prints) shows `pattern`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for out in (repo / ".dvc" / "tmp" / "exps" / "run").glob("*/*.out"):
            if pattern in out.read_text(errors="replace"):
                for proc in psutil.process_iter(["cmdline", "cwd"]):
                    cmdline, cwd = proc.info["cmdline"] or [], proc.info["cwd"] or ""
                    if cmdline[-1:] == ["stages/train.py"] and cwd.startswith(str(repo)):
                        return proc
                raise AssertionError(f"{pattern!r} logged, but its training already ended")
        time.sleep(0.05)
    raise AssertionError(f"no queued run logged {pattern!r} within {timeout} s")


def _stop_everything(repo: Path) -> None:
    """Stop the queue's workers, then SIGKILL whatever still runs in the copy (the worker,
    its executor, a training): processes whose working directory is inside it."""
    try:
        run(repo, "dvc", "queue", "stop", "--kill", timeout=120)
    except subprocess.TimeoutExpired:
        pass  # what it did not stop is killed below
    for proc in psutil.process_iter(["cwd"]):
        if (proc.info["cwd"] or "").startswith(str(repo)):
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass


def _state_folder() -> Path | None:
    """The first experiment's training state folder, if any."""
    for params in default_resume_root().glob("*/params.json"):
        if json.loads(params.read_text())["train"]["lr"] == LR:
            return params.parent
    return None


def test_a_killed_queued_experiment_fails_the_next_runs_and_a_requeue_resumes(
        tmp_path: Path) -> None:
    repo = copy_project(tmp_path / "project")
    make_tiny(repo)
    set_param(repo, "train.epochs", EPOCHS)
    set_param(repo, "train.monitor_system", False)
    upstream = [name for name in PIPELINE[:PIPELINE.index("train")] if name in stages(repo)]
    dvc(repo, "repro", *upstream)  # train's inputs, in the cache the queue's workspaces share
    # dvc.lock keeps only what ran here: an experiment commits every output dvc.lock names,
    # and the project's own entries for evaluate and the rest are not in this copy's cache
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    lock["stages"] = {name: stage for name, stage in lock["stages"].items() if name in upstream}
    (repo / "dvc.lock").write_text(yaml.safe_dump(lock, sort_keys=False))
    commit_all(repo, "tiny pipeline, data reproduced")

    try:
        dvc(repo, "exp", "run", "--queue", *FIRST)
        dvc(repo, "exp", "run", "--queue", *SECOND)
        _start_queue(repo, tmp_path / "queue-start.log")
        victim = _training_process(repo, f"epoch 1/{EPOCHS}")  # mid-epoch 2 of the first
        victim.send_signal(signal.SIGKILL)

        assert _wait_until_idle(repo) == [("first", "Failed"), ("second", "Success")]
        failed = dvc(repo, "queue", "logs", "first").output
        # -9 when DVC's shell exec's the command (it is the python process DVC waits on), 137
        # (128 + SIGKILL) when the shell forks it and reports its child's death itself
        assert "failed to reproduce 'train'" in failed, failed
        assert "exited with -9" in failed or "exited with 137" in failed, failed
        state = _state_folder()
        assert state is not None and ckpt.load(state / ckpt.LAST)["epoch"] == 1

        dvc(repo, "exp", "run", "--queue", *FIRST)  # the same name and parameters again
        _start_queue(repo, tmp_path / "queue-start.log")
        assert _wait_until_idle(repo) == [("first", "Failed"), ("first", "Success"),
                                          ("second", "Success")]
        rerun = dvc(repo, "queue", "logs", "first").output  # the newest task of that name
        assert f"resuming from {state / ckpt.LAST} (after epoch 1 of {EPOCHS})" in rerun, rerun
        assert f"epochs 2..{EPOCHS}" in rerun and not state.exists()  # finished: published

        shown = json.loads(dvc(repo, "exp", "show", "--json").stdout)
        revs = [rev for entry in shown for group in entry.get("experiments") or []
                for rev in group.get("revs") or []]
        done = [rev for rev in revs if rev.get("name") == "first" and not rev.get("error")]
        assert len(done) == 1, revs
        train = done[0]["data"]["metrics"]["metrics/train/metrics.json"]["data"]
        assert train["step"] == EPOCHS - 1  # every epoch in its DVCLive record
    finally:
        _stop_everything(repo)
