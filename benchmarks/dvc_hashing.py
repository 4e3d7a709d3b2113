"""What DVC's first look at a real-sized dataset costs: hashing the dependencies of the masks and
train stages, cold and then warm.

    .venv/bin/python benchmarks/dvc_hashing.py [--files 5000] [--min-mb 2] [--max-mb 5]
        [--workdir DIR] [--cold] [--out docs/measured/dvc_hashing.json] [--smoke]

Real Cityscapes has 5,000 leftImg8bit PNGs of 2–5 MB (~11 GB) and 5,000 small gtFine
annotations. This writes `--files` files of that size (random bytes: incompressible, like PNG
data) in the official layout inside a new DVC repository whose two stages depend on them as
this project's masks and train stages do (masks: all of leftImg8bit; train: its train and val
folders, 3,475/5,000 of the files), and times:

- `dvc status` the first time: DVC reads and MD5-hashes every dependency file;
- `dvc status` again: DVC's state database knows the files (inode, mtime, size), so only
  their metadata is read.

The first figure is the cost the first `dvc repro` on real data pays before a stage runs (and
again for any file whose mtime changes); the second is the cost of every later
`dvc status`/`dvc repro`. The files' page cache is dropped where possible (`--cold`, root
only), else the cold figure is the hashing of cached pages, i.e. MD5 speed. `--smoke` is a
seconds-long run of the same steps on 10 files of 1–2 kB that CI runs so the script cannot rot.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

SPLITS = {"train": 2975, "val": 500, "test": 1525}  # Cityscapes' shares of 5,000


def write_tree(root: Path, files: int, min_mb: float, max_mb: float) -> float:
    """`files` random files under root/leftImg8bit/<split>/<city>/; their total size in GB."""
    rng = np.random.default_rng(0)
    block = rng.integers(0, 256, int(max_mb * 1e6) + 16, dtype=np.uint8).tobytes()
    total = 0
    index = 0
    for split, share in SPLITS.items():
        for i in range(round(files * share / 5000)):
            path = root / "leftImg8bit" / split / f"city{i % 18}" / f"city{i % 18}_{i:06d}_000019_leftImg8bit.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            size = int(rng.uniform(min_mb, max_mb) * 1e6)
            offset = index % 16  # a different window of the block: every file hashes apart
            path.write_bytes(index.to_bytes(8, "little") + block[offset:offset + size - 8])
            total += size
            index += 1
    return total / 1e9


def dvc(repo: Path, *args: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, check=True,
                   capture_output=True, env=dict(os.environ, DVC_NO_ANALYTICS="1"))
    return time.perf_counter() - start


def drop_caches() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=5000)
    parser.add_argument("--min-mb", type=float, default=2.0)
    parser.add_argument("--max-mb", type=float, default=5.0)
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--cold", action="store_true", help="drop the page cache first (root)")
    parser.add_argument("--out", type=Path, help="also write the figures as JSON here")
    parser.add_argument("--smoke", action="store_true",
                        help="a tiny run that checks the script works (CI): 10 files of 1-2 kB")
    args = parser.parse_args(argv)
    if args.smoke:
        args.files, args.min_mb, args.max_mb = 10, 0.001, 0.002

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        repo = Path(tmp)
        subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
        dvc(repo, "init", "-q")
        data = repo / "data"
        start = time.perf_counter()
        gb = write_tree(data, args.files, args.min_mb, args.max_mb)
        written = time.perf_counter() - start
        (repo / "dvc.yaml").write_text(
            "stages:\n"
            "  masks:\n    cmd: mkdir -p out/masks\n    deps: [data/leftImg8bit]\n"
            "    outs: [out/masks]\n"
            "  train:\n    cmd: mkdir -p out/train\n"
            "    deps: [data/leftImg8bit/train, data/leftImg8bit/val]\n"
            "    outs: [out/train]\n", encoding="utf-8")
        cold = drop_caches() if args.cold else False
        first = dvc(repo, "status")
        second = dvc(repo, "status")
    result = {"files": args.files, "gb": gb, "write_s": written, "page_cache_dropped": cold,
              "first_status_s": first, "first_gb_per_s": gb / first,
              "second_status_s": second, "machine": platform.processor() or platform.machine(),
              "command": "python benchmarks/dvc_hashing.py"}
    print(f"{args.files} files, {gb:.3g} GB (written in {written:.1f} s): first dvc status "
          f"{first:.1f} s ({gb / first:.3g} GB/s, page cache "
          f"{'dropped' if cold else 'warm'}), second {second:.1f} s")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
