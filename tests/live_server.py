"""Start a real server process for a test and always take it down (its whole process group)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import requests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def live_server(argv: list[str], env: dict, log: Path, health_url: str, timeout: float = 300):
    """Yields the process once `health_url` answers 200; fails with the log's tail if it dies."""
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    try:
        deadline = time.time() + timeout
        while True:
            assert proc.poll() is None, log.read_text(errors="replace")[-4000:]
            try:
                if requests.get(health_url, timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.time() < deadline, f"server did not become healthy in {timeout:.0f} s"
            time.sleep(2)
        yield proc
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
