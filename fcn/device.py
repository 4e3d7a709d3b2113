"""Which device runs, at which precision: the one place that turns the `device` and
`precision` parameters into a torch device, a dtype and an autocast context.

Training, inference and the benchmark all go through here, so "bf16" means the same thing in
each: autocast to bfloat16 on CUDA. `fp32` is strict fp32 and `tf32` (benchmark only) is fp32
storage with TF32 tensor-core math. Training and inference compute in fp32 on a CPU whatever
the parameter says (reproducible, and CPUs without native bf16/fp16 kernels run them tens of
times slower); the benchmark times CPU autocast where the CPU has the kernels.
"""

from __future__ import annotations

import contextlib

import torch

from fcn.errors import FcnError
from fcn.params import BENCHMARK_PRECISIONS

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "tf32": torch.float32,
                                  "bf16": torch.bfloat16, "fp16": torch.float16}
"""Storage/compute dtype per precision name."""
assert tuple(DTYPES) == BENCHMARK_PRECISIONS  # one list of names (fcn.params) for both

LOW_PRECISIONS = ("bf16", "fp16")
"""The precisions that run under autocast."""


def resolve_device(choice: str, local_rank: int = 0, setting: str = "device") -> torch.device:
    """'auto' → CUDA when present (this rank's GPU), else CPU; 'cuda' without a GPU is an
    input error naming the parameter `setting` (e.g. 'train.device')."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise FcnError(f"{setting} is 'cuda' but CUDA is not available on this machine "
                       f"(set {setting} to 'auto' or 'cpu')")
    if choice == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def autocast_dtype(device: torch.device, precision: str, cuda_only: bool = True
                   ) -> torch.dtype | None:
    """The dtype autocast runs `precision` at on `device`, or None for plain fp32.

    cuda_only (training, inference): a CPU always computes in fp32.
    """
    if precision not in DTYPES:
        raise ValueError(f"precision must be one of {list(DTYPES)}, got {precision!r}")
    if precision not in LOW_PRECISIONS or (cuda_only and device.type != "cuda"):
        return None
    return DTYPES[precision]


def autocast(device: torch.device, precision: str, cuda_only: bool = True
             ) -> contextlib.AbstractContextManager:
    """The autocast context for `precision` on `device` (a no-op for fp32/tf32)."""
    dtype = autocast_dtype(device, precision, cuda_only)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU): call before reading a clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
