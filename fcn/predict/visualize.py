"""Pictures of predictions: label colors, overlays, side-by-side samples, heatmap, GIF.

All functions take and return uint8 arrays (or write a file atomically), so stages can stream
images through them one at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from fcn.atomic import atomic_path
from fcn.cityscapes.labels import CLASS_NAMES, ID_TO_TRAINID, TRAINID_TO_COLOR


def spread(count: int, k: int) -> list[int]:
    """Up to `k` indices spread evenly over `count` items (first and last included): which
    images to show, the same ones every run."""
    if k <= 0 or count == 0:
        return []
    return sorted({round(float(i)) for i in np.linspace(0, count - 1, min(k, count))})


def colorize(train_ids: np.ndarray) -> np.ndarray:
    """uint8 (H, W) trainIds → (H, W, 3) label colors; ignore (255) is black."""
    return TRAINID_TO_COLOR[train_ids]


def colorize_label_ids(label_ids: np.ndarray) -> np.ndarray:
    """Ground-truth label ids shown as the model sees them: evaluated classes in their colors,
    everything not evaluated black, so truth and prediction panels compare directly."""
    return TRAINID_TO_COLOR[ID_TO_TRAINID[label_ids]]


def blend(image: np.ndarray, colors: np.ndarray, alpha: float) -> np.ndarray:
    """(1 - alpha) * image + alpha * colors, as uint8."""
    mixed = (1 - alpha) * image.astype(np.float32) + alpha * colors.astype(np.float32)
    return np.clip(mixed + 0.5, 0, 255).astype(np.uint8)


def resize_to_width(array: np.ndarray, width: int, labels: bool = False) -> np.ndarray:
    """Downscale (never up) keeping the aspect ratio; label maps use nearest neighbour."""
    height, old_width = array.shape[:2]
    if old_width <= width:
        return array
    new_height = max(1, round(height * width / old_width))
    resample = Image.Resampling.NEAREST if labels else Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(array).resize((width, new_height), resample))


def side_by_side(panels: Sequence[np.ndarray], gap: int = 4) -> np.ndarray:
    """RGB panels of equal height in one row, separated by white gaps."""
    height = panels[0].shape[0]
    parts: list[np.ndarray] = []
    for panel in panels:
        if parts:
            parts.append(np.full((height, gap, 3), 255, np.uint8))
        parts.append(panel)
    return np.concatenate(parts, axis=1)


def sample_panel(image: np.ndarray, ground_truth_ids: np.ndarray, prediction: np.ndarray,
                 width: int) -> np.ndarray:
    """image | ground truth | prediction, each downscaled to `width` pixels wide."""
    return side_by_side([
        resize_to_width(image, width),
        resize_to_width(colorize_label_ids(ground_truth_ids), width, labels=True),
        resize_to_width(colorize(prediction), width, labels=True),
    ])


def write_gif(path: str | Path, frames: Sequence[np.ndarray], ms_per_frame: int) -> None:
    """An endlessly looping animated GIF; frames of other sizes are padded to the first's."""
    height, width = frames[0].shape[:2]
    images = []
    for frame in frames:
        canvas = np.zeros((height, width, 3), np.uint8)
        h, w = min(height, frame.shape[0]), min(width, frame.shape[1])
        canvas[:h, :w] = frame[:h, :w]
        images.append(Image.fromarray(canvas))
    with atomic_path(path) as tmp:
        images[0].save(tmp, save_all=True, append_images=images[1:], duration=ms_per_frame,
                       loop=0, optimize=False)


def confusion_heatmap(path: str | Path, matrix: np.ndarray,
                      names: Sequence[str] = CLASS_NAMES) -> None:
    """A PNG heatmap of pixel counts normalised per ground-truth class (rows sum to 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = np.asarray(matrix, dtype=np.float64)
    rows = counts.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        normalised = np.where(rows > 0, counts / np.maximum(rows, 1), np.nan)
    size = len(names)
    fig, ax = plt.subplots(figsize=(0.45 * size + 3, 0.45 * size + 2), dpi=100)
    shown = ax.imshow(normalised, cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(size), names, rotation=90)
    ax.set_yticks(range(size), names)
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    ax.set_title("Confusion: % of each ground-truth class's pixels")
    for i in range(size):
        for j in range(size):
            value = normalised[i, j]
            if value >= 0.005:
                ax.text(j, i, f"{100 * value:.0f}", ha="center", va="center", fontsize=6,
                        color="black" if value > 0.5 else "white")
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)
