"""How well a segmentation model's per-pixel probabilities match how often it is right.

Definitions (Guo, Pleiss, Sun, Weinberger, "On Calibration of Modern Neural Networks", ICML
2017), over the pixels whose ground truth is not the ignore label 255:

- **Confidence** of a pixel: its largest class probability; its **prediction** is that class
  (the first one on a tie, as `torch.argmax`).
- **Bins**: B equal-width bins on [0, 1]; a confidence c falls in bin
  min(floor(c * B), B - 1), the product rounded in float64 (c read exactly, whatever its
  dtype). Bins are half-open [k/B, (k+1)/B) except the top one, which is closed: c = 1 is in
  bin B - 1. A confidence that prints as k/B may sit either side of the edge, exactly as the
  float64 product says.
- **ECE** = sum over bins b of |acc_b - conf_b| * n_b / N, with n_b the pixels in bin b,
  acc_b the fraction of them predicted right, conf_b their mean confidence, N all pixels.
- **Per-class ECE** of class c: the same over the pixels *predicted* as c only (classwise
  ECE over the predicted class): whether the confidence the model gives when it says "c" can
  be trusted. It is NaN for a class never predicted.
- **Temperature scaling**: probabilities softmax(z / T) of logits z with one scalar T > 0
  fitted to minimise the NLL on held-out pixels; it leaves every argmax unchanged.

Streaming: `ECEAccumulator` keeps per (predicted class, bin) int64 counts, int64 correct
counts and float64 confidence sums, so memory is fixed and the dataset figure is that of all
pixels at once. `LogitSample` keeps a preallocated, deterministic sample of pixels for the
temperature fit.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fcn.cityscapes.labels import IGNORE_INDEX, NUM_CLASSES
from fcn.images import write_label_png

ECE_BINS = 15
"""Guo et al.'s number of bins, and the default everywhere here."""

_CHUNK_ELEMENTS = 65536
"""Pixels per class plane that `confidence_entropy` works on at once: its buffers (a few of
this size) stay in the CPU cache while it walks the classes."""

_FIT_ROWS = 65536
"""Sample rows per float64 chunk of the temperature fit: bounds its temporaries."""


def _as_numpy(values: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy()
    return np.asarray(values)


# --- confidence and entropy ----------------------------------------------------------------

def confidence_entropy(probabilities: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(prediction, confidence, entropy) of (N, C, H, W) probabilities (softmax applied).

    prediction: uint8 (N, H, W), the argmax over C (the first class on a tie; C <= 256);
    confidence: float32 (N, H, W), the largest probability; entropy: float32 (N, H, W),
    -sum_c p_c ln(p_c) in nats, with 0 ln 0 = 0 (computed as p ln(p + tiny), tiny the dtype's
    smallest normal number: exact for every p above about 1e-31, 0 for p = 0). Results are on
    the input's device; float16/bfloat16 input is computed in float32.

    On CPU it walks the C planes over blocks of rows with preallocated buffers (running max,
    a branch-free argmax update, one log per element), so nothing of the input's size is
    allocated: torch's reductions over the class axis are several times slower there and
    make full-size temporaries. Other devices use the plain torch reductions.
    """
    if probabilities.ndim != 4:
        raise ValueError(f"confidence_entropy: expected probabilities (N, C, H, W), got shape "
                         f"{tuple(probabilities.shape)}")
    if probabilities.shape[1] > 256:
        raise ValueError(f"confidence_entropy: {probabilities.shape[1]} classes do not fit the "
                         "uint8 prediction (at most 256)")
    probabilities = probabilities.detach()
    if probabilities.device.type != "cpu":
        return _confidence_entropy_torch(probabilities)
    return _confidence_entropy_cpu(probabilities)


def _confidence_entropy_torch(probabilities: torch.Tensor
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The device path: one image at a time, torch reductions over the class axis."""
    n, _, h, w = probabilities.shape
    device = probabilities.device
    prediction = torch.empty((n, h, w), dtype=torch.uint8, device=device)
    confidence = torch.empty((n, h, w), dtype=torch.float32, device=device)
    entropy = torch.empty((n, h, w), dtype=torch.float32, device=device)
    for k in range(n):
        p = probabilities[k]
        if p.dtype not in (torch.float32, torch.float64):
            p = p.float()
        values, indices = p.max(dim=0)
        prediction[k], confidence[k] = indices, values
        entropy[k] = torch.special.xlogy(p, p).sum(dim=0).neg_()
    return prediction, confidence, entropy


def _confidence_entropy_cpu(probabilities: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n, classes, h, w = probabilities.shape
    prediction = np.empty((n, h, w), np.uint8)
    confidence = np.empty((n, h, w), np.float32)
    entropy = np.empty((n, h, w), np.float32)
    native = probabilities.dtype in (torch.float32, torch.float64)
    dtype = np.float64 if probabilities.dtype == torch.float64 else np.float32
    tiny = np.finfo(dtype).tiny
    rows = max(1, _CHUNK_ELEMENTS // max(w, 1))
    running_max = np.empty((rows, w), dtype)
    running_entropy = np.empty((rows, w), dtype)
    term = np.empty((rows, w), dtype)
    greater = np.empty((rows, w), bool)
    step = np.empty((rows, w), np.uint8)
    for k in range(n):
        for top in range(0, h, rows):
            bottom = min(top + rows, h)
            block = probabilities[k, :, top:bottom]
            planes = block.numpy() if native else block.float().numpy()
            size = bottom - top
            m, ent, t = running_max[:size], running_entropy[:size], term[:size]
            g, d = greater[:size], step[:size]
            arg = prediction[k, top:bottom]
            np.copyto(m, planes[0])
            arg.fill(0)
            ent.fill(0)
            for c in range(classes):
                plane = planes[c]
                if c:
                    # arg = c where plane > m, else arg; as arg + (c - arg) * [plane > m] in
                    # wrapping uint8 arithmetic: branch-free, unlike masked writes
                    np.greater(plane, m, out=g)
                    np.subtract(np.uint8(c), arg, out=d)
                    np.multiply(d, g.view(np.uint8), out=d)
                    np.add(arg, d, out=arg)
                    np.maximum(m, plane, out=m)
                np.add(plane, tiny, out=t)
                np.log(t, out=t)
                np.multiply(t, plane, out=t)
                np.subtract(ent, t, out=ent)
            confidence[k, top:bottom] = m
            entropy[k, top:bottom] = ent
    return torch.from_numpy(prediction), torch.from_numpy(confidence), torch.from_numpy(entropy)


# --- expected calibration error ------------------------------------------------------------

class ECEAccumulator:
    """Expected calibration error over images added one at a time (module docstring).

    State, per (predicted class, bin), shape (num_classes, bins): `counts` (int64 pixels),
    `confidence_sums` (float64) and `correct` (int64 pixels predicted right); arrays add up
    exactly across images, so they can also be summed over workers.
    """

    def __init__(self, num_classes: int = NUM_CLASSES, bins: int = ECE_BINS,
                 ignore_index: int = IGNORE_INDEX) -> None:
        if num_classes < 1 or bins < 1:
            raise ValueError(f"ECEAccumulator: num_classes ({num_classes}) and bins ({bins}) "
                             "must be positive")
        self.num_classes, self.bins, self.ignore_index = num_classes, bins, ignore_index
        self.counts = np.zeros((num_classes, bins), np.int64)
        self.confidence_sums = np.zeros((num_classes, bins), np.float64)
        self.correct = np.zeros((num_classes, bins), np.int64)

    def add(self, confidence: np.ndarray | torch.Tensor, prediction: np.ndarray | torch.Tensor,
            ground_truth: np.ndarray | torch.Tensor) -> float:
        """Add one image's pixels whose ground truth is not `ignore_index` and return this
        image's ECE (NaN when it has none).

        confidence: float (H, W) in [0, 1]; prediction: integer class ids (H, W) in
        [0, num_classes); ground_truth: integer (H, W). Any equal shapes work. A confidence
        outside [0, 1] (or NaN) or a prediction outside the classes on a counted pixel is a
        ValueError, and nothing is added.
        """
        conf, pred, truth = (_as_numpy(a) for a in (confidence, prediction, ground_truth))
        if not conf.shape == pred.shape == truth.shape:
            raise ValueError(f"ECEAccumulator.add: confidence {conf.shape}, prediction "
                             f"{pred.shape} and ground truth {truth.shape} differ in shape")
        conf, pred, truth = conf.reshape(-1), pred.reshape(-1), truth.reshape(-1)
        valid = truth != self.ignore_index
        if not valid.all():
            conf, pred, truth = conf[valid], pred[valid], truth[valid]
        if conf.size == 0:
            return math.nan
        if not (conf.min() >= 0 and conf.max() <= 1):  # NaN fails both
            raise ValueError(f"ECEAccumulator.add: confidences outside [0, 1] "
                             f"({float(conf.min())}..{float(conf.max())})")
        if int(pred.min()) < 0 or int(pred.max()) >= self.num_classes:
            raise ValueError(f"ECEAccumulator.add: predictions outside [0, {self.num_classes}) "
                             f"({int(pred.min())}..{int(pred.max())})")
        bins, cells = self.bins, self.num_classes * self.bins
        # truncation is floor for c >= 0; the product is float64, as the definition says
        bin_index = (conf.astype(np.float64) * bins).astype(np.int64)
        np.minimum(bin_index, bins - 1, out=bin_index)
        cell = pred.astype(np.int64) * bins
        cell += bin_index
        # one pass counts pixels and correct ones: slot 2 * cell + [prediction == truth]
        pairs = cell * 2
        pairs += pred == truth
        by_outcome = np.bincount(pairs, minlength=2 * cells).reshape(cells, 2)
        sums = np.bincount(cell, weights=conf, minlength=cells)
        counts, correct = by_outcome.sum(axis=1), by_outcome[:, 1]
        self.counts += counts.reshape(self.num_classes, bins)
        self.correct += correct.reshape(self.num_classes, bins)
        self.confidence_sums += sums.reshape(self.num_classes, bins)
        return _ece(counts.reshape(-1, bins).sum(axis=0), sums.reshape(-1, bins).sum(axis=0),
                    correct.reshape(-1, bins).sum(axis=0))

    def result(self) -> dict[str, object]:
        """JSON-ready figures of everything added (plain floats and lists):

        - `ece`: over all pixels; NaN when none was added.
        - `ece_per_class`: one value per class, over the pixels predicted as it (NaN: never
          predicted).
        - `reliability`: one row per bin for the reliability diagram: `lower`, `upper`,
          `count`, `confidence` (mean) and `accuracy` (NaN for an empty bin).
        - `pixels`: the pixels counted.
        """
        counts = self.counts.sum(axis=0)
        sums = self.confidence_sums.sum(axis=0)
        correct = self.correct.sum(axis=0)
        per_class = [_ece(self.counts[c], self.confidence_sums[c], self.correct[c])
                     for c in range(self.num_classes)]
        rows = []
        for b in range(self.bins):
            n = int(counts[b])
            rows.append({"lower": b / self.bins, "upper": (b + 1) / self.bins, "count": n,
                         "confidence": float(sums[b] / n) if n else math.nan,
                         "accuracy": float(correct[b] / n) if n else math.nan})
        return {"ece": _ece(counts, sums, correct), "ece_per_class": per_class,
                "reliability": rows, "pixels": int(counts.sum())}


def _ece(counts: np.ndarray, confidence_sums: np.ndarray, correct: np.ndarray) -> float:
    """sum_b |acc_b - conf_b| n_b / N = sum_b |correct_b - confidence sum_b| / N."""
    total = int(counts.sum())
    if total == 0:
        return math.nan
    return float(np.abs(correct - confidence_sums).sum() / total)


# --- temperature scaling -------------------------------------------------------------------

class LogitSample:
    """A fixed-size, deterministic sample of (logit vector, ground-truth class) pixels for
    `fit_temperature`.

    Image number `index` gives at most quota = ceil(max_pixels / expected_images) of its
    non-ignore pixels, drawn without replacement by `np.random.default_rng([seed, index])`
    (all of them when it has fewer), kept in raster order; rows fill in the order images
    are added and stop at `max_pixels`. The same images with the same indices, added in the
    same order, give the same sample bit for bit, whatever else ran. Memory: max_pixels x
    num_classes float32 logits and max_pixels int64 labels, allocated up front.
    """

    def __init__(self, num_classes: int, max_pixels: int, seed: int, expected_images: int,
                 ignore_index: int = IGNORE_INDEX) -> None:
        if num_classes < 1 or max_pixels < 1 or expected_images < 1 or seed < 0:
            raise ValueError(f"LogitSample: num_classes ({num_classes}), max_pixels "
                             f"({max_pixels}) and expected_images ({expected_images}) must be "
                             f"positive and seed ({seed}) non-negative")
        self.num_classes, self.max_pixels, self.seed = num_classes, max_pixels, seed
        self.ignore_index = ignore_index
        self.quota = math.ceil(max_pixels / expected_images)
        self._logits = torch.empty((max_pixels, num_classes), dtype=torch.float32)
        self._labels = torch.empty(max_pixels, dtype=torch.int64)
        self.size = 0

    def __len__(self) -> int:
        return self.size

    @property
    def logits(self) -> torch.Tensor:
        """float32 (pixels, num_classes): the sampled logit vectors (a view)."""
        return self._logits[: self.size]

    @property
    def labels(self) -> torch.Tensor:
        """int64 (pixels,): their ground-truth classes (a view)."""
        return self._labels[: self.size]

    def add(self, logits: torch.Tensor, ground_truth: np.ndarray | torch.Tensor,
            index: int, are_probabilities: bool = False) -> int:
        """Sample image number `index` (>= 0): logits float (C, H, W) on any device, ground
        truth integer (H, W) with `ignore_index` for pixels left out; `are_probabilities`:
        the scores are mean probabilities of several views, kept as their log. Returns the
        pixels taken. A ground-truth class outside [0, C) on a sampled pixel is a ValueError."""
        if logits.ndim != 3 or logits.shape[0] != self.num_classes:
            raise ValueError(f"LogitSample.add: expected logits ({self.num_classes}, H, W), "
                             f"got {tuple(logits.shape)}")
        truth = _as_numpy(ground_truth)
        if truth.shape != tuple(logits.shape[1:]):
            raise ValueError(f"LogitSample.add: ground truth {truth.shape} and logits "
                             f"{tuple(logits.shape[1:])} differ in size")
        if index < 0:
            raise ValueError(f"LogitSample.add: image index {index} is negative")
        truth = truth.reshape(-1)
        valid = np.flatnonzero(truth != self.ignore_index)
        take = min(self.quota, valid.size, self.max_pixels - self.size)
        if take <= 0:
            return 0
        if take < valid.size:
            rng = np.random.default_rng([self.seed, index])
            valid = np.sort(rng.choice(valid, size=take, replace=False))
        labels = truth[valid].astype(np.int64)
        if int(labels.min()) < 0 or int(labels.max()) >= self.num_classes:
            raise ValueError(f"LogitSample.add: ground-truth classes outside "
                             f"[0, {self.num_classes}) other than {self.ignore_index}")
        chosen = torch.from_numpy(valid).to(logits.device)
        rows = logits.detach().reshape(self.num_classes, -1).index_select(1, chosen)
        if are_probabilities:  # averaged views: their log, on the sampled pixels only
            rows = rows.clamp_min(torch.finfo(rows.dtype).tiny).log()
        self._logits[self.size: self.size + take] = rows.t().to("cpu", torch.float32)
        self._labels[self.size: self.size + take] = torch.from_numpy(labels)
        self.size += take
        return take


MAX_TEMPERATURE = 100.0
"""The fitted temperature is kept in [1/100, 100] (a degenerate sample's optimum is 0 or
infinite)."""


@dataclass(frozen=True)
class TemperatureFit:
    """The fitted temperature and the sample's mean NLL (nats) and ECE at T = 1 and at it."""

    temperature: float
    nll_before: float
    nll_after: float
    ece_before: float
    ece_after: float
    pixels: int


def fit_temperature(sample: LogitSample, max_iter: int = 50,
                    bins: int = ECE_BINS) -> TemperatureFit:
    """The T > 0 minimising the mean NLL of softmax(logits / T) over the sample (Guo et al.).

    L-BFGS (strong Wolfe line search, at most `max_iter` iterations) on log T, which keeps T
    positive, from T = 1, in float64 over chunks of the sample (gradients summed chunk by
    chunk, so temporaries stay small), then kept within [1/MAX_TEMPERATURE, MAX_TEMPERATURE].
    Deterministic: the same sample gives the same T bit for bit. ECE before and after uses `bins` bins on the same pixels. An empty sample is a
    ValueError.
    """
    logits, labels = sample.logits, sample.labels
    if len(labels) == 0:
        raise ValueError("fit_temperature: the logit sample is empty (no pixel outside the "
                         "ignore label was added)")
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter,
                                  line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        total = torch.zeros((), dtype=torch.float64)
        for start in range(0, len(labels), _FIT_ROWS):
            z = logits[start: start + _FIT_ROWS].double()
            y = labels[start: start + _FIT_ROWS, None]
            nll = -torch.log_softmax(z * torch.exp(-log_t), dim=1).gather(1, y).sum()
            (nll / len(labels)).backward()
            total += nll.detach()
        return total / len(labels)

    nll_before = float(closure())
    optimizer.step(closure)
    fitted = float(torch.exp(log_t.detach()))
    # a sample the model gets all right (or all wrong) has its optimum at T -> 0 (or infinity):
    # keep T where it means something, and where export.temperature accepts it
    temperature = min(max(fitted, 1 / MAX_TEMPERATURE), MAX_TEMPERATURE) \
        if math.isfinite(fitted) else MAX_TEMPERATURE
    with torch.no_grad():
        log_t.fill_(math.log(temperature))
    nll_after = float(closure())  # at the final log T itself
    return TemperatureFit(temperature, nll_before, nll_after,
                          _sample_ece(logits, labels, 1.0, sample.num_classes, bins),
                          _sample_ece(logits, labels, temperature, sample.num_classes, bins),
                          len(labels))


def _sample_ece(logits: torch.Tensor, labels: torch.Tensor, temperature: float,
                num_classes: int, bins: int) -> float:
    accumulator = ECEAccumulator(num_classes, bins)
    for start in range(0, len(labels), _FIT_ROWS):
        z = logits[start: start + _FIT_ROWS].double()
        confidence, prediction = torch.softmax(z / temperature, dim=1).max(dim=1)
        accumulator.add(confidence, prediction, labels[start: start + _FIT_ROWS])
    return accumulator.result()["ece"]


# --- confidence and entropy images ---------------------------------------------------------

def _png_scale(bits: int) -> tuple[int, type[np.unsignedinteger]]:
    if bits == 8:
        return 255, np.uint8
    if bits == 16:
        return 65535, np.uint16
    raise ValueError(f"bits must be 8 or 16, got {bits}")


def _quantise(values01: np.ndarray, bits: int, what: str) -> np.ndarray:
    top, dtype = _png_scale(bits)
    values = _as_numpy(values01).astype(np.float64)
    if np.isnan(values).any():
        raise ValueError(f"{what}: NaN values cannot be stored in a PNG")
    np.clip(values, 0.0, 1.0, out=values)
    values *= top
    return np.rint(values, out=values).astype(dtype)


def confidence_png(confidence: np.ndarray | torch.Tensor, bits: int) -> np.ndarray:
    """A confidence map (H, W) as PNG samples: v = round(clip(c, 0, 1) * (2^bits - 1)), round
    half to even, uint8 for bits 8, uint16 for bits 16. Invert with c = v / (2^bits - 1)
    (`decode_confidence`), exact to half a step (1/510 at 8 bits, 1/131070 at 16)."""
    return _quantise(confidence, bits, "confidence_png")


def decode_confidence(png: np.ndarray, bits: int) -> np.ndarray:
    """float32 confidences from `confidence_png`'s samples: v / (2^bits - 1)."""
    top, _ = _png_scale(bits)
    return (np.asarray(png, np.float64) / top).astype(np.float32)


def entropy_png(entropy: np.ndarray | torch.Tensor, num_classes: int, bits: int) -> np.ndarray:
    """An entropy map (H, W, nats) as PNG samples: v = round(clip(H / ln(num_classes), 0, 1)
    * (2^bits - 1)), round half to even, uint8 for bits 8, uint16 for bits 16: 0 is certain,
    2^bits - 1 uniform over the classes. Invert with H = v / (2^bits - 1) * ln(num_classes)
    nats (`decode_entropy`), exact to half a step."""
    if num_classes < 2:
        raise ValueError(f"entropy_png: num_classes must be at least 2, got {num_classes}")
    return _quantise(_as_numpy(entropy).astype(np.float64) / math.log(num_classes), bits,
                     "entropy_png")


def decode_entropy(png: np.ndarray, num_classes: int, bits: int) -> np.ndarray:
    """float32 entropies in nats from `entropy_png`'s samples."""
    top, _ = _png_scale(bits)
    return (np.asarray(png, np.float64) / top * math.log(num_classes)).astype(np.float32)


def write_confidence_png(path: str | Path, confidence: np.ndarray | torch.Tensor,
                         bits: int) -> None:
    """`confidence_png` written as a grey PNG (8- or 16-bit), atomically."""
    write_label_png(path, confidence_png(confidence, bits))


def write_entropy_png(path: str | Path, entropy: np.ndarray | torch.Tensor, num_classes: int,
                      bits: int) -> None:
    """`entropy_png` written as a grey PNG (8- or 16-bit), atomically."""
    write_label_png(path, entropy_png(entropy, num_classes, bits))


HEAT_COLORMAP = "cividis"
"""matplotlib's colormap for `heat_colors`: perceptually uniform and readable by people with
colour-vision deficiency."""


@functools.cache
def _heat_table() -> np.ndarray:
    """uint8 (257, 3): the colormap at 256 evenly spaced points, then black for NaN."""
    from matplotlib import colormaps  # not pyplot: only the lookup table is needed

    table = colormaps[HEAT_COLORMAP].resampled(256)(np.arange(256))[:, :3]
    colors = np.rint(table * 255).astype(np.uint8)
    return np.concatenate([colors, np.zeros((1, 3), np.uint8)])


def heat_colors(values01: np.ndarray | torch.Tensor) -> np.ndarray:
    """uint8 RGB (..., 3) of values in [0, 1] (clipped) through `HEAT_COLORMAP`: entry
    round(v * 255) of its 256-colour table; NaN is black, for pixels without a value."""
    values = _as_numpy(values01).astype(np.float32)
    index = np.rint(np.clip(values, 0.0, 1.0) * 255)
    index = np.where(np.isnan(values), 256, index).astype(np.intp)
    return _heat_table()[index]
