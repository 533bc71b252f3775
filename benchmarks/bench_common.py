"""What several benchmark scripts share: the GPU's identity and a free local port.

The GPU comes from nvidia-smi, so a driver process (Ray, a server launcher, the parent of engine
processes) learns the card without creating a CUDA context of its own.
"""
from __future__ import annotations

import shutil
import socket
import subprocess


def gpu_info() -> tuple[str, float]:
    """(name as nvidia-smi prints it, total GiB) of the first GPU; ("cpu", 0.0) without one."""
    if shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total",
                              "--format=csv,noheader,nounits"],
                             capture_output=True, text=True).stdout.strip().splitlines()
        if out:
            name, mem = out[0].rsplit(",", 1)
            return name.strip(), float(mem) / 1024
    return "cpu", 0.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
