"""The check's report: one JSON file rewritten after every step, and the table printed at the
end. It says honestly what the run proved: the CUDA paths whose steps passed on a real GPU,
and every path it did not prove with the reason (a dry run proves none; one GPU cannot run
nccl or SyncBatchNorm; onnxruntime's CUDA provider needs onnxruntime-gpu)."""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fcn.atomic import write_json
from fcn.benchmark.capability import load_average
from fcn.device import cuda_count, properties
from fcn.gpucheck.runner import (FAILED, MISSED, OVERRAN, PASSED, SKIPPED, StepResult, as_dict,
                                 counts)

FORMAT = 2


def proven(results: Sequence[StepResult], mode: str) -> tuple[list[str], dict[str, str]]:
    """(the CUDA paths this run proved, {path not proven: why}). Only a step that passed (or
    measured its goal) on a real GPU proves its path."""
    done, missing = [], {}
    for r in results:
        if not r.proves:
            continue
        if mode == "cuda" and r.ran_as == "cuda" and r.status in (PASSED, MISSED):
            done.append(r.proves)
        elif mode != "cuda":
            missing[r.proves] = ("dry run: " + (f"ran under the CUDA fakes ({r.status})"
                                                if r.ran_as == "fakes" else
                                                f"ran on the {r.ran_as} device ({r.status})"
                                                if r.ran_as else r.reason))
        else:
            missing[r.proves] = f"{r.status}: {r.reason}" if r.reason else r.status
    return done, missing


def environment() -> dict[str, Any]:
    """What the check ran on and with."""
    env: dict[str, Any] = {
        "python": platform.python_version(), "platform": platform.platform(),
        "torch": torch.__version__, "cuda_available": torch.cuda.is_available(),
        "cuda": torch.version.cuda, "cudnn": None, "gpus": [],
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "load_average": load_average(),
    }
    if torch.cuda.is_available():
        env["cudnn"] = torch.backends.cudnn.version()
        env["gpus"] = [properties(torch.device("cuda", i)) for i in range(cuda_count())]
    try:
        import onnxruntime

        env["onnxruntime"] = onnxruntime.__version__
        env["onnxruntime_providers"] = onnxruntime.get_available_providers()
    except ImportError:
        env["onnxruntime"] = None
    return env


def report(profile: str, mode: str, results: Sequence[StepResult], seconds: float,
           budget_s: float, estimate: dict[str, float] | None, argv: Sequence[str],
           started: str, env: dict[str, Any]) -> dict[str, Any]:
    """The JSON report: the run, its environment, what it proved and every step's figures."""
    done, missing = proven(results, mode)
    return {
        "format": FORMAT, "profile": profile, "mode": mode, "started": started,
        "seconds": seconds, "budget_s": budget_s,
        "within_budget": seconds <= budget_s if mode == "cuda" else None,
        "estimate_s": estimate, "estimate_total_s": sum(estimate.values()) if estimate else None,
        "command": list(argv), "environment": env, "counts": counts(results),
        "proven": done, "not_proven": missing,
        "steps": [as_dict(r) for r in results],
    }


def write(path: str | Path, payload: dict[str, Any]) -> None:
    write_json(path, payload)


def table(results: Sequence[StepResult], mode: str, width: int = 110) -> str:
    """The table printed at the end: one row per step, then what the run proved."""
    rows = [("step", "ran as", "status", "seconds", "allowed", "figures / reason")]
    for r in results:
        text = r.headline if r.status == PASSED else (
            r.reason if not r.headline else f"{r.reason} [{r.headline}]")
        rows.append((r.name, r.ran_as or "-", r.status,
                     "-" if r.seconds is None else f"{r.seconds:.1f}", f"{r.allowance_s:.0f}",
                     text))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = []
    for i, row in enumerate(rows):
        fixed = "  ".join(cell.ljust(w) for cell, w in zip(row[:5], widths))
        lines.append(f"{fixed}  {row[5]}".rstrip())
        if i == 0:
            lines.append("-" * min(width, len(lines[0]) + 20))
    n = counts(results)
    lines.append("")
    lines.append(f"{n[PASSED]} passed, {n[FAILED]} failed, {n[OVERRAN]} overran, "
                 f"{n[SKIPPED]} skipped, {n[MISSED]} missed goal(s)")
    done, missing = proven(results, mode)
    if mode == "dry":
        lines.append("DRY RUN (no GPU): CUDA branches ran under recording fakes or on the meta "
                     "device at tiny sizes; NO CUDA path is proven by this run.")
    else:
        lines.append(f"Proven on this GPU ({len(done)}): " + ("; ".join(done) or "nothing"))
        if missing:
            lines.append(f"NOT proven ({len(missing)}):")
            lines.extend(f"  - {path}: {why}" for path, why in missing.items())
    return "\n".join(lines)
