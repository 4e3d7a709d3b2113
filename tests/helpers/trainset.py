"""Helpers for the data/training tests: masks for a synthetic root, and tiny params files.

Masks are drawn here from the polygons (fcn.masks.render + the trainId table), exactly what the
masks stage writes, so these tests do not depend on that stage.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

from fcn.cityscapes.annotations import read_annotation
from fcn.cityscapes.layout import mask_path
from fcn.cityscapes.labels import ID_TO_TRAINID
from fcn.masks.render import draw_label_ids
from fcn.params import default_params_dict

from helpers.tiny import TINY, TWO_PROCESS_EPOCHS

TRAIN_STAGE = Path(__file__).resolve().parents[2] / "stages" / "train.py"


def train_command(run: Path) -> list[str]:
    """The train stage on `<run>/params.yaml`, logging DVCLive to `<run>/live`."""
    return [sys.executable, str(TRAIN_STAGE), "--params", str(run / "params.yaml"),
            "--live-dir", str(run / "live")]


def write_masks(root: Path, generated: Path) -> None:
    """`<generated>/gtFine/<split>/<city>/<stem>_gtFine_labelTrainIds.png` for every image."""
    for polygons in sorted((root / "gtFine").rglob("*_gtFine_polygons.json")):
        split = polygons.parts[-3]
        stem = polygons.name.removesuffix("_gtFine_polygons.json")
        out = mask_path(generated, split, stem, "labelTrainIds")
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(ID_TO_TRAINID[draw_label_ids(read_annotation(polygons))]).save(out)


def tiny_params(root: Path, generated: Path, out: Path, **train: Any) -> dict[str, Any]:
    """params.yaml content for a seconds-long CPU run on the tiny dataset (read from the PNGs);
    the run's state folders go to `<out's parent>/resume` (not the user's cache)."""
    params = default_params_dict()
    params["data"] = {**params["data"], "root": str(root), "generated": str(generated)}
    params["synthesize"] = dataclasses.asdict(TINY)
    params["decode"]["enabled"] = False  # no decode stage ran: the loader reads the PNGs
    params["train"].update(epochs=2, batch_size=2, crop=[64, 64], workers=0, nproc=1,
                           device="cpu", out=str(out), resume_dir=str(out.parent / "resume"))
    params["train"].update(train)
    return params


def two_process_params(root: Path, generated: Path, out: Path, **train: Any) -> dict[str, Any]:
    """params.yaml content of the two-process reference run (conftest's `two_process_run`) and
    of the runs compared with it: TWO_PROCESS_EPOCHS epochs on 2 ranks, accumulating 2 batches
    (DDP's no_sync on the first of each pair), sync_bn asked for on a CPU (plain BatchNorm per
    process, with a log line), no system monitor (its samples differ between any two runs)."""
    return tiny_params(root, generated, out, **{
        "epochs": TWO_PROCESS_EPOCHS, "nproc": 2, "accumulate": 2, "sync_bn": True,
        "monitor_system": False, **train})


def state_folder(resume_dir: Path) -> Path:
    """The one state folder (`<resume_dir>/<hash>/`) of a run in progress."""
    folders = [p for p in resume_dir.iterdir() if p.is_dir()] if resume_dir.exists() else []
    assert len(folders) == 1, f"expected one state folder in {resume_dir}, found {folders}"
    return folders[0]


def write_params(path: Path, params: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def mask_array(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)
