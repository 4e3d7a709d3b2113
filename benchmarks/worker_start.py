"""What the benchmark stage's worker processes cost to start: the same configurations measured
with one process per configuration started by `forkserver` (the stage's default: every worker
forks from a server that has imported the measuring code once) and by `spawn` (a new
interpreter, which imports torch and torchvision again, per configuration), in one run.

    .venv/bin/python benchmarks/worker_start.py [--rounds 3] [--smoke]

The configurations are the tiny pipeline's (64x128, fp32, eager, slide and onnxruntime, five
timed calls each; one in --smoke), so start-up dominates as it does in the test suite; at
1024x2048 the same seconds are saved per configuration, a smaller share of each. Each round
measures both start methods, interleaved; the best round of each is reported, with the ratio.
The per-configuration latencies (best round) of both are printed too: forking from the server
must not change what is measured.

`--smoke` (CI): one round of the eager configuration alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Sequence

from fcn.benchmark.run import run_benchmark
from fcn.benchmark.worker import START_METHODS, worker_context
from fcn.params import BenchmarkParams, ModelParams

TINY = BenchmarkParams(profile="quick", device="cpu", height=64, width=128, precisions=["fp32"],
                       channels_last=[False], threads=1, quick_batch_sizes=[1], quick_warmup=1,
                       quick_iters=5, quick_compile=[False], window=[32, 64], stride=[24, 48],
                       matmul_size=256, int8=False)  # the configurations measured before int8


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="one round, for CI")
    args = parser.parse_args(argv)
    rounds = 1 if args.smoke else args.rounds
    params = (dataclasses.replace(TINY, slide=False, onnxruntime=False, quick_iters=1)
              if args.smoke else TINY)
    if rounds < 1:
        parser.error("--rounds must be at least 1")

    best: dict[str, float] = {}
    latency: dict[str, dict[str, float]] = {}
    configs = 0
    for _ in range(rounds):
        for method in reversed(START_METHODS):  # spawn first: the server is not started yet
            start = time.perf_counter()
            results = run_benchmark(params, ModelParams(), progress=False, start_method=method)
            seconds = time.perf_counter() - start
            best[method] = min(best.get(method, seconds), seconds)
            ok = {name: entry for name, entry in results["configs"].items()
                  if entry["status"] == "ok"}
            configs = len(ok)
            for name, entry in ok.items():  # the best round's, as for the totals
                best_ms = latency.setdefault(method, {}).get(name, float("inf"))
                latency[method][name] = min(best_ms, entry["latency_ms_median"])
    print(f"{configs} configuration(s), one worker process each, best of {rounds} round(s):")
    for method in START_METHODS:
        print(f"  {method:10s} {best[method]:7.2f} s  "
              f"({best[method] / configs:.2f} s per configuration)")
    if worker_context("forkserver").get_start_method() != "forkserver":
        print("note: the forkserver could not start here (see the warning): both rows are spawn")
    print(f"forkserver / spawn: {best['forkserver'] / best['spawn']:.2f}x the time "
          f"({best['spawn'] - best['forkserver']:.2f} s saved)")
    for name in latency["spawn"]:
        print(f"  {name:28s} median latency: spawn {latency['spawn'][name]:8.1f} ms, "
              f"forkserver {latency['forkserver'].get(name, float('nan')):8.1f} ms")


if __name__ == "__main__":
    main()
