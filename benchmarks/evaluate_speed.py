"""Evaluation speed vs cityscapesScripts' evaluator in its fastest form, on the same files,
instance scores on, for files written by fcn.png and by PIL.

    .venv/bin/python benchmarks/evaluate_speed.py [--images 8] [--instances 20] [--rounds 3]
        [--writer both] [--cs-pyx PATH] [--no-cython] [--smoke]

Writes `--images` 1024x2048 ground truths (labelIds + 16-bit instanceIds, drawn by
fcn.masks.render from fcn.synthetic street scenes with extra people and cars up to `--instances`
instances per image; real val images have about 20) and a prediction for each (the ground
truth shifted by a few pixels, ignored regions predicted as road, and blocks of wrong classes,
as a model errs), once per writer (`--writer both`, the default; or one of them):

- `fcn.png`: as the masks and export stages write them (our reader's fast path);
- `PIL`: as the masks shipped with real Cityscapes and other tools' predictions are written
  (PIL picks filters our fast reader does not undo, so ours decodes them with PIL too).

Then it times, on each writer's files, per image:

- cityscapesScripts 2.3.0: `evaluateImgLists`, `evalInstLevelScore = True`, quiet, no JSON
  output, in its fastest form: with its Cython confusion-matrix extension
  (`cityscapesscripts.evaluation.addToConfusionMatrix`, which the evaluator imports when it
  exists and otherwise counts pixel pairs with `np.unique`). The PyPI package ships neither
  the extension nor its source (addToConfusionMatrix.pyx is only in the git repository), so
  where Cython and a C compiler are present the script builds, into a temporary folder that
  joins the package's search path before the evaluator is imported, either the original
  (`--cs-pyx`: addToConfusionMatrix.pyx of a cityscapesScripts checkout, its _impl.c beside
  it) or, by default, `cEvaluatePair` written here with the same contract (one C loop adding
  every (ground truth, prediction) pixel pair into a copy of the matrix). Without Cython or a
  compiler (or with `--no-cython`) it times the pure-Python form and says why. The first line
  names the form that ran;
- ours: `fcn.cityscapes.scoring.evaluate_files`, with 1 worker (no threads: the same single
  core) and with 2 decode threads.

Rounds are interleaved and the best round of each counts (least disturbed by other load).
Both read and decode every PNG in every round (the page cache is warm for both after round 1).
The scores of both are compared (1e-9); any difference fails the benchmark. Prints both times
and the ratio per writer, and exits non-zero if ours (1 worker) is not at least MIN_SPEEDUP
times as fast on the fcn.png files (the files the pipeline scores). `--smoke` is a seconds-long
run at a tiny size (2 images of 64x128, 1 round, both writers) that CI runs so the script
cannot rot; the speed-up is not asserted then.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import importlib.util
import io
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import numpy as np
from PIL import Image

from fcn.cityscapes.annotations import Annotation, PolygonObject
from fcn.cityscapes.scoring import EvalFiles, evaluate_files
from fcn.cityscapes.labels import ID_TO_TRAINID, TRAINID_TO_ID
from fcn.cityscapes.layout import mask_path
from fcn.masks.render import render
from fcn.png import encode_png
from fcn.synthetic import make_scene

if not hasattr(np, "in1d"):  # cityscapesscripts 2.3.0 calls np.in1d, removed in numpy 2.4
    np.in1d = np.isin  # type: ignore[attr-defined]

MIN_SPEEDUP = 3.0
"""Ours (1 worker) against cityscapesScripts' fastest form, on fcn.png-written files."""
WRITERS = {"pipeline": "fcn.png", "pil": "PIL"}
EXTENSION = "addToConfusionMatrix"
EVALUATOR = "cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling"
EQUIVALENT_PYX = '''\
# cython: language_level=3, boundscheck=False, wraparound=False
"""cEvaluatePair with the contract of cityscapesScripts' addToConfusionMatrix extension:
every (ground truth, prediction) pixel pair of two uint8 label-id images added, in one C loop,
to the confusion matrix (in place: the evaluator's caller keeps its own reference to it, an
unsigned long long C-contiguous array), and a copy of the matrix returned."""
import numpy as np


def cEvaluatePair(prediction, ground_truth, confusion, eval_labels):
    cdef const unsigned char[::1] predicted = np.ascontiguousarray(prediction, np.uint8).ravel()
    cdef const unsigned char[::1] truth = np.ascontiguousarray(ground_truth, np.uint8).ravel()
    matrix = np.ascontiguousarray(confusion, np.ulonglong)
    cdef unsigned long long[:, ::1] counts = matrix
    cdef Py_ssize_t i
    for i in range(predicted.shape[0]):
        counts[truth[i], predicted[i]] += 1
    return matrix.copy()
'''
BUILD = """\
import sys
import numpy
from Cython.Build import cythonize
from setuptools import Distribution, Extension

source, folder = sys.argv[1], sys.argv[2]
extension = Extension("addToConfusionMatrix", [source], include_dirs=[numpy.get_include()])
modules = cythonize([extension], build_dir=folder + "/c", quiet=True,
                    compiler_directives={"language_level": 3})
command = Distribution({"ext_modules": modules}).get_command_obj("build_ext")
command.build_lib, command.build_temp = folder + "/lib", folder + "/tmp"
command.ensure_finalized()
command.run()
"""
"""Cythonize and compile one .pyx into <folder>/lib (run in a child: its compiler output and
any failure stay out of the benchmark's output)."""

INSTANCE_CLASSES = ("person", "car", "rider", "bicycle")


def scene(rng: np.random.Generator, index: int, height: int, width: int,
          instances: int) -> Annotation:
    """A synthetic street scene topped up with people and cars to `instances` instances."""
    annotation = make_scene(width, height, rng, index)
    objects = list(annotation.objects)
    have = sum(o.label in ("person", "rider", "car", "truck", "bus", "train", "motorcycle",
                           "bicycle") for o in objects)
    for _ in range(max(0, instances - have)):
        label = str(rng.choice(INSTANCE_CLASSES))
        w = float(rng.uniform(30, 250)) if label == "car" else float(rng.uniform(15, 60))
        h = w * (0.6 if label == "car" else 2.5)
        x, y = float(rng.uniform(0, width - w)), float(rng.uniform(height * 0.4, height * 0.8))
        polygon = ((x, y), (x + w, y), (x + w, y + h), (x + w / 2, y + h * 1.05), (x, y + h))
        objects.insert(len(objects) - 3, PolygonObject(label, polygon))  # under the void frame
    return Annotation(height, width, tuple(objects))


def prediction_like_a_model(label_ids: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Evaluated label ids only (what our export writes), wrong at boundaries and in blocks."""
    dy, dx = (int(v) for v in rng.integers(-6, 7, size=2))
    shifted = np.roll(label_ids, (dy, dx), axis=(0, 1))
    train_ids = ID_TO_TRAINID[shifted]
    train_ids[train_ids == 255] = 0  # ignored regions predicted as road
    prediction = TRAINID_TO_ID[train_ids]
    height, width = prediction.shape
    for _ in range(12):
        h = int(rng.integers(min(20, height // 12), height // 6))  # 20 px at full size
        w = int(rng.integers(min(20, width // 12), width // 6))
        y, x = int(rng.integers(0, height - h)), int(rng.integers(0, width - w))
        prediction[y:y + h, x:x + w] = TRAINID_TO_ID[int(rng.integers(0, 19))]
    return prediction


def make_files(folder: Path, images: int, height: int, width: int, instances: int,
               writer: str = "pipeline") -> list[EvalFiles]:
    rng = np.random.default_rng(0)
    files = []
    for k in range(images):
        stem = f"frankfurt_{k:06d}_000019"
        masks = render(scene(rng, k, height, width, instances), ("labelIds", "instanceIds"))
        labels = mask_path(folder / "gt", "val", stem, "labelIds")
        instance_file = mask_path(folder / "gt", "val", stem, "instanceIds")
        predicted = prediction_like_a_model(masks["labelIds"], rng)
        prediction = folder / "results" / "frankfurt" / f"{stem}_leftImg8bit.png"
        for path, array in ((labels, masks["labelIds"]), (instance_file, masks["instanceIds"]),
                            (prediction, predicted)):
            path.parent.mkdir(parents=True, exist_ok=True)
            if writer == "pipeline":  # as the masks and export stages write them
                path.write_bytes(encode_png(array))
            else:
                Image.fromarray(array).save(path)
        files.append(EvalFiles(prediction, labels, instance_file))
    return files


def build_extension(folder: Path, pyx: Path | None) -> Path:
    """Compile cityscapesScripts' confusion-matrix extension (`pyx` with its _impl.c beside it,
    or EQUIVALENT_PYX) into `folder`/lib and return that folder; RuntimeError(why) when
    Cython, a C compiler or the build is missing or fails."""
    if importlib.util.find_spec("Cython") is None:
        raise RuntimeError("Cython not available: no module named 'Cython' "
                           "(pip install cython)")
    import sysconfig

    compiler = (os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C compiler: {compiler} not found")
    source = folder / "src" / f"{EXTENSION}.pyx"
    source.parent.mkdir(parents=True, exist_ok=True)
    if pyx is None:
        source.write_text(EQUIVALENT_PYX, encoding="utf-8")
    else:
        shutil.copy(pyx, source)
        impl = pyx.with_name(f"{EXTENSION}_impl.c")
        if impl.is_file():
            shutil.copy(impl, source.parent)
    done = subprocess.run([sys.executable, "-c", BUILD, str(source), str(folder)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        lines = [line.strip() for line in (done.stderr + done.stdout).splitlines()
                 if line.strip()]
        cython = [line for line in lines if ".pyx:" in line]  # <file>:<line>:<col>: message
        compiler = [line for line in lines if "error:" in line.lower()]
        raise RuntimeError("the extension did not build: "
                           f"{(cython or compiler or lines[-1:] or ['?'])[0]}")
    return folder / "lib"


def load_evaluator(folder: Path, pyx: Path | None, cython: bool) -> tuple[ModuleType, str]:
    """cityscapesScripts' pixel-level evaluator in the fastest form this machine can run (the
    Cython extension installed, or built into `folder` and found by the evaluator's own import;
    pure Python with `cython` False), and that form in words."""
    extension = f"cityscapesscripts.evaluation.{EXTENSION}"
    if not cython:
        form = "pure Python (--no-cython)"
    elif importlib.util.find_spec(extension) is not None:
        form = "Cython extension (installed with cityscapesScripts)"
    else:
        try:
            lib = build_extension(folder, pyx)
            importlib.import_module("cityscapesscripts.evaluation").__path__.append(str(lib))
            importlib.import_module(extension)
        except (RuntimeError, ImportError) as exc:
            form = f"pure Python ({exc})"
        else:
            what = (f"cityscapesScripts' {pyx}" if pyx is not None else
                    "cEvaluatePair written here with its contract: the PyPI package ships no "
                    "addToConfusionMatrix.pyx; --cs-pyx builds the original")
            form = f"Cython extension ({what}; built in a temporary folder)"
    evaluator = importlib.import_module(EVALUATOR)
    if not cython:
        evaluator.CSUPPORT = False  # an installed extension turned off
    elif evaluator.CSUPPORT != form.startswith("Cython"):
        raise SystemExit(f"cityscapesScripts' evaluator has CSUPPORT={evaluator.CSUPPORT}, "
                         f"but the form found here is: {form}")
    return evaluator, form


def official(evaluator: ModuleType, files: Sequence[EvalFiles]) -> dict:
    args = copy.copy(evaluator.args)
    args.evalInstLevelScore, args.evalPixelAccuracy = True, False
    args.JSONOutput, args.quiet = False, True
    output = io.StringIO()
    try:
        with contextlib.redirect_stdout(output):
            return evaluator.evaluateImgLists([str(f.prediction) for f in files],
                                              [str(f.labels) for f in files], args)
    except SystemExit:  # its printError prints (to the captured stdout), then exits
        raise SystemExit(f"cityscapesScripts' evaluator failed: {output.getvalue()[-2000:]}")


def check_agreement(ours, theirs: dict) -> None:
    pairs = [(ours.class_iou, theirs["classScores"]), (ours.class_iiou, theirs["classInstScores"]),
             (ours.category_iou, theirs["categoryScores"]),
             (ours.category_iiou, theirs["categoryInstScores"])]
    for mine, reference in pairs:
        for name, value in mine.items():
            other = reference[name]
            if not ((math.isnan(value) and math.isnan(other)) or abs(value - other) <= 1e-9):
                raise SystemExit(f"scores differ for {name}: ours {value}, official {other}")


def instance_count(path: Path) -> int:
    """Ground-truth instances (ids above 1000) in an instanceIds file."""
    with Image.open(path) as image:
        ids = np.asarray(image)
    return len(np.unique(ids[ids > 1000]))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--instances", type=int, default=20, help="instances per image")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--writer", choices=["both", *WRITERS], default="both",
                        help="PNG writer of the files: both (default), fcn.png as the masks and "
                             "export stages write them ('pipeline'), or PIL, as the masks "
                             "shipped with real Cityscapes were written ('pil'; the speed-up "
                             "is asserted on fcn.png files only)")
    parser.add_argument("--cs-pyx", type=Path,
                        help="cityscapesScripts' own addToConfusionMatrix.pyx (from a git "
                             "checkout; not in the PyPI package) to build instead of the "
                             "equivalent written here")
    parser.add_argument("--no-cython", action="store_true",
                        help="time cityscapesScripts' pure-Python form (what a pip install "
                             "runs) instead of its Cython extension")
    parser.add_argument("--smoke", action="store_true",
                        help="a tiny run that checks the script works (CI): 2 images of "
                             "64x128, 4 instances, 1 round, both writers; no speed-up asserted")
    args = parser.parse_args(argv)
    if args.smoke:
        args.images, args.height, args.width, args.instances, args.rounds = 2, 64, 128, 4, 1
    writers = list(WRITERS) if args.writer == "both" else [args.writer]

    with tempfile.TemporaryDirectory(prefix="evaluate_speed_") as tmp:
        evaluator, form = load_evaluator(Path(tmp) / "extension", args.cs_pyx,
                                         not args.no_cython)
        print(f"cityscapesScripts form: {form}", flush=True)
        files = {writer: make_files(Path(tmp) / writer, args.images, args.height, args.width,
                                    args.instances, writer) for writer in writers}
        counts = [instance_count(f.instances) for f in files[writers[0]]]
        keys = ("cityscapesScripts", "ours, 1 worker", "ours, 2 threads")
        timings = {writer: {key: [] for key in keys} for writer in writers}
        for _ in range(args.rounds):
            for writer in writers:
                start = time.perf_counter()
                theirs = official(evaluator, files[writer])
                timings[writer]["cityscapesScripts"].append(time.perf_counter() - start)
                for workers, key in ((1, "ours, 1 worker"), (2, "ours, 2 threads")):
                    start = time.perf_counter()
                    ours = evaluate_files(files[writer], workers=workers)
                    timings[writer][key].append(time.perf_counter() - start)
                check_agreement(ours, theirs)

    print(f"{args.images} images of {args.height}x{args.width}, "
          f"{np.mean(counts):.1f} ground-truth instances per image, best of {args.rounds} "
          "rounds; scores agree to 1e-9")
    ratios = {}
    for writer in writers:
        per_image = {key: 1000 * min(values) / args.images
                     for key, values in timings[writer].items()}
        print(f"PNGs written by {WRITERS[writer]}:")
        for key, ms in per_image.items():
            print(f"  {key:<18} {ms:8.1f} ms/image")
        ratios[writer] = per_image["cityscapesScripts"] / per_image["ours, 1 worker"]
        print(f"  speed-up: {ratios[writer]:.1f}x with 1 worker, "
              f"{per_image['cityscapesScripts'] / per_image['ours, 2 threads']:.1f}x with "
              "2 threads")
    ratio = ratios.get("pipeline")
    if ratio is not None and ratio < MIN_SPEEDUP and not args.smoke:
        raise SystemExit(f"ours is only {ratio:.1f}x as fast as cityscapesScripts on fcn.png "
                         f"files (need >= {MIN_SPEEDUP:g}x)")


if __name__ == "__main__":
    main()
