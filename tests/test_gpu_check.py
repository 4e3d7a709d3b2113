"""The GPU check (fcn.gpucheck): the dry run of each profile (what CI runs, so that the check
cannot rot), the runner's allowances, budget and report, what a run says it proved, the
estimate of each profile's GPU time, and the imports the lent machine must have."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from fcn.gpucheck import profiles, report, runner, wheels
from fcn.gpucheck.runner import Check, Outcome, Step, StepResult
from fcn.gpucheck.train import read_recipe

ROOT = Path(__file__).resolve().parents[1]


# --- the plan ----------------------------------------------------------------------------------

@pytest.mark.parametrize("profile", ["loan", "benchmark"])
def test_steps_come_after_what_they_need_and_say_what_they_prove(profile):
    steps = profiles.steps(profile)
    names = [s.name for s in steps]
    assert len(set(names)) == len(names)
    for index, step in enumerate(steps):
        assert all(names.index(r) < index for r in step.requires if r in names), step.name
        assert step.checks and step.allowance[0] > 0 and step.allowance[1] > 0
        assert step.dry != "skip" or step.dry_reason, step.name
        assert step.cuda or not step.proves, f"{step.name}: a CPU path proves no CUDA path"
    assert runner.selected(["predict_fp16"], profiles.LOAN) == {
        "predict_fp16", "predict_fp32", "overfit", "data"}


def test_every_cuda_branch_runs_in_the_dry_run_unless_it_cannot():
    """Steps that prove a CUDA path run under the fakes or on the meta device in the dry run;
    the exceptions are named with their reason (they need hardware or a long compile)."""
    skipped = {s.name for s in profiles.steps("all") if s.proves and s.dry == "skip"}
    assert skipped == {"ddp_nccl", "onnx_cuda"}
    for step in profiles.steps("all"):
        if step.proves and step.name not in skipped:
            assert step.dry in ("fakes", "meta", "cpu"), step.name


def test_the_loader_check_reads_the_named_recipe():
    train = read_recipe()["train"]
    assert train["crop"] == [512, 1024] and train["scale"] == [0.5, 2.0]
    assert train["batch_size"] == 8 and train["precision"] == "bf16" and train["jitter"] == 0.5


@pytest.mark.parametrize("profile", ["loan", "benchmark"])
def test_the_estimated_gpu_time_of_each_profile_fits_its_budget(profile):
    estimate = profiles.estimate(profile, profiles.cuda_sizes(), 0.5, 1)
    assert set(estimate) == {s.name for s in profiles.steps(profile)}
    assert 0 < sum(estimate.values()) <= profiles.BUDGET_S[profile] == 240
    assert all(v >= 0 for v in estimate.values())


def test_the_estimate_counts_flops_starts_and_compiles():
    sizes = profiles.cuda_sizes()
    fwd = profiles.forward_flops(1024, 2048)
    assert 600e9 < fwd < 660e9  # FCN8s/VGG11-BN at Cityscapes size (ARCHITECTURE.md: 632)
    more = profiles.estimate("loan", profiles.dry_sizes(), 0.5, 1)
    assert sum(more.values()) < sum(profiles.estimate("loan", sizes, 0.5, 1).values())
    bench = profiles.estimate("benchmark", sizes, 0.5, 1)["benchmark"]
    starts = 3 * profiles.ASSUMED["process_start_s"]  # eager together, 2 compiled alone
    assert bench > starts + 2 * profiles.ASSUMED["compile_infer_s"]


# --- the runner --------------------------------------------------------------------------------

def _check(tmp_path: Path, mode: str = "dry") -> Check:
    return Check(mode=mode, work=tmp_path, sizes=profiles.dry_sizes(), gpus=0)


def _boom(check):
    raise ValueError("the figure was wrong\nsecond line")


def _skip(check):
    raise runner.Skip("onnxruntime-gpu is not installed")


def _device(check):
    return Outcome(True, {"device": str(check.device), "fakes": check.fakes is not None,
                          "cuda": torch.cuda.is_available()})


STUB = (
    Step("ok", "passes", lambda c: Outcome(True, {"x": 1}, "x is 1"), (5, 5)),
    Step("bad", "fails", lambda c: Outcome(False, {"x": 2}, "x is 2", "x != 1"), (5, 5)),
    Step("after_bad", "needs bad", lambda c: Outcome(True, {}), (5, 5), requires=("bad",)),
    Step("gpu", "no dry run", lambda c: Outcome(True, {}), (5, 5), proves="a path",
         dry="skip", dry_reason="needs hardware"),
    Step("raises", "raises", _boom, (5, 5)),
    Step("skips", "skips itself", _skip, (5, 5)),
    Step("goal", "a goal", lambda c: Outcome(False, {"ms": 9.0}, "9 ms", "> 3 ms"), (5, 5),
         goal=True),
    Step("faked", "under the fakes", _device, (5, 5), proves="fakes", dry="fakes"),
    Step("meta", "on meta", _device, (5, 5), dry="meta"),
)


def test_outcomes_become_statuses_reasons_and_an_exit_status(tmp_path):
    results = {r.name: r for r in runner.run_all(_check(tmp_path), STUB)}
    assert results["ok"].status == "passed" and results["ok"].figures == {"x": 1}
    assert results["bad"].status == "failed" and results["bad"].reason == "x != 1"
    assert results["after_bad"].status == "skipped"
    assert results["after_bad"].reason == "needs step bad, which failed"
    assert results["gpu"].status == "skipped" and results["gpu"].reason == "needs hardware"
    assert results["raises"].status == "failed"
    assert results["raises"].reason == "ValueError: the figure was wrong"
    assert "Traceback" in results["raises"].error
    assert results["skips"].status == "skipped" and results["skips"].device is None
    assert results["goal"].status == "missed"
    faked, meta = results["faked"].figures, results["meta"].figures
    assert faked == {"device": "cuda:0", "fakes": True, "cuda": True}
    assert results["faked"].ran_as == "fakes" and results["meta"].ran_as == "meta"
    assert torch.cuda.is_available() is False or torch.cuda.device_count() > 0  # restored
    assert meta["device"] == "meta" and not meta["fakes"]
    assert runner.exit_code(list(results.values())) == 1
    assert runner.exit_code([results["ok"], results["gpu"], results["goal"]]) == 0
    assert runner.exit_code([results["ok"], results["goal"]], strict_goals=True) == 1


def test_a_step_over_its_allowance_is_stopped_and_reported(tmp_path):
    def slow(check):
        time.sleep(30)
        return Outcome(True, {})

    start = time.perf_counter()
    result = runner.run_step(Step("slow", "sleeps", slow, (1, 1)), _check(tmp_path))
    assert time.perf_counter() - start < 10
    assert result.status == "overran" and "allowance of 1 s" in result.reason
    assert runner.exit_code([result]) == 1


def test_the_budget_cuts_allowances_and_skips_what_no_longer_fits(tmp_path):
    def slow(check):
        time.sleep(3)
        return Outcome(True, {})

    steps = (Step("a", "sleeps", slow, (60, 60)), Step("b", "sleeps", slow, (60, 60)))
    results = runner.run_all(_check(tmp_path), steps, budget=2.0)
    assert results[0].status == "overran" and 1.9 < results[0].allowance_s <= 2.0
    assert results[1].status == "skipped" and "budget of 2 s is spent" in results[1].reason


def test_the_report_is_rewritten_after_every_step(tmp_path):
    seen = []
    runner.run_all(_check(tmp_path), STUB[:3], after_each=lambda r: seen.append(
        [x.name for x in r]))
    assert seen == [["ok"], ["ok", "bad"], ["ok", "bad", "after_bad"]]


WATCHDOG = """
import json, signal, sys, time
from pathlib import Path
from fcn.gpucheck import runner
from fcn.gpucheck.profiles import dry_sizes
runner.GRACE_S = 1.0

def stuck(check):  # never returns to Python for the alarm: SIGALRM blocked, a long sleep
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGALRM])
    time.sleep(60)

def write(results):
    Path(sys.argv[1]).write_text(json.dumps([[r.name, r.status, r.reason] for r in results]))

check = runner.Check(mode="dry", work=Path(sys.argv[2]), sizes=dry_sizes(), gpus=0)
steps = (runner.Step("ok", "", lambda c: runner.Outcome(True, {}), (5, 5)),
         runner.Step("stuck", "", stuck, (1, 1)))
runner.run_all(check, steps, after_each=write)
"""


def test_a_hung_step_still_leaves_the_report_and_ends_the_run(tmp_path):
    out = tmp_path / "report.json"
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", WATCHDOG, str(out), str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 3, done.stderr[-2000:]
    assert time.perf_counter() - start < 30
    rows = json.loads(out.read_text())
    assert rows[0] == ["ok", "passed", ""]
    assert rows[1][:2] == ["stuck", "overran"] and "process was ended" in rows[1][2]


def _result(name: str, status: str, proves: str, ran_as: str | None = "cuda",
            reason: str = "") -> StepResult:
    return StepResult(name, status, reason, "cuda:0", 1.0, 10.0, "", proves, ran_as=ran_as)


def test_a_one_gpu_run_says_what_it_did_not_prove():
    results = [_result("train_bf16", "passed", "bf16 training"),
               _result("goals", "missed", "goals"),
               _result("ddp_nccl", "skipped", "nccl DDP", None, "needs 2 GPUs, 1 present"),
               _result("onnx_cuda", "skipped", "CUDA provider", None,
                       "onnxruntime-gpu is not installed"),
               _result("overfit", "failed", "bf16 convergence", "cuda", "mIoU 0.5 < 0.9"),
               _result("onnx", "passed", "")]
    done, missing = report.proven(results, "cuda")
    assert done == ["bf16 training", "goals"]
    assert missing == {"nccl DDP": "skipped: needs 2 GPUs, 1 present",
                       "CUDA provider": "skipped: onnxruntime-gpu is not installed",
                       "bf16 convergence": "failed: mIoU 0.5 < 0.9"}
    table = report.table(results, "cuda")
    assert "NOT proven (3)" in table and "needs 2 GPUs" in table
    dry_done, dry_missing = report.proven(results, "dry")
    assert dry_done == [] and set(dry_missing) == {"bf16 training", "goals", "nccl DDP",
                                                  "CUDA provider", "bf16 convergence"}


def test_on_one_gpu_the_real_steps_skip_nccl_ddp_and_the_onnx_cuda_provider(tmp_path,
                                                                            monkeypatch):
    """gpu-check.md: on one GPU, nccl DDP with SyncBatchNorm always appears as not proven, and
    onnxruntime's CUDA provider wherever onnxruntime-gpu is not installed: the profile's own
    steps, through the runner's own skip rule and the step's own provider check."""
    import onnxruntime

    from fcn.gpucheck.deploy import step_onnx_cuda

    steps = {s.name: s for s in profiles.steps("loan")}
    one_gpu = Check(mode="cuda", work=tmp_path, sizes=profiles.cuda_sizes(), gpus=1)
    assert runner.skip_reason(steps["ddp_nccl"], one_gpu, {}, set(steps), 0.0, None) == \
        "needs 2 GPUs, 1 present"
    assert steps["onnx_cuda"].run is step_onnx_cuda
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(runner.Skip, match="onnxruntime-gpu is not installed"):
        step_onnx_cuda(one_gpu)
    skipped = [_result("ddp_nccl", "skipped", steps["ddp_nccl"].proves, None,
                       "needs 2 GPUs, 1 present")]
    assert steps["ddp_nccl"].proves in report.proven(skipped, "cuda")[1]


def test_report_is_json_with_every_step_and_the_environment(tmp_path):
    results = runner.run_all(_check(tmp_path), STUB)
    payload = report.report("loan", "dry", results, 1.5, 240.0, {"ok": 1.0}, ["x"],
                            "2026-01-01T00:00:00+00:00", report.environment())
    again = json.loads(json.dumps(payload))
    assert again["mode"] == "dry" and again["proven"] == [] and again["within_budget"] is None
    assert [s["name"] for s in again["steps"]] == [s.name for s in STUB]
    assert {"torch", "cuda_available", "gpus", "cpu_count"} <= again["environment"].keys()
    assert again["estimate_total_s"] == 1.0


# --- the dry runs, and what the lent machine must have -----------------------------------------

LENT_MACHINE = """
import atexit, importlib.abc, os, sys

BLOCKED = set(open(os.environ["FCN_BLOCKED"]).read().split())


class NotOnTheLentMachine(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (not on the lent GPU machine)",
                                      name=name)
        return None


sys.meta_path.insert(0, NotOnTheLentMachine())


def _dump():
    names = sorted({m.split(".")[0] for m in list(sys.modules)})
    with open(os.path.join(os.environ["FCN_IMPORT_LOG"], f"{os.getpid()}.txt"), "w") as f:
        f.write("\\n".join(names))


atexit.register(_dump)
"""


def _not_on_the_lent_machine() -> set[str]:
    """Top-level modules installed here whose distributions the lent machine lacks and the
    carried wheels do not bring."""
    import importlib.metadata

    allowed = wheels.DEVICE_PACKAGES | {wheels.normalise(w) for w in wheels.WHEELS}
    return {module for module, dists in importlib.metadata.packages_distributions().items()
            if module != "fcn" and module not in sys.stdlib_module_names
            and not {wheels.normalise(d) for d in dists} & allowed}


@pytest.mark.slow
@pytest.mark.parametrize("profile, expected", [
    ("loan", {"passed": 18, "skipped": 2}), ("benchmark", {"passed": 1, "skipped": 1})])
def test_the_dry_run_of_each_profile_passes_with_only_the_lent_machines_packages(
        tmp_path, profile, expected):
    """Every step runs (CUDA branches under the fakes or on meta) or says why not, in
    processes (the check, the train stage, torchrun's workers, benchmark workers) where every
    module the lent machine lacks, and the carried wheels do not bring, fails to import:
    DVC, DVCLive, jsonschema, cityscapesscripts among them."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(textwrap.dedent(LENT_MACHINE))
    blocked = _not_on_the_lent_machine()
    assert {"dvc", "dvclive", "jsonschema", "cityscapesscripts"} <= blocked
    (tmp_path / "blocked.txt").write_text("\n".join(sorted(blocked)))
    logs = tmp_path / "imports"
    logs.mkdir()
    env = {**os.environ, "FCN_IMPORT_LOG": str(logs), "FCN_BLOCKED": str(tmp_path / "blocked.txt"),
           "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}
    out = tmp_path / "gpu_check.json"
    done = subprocess.run([sys.executable, "-m", "fcn.gpucheck", "--profile", profile,
                           "--dry-run", "--out", str(out)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    result = json.loads(out.read_text())
    counts = {k: v for k, v in result["counts"].items() if v}
    assert counts == expected, [(s["name"], s["status"], s["reason"]) for s in result["steps"]]
    assert result["proven"] == [] and result["mode"] == "dry"
    assert "NO CUDA path is proven" in done.stdout
    total = re.search(rf"estimated GPU time of the {profile} profile on one H100: (\d+) s",
                      done.stdout)
    assert total and int(total.group(1)) <= 240, done.stdout[-2000:]
    for step in result["steps"]:  # the CUDA paths really took their CUDA branches
        if step["ran_as"] == "fakes" and step["name"] in ("loader", "benchmark"):
            assert step["figures"].get("cuda_calls") or step["figures"]["fakes"]["cuda_calls"]
    imported = set()
    for log in logs.glob("*.txt"):
        imported |= set(log.read_text().split())
    assert len(list(logs.glob("*.txt"))) >= 2  # the stage and benchmark processes too
    assert not imported & blocked, sorted(imported & blocked)
    if profile == "loan":
        assert "isal" in imported  # the one carried wheel is really needed


def test_the_wheels_are_downloaded_for_the_lent_machines_python(tmp_path):
    command = wheels.download_command(tmp_path)
    assert command[command.index("--python-version") + 1] == "3.12"
    assert "--no-deps" in command and "--only-binary=:all:" in command
    assert {f"{name}==" for name in wheels.WHEELS} == {
        p.split("==")[0] + "==" for p in command if "==" in p}
    assert "--no-index" in wheels.install_line() and "--target /tmp/site" in wheels.install_line()
    assert not {wheels.normalise(w) for w in wheels.WHEELS} & wheels.DEVICE_PACKAGES


def test_an_overrunning_benchmark_worker_is_killed_not_waited_for(tmp_path):
    """A step stopped at its allowance while a benchmark worker process runs (a compile, say)
    kills that worker instead of waiting for it."""
    import numpy as np
    import psutil

    from fcn.benchmark.plan import Config, Protocol
    from fcn.benchmark.worker import Job, run_isolated
    from fcn.model import FCN8s
    from fcn.params import ModelParams

    torch.save(FCN8s("vgg11_bn").state_dict(), tmp_path / "state.pt")
    np.save(tmp_path / "images.npy", np.zeros((1, 32, 32, 3), np.uint8))
    protocol = Protocol("quick", "cpu", 32, 32, 1, 10**7, 0, False, 1, 64, (32, 32), (32, 32))
    job = Job((Config("fp32", False, False, 1),), protocol, ModelParams(),
              str(tmp_path / "state.pt"), str(tmp_path / "images.npy"))
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    start = time.perf_counter()
    result = runner.run_step(Step("bench", "", lambda c: run_isolated(job), (8, 8)),
                             _check(tmp_path))
    assert result.status == "overran" and time.perf_counter() - start < 25
    left = [p.cmdline() for p in psutil.Process().children(recursive=True)
            if p.pid not in before and p.is_running() and p.status() != psutil.STATUS_ZOMBIE
            and not any(helper in " ".join(p.cmdline()) for helper in (
                "resource_tracker", "multiprocessing.forkserver"))]  # multiprocessing's own
    # (the forkserver the workers fork from stays, idle, until this process exits; the
    # worker it forked is among the children checked here)
    assert not left, left
