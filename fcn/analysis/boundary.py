"""Boundary quality of semantic label maps: Boundary IoU and trimap IoU by distance from an edge.

Region mIoU is dominated by the interiors of large regions, so a model whose masks are blurry
at every edge can still score well; these two measures look only near edges.

Definitions (label maps hold trainIds 0..C-1 and the ignore label 255):

- **Edge band** `edge_band(L, r)`: pixel p is in it iff some pixel q with ||p - q||∞ <= r has
  a different label or lies outside the image. The frame counts as an edge and 255 is a label
  like any other (class | void is an edge). This is what Cheng et al.'s `mask_to_boundary`
  gives for one class mask: it pads the mask with one zero pixel and erodes it `dilation`
  times with a 3x3 kernel, so the mask pixels within Chebyshev distance `dilation` of a
  non-mask pixel or of the frame form the boundary.
- **Radius** d = max(1, round(ratio * sqrt(H² + W²))) with Python's (half-to-even) `round`, as
  in Cheng et al.'s code; ratio 0.02 gives d = 46 on Cityscapes' 1024x2048 images.
- **Boundary IoU** of class c (Cheng, Girshick, Dollár, Berg, Kirillov, "Boundary IoU:
  Improving Object-Centric Image Segmentation Evaluation", CVPR 2021): per image, with ground
  truth G and prediction P, G_d^c = {G == c} ∩ edge_band(G, d), P_d^c = {P == c} ∩
  edge_band(P, d) and valid = {G != 255}; summed over the images,
  intersection_c = Σ |G_d^c ∩ P_d^c ∩ valid|, union_c = Σ |(G_d^c ∪ P_d^c) ∩ valid| and
  Boundary IoU_c = intersection_c / union_c (NaN when union_c is 0: the class is never near
  an edge); the mean is over the classes that are defined.
- **Trimap IoU at width w** (the trimap of Kohli, Ladický, Torr, "Robust Higher Order
  Potentials for Enforcing Label Consistency", IJCV 2009, used by Chen et al., DeepLab): the
  confusion matrix of the valid pixels in edge_band(G, w) only, per-class IoU
  tp / (tp + fp + fn) and pixel accuracy within the band. A curve over several widths shows
  how accuracy recovers with the distance from an edge.

Streaming: `BoundaryAccumulator.add` works on one image and adds exact int64 counts, so the
dataset figures are exact and memory does not grow with the number of images.

Implementation. edge_band(L, r) = edge_band(L, 1) ⊕ square(r - 1) (a binary dilation): if the
nearest q with another label (or outside) is at distance D from p, the pixel next to q on the
way to p has p's label and a neighbour of another label, and is at distance D - 1 from p;
conversely a pixel of edge_band(L, 1) at distance k from p puts another label (its own or
its neighbour's) within k + 1 of p. So the bands for all radii come from one 3x3 test and
nested separable dilations, each widening the previous band, at O(log r) vectorised passes
per axis (doubling shifted ORs); the ground truth's band levels for all radii then go into one
`np.bincount` over (ground truth, prediction, prediction in band, band level).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np

from fcn.cityscapes.labels import IGNORE_INDEX, NUM_CLASSES
from fcn.metrics import nanmean, ratio

DEFAULT_WIDTHS: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
"""Trimap widths in pixels (DeepLab plots accuracy for bands of up to ~40 pixels)."""

DEFAULT_RATIO = 0.02
"""Cheng et al.'s dilation ratio: the Boundary IoU radius as a fraction of the diagonal."""


def boundary_radius(height: int, width: int, ratio: float = DEFAULT_RATIO) -> int:
    """Cheng et al.'s `dilation`: max(1, round(ratio * diagonal)), half-to-even like their
    Python `round`; 46 for 1024x2048 at the default ratio."""
    return max(1, round(ratio * math.sqrt(height**2 + width**2)))


def edge_band(labels: np.ndarray, radius: int) -> np.ndarray:
    """bool[H, W]: the pixels within Chebyshev distance `radius` of another label or of the
    frame (module docstring). Radius 0 gives no pixel, radius >= max(H, W) every pixel."""
    labels = _label_map(labels, "labels")
    if radius < 0:
        raise ValueError(f"radius must be >= 0, got {radius}")
    if radius == 0:
        return np.zeros(labels.shape, dtype=bool)
    return _dilate(_first_edge(labels), radius - 1)


class BoundaryAccumulator:
    """Boundary IoU and trimap IoU over a dataset, one image at a time.

    Args:
        num_classes: C; labels are trainIds 0..C-1 or 255 (ignore), C <= 255.
        widths: trimap widths in pixels (>= 0), reported in this order.
        ratio: Boundary IoU radius as a fraction of the image diagonal (`boundary_radius`);
            the radius is computed per image size, so mixed sizes are fine.

    Counts are int64 and only ever added: `intersection[C]` and `union[C]` (Boundary IoU),
    `confusion[len(widths), C, C + 1]` (rows = ground truth; column C counts the pixels the
    prediction left at 255, which are misses of the ground-truth class).
    """

    def __init__(self, num_classes: int = NUM_CLASSES,
                 widths: Sequence[int] = DEFAULT_WIDTHS, ratio: float = DEFAULT_RATIO) -> None:
        if not 1 <= num_classes <= IGNORE_INDEX:
            raise ValueError(f"num_classes must be in [1, {IGNORE_INDEX}], got {num_classes}")
        widths = tuple(int(w) for w in widths)
        if any(w < 0 for w in widths):
            raise ValueError(f"trimap widths must be >= 0, got {list(widths)}")
        if not ratio > 0:
            raise ValueError(f"ratio must be > 0, got {ratio}")
        self.num_classes, self.widths, self.ratio = num_classes, widths, ratio
        self.images = 0
        self.radius_by_size: dict[tuple[int, int], int] = {}
        self.intersection = np.zeros(num_classes, dtype=np.int64)
        self.union = np.zeros(num_classes, dtype=np.int64)
        self.confusion = np.zeros((len(widths), num_classes, num_classes + 1), dtype=np.int64)

    def add(self, ground_truth: np.ndarray, prediction: np.ndarray) -> dict:
        """Add one image (two H x W maps of trainIds, 255 = ignore/void) and return its own
        figures: size, radius, Boundary mIoU over the classes with a nonzero union in this
        image, and per width trimap mIoU and pixel accuracy (NaN where undefined).

        ValueError on maps of different shapes or not 2-D, and on a class id outside
        [0, num_classes) other than 255 in either map.
        """
        gt, pred = np.asarray(ground_truth), np.asarray(prediction)
        if gt.ndim != 2 or gt.shape != pred.shape:
            raise ValueError(f"ground truth of shape {gt.shape} and prediction of shape "
                             f"{pred.shape}: expected two H x W label maps of one shape")
        c = self.num_classes
        gt = _checked_ids(gt, c, "ground truth")
        pred = _checked_ids(pred, c, "prediction")
        height, width = gt.shape
        radius = boundary_radius(height, width, self.ratio)
        radii = sorted({*self.widths, radius})
        counts = _joint_counts(gt, pred, c, radius, radii)  # int64[C, C + 1, 2, levels]
        in_band = counts.cumsum(axis=3)  # [..., i]: ground-truth band of radii[i]

        at_d = in_band[..., radii.index(radius)]
        diagonal = np.arange(c)
        intersection = at_d[diagonal, diagonal, 1]
        union = at_d.sum(axis=(1, 2)) + counts[:, :c, 1].sum(axis=(0, 2)) - intersection
        confusion = np.zeros_like(self.confusion)
        for i, w in enumerate(self.widths):
            confusion[i] = in_band[..., radii.index(w)].sum(axis=2)

        self.images += 1
        self.radius_by_size[(height, width)] = radius
        self.intersection += intersection
        self.union += union
        self.confusion += confusion
        present = union > 0
        return {
            "height": height,
            "width": width,
            "radius": radius,
            "boundary_miou": nanmean(ratio(intersection[present], union[present])),
            "trimap_miou": [nanmean(_trimap_iou(m)) for m in confusion],
            "trimap_pixel_accuracy": [_accuracy(m) for m in confusion],
        }

    def result(self) -> dict:
        """The dataset's figures as plain Python values (JSON-ready; NaN where undefined):

        images, num_classes, ratio, radius_by_size ({"HxW": d}), boundary_iou (per class),
        boundary_miou, boundary_intersection and boundary_union (per class counts),
        trimap_widths, trimap_iou (per width, per class), trimap_miou, trimap_pixel_accuracy
        and trimap_pixels (valid ground-truth pixels in the band), each per width.
        """
        per_width = [_trimap_iou(m) for m in self.confusion]
        boundary = ratio(self.intersection, self.union)
        return {
            "images": self.images,
            "num_classes": self.num_classes,
            "ratio": self.ratio,
            "radius_by_size": {f"{h}x{w}": d for (h, w), d in sorted(self.radius_by_size.items())},
            "boundary_iou": boundary.tolist(),
            "boundary_miou": nanmean(boundary),
            "boundary_intersection": self.intersection.tolist(),
            "boundary_union": self.union.tolist(),
            "trimap_widths": list(self.widths),
            "trimap_iou": [iou.tolist() for iou in per_width],
            "trimap_miou": [nanmean(iou) for iou in per_width],
            "trimap_pixel_accuracy": [_accuracy(m) for m in self.confusion],
            "trimap_pixels": [int(m.sum()) for m in self.confusion],
        }


def _joint_counts(gt: np.ndarray, pred: np.ndarray, num_classes: int, radius: int,
                  radii: list[int]) -> np.ndarray:
    """int64[C, C + 1, 2, len(radii) + 1]: valid pixels by ground truth, prediction (C = 255),
    prediction in its band of `radius`, and the index of the smallest of the sorted `radii`
    whose ground-truth band holds the pixel (len(radii): none). One bincount, uint8/uint16
    temporaries only (uint32 if the key needs it)."""
    k, levels = num_classes + 1, len(radii) + 1
    size = k * k * 2 * levels
    key = np.minimum(gt, num_classes).astype(np.uint16 if size <= 1 << 16 else np.uint32)
    key *= k
    key += np.minimum(pred, num_classes)
    key *= 2
    key += _dilate(_first_edge(pred), radius - 1)
    key *= levels
    key += levels - 1
    for band in _nested_bands(gt, radii):  # nested bands: each lowers the level by one
        key -= band
    counts = np.bincount(key.reshape(-1), minlength=size).reshape(k, k, 2, levels)
    return counts[:num_classes]  # row C: ground truth 255, not scored


def _nested_bands(labels: np.ndarray, radii: Sequence[int]) -> Iterator[np.ndarray]:
    """edge_band(labels, r) for each r of the ascending `radii`, each widened from the last."""
    band, reach = None, 1
    for r in radii:
        if r == 0:
            yield np.zeros(labels.shape, dtype=bool)
            continue
        band = _first_edge(labels) if band is None else band
        band, reach = _dilate(band, r - reach), r
        yield band


def _first_edge(labels: np.ndarray) -> np.ndarray:
    """edge_band(labels, 1): not (inside the frame with a uniform 3x3 window)."""
    height, width = labels.shape
    interior = np.zeros((height, width), dtype=bool)
    if height >= 3 and width >= 3:
        same_h = labels[:, 1:] == labels[:, :-1]
        row = same_h[:, :-1] & same_h[:, 1:]  # equal to left and right neighbours
        same_v = labels[1:, 1:-1] == labels[:-1, 1:-1]
        interior[1:-1, 1:-1] = row[:-2] & row[1:-1] & row[2:] & same_v[:-1] & same_v[1:]
    return np.logical_not(interior, out=interior)


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation by the (2 radius + 1)² square, separable."""
    return _dilate_axis(_dilate_axis(mask, radius, 0), radius, 1)


def _dilate_axis(mask: np.ndarray, radius: int, axis: int) -> np.ndarray:
    """OR over the window [i - radius, i + radius] along `axis` (outside counts as False):
    after zero padding, doubling shifted ORs give f[i] = OR mask[i .. i + span - 1] with span
    the largest power of two <= the window, and two such spans cover each window."""
    n = mask.shape[axis]
    radius = min(radius, n)
    if radius <= 0:
        return mask
    window = 2 * radius + 1
    length = n + 2 * radius

    def part(start: int, stop: int) -> tuple[slice, slice]:
        return (slice(start, stop), slice(None)) if axis == 0 else (slice(None), slice(start, stop))

    shape = (length, mask.shape[1]) if axis == 0 else (mask.shape[0], length)
    padded = np.zeros(shape, dtype=bool)
    padded[part(radius, radius + n)] = mask
    span = 1
    while 2 * span <= window:
        np.logical_or(padded[part(0, length - span)], padded[part(span, length)],
                      out=padded[part(0, length - span)])
        span *= 2
    return padded[part(0, n)] | padded[part(window - span, window - span + n)]


def _label_map(labels: np.ndarray, name: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"{name} must be an H x W label map, got shape {labels.shape}")
    return labels


def _checked_ids(labels: np.ndarray, num_classes: int, name: str) -> np.ndarray:
    """`labels` as uint8; ValueError naming the ids outside [0, C) other than 255."""
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{name} must hold integer class ids, got dtype {labels.dtype}")
    if labels.size and (labels.max() >= num_classes or labels.min() < 0):
        bad = np.unique(labels[((labels < 0) | (labels >= num_classes)) & (labels != IGNORE_INDEX)])
        if bad.size:
            raise ValueError(f"{name} has class ids {bad[:10].tolist()} outside "
                             f"[0, {num_classes}) other than {IGNORE_INDEX}")
    return labels.astype(np.uint8, copy=False)


def _trimap_iou(confusion: np.ndarray) -> np.ndarray:
    """Per-class tp / (tp + fp + fn) of a C x (C + 1) matrix (column C: prediction 255)."""
    c = confusion.shape[0]
    tp = np.diagonal(confusion)
    return ratio(tp, confusion.sum(axis=1) + confusion[:, :c].sum(axis=0) - tp)


def _accuracy(confusion: np.ndarray) -> float:
    total = confusion.sum()
    return float(np.trace(confusion) / total) if total else math.nan


