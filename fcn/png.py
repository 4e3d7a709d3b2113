"""The PNG codec for label masks: a fast encoder and a fast reader (PIL for everything else).

Writing: PIL's encoder tries every PNG filter on every row and deflates with zlib at level 6,
which for a full-size image's four masks costs more than everything else the masks stage does.
Label masks are large flat regions, so one fixed filter does well: 'Up' (each byte minus the
byte above it) turns everything but the pixels just below a boundary into zeros, and ISA-L
(`isal`, level 1) deflates that many times faster than zlib, for files somewhat larger than
PIL's. The output is a standard PNG (one IDAT) that any reader opens, PIL and therefore
cityscapesScripts included; tests read each kind back and compare arrays.

Reading: scoring an image reads three PNGs (prediction, labelIds, instanceIds), and PIL's
decoding of them costs about as much as the scoring. Files that use only the None/Sub/Up
filters (ours) undo with one vectorised add per row after an ISA-L inflate. Files with other
filters (PIL picks 'Paeth' for many rows; the masks shipped with real Cityscapes were written
by PIL), colour images, other bit depths or interlacing are read by PIL instead, so every
valid PNG reads, and reads identically. `benchmarks/masks_speed.py` and
`benchmarks/evaluate_speed.py` measure both sides (docs/performance.md).
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from isal import isal_zlib
from PIL import Image

SIGNATURE = b"\x89PNG\r\n\x1a\n"
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
    return SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


# --- reading --------------------------------------------------------------------------------


_GREY, _PALETTE = 0, 3
_NONE, _SUB, _UP = 0, 1, 2


class PngError(ValueError):
    """The file is not a well-formed PNG (callers add the file name)."""


def _chunks(data: bytes) -> tuple[bytes, list[bytes]]:
    """The IHDR payload and the IDAT payloads, each chunk's CRC checked."""
    if not data.startswith(SIGNATURE):
        raise PngError("not a PNG file (bad signature)")
    header, idat, pos = b"", [], len(SIGNATURE)
    while pos + 12 <= len(data):
        (length,) = struct.unpack_from(">I", data, pos)
        end = pos + 12 + length
        if end > len(data):
            raise PngError("truncated chunk")
        kind = data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        if zlib.crc32(kind + body) != struct.unpack_from(">I", data, pos + 8 + length)[0]:
            raise PngError(f"broken data stream: CRC error in {kind.decode('latin-1')} chunk")
        if kind == b"IHDR":
            if pos != len(SIGNATURE):  # the size checked before decoding is the first's
                raise PngError("malformed PNG: an IHDR chunk that is not the first chunk")
            header = body
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            return header, idat
        pos = end
    raise PngError("truncated file (no IEND chunk)")


def _unfilter(rows: np.ndarray, bytes_per_pixel: int) -> np.ndarray | None:
    """Undo None/Sub/Up filters row by row; None if any row uses Average or Paeth."""
    filters = rows[:, 0]
    if (filters > _UP).any():
        return None
    body = rows[:, 1:]
    out = np.empty_like(body)
    previous = np.zeros(body.shape[1], np.uint8)
    for y, kind in enumerate(filters.tolist()):
        row = out[y]
        if kind == _UP:
            np.add(previous, body[y], out=row)
        elif kind == _NONE:
            row[:] = body[y]
        else:  # Sub: running sum of the byte one pixel to the left, per byte lane
            lanes = body[y].reshape(-1, bytes_per_pixel)
            np.cumsum(lanes, axis=0, dtype=np.uint8, out=row.reshape(-1, bytes_per_pixel))
        previous = row
    return out


HEADER_BYTES = len(SIGNATURE) + 8 + 13 + 4
"""The signature and the IHDR chunk, which the PNG standard puts first: all `png_size` needs."""


def png_size(head: bytes) -> tuple[int, int] | None:
    """(width, height) from the IHDR chunk at the start of `head` (the file's first
    HEADER_BYTES bytes or more); None when `head` is not a PNG. Decodes nothing, so callers
    can check the size before anything that scales with it is allocated."""
    if not head.startswith(SIGNATURE):
        return None
    if len(head) < HEADER_BYTES or head[12:16] != b"IHDR":
        raise PngError("truncated file or missing IHDR chunk")
    (length,) = struct.unpack_from(">I", head, 8)
    if length != 13:
        raise PngError(f"malformed IHDR chunk ({length} bytes, 13 expected)")
    if zlib.crc32(head[12:29]) != struct.unpack_from(">I", head, 29)[0]:
        raise PngError("broken data stream: CRC error in IHDR chunk")
    width, height = struct.unpack_from(">II", head, 16)
    return width, height


def _decode_fast(data: bytes) -> tuple[np.ndarray, str] | None:
    """uint8/uint16 (H, W) for non-interlaced 8-bit grey/palette or 16-bit grey PNGs with
    None/Sub/Up filters, with its mode; None when the file needs the general decoder.

    The image data is inflated to at most the size the header declares (plus one byte, to
    detect more): a small file whose data inflates to gigabytes (a "zip bomb") is refused
    without that memory being allocated.
    """
    header, idat = _chunks(data)
    if len(header) != 13:
        raise PngError("missing or malformed IHDR chunk")
    width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", header)
    if interlace or not ((color in (_GREY, _PALETTE) and depth == 8)
                         or (color == _GREY and depth == 16)):
        return None
    bytes_per_pixel = depth // 8
    stride = 1 + width * bytes_per_pixel
    expected = height * stride
    inflater = isal_zlib.decompressobj()
    try:
        raw = inflater.decompress(b"".join(idat), expected + 1)
    except Exception as exc:  # noqa: BLE001 - isal and zlib raise different types
        raise PngError(f"broken data stream ({exc})") from None
    if len(raw) > expected:
        raise PngError(f"image data inflates to more than the {height}x{stride} bytes its "
                       "header declares")
    if len(raw) != expected:
        raise PngError(f"image data has {len(raw)} bytes, {height}x{stride} expected")
    if not inflater.eof:
        raise PngError("broken data stream (incomplete or truncated)")
    pixels = _unfilter(np.frombuffer(raw, np.uint8).reshape(height, stride), bytes_per_pixel)
    if pixels is None:
        return None
    if depth == 16:
        return pixels.view(">u2").astype(np.uint16), "I;16"
    return pixels, ("P" if color == _PALETTE else "L")


def decode_png_array(data: bytes) -> tuple[np.ndarray, str]:
    """The pixel array of an image file's bytes and its PIL-style mode ('L', 'P', 'I;16' on
    the fast path). Single-channel label PNGs take the fast path; anything else goes through
    PIL, so the array always equals `np.asarray(Image.open(file))`. The image's size is not
    checked here: `fcn.images.read_labels` checks it (`png_size`) before calling this.

    Raises OSError/ValueError for bytes that are not a readable image.
    """
    if data.startswith(SIGNATURE):
        decoded = _decode_fast(data)
        if decoded is not None:
            return decoded
        header, _ = _chunks(data)  # every chunk checked: PIL would follow a second IHDR
        if len(header) == 13 and header[9] == _GREY and header[8] in (2, 4):
            raise PngError(f"{header[8]}-bit grey PNG: PIL scales its samples to 8 bits "
                           "(an id 1 reads as 17); label PNGs must be 1-, 8- or 16-bit")
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image), image.mode


def read_png_array(path: str | Path) -> tuple[np.ndarray, str]:
    """`decode_png_array` of a file. Raises FileNotFoundError, or OSError/ValueError for files
    that are not readable images."""
    return decode_png_array(Path(path).read_bytes())
