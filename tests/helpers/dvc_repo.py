"""Helpers for tests that drive the real `dvc` command in a throw-away copy of this project.

Why a copy: `dvc repro` and `dvc exp run` write data, caches, locks and git commits; running
them in the developer's checkout would clobber it. The copy holds what a commit would hold
(tracked files plus untracked, non-ignored ones), is its own git repository with one commit,
and gets a params.yaml scaled down so the whole pipeline runs in well under a minute.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

PROJECT = Path(__file__).resolve().parents[2]

# The pipeline as the architecture defines it, in order; a test that needs a stage which has
# not landed in dvc.yaml yet skips naming it (never passes without it).
PIPELINE = ("synthesize", "masks", "class_weights", "decode", "train", "evaluate", "export", "deploy",
            "benchmark")

# Tiny values for keys that exist in params.yaml (keys that do not exist are left out, so the
# copy stays valid while sections grow). 64x128 images, 2-3 per city, 1 epoch, 1 benchmark iter.
TINY_PARAMS: dict[str, dict[str, Any]] = {
    "synthesize": {"height": 64, "width": 128, "train_cities": ["aachen", "bochum"],
                   "val_cities": ["frankfurt"], "test_cities": ["berlin"],
                   "train_per_city": 3, "val_per_city": 2, "test_per_city": 2,
                   "train_extra_cities": ["erlangen"], "train_extra_per_city": 2},
    "masks": {"workers": 1, "worst": 2, "figure_images": 1},
    "train": {"epochs": 1, "batch_size": 2, "crop": [64, 64], "workers": 0, "nproc": 1,
              "device": "cpu"},
    "evaluate": {"batch_size": 2, "samples": 2, "sample_width": 64, "device": "cpu", "workers": 1},
    "export": {"batch_size": 2, "overlays": 1, "gif_frames": 2, "gif_width": 64, "device": "cpu",
               "workers": 1},
    "benchmark": {"profile": "quick", "device": "cpu", "height": 64, "width": 128,
                  "precisions": ["fp32"], "channels_last": [False], "threads": 1,
                  "quick_batch_sizes": [1], "quick_warmup": 1, "quick_iters": 1,
                  "quick_compile": [False], "window": [32, 64], "stride": [24, 48],
                  "matmul_size": 256},
    # int8 on (quantised, checked, written, reproducible) but without floors: the tiny model,
    # one epoch on six crops, has margins int8 noise flips (71% agreement when measured; the
    # default pipeline's model passes the default floors)
    "deploy": {"height": 64, "width": 128, "warmup": 0, "iters": 1, "threads": 1,
               "int8_min_agreement": 0.0, "int8_max_miou_drop": 1.0},
}


@dataclass
class Result:
    """One finished command: its exit status and what it printed."""

    args: list[str]
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def check(self) -> Result:
        """Fail the test with the full output when the command failed."""
        if self.returncode != 0:
            raise AssertionError(f"{' '.join(self.args)} exited {self.returncode}:\n{self.output[-6000:]}")
        return self


def environment(repo: Path) -> dict[str, str]:
    """The environment stages run in: this interpreter's venv first, the copy's fcn importable."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    # The copy's own fcn/ wins over an editable install of the developer's checkout.
    env["PYTHONPATH"] = os.pathsep.join([str(repo), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["DVC_NO_ANALYTICS"] = "1"
    env["PYTHONHASHSEED"] = "0"
    for var in ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE"):  # when pytest runs under a git hook
        env.pop(var, None)
    return env


def run(repo: Path, *args: str, timeout: float = 600) -> Result:
    """Run a command in the copy (`dvc ...` goes through this interpreter's dvc)."""
    argv = [sys.executable, "-m", "dvc", *args[1:]] if args[0] == "dvc" else list(args)
    proc = subprocess.run(argv, cwd=repo, env=environment(repo), capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)
    return Result(list(args), proc.returncode, proc.stdout, proc.stderr)


def dvc(repo: Path, *args: str, timeout: float = 600) -> Result:
    """Run `dvc <args>` in the copy and require success."""
    return run(repo, "dvc", *args, timeout=timeout).check()


def _git_files(project: Path, *options: str) -> set[str]:
    listed = subprocess.run(["git", "ls-files", "-z", *options], cwd=project, check=True,
                            capture_output=True).stdout.decode().split("\0")
    return {f for f in listed if f and (project / f).is_file()}


def outputs_by_stage(project: Path) -> dict[str, list[str]]:
    """Stage name -> the paths it writes (outs, metrics, plots), with ${section.key} filled in."""
    params = yaml.safe_load((project / "params.yaml").read_text(encoding="utf-8")) or {}

    def fill(match: re.Match[str]) -> str:
        value: Any = params
        for part in match.group(1).split("."):
            value = value[part]
        return str(value)

    written: dict[str, list[str]] = {}
    for name, stage in (yaml.safe_load((project / "dvc.yaml").read_text(encoding="utf-8"))
                        .get("stages") or {}).items():
        paths = written.setdefault(name, [])
        for kind in ("outs", "metrics", "plots"):
            for entry in stage.get(kind) or []:
                path = entry if isinstance(entry, str) else next(iter(entry))
                paths.append(re.sub(r"\$\{([^}]+)\}", fill, path).rstrip("/"))
    return written


def stage_outputs(project: Path) -> list[str]:
    """Paths dvc.yaml's stages write (outs, metrics, plots), with ${section.key} filled in."""
    return [path for paths in outputs_by_stage(project).values() for path in paths]


def project_files(project: Path = PROJECT) -> list[str]:
    """What a commit of the project would hold: tracked files, plus untracked non-ignored ones
    that are not stage outputs (a developer's not-yet-ignored results are no source)."""
    outputs = stage_outputs(project)
    untracked = {f for f in _git_files(project, "--others", "--exclude-standard")
                 if not any(f == o or f.startswith(o + "/") for o in outputs)}
    return sorted(_git_files(project, "--cached") | untracked)


def copy_project(dest: Path, project: Path = PROJECT) -> Path:
    """Copy the project's files into dest and make it a git repo with one commit."""
    dest.mkdir(parents=True, exist_ok=True)
    for rel in project_files(project):
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(project / rel, target)
    git(dest, "init", "-q", "-b", "main")
    git(dest, "config", "user.name", "pipeline test")
    git(dest, "config", "user.email", "pipeline-test@localhost")
    git(dest, "config", "commit.gpgsign", "false")
    return dest


def git(repo: Path, *args: str) -> str:
    """Run git in the copy; its output."""
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True,
                          env=environment(repo)).stdout


def commit_all(repo: Path, message: str) -> None:
    """Commit everything git does not ignore (the copy is ours, unlike the developer's tree)."""
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "--allow-empty", "-m", message)


def read_params(repo: Path) -> dict[str, Any]:
    return yaml.safe_load((repo / "params.yaml").read_text(encoding="utf-8"))


def write_params(repo: Path, params: dict[str, Any]) -> None:
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")


def make_tiny(repo: Path) -> dict[str, Any]:
    """Scale params.yaml down in place (only keys it already has); the resulting params."""
    params = read_params(repo)
    for section, values in TINY_PARAMS.items():
        if isinstance(params.get(section), dict):
            for key, value in values.items():
                if key in params[section]:
                    params[section][key] = value
    write_params(repo, params)
    return params


def set_param(repo: Path, dotted: str, value: Any) -> Any:
    """Set section.key in params.yaml; the old value."""
    params = read_params(repo)
    section, key = dotted.split(".", 1)
    old = params[section][key]
    params[section][key] = value
    write_params(repo, params)
    return old


def stages(repo: Path) -> dict[str, Any]:
    """The stages declared in the copy's dvc.yaml (name -> definition)."""
    return yaml.safe_load((repo / "dvc.yaml").read_text(encoding="utf-8")).get("stages", {})


def ran_stages(output: str) -> set[str]:
    """Stages `dvc repro`/`dvc exp run` executed (not those skipped or restored from cache)."""
    return {line.split("'")[1] for line in output.splitlines()
            if line.startswith("Running stage '")}


def missing(repo: Path, needed: Sequence[str]) -> list[str]:
    """The needed stages not (yet) declared in dvc.yaml."""
    declared = stages(repo)
    return [name for name in needed if name not in declared]
