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

import collections
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
from collections.abc import Iterator
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


def record_fields(rec: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Views of the codes ([..., 4] int32) and hidden states ([..., hidden] float32) of raw
    int32 records ([..., words], any leading dims): no copies."""
    return rec[..., 1:1 + NUM_VQ], rec[..., 1 + NUM_VQ:].view(np.float32)


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
        self._fd = -1                       # kept open by `has`

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
        codes, hidden = record_fields(self.read_records(start, stop, timeout=timeout))
        return codes.copy(), np.ascontiguousarray(hidden)

    def read_records(self, start: int, stop: int, timeout: float = 10.0,
                     out: np.ndarray | None = None) -> np.ndarray:
        """The raw records [start, stop) as `read` waits for them, into `out` ([n, words] int32,
        C-contiguous) if given: a caller that reads many files into one array makes no copies
        under the GIL (the reads are syscalls that release it)."""
        n = max(0, stop - start)
        rec = np.empty((n, self.record // 4), np.int32) if out is None else out
        if rec.shape != (n, self.record // 4) or not rec.flags.c_contiguous:
            raise ValueError(f"out must be a C-contiguous [{n}, {self.record // 4}] array")
        want = np.arange(start + 1, stop + 1, dtype=np.int32)
        attempts = self._attempts(stop, timeout)
        done, fd = 0, -1                  # records [0, done) of the range are read and marked
        try:
            while done < n:
                next(attempts)
                if fd < 0:
                    try:
                        fd = os.open(self.path, os.O_RDONLY)
                    except FileNotFoundError:
                        pass
                if fd >= 0:
                    done = self._fill(fd, rec, start, done, want)
        finally:
            if fd >= 0:
                os.close(fd)
        return rec

    def _attempts(self, stop: int, timeout: float) -> Iterator[float]:
        """Yields the seconds left, once per attempt at frames up to `stop`; before each attempt
        but the first it sleeps, and it raises once `timeout` has passed."""
        deadline, delay = time.monotonic() + timeout, 5e-5
        while True:
            yield max(0.0, deadline - time.monotonic())
            if time.monotonic() > deadline:
                raise RuntimeError(f"frame side channel {self.path} holds fewer than {stop} frames")
            time.sleep(delay)
            # The sink is about one step behind: poll at most 1 ms apart, so a wait overshoots
            # the write by under 1 ms (a stream's first chunk pays this in its time to first audio).
            delay = min(delay * 2, 1e-3)

    def map_records(self, stop: int, timeout: float = 10.0) -> np.ndarray:
        """Records [0, stop) as `read_records` returns them, but without copying: a view of a
        private (copy-on-write) mapping of the file, which keeps its pages after the file is
        removed, until the view is gone. For results read once after the engine is done.

        Why: reading 512 ten-second results back (~740 MB) into fresh arrays, then copying the
        hidden states out of the records, cost ~0.5 s per 300-frame batch of 512 on an H200 host
        (profile_gpt_step.py: 760 ms per batch against 75 ms without the read-back), which the
        GPT-only figure paid as the engine's fixed cost. Mapped, the page cache's pages are
        shared, not copied (0.33 -> 0.13 s for 512 x 470 frames on the 2-core CPU box; a
        prefaulted MAP_POPULATE of a writable private map copies every page, and was slower)."""
        words = self.record // 4
        if stop <= 0:
            return np.zeros((0, words), np.int32)
        want = np.arange(1, stop + 1, dtype=np.int32)
        for left in self._attempts(stop, timeout):
            try:
                fd = os.open(self.path, os.O_RDONLY)
            except FileNotFoundError:
                fd = -1
            if fd >= 0:
                try:
                    # Never map past the end: touching such a page would be SIGBUS, not an error.
                    if os.fstat(fd).st_size >= stop * self.record:
                        try:
                            m = mmap.mmap(fd, stop * self.record, flags=mmap.MAP_PRIVATE,
                                          prot=mmap.PROT_READ | mmap.PROT_WRITE)
                        except OSError:   # e.g. vm.max_map_count reached by a huge batch: copy
                            return self.read_records(0, stop, timeout=left)
                        rec = np.frombuffer(m, np.int32).reshape(stop, words)
                        if np.array_equal(rec[:, 0], want):
                            return rec
                        del rec
                        m.close()
                finally:
                    os.close(fd)
        raise AssertionError("unreachable: _attempts raises at the deadline")

    def has(self, index: int) -> bool:
        """Whether record `index` is written (frames are written in order, so all before it are).
        Keeps the file open for the next call (a watcher polls hundreds of files); `release`."""
        if self._fd < 0:
            try:
                self._fd = os.open(self.path, os.O_RDONLY)
            except FileNotFoundError:
                return False
        marker = os.pread(self._fd, 4, index * self.record)
        return len(marker) == 4 and int.from_bytes(marker, "little", signed=True) == index + 1

    def release(self) -> None:
        """Close the file `has` keeps open (the file itself stays)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

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
        self.release()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


def write_step_twin(records: np.ndarray, base: np.ndarray, capacity: np.ndarray) -> int:
    """Python twin of csrc/frame_sink.cpp's `write_step`: row i of `records` to its record in the
    file mapped at base[i] (0: none), payload first, then the marker; rows past their file's
    capacity are dropped. Returns the number dropped."""
    words = records.shape[1]
    markers = records[:len(base), 0].astype(np.int64)
    live = (markers > 0) & (base != 0)
    over = live & (markers > capacity)
    for i in np.flatnonzero(live & ~over):
        addr = int(base[i] + (markers[i] - 1) * words * 4)
        row = np.ctypeslib.as_array(ctypes.cast(addr, ctypes.POINTER(ctypes.c_int32)), (words,))
        row[1:] = records[i, 1:]
        row[0] = records[i, 0]
    return int(over.sum())


class SinkTwin:
    """Python twin of the native `FrameSinkWorker`: a thread that writes pushed steps in order.

    `push(records, base, capacity, event)` waits for `event` (a CUDA event, or None for host
    data) on the thread before writing; `submitted`/`completed` count steps, `wait(seq)` blocks.
    """

    def __init__(self, words: int) -> None:
        self.words = words
        self.jobs: queue.Queue = queue.Queue()
        self.cond = threading.Condition()
        self._submitted = self._completed = self._dropped = 0
        threading.Thread(target=self._run, daemon=True, name="chattts-frame-sink").start()

    def push(self, records: torch.Tensor, base: torch.Tensor, capacity: torch.Tensor,
             event=None) -> int:
        self._submitted += 1
        self.jobs.put((self._submitted, records, base.numpy().copy(), capacity.numpy().copy(), event))
        return self._submitted

    def submitted(self) -> int:
        return self._submitted

    def completed(self) -> int:
        return self._completed

    def dropped(self) -> int:
        return self._dropped

    def wait(self, seq: int, timeout_s: float) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: self._completed >= seq, timeout_s)

    def _run(self) -> None:
        while True:
            seq, records, base, capacity, event = self.jobs.get()
            try:
                if event is not None:
                    event.synchronize()
                self._dropped += write_step_twin(records.numpy(), base, capacity)
            except Exception:  # keep the engine alive; the front end reports the missing frame
                logger.exception("chattts frame sink failed on step %d", seq)
            with self.cond:
                self._completed = seq
                self.cond.notify_all()


# The native worker's push returns these instead of raising (csrc/frame_sink.cpp says why).
SINK_ERRORS = {-1: "records must be a contiguous CPU int32 [rows, words] tensor",
               -2: "base and capacity must be contiguous CPU int64 [n], n <= rows",
               -3: "cudaLaunchHostFunc failed (the step completes unwritten)",
               -4: "built without CUDA; use push",
               -5: "a record needs its marker word (words >= 1)"}


def pushed(seq: int) -> int:
    """A push's sequence number, or RuntimeError for the native worker's error codes."""
    if seq < 1:
        raise RuntimeError(f"FrameSinkWorker: {SINK_ERRORS.get(seq, f'error {seq}')}")
    return seq


def _native_worker(words: int):
    """torch.classes.chattts_vllm.FrameSinkWorker where the csrc extension is built, else None."""
    from chattts_vllm import ops

    if os.environ.get("CHATTTS_VLLM_NATIVE_SINK", "1") == "0" or not ops.HAS_CUDA_OPS:
        return None
    try:
        return torch.classes.chattts_vllm.FrameSinkWorker(words)
    except (AttributeError, RuntimeError):
        return None


WAIT_S = 60.0      # a step the worker has not written by then is an error, not a hang


class FrameSink:
    """Model runner V2's side channel: per slot an open file, per step one push of its records.

    The engine thread opens and closes the files (`open` at a request's arrival, sized from its
    max_tokens so a file never grows while steps are in flight) and per step only gathers each
    row's file address and pushes the pinned buffer: the native worker (csrc/frame_sink.cpp)
    takes the step when the CUDA stream has copied it and writes it with no Python, so the sink
    never competes for the GIL that the scheduler holds. A closed file is unmapped once every step
    pushed before its close is written. Steps use a ring of pinned buffers; a buffer is reused
    after its step is written (the engine waits only if the worker is `num_buffers` steps behind).
    `native=False` (or no extension) uses `SinkTwin`.
    """

    def __init__(self, max_rows: int, words: int, num_buffers: int = 4, native=None) -> None:
        self.cuda = torch.cuda.is_available()
        worker = _native_worker(words) if native is None else (native(words) if native else None)
        self.native = worker is not None
        self.worker = worker if worker is not None else SinkTwin(words)
        self.buffers = [torch.empty(max_rows, words, dtype=torch.int32, pin_memory=self.cuda)
                        for _ in range(num_buffers)]
        self.buffer_seq = [0] * num_buffers        # the step last pushed from each buffer
        self.next_buffer = 0
        self.writers: dict[int, FrameWriter] = {}
        self.base = np.zeros(max_rows, dtype=np.int64)         # per slot: record 0's address, 0 = none
        self.capacity = np.zeros(max_rows, dtype=np.int64)
        self.closing: collections.deque[tuple[int, FrameWriter]] = collections.deque()
        self.reported_drops = 0

    def open(self, slot: int, key: str | None, capacity: int | None = None) -> None:
        """Slot `slot` now writes to `key`'s file (None: to none), sized for `capacity` records."""
        self.close(slot)
        if key is not None:
            w = FrameWriter(key, capacity=capacity)
            self.writers[slot] = w
            self.base[slot], self.capacity[slot] = w.base, w.capacity

    def close(self, slot: int) -> None:
        w = self.writers.pop(slot, None)
        self.base[slot] = self.capacity[slot] = 0
        if w is not None:
            self.closing.append((self.worker.submitted(), w))
        self._reap()

    def _reap(self) -> None:
        done = self.worker.completed()
        while self.closing and self.closing[0][0] <= done:
            self.closing.popleft()[1].close()

    def take_buffer(self) -> torch.Tensor:
        i = self.next_buffer
        if self.worker.completed() < self.buffer_seq[i]:
            if not self.worker.wait(self.buffer_seq[i], WAIT_S):
                raise RuntimeError(f"chattts frame sink: step {self.buffer_seq[i]} not written "
                                   f"after {WAIT_S:.0f} s (its stream never reached it?)")
        return self.buffers[i]

    def submit(self, slots: np.ndarray, host: torch.Tensor, n: int) -> None:
        """Push rows [0, n) of `host` (the buffer from `take_buffer`, filled on the current stream
        when on CUDA); row i belongs to slot slots[i]."""
        i = self.next_buffer
        assert host is self.buffers[i], "submit the buffer that take_buffer returned"
        if self.cuda and torch.cuda.is_current_stream_capturing():
            return      # a graph-capture dummy run: a host callback must not enter the graph
        self.next_buffer = (i + 1) % len(self.buffers)
        base = torch.from_numpy(self.base[slots[:n]])
        capacity = torch.from_numpy(self.capacity[slots[:n]])
        if not self.cuda:
            seq = pushed(self.worker.push(host, base, capacity))
        elif self.native:
            seq = pushed(self.worker.push_after_stream(host, base, capacity,
                                                       torch.cuda.current_stream().cuda_stream))
        else:
            event = torch.cuda.Event()
            event.record()
            seq = self.worker.push(host, base, capacity, event)
        self.buffer_seq[i] = seq
        self._reap()
        drops = self.worker.dropped()
        if drops != self.reported_drops:
            logger.error("chattts frame sink: %d records past their file's capacity were dropped",
                         drops - self.reported_drops)
            self.reported_drops = drops

    def drain(self, timeout_s: float = WAIT_S) -> None:
        """Wait until every pushed step is written and every closed file unmapped."""
        if not self.worker.wait(self.worker.submitted(), timeout_s):
            raise RuntimeError("chattts frame sink: steps still unwritten after the timeout")
        self._reap()
