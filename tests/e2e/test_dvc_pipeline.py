"""The DVC experience end to end, driven through the real `dvc` command on a tiny pipeline.

One copy of the project (tiny params, its own git repo) is reproduced once per module; each
test then asks what a user would: does a second `dvc repro` do nothing, does changing one
param rerun exactly the stages downstream of it (and does setting it back restore from the
run-cache), does `dvc exp run -S` record an experiment that `dvc exp show`/`metrics diff`
report, and does `dvc plots show` write the curves, per-class IoU, confusion and samples.
A second copy with the same params, its `dvc repro` killed while training and run again,
must resume and end with the same bytes in every output but the timing outputs (issue 21);
it leaves out the stages that write timing outputs only (benchmark), which have no bytes to
compare.
A stage not yet declared in dvc.yaml makes the part that needs it skip, naming the stage.
"""

from __future__ import annotations

import csv
import hashlib
import json
import shlex
import re
import shutil
import signal
import subprocess
import sys
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from helpers.cdp import Chromium, find_chromium, render_plots_page
from fcn.outputs import is_timing_output
from helpers.dvc_repo import (PIPELINE, Result, commit_all, copy_project, dvc, environment, git,
                              make_tiny, missing, outputs_by_stage, ran_stages, read_params,
                              run, set_param, stages)

pytestmark = pytest.mark.slow

EPOCHS = 2  # two points per training curve: a line, not a dot


@dataclass
class Pipeline:
    """The reproduced copy and what its first `dvc repro` printed."""

    repo: Path
    first: Result
    params: dict[str, Any]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    repo = copy_project(tmp_path_factory.mktemp("pipeline") / "project")
    params = make_tiny(repo)
    if "epochs" in params.get("train", {}):
        set_param(repo, "train.epochs", EPOCHS)
    commit_all(repo, "tiny pipeline")
    first = dvc(repo, "repro")
    commit_all(repo, "dvc repro")  # dvc.lock and the small metrics, as the project commits them
    yield Pipeline(repo, first, read_params(repo))


def _skip_if_missing(repo: Path, *needed: str) -> None:
    absent = missing(repo, needed)
    if absent:
        pytest.skip(f"stage(s) not in dvc.yaml yet: {', '.join(absent)}")


def test_repro_runs_every_stage(pipeline: Pipeline) -> None:
    declared = set(stages(pipeline.repo))
    assert ran_stages(pipeline.first.output) == declared
    assert "Data and pipelines are up to date." in dvc(pipeline.repo, "status").output
    _skip_if_missing(pipeline.repo, *PIPELINE)


def test_second_repro_runs_nothing_and_says_so(pipeline: Pipeline) -> None:
    again = dvc(pipeline.repo, "repro")
    assert ran_stages(again.output) == set()
    assert "Data and pipelines are up to date." in again.output
    for name in stages(pipeline.repo):
        assert f"Stage '{name}' didn't change, skipping" in again.output
    assert git(pipeline.repo, "status", "--porcelain", "--", "dvc.lock") == ""
    _skip_if_missing(pipeline.repo, *PIPELINE)


def _lock_outputs(repo: Path, names: list[str]) -> dict[str, str]:
    """Every output dvc.lock records (metrics and plots included) for the stages `names` → its
    md5."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text(encoding="utf-8"))
    return {out["path"]: out["md5"] for name, stage in lock["stages"].items() if name in names
            for out in stage.get("outs", [])}


def _file_digests(path: Path) -> dict[str, str]:
    """md5 of the file at `path`, or of every file under it ('' for the file itself)."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {("" if f == path else f.relative_to(path).as_posix()):
            hashlib.md5(f.read_bytes()).hexdigest() for f in files}


def reproducible_stages(repo: Path) -> list[str]:
    """The stages with an output that is not a timing output (every stage but benchmark):
    reproducing them as targets reproduces every output whose bytes can be compared."""
    return [name for name, paths in outputs_by_stage(repo).items()
            if not all(is_timing_output(path) for path in paths)]


def differing_outputs(first: Path, second: Path) -> list[str]:
    """The output files (timing outputs aside) whose bytes differ between two reproduced
    copies of the project, each named."""
    names = reproducible_stages(first)  # the others' lock entries may be the project's own
    a, b = _lock_outputs(first, names), _lock_outputs(second, names)
    compared = sorted(path for path in a if not is_timing_output(path))
    assert compared == sorted(path for path in b if not is_timing_output(path)), (sorted(a), sorted(b))
    differing = []
    for path in compared:
        if a[path] == b[path]:
            continue
        x, y = _file_digests(first / path), _file_digests(second / path)
        differing += [f"{path}/{name}".rstrip("/") for name in sorted(x.keys() | y.keys())
                      if x.get(name) != y.get(name)] or [path]
    return differing


@dataclass
class Resumed:
    """A second copy with the same params, reproduced from clean (its reproducible stages) with
    its train stage killed after epoch 1 (dvc and the stage at once), then reproduced again."""

    repo: Path
    killed: str
    again: Result


@pytest.fixture(scope="module")
def resumed(pipeline: Pipeline, tmp_path_factory: pytest.TempPathFactory) -> Resumed:
    _skip_if_missing(pipeline.repo, *PIPELINE)
    repo = copy_project(tmp_path_factory.mktemp("again") / "project")
    shutil.copy2(pipeline.repo / "params.yaml", repo / "params.yaml")
    commit_all(repo, "tiny pipeline")
    targets = reproducible_stages(repo)
    assert "train" in targets and "benchmark" not in targets, targets
    process = subprocess.Popen([sys.executable, "-m", "dvc", "repro", *targets], cwd=repo,
                               env=environment(repo), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = []
    assert process.stdout is not None
    for line in process.stdout:  # logged after epoch 1's checkpoint is written
        lines.append(line)
        if f"epoch 1/{EPOCHS}" in line:
            os.killpg(process.pid, signal.SIGKILL)  # dvc and the stage's python, at once
            break
    process.wait(timeout=60)
    killed = "".join(lines)
    assert process.returncode == -signal.SIGKILL, killed[-3000:]
    assert not (repo / "models").exists()  # DVC removed train's outputs before running it
    return Resumed(repo, killed, dvc(repo, "repro", *targets))


def test_a_killed_repro_resumes_training_where_it_stopped(resumed: Resumed) -> None:
    """DVC deletes the train stage's outputs before running it: the resume state lives
    outside them (train.resume_dir; conftest points XDG_CACHE_HOME at a temporary folder), so
    the next `dvc repro` resumes after epoch 1 instead of starting again, and the stages that
    had finished are not rerun."""
    ran = ran_stages(resumed.again.output)
    assert "train" in ran and not ran & {"synthesize", "masks", "class_weights", "decode"}, ran
    assert f"after epoch 1 of {EPOCHS}" in resumed.again.output, resumed.again.output[-3000:]


def test_a_clean_and_an_interrupted_repro_write_the_same_bytes(pipeline: Pipeline,
                                                               resumed: Resumed) -> None:
    """Issue 21: the same params give byte-identical outputs on the same machine, every output
    but the declared timing outputs (fcn/outputs.py), whether a run went through uninterrupted
    or was killed and resumed (checkpoints, scores, predictions, ONNX, caches, plots); and
    `dvc metrics diff` after an identical retraining prints nothing."""
    assert differing_outputs(pipeline.repo, resumed.repo) == []
    commit_all(resumed.repo, "dvc repro")
    again = dvc(resumed.repo, "repro", "--force", "--single-item", "train")
    assert ran_stages(again.output) == {"train"}
    assert dvc(resumed.repo, "metrics", "diff").output.strip() == ""


def test_plots_diff_draws_a_clean_runs_plots_beside_another_runs_workspace(
        pipeline: Pipeline, resumed: Resumed) -> None:
    """A fresh clone that ran `dvc repro` itself lacks the committed run's timing outputs in
    its cache. `dvc plots diff` must still draw every training curve (cached: the same bytes)
    and timing curve (in git) for both revisions, and lose only the benchmark charts: DVC
    drops a whole revision when a folder it needs is missing, so no plot may need a cached
    timing folder. The interrupted copy stands in for the clone (its own cache, no benchmark
    run); the clean copy's commit is fetched into it as a branch."""
    repo = resumed.repo
    git(repo, "fetch", "-q", str(pipeline.repo), "HEAD:refs/heads/clean")
    done = run(repo, "dvc", "plots", "diff", "clean", "--json")
    assert done.returncode == 0, done.output[-3000:]
    diff = json.loads(done.stdout)
    lost = {(e["rev"], e.get("source", "")) for e in diff.get("errors") or []}
    assert all(source.startswith("plots/benchmark/") for _, source in lost), lost
    drawn = {name: {rev for entry in entries for rev in entry.get("revisions") or []}
             for name, entries in diff["data"].items()}
    curves = [name for name in drawn if not name.startswith(("benchmark", "plots/benchmark"))]
    assert any(name.startswith("metrics/train_timing/") for name in curves), sorted(drawn)
    assert "Loss" in curves and "mIoU" in curves, sorted(drawn)
    # issue 23: two runs' Boundary IoU bars and reliability diagrams side by side
    assert {"plots/evaluate/boundary_iou.csv", "plots/evaluate/reliability.csv"} <= set(curves)
    for name in curves:
        assert drawn[name] == {"clean", "workspace"}, (name, drawn[name])


# (section, keys to try in order, stages expected to rerun): evaluate, export, deploy and benchmark
# are leaves of the graph, so a param of theirs reruns that stage alone. A train param (which
# reruns train and the stages that read the model, and whose old value restores all of them
# from the run-cache) is tried by the `dvc exp run -S train.epochs=...` test below, on its copy:
# one training less.
LEAF_PARAMS = [
    ("evaluate", ("samples", "sample_width", "batch_size"), {"evaluate"}),
    ("export", ("overlays", "gif_frames", "gif_width"), {"export"}),
    ("deploy", ("iters", "warmup"), {"deploy"}),
    ("benchmark", ("quick_iters", "iters", "seed"), {"benchmark"}),
]


def _changed(value: Any) -> Any:
    return (not value) if isinstance(value, bool) else value + 1


@pytest.mark.parametrize(("section", "keys", "expected"), LEAF_PARAMS,
                         ids=[s for s, _, _ in LEAF_PARAMS])
def test_changing_a_param_reruns_only_its_stage_and_setting_it_back_uses_the_run_cache(
        pipeline: Pipeline, section: str, keys: tuple[str, ...], expected: set[str]) -> None:
    _skip_if_missing(pipeline.repo, section)
    repo = pipeline.repo
    key = next((k for k in keys if k in pipeline.params.get(section, {})), None)
    if key is None:
        pytest.skip(f"none of {section}.{{{', '.join(keys)}}} in params.yaml")
    dotted = f"{section}.{key}"
    lock_before = (repo / "dvc.lock").read_text(encoding="utf-8")
    old = set_param(repo, dotted, _changed(pipeline.params[section][key]))
    try:
        status = dvc(repo, "status", "--json")
        # status names the stage whose params changed; repro also reruns what depends on it
        assert set(json.loads(status.stdout)) == {section}, status.stdout
        rerun = dvc(repo, "repro")
        assert ran_stages(rerun.output) == expected, rerun.output
    finally:
        set_param(repo, dotted, old)
    back = dvc(repo, "repro")
    assert ran_stages(back.output) == set(), back.output
    for name in expected:
        assert f"Stage '{name}' is cached - skipping run, checking out outputs" in back.output
    assert (repo / "dvc.lock").read_text(encoding="utf-8") == lock_before
    assert "Data and pipelines are up to date." in dvc(repo, "status").output


def _experiments(show: Any) -> list[dict[str, Any]]:
    """Every row (baseline and experiments) of `dvc exp show --json`, flattened."""
    rows: list[dict[str, Any]] = []
    for entry in show:
        rows.append(entry)
        for group in entry.get("experiments") or []:
            rows.extend(group.get("revs") or [])
    return rows


def _files_data(row: dict[str, Any], kind: str) -> dict[str, Any]:
    data = row.get("data") or {}
    return {path: (content or {}).get("data", {}) for path, content in (data.get(kind) or {}).items()}


def test_exp_run_records_an_experiment_that_exp_show_and_metrics_diff_report(
        pipeline: Pipeline, tmp_path: Path) -> None:
    """`dvc exp run -S train.epochs=...` reruns train and the stages that read the model, and
    records an experiment that exp show, metrics diff and params diff report; setting the
    param back restores all of them from the run-cache; `dvc exp apply` brings the
    experiment's model back."""
    _skip_if_missing(pipeline.repo, "train")
    repo = tmp_path / "exp"
    shutil.copytree(pipeline.repo, repo, symlinks=True)  # exp run leaves its results in the workspace
    epochs = EPOCHS + 1
    ran = dvc(repo, "exp", "run", "-n", "more-epochs", "-S", f"train.epochs={epochs}")
    declared = stages(repo)
    # a train param reruns train and what reads the model, never the data stages
    assert ran_stages(ran.output) >= {"train"} & set(declared)
    assert ran_stages(ran.output).isdisjoint({"synthesize", "masks", "benchmark"})
    assert {"evaluate", "export", "deploy"} & set(declared) <= ran_stages(ran.output)

    rows = _experiments(json.loads(dvc(repo, "exp", "show", "--json").stdout))
    exp = next((r for r in rows if r.get("name") == "more-epochs"), None)
    assert exp is not None, [r.get("name") for r in rows]
    assert _files_data(exp, "params")["params.yaml"]["train"]["epochs"] == epochs
    metrics = _files_data(exp, "metrics")
    train_metrics = next(v for k, v in metrics.items() if k.startswith("metrics/train"))
    assert train_metrics["step"] == epochs - 1  # DVCLive counts steps (epochs) from 0

    diff = json.loads(dvc(repo, "metrics", "diff", "--json").stdout)
    train_diff = next(v for k, v in diff.items() if k.startswith("metrics/train"))
    assert train_diff["step"] == {"old": EPOCHS - 1, "new": epochs - 1, "diff": 1}
    params_diff = json.loads(dvc(repo, "params", "diff", "--json").stdout)
    epochs_diff = params_diff["params.yaml"]["train.epochs"]
    assert (epochs_diff["old"], epochs_diff["new"]) == (EPOCHS, epochs)
    _skip_if_missing(repo, "evaluate")
    assert "metrics/evaluate.json" in diff, sorted(diff)
    assert "class_iou_mean" in metrics["metrics/evaluate.json"]

    # docs/experiments.md's focused table, run as written: the headline scores only
    docs = (Path(__file__).resolve().parents[2] / "docs" / "experiments.md").read_text()
    line = docs.split("<!-- focused-exp-show -->", 1)[1].split("```bash\n", 1)[1]
    args = shlex.split(line.split("\n", 1)[0])
    assert args[:3] == ["dvc", "exp", "show"]
    header = dvc(repo, *args[1:], "--csv").stdout.splitlines()[0].split(",")
    assert header[0] == "Experiment" and "class_iou_mean" in header and "best.epoch" in header
    assert len(header) < 15 and not any(c.startswith(("val.iou.", "system.")) for c in header)

    # setting the train param back restores train and every stage that reads the model from
    # the run-cache, without training (train.out is a plain cached output; its resume state
    # lives outside the outputs)
    trained = (repo / "models" / "best.pt").read_bytes()
    git(repo, "checkout", "HEAD", "--", "params.yaml")
    back = dvc(repo, "repro")
    assert ran_stages(back.output) == set(), back.output
    for name in {"train", "evaluate", "export", "deploy"} & set(declared):
        assert f"Stage '{name}' is cached - skipping run, checking out outputs" in back.output
    assert git(repo, "status", "--porcelain", "--", "dvc.lock") == ""  # HEAD's lock again
    assert "Data and pipelines are up to date." in dvc(repo, "status").output
    assert (repo / "models" / "best.pt").read_bytes() != trained  # HEAD's model (2 epochs)

    # `dvc exp apply` brings the experiment's model back from the cache
    applied = dvc(repo, "exp", "apply", "more-epochs")
    assert ran_stages(applied.output) == set()
    assert (repo / "models" / "best.pt").read_bytes() == trained
    assert "Data and pipelines are up to date." in dvc(repo, "status").output


def _plot_sources(definition: Any) -> tuple[str, dict[str, Any], list[str]]:
    """(id, properties, data files) of one entry of dvc.yaml's top-level `plots:`."""
    if isinstance(definition, str):
        return definition, {}, [definition]
    ((name, props),) = definition.items()
    props = props or {}
    y = props.get("y")
    files = list(y) if isinstance(y, dict) else [name]
    return name, props, files


def test_plots_show_writes_curves_class_iou_confusion_and_samples(
        pipeline: Pipeline, tmp_path: Path) -> None:
    repo = pipeline.repo
    dvc(repo, "plots", "show")
    page = repo / "dvc_plots" / "index.html"
    html = page.read_text(encoding="utf-8")
    from dvc_render.base import Renderer  # DVC's plot-name -> div-id rule

    plots = [_plot_sources(p) for p in yaml.safe_load((repo / "dvc.yaml").read_text())
             .get("plots", [])]
    curves = [(n, p) for n, p, files in plots
              if p.get("x") in ("step", "epoch") and all(f.startswith("metrics/train/") for f in files)
              and not any("/system/" in f for f in files)]
    # DVCLive's system monitor samples about once a second, not once per epoch
    system = [(n, p) for n, p, files in plots if any("/system/" in f for f in files)]
    class_iou = [(n, p) for n, p, files in plots
                 if p.get("template") == "bar_horizontal" and "iou" in n.lower()]
    images = sorted((repo / "dvc_plots" / "static").glob("*")) if (repo / "dvc_plots" / "static").exists() else []
    confusion = [i for i in images if "confusion" in i.name]
    samples = [i for i in images if "sample" in i.name]

    rendered = None
    executable = find_chromium()
    if executable:
        with Chromium(executable) as chromium:
            rendered = render_plots_page(chromium, page, screenshot=tmp_path / "plots.png")
        assert rendered.remote_requests() == [] and rendered.report.exceptions == []
        assert sorted(rendered.charts) == sorted(rendered.chart_ids)
        assert all(i["loaded"] for i in rendered.images)

    needed = []
    if "train" in stages(repo):
        assert curves, "no training curves (x: step) declared in dvc.yaml plots"
        for name, _ in curves:
            div = Renderer.remove_special_chars(name)
            assert f'vegaEmbed(\'#{div}\'' in html, name
            if rendered:  # one vertex per epoch on every series of the curve
                assert max(rendered.charts[div]["line_points"], default=0) == EPOCHS, \
                    (name, rendered.charts[div])
        for name, _ in system:
            div = Renderer.remove_special_chars(name)
            assert f'vegaEmbed(\'#{div}\'' in html, name
            if rendered:
                assert min(rendered.charts[div]["line_points"], default=0) >= 1, name
        # the timing curves: a stage plot folder, one chart per file (time/* and system/*)
        timing = sorted(p.relative_to(repo).as_posix()
                        for p in (repo / "metrics" / "train_timing" / "plots").rglob("*.tsv"))
        assert any("/time/" in path for path in timing), timing
        for path in timing:
            div = Renderer.remove_special_chars(path)
            assert f'vegaEmbed(\'#{div}\'' in html, path
            if rendered:
                assert min(rendered.charts[div]["line_points"], default=0) >= 1, path
    else:
        needed.append("train")
    if "evaluate" in stages(repo):
        assert class_iou, "no per-class IoU bar_horizontal plot declared"
        name, props = class_iou[0]
        div = Renderer.remove_special_chars(name)
        assert f'vegaEmbed(\'#{div}\'' in html
        with (repo / name).open(newline="") as f:
            classes = sum(1 for _ in csv.DictReader(f))
        assert classes == 19  # the evaluated Cityscapes classes
        if rendered:
            assert rendered.charts[div]["rects"] == classes
        confusion_divs = [d for d in rendered.charts if "confusion" in d] if rendered else []
        assert confusion or confusion_divs, "no confusion heatmap (PNG or vega) in the page"
        for png in confusion:
            assert f'src="static/{png.name}"' in html
        synth = pipeline.params["synthesize"]
        val_images = synth["val_per_city"] * len(synth["val_cities"])
        assert len(samples) == min(pipeline.params["evaluate"]["samples"], val_images), \
            [i.name for i in images]
        for png in samples:
            assert re.search(rf'<img src="static/{re.escape(png.name)}"', html)
        # issue 23: the Boundary IoU bars, the reliability diagram and the worst-k gallery
        boundary_div = Renderer.remove_special_chars("plots/evaluate/boundary_iou.csv")
        reliability_div = Renderer.remove_special_chars("plots/evaluate/reliability.csv")
        for div in (boundary_div, reliability_div):
            assert f'vegaEmbed(\'#{div}\'' in html, div
        with (repo / "plots" / "evaluate" / "boundary_iou.csv").open(newline="") as f:
            bars = list(csv.DictReader(f))
        assert len(bars) == 19 and any(row["boundary_iou"] for row in bars)
        with (repo / "plots" / "evaluate" / "reliability.csv").open(newline="") as f:
            filled = sum(1 for row in csv.DictReader(f) if row["accuracy"])  # every row
        if rendered:
            assert rendered.charts[boundary_div]["rects"] == 19  # undefined: an empty bar
            assert max(rendered.charts[reliability_div]["line_points"]) == filled > 0
        worst = [i for i in images if "worst" in i.name]
        assert len(worst) == min(pipeline.params["evaluate"]["worst"], val_images), \
            [i.name for i in images]
        for png in worst:
            assert re.search(rf'<img src="static/{re.escape(png.name)}"', html)
    else:
        needed.append("evaluate")
    if needed:
        pytest.skip(f"stage(s) not in dvc.yaml yet: {', '.join(needed)}")


COARSE_STAGES = ("coarse_masks", "coarse_pretrain", "coarse_finetune")
COARSE_OUTPUTS = ("models_coarse", "models_finetune", "metrics/coarse/pretrain/metrics.json",
                  "metrics/coarse/pretrain/plots", "metrics/coarse/finetune/metrics.json",
                  "metrics/coarse/finetune/plots", "data/generated_coarse",
                  "metrics/coarse/masks.json")


def _make_coarse(repo: Path, target: str = "coarse") -> subprocess.Popen:
    """`make coarse` (or another recipe's target) in the copy, with this interpreter's venv
    (already installed: -o)."""
    venv = Path(sys.executable).parent.parent
    return subprocess.Popen(["make", "-o", f"{venv}/.installed", f"VENV={venv}", target],
                            cwd=repo, env=environment(repo), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _train_stage(parent: int, timeout: float = 60) -> psutil.Process:
    """The train stage's python process among `parent`'s descendants, once it has started."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in psutil.Process(parent).children(recursive=True):
            try:
                if {"stages/train.py", "--phase"} <= set(child.cmdline()):
                    return child
            except psutil.NoSuchProcess:
                continue
        time.sleep(0.01)
    raise AssertionError(f"no train stage under process {parent} within {timeout} s")


def _digests(repo: Path) -> dict[str, str]:
    return {f"{path}/{name}".rstrip("/"): digest for path in COARSE_OUTPUTS
            for name, digest in _file_digests(repo / path).items()}


def test_coarse_to_fine_runs_in_one_command_and_a_killed_run_resumes_bit_identical(
        pipeline: Pipeline, tmp_path: Path) -> None:
    """Issue 22: `make coarse` activates the coarse pipeline and reproduces it (the default
    pipeline's outputs are reused, not rerun); its pre-training, SIGKILLed after epoch 1 with
    make and DVC, resumes on the next `make coarse` and fine-tuning starts from its last.pt;
    every output then equals an uninterrupted rerun's, byte for byte; `dvc plots show` draws
    both phases' curves. The default pipeline's `dvc status` is untouched until then."""
    _skip_if_missing(pipeline.repo, *PIPELINE)
    repo = tmp_path / "project"
    shutil.copytree(pipeline.repo, repo, symlinks=True)
    assert not (repo / "pipelines").exists()
    set_param(repo, "coarse.pretrain_epochs", EPOCHS)
    set_param(repo, "coarse.finetune_epochs", EPOCHS)
    commit_all(repo, "coarse -> fine, tiny")

    process = _make_coarse(repo)
    lines, training = [], None
    assert process.stdout is not None
    for line in process.stdout:
        lines.append(line)
        if "Running stage 'pipelines/coarse/dvc.yaml:coarse_pretrain'" in line:
            training = _train_stage(process.pid)  # found before it logs, killed at once after
        if training is not None and f"epoch 1/{EPOCHS}" in line:
            training.kill()  # the training alone, as an out-of-memory kill would
            break
    killed = "".join(lines) + process.communicate(timeout=120)[0]
    assert process.returncode != 0 and "failed to reproduce" in killed, killed[-3000:]
    assert {n.split(":")[-1] for n in ran_stages(killed)} == {"coarse_masks", "coarse_pretrain"}
    assert not (repo / "models_coarse").exists()

    again = _make_coarse(repo)
    output, _ = again.communicate(timeout=600)
    assert again.returncode == 0, output[-3000:]
    ran = {name.split(":")[-1] for name in ran_stages(output)}
    assert ran == {"coarse_pretrain", "coarse_finetune"}, output[-3000:]  # masks were done
    assert f"after epoch 1 of {EPOCHS}" in output, output[-3000:]
    assert re.search(r"train\.init: \d+ tensors loaded from models_coarse/last\.pt; 0 left as "
                     r"built; 0 of the checkpoint's unused", output), output[-3000:]
    masks = json.loads((repo / "metrics/coarse/masks.json").read_text())
    assert masks["per_split"] == {"train": 6, "train_extra": 2, "val": 2}
    resumed = _digests(repo)

    for stage in COARSE_STAGES[1:]:  # uninterrupted, from scratch (DVC deletes the outputs)
        forced = dvc(repo, "repro", "--force", "--single-item",
                     f"pipelines/coarse/dvc.yaml:{stage}")
        assert {name.split(":")[-1] for name in ran_stages(forced.output)} == {stage}
    assert _digests(repo) == resumed

    shown = json.loads(dvc(repo, "plots", "show", "--json", "pipelines/coarse/dvc.yaml").stdout)
    curve = shown["data"]["Coarse -> fine, val mIoU"][0]["content"]["data"]["values"]
    steps = sorted((row["filename"].split("/")[0], row["step"]) for row in curve)
    assert steps == [(phase, str(step)) for phase in ("finetune", "pretrain")
                     for step in range(EPOCHS)], steps
    # the default pipeline is untouched by all this
    assert ran_stages(dvc(repo, "repro").output) == set()


def test_staged_fcn32s_16s_8s_runs_in_one_command_each_step_from_the_last(
        pipeline: Pipeline, tmp_path: Path) -> None:
    """Issue 24: `make staged` trains FCN-32s, then FCN-16s from its last.pt, then FCN-8s from
    FCN-16s's, each a cached stage of its own arch; every step loads exactly the coarser
    model's tensors but its last upsampling, and `dvc plots show` draws the three curves."""
    _skip_if_missing(pipeline.repo, *PIPELINE)
    repo = tmp_path / "project"
    shutil.copytree(pipeline.repo, repo, symlinks=True)
    set_param(repo, "staged.epochs", 1)
    commit_all(repo, "staged, tiny")

    run = _make_coarse(repo, "staged")
    output, _ = run.communicate(timeout=600)
    assert run.returncode == 0, output[-3000:]
    steps = ("fcn32s", "fcn16s", "fcn8s")
    assert {name.split(":")[-1] for name in ran_stages(output)} == {
        f"staged_{arch}" for arch in steps}, output[-3000:]  # the default stages were done
    for coarser, (new_score, new_up) in (("fcn32s", ("score_pool4", "up_pool5")),
                                         ("fcn16s", ("score_pool3", "up_pool4"))):
        assert re.search(rf"train\.init: \d+ tensors loaded from models_staged/{coarser}/"
                         rf"last\.pt; 4 left as built \({new_score}\.weight, {new_score}\.bias, "
                         rf"{new_up}\.weight, up_final\.weight\); 1 of the checkpoint's unused "
                         rf"\(up_final\.weight\)", output), output[-3000:]
    import torch

    for arch in steps:
        best = torch.load(repo / "models_staged" / arch / "best.pt", map_location="cpu",
                          weights_only=True)
        assert best["model_params"]["arch"] == arch
        assert json.loads((repo / "metrics/staged" / arch / "metrics.json").read_text())
    shown = json.loads(dvc(repo, "plots", "show", "--json", "pipelines/staged/dvc.yaml").stdout)
    curve = shown["data"]["Staged FCN-32s -> 16s -> 8s, val mIoU"][0]["content"]["data"]["values"]
    assert sorted(row["filename"].split("/")[0] for row in curve) == sorted(steps)
    again = _make_coarse(repo, "staged")  # cached: nothing reruns
    output, _ = again.communicate(timeout=300)
    assert again.returncode == 0 and ran_stages(output) == set(), output[-3000:]
