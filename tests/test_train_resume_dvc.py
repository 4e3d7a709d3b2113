"""A `dvc repro` killed while training resumes on the next `dvc repro`, through the real CLI.

DVC deletes the train stage's outputs before running it, so the resume state must live outside
them (`train.resume_dir`, here its default under XDG_CACHE_HOME, which conftest points at a
temporary folder). The resumed run must end bit-identical (on CPU) to an uninterrupted one,
which `dvc repro --force` provides in the same repository: it ignores the run-cache and, with
no state left, trains from scratch.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from dvc_repo import commit_all, copy_project, dvc, environment, make_tiny, ran_stages, set_param

from fcn import checkpoint as ckpt

pytestmark = pytest.mark.slow

EPOCHS = 3


def _weights(models: Path) -> dict[str, dict]:
    return {name: ckpt.load(models / name) for name in (ckpt.BEST, ckpt.LAST)}


def test_a_killed_dvc_repro_resumes_and_ends_bit_identical(tmp_path: Path) -> None:
    repo = copy_project(tmp_path / "project")
    make_tiny(repo)
    set_param(repo, "train.epochs", EPOCHS)
    set_param(repo, "train.monitor_system", False)
    commit_all(repo, "tiny pipeline")
    dvc(repo, "repro", "class_weights")  # the data train reads, so only train is killed

    process = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "train"], cwd=repo,
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
    assert process.returncode == -signal.SIGKILL, "".join(lines)[-3000:]
    assert not (repo / "models").exists()

    resumed = dvc(repo, "repro", "train")
    assert ran_stages(resumed.output) == {"train"}
    assert f"after epoch 1 of {EPOCHS}" in resumed.output, resumed.output[-3000:]
    after_kill = _weights(repo / "models")
    assert after_kill[ckpt.LAST]["epoch"] == EPOCHS

    whole = dvc(repo, "repro", "--force", "train")
    assert "starting fresh" in whole.output and "resuming" not in whole.output
    uninterrupted = _weights(repo / "models")
    for name in (ckpt.BEST, ckpt.LAST):
        a, b = after_kill[name], uninterrupted[name]
        assert a["epoch"] == b["epoch"]
        assert a["model"].keys() == b["model"].keys()
        for key in a["model"]:
            assert a["model"][key].equal(b["model"][key]), f"{name}: {key} differs"
    assert after_kill[ckpt.LAST]["scheduler"] == uninterrupted[ckpt.LAST]["scheduler"]
