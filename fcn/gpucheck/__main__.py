"""`python -m fcn.gpucheck`: run a profile of the GPU check (dry run without a GPU)."""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __name__ == "__main__" and not {"-v", "--verbose"} & set(sys.argv):
    os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars the library does not force on

import torch  # noqa: E402 - after the environment is set for tqdm

from fcn.device import cuda_count  # noqa: E402
from fcn.gpucheck import profiles, report  # noqa: E402
from fcn.gpucheck.runner import Check, exit_code, run_all  # noqa: E402

DEFAULT_HOST_S_PER_MEGAPIXEL = 0.15
"""Host work per megapixel of synthetic data (synthesis, masks, decode) on one core, when no
data step of this run measured it (about what this project's 2-core CI machine measures)."""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m fcn.gpucheck",
        description="Prove the CUDA paths on a GPU (or run the dry run without one).",
        epilog="Steps: " + ", ".join(s.name for s in profiles.steps("all"))
        + ". See docs/gpu-check.md.")
    parser.add_argument("--profile", choices=profiles.PROFILES, default="loan",
                        help="loan: every CUDA path one GPU can run (<= 4 min); benchmark: the "
                             "latency and memory goals (<= 4 min); all: both (default: loan)")
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"),
                        help="the JSON report, rewritten after every step (default: %(default)s)")
    parser.add_argument("--dry-run", action="store_true",
                        help="the dry run even where CUDA is available (automatic without it)")
    parser.add_argument("--only", nargs="+", metavar="STEP",
                        help="run these steps (and the steps they need) only")
    parser.add_argument("--no-budget", action="store_true",
                        help="no total budget (each step keeps its own allowance)")
    parser.add_argument("--strict-goals", action="store_true",
                        help="a missed performance goal fails the run")
    parser.add_argument("--workdir", type=Path,
                        help="keep the data, checkpoints and logs here (default: a temporary "
                             "folder, removed at the end)")
    parser.add_argument("--list", action="store_true", help="list the steps and exit")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="the library's own log lines and progress bars too")
    return parser.parse_args(argv)


def host_cost(results: Sequence[Any]) -> tuple[float, int]:
    """(seconds per megapixel, processes) of the data step of this run, if it ran."""
    for r in results:
        if r.name == "data" and r.status == "passed":
            figures = {k: v for k, v in r.figures.items() if isinstance(v, dict)}
            seconds = sum(f["seconds"] + f.get("decode_s", 0.0) for f in figures.values())
            megapixels = sum(f["megapixels"] for f in figures.values())
            return seconds / max(megapixels, 1e-9), r.figures.get("workers", 1)
    return DEFAULT_HOST_S_PER_MEGAPIXEL, 1


def estimates(profile: str, results: Sequence[Any]) -> dict[str, dict[str, float]]:
    """The GPU-time estimate of each profile the run covers, from the GPU sizes."""
    per_mp, workers = host_cost(results)
    names = ("loan", "benchmark") if profile == "all" else (profile,)
    return {name: profiles.estimate(name, profiles.cuda_sizes(), per_mp, workers)
            for name in names}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    steps = profiles.steps(args.profile)
    if args.list:
        for step in steps:
            print(f"{step.name:16} {step.dry:6} {step.checks}")
        return 0
    if not args.verbose:
        os.environ.setdefault("TQDM_DISABLE", "1")
    logging.basicConfig(level=logging.INFO, datefmt="%H:%M:%S",
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("fcn").setLevel(logging.INFO if args.verbose else logging.WARNING)
    logging.getLogger("fcn.gpucheck").setLevel(logging.INFO)
    cuda = torch.cuda.is_available() and not args.dry_run
    mode = "cuda" if cuda else "dry"
    budget = None if args.no_budget or not cuda else profiles.run_budget(args.profile)
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    start = time.perf_counter()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    check = Check(mode=mode, work=work.resolve(),
                  sizes=profiles.cuda_sizes() if cuda else profiles.dry_sizes(),
                  gpus=cuda_count() if cuda else 0)
    env = report.environment()
    budget_s = profiles.run_budget(args.profile)

    def write(results: list, final: bool = False) -> None:
        report.write(args.out, report.report(
            args.profile, mode, results, time.perf_counter() - start, budget_s,
            {k: v for e in estimates(args.profile, results).values() for k, v in e.items()}
            if final else None, sys.argv, started, env))

    try:
        results = run_all(check, steps, args.only, budget, after_each=write)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    write(results, final=True)
    print(report.table(results, mode))
    if "benchmark" in check.artifacts:
        from fcn.benchmark.report import markdown_table

        print("\nBenchmark configurations:\n" + markdown_table(check.artifacts["benchmark"]))
    print()
    for name, steps_s in estimates(args.profile, results).items():
        total = sum(steps_s.values())
        print(f"estimated GPU time of the {name} profile on one H100: {total:.0f} s "
              f"(budget {profiles.BUDGET_S[name]:.0f} s): " + ", ".join(
                  f"{k} {v:.0f}" for k, v in steps_s.items() if v >= 0.5))
    print(f"{mode} run of the {args.profile} profile in {time.perf_counter() - start:.0f} s; "
          f"report: {args.out}")
    return exit_code(results, args.strict_goals)


if __name__ == "__main__":
    sys.exit(main())
