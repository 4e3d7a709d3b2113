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


def _queue(repo: Path) -> tuple[list[tuple[str, str]], bool]:
    """(name, status) of every task `dvc queue status` lists, sorted, and whether a worker is
    alive (its last line: "Worker status: A active, I idle")."""
    lines = dvc(repo, "queue", "status").stdout.splitlines()
    rows = [line.split() for line in lines[1:] if line.strip() and not line.startswith("Worker")]
    workers = [line for line in lines if line.startswith("Worker status:")]
    alive = bool(workers) and workers[-1].split(":", 1)[1].strip() != "0 active, 0 idle"
    return sorted((row[1], row[-1]) for row in rows), alive


def _diagnosis(repo: Path) -> str:
    """What `dvc queue status` and every task log say, for a failure message."""
    logs = "\n".join(f"--- {out.name}\n{out.read_text(errors='replace')[-3000:]}"
                     for out in sorted((repo / ".dvc" / "tmp" / "exps" / "run").glob("*/*.out")))
    return f"{dvc(repo, 'queue', 'status').stdout}\n{logs}"


class _Queue:
    """The queue's worker, restarted when DVC's worker exits with tasks still queued.

    DVC's celery worker sometimes stops, or never starts consuming, while tasks wait
    ("Worker status: 0 active, 0 idle" beside Queued tasks; treeverse/dvc#10562, #10829): a
    user runs `dvc queue start` again, and so does this test, at most `restarts` times, so a
    CI run is not lost to a worker that never picked up the work this test is about."""

    def __init__(self, repo: Path, log: Path, restarts: int = 3) -> None:
        self.repo, self.log, self.restarts = repo, log, restarts
        self._idle_since: float | None = None

    def start(self) -> None:
        """`dvc queue start -j 1`. Its output goes to a file: the worker it spawns keeps the
        descriptors open, so a pipe would not close until the worker exits."""
        with self.log.open("a") as out:
            subprocess.run([sys.executable, "-m", "dvc", "queue", "start", "-j", "1"],
                           cwd=self.repo, env=environment(self.repo), stdin=subprocess.DEVNULL,
                           stdout=out, stderr=subprocess.STDOUT, timeout=120, check=True)
        self._idle_since = None

    def poll(self) -> list[tuple[str, str]]:
        """The tasks' statuses; restarts a worker that left queued tasks behind for 30 s."""
        statuses, alive = _queue(self.repo)
        stranded = not alive and any(status == "Queued" for _, status in statuses) and not any(
            status == "Running" for _, status in statuses)
        if not stranded:
            self._idle_since = None
        elif self._idle_since is None:
            self._idle_since = time.monotonic()
        elif time.monotonic() - self._idle_since > 30:
            assert self.restarts > 0, f"the queue's worker keeps stopping:\n{_diagnosis(self.repo)}"
            self.restarts -= 1
            self.start()
        return statuses

    def wait_until_idle(self, timeout: float = 300) -> list[tuple[str, str]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            statuses = self.poll()
            if not any(status in ("Queued", "Running") for _, status in statuses):
                return statuses
            time.sleep(3)
        raise AssertionError(f"queue still busy after {timeout} s:\n{_diagnosis(self.repo)}")

    def training_process(self, name: str, pattern: str,
                         timeout: float = 300) -> psutil.Process:
        """The queued run's train stage process, the moment its task log (what `dvc queue
        logs` prints) shows `pattern`; fails at once, with the logs, if task `name` ends
        first. The process is found before the pattern is logged and the log then read every
        10 ms: a tiny epoch lasts well under a second, and a process scan after the pattern
        (slow on a loaded machine) let the run finish before the kill."""
        deadline = time.monotonic() + timeout
        next_poll, process = time.monotonic(), None
        while time.monotonic() < deadline:
            if process is None:
                process = self._train_stage()
            elif not process.is_running():
                raise AssertionError(f"the training ended before logging {pattern!r}:\n"
                                     f"{_diagnosis(self.repo)}")
            elif any(pattern in out.read_text(errors="replace") for out in
                     (self.repo / ".dvc" / "tmp" / "exps" / "run").glob("*/*.out")):
                return process
            if process is None and time.monotonic() >= next_poll:  # costs a second of CPU
                ended = [status for task, status in self.poll()
                         if task == name and status not in ("Queued", "Running")]
                assert not ended, f"task {name} ended ({ended[0]}) before logging " \
                                  f"{pattern!r}:\n{_diagnosis(self.repo)}"
                next_poll = time.monotonic() + 5
            time.sleep(0.01 if process is not None else 0.2)
        raise AssertionError(f"no queued run logged {pattern!r} within {timeout} s:\n"
                             f"{_diagnosis(self.repo)}")

    def _train_stage(self) -> psutil.Process | None:
        """The train stage's python process running in a workspace of the copy, if any."""
        for proc in psutil.process_iter(["cmdline", "cwd"]):
            cmdline, cwd = proc.info["cmdline"] or [], proc.info["cwd"] or ""
            if cmdline[-1:] == ["stages/train.py"] and cwd.startswith(str(self.repo)):
                return proc
        return None


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
        queue = _Queue(repo, tmp_path / "queue-start.log")
        queue.start()
        victim = queue.training_process("first", f"epoch 1/{EPOCHS}")  # mid-epoch 2 of it
        victim.send_signal(signal.SIGKILL)

        assert queue.wait_until_idle() == [("first", "Failed"), ("second", "Success")]
        failed = dvc(repo, "queue", "logs", "first").output
        # -9 when DVC's shell exec's the command (it is the python process DVC waits on), 137
        # (128 + SIGKILL) when the shell forks it and reports its child's death itself
        assert "failed to reproduce 'train'" in failed, failed
        assert "exited with -9" in failed or "exited with 137" in failed, failed
        state = _state_folder()
        assert state is not None and ckpt.load(state / ckpt.LAST)["epoch"] == 1

        dvc(repo, "exp", "run", "--queue", *FIRST)  # the same name and parameters again
        queue.start()
        assert queue.wait_until_idle() == [("first", "Failed"), ("first", "Success"),
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
