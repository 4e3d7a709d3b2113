"""Reading and writing image files: the one place that maps a bad file to a DataError.

Every reader names the file and what it was expected to be ("image", "prediction",
"ground-truth labelIds", …): a missing file is `<path>: <what> file not found`, an unreadable
one `<path>: cannot read <what> (<reason>)`. Label PNGs go through `fcn.png`'s fast reader
(identical arrays to PIL), photos through PIL, training images through torchvision's decoder,
which returns the CHW tensor the transforms want.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from fcn.atomic import atomic_path, write_bytes
from fcn.errors import DataError
from fcn.png import encode_png, read_png_array

if TYPE_CHECKING:  # torch is imported where tensors are read: the masks stage never needs it
    import torch

@contextlib.contextmanager
def reading(path: str | Path, what: str) -> Iterator[None]:
    """Turn the errors of reading `path` into one DataError line naming it."""
    try:
        yield
    except FileNotFoundError:
        raise DataError(f"{path}: {what} file not found") from None
    except (OSError, ValueError, SyntaxError, RuntimeError) as exc:
        raise DataError(f"{path}: cannot read {what} ({exc})") from None


def read_rgb(path: str | Path, what: str = "image") -> np.ndarray:
    """An image file as uint8 RGB (H, W, 3)."""
    with reading(path, what), Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def read_labels(path: str | Path, what: str) -> np.ndarray:
    """A single-channel label PNG as an integer array (H, W)."""
    with reading(path, what):
        array, mode = read_png_array(path)
    if array.ndim != 2:
        raise DataError(f"{path}: {what} has {array.shape[-1]} channels (mode {mode}); expected "
                        "one channel of label ids")
    if array.dtype == bool:
        array = array.astype(np.uint8)
    if not np.issubdtype(array.dtype, np.integer):
        raise DataError(f"{path}: {what} holds {array.dtype} values; expected integer label ids")
    return array


def read_rgba(path: str | Path, what: str) -> np.ndarray:
    """An image file as uint8 RGBA (H, W, 4) (color masks)."""
    with reading(path, what), Image.open(path) as image:
        return np.asarray(image if image.mode == "RGBA" else image.convert("RGBA"))


def read_size(path: str | Path, what: str = "image") -> tuple[int, int]:
    """(width, height) from the file's header, without decoding the pixels."""
    with reading(path, what), Image.open(path) as image:
        return image.size


def read_tensor(path: str | Path, channels: int, what: str = "image") -> torch.Tensor:
    """uint8[channels, H, W] of a PNG file (torchvision's decoder; 3 = RGB, 1 = grey).

    torchvision 0.29 marks its decoders deprecated in favour of TorchCodec, which is not a
    dependency here; the warning is silenced at this one call until we switch.
    """
    from torchvision.io import ImageReadMode, decode_png, read_file

    mode = {3: ImageReadMode.RGB, 1: ImageReadMode.GRAY}[channels]
    with reading(path, what), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The image decoding", DeprecationWarning)
        return decode_png(read_file(str(path)), mode=mode)


def write_png(path: str | Path, array: np.ndarray, compress_level: int = 6) -> None:
    """A photo-like uint8 array (overlays, panels) as PNG through PIL, atomically."""
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, compress_level=compress_level)


def write_label_png(path: str | Path, labels: np.ndarray) -> None:
    """A label map (uint8/uint16 grey, uint8 RGBA) through `fcn.png`, atomically."""
    write_bytes(path, encode_png(labels))
