"""How far our masks agree with the masks shipped with the dataset.

Real Cityscapes ships labelIds, instanceIds and color masks made by
cityscapesScripts with an old PIL, whose polygon fill differs from today's by a few pixels
per image; the report measures that, it does not test our rasterizer (tests do, against
cityscapesScripts on the same PIL). Agreement is the fraction of pixels whose value is equal
(all four channels for color). Where nothing is shipped (the synthetic dataset) the report
says so and gives no numbers.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fcn.atomic import atomic_path, write_text
from fcn.cityscapes.labels import ID_TO_COLOR, TRAINID_TO_COLOR
from fcn.cityscapes.layout import ENCODINGS
from fcn.errors import DataError
from fcn.images import MAX_PIXELS, read_labels, read_rgba

@dataclass(frozen=True)
class ImageResult:
    """What the masks stage learned about one annotation."""

    split: str
    stem: str
    objects: int
    pixels: int
    differing: dict[str, int] = field(default_factory=dict)
    """Per shipped encoding, the number of pixels where ours and the shipped mask differ."""

    @property
    def name(self) -> str:
        return f"{self.split}/{self.stem}"

    def agreement(self, encoding: str) -> float:
        return 1.0 - self.differing[encoding] / self.pixels

    def worst_agreement(self) -> float:
        return min((self.agreement(e) for e in self.differing), default=1.0)


def read_shipped(path: str | Path, encoding: str, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """A shipped mask as an array comparable with ours: color as RGBA, the rest one channel
    (refused above `max_pixels` before decoding)."""
    what = f"shipped {encoding}"
    return (read_rgba(path, what, max_pixels) if encoding == "color"
            else read_labels(path, what, max_pixels))


def difference(ours: np.ndarray, shipped: np.ndarray, path: str | Path) -> np.ndarray:
    """bool[H, W]: pixels where the two masks differ (in any channel); sizes must match."""
    if ours.shape[:2] != shipped.shape[:2]:
        raise DataError(f"{path}: size {shipped.shape[1]}x{shipped.shape[0]} differs from its "
                        f"annotation's {ours.shape[1]}x{ours.shape[0]}")
    unequal = ours != shipped
    return unequal.any(axis=2) if unequal.ndim == 3 else unequal


def summarize(results: Sequence[ImageResult], encodings: Sequence[str]) -> dict[str, Any]:
    """The metrics/masks.json content: counts and pixel agreement per shipped encoding."""
    per_split: dict[str, int] = {}
    for r in results:
        per_split[r.split] = per_split.get(r.split, 0) + 1
    report: dict[str, Any] = {
        "annotations": len(results),
        "objects": sum(r.objects for r in results),
        "per_split": per_split,
        "encodings_written": list(encodings),
        "files_written": len(results) * len(encodings),
        "shipped_masks": sum(len(r.differing) for r in results),
    }
    shipped_encodings = [e for e in ENCODINGS if any(e in r.differing for r in results)]
    agreement = {}
    for encoding in shipped_encodings:
        compared = [r for r in results if encoding in r.differing]
        pixels = sum(r.pixels for r in compared)
        differing = sum(r.differing[encoding] for r in compared)
        per_image = [r.agreement(encoding) for r in compared]
        agreement[encoding] = {
            "images": len(compared),
            "pixels": pixels,
            "differing_pixels": differing,
            "overall": 1.0 - differing / pixels,
            "mean_per_image": math.fsum(per_image) / len(per_image),
            "min_per_image": min(per_image),
            "images_identical": sum(r.differing[encoding] == 0 for r in compared),
        }
    report["agreement"] = agreement or None  # null: nothing shipped to compare with
    return report


def worst_report(results: Sequence[ImageResult], count: int) -> list[dict[str, Any]]:
    """The least agreeing images with their per-encoding agreement (plots/masks/worst.json).

    Kept out of the metrics file: image names would become dozens of columns in
    `dvc metrics show` / `dvc exp show`.
    """
    return [
        {"image": r.name,
         "agreement": {e: r.agreement(e) for e in ENCODINGS if e in r.differing},
         "differing_pixels": {e: r.differing[e] for e in ENCODINGS if e in r.differing}}
        for r in worst_images(results, count)
    ]


def worst_images(results: Sequence[ImageResult], count: int) -> list[ImageResult]:
    """The `count` images with shipped masks and the lowest agreement (any encoding) first."""
    compared = [r for r in results if r.differing]
    compared.sort(key=lambda r: (r.worst_agreement(), r.name))
    return compared[:count]


def write_table(path: str | Path, results: Sequence[ImageResult]) -> None:
    """Per-image agreement as CSV (a header only when nothing was shipped)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["image", "pixels", *(f"{e}_agreement" for e in ENCODINGS)])
    for r in results:
        if r.differing:
            writer.writerow([r.name, r.pixels, *(repr(r.agreement(e)) if e in r.differing else ""
                                                  for e in ENCODINGS)])
    write_text(path, buffer.getvalue())


# --- the figure -----------------------------------------------------------------------------

PANEL_WIDTH = (320, 640)
"""Panels are scaled to a width in this range: downscaled by an integer factor (differences
max-pooled, so none vanish) or upscaled by pixel repetition."""


def as_rgb(mask: np.ndarray, encoding: str) -> np.ndarray:
    """uint8[H, W, 3]: a mask of any encoding in the Cityscapes colors."""
    if encoding == "color":
        return mask[..., :3]
    if encoding == "labelTrainIds":
        return TRAINID_TO_COLOR[mask]
    ids = mask if encoding == "labelIds" else np.where(mask >= 1000, mask // 1000, mask)
    return ID_TO_COLOR[np.clip(ids, 0, 255)]


def _rescale(image: np.ndarray, down: int, up: int) -> np.ndarray:
    """Nearest-neighbour: keep every `down`-th pixel, repeat each `up` times."""
    image = image[::down, ::down]
    return image.repeat(up, axis=0).repeat(up, axis=1) if up > 1 else image


def _pool_any(mask: np.ndarray, factor: int) -> np.ndarray:
    """bool mask downscaled by `factor`: a block is set if any of its pixels is."""
    h, w = mask.shape
    padded = np.zeros((-(-h // factor) * factor, -(-w // factor) * factor), bool)
    padded[:h, :w] = mask
    return padded.reshape(padded.shape[0] // factor, factor, -1, factor).any(axis=(1, 3))


def figure(path: str | Path, rows: Sequence[tuple[str, str, np.ndarray, np.ndarray,
                                                   Mapping[str, np.ndarray]]]) -> None:
    """One row per image: provided | generated | difference.

    Each row is (image name, display encoding, provided mask, generated mask, {encoding:
    bool[H, W] differing pixels}); the difference panel marks every pixel where any shipped
    encoding differs, in white over the dimmed generated mask.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    height, width = rows[0][3].shape[:2]
    down = max(1, -(-width // PANEL_WIDTH[1]))
    up = max(1, PANEL_WIDTH[0] // width)
    ph, pw = -(-height // down) * up, -(-width // down) * up
    dpi = 100
    fig, axes = plt.subplots(len(rows), 3, squeeze=False, dpi=dpi,
                             figsize=(3 * (pw / dpi + 0.2), len(rows) * (ph / dpi + 0.6)))
    for row, (name, encoding, provided, generated, differing) in zip(axes, rows):
        union = np.zeros(generated.shape[:2], bool)
        for mask in differing.values():
            union |= mask
        diff = (as_rgb(generated, encoding)[::down, ::down] * 0.3).astype(np.uint8)
        diff[_pool_any(union, down)[: diff.shape[0], : diff.shape[1]]] = 255
        counts = ", ".join(f"{e} {int(m.sum())}" for e, m in differing.items())
        panels = ((f"{name}\nprovided ({encoding})", _rescale(as_rgb(provided, encoding), down, up)),
                  ("\ngenerated", _rescale(as_rgb(generated, encoding), down, up)),
                  (f"differing pixels (white)\n{counts}", _rescale(diff, 1, up)))
        for ax, (title, panel) in zip(row, panels):
            ax.imshow(panel, interpolation="nearest")
            ax.set_title(title, fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
