"""Shared fixtures: tiny synthetic datasets so every test runs in seconds on 2 cores."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fcn.params import SynthesizeParams
from fcn.synthetic import synthesize
from helpers.tiny import TINY, TWO_PROCESS_EPOCHS
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


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic Cityscapes root, made once per test session (treat as read-only)."""
    root = tmp_path_factory.mktemp("synthetic") / "cityscapes"
    synthesize(root, TINY)
    return root


@pytest.fixture(scope="session")
def masks(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """labelTrainIds masks of the tiny dataset, made once per session (read-only for tests)."""
    generated = tmp_path_factory.mktemp("generated")
    trainset.write_masks(tiny_dataset, generated)
    return generated


@pytest.fixture(scope="session")
def two_process_run(tiny_dataset: Path, masks: Path,
                    tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted 2-process run of the train stage (torchrun, gloo) on the tiny dataset,
    TWO_PROCESS_EPOCHS epochs, no system monitor: the reference that the two-node and the
    elastic-restart tests compare with, trained once per session (read-only). The folder holds
    params.yaml, models/ and live/."""
    run = tmp_path_factory.mktemp("two-process")
    # no system monitor: its samples (times, loads) differ between any two runs
    trainset.write_params(run / "params.yaml",
                          trainset.tiny_params(tiny_dataset, masks, run / "models",
                                               epochs=TWO_PROCESS_EPOCHS, nproc=2,
                                               monitor_system=False))
    done = subprocess.run(trainset.train_command(run), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]  # relaunched: torchrun, 2 processes
    return run
