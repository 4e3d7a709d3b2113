"""Stage `decode`: the training images and their trainId masks as raw uint8 arrays, decoded once,
which the train loader memory-maps instead of decoding a PNG per sample.

Decoding a 1024×2048 PNG photo costs 25–45 ms in every decoder (docs/performance.md); a crop
read from a memory-mapped array costs a copy of the rows it needs. At real scale the arrays
take ~6 MB per image and ~2 MB per mask (train + val: ~28 GB), which is why the cache is
optional (`decode.enabled`): disabled, the stage writes only its index and the loader decodes
the PNGs.

Layout under `out`: `<split>/<city>/<stem>.image.npy` (uint8 [H, W, 3], RGB) and
`<stem>.mask.npy` (uint8 [H, W], trainIds), plus `index.json` (format, whether arrays were
written, and for every split's stem its height, width, each array's SHA-256 and the SHA-256 of
the PNG it came from). The index holds content only (no sizes on disk, no times), so two clean
runs write byte-identical caches. Mask values are checked once here (each a class or ignore).
What a training run checks before its first step (`verify`):

- the index itself: every entry's fields and their types (a damaged index is one line);
- every array's header (dtype, shape equal to the index's, at most `max_pixels`) and length;
- every array's SHA-256 against the index (a damaged or altered file), and every source PNG's
  (a replaced image or mask: the cache is stale), in up to 8 threads, on local rank 0 of each
  machine (its cost per GB: docs/performance.md, measured by benchmarks/loader_throughput.py).

So a damaged, foreign or stale file is a one-line error before training, never a wrong sample.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from fcn.atomic import atomic_dir, write_json
from fcn.cityscapes import layout
from fcn.errors import DataError
from fcn.images import MAX_PIXELS, check_pixels
from fcn.train.pairs import Pair, find_pairs, load_pair

log = logging.getLogger(__name__)

FORMAT = 2
INDEX = "index.json"
KINDS = {"image": 3, "mask": 1}
"""Array kind → channels."""
SPLITS = ("train", "val")
"""What training reads: the train split, and val (validation, or training on train+val)."""


def array_path(out: str | Path, split: str, stem: str, kind: str) -> Path:
    """`<out>/<split>/<city>/<stem>.<kind>.npy`."""
    return Path(out) / split / layout.city_of(stem) / f"{stem}.{kind}.npy"


def _digest(array: Any) -> str:
    return hashlib.sha256(memoryview(array)).hexdigest()


def file_digest(path: Path) -> str:
    """SHA-256 of a source file's bytes: what the index records and `verify` compares."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _decode_one(task: tuple[Any, ...]) -> dict[str, Any]:
    """Decode one pair into `out` (a private folder); its index entry."""
    split, pair, out, max_pixels = task
    sources = {"image": file_digest(pair.image), "mask": file_digest(pair.mask)}
    image, mask = load_pair(pair, max_pixels)
    stem = pair.stem
    entry: dict[str, Any] = {"stem": stem, "height": int(image.shape[1]),
                             "width": int(image.shape[2])}
    for kind, array in (("image", image.permute(1, 2, 0)), ("mask", mask)):
        path = array_path(out, split, stem, kind)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = np.ascontiguousarray(array.numpy())
        np.save(path, data, allow_pickle=False)
        entry[kind] = {"sha256": _digest(data), "source": sources[kind]}
    return entry


def decode_stage(root: str | Path, generated: str | Path, out: str | Path, enabled: bool,
                 workers: int, max_pixels: int = MAX_PIXELS) -> dict[str, Any]:
    """Write the cache of the train and val splits under `out` (replacing it whole, atomically)
    when `enabled`, else only its index; returns the index."""
    pairs = {split: find_pairs(root, generated, split, max_pixels) for split in SPLITS}
    index: dict[str, Any] = {"format": FORMAT, "enabled": enabled, "splits": {}}
    with atomic_dir(out) as tmp:
        if enabled:
            tasks = [(split, pair, tmp, max_pixels) for split in SPLITS for pair in pairs[split]]
            done: dict[str, list[dict[str, Any]]] = {split: [] for split in SPLITS}
            with ThreadPoolExecutor(max(1, workers)) as pool:  # decoding releases the GIL
                for (split, *_), entry in zip(tasks, tqdm(
                        pool.map(_decode_one, tasks), total=len(tasks), desc="decode",
                        unit="img")):
                    done[split].append(entry)
            index["splits"] = done
            nbytes = sum(p.stat().st_size for p in Path(tmp).rglob("*.npy"))
            log.info("decoded %d images and masks into %s (%.1f MB)", len(tasks), out,
                     nbytes / 1e6)
        else:
            log.info("decode.enabled is false: the train loader decodes the PNGs; %s holds "
                     "only its index", out)
        write_json(Path(tmp) / INDEX, index)
    return index


def read_index(out: str | Path) -> dict[str, Any]:
    """The cache's index; a missing or foreign one is an error naming it."""
    path = Path(out) / INDEX
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: decoded cache index not found (run the decode stage)") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read the decoded cache index ({exc})") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise DataError(f"{path}: not a decoded cache index of format {FORMAT}")
    return index


def _header(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, data offset) of an .npy file, from its header alone."""
    with path.open("rb") as file:
        version = np.lib.format.read_magic(file)
        read = {(1, 0): np.lib.format.read_array_header_1_0,
                (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read is None:
            raise ValueError(f"unknown .npy format version {version}")
        shape, fortran, dtype = read(file, max_header_size=10000)
        if fortran:
            raise ValueError("Fortran-ordered array")
        return shape, dtype, file.tell()


def open_array(path: Path, kind: str, height: int, width: int,
               max_pixels: int = MAX_PIXELS) -> np.memmap:
    """The array at `path`, memory-mapped read-only, after its header is checked: uint8 of
    shape [height, width(, 3)] (the index's size, itself within `max_pixels`)."""
    check_pixels(path, kind, (width, height), max_pixels)
    expected = (height, width, 3) if KINDS[kind] == 3 else (height, width)
    try:
        shape, dtype, offset = _header(path)
    except FileNotFoundError:
        raise DataError(f"{path}: decoded {kind} not found (rerun the decode stage)") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable .npy array ({exc})") from None
    if shape != expected or dtype != np.uint8:
        raise DataError(f"{path}: decoded {kind} is {dtype} {shape}, expected uint8 {expected} "
                        "(the index's size; rerun the decode stage)")
    size = path.stat().st_size
    if size != offset + int(np.prod(expected)):
        raise DataError(f"{path}: decoded {kind} is truncated or padded ({size} bytes, expected "
                        f"{offset + int(np.prod(expected))})")
    return np.memmap(path, dtype=np.uint8, mode="r", offset=offset, shape=expected)


def _is_sha256(value: Any) -> bool:
    return (isinstance(value, str) and len(value) == 64
            and all(c in "0123456789abcdef" for c in value))


def _entry_problem(entry: Any) -> str | None:
    """What is wrong with one index entry, or None: the fields `verify` and the loader read."""
    if not isinstance(entry, dict):
        return "not a mapping"
    if not isinstance(entry.get("stem"), str) or not entry["stem"]:
        return "no stem"
    for key in ("height", "width"):
        value = entry.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            return f"{key} {value!r} is not a positive integer"
    for kind in KINDS:
        record = entry.get(kind)
        if not isinstance(record, dict):
            return f"no {kind} record"
        for key in ("sha256", "source"):
            if not _is_sha256(record.get(key)):
                return f"{kind} {key} {record.get(key)!r} is not a SHA-256"
    return None


def entries(out: str | Path, split: str) -> dict[str, dict[str, Any]]:
    """stem → index entry (height, width, each array's digest and its source's) of a decoded
    split, every entry checked; an error if the cache does not hold it."""
    index = read_index(out)
    path = Path(out) / INDEX
    if not index.get("enabled"):
        raise DataError(f"{path}: the cache holds no arrays (decode.enabled was false when it "
                        "was built)")
    splits = index.get("splits")
    found = splits.get(split) if isinstance(splits, dict) else None
    if not isinstance(found, list):
        raise DataError(f"{path}: split {split!r} not decoded")
    for number, entry in enumerate(found):
        problem = _entry_problem(entry)
        if problem:
            raise DataError(f"{path}: damaged index ({split} entry {number}: {problem}); rerun "
                            "the decode stage")
    return {e["stem"]: e for e in found}


def split_sizes(out: str | Path, split: str) -> dict[str, tuple[int, int]]:
    """stem → (height, width) of a decoded split."""
    return {stem: (int(e["height"]), int(e["width"])) for stem, e in entries(out, split).items()}


def check_covers(out: str | Path, split: str, stems: Sequence[str]) -> dict[str, tuple[int, int]]:
    """The sizes of `stems` in the cache; a stem it lacks is an error (a stale cache)."""
    sizes = split_sizes(out, split)
    missing = [s for s in stems if s not in sizes]
    if missing:
        raise DataError(f"{Path(out) / INDEX}: {len(missing)} {split} image(s) not in the decoded "
                        f"cache, e.g. {missing[0]} (rerun the decode stage)")
    return sizes


def verify(out: str | Path, split: str, pairs: Sequence[Pair], max_pixels: int = MAX_PIXELS,
           threads: int | None = None) -> None:
    """Check `pairs`' arrays against the index before a run reads them: each source PNG's
    SHA-256 (stale cache), each array's header and SHA-256 (damaged or altered file); the
    first problem in `pairs` order is a one-line DataError naming the file. Hashing runs in
    `threads` threads (hashlib releases the GIL); see the module docstring for the cost."""
    found = entries(out, split)
    index = Path(out) / INDEX
    jobs = []
    for pair in pairs:
        entry = found[pair.stem]
        for kind, source in (("image", pair.image), ("mask", pair.mask)):
            jobs.append((source, kind, None, entry[kind]["source"]))
            jobs.append((array_path(out, split, pair.stem, kind), kind, pair.size,
                         entry[kind]["sha256"]))

    def problem(job: tuple[Path, str, tuple[int, int] | None, str]) -> str | None:
        path, kind, size, expected = job
        if size is None:
            return None if file_digest(path) == expected else (
                f"{path}: changed since the decode stage cached it (its SHA-256 differs from "
                f"the one in {index}); rerun the decode stage")
        if _digest(open_array(path, kind, *size, max_pixels)) != expected:
            return (f"{path}: decoded {kind} does not match its SHA-256 in {index} "
                    "(damaged or altered since the decode stage wrote it; rerun it)")
        return None

    with ThreadPoolExecutor(threads or min(8, os.cpu_count() or 1)) as pool:
        try:
            for found_problem in pool.map(problem, jobs):
                if found_problem:
                    raise DataError(found_problem)
        finally:
            pool.shutdown(cancel_futures=True)  # a problem found: do not hash the rest
