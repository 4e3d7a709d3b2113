"""PNG decoding for the data loader: PIL vs torchvision.io.decode_png, to the same tensor.

    .venv/bin/python benchmarks/decode.py [--root data/synthetic] [--rounds 3]

Decodes the synthetic train images and a 1024x2048 RGB PNG (the real Cityscapes size, noisy
content written to a temporary file) into a uint8 CHW tensor, the form the transforms take:
PIL as `Image.open` + `convert("RGB")` + `torch.from_numpy(np.asarray(...)).permute`,
torchvision as `decode_png(read_file(path))`. Rounds interleave; the best counts. Both
results are checked equal. fcn.images.read_tensor (the train loader) uses the faster one.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_png, read_file

warnings.filterwarnings("ignore", "The image decoding", DeprecationWarning)


def with_pil(path: Path) -> torch.Tensor:
    with Image.open(path) as image:
        array = np.array(image.convert("RGB"))
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def with_torchvision(path: Path) -> torch.Tensor:
    return decode_png(read_file(str(path)), mode=ImageReadMode.RGB)


def best_ms(decode, paths: list[Path], rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for path in paths:
            decode(path)
        best = min(best, (time.perf_counter() - start) / len(paths))
    return best * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default="data/synthetic")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    small = sorted(Path(args.root).glob("leftImg8bit/train/*/*_leftImg8bit.png"))[:48]
    with tempfile.TemporaryDirectory() as tmp:
        big = Path(tmp) / "big_leftImg8bit.png"
        rng = np.random.default_rng(0)
        pixels = (rng.integers(0, 16, (1024, 2048, 3)) * 16).astype(np.uint8)
        Image.fromarray(pixels).save(big)
        for name, paths in ((f"{len(small)} synthetic images", small),
                            ("1024x2048 image (x5)", [big] * 5)):
            if not paths:
                continue
            for path in paths[:3]:
                assert torch.equal(with_pil(path), with_torchvision(path))
            pil = best_ms(with_pil, paths, args.rounds)
            tv = best_ms(with_torchvision, paths, args.rounds)
            print(f"{name:28s} PIL {pil:7.2f} ms/image   torchvision.io {tv:7.2f} ms/image")


if __name__ == "__main__":
    main()
