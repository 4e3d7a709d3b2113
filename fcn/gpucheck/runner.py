"""Running a profile's steps: each under its time allowance, in order, with the report
rewritten after every step, so that a run stopped anywhere (by its budget, the loan's end or a
kill) still leaves every figure measured so far.

A step is a function of the run's `Check` returning an `Outcome` (passed or not, its figures,
a headline), raising `Skip` when it cannot run here, or failing by raising. Allowances are
enforced two ways: SIGALRM raises `StepOverran` in the step when its allowance is spent (Python
code, and child processes the step kills in its `finally`); a watchdog thread writes the report
and ends the process if the step is still running `GRACE_S` later (a hang inside a C call that
never returns to Python). The profile's total budget skips the steps that no longer fit.

Dry mode (no GPU, or `--dry-run`): steps marked `dry="fakes"` run their CUDA branches on the
CPU under `fcn.gpucheck.fakes.FakeCuda` (their device is "cuda:0", their tensors on the CPU,
every torch.cuda call recorded and argument-checked); `dry="cpu"` steps run on the CPU;
`dry="skip"` steps are listed with the reason. Figures of a faked step are not GPU figures
and criteria that judge GPU figures are not applied there (the outcome says so).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import os
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fcn.device import empty_cache
from fcn.gpucheck.fakes import FakeCuda

log = logging.getLogger("fcn.gpucheck")

PASSED, FAILED, SKIPPED, MISSED, OVERRAN = "passed", "failed", "skipped", "missed", "overran"
STATUSES = (PASSED, FAILED, SKIPPED, MISSED, OVERRAN)
GRACE_S = 30.0
"""After a step's allowance, how long it may take to stop before the process is ended."""
DRY_MODES = ("cpu", "fakes", "meta", "skip")


class Skip(Exception):
    """Raised by a step that finds it cannot run here (the message is the reason)."""


class StepOverran(BaseException):
    """Raised in a step whose allowance is spent (BaseException: `except Exception` in the
    code under test does not swallow it)."""


@dataclass
class Outcome:
    """What a step returns: pass or fail, every figure it measured, a one-line headline for
    the table, and (when failing) what was wrong."""

    passed: bool
    figures: dict[str, Any]
    headline: str = ""
    problem: str = ""


@dataclass(frozen=True)
class Step:
    """One check of a profile."""

    name: str
    checks: str
    """what it checks and its pass criterion (also in docs/gpu-check.md)"""
    run: Callable[[Check], Outcome]
    allowance: tuple[float, float]
    """seconds it may take: (on a GPU, in dry mode)"""
    proves: str = ""
    """the CUDA path a pass on a GPU proves ("" for CPU paths)"""
    requires: tuple[str, ...] = ()
    dry: str = "cpu"
    """how dry mode runs it: on the CPU, under the CUDA fakes, on the meta device, or not"""
    dry_reason: str = ""
    """why dry mode skips it (dry="skip")"""
    cuda: bool = True
    """False: a CPU path that CI proves; skipped on a GPU run, to spend the loan on CUDA"""
    min_gpus: int = 0
    goal: bool = False
    """a performance goal: not met is 'missed', a failure only with --strict-goals"""

    def __post_init__(self) -> None:
        if self.dry not in DRY_MODES:
            raise ValueError(f"{self.name}: dry must be one of {DRY_MODES}")


@dataclass
class StepResult:
    """A step's entry in the report."""

    name: str
    status: str
    reason: str
    device: str | None
    seconds: float | None
    allowance_s: float
    checks: str
    proves: str
    ran_as: str | None = None
    """'cuda', 'cpu', 'fakes' or 'meta' (None: did not run)"""
    headline: str = ""
    figures: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    goal: bool = False


@dataclass
class Check:
    """One run: where it runs, its work folder, sizes, and what steps hand on to later ones."""

    mode: str
    """'cuda' or 'dry'"""
    work: Path
    sizes: Any
    gpus: int
    device: torch.device = torch.device("cpu")
    """the step's device: cuda:0 (real, or faked in dry mode) or the CPU"""
    artifacts: dict[str, Any] = field(default_factory=dict)
    fakes: FakeCuda | None = None
    """the active fakes while a dry step runs its CUDA branch"""

    @property
    def real_gpu(self) -> bool:
        """Whether the step's figures are GPU figures (not dry, not faked)."""
        return self.mode == "cuda" and self.device.type == "cuda"

    @property
    def on_cuda(self) -> bool:
        """Whether the step takes its CUDA branches (a real GPU or the fakes)."""
        return self.device.type == "cuda"


def skip_reason(step: Step, check: Check, done: dict[str, StepResult], chosen: set[str],
                spent: float, budget: float | None) -> str | None:
    """Why `step` does not run here, or None when it runs."""
    if step.name not in chosen:
        return "not selected (--only)"
    if check.mode == "dry" and step.dry == "skip":
        return step.dry_reason
    if check.mode == "cuda" and not step.cuda:
        return "a CPU path: proven by CI's dry run, not worth loan time"
    if check.mode == "cuda" and step.min_gpus > check.gpus:
        return f"needs {step.min_gpus} GPUs, {check.gpus} present"
    for name in step.requires:
        if name in done and done[name].status != PASSED:
            return f"needs step {name}, which {done[name].status}"
    if budget is not None and spent >= budget:
        return f"the run's budget of {budget:.0f} s is spent"
    return None


def allowance(step: Step, check: Check, spent: float = 0.0, budget: float | None = None
              ) -> float:
    """The seconds `step` may take: its own allowance, cut to what is left of the budget."""
    own = step.allowance[0 if check.mode == "cuda" else 1]
    return own if budget is None else max(1.0, min(own, budget - spent))


@contextlib.contextmanager
def _alarm(seconds: float) -> Iterator[None]:
    """Raise StepOverran in this (main) thread after `seconds`."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def overran(_signum: int, _frame: Any) -> None:
        raise StepOverran(f"stopped after its allowance of {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, overran)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class _Watchdog:
    """Ends the process (exit 3) when a step runs `GRACE_S` past its allowance, after
    `on_hang` has written the report."""

    def __init__(self, seconds: float, on_hang: Callable[[], None]) -> None:
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._watch, args=(seconds, on_hang), daemon=True)
        self.thread.start()

    def _watch(self, seconds: float, on_hang: Callable[[], None]) -> None:
        if not self.done.wait(seconds):
            with contextlib.suppress(Exception):
                on_hang()
            os._exit(3)

    def stop(self) -> None:
        self.done.set()


def _device_for(step: Step, check: Check) -> tuple[torch.device, str]:
    """(the step's device, how it runs)."""
    if check.mode == "cuda":
        return torch.device("cuda", 0), "cuda"
    if step.dry == "fakes":
        return torch.device("cuda", 0), "fakes"
    if step.dry == "meta":
        return torch.device("meta"), "meta"
    return torch.device("cpu"), "cpu"


def run_step(step: Step, check: Check, hang: Callable[[StepResult], None] | None = None,
             seconds: float | None = None) -> StepResult:
    """Run one step under its allowance (`seconds`, default the step's own); an exception is
    a failure with its message (and traceback in the report), Skip a skip with its reason,
    the allowance an 'overran'."""
    limit = allowance(step, check) if seconds is None else seconds
    device, ran_as = _device_for(step, check)
    result = StepResult(step.name, FAILED, "", str(device), None, limit, step.checks,
                        step.proves, ran_as=ran_as, goal=step.goal)
    log.info("step %s (%s, allowed %.0f s) ...", step.name, ran_as, limit)
    start = time.perf_counter()

    def on_hang() -> None:
        result.status, result.seconds = OVERRAN, time.perf_counter() - start
        result.reason = (f"still running {GRACE_S:.0f} s after its allowance of "
                         f"{limit:.0f} s: the process was ended")
        if hang is not None:
            hang(result)

    watchdog = _Watchdog(limit + GRACE_S, on_hang)
    fakes = FakeCuda() if ran_as == "fakes" else contextlib.nullcontext()
    try:
        with _alarm(limit), fakes as active:
            check.device, check.fakes = device, active if ran_as == "fakes" else None
            outcome = step.run(check)
    except Skip as skip:
        result.status, result.reason, result.device, result.ran_as = (SKIPPED, str(skip), None,
                                                                      None)
    except StepOverran as over:
        result.status, result.reason = OVERRAN, str(over)
        result.error = traceback.format_exc()
    except Exception as exc:  # noqa: BLE001 - a failing step is reported, the next ones run
        text = str(exc).strip()
        result.reason = (f"{type(exc).__name__}: {text.splitlines()[0][:500]}" if text
                         else type(exc).__name__)
        result.error = traceback.format_exc()
    else:
        result.status = PASSED if outcome.passed else (MISSED if step.goal else FAILED)
        result.figures, result.headline = outcome.figures, outcome.headline
        result.reason = outcome.problem
    finally:
        watchdog.stop()
        check.device, check.fakes = torch.device("cpu"), None
        result.seconds = time.perf_counter() - start
        _clean_up(device if ran_as == "cuda" else torch.device("cpu"))
    log.info("step %s %s in %.1f s%s", step.name, result.status, result.seconds,
             f": {result.reason}" if result.reason else "")
    return result


def _clean_up(device: torch.device) -> None:
    """What a step (stopped anywhere) may leave behind: memory, a sync debug mode."""
    gc.collect()
    empty_cache(device)
    if device.type == "cuda":
        with contextlib.suppress(Exception):
            torch.cuda.set_sync_debug_mode(0)


def selected(only: Sequence[str] | None, steps: Sequence[Step]) -> set[str]:
    """The steps to run: `only` and every step they require (all steps without `only`)."""
    if not only:
        return {s.name for s in steps}
    by_name = {s.name: s for s in steps}
    unknown = [name for name in only if name not in by_name]
    if unknown:
        raise ValueError(f"unknown step(s) {unknown}; steps: {list(by_name)}")
    chosen: set[str] = set()
    todo = list(only)
    while todo:
        name = todo.pop()
        if name not in chosen:
            chosen.add(name)
            todo.extend(r for r in by_name[name].requires if r in by_name)
    return chosen


def run_all(check: Check, steps: Sequence[Step], only: Sequence[str] | None = None,
            budget: float | None = None,
            after_each: Callable[[list[StepResult]], None] | None = None) -> list[StepResult]:
    """Run `steps` in order (requirements first); `after_each(results so far)` after every
    step (the report), and also when a step hangs past its allowance."""
    chosen = selected(only, steps)
    done: dict[str, StepResult] = {}
    started = time.perf_counter()

    def snapshot(extra: StepResult | None = None) -> list[StepResult]:
        results = list(done.values()) + ([extra] if extra is not None else [])
        return results

    for step in steps:
        spent = time.perf_counter() - started
        reason = skip_reason(step, check, done, chosen, spent, budget)
        if reason is not None:
            done[step.name] = StepResult(step.name, SKIPPED, reason, None, None,
                                         step.allowance[0 if check.mode == "cuda" else 1],
                                         step.checks, step.proves, goal=step.goal)
        else:
            done[step.name] = run_step(
                step, check, hang=(lambda r: after_each(snapshot(r))) if after_each else None,
                seconds=allowance(step, check, spent, budget))
        if after_each is not None:
            after_each(snapshot())
    return list(done.values())


def exit_code(results: Sequence[StepResult], strict_goals: bool = False) -> int:
    """1 when an executed step failed or overran (or missed its goal under strict_goals)."""
    bad = {FAILED, OVERRAN} | ({MISSED} if strict_goals else set())
    return int(any(r.status in bad for r in results))


def counts(results: Sequence[StepResult]) -> dict[str, int]:
    return {status: sum(r.status == status for r in results) for status in STATUSES}


def as_dict(result: StepResult) -> dict[str, Any]:
    return dataclasses.asdict(result)
