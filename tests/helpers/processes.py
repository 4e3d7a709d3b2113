"""Process helpers of the multi-process tests: a free local port, and killing a process tree."""

from __future__ import annotations

import socket
import subprocess

import psutil


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def kill_tree(*processes: subprocess.Popen) -> None:
    """SIGKILL each process and everything below it (torchrun's workers have sessions of their
    own: killing a process group would miss them)."""
    for process in processes:
        try:
            root = psutil.Process(process.pid)
            tree = [*root.children(recursive=True), root]
        except psutil.NoSuchProcess:
            continue
        for proc in tree:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
