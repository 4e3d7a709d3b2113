"""Stage `benchmark`: FCN8s inference latency, throughput, peak memory, FLOPs and utilisation
per configuration, and the fast path (see fcn/benchmark/plan.py for the protocol).

`benchmark.profile: quick` (default) fits the CPU pipeline budget; `dvc exp run -S
benchmark.profile=full` is the thorough run for a GPU.
"""

from pathlib import Path

from fcn.benchmark.run import benchmark_stage
from fcn.stage import run_stage, stage_parser
from fcn.params import load_params


def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--metrics", type=Path, default=Path("metrics/benchmark.json"),
                        help="headline figures (what dvc metrics/exp show list)")
    parser.add_argument("--details", type=Path, default=Path("metrics/benchmark_details.json"),
                        help="everything measured: environment, protocol, every configuration")
    parser.add_argument("--plots", type=Path, default=Path("plots/benchmark"))
    args = parser.parse_args()
    params = load_params(args.params)
    benchmark_stage(params.benchmark, params.model, args.metrics, args.details, args.plots)


if __name__ == "__main__":
    run_stage(main)
