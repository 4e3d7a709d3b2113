"""Training checkpoints: what they hold, how they are written, when a run may resume from one.

A checkpoint is a plain dict of tensors and Python values, so `torch.load(weights_only=True)`
reads it (no pickled classes). It is written through a temporary file and `os.replace`: a
run killed while saving leaves the previous checkpoint intact.

Resuming is only allowed when the hash of the training-relevant parameters matches; they
are `model`, `train` (minus `workers`, `device` and `out`, which change where and how fast
a run goes, not what it computes), `data` (which dataset) and `synthesize` (a changed
synthetic dataset has the same paths but other pixels; with real data this only costs a
fresh start if someone edits that section).
"""

from __future__ import annotations

import dataclasses
import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fcn.errors import DataError
from fcn.io import atomic_path
from fcn.params import Params, params_hash

log = logging.getLogger(__name__)

FORMAT = 1
LAST = "last.pt"
BEST = "best.pt"
MODEL_KEYS = ("format", "model", "model_params", "num_classes", "epoch", "params_hash",
              "metrics")
"""What best.pt keeps: enough to rebuild the model and know where it came from."""


def hashed_params(params: Params) -> dict[str, Any]:
    """The parameter values a checkpoint must agree with to be resumed (plain data)."""
    train = dataclasses.replace(params.train, workers=0, device="auto", out="")
    sections = {"model": params.model, "train": train, "data": params.data,
                "synthesize": params.synthesize}
    return {name: dataclasses.asdict(section) for name, section in sections.items()}


def training_hash(params: Params) -> str:
    train = dataclasses.replace(params.train, workers=0, device="auto", out="")
    return params_hash(params.model, train, params.data, params.synthesize)


def _changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    out = []
    for section in sorted(set(old) | set(new)):
        a, b = old.get(section, {}), new.get(section, {})
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                out.append(f"{section}.{key}: {a.get(key)!r} -> {b.get(key)!r}")
    return out


def rng_state() -> dict[str, Any]:
    """Every global random state, as tensors and plain Python values."""
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"bit_generator": np_state["bit_generator"],
                  "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                  "pos": int(np_state["state"]["pos"]),
                  "has_gauss": int(np_state["has_gauss"]),
                  "gauss": float(np_state["gauss"])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state({"bit_generator": n["bit_generator"],
                         "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(path: str | Path, checkpoint: dict[str, Any]) -> None:
    """Write atomically: the old file stays until the new one is complete."""
    with atomic_path(path) as tmp:
        torch.save(checkpoint, tmp)


def load(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint (weights_only: no code runs); a bad file is a DataError naming it."""
    path = Path(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise DataError(f"{path}: checkpoint not found") from None
    except Exception as exc:  # noqa: BLE001 - any unreadable file is an input error
        raise DataError(f"{path}: not a readable checkpoint ({exc}); delete it to start "
                        "training afresh") from None
    if not isinstance(checkpoint, dict) or "model" not in checkpoint:
        raise DataError(f"{path}: not a training checkpoint (no 'model' entry)")
    return checkpoint


def best_subset(checkpoint: dict[str, Any]) -> dict[str, Any]:
    return {key: checkpoint[key] for key in MODEL_KEYS if key in checkpoint}


def resumable(out: str | Path, params: Params) -> dict[str, Any] | None:
    """`<out>/last.pt` if it was made under the same training parameters, else None
    (logging why the run starts fresh)."""
    path = Path(out) / LAST
    if not path.exists():
        log.info("no checkpoint at %s: starting fresh", path)
        return None
    checkpoint = load(path)
    expected = training_hash(params)
    if checkpoint.get("params_hash") != expected or checkpoint.get("format") != FORMAT:
        changes = _changes(checkpoint.get("hashed_params", {}), hashed_params(params))
        log.warning("%s was trained with other parameters (hash %s, now %s): starting fresh; "
                    "changed: %s", path, checkpoint.get("params_hash"), expected,
                    "; ".join(changes) if changes else "checkpoint format")
        return None
    log.info("resuming from %s (after epoch %d of %d)", path, checkpoint["epoch"],
             params.train.epochs)
    return checkpoint
