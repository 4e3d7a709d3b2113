"""Generate the masks of a whole dataset: find the annotations, render them in worker
processes, compare with shipped masks, and replace the output folder only once complete.

The output is each mask at `layout.mask_path(generated, …)`, the official
layout under another root, so the files shipped with the dataset are never touched: a
generated root that overlaps the dataset's shipped folders is refused before any work.

Every annotation's imgWidth x imgHeight is checked before it is rendered: against the pixel
limit (`max_pixels`, data.max_pixels), and against its image's size read from the image's
header, so a hostile or mismatched annotation stops the stage with one line naming both files
and both sizes, instead of allocating whatever the JSON claims.
"""

from __future__ import annotations

import logging
import multiprocessing
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from fcn.atomic import atomic_dir, write_json
from fcn.cityscapes import layout
from fcn.cityscapes.annotations import Annotation, read_annotation
from fcn.cityscapes.layout import ENCODINGS
from fcn.errors import DataError
from fcn.images import MAX_PIXELS, check_pixels, read_size
from fcn.masks.agreement import (ImageResult, difference, figure, read_shipped, summarize,
                                 worst_images, worst_report, write_table)
from fcn.masks.render import render, write_masks

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Item:
    """One annotation to render."""

    split: str
    stem: str
    polygons: Path
    image: Path
    annotation: str = layout.FINE
    """The annotation set (gtFine, gtCoarse): cityscapesScripts renders both with the same
    rules (`createTrainIdLabelImgs` globs `*_gt*_polygons.json`)."""


def find_annotations(root: str | Path, splits: Sequence[str],
                     annotation: str = layout.FINE) -> list[Item]:
    """Every polygon annotation of the set's splits, each checked to have its image."""
    root = Path(root)
    items = []
    for split in splits:
        layout.check_annotation(annotation, split)
        for stem, path in layout.list_annotations(root, split, annotation):
            image = layout.image_path(root, split, stem)
            if not image.is_file():
                raise DataError(f"{path}: no matching image {image}")
            items.append(Item(split, stem, path, image, annotation))
    return items


def check_output_root(root: str | Path, generated: str | Path) -> None:
    """Refuse a generated root that would write into, or replace, the dataset's files."""
    root, generated = Path(root).resolve(), Path(generated).resolve()
    shipped = (*(root / annotation for annotation in layout.ANNOTATION_SPLITS),
               root / "leftImg8bit")
    if generated == root or any(generated.is_relative_to(s) for s in shipped):
        raise DataError(f"data.generated ({generated}) lies in the dataset's shipped folders "
                        f"under data.root ({root}): generated masks must not overwrite or mix "
                        "with shipped ones; choose another folder")
    if root.is_relative_to(generated):
        raise DataError(f"data.root ({root}) lies inside data.generated ({generated}), which "
                        "the masks stage replaces; choose another folder")


def _foreign_files(generated: Path) -> Iterator[Path]:
    """Files under `generated` this stage would not have written."""
    for path in generated.rglob("*"):
        if path.is_dir() and not path.is_symlink():
            continue
        if not (path.is_file() and layout.is_mask_file(path.relative_to(generated))):
            yield path


def check_size(annotation: Annotation, item: Item, max_pixels: int) -> None:
    """Refuse an annotation larger than `max_pixels` (before rendering allocates its
    imgWidth x imgHeight) or whose size differs from its image's (read from the header)."""
    size = (annotation.width, annotation.height)
    check_pixels(item.polygons, "annotation", size, max_pixels)
    image_size = read_size(item.image, "image", max_pixels)
    if image_size != size:
        raise DataError(f"{item.polygons}: annotation is {size[0]}x{size[1]} but its image "
                        f"{item.image} is {image_size[0]}x{image_size[1]} (width x height)")


def _process(task: tuple[Item, Path, Path, tuple[str, ...], int]) -> ImageResult:
    """Worker: parse once, check the size, render once, write the requested encodings,
    compare shipped ones."""
    item, root, out, encodings, max_pixels = task
    annotation = read_annotation(item.polygons)
    check_size(annotation, item, max_pixels)
    shipped = {e: layout.mask_path(root, item.split, item.stem, e, item.annotation)
               for e in ENCODINGS}
    shipped = {e: p for e, p in shipped.items() if p.is_file()}
    needed = [e for e in ENCODINGS if e in encodings or e in shipped]
    masks = render(annotation, needed, source=str(item.polygons))
    write_masks(masks, {e: layout.mask_path(out, item.split, item.stem, e, item.annotation)
                        for e in encodings},
                atomic=False)  # `out` is atomic_dir's private folder, swapped in when complete
    differing = {e: int(difference(masks[e], read_shipped(p, e, max_pixels), p).sum())
                 for e, p in shipped.items()}
    return ImageResult(item.split, item.stem, len(annotation.objects),
                       annotation.width * annotation.height, differing)


def _chunksize(n: int, workers: int) -> int:
    """Chunks big enough to amortise inter-process traffic, small enough to balance load."""
    return max(1, min(16, n // (workers * 8)))


def render_all(items: Sequence[Item], root: str | Path, out: str | Path,
               encodings: Sequence[str], workers: int,
               max_pixels: int = MAX_PIXELS) -> list[ImageResult]:
    """Render and write every item under `out` (workers processes); results in item order."""
    root, out = Path(root), Path(out)
    tasks = [(item, root, out, tuple(encodings), max_pixels) for item in items]
    bar = tqdm(total=len(tasks), desc="masks", unit="img")
    results: dict[tuple[str, str], ImageResult] = {}
    try:
        if workers == 1:
            outcomes: Iterator[ImageResult] = map(_process, tasks)
            for result in outcomes:
                results[result.split, result.stem] = result
                bar.update()
        else:
            with multiprocessing.Pool(workers) as pool:
                for result in pool.imap_unordered(_process, tasks, _chunksize(len(tasks), workers)):
                    results[result.split, result.stem] = result
                    bar.update()
                pool.close()  # let workers exit on their own (the with block terminates them)
                pool.join()
    finally:
        bar.close()
    return [results[item.split, item.stem] for item in items]


def generate(root: str | Path, generated: str | Path, encodings: Sequence[str],
             splits: Sequence[str], workers: int,
             max_pixels: int = MAX_PIXELS, annotation: str = layout.FINE) -> list[ImageResult]:
    """Write the masks of every annotation of the set's `splits` under `generated`
    (`<generated>/<set>/…`), replacing it whole.

    The masks are written to a temporary folder beside `generated` and swapped in only once
    all are done (fcn.atomic.atomic_dir); on any error (an annotation above `max_pixels`
    pixels or of another size than its image, say) `generated` is left as it was.
    """
    root, generated = Path(root), Path(generated)
    check_output_root(root, generated)
    if generated.exists():
        foreign = next(_foreign_files(generated), None)
        if foreign is not None:
            raise DataError(f"{generated}: holds {foreign}, which the masks stage did not "
                            "write; refusing to replace the folder (choose another data.generated "
                            "or remove it)")
    items = find_annotations(root, splits, annotation)
    start = time.perf_counter()
    with atomic_dir(generated) as out:
        results = render_all(items, root, out, encodings, workers, max_pixels)
    seconds = time.perf_counter() - start
    log.info("rendered %d annotations (%s) into %s in %.1f s (%.1f images/s, %d workers)",
             len(items), ", ".join(encodings), generated, seconds, len(items) / seconds, workers)
    return results


def agreement_figure(path: str | Path, root: str | Path, results: Sequence[ImageResult],
                     count: int, max_pixels: int = MAX_PIXELS,
                     annotation: str = layout.FINE) -> bool:
    """Draw provided | generated | difference for the `count` least agreeing images.

    Returns False (and writes nothing) when no image has shipped masks or count is 0.
    """
    chosen = worst_images(results, count)
    if not chosen:
        return False
    root = Path(root)
    rows = []
    for r in chosen:
        polygons = layout.polygons_path(root, r.split, r.stem, annotation)
        shipped = {e: layout.mask_path(root, r.split, r.stem, e, annotation)
                   for e in r.differing}
        masks = render(read_annotation(polygons), list(shipped), source=str(polygons))
        provided = {e: read_shipped(p, e, max_pixels) for e, p in shipped.items()}
        display = next(e for e in ("color", "labelIds", "instanceIds", "labelTrainIds")
                       if e in shipped)
        rows.append((r.name, display, provided[display], masks[display],
                     {e: difference(masks[e], provided[e], shipped[e]) for e in shipped}))
    figure(path, rows)
    return True


def masks_stage(root: str | Path, generated: str | Path, encodings: Sequence[str],
                splits: Sequence[str], workers: int, worst: int, figure_images: int,
                metrics: str | Path, plots: str | Path,
                max_pixels: int = MAX_PIXELS, annotation: str = layout.FINE) -> dict[str, Any]:
    """The masks stage (gtFine) or the coarse pipeline's coarse_masks stage (gtCoarse):
    generate every mask of the annotation set's `splits`, then write the agreement report.

    Outputs: the masks under `generated`; `metrics` (counts and agreement per shipped encoding);
    under `plots`, agreement.csv (per image), worst.json (the `worst` least agreeing images)
    and agreement.png (`figure_images` of them; removed when there is nothing to compare, so
    no stale figure of another run stays). Returns the metrics.
    """
    results = generate(root, generated, encodings, splits, workers, max_pixels, annotation)
    report = summarize(results, encodings)
    plots = Path(plots)
    write_table(plots / "agreement.csv", results)
    write_json(plots / "worst.json", worst_report(results, worst))
    figure_path = plots / "agreement.png"
    if not agreement_figure(figure_path, root, results, figure_images, max_pixels, annotation):
        figure_path.unlink(missing_ok=True)
    write_json(metrics, report)
    if report["agreement"] is None:
        log.info("no shipped masks (*%s) next to the polygons under %s: nothing to compare with",
                 "|".join(layout.mask_suffix(e, annotation) for e in ENCODINGS), root)
    else:
        log.info("agreement with shipped masks: %s", ", ".join(
            f"{e} {a['overall']:.6f}" for e, a in report["agreement"].items()))
    return report
