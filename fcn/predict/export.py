"""The export stage's work: server-ready label-id PNGs and zip, color overlays, a GIF, a video
of a sequence, and prediction of any folder of images or video.

The official server (and cityscapesScripts' evaluator) finds the prediction of an image by the
pattern `<city>_<seq>_<frame>*.png` anywhere in the upload, and fails on zero or several
matches; each file must be a single-channel uint8 PNG of label **ids** (not trainIds) at the
image's size. We name each prediction like its image (`layout.submission_name`), under
`<city>/`, and the zip holds exactly those files: one per image, nothing else. Overlays are
named `overlay_<stem>.png`, so even a search over the whole export folder finds one match.

Check before work, and atomic output: every input image's header is read first (it opens, and
its size is within `max_pixels`), the GIF's val images' too, so a bad file anywhere fails the
run before anything is written (and, predicting a folder, before the model is loaded). The GIF's
frames are made before any output is touched; the output folders, the zip and the GIF are
built beside their final places and put in place together at the end (folders swapped whole,
fcn.atomic), so a failure found only while decoding (a file truncated after a valid header)
leaves the previous export, or none, never part of a new one.

A video (`render_video`: export.sequence, or `fcn-predict INPUT OUT.mp4`) streams its frames
through the predictor in batches (`fcn.video` reads them lazily and writes the MP4), so memory
does not grow with its length; its frames are the overlays' blend, optionally beside the input.

The zip is byte-reproducible: its entries are sorted and carry a fixed date (1980-01-01, zip's
earliest) and mode, not the files' modification times.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from fcn.analysis.calibration import (confidence_entropy, heat_colors, write_confidence_png,
                                      write_entropy_png)
from fcn.atomic import atomic_dir, atomic_path
from fcn.cityscapes.labels import TRAINID_TO_ID
from fcn.cityscapes.layout import city_of, list_images, stem_of, submission_name
from fcn.errors import DataError
from fcn.images import (IMAGE_SUFFIXES, MAX_PIXELS, read_rgb, read_size, write_label_png,
                        write_png)
from fcn.params import ExportParams, ModelParams
from fcn.predict.predictor import Predictor, predict_stream
from fcn.predict.visualize import (blend, colorize, resize_to_width, side_by_side, spread,
                                   write_gif)
from fcn.threads import WriteBehind
from fcn.video import FrameSource, Mp4Writer, open_frames

log = logging.getLogger(__name__)

LABELS_SUFFIX, OVERLAY_PREFIX = "_labelIds.png", "overlay_"
CONFIDENCE_PREFIX, ENTROPY_PREFIX = "confidence_", "entropy_"
"""What `predict_folder` writes per image: `<name>_labelIds.png` and `overlay_<name>.png`, and
with confidence maps `confidence_<name>.png`, `entropy_<name>.png`,
`overlay_confidence_<name>.png` and `overlay_entropy_<name>.png`. Every name but the labels' starts with a prefix so that a
search for `<city>_<seq>_<frame>*.png` (the official evaluator's, and `evaluate
--predictions`'s) finds one file per image in the folder."""


def confidence_maps(predictor: Predictor, scores: torch.Tensor
                    ) -> tuple[np.ndarray, np.ndarray]:
    """One image's scores (C, H, W) → its max probability and entropy (nats), float32 (H, W),
    at the predictor's temperature (written by `fcn.analysis.calibration`'s
    `write_confidence_png` / `write_entropy_png`, whose docstrings say how to read them)."""
    _, confidence, entropy = confidence_entropy(predictor.probabilities(scores[None]))
    return confidence[0].numpy(), entropy[0].numpy()


def _ours(name: str) -> bool:
    return name.endswith(LABELS_SUFFIX) or (
        name.startswith((OVERLAY_PREFIX, CONFIDENCE_PREFIX, ENTROPY_PREFIX))
        and name.endswith(".png"))


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

    @property
    def confidence(self) -> Path:
        """`<city>/confidence_<stem>.png` and `entropy_<stem>.png` per image (empty unless
        export.confidence_maps)."""
        return self.root / f"{self.split}_confidence"

    @property
    def video(self) -> Path:
        """`VIDEO_NAME`, the video of export.sequence (empty unless it is set)."""
        return self.root / "video"


VIDEO_NAME = "sequence.mp4"
VIDEO_GAP = 4
"""White pixels between the input and its overlay in a side-by-side video frame."""


def _load(path: Path, max_pixels: int = MAX_PIXELS) -> tuple[np.ndarray, None]:
    return read_rgb(path, "image", max_pixels), None


def check_images(images: Sequence[Path], max_pixels: int) -> None:
    """Every image's header: it opens as an image and is at most `max_pixels` pixels (a
    DataError naming the first that is not). Reads headers only, decodes nothing."""
    for image in images:
        read_size(image, "image", max_pixels)


def export_stage(checkpoint: str | Path, root: str | Path, model: ModelParams,
                 params: ExportParams, paths: ExportPaths, max_pixels: int = MAX_PIXELS) -> int:
    """The export stage: the split's server-ready predictions, zip and overlays, the val GIF,
    and the video of export.sequence (`paths.video`, empty without one), all or none of them
    replaced; returns the number of images exported. Images and frames above `max_pixels` are
    refused, before the model is loaded."""
    check_images(list_images(root, paths.split), max_pixels)
    chosen = gif_images(root, params.gif_frames)
    check_images(chosen, max_pixels)
    sequence = sequence_source(root, params.sequence, max_pixels) if params.sequence else None
    predictor = Predictor.from_params(checkpoint, model, params, params.temperature)
    frames = gif_frames(predictor, chosen, params, max_pixels)  # before any output is touched
    # the GIF is put in place after the split's folders and zip, the video folder last
    with (atomic_dir(paths.video) as video,
          atomic_path(paths.gif) if frames else contextlib.nullcontext() as gif):
        if sequence is not None:
            render_video(predictor, sequence, video / VIDEO_NAME, params,
                         sequence.fps or params.video_fps)
        if gif is not None:
            write_gif(gif, frames, params.gif_ms_per_frame)
        count = export_split(predictor, root, paths, params, max_pixels)
    if frames:
        log.info("wrote %d frames to %s", len(frames), paths.gif)
    if sequence is not None:
        log.info("wrote the video of %s to %s", sequence.path, paths.video / VIDEO_NAME)
    return count


def sequence_source(data_root: str | Path, sequence: str, max_pixels: int = MAX_PIXELS
                    ) -> FrameSource:
    """export.sequence's frames: a folder of frames or a video file at `sequence` under
    `data_root` (params refuse an absolute path or `..`; a symbolic link inside the dataset,
    to a sequence folder on another disk say, is followed), checked by `open_frames`."""
    root = Path(data_root)
    path = root / sequence
    if not path.exists():
        raise DataError(f"{path}: export.sequence {sequence!r} not found under data.root {root}")
    return open_frames(path, max_pixels)


def video_frame(image: np.ndarray, train_ids: np.ndarray, alpha: float,
                beside: bool = False) -> np.ndarray:
    """One frame of a prediction video: the image blended with its predicted colors (as the
    overlays), with `beside` the input on its left, `VIDEO_GAP` white pixels between."""
    overlay = blend(image, colorize(train_ids), alpha)
    return side_by_side([image, overlay], VIDEO_GAP) if beside else overlay


def render_video(predictor: Predictor, source: FrameSource, out: str | Path,
                 params: ExportParams, fps: float) -> int:
    """Write the MP4 `out` (`fcn.video.Mp4Writer`: atomic, H.264 at `params.video_crf`) of
    `video_frame` for every frame of `source`, at `fps`, `params.video_side_by_side`; returns
    the number of frames. Frames stream through `predict_stream` in batches of
    `params.batch_size`, read `params.workers` ahead: memory stays flat whatever the length."""
    beside = params.video_side_by_side
    width = 2 * source.width + VIDEO_GAP if beside else source.width
    with Mp4Writer(out, width, source.height, fps, params.video_crf) as writer, \
            contextlib.closing(source.keys()) as keys:  # a video closes on any error too
        stream = predict_stream(predictor, keys, lambda key: (source.load(key), None),
                                params.batch_size, params.workers)
        for _, image, _, train_ids, _ in tqdm(stream, total=source.count, desc="video",
                                              unit="frame"):
            writer.write(video_frame(image, train_ids, params.overlay_alpha, beside))
        if writer.frames == 0:
            raise DataError(f"{source.path}: no frame could be decoded")
    return writer.frames


def predict_video_stage(checkpoint: str | Path, model: ModelParams | None,
                        params: ExportParams, source: str | Path, out: str | Path,
                        max_pixels: int = MAX_PIXELS, fps: float | None = None) -> int:
    """`fcn-predict INPUT OUT.mp4`: the prediction video of a video file or folder of frames
    (`render_video`), at `fps` (None: a video's own rate, `params.video_fps` for frames).
    Every check (`open_frames`, the output path) comes before the model is loaded."""
    out = Path(out)
    if out.suffix.lower() != ".mp4":
        raise DataError(f"{out}: a video is written as MP4; give a path ending in .mp4")
    if out.is_dir():
        raise DataError(f"{out}: is a folder; give the path of the .mp4 file to write")
    frames = open_frames(source, max_pixels)
    predictor = Predictor.from_params(checkpoint, model, params, params.temperature)
    return render_video(predictor, frames, out, params, fps or frames.fps or params.video_fps)


def predict_folder_stage(checkpoint: str | Path, model: ModelParams | None,
                         params: ExportParams, images: str | Path, out: str | Path,
                         max_pixels: int = MAX_PIXELS) -> int:
    """`stages/export.py --images` and `fcn-predict`: predict every image under `images` into
    `out` (model None: as the checkpoint describes itself). Every input is checked
    (`check_folder`) before the model is even loaded."""
    folder, out, found = check_folder(images, out, max_pixels, params.confidence_maps)
    predictor = Predictor.from_params(checkpoint, model, params, params.temperature)
    return _predict_folder(predictor, folder, found, out, params, max_pixels)


def export_split(predictor: Predictor, data_root: str | Path, paths: ExportPaths,
                 params: ExportParams, max_pixels: int = MAX_PIXELS) -> int:
    """Label-id PNGs for every image of `paths.split`, the upload zip, and overlays of
    `params.overlays` of them. Every image's header is checked first; folders are swapped in
    whole; returns the number of images."""
    images = list_images(data_root, paths.split)
    check_images(images, max_pixels)
    stems = [stem_of(p) for p in images]
    overlay_stems = {stems[i] for i in spread(len(stems), params.overlays)}
    load = functools.partial(_load, max_pixels=max_pixels)
    with (atomic_dir(paths.predictions) as predictions, atomic_dir(paths.overlays) as overlays,
          atomic_dir(paths.confidence) as confidence_folder):
        with WriteBehind(params.workers) as writer:
            stream = predict_stream(predictor, images, load, params.batch_size, params.workers,
                                    keep_scores=params.confidence_maps)
            for image_path, image, _, train_ids, scores in tqdm(
                    stream, total=len(images), desc=f"export {paths.split}", unit="img"):
                stem = stem_of(image_path)
                writer.submit(write_label_png, predictions / submission_name(stem),
                              TRAINID_TO_ID[train_ids])
                if stem in overlay_stems:
                    writer.submit(write_png, overlays / f"{OVERLAY_PREFIX}{stem}.png",
                                  blend(image, colorize(train_ids), params.overlay_alpha))
                if scores is None:
                    continue
                confidence, entropy = confidence_maps(predictor, scores)
                city = confidence_folder / city_of(stem)
                writer.submit(write_confidence_png, city / f"{CONFIDENCE_PREFIX}{stem}.png",
                              confidence, params.confidence_bits)
                writer.submit(write_entropy_png, city / f"{ENTROPY_PREFIX}{stem}.png", entropy,
                              len(scores), params.confidence_bits)
                if stem in overlay_stems:
                    for prefix, values in ((CONFIDENCE_PREFIX, confidence),
                                           (ENTROPY_PREFIX, entropy / math.log(len(scores)))):
                        writer.submit(write_png, overlays / f"{OVERLAY_PREFIX}{prefix}{stem}.png",
                                      blend(image, heat_colors(values), params.overlay_alpha))
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
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w") as archive:
        for name in sorted(expected):
            entry = zipfile.ZipInfo(name, date_time=ZIP_DATE)
            entry.external_attr = 0o100644 << 16  # a regular file, rw-r--r--
            entry.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(entry, (folder / name).read_bytes())


ZIP_DATE = (1980, 1, 1, 0, 0, 0)
"""Every zip entry's date: zip's earliest, so the zip depends on the predictions alone."""


def gif_images(data_root: str | Path, frames: int) -> list[Path]:
    """The `frames` val images the GIF shows, spread over the split (none for 0)."""
    if frames == 0:
        return []
    images = list_images(data_root, "val")
    return [images[i] for i in spread(len(images), frames)]


def gif_frames(predictor: Predictor, images: Sequence[Path], params: ExportParams,
               max_pixels: int = MAX_PIXELS) -> list[np.ndarray]:
    """The GIF's frames: each image blended with its predicted colors, `params.gif_width`
    wide."""
    load = functools.partial(_load, max_pixels=max_pixels)
    frames = []
    for _, image, _, train_ids, _ in predict_stream(predictor, images, load, params.batch_size,
                                                 params.workers):
        overlay = blend(image, colorize(train_ids), params.overlay_alpha)
        frames.append(resize_to_width(overlay, params.gif_width))
    return frames


def folder_images(folder: Path) -> list[Path]:
    """Every .png/.jpg/.jpeg under `folder` (recursively, sorted)."""
    if not folder.is_dir():
        raise DataError(f"{folder}: image folder not found")
    images = sorted(p for p in folder.rglob("*")
                    if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise DataError(f"{folder}: no {'/'.join(IMAGE_SUFFIXES)} images found")
    return images


def _target(folder: Path, image: Path) -> Path:
    """`<relative folder>/<name>`: `image`'s outputs are named after it (LABELS_SUFFIX,
    OVERLAY_PREFIX)."""
    return image.relative_to(folder).parent / image.stem


def output_names(target: Path, confidence: bool) -> list[Path]:
    """Every file predicting a folder writes for the image at `target` (`_target`)."""
    names = [target.parent / f"{target.name}{LABELS_SUFFIX}",
             target.parent / f"{OVERLAY_PREFIX}{target.name}.png"]
    if confidence:
        names += [target.parent / f"{prefix}{target.name}.png" for prefix in
                  (CONFIDENCE_PREFIX, ENTROPY_PREFIX, OVERLAY_PREFIX + CONFIDENCE_PREFIX,
                   OVERLAY_PREFIX + ENTROPY_PREFIX)]
    return names


def _foreign_files(out: Path) -> Iterator[Path]:
    """What under `out` predict_folder would not have written (replacing `out` loses it)."""
    for path in out.rglob("*"):
        if path.is_dir() and not path.is_symlink():
            continue
        if not (path.is_file() and not path.is_symlink() and _ours(path.name)):
            yield path


def check_folder(folder: str | Path, out: str | Path, max_pixels: int = MAX_PIXELS,
                 confidence: bool = False) -> tuple[Path, Path, list[Path]]:
    """Every check of a folder prediction, made before any work: the folders do not nest, `out`
    holds nothing but an earlier run's predictions (it is replaced whole), no two images
    share an output name (`a.png` and `a.jpg`), and every image opens and is at most
    `max_pixels` pixels. Returns the resolved folder, output folder and the images."""
    folder, out = Path(folder).resolve(), Path(out).resolve()
    if out == folder or folder in out.parents:
        raise DataError(f"{out}: the output folder must not lie inside the image folder {folder} "
                        "(its files would be read as images next time)")
    if out in folder.parents:
        raise DataError(f"{folder}: the image folder must not lie inside the output folder "
                        f"{out}, which is replaced whole")
    images = folder_images(folder)
    if out.exists():
        if not out.is_dir():
            raise DataError(f"{out}: the output path exists and is not a folder")
        foreign = next(_foreign_files(out), None)
        if foreign is not None:
            raise DataError(f"{out}: holds {foreign}, which predicting a folder does not write; "
                            "refusing to replace the folder (choose another output folder or "
                            "remove it)")
    seen: dict[Path, Path] = {}
    for image in images:
        for name in output_names(_target(folder, image), confidence):
            other = seen.setdefault(name, image)
            if other != image:
                raise DataError(f"{image}: its predictions would overwrite those of {other} "
                                f"(both write {name}); rename one")
    check_images(images, max_pixels)
    return folder, out, images


def predict_folder(predictor: Predictor, folder: str | Path, out: str | Path,
                   params: ExportParams, max_pixels: int = MAX_PIXELS) -> int:
    """For each image under `folder`, `<out>/<relative path>/<name>_labelIds.png` (uint8 label
    ids) and `overlay_<name>.png`: a folder `evaluate --predictions` (and the official
    evaluator) can score, one match per image.

    All or nothing: every input is checked first (`check_folder`), and the predictions are
    written to a new folder beside `out` that replaces it only once complete, so any failure
    leaves the previous `out` (or none). `out` then holds exactly this folder's predictions.
    """
    folder, out, images = check_folder(folder, out, max_pixels, params.confidence_maps)
    return _predict_folder(predictor, folder, images, out, params, max_pixels)


def _predict_folder(predictor: Predictor, folder: Path, images: Sequence[Path], out: Path,
                    params: ExportParams, max_pixels: int) -> int:
    """predict_folder's work, on inputs `check_folder` accepted."""
    load = functools.partial(_load, max_pixels=max_pixels)
    with atomic_dir(out) as tmp:
        with WriteBehind(params.workers) as writer:
            stream = predict_stream(predictor, images, load, params.batch_size, params.workers,
                                    keep_scores=params.confidence_maps)
            for image_path, image, _, train_ids, scores in tqdm(stream, total=len(images),
                                                                desc="predict", unit="img"):
                target = tmp / _target(folder, image_path)
                writer.submit(write_label_png, f"{target}{LABELS_SUFFIX}",
                              TRAINID_TO_ID[train_ids])
                writer.submit(write_png, target.parent / f"{OVERLAY_PREFIX}{target.name}.png",
                              blend(image, colorize(train_ids), params.overlay_alpha))
                if scores is None:
                    continue
                confidence, entropy = confidence_maps(predictor, scores)
                writer.submit(write_confidence_png, target.parent /
                              f"{CONFIDENCE_PREFIX}{target.name}.png", confidence,
                              params.confidence_bits)
                writer.submit(write_entropy_png, target.parent /
                              f"{ENTROPY_PREFIX}{target.name}.png", entropy, len(scores),
                              params.confidence_bits)
                for prefix, values in ((CONFIDENCE_PREFIX, confidence),
                                       (ENTROPY_PREFIX, entropy / math.log(len(scores)))):
                    writer.submit(write_png, target.parent / f"{OVERLAY_PREFIX}{prefix}"
                                  f"{target.name}.png", blend(image, heat_colors(values),
                                                              params.overlay_alpha))
    log.info("wrote predictions of %d images under %s", len(images), out)
    return len(images)
