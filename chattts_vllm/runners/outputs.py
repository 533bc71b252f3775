"""Codes and hidden states out of the engine, through a per-request file in shared memory.

vLLM returns one token id per request per step. A ChatTTS frame is 4 codes plus the 768-d hidden
state the Decoder needs, so the worker writes each accepted frame as a fixed-size record at offset
`frame_index * record_size` of `<frame dir>/<key>.frames` (tmpfs), and the front end reads records
[0, n) once the engine has reported n frames. Writes are positional, so a frame re-sampled after a
discarded step (chunked prefill) or a preemption simply overwrites itself.

The key is validated and the directory comes from the worker's own environment, so a client of the
raw completions API cannot make the worker write anywhere else.
"""
from __future__ import annotations

import os
import re
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

from chattts_vllm.config import HIDDEN_SIZE, NUM_VQ

_KEY_RE = re.compile(r"^[A-Za-z0-9_-]{8,64}$")


def frame_dir() -> Path:
    default = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    d = Path(os.environ.get("CHATTTS_VLLM_FRAME_DIR", os.path.join(default, "chattts-vllm-frames")))
    d.mkdir(parents=True, exist_ok=True)
    return d


def new_key() -> str:
    return uuid.uuid4().hex


def frame_path(key: str) -> Path:
    if not _KEY_RE.match(key):
        raise ValueError(f"invalid frame sink key {key!r}")
    return frame_dir() / f"{key}.frames"


def record_size(hidden_size: int = HIDDEN_SIZE) -> int:
    return 4 * NUM_VQ + 4 * hidden_size


class FrameWriter:
    """Worker side: one open file per running request."""

    def __init__(self, key: str, hidden_size: int = HIDDEN_SIZE):
        self.hidden_size = hidden_size
        self.record = record_size(hidden_size)
        self.fd = os.open(frame_path(key), os.O_WRONLY | os.O_CREAT, 0o600)

    def write(self, index: int, codes: np.ndarray, hidden: np.ndarray) -> None:
        rec = codes.astype(np.int32).tobytes() + hidden.astype(np.float32).tobytes()
        os.pwrite(self.fd, rec, index * self.record)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class FrameReader:
    """Front-end side: reads frames as the engine reports them; `close` removes the file."""

    def __init__(self, key: str, hidden_size: int = HIDDEN_SIZE):
        self.path = frame_path(key)
        self.hidden_size = hidden_size
        self.record = record_size(hidden_size)

    def read(self, start: int, stop: int, timeout: float = 10.0) -> tuple[np.ndarray, np.ndarray]:
        """Frames [start, stop): codes [n, 4] int32 and hidden states [n, hidden] float32.

        On the GPU path a background thread writes each step's frames just after the engine
        reports them, so a frame may be a moment late: wait for it (bounded).
        """
        n = max(0, stop - start)
        if n == 0:
            return np.zeros((0, NUM_VQ), np.int32), np.zeros((0, self.hidden_size), np.float32)
        need, deadline, delay = stop * self.record, time.monotonic() + timeout, 1e-4
        while (not self.path.exists() or self.path.stat().st_size < need) and time.monotonic() < deadline:
            time.sleep(delay)
            delay = min(delay * 2, 0.01)
        with open(self.path, "rb") as f:
            f.seek(start * self.record)
            buf = f.read(n * self.record)
        if len(buf) != n * self.record:
            raise RuntimeError(f"frame side channel {self.path} holds fewer than {stop} frames")
        rec = np.frombuffer(buf, dtype=np.uint8).reshape(n, self.record)
        codes = rec[:, : 4 * NUM_VQ].copy().view(np.int32)
        hidden = rec[:, 4 * NUM_VQ:].copy().view(np.float32)
        return codes, hidden

    def close(self) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
