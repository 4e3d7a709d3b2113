"""Frame streams: a video file or a folder of frames read lazily, and an H.264 MP4 written
atomically.

Encoding and decoding go through PyAV (`av`): FFmpeg's libraries in-process, and its wheels
on PyPI carry libx264, so one `pip install` brings the encoder, frames pass as numpy arrays
without a subprocess or an ffmpeg binary on the PATH, and both ends stream one frame at a time
(imageio's ffmpeg backend, the alternative, pipes raw frames through a separate ~70 MB ffmpeg
executable).

Reading (`open_frames`): everything that can be checked before work is. A folder's frames
(`.png/.jpg/.jpeg`, recursively) are ordered by `frame_order`, and every header is read
first: it opens, is within `max_pixels`, and has the first frame's size. A video's size comes
from its stream header and is checked against `max_pixels` before we decode a frame (FFmpeg's
probe, while opening, may decode the first frames within its own frame-size limit); each
decoded frame must keep that size. A source yields its frames lazily, so memory does not grow
with its length.

Writing (`Mp4Writer`): H.264 (libx264; MPEG-4 Part 2 with a warning where an FFmpeg build
lacks it), yuv420p so every player shows it, which needs an even width and height: an odd one
is padded by repeating the last row or column (no predicted pixel is dropped). The MP4 goes to
a temporary file beside its place and is renamed there only once complete, with its index
(`moov`) first so browsers play it while it downloads. x264 is deterministic for a given thread
count and we leave it its default (1.5 per core): the same frames give the same bytes on the
same machine; another core count gives other, equally valid, bytes.
"""

from __future__ import annotations

import abc
import contextlib
import logging
import re
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from types import TracebackType
from typing import Any

import av
import numpy as np

from fcn.atomic import atomic_path
from fcn.errors import DataError
from fcn.images import IMAGE_SUFFIXES, MAX_PIXELS, check_pixels, read_rgb, read_size

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".mov", ".avi", ".mkv", ".webm")
"""Inputs read as video files (anything else that is not a folder is refused)."""
CITYSCAPES_FPS = 17.0
"""Cityscapes' sequences were recorded at 17 Hz: the rate of a folder of frames by default
(export.video_fps; fcn.params does not import this module, tests hold the two equal)."""
ENCODERS = ("libx264", "mpeg4")
"""Encoders in order of preference: H.264, else MPEG-4 Part 2 (every FFmpeg build has it)."""
DEFAULT_CRF = 23
"""x264's own default quality (export.video_crf's default); each +6 roughly halves the size."""


def frame_order(path: Path) -> tuple[Any, ...]:
    """Sort key of frame files: natural order of the path, digit runs compared as numbers.

    For Cityscapes names this is (city, seq, frame) order: `frankfurt_000000_000294` before
    `frankfurt_000001_000000`, and the demo videos' `stuttgart_00_000000_000010` (whose city
    holds an underscore, which the official stem pattern does not allow) after `..._000009`; for
    other names `frame_9.png` comes before `frame_10.png`, as a person numbers frames. Ties
    (`1` and `01`) fall back to the plain string.
    """
    text = path.as_posix()
    parts = re.split(r"(\d+)", text)
    return (*((int(p) if i % 2 else p) for i, p in enumerate(parts)), text)


class FrameSource(abc.ABC):
    """Frames of one size, in order, decoded only when asked for. `keys()` yields what to load
    (cheaply, lazily) and `load(key)` makes the uint8 RGB (H, W, 3) frame, so a caller can load
    ahead in threads (`fcn.predict.predictor.predict_stream`); iterating yields the frames."""

    def __init__(self, path: Path, width: int, height: int, count: int | None,
                 fps: Fraction | None) -> None:
        self.path = path
        self.width, self.height = width, height
        self.count = count
        """Frames in all, or None when a video's container does not say."""
        self.fps = fps
        """A video's own frame rate; None for a folder of frames (they carry none)."""

    @abc.abstractmethod
    def keys(self) -> Iterator[Any]:
        """What `load` takes, one per frame in order, produced lazily."""

    @abc.abstractmethod
    def load(self, key: Any) -> np.ndarray:
        """The frame of a key: uint8 RGB (height, width, 3); safe to call from threads."""

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self.load(key) for key in self.keys())

    def _check_size(self, frame: np.ndarray, where: str) -> np.ndarray:
        if frame.shape[:2] != (self.height, self.width):
            raise DataError(f"{where}: frame is {frame.shape[1]}x{frame.shape[0]}, but the "
                            f"first frame of {self.path} is {self.width}x{self.height}; every "
                            "frame of a video must share one size")
        return frame


class FolderFrames(FrameSource):
    """The image files of a folder as frames (keys: their paths, in `frame_order`)."""

    def __init__(self, folder: Path, files: list[Path], width: int, height: int,
                 max_pixels: int) -> None:
        super().__init__(folder, width, height, len(files), None)
        self.files = files
        self.max_pixels = max_pixels

    def keys(self) -> Iterator[Path]:
        yield from self.files

    def load(self, key: Path) -> np.ndarray:
        return self._check_size(read_rgb(key, "frame", self.max_pixels), str(key))


class VideoFrames(FrameSource):
    """A video file's first video stream (keys: (index, decoded frame), each frame decoded
    as the key is asked for: the decoder runs in the consuming thread, FFmpeg's own threads
    inside it)."""

    def keys(self) -> Iterator[tuple[int, np.ndarray]]:
        index = 0  # the frame being decoded: the one an error names
        try:
            with av.open(str(self.path)) as container:
                stream = container.streams.video[0]
                stream.thread_type = "AUTO"  # FFmpeg's frame threads: decoding keeps up
                for frame in container.decode(stream):
                    array = frame.to_ndarray(format="rgb24")
                    yield index, self._check_size(array, f"{self.path}: frame {index}")
                    index += 1
        except av.FFmpegError as exc:
            raise DataError(f"{self.path}: cannot decode video frame {index} "
                            f"({_reason(exc)})") from None

    def load(self, key: tuple[int, np.ndarray]) -> np.ndarray:
        return key[1]


def _reason(exc: Exception) -> str:
    return " ".join(str(exc).split())[:200]


def frame_files(folder: Path) -> list[Path]:
    """Every .png/.jpg/.jpeg under `folder`, recursively, in `frame_order` of their paths
    relative to it; a DataError naming the folder when it has none."""
    files = [p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise DataError(f"{folder}: no {'/'.join(IMAGE_SUFFIXES)} frames found")
    return sorted(files, key=lambda p: frame_order(p.relative_to(folder)))


def open_frames(path: str | Path, max_pixels: int = MAX_PIXELS) -> FrameSource:
    """A folder of frames or a video file (`VIDEO_SUFFIXES`), checked before any frame is
    decoded: it exists and opens, its frames are at most `max_pixels` pixels and (a folder:
    every header) of one size. Anything wrong is one DataError line naming the file."""
    path = Path(path)
    if path.is_dir():
        files = frame_files(path)
        width, height = read_size(files[0], "frame", max_pixels)
        for file in files[1:]:
            size = read_size(file, "frame", max_pixels)
            if size != (width, height):
                raise DataError(f"{file}: frame is {size[0]}x{size[1]}, but the first frame "
                                f"({files[0].name}) is {width}x{height}; every frame of a "
                                "video must share one size")
        return FolderFrames(path, files, width, height, max_pixels)
    if not path.exists():
        raise DataError(f"{path}: video file or folder of frames not found")
    if path.suffix.lower() not in VIDEO_SUFFIXES:
        raise DataError(f"{path}: not a video file ({', '.join(VIDEO_SUFFIXES)}) or a folder "
                        "of frames")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise DataError(f"{path}: holds no video stream")
            stream = container.streams.video[0]
            width, height = stream.codec_context.width, stream.codec_context.height
            count, fps = stream.frames or None, stream.average_rate or stream.guessed_rate
    except av.FFmpegError as exc:
        raise DataError(f"{path}: cannot read video ({_reason(exc)})") from None
    if width <= 0 or height <= 0:
        raise DataError(f"{path}: the video stream does not state its frame size")
    check_pixels(path, "video frame", (width, height), max_pixels)
    rate = Fraction(fps) if fps else None
    if rate is not None and not 0 < rate <= 1000:
        log.warning("%s: its stated frame rate %s is implausible: ignored", path, rate)
        rate = None
    return VideoFrames(path, width, height, count, rate)


def frame_rate(fps: float | Fraction) -> Fraction:
    """A rate as the exact fraction a container stores (29.97 → 2997/100; a video's own
    30000/1001 stays as it is); ValueError unless 0 < fps <= 1000."""
    rate = fps if isinstance(fps, Fraction) else Fraction(fps).limit_denominator(1001)
    if not 0 < rate <= 1000:
        raise ValueError(f"frame rate must be in (0, 1000], got {fps}")
    return rate


def available_encoder() -> str:
    """The first of `ENCODERS` this FFmpeg build has (a warning when it is not libx264)."""
    for name in ENCODERS:
        if name in av.codecs_available:
            if name != ENCODERS[0]:
                log.warning("this FFmpeg build has no %s encoder: writing %s instead (larger "
                            "files for the same quality)", ENCODERS[0], name)
            return name
    raise DataError(f"this FFmpeg build has none of the encoders {ENCODERS}")


def even_size(width: int, height: int) -> tuple[int, int]:
    """The frame size an MP4 of (width, height) frames has: rounded up to even (yuv420p)."""
    return width + width % 2, height + height % 2


class Mp4Writer:
    """An MP4 of uint8 RGB (height, width, 3) frames at `fps`, at x264 quality `crf`.

    Use as a context manager: frames go to a temporary file beside `path`, which replaces
    `path` only when the block ends without an error (and at least one frame was written), so
    an error midway leaves the previous file, or none, never half of one.
    """

    def __init__(self, path: str | Path, width: int, height: int, fps: float | Fraction,
                 crf: int = DEFAULT_CRF) -> None:
        if not 0 <= crf <= 51:
            raise ValueError(f"crf must be in 0..51, got {crf}")
        self.path = Path(path)
        self.width, self.height = width, height
        self.rate = frame_rate(fps)
        self.crf = crf
        self.frames = 0
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> Mp4Writer:
        codec = available_encoder()
        with contextlib.ExitStack() as stack:
            tmp = stack.enter_context(atomic_path(self.path))
            self._container = stack.enter_context(
                av.open(str(tmp), "w", format="mp4", options={"movflags": "faststart"}))
            stream = self._container.add_stream(codec, rate=self.rate)
            stream.width, stream.height = even_size(self.width, self.height)
            stream.pix_fmt = "yuv420p"
            if codec == "libx264":
                stream.options = {"crf": str(self.crf)}
            else:  # a constant quantiser 2..31, as crf runs 0..51
                q = str(2 + round(self.crf * 29 / 51))
                stream.options = {"qmin": q, "qmax": q}
            self._stream = stream
            self._stack = stack.pop_all()
        return self

    def write(self, frame: np.ndarray) -> None:
        """Encode the next frame (its size must be the writer's)."""
        if frame.shape != (self.height, self.width, 3) or frame.dtype != np.uint8:
            raise ValueError(f"expected a uint8 frame of shape {(self.height, self.width, 3)}, "
                             f"got {frame.dtype} {frame.shape}")
        if self.width % 2 or self.height % 2:
            frame = np.pad(frame, ((0, self.height % 2), (0, self.width % 2), (0, 0)), "edge")
        picture = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
        picture.pts, picture.time_base = self.frames, 1 / self.rate
        for packet in self._stream.encode(picture):
            self._container.mux(packet)
        self.frames += 1

    def _finish(self) -> None:
        if self.frames == 0:
            raise DataError(f"{self.path}: no frames to write")
        for packet in self._stream.encode():  # flush the encoder's look-ahead
            self._container.mux(packet)

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        """Close the container; rename the file into place, or on any error remove it."""
        if kind is not None:
            self._stack.__exit__(kind, error, traceback)
            return
        try:
            self._finish()
        except BaseException as exc:
            self._stack.__exit__(type(exc), exc, exc.__traceback__)
            raise
        self._stack.close()
        log.info("wrote %d frames (%dx%d, %s fps, %s, crf %d) to %s", self.frames,
                 *even_size(self.width, self.height), self.rate,
                 self._stream.codec_context.name, self.crf, self.path)
