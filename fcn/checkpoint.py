"""Training checkpoints, the contract between training and everything that uses a model: what
they hold, how they are written and read, when a run may resume from one.

A checkpoint is a plain dict of tensors and Python values, so `torch.load(weights_only=True)`
reads it (no pickled classes). It is written through a temporary file and `os.replace`: a
run killed while saving leaves the previous checkpoint intact.

`last.pt` holds everything a run needs to continue (`STATE_KEYS`); `best.pt` only what
rebuilds the model and says where it came from (`MODEL_KEYS`). Resuming is only allowed when
the hash of the training-relevant parameters and of the training code matches: `model`, `train` (minus `workers`,
`device`, `out`, `resume_dir`, `max_restarts`, `monitor_system` and `log_every`, which change
where and how fast a run goes, not what it computes), and
what identifies the data (the stage passes the `data` and `synthesize` sections: a changed
synthetic dataset has the same paths but other pixels), and the training code (`fcn.sources`:
every file `fcn.train.fit` runs, by content; a run killed before an edit starts afresh after
it, as DVC reruns the stage).
"""

from __future__ import annotations

import dataclasses
import logging
import random
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fcn import sources
from fcn.atomic import atomic_path
from fcn.device import rng_state as device_rng_state
from fcn.device import set_rng_state as set_device_rng_state
from fcn.cityscapes.labels import NUM_CLASSES
from fcn.errors import DataError, torch_load_problem
from fcn.model import FCN, describe
from fcn.fields import check_section
from fcn.params import ModelParams, TrainParams, params_hash

log = logging.getLogger(__name__)

FORMAT = 1
LAST = "last.pt"
BEST = "best.pt"
MODEL_KEYS = ("format", "model", "model_params", "num_classes", "epoch", "params_hash",
              "metrics")
"""What best.pt keeps: enough to rebuild the model and know where it came from."""
STATE_KEYS = MODEL_KEYS + ("step", "optimizer", "scheduler", "scaler", "best_miou",
                           "best_epoch", "history", "hashed_params", "rng", "stop_reason")
"""What last.pt keeps: the model, plus everything a resumed run continues from."""
SHAPE_PARAMS = ("arch", "backbone", "fc67", "fc_channels")
"""The model parameters that decide the architecture (`weights` only says how training began)."""


def best_path(out: str | Path) -> Path:
    """`<train.out>/best.pt`: the model evaluate, export and deploy use unless told otherwise."""
    return Path(out) / BEST


# --- what a checkpoint must agree with to be resumed ----------------------------------------

UNHASHED_TRAIN = {"workers": 0, "device": "auto", "out": "", "monitor_system": False,
                  "max_restarts": 0, "resume_dir": None, "log_every": TrainParams.log_every}
"""The `train` keys that say where and how a run executes, not what it trains: set to these
fixed values before hashing, so changing them resumes the run instead of starting afresh."""

TRAINING_CODE = "fcn.train.fit"
"""The module whose source files (and those it imports) make up a run's training code."""


def hashed_params(model: ModelParams, train: TrainParams,
                  identity: Mapping[str, Any]) -> dict[str, Any]:
    """The values a checkpoint must agree with to be resumed (plain data): the parameters,
    `identity` (further sections, plain dicts, that name the data trained on), and `code`, the
    digest of every source file of the training code (`fcn.sources`), so that a run killed
    before an edit never resumes under the edited code."""
    train = dataclasses.replace(train, **UNHASHED_TRAIN)
    return {"model": dataclasses.asdict(model), "train": dataclasses.asdict(train),
            **{name: dict(section) for name, section in identity.items()},
            "code": dict(sources.fingerprint(TRAINING_CODE))}


def training_hash(hashed: Mapping[str, Any]) -> str:
    return params_hash(*hashed.values())


def _changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    out = []
    for section in sorted(set(old) | set(new)):
        a, b = old.get(section, {}), new.get(section, {})
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                out.append(f"{section}.{key}: {a.get(key)!r} -> {b.get(key)!r}")
    return out


# --- random states --------------------------------------------------------------------------

def rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """Every random state this process draws from, as tensors and plain Python values: Python,
    NumPy, torch's CPU generator and, on CUDA, the generator of `device` (this process's own
    GPU only, so that the state can be restored where fewer GPUs are visible)."""
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
    cuda = device_rng_state(device) if device is not None else None
    if cuda is not None:
        state["cuda"] = cuda
    return state


def set_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    """Restore what `rng_state` saved; the CUDA state goes to `device` when both exist (a
    checkpoint saved on a CPU leaves a GPU's generator as seeded, and the reverse is ignored)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state({"bit_generator": n["bit_generator"],
                         "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    torch.set_rng_state(state["torch"])
    if device is not None:
        set_device_rng_state(state.get("cuda"), device)


# --- the schema -----------------------------------------------------------------------------

def training_state(*, model: torch.nn.Module, model_params: ModelParams, epoch: int,
                   step: int, optimizer: torch.optim.Optimizer,
                   scheduler: torch.optim.lr_scheduler.LRScheduler,
                   scaler: torch.amp.GradScaler, best_miou: float, best_epoch: int,
                   history: list[dict[str, Any]], hashed: Mapping[str, Any],
                   rng: list[dict[str, Any]], stop_reason: str = "") -> dict[str, Any]:
    """The last.pt dict after `epoch` completed epochs (`STATE_KEYS`, in that order)."""
    state = {
        "format": FORMAT,
        "model": model.state_dict(),
        "model_params": dataclasses.asdict(model_params),
        "num_classes": NUM_CLASSES,
        "epoch": epoch,
        "params_hash": training_hash(hashed),
        "metrics": {k: v for k, v in history[-1].items()  # not the wall-clock figures:
                    if k != "epoch" and not k.startswith("time/")},  # best.pt stays reproducible
        "step": step,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "best_miou": best_miou,
        "best_epoch": best_epoch,
        "history": history,
        "hashed_params": dict(hashed),
        "rng": rng,
        "stop_reason": stop_reason,  # why training ended before its last epoch ("" = it did not)
    }
    assert tuple(state) == STATE_KEYS
    return state


def best_subset(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The best.pt dict of a last.pt dict."""
    return {key: checkpoint[key] for key in MODEL_KEYS if key in checkpoint}


# --- writing and reading ----------------------------------------------------------------------

def _interned(value: Any) -> Any:
    """`value` with every string (dict keys included) interned. Pickle writes a string once
    and refers back to it when the same object recurs: a run resumed from a loaded checkpoint
    holds equal but distinct key objects ('step' once per parameter's optimizer state), an
    uninterrupted run shared ones, so the same checkpoint pickled to different bytes."""
    if isinstance(value, str):
        return sys.intern(value)
    if isinstance(value, dict):
        return {_interned(k): _interned(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_interned(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_interned(v) for v in value)
    return value


def save(path: str | Path, checkpoint: dict[str, Any]) -> None:
    """Write atomically: the old file stays until the new one is complete. Equal checkpoints
    are equal files, however the run got there (uninterrupted or resumed: strings interned),
    and whatever the temporary file's random name (written through a file object: torch.save
    names the archive's folder after a path it is given); so DVC does not rerun evaluate,
    export and deploy for a retrained model that did not change."""
    with atomic_path(path) as tmp, tmp.open("wb") as file:
        torch.save(_interned(checkpoint), file)


def _tensors(value: Any, name: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor in a checkpoint's nested dicts and lists, with its path."""
    if isinstance(value, torch.Tensor):
        yield name, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _tensors(item, f"{name}.{key}" if name else str(key))
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _tensors(item, f"{name}[{index}]")


def check_finite(path: str | Path, checkpoint: dict[str, Any]) -> None:
    """Refuse a checkpoint with a NaN or infinite value in any floating-point tensor (weights,
    batch-norm statistics, optimizer state) in one line naming the first such tensor: such a
    model predicts garbage, and a resumed run would train on from it."""
    for name, tensor in _tensors({k: checkpoint[k] for k in ("model", "optimizer")
                                  if k in checkpoint}):
        if tensor.is_meta or tensor.is_nested or tensor.layout != torch.strided:
            kind = ("meta" if tensor.is_meta else "nested" if tensor.is_nested
                    else str(tensor.layout).removeprefix("torch."))
            raise DataError(f"{path}: tensor {name} is not a plain dense tensor ({kind}); not "
                            "a checkpoint this project writes")
        if (tensor.is_floating_point() or tensor.is_complex()) \
                and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise DataError(f"{path}: tensor {name} holds {bad} NaN or infinite value(s) of "
                            f"{tensor.numel()}; the weights diverged (use an earlier checkpoint)")
        if name.startswith("model.") and name.endswith("running_var") \
                and bool((tensor < 0).any()):
            raise DataError(f"{path}: tensor {name} holds a negative variance (batch norm would "
                            "compute NaN); not a checkpoint this project writes")


def load(path: str | Path, hint: str = "delete it to start training afresh") -> dict[str, Any]:
    """Read a checkpoint (weights_only: no code runs); a bad file is a DataError naming it,
    and so is one holding NaN or infinite values (`check_finite`).

    `hint` ends the message for a file that exists but cannot be read.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: checkpoint not found")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is an input error
        raise DataError(f"{path}: {torch_load_problem(exc)}; {hint}") from None
    missing = [k for k in ("model", "model_params", "num_classes")
               if not isinstance(checkpoint, dict) or k not in checkpoint]
    if missing:
        have = sorted(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise DataError(f"{path}: not a training checkpoint: expected keys "
                        f"['model', 'model_params', 'num_classes'], found {have}")
    if not isinstance(checkpoint["model"], dict):
        raise DataError(f"{path}: 'model' is not a mapping of tensors")
    check_finite(path, checkpoint)
    return checkpoint


def model_params_of(path: str | Path, stored: Any) -> ModelParams:
    """A checkpoint's `model_params`, checked against the same types and ranges as
    params.yaml's `model` section before anything is built from them."""
    problems: list[str] = []
    params = check_section("model_params", ModelParams, stored, problems)
    if problems:
        raise DataError(f"{path}: {'; '.join(problems)}")
    return params


def check_shapes(path: str | Path, weights: Mapping[str, Any], params: ModelParams,
                 num_classes: int) -> None:
    """The checkpoint's tensors against the architecture `params` describe, compared on the
    meta device (nothing allocated): one line naming what is missing, unexpected, or of another
    shape or dtype (a float64 or complex weight would be cast on loading: 1e300 becomes inf)."""
    with torch.device("meta"):
        skeleton = FCN.from_params(params, num_classes).state_dict()
    expected = {k: (tuple(v.shape), v.dtype) for k, v in skeleton.items()}
    stored = {k: (tuple(v.shape), v.dtype) for k, v in weights.items()
              if isinstance(v, torch.Tensor)}
    problems = []
    missing = [k for k in expected if k not in stored]
    unexpected = [k for k in weights if k not in expected]
    if missing:
        problems.append(f"missing {len(missing)} tensor(s), e.g. {missing[0]}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s), e.g. {unexpected[0]}")
    shapes = [k for k in expected if k in stored and stored[k][0] != expected[k][0]]
    if shapes:
        k = shapes[0]
        problems.append(f"{len(shapes)} tensor(s) of another shape, e.g. {k} is "
                        f"{list(stored[k][0])} in the file, {list(expected[k][0])} in the model")
    dtypes = [k for k in expected if k in stored and stored[k][1] != expected[k][1]]
    if dtypes:
        k = dtypes[0]
        problems.append(f"{len(dtypes)} tensor(s) of another dtype, e.g. {k} is "
                        f"{str(stored[k][1]).removeprefix('torch.')} in the file, "
                        f"{str(expected[k][1]).removeprefix('torch.')} in the model")
    if problems:
        raise DataError(f"{path}: weights do not fit {describe(params)}: "
                        f"{'; '.join(problems)}")


@dataclasses.dataclass(frozen=True)
class InitReport:
    """What whole-model initialisation (`initialise_from`) did: the model's tensors it loaded
    and the ones left as built (`fresh`), and the checkpoint's tensors nothing took (`unused`:
    no tensor of that name, or another shape)."""

    path: str
    loaded: list[str]
    fresh: list[str]
    unused: list[str]

    def summary(self) -> dict[str, Any]:
        """For the run's metrics: the counts, and the names of what was not loaded."""
        return {"checkpoint": self.path, "loaded": len(self.loaded), "fresh": len(self.fresh),
                "unused": len(self.unused), "fresh_tensors": list(self.fresh),
                "unused_tensors": list(self.unused)}


def check_init(path: str | Path, params: ModelParams) -> dict[str, Any]:
    """The checkpoint `path` names for train.init, read and checked (`initialise_from`'s
    refusals, one line each): its tensors by name. Any arch of the family initialises any
    other (staged training: 32s → 16s → 8s); the backbone must be the same."""
    checkpoint = load(path, hint="train.init must name a checkpoint this project wrote")
    theirs = model_params_of(path, checkpoint["model_params"])
    if theirs.backbone != params.backbone:
        raise DataError(f"{path}: train.init is an {describe(theirs)} checkpoint, the model "
                        f"is {describe(params)} (model.backbone): only a checkpoint of the "
                        "same backbone initialises it")
    if theirs.arch != params.arch:
        log.info("train.init: %s is an %s checkpoint; the model is %s (staged training)",
                 path, theirs.arch, params.arch)
    return checkpoint["model"]


def initialise_from(model: torch.nn.Module, path: str | Path, params: ModelParams,
                    weights: Mapping[str, Any] | None = None) -> InitReport:
    """Whole-model initialisation (train.init, fine-tuning): every tensor of the checkpoint at
    `path` whose name, shape and dtype match one of `model`'s is copied into it; the model's
    other tensors keep their initialisation (a score layer for another class count, fc6/fc7
    when one side has them). Refused in one line (DataError): a file that is not a training
    checkpoint of this project, one of another backbone than `params.backbone` (its layers
    would match by name only by accident), or one from which no tensor fits. Another arch is
    accepted: FCN-32s → FCN-16s loads all but `up_final` (another kernel size), leaving the
    pool4 skip fresh (a zero score layer: the new model starts as the old one's prediction). `weights`: what
    `check_init(path, params)` returned, when the caller has read the file already."""
    weights = check_init(path, params) if weights is None else weights
    own = model.state_dict()  # tensors sharing the parameters' and buffers' storage
    loaded = [name for name, tensor in weights.items()
              if isinstance(tensor, torch.Tensor) and name in own
              and tensor.shape == own[name].shape and tensor.dtype == own[name].dtype]
    if not loaded:
        raise DataError(f"{path}: train.init: no tensor of the checkpoint fits the model "
                        f"({describe(params)})")
    with torch.no_grad():
        for name in loaded:
            own[name].copy_(weights[name])
    taken = set(loaded)
    return InitReport(str(path), loaded, [n for n in own if n not in taken],
                      [n for n in weights if n not in taken])


def load_model(path: str | Path, expected: ModelParams | None = None) -> FCN:
    """The FCN stored in a checkpoint, in eval mode on the CPU.

    With `expected` (params.yaml's model section), a checkpoint made for another backbone or
    head is an error naming the file and both values; without, the model is rebuilt from the
    checkpoint's own `model_params`. A class count other than Cityscapes' is an error.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: checkpoint not found (train first: `dvc repro train`, or pass "
                        "--checkpoint)")
    checkpoint = load(path, hint="is it a checkpoint of this project?")
    stored = model_params_of(path, checkpoint["model_params"])
    if expected is not None:
        wanted = dataclasses.asdict(expected)
        for key in SHAPE_PARAMS:
            if key == "fc_channels" and not wanted["fc67"]:
                continue  # no fc6/fc7 layers: their width does not matter
            if getattr(stored, key) != wanted[key]:
                raise DataError(f"{path}: checkpoint is for model.{key}="
                                f"{getattr(stored, key)!r} but params.yaml says "
                                f"model.{key}={wanted[key]!r}")
        stored = dataclasses.replace(stored, **{k: wanted[k] for k in SHAPE_PARAMS})
    if checkpoint["num_classes"] != NUM_CLASSES:
        raise DataError(f"{path}: checkpoint predicts {checkpoint['num_classes']!r} classes, "
                        f"Cityscapes evaluation needs {NUM_CLASSES}")
    check_shapes(path, checkpoint["model"], stored, NUM_CLASSES)  # before anything is built
    model = FCN.from_params(stored, NUM_CLASSES)
    try:
        model.load_state_dict(checkpoint["model"])
    except (RuntimeError, TypeError, AttributeError, ValueError) as exc:
        reason = " ".join(str(exc).split())[:300]
        raise DataError(f"{path}: weights do not fit {describe(stored)}: {reason}") from None
    log.info("loaded %s (epoch %s)", path, checkpoint.get("epoch", "?"))
    return model.eval()


def resumable(out: str | Path, hashed: Mapping[str, Any], epochs: int) -> dict[str, Any] | None:
    """`<out>/last.pt` if it was made under the same training parameters (`hashed`), else
    None (logging why the run starts fresh)."""
    path = Path(out) / LAST
    if not path.exists():
        log.info("no checkpoint at %s: starting fresh", path)
        return None
    checkpoint = load(path)
    expected = training_hash(hashed)
    if checkpoint.get("params_hash") != expected or checkpoint.get("format") != FORMAT:
        changes = _changes(checkpoint.get("hashed_params", {}), dict(hashed))
        log.warning("%s was trained with other parameters (hash %s, now %s): starting fresh; "
                    "changed: %s", path, checkpoint.get("params_hash"), expected,
                    "; ".join(changes) if changes else "checkpoint format")
        return None
    log.info("resuming from %s (after epoch %d of %d)", path, checkpoint["epoch"], epochs)
    return checkpoint
