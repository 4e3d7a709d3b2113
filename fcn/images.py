"""Reading and writing image files: the one place that maps a bad file to a DataError.

Every reader names the file and what it was expected to be ("image", "prediction",
"ground-truth labelIds", …): a missing file is `<path>: <what> file not found`, an unreadable
one `<path>: cannot read <what> (<reason>)`. Label PNGs go through `fcn.png`'s fast reader
(identical arrays to PIL), photos through PIL, training images through torchvision's decoder,
which returns the CHW tensor the transforms want.

Every reader takes `max_pixels` (the `data.max_pixels` parameter; default MAX_PIXELS) and
checks the width x height in the file's header against it before a pixel is decoded: a
20-byte header can claim 200000x200000 pixels, and decoding it would allocate 40 GB before
anything else noticed. PNG headers are parsed here (`fcn.png.png_size`, the first 33 bytes),
so PIL never opens an oversize PNG; other formats are checked on PIL's lazily opened image,
which has read only its header. PIL's own decompression-bomb guard (a fixed ~179 M pixels) is
mapped to the same one-line error.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Final

import numpy as np
from PIL import Image, ImageOps

from fcn.atomic import atomic_path, write_bytes
from fcn.errors import DataError
from fcn.png import HEADER_BYTES, decode_png_array, encode_png, png_size

if TYPE_CHECKING:  # torch is imported where tensors are read: the masks stage never needs it
    import torch

ORIENTATION: Final = 0x0112
"""The EXIF tag of a photo's orientation (1 = as stored)."""

MAX_PIXELS: Final = 2**26
"""The default of every reader's `max_pixels` and of `data.max_pixels` (fcn.params, which
does not import this module; tests hold the two equal): 67 M pixels, 32 Cityscapes frames
(2048x1024). At the limit one masks-stage worker peaks near 1.1 GB (rendering and encoding
all four encodings takes about 17 bytes per pixel); whole-image inference needs far more, which
slide mode bounds."""

IMAGE_SUFFIXES: Final = (".png", ".jpg", ".jpeg")
"""What counts as an image file in a folder of inputs (folder prediction, frames of a video)."""


@contextlib.contextmanager
def reading(path: str | Path, what: str) -> Iterator[None]:
    """Turn the errors of reading `path` into one DataError line naming it."""
    try:
        yield
    except FileNotFoundError:
        raise DataError(f"{path}: {what} file not found") from None
    except (OSError, ValueError, SyntaxError, RuntimeError, Image.DecompressionBombError) as exc:
        raise DataError(f"{path}: cannot read {what} ({exc})") from None


def check_pixels(path: str | Path, what: str, size: tuple[int, int], max_pixels: int) -> None:
    """Refuse a (width, height) read from `path` whose area exceeds `max_pixels`: call it
    before allocating anything that scales with the size (the one place this rule lives)."""
    width, height = size
    if width * height > max_pixels:
        raise DataError(f"{path}: {what} is {width}x{height} ({width * height} pixels), more "
                        f"than the limit of {max_pixels} pixels (data.max_pixels)")


@contextlib.contextmanager
def _open_image(path: str | Path, what: str, max_pixels: int) -> Iterator[Image.Image]:
    """PIL's lazily opened image (header read, no pixel decoded yet), its size checked; the
    block's read errors become one DataError line too."""
    with reading(path, what):
        with open(path, "rb") as file:
            size = png_size(file.read(HEADER_BYTES))
        if size is not None:  # a PNG: checked before PIL (and its bomb guard) sees it
            check_pixels(path, what, size, max_pixels)
        with Image.open(path) as image:
            check_pixels(path, what, image.size, max_pixels)
            yield image


SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
"""PIL's modes of 16-bit (and 32-bit integer) greyscale images."""


def to_8_bits(values: np.ndarray, path: str | Path, what: str) -> np.ndarray:
    """16-bit samples as 8-bit ones, keeping the high byte: what PIL and every decoder do for
    16-bit RGB, so a 16-bit greyscale image reads like its RGB twin (PIL's convert("RGB")
    clips a 16-bit grey to 255 instead: a 16-bit image of value 1000 read as pure white)."""
    if values.size and (int(values.min()) < 0 or int(values.max()) > 65535):
        raise DataError(f"{path}: {what} holds values outside 0..65535 "
                        f"({int(values.min())}..{int(values.max())}); expected an 8- or 16-bit "
                        "image")
    return (values.astype(np.uint32) >> 8).astype(np.uint8)


def read_rgb(path: str | Path, what: str = "image", max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """An image file as uint8 RGB (H, W, 3), the way viewers show it (its EXIF orientation
    applied: phone photos); refused above `max_pixels` before decoding. 16-bit images keep
    their high byte (`to_8_bits`); floating-point ones are refused."""
    with _open_image(path, what, max_pixels) as opened:
        image = ImageOps.exif_transpose(opened) if _rotated(opened) else opened
        if image.mode in SIXTEEN_BIT_MODES:
            grey = to_8_bits(np.asarray(image), path, what)
            return np.repeat(grey[..., None], 3, axis=2)
        if image.mode == "F":
            raise DataError(f"{path}: {what} is a floating-point image (mode F); expected an "
                            "8- or 16-bit image")
        return np.asarray(image.convert("RGB"))


def read_labels(path: str | Path, what: str, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """A single-channel label PNG as an integer array (H, W); refused above `max_pixels`
    before decoding."""
    with reading(path, what):
        with open(path, "rb") as file:
            head = file.read(HEADER_BYTES)
            size = png_size(head)
            if size is not None:
                check_pixels(path, what, size, max_pixels)
                data = head + file.read()
        if size is None:  # not a PNG: PIL reads it, once its header's size has passed
            with Image.open(path) as image:
                check_pixels(path, what, image.size, max_pixels)
                array, mode = np.asarray(image), image.mode
        else:
            array, mode = decode_png_array(data)
    if array.ndim != 2:
        raise DataError(f"{path}: {what} has {array.shape[-1]} channels (mode {mode}); expected "
                        "one channel of label ids")
    if mode == "P":
        raise DataError(f"{path}: {what} is a palette image (mode P, colours), not a grey image "
                        "of label ids")
    if array.dtype == bool:
        array = array.astype(np.uint8)
    if not np.issubdtype(array.dtype, np.integer):
        raise DataError(f"{path}: {what} holds {array.dtype} values; expected integer label ids")
    return array


def read_rgba(path: str | Path, what: str, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """An image file as uint8 RGBA (H, W, 4) (color masks); refused above `max_pixels`
    before decoding."""
    with _open_image(path, what, max_pixels) as image:
        return np.asarray(image if image.mode == "RGBA" else image.convert("RGBA"))


def _rotated(image: Image.Image) -> bool:
    """Whether the image's EXIF orientation turns or mirrors it (2..8)."""
    try:
        return image.getexif().get(ORIENTATION, 1) not in (1, None)
    except Exception:  # noqa: BLE001 - a damaged EXIF block: show the pixels as stored
        return False


def read_size(path: str | Path, what: str = "image",
              max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """(width, height) as `read_rgb` returns the image (its EXIF orientation applied), from
    the file's header, without decoding the pixels; a file that does not open as an image, or
    is larger than `max_pixels`, is a DataError (the cheap check of every input before work)."""
    with _open_image(path, what, max_pixels) as image:
        width, height = image.size
        if _rotated(image) and image.getexif().get(ORIENTATION) in (5, 6, 7, 8):
            return height, width  # turned by 90 degrees
        return width, height


def read_tensor(path: str | Path, channels: int, what: str = "image",
                max_pixels: int = MAX_PIXELS) -> torch.Tensor:
    """uint8[channels, H, W] of a PNG file (torchvision's decoder; 3 = RGB, 1 = grey; 16-bit
    files keep their high byte, as `read_rgb`); refused above `max_pixels` before decoding.

    torchvision 0.29 marks its decoders deprecated in favour of TorchCodec, which is not a
    dependency here; the warning is silenced at this one call until we switch.
    """
    from torchvision.io import ImageReadMode, decode_png, read_file

    import torch

    mode = {3: ImageReadMode.RGB, 1: ImageReadMode.GRAY}[channels]
    with reading(path, what), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The image decoding", DeprecationWarning)
        data = read_file(str(path))
        size = png_size(data[:HEADER_BYTES].numpy().tobytes())
        if size is not None:  # not a PNG: decode_png refuses it
            check_pixels(path, what, size, max_pixels)
        tensor = decode_png(data, mode=mode)
    if tensor.dtype == torch.uint16:  # a 16-bit PNG: its high byte, as read_rgb keeps it
        tensor = (tensor.to(torch.int32) >> 8).to(torch.uint8)
    return tensor


def write_png(path: str | Path, array: np.ndarray, compress_level: int = 6) -> None:
    """A photo-like uint8 array (overlays, panels) as PNG through PIL, atomically."""
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, compress_level=compress_level)


def write_label_png(path: str | Path, labels: np.ndarray) -> None:
    """A label map (uint8/uint16 grey, uint8 RGBA) through `fcn.png`, atomically."""
    write_bytes(path, encode_png(labels))
