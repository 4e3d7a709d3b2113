"""Masks stage speed vs cityscapesScripts on the same files, with identical pixels.

    .venv/bin/python benchmarks/masks_speed.py [--images 24] [--objects 150] [--rounds 3]

Writes `--images` annotations of 1024x2048 street scenes (fcn.synthetic.make_scene plus
extra objects up to `--objects` polygons, 8–60 vertices each, like real gtFine files) to a
temporary dataset, then times, on those same files:

- cityscapesScripts: per file one `Annotation.fromJsonFile` (parsed once, which favours it:
  its own `json2labelImg`/`json2instanceImg` parse once per encoding), `createLabelImage` for
  ids, trainIds and color and `createInstanceImage` for ids, each saved as PNG with PIL's
  defaults; the 32-bit instance image, which Pillow 13 cannot save as PNG, converted to a
  16-bit array and saved as that (what a user of the script has to do);
- ours: `fcn.masks.generate.render_all`, the masks stage's loop (parse, one rasterization,
  lookups, PNG encoding, atomic writes), with 1 and with 2 worker processes.

Each is run `--rounds` times, interleaved; the best round counts (the least disturbed by
other load on the machine). Afterwards every PNG of both is read back with PIL and compared
array for array; any difference fails the benchmark.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from fcn.cityscapes.annotations import Annotation, PolygonObject
from fcn.masks.generate import Item, render_all
from fcn.cityscapes.layout import ENCODINGS, mask_path
from fcn.synthetic import make_scene

if not hasattr(np, "in1d"):  # cityscapesscripts 2.3.0 calls np.in1d, removed in numpy 2.4
    np.in1d = np.isin  # type: ignore[attr-defined]

from cityscapesscripts.helpers.annotation import Annotation as CsAnnotation  # noqa: E402
from cityscapesscripts.preparation.json2instanceImg import createInstanceImage  # noqa: E402
from cityscapesscripts.preparation.json2labelImg import createLabelImage  # noqa: E402

HEIGHT, WIDTH = 1024, 2048
EXTRA_LABELS = ("car", "person", "pole", "traffic sign", "vegetation", "building", "bicycle",
                "rider", "sidewalk", "static", "cargroup", "persongroup", "traffic light",
                "license plate", "terrain", "fence")
REFERENCE_ENCODING = {"labelIds": "ids", "labelTrainIds": "trainIds", "color": "color"}


def realistic_annotation(rng: np.random.Generator, index: int, objects: int) -> Annotation:
    """A make_scene street scene with extra objects before its void border (the last 4)."""
    scene = make_scene(WIDTH, HEIGHT, rng, index)
    body, border = list(scene.objects[:-4]), list(scene.objects[-4:])
    while len(body) + len(border) < objects:
        n = int(rng.integers(8, 61))
        cx, cy = rng.uniform(-50, WIDTH + 50), rng.uniform(HEIGHT * 0.3, HEIGHT)
        rx, ry = rng.uniform(5, 200), rng.uniform(5, 150)
        angles = np.sort(rng.uniform(0, 2 * np.pi, n))
        radius = rng.uniform(0.5, 1.0, n)
        points = tuple((round(float(cx + rx * r * np.cos(a)), 2), round(float(cy + ry * r * np.sin(a)), 2))
                       for a, r in zip(angles, radius))
        body.append(PolygonObject(str(rng.choice(EXTRA_LABELS)), points, bool(rng.random() < 0.02)))
    return Annotation(HEIGHT, WIDTH, tuple(body + border))


def write_dataset(root: Path, images: int, objects: int) -> list[Item]:
    rng = np.random.default_rng(0)
    items = []
    for i in range(images):
        stem = f"bench_{i:06d}_000019"
        path = root / "gtFine" / "val" / "bench" / f"{stem}_gtFine_polygons.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(realistic_annotation(rng, i, objects).to_json()))
        items.append(Item("val", stem, path))
    return items


def reference_path(out: Path, item: Item, encoding: str) -> Path:
    return out / f"{item.stem}_gtFine_{encoding}.png"


def run_reference(items: list[Item], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for item in items:
        annotation = CsAnnotation()
        annotation.fromJsonFile(str(item.polygons))
        for encoding, cs_encoding in REFERENCE_ENCODING.items():
            createLabelImage(annotation, cs_encoding).save(reference_path(out, item, encoding))
        instance = np.asarray(createInstanceImage(annotation, "ids")).astype(np.uint16)
        Image.fromarray(instance).save(reference_path(out, item, "instanceIds"))


def read(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


def verify(items: list[Item], reference: Path, ours: Path) -> None:
    for item in items:
        for encoding in ENCODINGS:
            theirs = read(reference_path(reference, item, encoding))
            mine = read(mask_path(ours, item.split, item.stem, encoding))
            if theirs.dtype != mine.dtype or not np.array_equal(theirs, mine):
                raise SystemExit(f"MISMATCH {item.stem} {encoding}: ours {mine.dtype}{mine.shape} "
                                 f"vs cityscapesScripts {theirs.dtype}{theirs.shape}")


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the pool's workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def size_of(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*.png"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--objects", type=int, default=150, help="polygons per annotation")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="the multi-worker run")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="masks_speed_") as tmp:
        root = Path(tmp) / "dataset"
        items = write_dataset(root, args.images, args.objects)
        polygons = np.mean([len(json.loads(i.polygons.read_text())["objects"]) for i in items])
        print(f"{len(items)} annotations, {WIDTH}x{HEIGHT}, {polygons:.0f} polygons each, "
              f"encodings: {', '.join(ENCODINGS)}")
        runs = {"cityscapesScripts": lambda: run_reference(items, Path(tmp) / "reference"),
                "ours, 1 worker": lambda: render_all(items, root, Path(tmp) / "ours1", ENCODINGS, 1),
                f"ours, {args.workers} workers": lambda: render_all(
                    items, root, Path(tmp) / f"ours{args.workers}", ENCODINGS, args.workers)}
        best = {name: float("inf") for name in runs}
        cpu = {name: float("inf") for name in runs}  # this process and its finished workers
        for _ in range(args.rounds):
            for name, run in runs.items():
                start, start_cpu = time.perf_counter(), _cpu_seconds()
                run()
                best[name] = min(best[name], time.perf_counter() - start)
                cpu[name] = min(cpu[name], _cpu_seconds() - start_cpu)
        verify(items, Path(tmp) / "reference", Path(tmp) / "ours1")
        verify(items, Path(tmp) / "reference", Path(tmp) / f"ours{args.workers}")
        print("pixels identical: all 4 encodings of every image (PNG files read back with PIL)")
        rate = {name: len(items) / seconds for name, seconds in best.items()}
        ref, one, many = rate.values()
        for name, r in rate.items():
            print(f"{name:>22}: {r:6.2f} images/s")
        print(f"ours (1 worker) / cityscapesScripts: {one / ref:.2f}x")
        ref_cpu, one_cpu = cpu["cityscapesScripts"], cpu["ours, 1 worker"]
        print(f"CPU time per image (load-independent): cityscapesScripts "
              f"{ref_cpu / len(items) * 1e3:.0f} ms, ours {one_cpu / len(items) * 1e3:.0f} ms "
              f"({ref_cpu / one_cpu:.2f}x)")
        print(f"ours ({args.workers} workers) / ours (1 worker): {many / one:.2f}x")
        many_cpu = cpu[f"ours, {args.workers} workers"]
        print(f"CPU time per image, workers included: {one_cpu / len(items) * 1e3:.0f} ms with 1 "
              f"worker, {many_cpu / len(items) * 1e3:.0f} ms with {args.workers}")
        print(f"PNG bytes per image: cityscapesScripts {size_of(Path(tmp) / 'reference') / len(items) / 1e3:.0f} kB, "
              f"ours {size_of(Path(tmp) / 'ours1') / len(items) / 1e3:.0f} kB")


if __name__ == "__main__":
    main()
