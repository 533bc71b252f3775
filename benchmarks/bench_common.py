"""What several benchmark scripts share: the GPU's or CPU's identity and a free local port.

The GPU comes from nvidia-smi, so a driver process (Ray, a server launcher, the parent of engine
processes) learns the card without creating a CUDA context of its own.
"""
from __future__ import annotations

import platform
import shutil
import socket
import subprocess
from pathlib import Path


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


def cpu_name() -> str:
    """The CPU model (for benchmarks that run on the host), as /proc/cpuinfo names it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
