"""benchmarks/gpu_check.py (`make gpu-check`): its dry mode, which CI runs so that the GPU check
cannot rot, runs every step that does not need CUDA and lists every CUDA step as skipped with
its reason; and the logic that turns step outcomes into the table, the report and the exit
status."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"


def _load():
    if "gpu_check" not in sys.modules:
        spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules["gpu_check"] = module  # dataclasses look their module up while defined
        spec.loader.exec_module(module)
    return sys.modules["gpu_check"]


gpu_check = _load()
Step, Outcome = gpu_check.Step, gpu_check.Outcome

CUDA_STEPS = {"amp_bf16", "amp_fp16", "ddp_nccl", "precision_fp16", "precision_bf16",
              "onnx_cuda", "benchmark_goals"}
FIGURES = {  # a CPU step's figures that the dry run must have measured
    "data": ["small"],
    "train_fp32": ["losses", "loss_first_quarter", "loss_last_quarter", "step_ms_median"],
    "overfit": ["val_miou", "steps", "checkpoint"],
    "kill_resume": ["bit_identical_weights", "max_abs_weight_diff", "val_miou_diff", "checks"],
    "ddp_gloo": ["logged_val_miou", "revalidated_val_miou", "val_miou_diff"],
    "loader": ["decoded", "png", "crop", "batch_size", "workers"],
    "predict_fp32": ["agreement_channels_last", "pixels"],
    "slide": ["windows_per_image", "agreement_slide_vs_whole", "whole", "slide"],
    "oom_fallback": ["warnings", "agreement_with_slide_mode", "method"],
    "onnx": ["agreement", "max_abs_logit_diff", "providers", "export_s"],
    "benchmark": ["results", "fast_path", "measured"],
}


# --- the plan and the logic (fast) -----------------------------------------------------------

def test_every_cuda_path_of_the_issue_is_a_step_and_requirements_come_first():
    names = [s.name for s in gpu_check.STEPS]
    assert len(set(names)) == len(names)
    assert {s.name for s in gpu_check.STEPS if s.needs_cuda} == CUDA_STEPS
    assert set(FIGURES) == set(names) - CUDA_STEPS  # every CPU step is checked below
    for index, step in enumerate(gpu_check.STEPS):
        assert all(names.index(r) < index for r in step.requires), step.name
        assert step.checks and (not step.needs_cuda or step.why_cuda.startswith("needs "))
    assert gpu_check.selected(["precision_fp16"]) == {"precision_fp16", "predict_fp32", "overfit",
                                                      "data"}


def test_the_loader_check_reads_the_named_recipe():
    train = gpu_check.read_recipe()["train"]
    assert train["crop"] == [512, 1024] and train["scale"] == [0.5, 2.0]
    assert train["batch_size"] == 8 and train["precision"] == "bf16" and train["jitter"] == 0.5
    assert train["epochs"] is None and train["iterations"] == 80000


def _check(tmp_path: Path, mode: str = "dry"):
    return gpu_check.Check(mode=mode, device=torch.device("cpu"), work=tmp_path,
                           sizes=gpu_check.dry_sizes(), gpus=0)


def _boom(check):
    raise ValueError("the figure was wrong\nsecond line")


def _skip(check):
    raise gpu_check.Skip("onnxruntime-gpu is not installed")


STUB_STEPS = (
    Step("ok", False, "passes", lambda c: Outcome(True, {"x": 1}, "x is 1")),
    Step("bad", False, "fails", lambda c: Outcome(False, {"x": 2}, "x is 2", "x != 1")),
    Step("after_bad", False, "needs bad", lambda c: Outcome(True, {}), ("bad",)),
    Step("gpu", True, "needs CUDA", lambda c: Outcome(True, {}), why_cuda="needs CUDA: x"),
    Step("raises", False, "raises", _boom),
    Step("skips", False, "skips itself", _skip),
    Step("goal", False, "a goal", lambda c: Outcome(False, {"ms": 9.0}, "9 ms", "> 3 ms"),
         goal=True),
)


def test_outcomes_become_statuses_reasons_and_an_exit_status(tmp_path):
    results = {r.name: r for r in gpu_check.run_all(_check(tmp_path), steps=STUB_STEPS)}
    assert results["ok"].status == "passed" and results["ok"].figures == {"x": 1}
    assert results["bad"].status == "failed" and results["bad"].reason == "x != 1"
    assert results["after_bad"].status == "skipped"
    assert results["after_bad"].reason == "needs step bad, which failed"
    assert results["gpu"].status == "skipped" and results["gpu"].reason == "needs CUDA: x"
    assert results["raises"].status == "failed"
    assert results["raises"].reason == "ValueError: the figure was wrong"
    assert "Traceback" in results["raises"].error
    assert results["skips"].status == "skipped" and results["skips"].device is None
    assert results["goal"].status == "missed"
    assert all(r.seconds is not None for r in results.values() if r.name not in
               ("after_bad", "gpu"))
    assert gpu_check.exit_code(list(results.values())) == 1
    assert gpu_check.exit_code([results["ok"], results["gpu"], results["goal"]]) == 0
    assert gpu_check.exit_code([results["ok"], results["goal"]], strict_goals=True) == 1


def test_the_table_has_a_row_per_step_and_says_what_dry_mode_did_not_prove(tmp_path):
    results = gpu_check.run_all(_check(tmp_path), steps=STUB_STEPS)
    table = gpu_check.summary_table(results, "dry")
    rows = {line.split()[0]: line for line in table.splitlines()[2:] if line.strip()}
    for result in results:
        assert result.status in rows[result.name]
    assert "x is 1" in rows["ok"] and "needs CUDA: x" in rows["gpu"]
    assert "x != 1 [x is 2]" in rows["bad"]
    assert "1 passed, 2 failed, 3 skipped, 1 missed" in table
    assert "DRY MODE" in table and "NOT proven" in table
    assert not gpu_check.cuda_proven(results, "dry")


def test_a_cuda_run_is_proven_only_without_failures_or_unexplained_skips(tmp_path):
    def result(name, status, reason="", needs_cuda=True):
        return gpu_check.StepResult(name, needs_cuda, False, status, reason, "cuda", 1.0, "")

    passed = [result("a", "passed"), result("b", "missed"),
              result("c", "skipped", "needs 2 GPUs, 1 present"),
              result("d", "skipped", "onnxruntime-gpu is not installed (...)")]
    assert gpu_check.cuda_proven(passed, "cuda")
    unexplained = result("e", "skipped", "needs step a, which failed")
    assert not gpu_check.cuda_proven(passed + [unexplained], "cuda")
    assert not gpu_check.cuda_proven(passed + [result("f", "failed", "boom", False)], "cuda")
    table = gpu_check.summary_table(passed, "cuda")
    assert "every CUDA step that this machine can run passed" in table


def test_report_is_json_with_every_step_and_the_environment(tmp_path):
    check = _check(tmp_path)
    results = gpu_check.run_all(check, steps=STUB_STEPS)
    report = gpu_check.report(check, results, 1.5, ["gpu_check.py"], "2026-01-01T00:00:00+00:00")
    again = json.loads(json.dumps(report))
    assert again["mode"] == "dry" and again["cuda_proven"] is False
    assert again["counts"] == {"passed": 1, "failed": 2, "skipped": 3, "missed": 1}
    assert [s["name"] for s in again["steps"]] == [s.name for s in STUB_STEPS]
    assert again["skipped_cuda_steps"] == ["gpu"]
    assert {"torch", "cuda_available", "gpus", "cpu_count"} <= again["environment"].keys()
    assert set(again["steps"][0]) == {"name", "needs_cuda", "goal", "status", "reason", "device",
                                      "seconds", "checks", "headline", "figures", "error"}


# --- the dry run itself (what CI runs) -------------------------------------------------------

@pytest.mark.slow
def test_dry_mode_runs_every_cpu_step_and_lists_every_cuda_step(tmp_path):
    out = tmp_path / "gpu_check.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["mode"] == "dry" and report["cuda_proven"] is False
    steps = {s["name"]: s for s in report["steps"]}
    assert list(steps) == [s.name for s in gpu_check.STEPS]
    for name, step in steps.items():
        if name in CUDA_STEPS:
            assert step["status"] == "skipped" and step["reason"].startswith("needs CUDA"), step
            assert step["figures"] == {} and step["seconds"] is None
        else:
            assert step["status"] == "passed", (name, step["reason"], step["error"])
            assert step["device"] == "cpu" and step["seconds"] > 0
            missing = [k for k in FIGURES[name] if step["figures"].get(k) is None]
            assert not missing, (name, missing)
    assert sorted(report["skipped_cuda_steps"]) == sorted(CUDA_STEPS)
    assert report["counts"] == {"passed": len(FIGURES), "failed": 0,
                                "skipped": len(CUDA_STEPS), "missed": 0}
    figures = {name: step["figures"] for name, step in steps.items()}
    assert figures["overfit"]["val_miou"] >= 0.9
    assert figures["kill_resume"]["bit_identical_weights"]  # the CPU claim: exact resume
    assert figures["ddp_gloo"]["val_miou_diff"] == 0
    for source in ("decoded", "png"):  # the loader's wait, from the cache and from PNGs
        assert 0 <= figures["loader"][source]["data_fraction"] <= 1
        assert figures["loader"][source]["samples_per_s"] > 0
    assert len(figures["oom_fallback"]["warnings"]) == 2
    assert figures["benchmark"]["results"]["configs"]
    for name in steps:  # the table on stdout: one row per step
        assert re.search(rf"^{name}\s+(yes|-)\s", done.stdout, re.MULTILINE), name
    assert "DRY MODE" in done.stdout and "NOT proven" in done.stdout
