"""fcn.png reads every PNG exactly as PIL does, fast for fcn.png's Up-filtered masks."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from fcn.png import encode_png
from fcn.png import PngError, read_png_array


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_with_filters(array: np.ndarray, filters: np.ndarray) -> bytes:
    """A grey PNG whose row filters are the given None(0)/Sub(1)/Up(2) types."""
    depth = 16 if array.dtype == np.uint16 else 8
    rows = array.astype(">u2").view(np.uint8) if depth == 16 else array
    rows = rows.reshape(array.shape[0], -1).astype(np.int16)
    bpp = depth // 8
    out = []
    for y, kind in enumerate(filters):
        row = rows[y]
        if kind == 1:
            left = np.concatenate([np.zeros(bpp, np.int16), row[:-bpp]])
            row = row - left
        elif kind == 2:
            row = row - (rows[y - 1] if y else 0)
        out.append(np.concatenate([[kind], row]).astype(np.int16) % 256)
    raw = np.stack(out).astype(np.uint8).tobytes()
    header = struct.pack(">IIBBBBB", array.shape[1], array.shape[0], depth, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header)
            + _chunk(b"IDAT", zlib.compress(raw)) + _chunk(b"IEND", b""))


@pytest.fixture
def labels() -> np.ndarray:
    rng = np.random.default_rng(0)
    cells = rng.integers(0, 34, (6, 9), dtype=np.uint8)
    return np.repeat(np.repeat(cells, 7, axis=0), 5, axis=1)  # 42x45, blocky like a mask


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_none_sub_up_filters_decode_exactly(tmp_path, labels, dtype):
    array = labels.astype(dtype) * (1000 if dtype == np.uint16 else 1) + 7
    filters = np.random.default_rng(1).integers(0, 3, array.shape[0])
    path = tmp_path / "x.png"
    path.write_bytes(png_with_filters(array, filters))
    decoded, mode = read_png_array(path)
    assert decoded.dtype == dtype and np.array_equal(decoded, np.asarray(Image.open(path)))
    assert np.array_equal(decoded, array)
    assert mode == ("I;16" if dtype == np.uint16 else "L")


@pytest.mark.parametrize("writer", ["fcn.png", "PIL"])
@pytest.mark.parametrize("mode", ["L", "I;16", "P", "RGB", "RGBA", "1"])
def test_same_array_as_pil(tmp_path, labels, writer, mode):
    if mode == "I;16":
        image = Image.fromarray(labels.astype(np.uint16) * 1001)
    elif mode == "P":
        image = Image.fromarray(labels).convert("P")
    elif mode in ("RGB", "RGBA"):
        image = Image.fromarray(np.stack([labels] * len(mode), axis=-1))
    elif mode == "1":
        image = Image.fromarray(labels > 10)
    else:
        image = Image.fromarray(labels)
    path = tmp_path / "x.png"
    if writer == "fcn.png" and mode in ("L", "I;16"):
        path.write_bytes(encode_png(np.asarray(image)))
    else:
        image.save(path)
    decoded, decoded_mode = read_png_array(path)
    reference = Image.open(path)
    assert decoded_mode == reference.mode
    assert np.array_equal(decoded, np.asarray(reference))


def test_broken_files(tmp_path, labels):
    data = encode_png(labels)
    path = tmp_path / "x.png"
    path.write_bytes(data[:-30])
    with pytest.raises(PngError, match="truncated"):
        read_png_array(path)
    broken = bytearray(data)
    broken[45] ^= 0xFF  # inside IDAT
    path.write_bytes(bytes(broken))
    with pytest.raises(PngError, match="CRC error in IDAT"):
        read_png_array(path)
    with pytest.raises(FileNotFoundError):
        read_png_array(tmp_path / "missing.png")
    path.write_bytes(b"JFIF not a png")
    with pytest.raises(OSError):
        read_png_array(path)


# --- 16-bit images read as their 8-bit twins (issue 20) -----------------------------------------

def _png16(path, array):
    """A 16-bit PNG (grey or RGB) written by hand: PIL cannot write 16-bit RGB."""
    height, width = array.shape[:2]
    color = 0 if array.ndim == 2 else 2
    rows = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    path.write_bytes(b"\x89PNG\r\n\x1a\n"
                     + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, color, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    return path


def test_a_16_bit_grey_image_reads_like_its_16_bit_rgb_twin(tmp_path):
    import torch

    from fcn.images import read_rgb, read_tensor

    values = np.array([[0, 255, 256, 1000], [40000, 65535, 512, 7]], np.uint16)
    grey = _png16(tmp_path / "grey.png", values)
    rgb = _png16(tmp_path / "rgb.png", np.repeat(values[..., None], 3, axis=2))
    expected = np.repeat((values >> 8).astype(np.uint8)[..., None], 3, axis=2)
    assert np.array_equal(read_rgb(rgb), expected)  # PIL's own rule for 16-bit RGB
    assert np.array_equal(read_rgb(grey), expected)  # was 255 wherever a value was above 255
    Image.fromarray(np.full((8, 8), 1000, np.uint16)).save(tmp_path / "g.png")  # the issue's
    assert (read_rgb(tmp_path / "g.png") == 3).all()
    for path in (grey, rgb):  # the training reader (torchvision returns uint16 for these)
        tensor = read_tensor(path, 3)
        assert tensor.dtype == torch.uint8
        assert np.array_equal(tensor.permute(1, 2, 0).numpy(), expected)


def test_a_floating_point_image_is_refused_in_one_line(tmp_path):
    from fcn.errors import DataError
    from fcn.images import read_rgb

    Image.fromarray(np.full((4, 4), 0.5, np.float32)).save(tmp_path / "f.tif")
    with pytest.raises(DataError, match=r"f\.tif: image is a floating-point image \(mode F\)"):
        read_rgb(tmp_path / "f.tif")
