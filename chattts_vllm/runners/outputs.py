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

import ctypes
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


_DIRS: dict[str | None, Path] = {}     # CHATTTS_VLLM_FRAME_DIR's value -> the directory, made once
DEFAULT_CAPACITY = 256                  # records a writer maps when its request's length is unknown


def frame_dir() -> Path:
    env = os.environ.get("CHATTTS_VLLM_FRAME_DIR")
    d = _DIRS.get(env)
    if d is None:
        default = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
        d = Path(env if env is not None else os.path.join(default, "chattts-vllm-frames"))
        d.mkdir(parents=True, exist_ok=True)
        _DIRS[env] = d
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


def _create_or_open(path: Path) -> tuple[int, int]:
    """(descriptor, size) of the file, created if missing. A new file is the common case and needs
    no fstat (each syscall here is a GIL hand-off of the sink thread)."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600), 0
    except FileExistsError:                        # a re-added request reopens its file
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        return fd, os.fstat(fd).st_size


def _open_file(path: Path) -> tuple[int, int]:
    """`_create_or_open`, recreating the directory if it went since `frame_dir` made it."""
    try:
        return _create_or_open(path)
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        return _create_or_open(path)


class FrameWriter:
    """Worker side: one memory-mapped file per running request.

    A record is stored as plain array assignments (no per-frame syscall or byte building, which
    matters at 512 rows a step): payload first, then its marker, so a reader that sees the marker
    sees the payload. `capacity` is a hint, in records: the worker passes the request's
    `max_tokens`, so the file is sized once (tmpfs keeps untouched pages unallocated, so a large
    hint costs no memory). Past it the file grows by doubling.
    """

    def __init__(self, key: str, hidden_size: int = HIDDEN_SIZE, capacity: int | None = None):
        self.words = record_size(hidden_size) // 4
        self.fd, size = _open_file(frame_path(key))
        self.map: mmap.mmap | None = None
        self.rows: np.ndarray | None = None       # [capacity, words] int32 view of the file
        self.capacity = 0
        want = capacity if capacity is not None and capacity > 0 else DEFAULT_CAPACITY
        # A request that re-enters the batch reopens its file: never shrink what is there.
        self._map(max(want, size // (self.words * 4)), size)

    def _unmap(self) -> None:
        """Drop the mapping. A row view still alive elsewhere (a traceback's or a profiler's
        frame locals) makes `mmap.close` raise BufferError; the mapping then goes when that view
        does, and the worker must not die of it."""
        self.rows = None
        if self.map is not None:
            try:
                self.map.close()
            except BufferError:
                pass
            self.map = None

    def _map(self, capacity: int, size: int) -> None:
        """Map `capacity` records of the file, now `size` bytes long (extended, never cut)."""
        nbytes = capacity * self.words * 4
        if size < nbytes:
            os.ftruncate(self.fd, nbytes)
        self.map = mmap.mmap(self.fd, nbytes)
        self._view(capacity)

    def _view(self, capacity: int) -> None:
        self.rows = np.frombuffer(self.map, dtype=np.int32).reshape(capacity, self.words)
        self.capacity = capacity

    def _grow(self, capacity: int) -> None:
        self.rows = None
        if self.map is not None:
            try:
                # ftruncate + mremap: the pages written so far stay mapped (no fault on them again).
                self.map.resize(capacity * self.words * 4)
            except (BufferError, OSError, SystemError):   # a live row view, or no mremap
                pass
            else:
                self._view(capacity)
                return
        self._unmap()
        self._map(capacity, os.fstat(self.fd).st_size)

    def _row(self, index: int) -> np.ndarray:
        self.reserve(index)
        return self.rows[index]

    def reserve(self, index: int) -> None:
        """Make record `index` writable (grows the map, which moves `base`)."""
        if index >= self.capacity:
            self._grow(max(2 * self.capacity, index + 1))

    @property
    def base(self) -> int:
        """Address of record 0 in this process (valid until the next grow or close)."""
        return self.rows.ctypes.data

    def write(self, index: int, codes: np.ndarray, hidden: np.ndarray) -> None:
        row = self._row(index)
        row[1:1 + NUM_VQ] = codes
        row[1 + NUM_VQ:].view(np.float32)[:] = hidden
        row[0] = index + 1

    def close(self) -> None:
        if self.fd >= 0:
            self._unmap()
            os.close(self.fd)
            self.fd = -1


_HAS_PREADV = hasattr(os, "preadv")


def _read_into(fd: int, buf: np.ndarray, offset: int) -> int:
    """Bytes of the file at `offset` read straight into the contiguous array `buf`."""
    if _HAS_PREADV:
        return os.preadv(fd, [buf], offset)
    data = os.pread(fd, buf.nbytes, offset)
    memoryview(buf).cast("B")[:len(data)] = data
    return len(data)


class FrameReader:
    """Front-end side: reads frames as the engine reports them; `close` removes the file."""

    def __init__(self, key: str, hidden_size: int = HIDDEN_SIZE):
        self.path = frame_path(key)
        self.hidden_size = hidden_size
        self.record = record_size(hidden_size)

    def read(self, start: int, stop: int, timeout: float = 10.0) -> tuple[np.ndarray, np.ndarray]:
        """Frames [start, stop): codes [n, 4] int32 and hidden states [n, hidden] float32, both
        C-contiguous arrays of their own.

        On the GPU path a background thread writes each step's frames just after the engine
        reports them, so a frame may be a moment late: wait (bounded) until every record in the
        range carries its marker. The common case (every frame there) is one read syscall into
        one array; a wait re-reads only from the first record still missing.
        """
        n = max(0, stop - start)
        if n == 0:
            return np.zeros((0, NUM_VQ), np.int32), np.zeros((0, self.hidden_size), np.float32)
        rec = np.empty((n, self.record // 4), np.int32)
        want = np.arange(start + 1, stop + 1, dtype=np.int32)
        deadline, delay = time.monotonic() + timeout, 5e-5
        done, fd = 0, -1                  # records [0, done) of the range are read and marked
        try:
            while True:
                if fd < 0:
                    try:
                        fd = os.open(self.path, os.O_RDONLY)
                    except FileNotFoundError:
                        pass
                if fd >= 0:
                    done = self._fill(fd, rec, start, done, want)
                    if done == n:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"frame side channel {self.path} holds fewer than {stop} frames")
                time.sleep(delay)
                # The sink is about one step behind: poll at most 1 ms apart, so a wait overshoots
                # the write by under 1 ms (a stream's first chunk pays this in its time to first audio).
                delay = min(delay * 2, 1e-3)
        finally:
            if fd >= 0:
                os.close(fd)
        return rec[:, 1:1 + NUM_VQ].copy(), np.ascontiguousarray(rec[:, 1 + NUM_VQ:]).view(np.float32)

    def _fill(self, fd: int, rec: np.ndarray, start: int, done: int, want: np.ndarray) -> int:
        """Read records [done, n) of the range into `rec`; the new count of leading records that
        carry their marker."""
        n, pos = len(rec), done
        while pos < n:
            rows = _read_into(fd, rec[pos:], (start + pos) * self.record) // self.record
            if rows == 0:                 # end of file: the writer has not sized it that far
                break
            pos += rows
        bad = np.flatnonzero(rec[done:pos, 0] != want[done:pos])
        return done + (int(bad[0]) if bad.size else pos - done)

    def close(self) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


def write_records_twin(records: np.ndarray, dest: np.ndarray) -> None:
    """Python twin of the csrc op `write_frame_records`: row i of `records` to address dest[i]
    (0: skipped), payload first, then the marker word."""
    words = records.shape[1]
    for i in np.flatnonzero(dest):
        row = np.ctypeslib.as_array(ctypes.cast(int(dest[i]), ctypes.POINTER(ctypes.c_int32)), (words,))
        row[1:] = records[i, 1:]
        row[0] = records[i, 0]


def _native_writer():
    """torch.ops.chattts_vllm.write_frame_records where the csrc extension is built, else None."""
    from chattts_vllm import ops

    if os.environ.get("CHATTTS_VLLM_NATIVE_SINK", "1") == "0" or not ops.HAS_CUDA_OPS:
        return None
    return getattr(torch.ops.chattts_vllm, "write_frame_records", None)


class FrameSinkThread:
    """Writes committed frames to the side channel off the critical path, in step order.

    Each step's records arrive in one of a few pinned host buffers (a free list, so a sink that
    falls behind makes the sampler wait instead of overwriting a buffer still being read). The
    step's destinations are computed with numpy from per-slot base addresses, and the copy is one
    native call (`write_frame_records`) that releases the GIL: at 512 rows a step, a Python loop
    here held the GIL for milliseconds that the engine thread (scheduler, runner) was waiting for.
    """

    def __init__(self, max_rows: int, words: int, num_buffers: int = 4, native=None) -> None:
        self.jobs: queue.Queue = queue.Queue()
        self.free: queue.Queue = queue.Queue()
        pin = torch.cuda.is_available()
        for _ in range(num_buffers):
            self.free.put(torch.empty(max_rows, words, dtype=torch.int32, pin_memory=pin))
        self.record_bytes = words * 4
        self.writers: dict[int, FrameWriter] = {}
        self.base = np.zeros(max_rows, dtype=np.int64)         # per slot: record 0's address, 0 = none
        self.capacity = np.zeros(max_rows, dtype=np.int64)
        self.write = _native_writer() if native is None else (native or None)   # False: the twin
        threading.Thread(target=self._run, daemon=True, name="chattts-frame-sink").start()

    def open(self, slot: int, key: str | None, capacity: int | None = None) -> None:
        """Slot `slot` now writes to `key`'s file (None: to none); `capacity`: the request's
        max_tokens, so the file is sized once."""
        self.jobs.put(("open", slot, (key, capacity)))

    def close(self, slot: int) -> None:
        self.jobs.put(("close", slot, None))

    def take_buffer(self) -> torch.Tensor:
        return self.free.get()

    def submit(self, event, slots: np.ndarray, host: torch.Tensor, n: int) -> None:
        """`event` (a CUDA event, or None for host data) marks `host[:n]` ready."""
        self.jobs.put(("frames", event, (slots, host, n)))

    def _track(self, slot: int) -> None:
        w = self.writers.get(slot)
        self.base[slot] = w.base if w is not None else 0
        self.capacity[slot] = w.capacity if w is not None else 0

    def _open(self, slot: int, key: str | None, capacity: int | None = None) -> None:
        old = self.writers.pop(slot, None)
        if old is not None:
            old.close()
        if key is not None:
            self.writers[slot] = FrameWriter(key, capacity=capacity)
        self._track(slot)

    def _close(self, slot: int) -> None:
        w = self.writers.pop(slot, None)
        if w is not None:
            w.close()
        self._track(slot)

    def destinations(self, slots: np.ndarray, markers: np.ndarray) -> np.ndarray:
        """Each row's record address (0: no record, or no open writer for its slot)."""
        index = markers.astype(np.int64) - 1
        live = (markers > 0) & (self.base[slots] != 0)
        for i in np.flatnonzero(live & (index >= self.capacity[slots])):   # rare: grow first
            slot = int(slots[i])
            self.writers[slot].reserve(int(index[i]))
            self._track(slot)
        return np.where(live, self.base[slots] + index * self.record_bytes, 0)

    def _frames(self, slots: np.ndarray, host: torch.Tensor, n: int) -> None:
        records = host[:n]
        dest = self.destinations(slots, records[:, 0].numpy())
        if self.write is not None:
            self.write(records, torch.from_numpy(dest))
        else:
            write_records_twin(records.numpy(), dest)

    def _run(self) -> None:
        while True:
            kind, a, b = self.jobs.get()
            try:
                if kind == "open":
                    self._open(a, *b)
                elif kind == "close":
                    self._close(a)
                else:
                    try:
                        if a is not None:
                            a.synchronize()
                        self._frames(*b)
                    finally:
                        self.free.put(b[1])
            except Exception:  # keep the engine alive; the front end reports the missing frame
                logger.exception("chattts frame sink failed on a %s job", kind)
