"""`fcn-predict`, the installed console command: a folder of images predicted from anywhere,
without params.yaml, by the export stage's code path and with its errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers.eval_data import eval_data
from fcn.checkpoint import load_model
from fcn.predict.predictor import Predictor

COMMAND = Path(sys.executable).parent / "fcn-predict"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return eval_data(tmp_path_factory)


@pytest.fixture()
def photos(tmp_path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, size in (("a.png", (40, 90)), ("b.png", (64, 128))):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / name)
    return folder


def predict(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    assert COMMAND.is_file(), f"{COMMAND}: not installed (pip install -e .)"
    return subprocess.run([str(COMMAND), *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_installed_command_predicts_a_folder_in_slide_mode(data, photos, tmp_path):
    elsewhere = tmp_path / "elsewhere"  # no params.yaml, no repository here
    elsewhere.mkdir()
    done = predict("--checkpoint", str(data.checkpoint), str(photos), "out", "--mode", "slide",
                   "--window", "32", "64", "--stride", "24", "48", "--scales", "1.0", "0.75",
                   "--flip", "--device", "cpu", "--workers", "1", cwd=elsewhere)
    assert done.returncode == 0, done.stderr
    out = elsewhere / "out"
    assert sorted(p.name for p in out.iterdir()) == ["a_labelIds.png", "b_labelIds.png",
                                                     "overlay_a.png", "overlay_b.png"]
    predictor = Predictor(load_model(data.checkpoint), mode="slide", window=(32, 64),
                          stride=(24, 48), scales=(1.0, 0.75), flip_tta=True)
    from fcn.cityscapes.labels import TRAINID_TO_ID

    for name in ("a", "b"):
        image = np.array(Image.open(photos / f"{name}.png"))
        expected = TRAINID_TO_ID[predictor(image[None])[0]]
        assert np.array_equal(np.asarray(Image.open(out / f"{name}_labelIds.png")), expected)


def test_bad_options_and_inputs_are_one_line_errors(data, photos, tmp_path):
    done = predict("--checkpoint", str(data.checkpoint), str(photos), str(tmp_path / "o"),
                   "--window", "8", "8", cwd=tmp_path)
    assert done.returncode == 1 and "export.window" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "o").exists()
    done = predict("--checkpoint", str(tmp_path / "none.pt"), str(photos), str(tmp_path / "o"),
                   cwd=tmp_path)
    assert done.returncode == 1 and "none.pt: checkpoint not found" in done.stderr
    assert "Traceback" not in done.stderr
