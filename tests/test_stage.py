"""run_stage: an input error is one line on stderr and exit code 1, wherever it was raised."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from fcn.stage import run_stage
from fcn.errors import DataError, ParamsError, one_line
from helpers.trainset import tiny_params, write_params


class _BadSecondFile(Dataset):
    def __len__(self) -> int:
        return 3

    def __getitem__(self, index: int) -> torch.Tensor:
        if index == 1:
            raise DataError("data/x_leftImg8bit.png: not a PNG file")
        return torch.zeros(1)


def _run(main, caplog) -> tuple[int, list[str]]:
    caplog.set_level(logging.INFO)
    with pytest.raises(SystemExit) as info:
        run_stage(main)
    return info.value.code, [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]


@pytest.mark.parametrize("workers", [0, 1])
def test_an_error_in_a_loader_worker_is_the_same_one_line_as_in_the_main_process(caplog,
                                                                                  workers):
    """Before: with workers, 'Caught DataError in DataLoader worker process 0' and the
    worker's traceback, 15 lines."""
    def main() -> None:
        for _ in DataLoader(_BadSecondFile(), batch_size=1, num_workers=workers):
            pass

    code, errors = _run(main, caplog)
    assert code == 1
    assert errors == ["data/x_leftImg8bit.png: not a PNG file"]


def test_one_line_keeps_messages_that_are_not_a_worker_s():
    listing = ParamsError("params.yaml: 2 problems\n  train.lr: ...\n  train.epochs: ...")
    assert one_line(listing) == str(listing)  # the params check's listing is kept whole
    assert one_line(DataError("a.png: truncated")) == "a.png: truncated"


# --- the stage scripts as DVC runs them: bad input is one line and exit code 1 -----------------

STAGES = Path(__file__).resolve().parents[1] / "stages"


@pytest.mark.parametrize("stage", ["class_weights", "decode", "train", "deploy"])
def test_stage_script_exits_1_with_one_error_line_naming_the_bad_file(stage, tiny_dataset, masks,
                                                                      tmp_path):
    """pipeline.md: bad input data stops a stage with one line naming the file (exit 1)."""
    generated = tmp_path / "generated"
    shutil.copytree(masks, generated)
    params = tiny_params(tiny_dataset, generated, tmp_path / "models")
    first_mask = sorted((generated / "gtFine" / "train").rglob("*_labelTrainIds.png"))[0]
    if stage == "class_weights":
        Image.fromarray(np.full((4, 4), 19, np.uint8)).save(first_mask)
        bad, args = first_mask, ["--out", str(tmp_path / "w.json")]
    elif stage == "decode":
        first_mask.unlink()
        bad, args = first_mask, []
        params["decode"].update(enabled=True, out=str(tmp_path / "decoded"))
    elif stage == "train":
        params["decode"].update(enabled=True, out=str(tmp_path / "decoded"))
        bad, args = tmp_path / "decoded" / "index.json", ["--no-live"]
    else:
        bad, args = tmp_path / "models" / "best.pt", ["--metrics", str(tmp_path / "d.json")]
    write_params(tmp_path / "params.yaml", params)
    done = subprocess.run([sys.executable, str(STAGES / f"{stage}.py"), "--params",
                           str(tmp_path / "params.yaml"), *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    errors = [line for line in done.stderr.splitlines() if " ERROR " in line]
    assert done.returncode == 1, done.stderr
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr
    assert f" ERROR {bad}" in errors[0]
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name != "resume")
    assert leftovers == ["generated", "params.yaml"], leftovers  # nothing written
    assert not [p for p in (tmp_path / "resume").rglob("*") if p.is_file()]  # no state left
