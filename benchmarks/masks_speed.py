"""Masks stage speed vs cityscapesScripts on the same files, with identical pixels, and where
the speed-up comes from: rendering and PNG encoding timed apart, and the size of the files.

    .venv/bin/python benchmarks/masks_speed.py [--images 24] [--objects 150] [--rounds 3]
        [--height 1024] [--width 2048] [--workers 2] [--smoke]

Writes `--images` annotations of 1024x2048 street scenes (fcn.synthetic.make_scene plus
extra objects up to `--objects` polygons, 8–60 vertices each, like real gtFine files) and a
black image of the same size for each (the stage checks every annotation's size against its
image's header) to a temporary dataset, finds them as the masks stage does
(`fcn.masks.generate.find_annotations`), then times, on those same files:

- cityscapesScripts: per file one `Annotation.fromJsonFile` (parsed once, which favours it:
  its own `json2labelImg`/`json2instanceImg` parse once per encoding), `createLabelImage` for
  ids, trainIds and color and `createInstanceImage` for ids, each saved as PNG with PIL's
  defaults; the 32-bit instance image, which Pillow 13 cannot save as PNG, converted to a
  16-bit array and saved as that (what a user of the script has to do);
- ours: `fcn.masks.generate.render_all`, the masks stage's loop (parse, size check, one
  rasterization, lookups, PNG encoding, writes), with 1 and with `--workers` processes.

The end-to-end speed-up is two different trades, so each share is timed alone, in this
process, on the same annotations:

- rendering (parse + draw the four encodings, no PNG): cityscapesScripts' functions above
  against `fcn.masks.render.render` (one drawing, table lookups) — the same pixels;
- PNG encoding of the four masks: PIL's encoder with its defaults (every filter tried per row,
  zlib level 6) against `fcn.png.encode_png` (one fixed filter, ISA-L level 1) — faster, for
  larger files: the file-size ratio is printed beside it.

Each is run `--rounds` times, interleaved; the best round counts (the least disturbed by
other load on the machine). Afterwards every PNG of both is read back with PIL and compared
array for array; any difference fails the benchmark. `--smoke` is a seconds-long run at a
tiny size (2 annotations of 64x128, 20 polygons, 1 round) that CI runs so the script cannot
rot.
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from fcn.cityscapes import layout
from fcn.cityscapes.annotations import Annotation, PolygonObject, read_annotation
from fcn.cityscapes.layout import ENCODINGS, mask_path
from fcn.masks.generate import Item, find_annotations, render_all
from fcn.masks.render import render
from fcn.png import encode_png
from fcn.synthetic import make_scene

if not hasattr(np, "in1d"):  # cityscapesscripts 2.3.0 calls np.in1d, removed in numpy 2.4
    np.in1d = np.isin  # type: ignore[attr-defined]

from cityscapesscripts.helpers.annotation import Annotation as CsAnnotation  # noqa: E402
from cityscapesscripts.preparation.json2instanceImg import createInstanceImage  # noqa: E402
from cityscapesscripts.preparation.json2labelImg import createLabelImage  # noqa: E402

EXTRA_LABELS = ("car", "person", "pole", "traffic sign", "vegetation", "building", "bicycle",
                "rider", "sidewalk", "static", "cargroup", "persongroup", "traffic light",
                "license plate", "terrain", "fence")
REFERENCE_ENCODING = {"labelIds": "ids", "labelTrainIds": "trainIds", "color": "color"}


def realistic_annotation(rng: np.random.Generator, index: int, objects: int, height: int,
                         width: int) -> Annotation:
    """A make_scene street scene with extra objects before its void border (the last 4)."""
    scene = make_scene(width, height, rng, index)
    body, border = list(scene.objects[:-4]), list(scene.objects[-4:])
    while len(body) + len(border) < objects:
        n = int(rng.integers(8, 61))
        cx, cy = rng.uniform(-50, width + 50), rng.uniform(height * 0.3, height)
        rx, ry = rng.uniform(5, 200), rng.uniform(5, 150)
        angles = np.sort(rng.uniform(0, 2 * np.pi, n))
        radius = rng.uniform(0.5, 1.0, n)
        points = tuple((round(float(cx + rx * r * np.cos(a)), 2),
                        round(float(cy + ry * r * np.sin(a)), 2))
                       for a, r in zip(angles, radius))
        body.append(PolygonObject(str(rng.choice(EXTRA_LABELS)), points,
                                  bool(rng.random() < 0.02)))
    return Annotation(height, width, tuple(body + border))


def write_dataset(root: Path, images: int, objects: int, height: int, width: int
                  ) -> list[Item]:
    """`images` val annotations, each with a black image of its size; the items as the masks
    stage finds them (annotation and image paths)."""
    rng = np.random.default_rng(0)
    for i in range(images):
        stem = layout.make_stem("bench", i)
        polygons = layout.polygons_path(root, "val", stem)
        polygons.parent.mkdir(parents=True, exist_ok=True)
        annotation = realistic_annotation(rng, i, objects, height, width)
        polygons.write_text(json.dumps(annotation.to_json()))
        image = layout.image_path(root, "val", stem)
        image.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (width, height)).save(image)
    return find_annotations(root, ["val"])


def reference_path(out: Path, item: Item, encoding: str) -> Path:
    return out / f"{item.stem}_gtFine_{encoding}.png"


def reference_images(item: Item) -> dict[str, Image.Image]:
    """cityscapesScripts' four images of one annotation (parsed once), as its scripts save them."""
    annotation = CsAnnotation()
    annotation.fromJsonFile(str(item.polygons))
    images = {encoding: createLabelImage(annotation, cs_encoding)
              for encoding, cs_encoding in REFERENCE_ENCODING.items()}
    instance = np.asarray(createInstanceImage(annotation, "ids")).astype(np.uint16)
    images["instanceIds"] = Image.fromarray(instance)
    return images


def run_reference(items: Sequence[Item], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for item in items:
        for encoding, image in reference_images(item).items():
            image.save(reference_path(out, item, encoding))


def shares(items: Sequence[Item]) -> dict[str, float]:
    """Seconds of one pass over `items` of each share, in this process: rendering (parse +
    draw, no PNG) by cityscapesScripts and by us, and PNG encoding of the same four masks by
    PIL (defaults) and by fcn.png."""
    seconds = dict.fromkeys(("render_cs", "render_ours", "encode_pil", "encode_ours"), 0.0)
    for item in items:
        start = time.perf_counter()
        theirs = reference_images(item)
        seconds["render_cs"] += time.perf_counter() - start
        start = time.perf_counter()
        masks = render(read_annotation(item.polygons), ENCODINGS, source=str(item.polygons))
        seconds["render_ours"] += time.perf_counter() - start
        start = time.perf_counter()
        for image in theirs.values():
            image.save(io.BytesIO(), "PNG")
        seconds["encode_pil"] += time.perf_counter() - start
        start = time.perf_counter()
        for array in masks.values():
            encode_png(array)
        seconds["encode_ours"] += time.perf_counter() - start
    return seconds


def read(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


def verify(items: Sequence[Item], reference: Path, ours: Path) -> None:
    for item in items:
        for encoding in ENCODINGS:
            theirs = read(reference_path(reference, item, encoding))
            mine = read(mask_path(ours, item.split, item.stem, encoding))
            if theirs.dtype != mine.dtype or not np.array_equal(theirs, mine):
                raise SystemExit(f"MISMATCH {item.stem} {encoding}: ours {mine.dtype}{mine.shape} "
                                 f"vs cityscapesScripts {theirs.dtype}{theirs.shape}")


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the pool's workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def size_of(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*.png"))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--objects", type=int, default=150, help="polygons per annotation")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--workers", type=int, default=2, help="the multi-worker run")
    parser.add_argument("--smoke", action="store_true",
                        help="a tiny run that checks the script works (CI): 2 annotations of "
                             "64x128, 20 polygons, 1 round")
    args = parser.parse_args(argv)
    if args.smoke:
        args.images, args.objects, args.rounds, args.height, args.width = 2, 20, 1, 64, 128

    with tempfile.TemporaryDirectory(prefix="masks_speed_") as tmp:
        root = Path(tmp) / "dataset"
        items = write_dataset(root, args.images, args.objects, args.height, args.width)
        n = len(items)
        polygons = np.mean([len(json.loads(i.polygons.read_text())["objects"]) for i in items])
        print(f"{n} annotations, {args.width}x{args.height}, {polygons:.0f} polygons each, "
              f"encodings: {', '.join(ENCODINGS)}")
        many = f"ours, {args.workers} workers"
        runs = {"cityscapesScripts": lambda: run_reference(items, Path(tmp) / "reference"),
                "ours, 1 worker": lambda: render_all(items, root, Path(tmp) / "ours1",
                                                     ENCODINGS, 1),
                many: lambda: render_all(items, root, Path(tmp) / f"ours{args.workers}",
                                         ENCODINGS, args.workers)}
        best = {name: float("inf") for name in runs}
        cpu = {name: float("inf") for name in runs}  # this process and its finished workers
        parts = dict.fromkeys(("render_cs", "render_ours", "encode_pil", "encode_ours"),
                              float("inf"))
        for _ in range(args.rounds):
            for name, run in runs.items():
                start, start_cpu = time.perf_counter(), _cpu_seconds()
                run()
                best[name] = min(best[name], time.perf_counter() - start)
                cpu[name] = min(cpu[name], _cpu_seconds() - start_cpu)
            for part, seconds in shares(items).items():
                parts[part] = min(parts[part], seconds)
        verify(items, Path(tmp) / "reference", Path(tmp) / "ours1")
        verify(items, Path(tmp) / "reference", Path(tmp) / f"ours{args.workers}")
        pil_bytes, our_bytes = size_of(Path(tmp) / "reference"), size_of(Path(tmp) / "ours1")

    print("pixels identical: all 4 encodings of every image (PNG files read back with PIL)")
    rate = {name: n / seconds for name, seconds in best.items()}
    for name, r in rate.items():
        print(f"{name:>22}: {r:6.2f} images/s")
    ref, one = rate["cityscapesScripts"], rate["ours, 1 worker"]
    print(f"ours (1 worker) / cityscapesScripts: {one / ref:.2f}x (end to end: rendering, "
          "encoding and writing together; the shares below)")
    ref_cpu, one_cpu = cpu["cityscapesScripts"], cpu["ours, 1 worker"]
    print(f"CPU time per image (load-independent): cityscapesScripts "
          f"{ref_cpu / n * 1e3:.1f} ms, ours {one_cpu / n * 1e3:.1f} ms "
          f"({ref_cpu / one_cpu:.2f}x)")
    print(f"ours ({args.workers} workers) / ours (1 worker): {rate[many] / one:.2f}x")
    print(f"CPU time per image, workers included: {one_cpu / n * 1e3:.1f} ms with 1 "
          f"worker, {cpu[many] / n * 1e3:.1f} ms with {args.workers}")
    ms = {part: seconds / n * 1e3 for part, seconds in parts.items()}
    print(f"rendering (parse + draw the 4 encodings, no PNG), one process: cityscapesScripts "
          f"{ms['render_cs']:.1f} ms/image, ours {ms['render_ours']:.1f} ms/image "
          f"({ms['render_cs'] / ms['render_ours']:.2f}x)")
    print(f"PNG encoding of the 4 masks, one process: PIL {ms['encode_pil']:.1f} ms/image, "
          f"fcn.png {ms['encode_ours']:.1f} ms/image "
          f"({ms['encode_pil'] / ms['encode_ours']:.2f}x)")
    print(f"PNG size of the 4 masks: PIL {pil_bytes / n / 1e3:.1f} kB/image, fcn.png "
          f"{our_bytes / n / 1e3:.1f} kB/image (ours {our_bytes / pil_bytes:.2f}x the bytes: "
          f"{our_bytes / pil_bytes - 1:+.0%})")


if __name__ == "__main__":
    main()
