"""What the lent GPU machine lacks for the check, as wheels that travel with the working tree.

The lent machine has no network and no install of this project; its `python3` (3.12) holds
torch with CUDA and the packages in DEVICE_PACKAGES (the device tool's KINDS.md, read
2026-11-17). The check imports nothing else but WHEELS (tests/test_gpu_check.py runs both
profiles' dry runs and holds every module they import to DEVICE_PACKAGES + WHEELS).

    python -m fcn.gpucheck.wheels [--dest .whl]   # here, with PyPI: download, check the size
    (then on the lent machine, from the repository root, carrying .whl:)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \\
        --target /tmp/site .whl/*.whl && PYTHONPATH=/tmp/site python3 -m fcn.gpucheck ...

The version downloaded is the one installed here, so the lent machine runs what CI tested.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

WHEELS = ("isal",)
"""Distributions the check needs that the lent machine lacks: isal is the masks' PNG codec
(`fcn.png`), which the data step's masks and the loaders' mask reads use."""

PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")
PYTHON = "3.12"
LIMIT_BYTES = 64 * 2**20
"""What one call to the lent machine may carry in all (the working tree included)."""
MAX_WHEEL_BYTES = 8 * 2**20
"""Well under LIMIT_BYTES: the rest of the tree travels too."""

DEVICE_PACKAGES = frozenset("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch
build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage
cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn
einops equinox etils execnet filelock flatbuffers flax fonttools formulaic frozenlist fsspec
gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna imageio
iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib
kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml
markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack
multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda
numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse
nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13
nvidia-nvtx onnx onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum
opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip
pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo
pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov
pytest-mock pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests
rich sacrebleu safetensors scikit-build-core scikit-image scikit-learn scipy seaborn
sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl
tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric
torchmetrics torchvision tqdm transformers treescope triton typer typing-extensions
typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
""".split())
"""The Python distributions on the lent machine's image (KINDS.md, 2026-11-17)."""


def normalise(name: str) -> str:
    """A distribution name as pip compares them (PEP 503)."""
    return name.lower().replace("_", "-").replace(".", "-")


def pins() -> list[str]:
    """`name==version` of each wheel, at the version installed here."""
    return [f"{name}=={importlib.metadata.version(name)}" for name in WHEELS]


def download_command(dest: Path) -> list[str]:
    """The device README's `pip download` for CPython 3.12 manylinux x86_64."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--python-version", PYTHON, "--implementation", "cp", "-d", str(dest)]
    for platform in PLATFORMS:
        command += ["--platform", platform]
    return command + pins()


def install_line(dest: str = ".whl") -> str:
    """The command line that installs the carried wheels on the lent machine."""
    return (f"python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir "
            f"--upgrade --target /tmp/site {dest}/*.whl && export PYTHONPATH=/tmp/site:$PWD")


def fetch(dest: Path) -> list[Path]:
    """Download the wheels into a fresh `dest`; every file checked against the size limits."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    subprocess.run(download_command(dest), check=True)
    files = sorted(dest.glob("*.whl"))
    found = {normalise(f.name.split("-")[0]) for f in files}
    missing = {normalise(n) for n in WHEELS} - found
    if missing:
        raise SystemExit(f"{dest}: no wheel for {sorted(missing)}")
    total = sum(f.stat().st_size for f in files)
    if total > MAX_WHEEL_BYTES:
        raise SystemExit(f"{dest}: the wheels take {total / 2**20:.1f} MiB, over "
                         f"{MAX_WHEEL_BYTES / 2**20:.0f} MiB (a call carries {LIMIT_BYTES // 2**20} "
                         "MiB in all)")
    return files


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fcn.gpucheck.wheels",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--dest", type=Path, default=Path(".whl"),
                        help="folder for the wheels (default: %(default)s, gitignored)")
    args = parser.parse_args(argv)
    files = fetch(args.dest)
    total = sum(f.stat().st_size for f in files)
    for f in files:
        print(f"{f.stat().st_size / 2**20:7.2f} MiB  {f.name}")
    print(f"{total / 2**20:7.2f} MiB in all (limit {MAX_WHEEL_BYTES / 2**20:.0f} MiB here, "
          f"{LIMIT_BYTES / 2**20:.0f} MiB per call with the tree)")
    print(f"on the lent machine (carry {args.dest}):\n  {install_line(str(args.dest))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
