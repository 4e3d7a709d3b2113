"""The CUDA paths on a real GPU, as ordinary tests marked `cuda`: the GPU check's own steps
(fcn.gpucheck) at small sizes, so a GPU machine can run them with `pytest -m cuda`. Each skips
with its reason where no GPU is present (CI, this project's CPU machines); there the same steps
run in the check's dry run (tests/test_gpu_check.py) under the CUDA fakes.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from fcn.gpucheck import profiles
from fcn.gpucheck.data import step_data
from fcn.gpucheck.runner import PASSED, Check, run_step
from helpers.processes import free_port

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="needs a CUDA device (none here); the GPU check's dry run runs "
                              "these steps under the CUDA fakes"),
]

STEPS = {step.name: step for step in profiles.steps("loan")}


def _sizes() -> profiles.Sizes:
    """The dry run's sizes, with full-size images where memory must separate the modes."""
    dry = profiles.dry_sizes()
    large = dataclasses.replace(dry.large, height=512, width=1024)
    return dataclasses.replace(dry, large=large, slide_window=(256, 512),
                               slide_stride=(171, 342), data_workers=2)


@pytest.fixture(scope="module")
def check(tmp_path_factory: pytest.TempPathFactory) -> Check:
    check = Check(mode="cuda", work=tmp_path_factory.mktemp("gpu-check"), sizes=_sizes(),
                  gpus=torch.cuda.device_count())
    assert step_data(check).passed
    result = run_step(STEPS["overfit"], check)
    assert result.status == PASSED, result.reason
    return check


@pytest.mark.parametrize("name", ["train_fp32", "train_tf32", "train_bf16", "train_fp16",
                                  "sync_free", "predict_fp32", "predict_tf32", "predict_fp16",
                                  "predict_bf16", "slide", "oom_fallback", "kill_resume"])
def test_the_gpu_checks_step_passes_on_this_gpu(check, name):
    result = run_step(STEPS[name], check)
    assert result.status == PASSED, (result.reason, result.error)


def _sync_bn_rank(rank: int, port: int, out: str) -> None:
    """One rank: fcn's process group (nccl) and SyncBatchNorm decision, one forward pass of
    this rank's batch; writes the running mean it ends with and its input's statistics."""
    import os

    from fcn.train.distributed import setup, teardown
    from fcn.train.fit import _sync_batchnorm

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    context = setup("cuda")
    try:
        norm = nn.BatchNorm2d(3, momentum=1.0)  # running mean = the last batch's mean
        model = _sync_batchnorm(nn.Sequential(norm), True, context).to(context.device)
        net = nn.parallel.DistributedDataParallel(model, device_ids=[context.device])
        generator = torch.Generator().manual_seed(rank)
        x = torch.randn(2, 3, 8, 8, generator=generator) + 3 * rank  # ranks differ
        net.train()
        net(x.to(context.device))
        result = {"type": type(model[0]).__name__,
                  "running_mean": model[0].running_mean.cpu().tolist(),
                  "sum": x.sum(dim=(0, 2, 3)).tolist(), "count": x.numel() // 3}
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        teardown(context)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs for nccl")
def test_sync_batchnorm_uses_the_global_batch_under_two_process_nccl(tmp_path):
    torch.multiprocessing.spawn(_sync_bn_rank, args=(free_port(), str(tmp_path)), nprocs=2)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert {r["type"] for r in ranks} == {"SyncBatchNorm"}
    total = torch.tensor(ranks[0]["sum"]) + torch.tensor(ranks[1]["sum"])
    global_mean = total / (ranks[0]["count"] + ranks[1]["count"])
    for rank in ranks:  # both ranks hold the global batch's mean, not their own
        assert torch.allclose(torch.tensor(rank["running_mean"]), global_mean, atol=1e-4)
    own = torch.tensor(ranks[0]["sum"]) / ranks[0]["count"]
    assert not torch.allclose(own, global_mean, atol=0.5)
