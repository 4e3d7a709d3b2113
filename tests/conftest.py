"""Shared fixtures: tiny synthetic datasets so every test runs in seconds on 2 cores."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fcn.params import SynthesizeParams
from fcn.synthetic import synthesize

TINY = SynthesizeParams(
    seed=7, height=64, width=128,
    train_cities=["aachen", "bochum"], val_cities=["frankfurt"], test_cities=["berlin"],
    train_per_city=3, val_per_city=2, test_per_city=2,
)

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
    from trainset import write_masks  # trainset imports this module: not at its top

    generated = tmp_path_factory.mktemp("generated")
    write_masks(tiny_dataset, generated)
    return generated


def with_changes(params, **changes):
    return dataclasses.replace(params, **changes)
