"""run_stage: an input error is one line on stderr and exit code 1, wherever it was raised."""

from __future__ import annotations

import logging

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from fcn.cli import run_stage
from fcn.errors import DataError, ParamsError, one_line


class _BadSecondFile(Dataset):
    def __len__(self) -> int:
        return 3

    def __getitem__(self, index: int) -> torch.Tensor:
        if index == 1:
            raise DataError("data/x_leftImg8bit.png: not a PNG file")
        return torch.zeros(1)


def _run(main, caplog) -> tuple[int, list[str]]:
    caplog.set_level(logging.INFO)
    with pytest.raises(SystemExit) as info:
        run_stage(main)
    return info.value.code, [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]


@pytest.mark.parametrize("workers", [0, 1])
def test_an_error_in_a_loader_worker_is_the_same_one_line_as_in_the_main_process(caplog,
                                                                                  workers):
    """Before: with workers, 'Caught DataError in DataLoader worker process 0' and the
    worker's traceback, 15 lines."""
    def main() -> None:
        for _ in DataLoader(_BadSecondFile(), batch_size=1, num_workers=workers):
            pass

    code, errors = _run(main, caplog)
    assert code == 1
    assert errors == ["data/x_leftImg8bit.png: not a PNG file"]


def test_one_line_keeps_messages_that_are_not_a_worker_s():
    listing = ParamsError("params.yaml: 2 problems\n  train.lr: ...\n  train.epochs: ...")
    assert one_line(listing) == str(listing)  # the params check's listing is kept whole
    assert one_line(DataError("a.png: truncated")) == "a.png: truncated"
