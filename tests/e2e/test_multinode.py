"""Two torchrun "nodes" on this machine (c10d rendezvous on 127.0.0.1), one gloo process each,
train exactly as one node with two processes: the command shape docs/multi-gpu.md gives for
several machines. Bit for bit, with one condition: OMP_NUM_THREADS=1 on the nodes, as torchrun
sets it for a node with several processes. With a single process per node torchrun leaves it
unset, each process's CPU kernels then use both cores and sum in another order, and the
weights differ in the last bits from the first epoch on (gloo's sum of two ranks is the same in
both layouts)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest
import torch

from fcn import checkpoint as ckpt

from helpers.processes import free_port, kill_tree
from helpers.tiny import TWO_PROCESS_EPOCHS
from helpers.trainset import train_command, two_process_params, write_params

pytestmark = pytest.mark.slow

def _untimed(record: dict) -> dict:
    """A metrics record without its wall-clock figures (`time/...`)."""
    return {k: v for k, v in record.items() if not k.startswith("time/")}


def test_two_nodes_end_with_the_weights_and_metrics_of_one_node_with_two_processes(
        tiny_dataset, masks, two_process_run, tmp_path):
    # "one": the stage relaunched itself (torchrun --standalone, 2 processes); "two": the
    # same params (nproc 2: the world size; under torchrun the stage never relaunches itself)
    runs = {"one": two_process_run, "two": tmp_path / "two"}
    runs["two"].mkdir()
    write_params(runs["two"] / "params.yaml",
                 two_process_params(tiny_dataset, masks, runs["two"] / "models"))

    port = free_port()
    nodes, logs = [], []
    for node in (0, 1):
        logs.append((tmp_path / f"node{node}.log").open("w"))
        nodes.append(subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
             "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=fcn-test",
             *train_command(runs["two"])[1:]],
            stdout=logs[-1], stderr=subprocess.STDOUT,
            # as torchrun sets it for several processes per node: the 2-process run's threads
            env={**os.environ, "OMP_NUM_THREADS": "1"}))
    watchdog = threading.Timer(600, kill_tree, nodes)
    watchdog.start()
    try:
        codes = [node.wait() for node in nodes]
    finally:
        watchdog.cancel()
        kill_tree(*nodes)
        for handle in logs:
            handle.close()
    output = [(tmp_path / f"node{node}.log").read_text() for node in (0, 1)]
    assert codes == [0, 0], "\n".join(text[-3000:] for text in output)
    trained = [text for text in output if "training fcn8s/vgg11_bn on cpu x2" in text]
    assert len(trained) == 1, output  # one rank 0 in a world of 2, on one of the nodes

    for name in (ckpt.BEST, ckpt.LAST):
        a, b = (ckpt.load(runs[run] / "models" / name) for run in ("one", "two"))
        assert a["epoch"] == b["epoch"] and a["model"].keys() == b["model"].keys()
        for key in a["model"]:
            assert torch.equal(a["model"][key], b["model"][key]), f"{name}: {key} differs"
        assert repr(_untimed(a["metrics"])) == repr(_untimed(b["metrics"]))  # NaN == NaN
    a, b = (ckpt.load(runs[run] / "models" / ckpt.LAST) for run in ("one", "two"))
    assert a["epoch"] == TWO_PROCESS_EPOCHS and a["scheduler"] == b["scheduler"]
    for key, state in a["optimizer"]["state"].items():
        for name, tensor in state.items():
            assert torch.equal(tensor, b["optimizer"]["state"][key][name]), f"optimizer {key}"
    assert repr([_untimed(r) for r in a["history"]]) == repr([_untimed(r) for r in b["history"]])
