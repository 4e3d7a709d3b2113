"""Shared fixtures: tiny synthetic datasets so every test runs in seconds on 2 cores."""

from __future__ import annotations

import os


def _threads_per_worker() -> None:
    """Under pytest-xdist (`make test`: one worker per core), each worker and every process it
    starts (stage scripts, torchrun groups, DVC) computes with cores / workers OpenMP threads,
    set before torch loads: workers that each start a thread per core oversubscribe the cores,
    and OpenMP threads waiting on a busy core burn the CPU time the others need. A count the
    user set is kept."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        threads = str(max(1, (os.cpu_count() or 1) // workers))
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(name, threads)


_threads_per_worker()

import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from filelock import FileLock

from fcn.params import SynthesizeParams
from fcn.synthetic import synthesize
from helpers.tiny import TINY
from helpers import trainset

if not hasattr(np, "in1d"):  # cityscapesscripts 2.3.0 still calls np.in1d (removed in numpy 2.4)
    np.in1d = np.isin  # type: ignore[attr-defined]


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """XDG_CACHE_HOME in a temporary folder for the session (and the processes it starts): a
    test that leaves train.resume_dir at its default never writes into the user's cache."""
    with pytest.MonkeyPatch.context() as patch:
        cache = tmp_path_factory.mktemp("xdg-cache")
        patch.setenv("XDG_CACHE_HOME", str(cache))
        yield cache


@pytest.fixture(scope="session")
def tiny_params() -> SynthesizeParams:
    return TINY


def once_per_run(tmp_path_factory: pytest.TempPathFactory, name: str,
                 make: Callable[[Path], None]) -> Path:
    """The folder `name`, made by `make(folder)` once per test run and shared by all of
    pytest-xdist's workers (`make test` runs several): the first worker to ask makes it under a
    file lock in the run's common temporary folder, the others wait and reuse it; without xdist,
    once per session. Treat it as read-only."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    folder = shared / name
    with FileLock(str(shared / f"{name}.lock")):
        if not (shared / f"{name}.done").exists():
            shutil.rmtree(folder, ignore_errors=True)  # a half-made one, from a failed make
            folder.mkdir()
            make(folder)
            (shared / f"{name}.done").touch()
    return folder


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic Cityscapes root, made once per test run (treat as read-only)."""
    return once_per_run(tmp_path_factory, "synthetic",
                        lambda folder: synthesize(folder / "cityscapes", TINY)) / "cityscapes"


@pytest.fixture(scope="session")
def masks(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """labelTrainIds masks of the tiny dataset, made once per test run (read-only for tests)."""
    return once_per_run(tmp_path_factory, "generated",
                        lambda folder: trainset.write_masks(tiny_dataset, folder))


@pytest.fixture(scope="session")
def two_process_run(tiny_dataset: Path, masks: Path,
                    tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted 2-process run of the train stage (torchrun, gloo) on the tiny dataset
    with trainset.two_process_params: the reference that the two-node and the elastic-restart
    tests compare with, and the DDP test reads, trained once per test run (read-only). The
    folder holds params.yaml, models/, live/ and the stage's stderr.txt."""

    def train(run: Path) -> None:
        trainset.write_params(run / "params.yaml",
                              trainset.two_process_params(tiny_dataset, masks, run / "models"))
        done = subprocess.run(trainset.train_command(run), capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]  # relaunched: torchrun, 2 processes
        (run / "stderr.txt").write_text(done.stderr, encoding="utf-8")

    return once_per_run(tmp_path_factory, "two-process", train)
