"""Several engines on one host: CPU core slices, and one engine start at a time per GPU.

A ChatTTS engine's step loop is host-bound (the GPU is busy ~4.3 ms of a ~10 ms step at batch 512),
so several engines share one GPU. Floating over all of a host's cores, their loops, torch pools and
sink workers migrate onto each other: on one H200 (16 cores, 2 engines under MPS, batch 1024 split)
the median end to end went from 1,283 audio-s/s floating to 1,558 with each engine on its own slice
of the cores (benchmarks/bench_throughput.py `--pin-cores`, 2026-11-29).

`core_slice` is the split; `claim_slot` hands each engine process on a host a distinct slot without
a coordinator (a lock file per slot, held for the life of the process, so a dead engine's slot
frees itself and its replacement takes it); `pin_process` moves every thread of the process there.

`one_start_per_gpu` serialises engine starts on a shared GPU: vLLM sizes an engine's KV cache from
the GPU memory it sees change while it profiles (device-wide), so engines starting together on one
GPU would count each other's allocations.
"""
from __future__ import annotations

import fcntl
import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path


def core_slice(cores: Sequence[int], k: int, n: int) -> list[int]:
    """Slot k's share of `cores` among n slots (all of them if there are fewer cores than slots)."""
    cores = sorted(cores)
    if len(cores) < n:
        return cores
    return cores[k * len(cores) // n:(k + 1) * len(cores) // n]


def _lock_dir() -> Path:
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())


def _open_lock(name: str, lock_dir: Path | None) -> int:
    return os.open((lock_dir or _lock_dir()) / name, os.O_RDWR | os.O_CREAT, 0o666)


class CoreSlot:
    """Slot `index` on this host, held while this object (its locked file) lives."""

    def __init__(self, index: int, fd: int):
        self.index, self._fd = index, fd

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)                   # closing drops the flock
            self._fd = -1


def claim_slot(count: int, lock_dir: Path | None = None) -> CoreSlot | None:
    """The lowest free slot of `count` on this host, or None when every slot is held."""
    for i in range(count):
        fd = _open_lock(f"chattts-vllm-cores-{count}-{i}.lock", lock_dir)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        return CoreSlot(i, fd)
    return None


def pin_process(cores: Sequence[int]) -> None:
    """Every thread of this process (and what it starts later, which inherits) onto `cores`.

    `sched_setaffinity(0, ...)` alone moves only the calling thread; threads already running
    (Ray's, an OpenMP pool) would stay where they were."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cores)
        except (ProcessLookupError, PermissionError):  # a thread that just ended
            pass
    os.sched_setaffinity(0, cores)


def pin_to_slot(count: int, lock_dir: Path | None = None) -> tuple[CoreSlot | None, list[int]]:
    """Claim a slot of `count` and pin this process to its slice; (None, all cores) if none is free."""
    cores = sorted(os.sched_getaffinity(0))
    slot = claim_slot(count, lock_dir)
    if slot is None:
        return None, cores
    mine = core_slice(cores, slot.index, count)
    pin_process(mine)
    return slot, mine


@contextmanager
def one_start_per_gpu(gpu_ids: Sequence[str | int], lock_dir: Path | None = None) -> Iterator[None]:
    """Hold each of these GPUs' host-wide start locks (taken in sorted order, so two engines on the
    same pair of GPUs cannot deadlock) for the body: an engine's start and memory profiling."""
    fds = []
    try:
        for g in sorted({str(g) for g in gpu_ids}):
            fd = _open_lock(f"chattts-vllm-start-gpu-{g}.lock", lock_dir)
            fds.append(fd)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        for fd in fds:
            os.close(fd)
