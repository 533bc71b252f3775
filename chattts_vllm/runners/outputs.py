"""Codes and hidden states out of the engine, through a per-request file in shared memory.

vLLM returns one token id per request per step. A ChatTTS frame is 4 codes plus the 768-d hidden
state the Decoder needs, so the worker writes each accepted frame as a fixed-size record at offset
`frame_index * record_size` of `<frame dir>/<key>.frames` (tmpfs, memory-mapped by the worker),
and the front end reads records [0, n) once the engine has reported n frames; each record starts
with a marker (its index + 1) stored after its payload. Writes are positional, so a frame
re-sampled after a discarded step (chunked prefill) or a preemption simply overwrites itself.

The key is validated and the directory comes from the worker's own environment, so a client of the
raw completions API cannot make the worker write anywhere else.
"""
from __future__ import annotations

import logging
import mmap
import os
import queue
import re
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import torch

from chattts_vllm.config import HIDDEN_SIZE, NUM_VQ

logger = logging.getLogger(__name__)
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
    """Bytes per frame: an int32 marker (frame index + 1), 4 int32 codes, the fp32 hidden state."""
    return 4 * (1 + NUM_VQ + hidden_size)


class FrameWriter:
    """Worker side: one memory-mapped file per running request.

    A record is stored as plain array assignments (no per-frame syscall or byte building, which
    matters at 512 rows a step): payload first, then its marker, so a reader that sees the marker
    sees the payload. The file grows by doubling; tmpfs keeps untouched pages unallocated.
    """

    def __init__(self, key: str, hidden_size: int = HIDDEN_SIZE, capacity: int = 256):
        self.words = record_size(hidden_size) // 4
        self.fd = os.open(frame_path(key), os.O_RDWR | os.O_CREAT, 0o600)
        self.map: mmap.mmap | None = None
        self.rows: np.ndarray | None = None       # [capacity, words] int32 view of the file
        self.capacity = 0
        # A request that re-enters the batch reopens its file: never shrink what is there.
        self._grow(max(capacity, os.fstat(self.fd).st_size // (self.words * 4)))

    def _grow(self, capacity: int) -> None:
        self.rows = None
        if self.map is not None:
            self.map.close()
        os.ftruncate(self.fd, capacity * self.words * 4)
        self.map = mmap.mmap(self.fd, capacity * self.words * 4)
        self.rows = np.frombuffer(self.map, dtype=np.int32).reshape(capacity, self.words)
        self.capacity = capacity

    def _row(self, index: int) -> np.ndarray:
        if index >= self.capacity:
            self._grow(max(2 * self.capacity, index + 1))
        return self.rows[index]

    def write(self, index: int, codes: np.ndarray, hidden: np.ndarray) -> None:
        row = self._row(index)
        row[1:1 + NUM_VQ] = codes
        row[1 + NUM_VQ:].view(np.float32)[:] = hidden
        row[0] = index + 1

    def write_record(self, record: np.ndarray) -> None:
        """`record`: one int32 row laid out as in the file, marker (index + 1) first."""
        index = int(record[0]) - 1
        row = self._row(index)
        row[1:] = record[1:]
        row[0] = record[0]

    def close(self) -> None:
        if self.fd >= 0:
            self.rows = None
            self.map.close()
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
        reports them, so a frame may be a moment late: wait (bounded) until every record in the
        range carries its marker.
        """
        n = max(0, stop - start)
        if n == 0:
            return np.zeros((0, NUM_VQ), np.int32), np.zeros((0, self.hidden_size), np.float32)
        want = np.arange(start + 1, stop + 1, dtype=np.int32)
        deadline, delay = time.monotonic() + timeout, 1e-4
        while True:
            rec = self._load(start, n)
            if rec is not None and np.array_equal(rec[:, 0], want):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"frame side channel {self.path} holds fewer than {stop} frames")
            time.sleep(delay)
            delay = min(delay * 2, 0.01)
        return rec[:, 1:1 + NUM_VQ].copy(), rec[:, 1 + NUM_VQ:].copy().view(np.float32)

    def _load(self, start: int, n: int) -> np.ndarray | None:
        try:
            with open(self.path, "rb") as f:
                f.seek(start * self.record)
                buf = f.read(n * self.record)
        except FileNotFoundError:
            return None
        if len(buf) != n * self.record:
            return None
        return np.frombuffer(buf, dtype=np.int32).reshape(n, self.record // 4)

    def close(self) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


class FrameSinkThread:
    """Writes committed frames to the side channel off the critical path, in step order.

    Each step's records arrive in one of a few pinned host buffers (a free list, so a sink that
    falls behind makes the sampler wait instead of overwriting a buffer still being read).
    """

    def __init__(self, max_rows: int, words: int, num_buffers: int = 4) -> None:
        self.jobs: queue.Queue = queue.Queue()
        self.free: queue.Queue = queue.Queue()
        for _ in range(num_buffers):
            self.free.put(torch.empty(max_rows, words, dtype=torch.int32, pin_memory=True))
        self.writers: dict[int, FrameWriter] = {}
        threading.Thread(target=self._run, daemon=True, name="chattts-frame-sink").start()

    def open(self, slot: int, key: str | None) -> None:
        self.jobs.put(("open", slot, key))

    def close(self, slot: int) -> None:
        self.jobs.put(("close", slot, None))

    def take_buffer(self) -> torch.Tensor:
        return self.free.get()

    def submit(self, event: torch.cuda.Event, slots: np.ndarray, host: torch.Tensor, n: int) -> None:
        self.jobs.put(("frames", event, (slots, host, n)))

    def _run(self) -> None:
        while True:
            kind, a, b = self.jobs.get()
            try:
                if kind == "open":
                    old = self.writers.pop(a, None)
                    if old is not None:
                        old.close()
                    if b is not None:
                        self.writers[a] = FrameWriter(b)
                elif kind == "close":
                    w = self.writers.pop(a, None)
                    if w is not None:
                        w.close()
                else:
                    slots, host, n = b
                    try:
                        a.synchronize()
                        records = host.numpy()[:n]
                        writers = self.writers
                        for i, slot in enumerate(slots.tolist()):
                            w = writers.get(slot)
                            if w is not None and records[i, 0] > 0:
                                w.write_record(records[i])
                    finally:
                        self.free.put(host)
            except Exception:  # keep the engine alive; the front end reports the missing frame
                logger.exception("chattts frame sink failed on a %s job", kind)
