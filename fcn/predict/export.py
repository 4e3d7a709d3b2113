"""The export stage's work: server-ready label-id PNGs and zip, color overlays, a GIF, and
prediction of any folder of images.

The official server (and cityscapesScripts' evaluator) finds the prediction of an image by the
pattern `<city>_<seq>_<frame>*.png` anywhere in the upload, and fails on zero or several
matches; each file must be a single-channel uint8 PNG of label **ids** (not trainIds) at the
image's size. We name each prediction like its image (`layout.submission_name`), under
`<city>/`, and the zip holds exactly those files: one per image, nothing else. Overlays are
named `overlay_<stem>.png`, so even a search over the whole export folder finds one match.
"""

from __future__ import annotations

import logging
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from fcn.atomic import atomic_dir, atomic_path
from fcn.cityscapes.labels import TRAINID_TO_ID
from fcn.cityscapes.layout import list_images, stem_of, submission_name
from fcn.errors import DataError
from fcn.images import read_rgb, write_label_png, write_png
from fcn.params import ExportParams, ModelParams
from fcn.predict.predictor import Predictor, predict_stream
from fcn.predict.visualize import blend, colorize, resize_to_width, spread, write_gif
from fcn.threads import WriteBehind

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


@dataclass(frozen=True)
class ExportPaths:
    """The export folder's layout for one split."""

    root: Path
    split: str = "test"

    @property
    def predictions(self) -> Path:
        return self.root / self.split

    @property
    def zip(self) -> Path:
        return self.root / f"cityscapes_{self.split}_labelIds.zip"

    @property
    def overlays(self) -> Path:
        return self.root / "overlays"

    @property
    def gif(self) -> Path:
        return self.root / "val_predictions.gif"


def _load(path: Path) -> tuple[np.ndarray, None]:
    return read_rgb(path), None


def export_stage(checkpoint: str | Path, root: str | Path, model: ModelParams,
                 params: ExportParams, paths: ExportPaths) -> int:
    """The export stage: the split's server-ready predictions, zip and overlays, and the val
    GIF; returns the number of images exported."""
    predictor = Predictor.from_params(checkpoint, model, params)
    count = export_split(predictor, root, paths, params)
    export_gif(predictor, root, paths.gif, params)
    return count


def predict_folder_stage(checkpoint: str | Path, model: ModelParams | None,
                         params: ExportParams, images: str | Path, out: str | Path) -> int:
    """`stages/export.py --images` and `fcn-predict`: predict every image under `images` into
    `out` (model None: as the checkpoint describes itself)."""
    return predict_folder(Predictor.from_params(checkpoint, model, params), images, out, params)


def export_split(predictor: Predictor, data_root: str | Path, paths: ExportPaths,
                 params: ExportParams) -> int:
    """Label-id PNGs for every image of `paths.split`, the upload zip, and overlays of
    `params.overlays` of them. Folders are swapped in whole; returns the number of images."""
    images = list_images(data_root, paths.split)
    stems = [stem_of(p) for p in images]
    overlay_stems = {stems[i] for i in spread(len(stems), params.overlays)}
    with atomic_dir(paths.predictions) as predictions, atomic_dir(paths.overlays) as overlays:
        with WriteBehind(params.workers) as writer:
            stream = predict_stream(predictor, images, _load, params.batch_size, params.workers)
            for image_path, image, _, train_ids in tqdm(stream, total=len(images),
                                                         desc=f"export {paths.split}", unit="img"):
                stem = stem_of(image_path)
                writer.submit(write_label_png, predictions / submission_name(stem),
                              TRAINID_TO_ID[train_ids])
                if stem in overlay_stems:
                    writer.submit(write_png, overlays / f"overlay_{stem}.png",
                                  blend(image, colorize(train_ids), params.overlay_alpha))
        write_submission_zip(paths.zip, predictions, stems)
    log.info("wrote %d %s predictions to %s and %s", len(images), paths.split, paths.predictions,
             paths.zip)
    return len(images)


def write_submission_zip(path: Path, folder: Path, stems: Sequence[str]) -> None:
    """A zip of exactly one prediction per stem (`layout.submission_name`), refusing a
    folder that holds anything else (the server fails on several matches for one image)."""
    expected = {submission_name(stem) for stem in stems}
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    if present != expected:
        extra, missing = sorted(present - expected), sorted(expected - present)
        raise DataError(f"{folder}: predictions do not match the images one to one "
                        f"(unexpected: {extra[:3]}, missing: {missing[:3]})")
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive:
        for name in sorted(expected):
            archive.write(folder / name, arcname=name)


def export_gif(predictor: Predictor, data_root: str | Path, path: Path,
               params: ExportParams) -> int:
    """An animated GIF of `params.gif_frames` val images blended with their predicted colors."""
    if params.gif_frames == 0:
        return 0
    images = list_images(data_root, "val")
    chosen = [images[i] for i in spread(len(images), params.gif_frames)]
    frames = []
    for _, image, _, train_ids in predict_stream(predictor, chosen, _load, params.batch_size,
                                                 params.workers):
        overlay = blend(image, colorize(train_ids), params.overlay_alpha)
        frames.append(resize_to_width(overlay, params.gif_width))
    write_gif(path, frames, params.gif_ms_per_frame)
    log.info("wrote %d frames to %s", len(frames), path)
    return len(frames)


def folder_images(folder: Path) -> list[Path]:
    """Every .png/.jpg/.jpeg under `folder` (recursively, sorted)."""
    if not folder.is_dir():
        raise DataError(f"{folder}: image folder not found")
    images = sorted(p for p in folder.rglob("*")
                    if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not images:
        raise DataError(f"{folder}: no {'/'.join(IMAGE_EXTENSIONS)} images found")
    return images


def predict_folder(predictor: Predictor, folder: str | Path, out: str | Path,
                   params: ExportParams) -> int:
    """For each image under `folder`, `<out>/<relative path>/<name>_labelIds.png` (uint8 label
    ids) and `<name>_overlay.png`. Each file is written atomically."""
    folder, out = Path(folder).resolve(), Path(out).resolve()
    if out == folder or folder in out.parents:
        raise DataError(f"{out}: the output folder must not lie inside the image folder {folder} "
                        "(its files would be read as images next time)")
    images = folder_images(folder)
    with WriteBehind(params.workers) as writer:
        stream = predict_stream(predictor, images, _load, params.batch_size, params.workers)
        for image_path, image, _, train_ids in tqdm(stream, total=len(images), desc="predict",
                                                     unit="img"):
            target = out / image_path.relative_to(folder).parent / image_path.stem
            writer.submit(write_label_png, f"{target}_labelIds.png", TRAINID_TO_ID[train_ids])
            writer.submit(write_png, f"{target}_overlay.png",
                          blend(image, colorize(train_ids), params.overlay_alpha))
    log.info("wrote predictions of %d images under %s", len(images), out)
    return len(images)
