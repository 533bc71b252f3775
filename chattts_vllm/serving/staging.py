"""Pinned host buffers for the offline decode's copies, reused across calls.

Why: the decode after a GPT batch moved its data through pageable host memory. Under torch.profiler
on an H200 host (2026-11-29, 256 ten-second utterances per engine) the audio's copy back ran at
~1.7 GB/s (143 ms), the hidden states' copy in took 54 ms and stacking them 53 ms, against ~60 ms
of Decoder + Vocos kernels. Stacking straight into pinned memory, copying both ways
asynchronously from and to it, and keeping two of each (so the host copies one chunk's audio out
while the GPU decodes the next) turns that sum into roughly its largest part. Pinning costs
~0.1 s per few hundred MB, so the buffers are kept per thread and only grow.
"""
from __future__ import annotations

import math
import threading

import torch

_LOCAL = threading.local()


class PinnedStaging:
    """Named, growing pinned buffers (flat; callers view them in their shape)."""

    def __init__(self) -> None:
        self._bufs: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        numel = math.prod(shape)
        buf = self._bufs.get((name, dtype))
        if buf is None or buf.numel() < numel:
            buf = torch.empty(numel, dtype=dtype, pin_memory=True)
            self._bufs[(name, dtype)] = buf
        return buf[:numel].view(shape)


def thread_staging() -> PinnedStaging:
    """This thread's buffers (one decode at a time per thread uses them)."""
    st = getattr(_LOCAL, "staging", None)
    if st is None:
        st = _LOCAL.staging = PinnedStaging()
    return st
