"""The pipeline outputs that hold timings and machine figures, declared here once.

Every other output of the pipeline is byte-reproducible: two clean default `dvc repro` runs on
one machine write the same bytes (tested by running the tiny pipeline twice from clean). These
exist to hold what this machine measured, so they differ from run to run; they are kept apart
from the scores (no score file holds a wall-clock figure), listed in docs/pipeline.md (a block
generated from this table). Two identical trainings write the same best.pt, so deploy and
benchmark do not rerun and `dvc metrics diff` reports none of their timings.
"""

from __future__ import annotations

TIMING_OUTPUTS: dict[str, str] = {
    "metrics/train_timing/metrics.json": "train: DVCLive's last wall-clock figures (`time/*`)",
    "metrics/train_timing/plots": "train: DVCLive's wall-clock figures per epoch (`time/*`: data "
                                  "and compute seconds, samples/s, validation seconds) and its "
                                  "system monitor (CPU, RAM, disk; GPU on CUDA); in git, one "
                                  "chart per file in `dvc plots show`",
    "metrics/coarse/pretrain_timing/metrics.json": "coarse_pretrain (the coarse pipeline, "
                                                    "`make coarse`): as train's",
    "metrics/coarse/pretrain_timing/plots": "coarse_pretrain: as train's",
    "metrics/coarse/finetune_timing/metrics.json": "coarse_finetune: as train's",
    "metrics/coarse/finetune_timing/plots": "coarse_finetune: as train's",
    "metrics/staged/fcn32s_timing/metrics.json": "staged_fcn32s (the staged pipeline, "
                                                  "`make staged`): as train's",
    "metrics/staged/fcn32s_timing/plots": "staged_fcn32s: as train's",
    "metrics/staged/fcn16s_timing/metrics.json": "staged_fcn16s: as train's",
    "metrics/staged/fcn16s_timing/plots": "staged_fcn16s: as train's",
    "metrics/staged/fcn8s_timing/metrics.json": "staged_fcn8s: as train's",
    "metrics/staged/fcn8s_timing/plots": "staged_fcn8s: as train's",
    "metrics/deploy_latency.json": "deploy: PyTorch's, onnxruntime's and onnxruntime int8's "
                                   "latency at deploy.height × deploy.width on this machine, "
                                   "measured in one run (a metric, apart from the check's: it "
                                   "changes only when deploy reruns)",
    "metrics/benchmark.json": "benchmark: the headline figures (a metric: the stage is a "
                              "measurement)",
    "metrics/benchmark_details.json": "benchmark: every configuration's measurements",
    "plots/benchmark/configs.csv": "benchmark: every configuration's latency, memory and "
                                   "throughput (the two bar charts of `dvc plots show`)",
    "plots/benchmark/benchmark.png": "benchmark: latency and memory per configuration, drawn",
}
"""Output path (as dvc.yaml names it) → what it holds."""


def is_timing_output(path: str) -> bool:
    """Whether `path` (relative to the project) is, or lies inside, a timing output."""
    return any(path == out or path.startswith(out + "/") for out in TIMING_OUTPUTS)
