"""A fast lossless PNG encoder for label masks (8-bit grey, 16-bit grey, 8-bit RGBA).

Why not PIL's encoder: it tries the PNG filters on every row and deflates with zlib at level
6, so writing the four masks of a 1024x2048 image takes ~240 ms, several times everything else
the masks stage does. Label masks are large flat regions, so one fixed filter does well: 'Up'
(each byte minus the byte above it) turns everything but the pixels just below a boundary into
zeros. The deflate stream comes from ISA-L (`isal`, level 1), which compresses such data at
GB/s where zlib manages a few hundred MB/s. Measured on realistic 1024x2048 masks (150
polygons): 8 ms instead of 241 ms for the four masks, 297 kB instead of 214 kB. The output is
a standard PNG (one IDAT) that any reader opens, PIL and therefore cityscapesScripts
included; tests read each kind back and compare arrays.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np
from isal import isal_zlib

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_FILTER_UP = 2
_LEVEL = 1


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode_png(array: np.ndarray) -> bytes:
    """PNG bytes of uint8[H, W] (grey), uint16[H, W] (16-bit grey) or uint8[H, W, 4] (RGBA)."""
    if array.ndim == 2 and array.dtype == np.uint8:
        color_type, depth, rows = 0, 8, array
    elif array.ndim == 2 and array.dtype == np.uint16:
        color_type, depth, rows = 0, 16, array.astype(">u2", copy=False).view(np.uint8)
    elif array.ndim == 3 and array.shape[2] == 4 and array.dtype == np.uint8:
        color_type, depth, rows = 6, 8, array
    else:
        raise ValueError(f"encode_png: unsupported array {array.dtype}{list(array.shape)}; "
                         "expected uint8[H,W], uint16[H,W] or uint8[H,W,4]")
    height, width = array.shape[:2]
    if height == 0 or width == 0:
        raise ValueError("encode_png: an image needs at least one pixel")
    rows = np.ascontiguousarray(rows).reshape(height, -1)
    filtered = np.empty((height, rows.shape[1] + 1), np.uint8)
    filtered[:, 0] = _FILTER_UP
    filtered[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])  # wraps modulo 256, as PNG wants
    idat = isal_zlib.compress(filtered, _LEVEL)
    header = struct.pack(">IIBBBBB", width, height, depth, color_type, 0, 0, 0)
    return _SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")
