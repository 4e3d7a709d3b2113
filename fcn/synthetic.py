"""A synthetic dataset in the exact Cityscapes layout and file formats.

Each image is a street scene built from polygons (sky, skyline, trees, road, sidewalks,
poles with lights and signs, vehicles with license plates, people, riders, groups, the ego
vehicle's hood and the out-of-roi border), saved as polygon annotations, and a photo
rendered from those polygons. Classes share base colors, so a per-pixel color lookup cannot
tell them apart; each class has its own texture (stripes of some orientation and period,
checkers, dots, grain), varied per object, under per-image lighting and sensor noise: a
network has to look at neighbourhoods to segment it.

Everything is drawn from one seeded generator per image, so the same seed gives a
byte-identical dataset whatever order or process the images are made in.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from fcn.cityscapes import layout
from fcn.cityscapes.annotations import Annotation, PolygonObject
from fcn.atomic import atomic_dir, write_json
from fcn.cityscapes.labels import NAME_TO_LABEL, label_for_polygon
from fcn.params import SynthesizeParams

log = logging.getLogger(__name__)

# --- appearance -----------------------------------------------------------------------------

# A few base colors shared by several classes each: color alone is ambiguous.
PALETTE = np.array([
    (120, 110, 105),  # grey-brown
    (90, 120, 80),    # green
    (150, 140, 170),  # lilac
    (170, 120, 90),   # ochre
    (80, 100, 140),   # blue
], dtype=np.float32)

PATTERNS = ("flat", "hstripes", "vstripes", "diag", "antidiag", "checker", "dots", "grain")

# label name → (palette index, pattern). Distinct pairs for the evaluated classes.
APPEARANCE: dict[str, tuple[int, str]] = {
    "road": (0, "flat"), "sidewalk": (0, "checker"), "building": (2, "hstripes"),
    "wall": (3, "flat"), "fence": (3, "diag"), "pole": (0, "hstripes"),
    "traffic light": (3, "dots"), "traffic sign": (4, "checker"), "vegetation": (1, "grain"),
    "terrain": (1, "flat"), "sky": (4, "flat"), "person": (2, "vstripes"),
    "rider": (2, "antidiag"), "car": (4, "hstripes"), "truck": (4, "vstripes"),
    "bus": (3, "hstripes"), "train": (3, "vstripes"), "motorcycle": (0, "antidiag"),
    "bicycle": (1, "diag"),
    # unevaluated labels
    "unlabeled": (0, "grain"), "ego vehicle": (0, "dots"), "rectification border": (0, "flat"),
    "out of roi": (0, "grain"), "static": (2, "grain"), "dynamic": (3, "grain"),
    "ground": (0, "diag"), "parking": (2, "flat"), "rail track": (0, "vstripes"),
    "guard rail": (2, "diag"), "bridge": (2, "dots"), "tunnel": (2, "checker"),
    "polegroup": (0, "hstripes"), "caravan": (1, "hstripes"), "trailer": (1, "vstripes"),
    "license plate": (4, "dots"),
}


def _pattern_stack(height: int, width: int, period: float, rng: np.random.Generator) -> np.ndarray:
    """float32[len(PATTERNS), H, W] in [-1, 1]: every texture over the whole image."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    w = 2 * np.pi / period
    grain = rng.standard_normal((height, width)).astype(np.float32)
    stack = [
        np.zeros((height, width), np.float32),
        np.sign(np.sin(w * y)),
        np.sign(np.sin(w * x)),
        np.sign(np.sin(w * (x + y) / np.sqrt(2))),
        np.sign(np.sin(w * (x - y) / np.sqrt(2))),
        np.sign(np.sin(w * x) * np.sin(w * y)),
        (np.sin(w * x) * np.sin(w * y) > 0.5) * 2.0 - 1.0,
        np.clip(grain, -1, 1),
    ]
    return np.stack(stack).astype(np.float32)


def _object_index_map(annotation: Annotation) -> tuple[np.ndarray, np.ndarray]:
    """int32[H, W] of 1 + the index of the visible object at each pixel (0 = background),
    and uint8[n + 1], each index's labelId: the label map is `ids[objects]`."""
    image = Image.new("I", (annotation.width, annotation.height), 0)
    drawer = ImageDraw.Draw(image)
    ids = np.zeros(len(annotation.objects) + 1, np.uint8)
    for index, obj in enumerate(annotation.objects):
        label = label_for_polygon(obj.label)
        if obj.deleted or label is None or label.id < 0:
            continue
        drawer.polygon(obj.polygon, fill=index + 1)
        ids[index + 1] = label.id
    return np.asarray(image, dtype=np.int32), ids


def render_image(annotation: Annotation, rng: np.random.Generator) -> np.ndarray:
    """uint8[H, W, 3]: a photo of the annotated scene."""
    h, w = annotation.height, annotation.width
    objects, object_ids = _object_index_map(annotation)
    ids = object_ids[objects]

    names = {label.id: label.name for label in NAME_TO_LABEL.values() if label.id >= 0}
    palette_of_id = np.zeros(256, np.int64)
    pattern_of_id = np.zeros(256, np.int64)
    for label_id, name in names.items():
        palette_index, pattern = APPEARANCE[name]
        palette_of_id[label_id] = palette_index
        pattern_of_id[label_id] = PATTERNS.index(pattern)

    # Per-image color variation of the shared palette, per-object brightness and tint.
    palette = PALETTE * rng.uniform(0.85, 1.15, size=(len(PALETTE), 3)).astype(np.float32)
    n_objects = len(annotation.objects) + 1
    object_gain = rng.uniform(0.8, 1.2, size=n_objects).astype(np.float32)
    object_tint = rng.uniform(-12, 12, size=(n_objects, 3)).astype(np.float32)

    period = max(3.0, h / 24) * rng.uniform(0.9, 1.1)
    patterns = _pattern_stack(h, w, period, rng)
    texture = np.take_along_axis(patterns, pattern_of_id[ids][None], axis=0)[0]
    contrast = rng.uniform(22, 32)

    color = palette[palette_of_id[ids]] * object_gain[objects][..., None]
    color += object_tint[objects] + contrast * texture[..., None]

    # Lighting: a smooth gradient across the frame and a global gain.
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    gx, gy = rng.uniform(-0.25, 0.25, size=2)
    light = rng.uniform(0.8, 1.2) * (1 + gx * (xx / w - 0.5) + gy * (yy / h - 0.5))
    color *= light[..., None]
    color += rng.normal(0, 8, size=color.shape).astype(np.float32)
    return np.clip(color + 0.5, 0, 255).astype(np.uint8)


# --- scenes ---------------------------------------------------------------------------------


@dataclass
class _Scene:
    """Collects polygons in drawing order, in pixel coordinates rounded to 2 decimals."""

    width: int
    height: int
    rng: np.random.Generator

    def __post_init__(self) -> None:
        self.objects: list[PolygonObject] = []

    def add(self, label: str, points: np.ndarray | list, deleted: bool = False) -> None:
        pts = tuple((round(float(x), 2), round(float(y), 2)) for x, y in points)
        self.objects.append(PolygonObject(label, pts, deleted))

    def annotation(self) -> Annotation:
        return Annotation(self.height, self.width, tuple(self.objects))


def _rect(x0: float, y0: float, x1: float, y1: float) -> list[tuple[float, float]]:
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


def _blob(rng: np.random.Generator, cx: float, cy: float, rx: float, ry: float,
          n: int = 14) -> np.ndarray:
    """A star-shaped, usually non-convex polygon."""
    angles = np.sort(rng.uniform(0, 2 * np.pi, n))
    radius = rng.uniform(0.6, 1.0, n)
    return np.stack([cx + rx * radius * np.cos(angles), cy + ry * radius * np.sin(angles)], 1)


def _human(cx: float, base: float, height: float) -> list[tuple[float, float]]:
    """A non-convex silhouette: head, shoulders, arms, legs with a gap between them."""
    u = height / 8
    return [
        (cx - 0.5 * u, base - 8 * u), (cx + 0.5 * u, base - 8 * u), (cx + 0.5 * u, base - 6.8 * u),
        (cx + 1.4 * u, base - 6.5 * u), (cx + 1.5 * u, base - 3.8 * u), (cx + 0.9 * u, base - 3.8 * u),
        (cx + 0.9 * u, base - 4 * u), (cx + 0.9 * u, base), (cx + 0.2 * u, base),
        (cx, base - 3 * u), (cx - 0.2 * u, base), (cx - 0.9 * u, base), (cx - 0.9 * u, base - 4 * u),
        (cx - 1.5 * u, base - 3.8 * u), (cx - 1.4 * u, base - 6.5 * u), (cx - 0.5 * u, base - 6.8 * u),
    ]


def _vehicle(cx: float, base: float, width: float, height: float,
             cabin: float) -> list[tuple[float, float]]:
    """A side view with a narrower cabin on top (non-convex where they meet)."""
    hw = width / 2
    return [
        (cx - hw, base), (cx + hw, base), (cx + hw, base - height * (1 - cabin)),
        (cx + hw * 0.6, base - height * (1 - cabin)), (cx + hw * 0.45, base - height),
        (cx - hw * 0.55, base - height), (cx - hw * 0.7, base - height * (1 - cabin)),
        (cx - hw, base - height * (1 - cabin)),
    ]


def _two_wheeler(cx: float, base: float, size: float) -> list[tuple[float, float]]:
    """Two wheels joined by a frame: a polygon with deep notches."""
    r = size / 4
    return [
        (cx - 2 * r, base), (cx - 0.9 * r, base), (cx - 0.9 * r, base - r), (cx + 0.9 * r, base - r),
        (cx + 0.9 * r, base), (cx + 2 * r, base), (cx + 2 * r, base - 1.8 * r),
        (cx + 1.2 * r, base - 2.2 * r), (cx - 1.2 * r, base - 2.2 * r), (cx - 2 * r, base - 1.8 * r),
    ]


BIG_VEHICLES = ("truck", "bus", "train")


def make_scene(width: int, height: int, rng: np.random.Generator, index: int) -> Annotation:
    """A street scene with every evaluated class and the quirks of real annotations.

    `index` picks the big vehicle (truck, bus, train in turn), so any 3 consecutive
    sequence numbers of a city hold all 19 evaluated classes.
    """
    s = _Scene(width, height, rng)
    W, H = float(width), float(height)
    horizon = H * rng.uniform(0.38, 0.48)
    margin = 0.05 * W  # vertices beyond the image border, as in real annotations

    s.add("sky", _rect(-margin, -margin, W + margin, horizon + 0.05 * H))
    # Skyline: a stepped, non-convex polygon.
    xs = np.sort(rng.uniform(0, W, 7))
    skyline = [(-margin, horizon + 0.02 * H)]
    for x0, x1 in zip(np.r_[-margin, xs], np.r_[xs, W + margin]):
        top = horizon - H * rng.uniform(0.08, 0.3)
        skyline += [(x0, top), (x1, top)]
    skyline.append((W + margin, horizon + 0.02 * H))
    s.add("building", skyline)
    if rng.random() < 0.3:
        s.add("bridge", _rect(W * 0.3, horizon - 0.12 * H, W * 0.55, horizon - 0.06 * H))
    for _ in range(rng.integers(2, 4)):
        s.add("vegetation", _blob(rng, rng.uniform(0, W), horizon - 0.1 * H,
                                  rng.uniform(0.08, 0.16) * W, rng.uniform(0.1, 0.18) * H))

    vanish = W * rng.uniform(0.4, 0.6)
    s.add("terrain", [(-margin, horizon), (W + margin, horizon), (W + margin, H + margin),
                      (-margin, H + margin)])
    s.add("sidewalk", [(vanish - 0.12 * W, horizon), (vanish + 0.12 * W, horizon),
                       (W + margin, H * 0.8), (W + margin, H + margin),
                       (-margin, H + margin), (-margin, H * 0.8)])
    s.add("road", [(vanish - 0.04 * W, horizon), (vanish + 0.04 * W, horizon),
                   (W * 0.92, H + margin), (W * 0.08, H + margin)])
    if rng.random() < 0.5:
        s.add("parking", _rect(W * 0.62, H * 0.78, W * 0.8, H * 0.9))
    if rng.random() < 0.3:
        s.add("rail track", _rect(vanish - 0.03 * W, H * 0.6, vanish + 0.03 * W, H * 0.75))
    if rng.random() < 0.3:
        s.add("ground", _rect(W * 0.0, H * 0.7, W * 0.08, H * 0.78))

    # Wall and fence along the sidewalks.
    wall_x = rng.uniform(0.02, 0.2) * W
    s.add("wall", [(wall_x, horizon - 0.12 * H), (wall_x + 0.16 * W, horizon - 0.08 * H),
                   (wall_x + 0.16 * W, horizon + 0.08 * H), (wall_x, horizon + 0.16 * H)])
    fence_x = rng.uniform(0.65, 0.82) * W
    s.add("fence", [(fence_x, horizon - 0.06 * H), (fence_x + 0.16 * W, horizon - 0.1 * H),
                    (fence_x + 0.16 * W, horizon + 0.18 * H), (fence_x, horizon + 0.1 * H)])
    if rng.random() < 0.3:
        s.add("guard rail", _rect(W * 0.35, horizon + 0.05 * H, W * 0.45, horizon + 0.08 * H))

    # Poles with a traffic light or sign on top; sometimes a polegroup.
    for side in (0.2, 0.8):
        px = W * (side + rng.uniform(-0.08, 0.08))
        pw = max(2.0, 0.022 * W)
        top = horizon - H * rng.uniform(0.2, 0.3)
        s.add("pole", _rect(px - pw / 2, top, px + pw / 2, horizon + 0.32 * H))
        box_w, box_h = 0.05 * W, 0.13 * H
        thing = "traffic light" if side < 0.5 else "traffic sign"
        s.add(thing, _rect(px - box_w / 2, top - box_h, px + box_w / 2, top + 0.01 * H))
    if rng.random() < 0.3:
        s.add("polegroup", _rect(W * 0.5, horizon - 0.2 * H, W * 0.52, horizon))

    # Vehicles, far to near; each car with its license plate.
    big = BIG_VEHICLES[index % len(BIG_VEHICLES)]
    vehicles = [big, "car", "car"] + (["car"] if rng.random() < 0.5 else [])
    if rng.random() < 0.3:
        vehicles.append(rng.choice(["caravan", "trailer"]))
    for k, name in enumerate(vehicles):
        base = horizon + H * (0.18 + 0.12 * k) + rng.uniform(-0.02, 0.02) * H
        scale = (base - horizon) / (H - horizon)
        vw = W * (0.38 if name in BIG_VEHICLES else 0.22) * (0.6 + 0.6 * scale)
        vh = H * (0.34 if name in BIG_VEHICLES else 0.18) * (0.6 + 0.6 * scale)
        cx = rng.uniform(0.2, 0.8) * W
        s.add(name, _vehicle(cx, base, vw, vh, cabin=0.05 if name in BIG_VEHICLES else 0.45))
        if name == "car":
            s.add("license plate", _rect(cx - 0.08 * vw, base - 0.22 * vh, cx + 0.08 * vw,
                                         base - 0.1 * vh))
    if rng.random() < 0.6:
        base = horizon + 0.1 * H
        s.add("cargroup", _rect(vanish - 0.1 * W, base - 0.06 * H, vanish + 0.1 * W, base))

    # People, riders on two-wheelers, a persongroup.
    for _ in range(rng.integers(2, 4)):
        base = horizon + H * rng.uniform(0.2, 0.45)
        s.add("person", _human(rng.uniform(0.05, 0.95) * W, base,
                               H * 0.28 * (base - horizon) / (H - horizon) + 0.1 * H))
    for name in ("bicycle", "motorcycle"):
        base = horizon + H * rng.uniform(0.25, 0.45)
        size = H * (0.16 + 0.1 * (base - horizon) / (H - horizon))
        cx = rng.uniform(0.1, 0.9) * W
        s.add(name, _two_wheeler(cx, base, size))
        s.add("rider", _human(cx, base - 0.35 * size, size * 1.2))
    if rng.random() < 0.6:
        base = horizon + 0.15 * H
        x0 = W * rng.uniform(0.05, 0.8)
        s.add("persongroup", _rect(x0, base - 0.12 * H, x0 + 0.12 * W, base))
    if rng.random() < 0.4:
        s.add(rng.choice(["static", "dynamic"]), _blob(rng, rng.uniform(0, W), H * 0.75,
                                                      0.04 * W, 0.04 * H, n=8))

    # Deleted objects: annotated, then withdrawn; drawers must skip them.
    for _ in range(rng.integers(1, 3)):
        name = str(rng.choice(["car", "person", "building", "road", "sky"]))
        s.add(name, _blob(rng, rng.uniform(0, W), rng.uniform(0, H), 0.15 * W, 0.15 * H),
              deleted=True)

    _add_void_border(s, rng)
    return s.annotation()


def _add_void_border(s: _Scene, rng: np.random.Generator) -> None:
    """Ego vehicle hood, rectification border and out-of-roi frame, as in every real frame."""
    W, H = float(s.width), float(s.height)
    hood = H * rng.uniform(0.88, 0.93)
    s.add("ego vehicle", [(-1, H + 1), (-1, hood + 0.03 * H), (W * 0.3, hood),
                          (W * 0.7, hood), (W + 1, hood + 0.03 * H), (W + 1, H + 1)])
    b = max(1.0, 0.008 * W)
    s.add("rectification border", _rect(-1, -1, b, H + 1))
    s.add("rectification border", _rect(W - b, -1, W + 1, H + 1))
    # The out-of-roi frame: one non-convex polygon with a slit, like the real ones.
    s.add("out of roi", [(0, 0), (W, 0), (W, H), (0, H), (0, 2 * b), (b, 2 * b), (b, H - b),
                         (W - b, H - b), (W - b, b), (0, b)])


def withheld(annotation: Annotation) -> Annotation:
    """What real Cityscapes ships for test images: only the void border regions."""
    keep = {"ego vehicle", "rectification border", "out of roi"}
    return Annotation(annotation.height, annotation.width,
                      tuple(o for o in annotation.objects if o.label in keep))


VOID_BORDER = frozenset({"ego vehicle", "rectification border", "out of roi"})


def coarsen(annotation: Annotation, rng: np.random.Generator) -> Annotation:
    """A gtCoarse-style annotation of the same scene: fewer objects (each non-border object
    kept with probability 0.7), each a coarser polygon (at most 6 of its vertices) pulled
    5-15% towards its centroid, so boundaries stay unlabelled as in Cityscapes' coarse set.
    Deleted objects, groups and the void border are kept as they are; the drawing order is
    the fine annotation's, so later objects still cover earlier ones."""
    objects = []
    for obj in annotation.objects:
        if obj.label in VOID_BORDER:
            objects.append(obj)
            continue
        if rng.random() >= 0.7:
            continue
        points = np.asarray(obj.polygon, np.float64)
        points = points[::max(1, -(-len(points) // 6))]
        if len(points) < 3:
            continue
        centre = points.mean(axis=0)
        points = centre + (points - centre) * rng.uniform(0.85, 0.95)
        objects.append(PolygonObject(obj.label, tuple((round(float(x), 2), round(float(y), 2))
                                                      for x, y in points), obj.deleted))
    return Annotation(annotation.height, annotation.width, tuple(objects))


# --- the dataset ----------------------------------------------------------------------------


def _rng(seed: int, split: str, city: str, seq: int) -> np.random.Generator:
    key = zlib.crc32(f"{split}/{city}/{seq}".encode())
    return np.random.default_rng([seed, key])


def dataset_items(params: SynthesizeParams) -> Iterator[tuple[str, str, int]]:
    """(split, city, seq) of every image, in a fixed order."""
    for split in layout.IMAGE_SPLITS:
        for city in getattr(params, f"{split}_cities"):
            for seq in range(getattr(params, f"{split}_per_city")):
                yield split, city, seq


def write_item(root: Path, params: SynthesizeParams, split: str, city: str, seq: int) -> None:
    """Generate and write one image and its polygons (independent of all other items): gtFine
    for train, val and test (test: the void border only, as Cityscapes withholds the rest),
    gtCoarse for every split that has it when `params.coarse`. The coarse annotation draws
    from its own generator, so the image and the fine annotation do not depend on it."""
    rng = _rng(params.seed, split, city, seq)
    annotation = make_scene(params.width, params.height, rng, index=seq)
    image = render_image(annotation, rng)
    stem = layout.make_stem(city, seq)
    out = layout.image_path(root, split, stem)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(out, compress_level=1)
    if split in layout.ANNOTATION_SPLITS[layout.FINE]:
        fine = withheld(annotation) if split == "test" else annotation
        write_json(layout.polygons_path(root, split, stem), fine.to_json())
    if params.coarse and split in layout.ANNOTATION_SPLITS[layout.COARSE]:
        coarse = coarsen(annotation, _rng(params.seed, f"{layout.COARSE}/{split}", city, seq))
        write_json(layout.polygons_path(root, split, stem, layout.COARSE), coarse.to_json())


SEQUENCE_SPLIT = "val"


def sequence_stems(params: SynthesizeParams) -> list[str]:
    """The stems of the synthetic sequence's frames: the first val city, the sequence number
    after its val images (so no stem is also a val image's), frames 0, 1, … (none when
    `params.sequence_frames` is 0)."""
    city, seq = params.val_cities[0], params.val_per_city
    return [layout.make_stem(city, seq, frame) for frame in range(params.sequence_frames)]


def write_sequence(root: Path, params: SynthesizeParams) -> None:
    """A short video in `layout.sequence_path`'s layout: the camera pans at a steady pace
    across one scene twice the image width (from its left half to its right), so consecutive
    frames are coherent and no two are alike. Drawn from its own generator: the dataset's
    other files are the same with or without it."""
    stems = sequence_stems(params)
    if not stems:
        return
    width, height = params.width, params.height
    rng = _rng(params.seed, f"{layout.SEQUENCE}/{SEQUENCE_SPLIT}", layout.city_of(stems[0]),
               params.val_per_city)
    scene = render_image(make_scene(2 * width, height, rng, index=params.val_per_city), rng)
    for frame, stem in enumerate(stems):
        left = round(frame * width / max(1, len(stems) - 1))
        out = layout.sequence_path(root, SEQUENCE_SPLIT, stem)
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(scene[:, left:left + width]).save(out, compress_level=1)


def synthesize(root: str | Path, params: SynthesizeParams) -> int:
    """Write the whole dataset under `root` (and the sequence, if asked for), replacing it only
    once complete; returns the number of images (sequence frames not counted)."""
    items = list(dataset_items(params))
    with atomic_dir(root) as tmp:
        for split, city, seq in tqdm(items, desc="synthesize", unit="img"):
            write_item(tmp, params, split, city, seq)
        write_sequence(tmp, params)
    log.info("wrote %d images%s under %s", len(items), f" and a {params.sequence_frames}-frame "
             "sequence" if params.sequence_frames else "", root)
    return len(items)
