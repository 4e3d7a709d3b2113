"""The tiny synthetic dataset every test trains and predicts on (64x128 images, a few per
split: seconds on 2 cores), and the shared two-process run's length."""

from __future__ import annotations

import dataclasses

from fcn.params import SynthesizeParams

TINY = SynthesizeParams(
    seed=7, height=64, width=128,
    train_cities=["aachen", "bochum"], val_cities=["frankfurt"], test_cities=["berlin"],
    train_per_city=3, val_per_city=2, test_per_city=2,
    train_extra_cities=["erlangen"], train_extra_per_city=2,
)

TWO_PROCESS_EPOCHS = 2
"""Epochs of conftest's `two_process_run` (the reference of the two-node and restart tests)."""


def with_changes(params, **changes):
    return dataclasses.replace(params, **changes)
