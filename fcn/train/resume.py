"""Where a training run keeps its checkpoints until it ends, so that a killed run resumes and a
finished one is an ordinary DVC output.

DVC deletes a stage's outputs before running it, and never uses its run-cache for a stage with
a `persist: true` output. So the checkpoints of a run in progress live outside the outputs, in
a state folder named by the training-parameter hash (`<resume_dir>/<hash>/`): a killed run
finds its state again on the next `dvc repro`, and switching between two parameter sets
resumes each one. When the run ends, `publish` places best.pt and last.pt in `train.out` (a
plain cached output, which DVC's run-cache restores when the same parameters come back) and
removes the state folder.

The default `resume_dir` is in the user's cache (`$XDG_CACHE_HOME/fcn-cityscapes/resume`), not
in the workspace: `dvc queue` runs each experiment in a temporary copy of the repository that
is deleted afterwards, and a rerun of a killed queued experiment must still find its state.
One process trains a given hash at a time: the state folder is locked while a run uses it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fcn import checkpoint as ckpt
from fcn.atomic import atomic_dir, write_json
from fcn.errors import FcnError

log = logging.getLogger(__name__)

LOCK = "lock"
PARAMS = "params.json"
"""A readable copy of the hashed parameters, so a user can tell state folders apart."""
TIMINGS = "timings.json"
"""The run's per-epoch wall-clock figures (`time/*`): kept here, not in the checkpoints, so
that identical runs give identical checkpoints; a resumed run logs them again."""


def write_timings(directory: Path, records: list[dict[str, Any]]) -> None:
    """The per-epoch timing records of the run in `directory` (atomic)."""
    write_json(directory / TIMINGS, records)


def read_timings(directory: Path | None) -> list[dict[str, Any]]:
    """What `write_timings` left (a run resumed from `directory`); [] when there is none or it
    cannot be read (timings are not worth refusing a resume for)."""
    if directory is None:
        return []
    try:
        records = json.loads((directory / TIMINGS).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return records if isinstance(records, list) else []


def default_resume_root() -> Path:
    """`$XDG_CACHE_HOME/fcn-cityscapes/resume`, or `~/.cache/fcn-cityscapes/resume`."""
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "fcn-cityscapes" / "resume"


def state_dir(resume_dir: str | Path | None, hashed: Mapping[str, Any]) -> Path:
    """The state folder of the run that `hashed` (the training parameters) describes."""
    root = Path(resume_dir) if resume_dir is not None else default_resume_root()
    return root / ckpt.training_hash(hashed)


@contextmanager
def locked(directory: Path, hashed: Mapping[str, Any]) -> Iterator[None]:
    """Hold `directory`'s lock for the block (created with its params.json if new); another
    process holding it is an error: two runs must not write the same checkpoints. A folder
    left without a checkpoint (nothing trained, or already published) is removed after."""
    directory.mkdir(parents=True, exist_ok=True)
    if not (directory / PARAMS).exists():
        write_json(directory / PARAMS, dict(hashed))
    with (directory / LOCK).open("a+") as handle:
        try:
            import fcntl
        except ImportError:  # no advisory locks here (Windows): nothing to guard with
            fcntl = None
        if fcntl is not None:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "?"
                raise FcnError(f"{directory}: another training run with the same parameters is "
                               f"using this state folder (pid {holder}); wait for it, or stop "
                               "it") from None
            handle.seek(0)
            handle.truncate()
            handle.write(str(os.getpid()))
            handle.flush()
        try:
            yield
        finally:  # still holding the lock
            if directory.exists() and not (directory / ckpt.LAST).exists():
                shutil.rmtree(directory, ignore_errors=True)  # nothing to resume from


def resume_point(directory: Path, out: Path, hashed: Mapping[str, Any],
                 epochs: int) -> tuple[dict[str, Any] | None, bool]:
    """(the checkpoint to continue from or None, whether it came from `out`).

    The state folder's last.pt comes first (a run in progress); else `out/last.pt`, the
    final checkpoint of a run that ended, if it was made under the same parameters (then there
    is nothing to publish again). A mismatch is logged with the parameters that changed.
    """
    if (directory / ckpt.LAST).exists():
        state = ckpt.resumable(directory, hashed, epochs)
        if state is not None:
            return state, False
    else:
        _other_code(directory, hashed)
    return ckpt.resumable(out, hashed, epochs), True


def _other_code(directory: Path, hashed: Mapping[str, Any]) -> None:
    """Say so when a state folder of the same parameters under other training code exists:
    that run is not resumed (it would mix code versions), this one starts afresh."""
    mine = {k: v for k, v in hashed.items() if k != "code"}
    for params in sorted(directory.parent.glob(f"*/{PARAMS}")):
        if params.parent == directory or not (params.parent / ckpt.LAST).exists():
            continue
        try:
            theirs = json.loads(params.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(theirs, dict) and {k: v for k, v in theirs.items() if k != "code"} == mine:
            code, old = hashed.get("code", {}), theirs.get("code", {})
            changed = sorted(f for f in set(code) | set(old) if code.get(f) != old.get(f))
            log.warning("%s holds a run of these parameters under other training code "
                        "(changed: %s): not resumed, training starts afresh", params.parent,
                        ", ".join(changed) or "unknown")


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)  # same filesystem: no bytes copied
    except OSError:
        shutil.copy2(source, target)


def publish(directory: Path, out: Path) -> None:
    """Place the state folder's best.pt and last.pt in `out` (replacing it whole, atomically),
    then delete the state folder: the run is over and `out` holds everything it left."""
    with atomic_dir(out) as tmp:
        for name in (ckpt.BEST, ckpt.LAST):
            if (directory / name).exists():
                _link_or_copy(directory / name, tmp / name)
    shutil.rmtree(directory, ignore_errors=True)
    log.info("final checkpoints in %s (state folder %s removed)", out, directory)
