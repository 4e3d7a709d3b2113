"""The GPU check: one command that proves the project's CUDA paths on a lent GPU in a few
minutes, and runs as a dry run on a machine without one, so that it cannot rot.

    python -m fcn.gpucheck --profile loan|benchmark|all [--out FILE] [--dry-run] [--only STEP]

Modules, by concept:

    profiles   the loan and benchmark profiles: their steps, sizes and GPU-time estimate
    runner     steps under time allowances and a budget; the report rewritten after each step
    data       the synthetic datasets, masks and decoded caches the steps use
    train      precisions, the sync-free window, compile, overfit, kill/resume, DDP, loader
    predict    inference precisions against strict fp32, slide mode, the OOM fallback
    deploy     ONNX in onnxruntime's CPU and CUDA providers
    benchmark  the inference benchmark and its latency and memory goals
    report     the JSON report and the table: what was proven, and what was not and why
    fakes      recording torch.cuda fakes with torch's argument checks (dry run, tests)
    wheels     what the lent machine lacks, fetched as wheels that travel with the tree

It imports nothing the lent machine lacks but `isal` (`wheels`): no DVC, no DVCLive.
docs/gpu-check.md says how to run it there.
"""
