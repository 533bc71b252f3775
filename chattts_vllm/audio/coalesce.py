"""Coalesced audio network calls: many streams' same-shape decodes become one batched call.

Why: one audio decode is ~70 kernel launches from Python. With N concurrent streams, each decoding
in its own pool thread, the launches are GIL-bound host work that queues up (N x ~15 ms), while the
GPU is nearly idle. The streams usually run in lockstep (same arrival, same block sizes), so their
network calls have the same shapes and can share one launch sequence on a batch.

`Coalescer` owns ONE worker thread. `call(fn, x)` enqueues `x` (leading batch dim) and blocks on a
future; the worker takes the first queued job (blocking), then drains whatever else is queued at
that moment (no waiting window, so a lone call pays no extra latency), groups the jobs by
(fn, x.shape[1:], dtype, device, static args), runs each group as one `fn(torch.cat(xs))` (groups
with the smallest rows first) and hands each caller its rows. A batched call that raises is re-run job by job, so only the callers whose
own input fails get the exception (one bad stream, or a batch too big for memory, fails no other
stream); groups are split so that no call's inputs exceed `max_elements`; the worker lives on.
Callers blocked on a future hold no GIL, so the worker launches without contention.

`CoalescedNet` wraps a model so that `decode_frames` / `spectrum` go through a coalescer while every
other attribute (`context`, `head`, `hop_length`, ...) is the real module's: `StreamingDecoder` and
`decode_utterance` then batch across streams unchanged. `coalesced_models` wraps an `AudioModels`.
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from chattts_vllm.audio.checkpoint import AudioModels

COALESCED_METHODS = ("decode_frames", "spectrum")

Net = Callable[..., torch.Tensor]


@dataclass
class _Job:
    fn: Net
    x: torch.Tensor
    static: tuple
    future: Future = field(default_factory=Future)

    def key(self) -> tuple:
        return (self.fn, tuple(self.x.shape[1:]), self.x.dtype, self.x.device, self.static)


@dataclass
class CoalesceStats:
    """What the worker did: jobs served, network calls made, calls that carried > 1 job."""
    jobs: int = 0
    calls: int = 0
    batched_calls: int = 0
    largest: int = 0            # most jobs in one call
    drains: int = 0             # times the worker emptied the queue
    widest: int = 0             # most groups (distinct keys) in one drain
    retried_batches: int = 0    # batched calls that failed and were re-run job by job


class Coalescer:
    """Batches calls to network functions across threads (see the module docstring)."""

    def __init__(self, name: str = "chattts-audio-coalesce", max_elements: int = 64 * 1024 * 768,
                 pad_batches: bool = False):
        """`max_elements`: inputs of one batched call hold at most this many elements (default:
        64 utterances of 1,024 frames of hidden states); a larger group runs in several calls, so
        batching never needs much more memory than the largest single call.

        `pad_batches`: a call of n rows runs on the next power of two rows (zero rows added, their
        outputs dropped), so that per-shape CUDA graphs (audio/graphs.py) see 7 batch sizes up to
        64 instead of every n. Rows are independent in these networks, so results do not change."""
        self.max_elements = max_elements
        self.pad_batches = pad_batches
        self.stats = CoalesceStats()
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def call(self, fn: Net, x: torch.Tensor, *static: Hashable) -> torch.Tensor:
        """`fn(x, *static)`, run on the worker batched with same-shape calls of other threads.

        `x` has a leading batch dim (1 or B); the result has the same leading dim. `static` args
        must be hashable and are part of the grouping key (only equal ones share a call)."""
        if threading.current_thread() is self._thread:     # a coalesced fn calling another one
            return fn(x, *static)
        if self._closed:
            raise RuntimeError("Coalescer is closed")
        job = _Job(fn, x, static)
        self._queue.put(job)
        return job.future.result()

    def wrap(self, fn: Net) -> Net:
        """`fn` as a function whose calls go through this coalescer."""
        def coalesced(x: torch.Tensor, *static: Hashable) -> torch.Tensor:
            return self.call(fn, x, *static)
        coalesced.__name__ = getattr(fn, "__name__", "coalesced")
        coalesced.__wrapped__ = fn
        return coalesced

    def close(self) -> None:
        """Stop the worker after the jobs already queued (later `call`s raise)."""
        if not self._closed:
            self._closed = True
            self._queue.put(None)
            self._thread.join()

    def __enter__(self) -> Coalescer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- worker ----------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            jobs, stop = self._drain()
            if jobs:
                self._run(jobs)
            if stop:
                return

    def _drain(self) -> tuple[list[_Job], bool]:
        """The first job (blocking), then every job already queued: no waiting window."""
        first = self._queue.get()
        if first is None:
            return [], True
        jobs = [first]
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return jobs, False
            if job is None:
                return jobs, True
            jobs.append(job)

    def _run(self, jobs: list[_Job]) -> None:
        groups: dict[tuple, list[_Job]] = {}
        for job in jobs:                                   # dicts keep the arrival order
            groups.setdefault(job.key(), []).append(job)
        self.stats.drains += 1
        self.stats.widest = max(self.stats.widest, len(groups))
        self.stats.jobs += len(jobs)
        with torch.inference_mode():
            # Smallest inputs first: a stream's first chunk (a few frames) is what its time to
            # first audio waits for, and must not queue behind other streams' long pushes.
            for group in sorted(groups.values(), key=lambda g: g[0].x[:1].numel()):
                live = [j for j in group if j.future.set_running_or_notify_cancel()]
                for batch in self._batches(live):
                    self._run_batch(batch)

    def _batches(self, jobs: list[_Job]) -> list[list[_Job]]:
        """Consecutive runs of `jobs` whose inputs fit `max_elements` (at least one job each)."""
        out: list[list[_Job]] = []
        size = 0
        for job in jobs:
            if out and size + job.x.numel() <= self.max_elements:
                out[-1].append(job)
                size += job.x.numel()
            else:
                out.append([job])
                size = job.x.numel()
        return out

    def _padded(self, rows: int, x: torch.Tensor) -> int:
        """Rows to run `rows` rows as: the next power of two with `pad_batches`, if it fits."""
        if not self.pad_batches or rows < 1:
            return rows
        padded = 1 << (rows - 1).bit_length()
        return padded if padded * (x.numel() // max(1, x.shape[0])) <= self.max_elements else rows

    def _run_batch(self, batch: list[_Job]) -> None:
        self.stats.calls += 1
        self.stats.batched_calls += len(batch) > 1
        self.stats.largest = max(self.stats.largest, len(batch))
        try:
            xs = [j.x for j in batch]
            rows = sum(t.shape[0] for t in xs)
            pad = self._padded(rows, xs[0]) - rows
            if pad:
                xs = xs + [xs[0].new_zeros((pad, *xs[0].shape[1:]))]
            x = xs[0] if len(xs) == 1 else torch.cat(xs, 0)
            out = batch[0].fn(x, *batch[0].static)
            out = out[:rows] if pad else out
            xs = xs[:len(batch)]
            parts = [out] if len(batch) == 1 else out.split([t.shape[0] for t in xs], 0)
        except BaseException as e:     # noqa: BLE001 - reported to the callers, never lost
            if len(batch) == 1:
                batch[0].future.set_exception(e)
            else:
                # One bad input (or a batch too large for memory) must not fail the other
                # streams: each job runs alone, and only those that fail alone get an error.
                self.stats.retried_batches += 1
                for j in batch:
                    self._run_batch([j])
            return
        for j, part in zip(batch, parts):
            j.future.set_result(part)


class CoalescedNet:
    """A model whose `decode_frames` / `spectrum` go through a coalescer; all else is the model's.

    Not an nn.Module: it holds no state of its own, so `module` stays the one to move, graph or
    inspect."""

    def __init__(self, module: torch.nn.Module, coalescer: Coalescer,
                 methods: tuple[str, ...] = COALESCED_METHODS):
        self.module = module
        for name in methods:
            if hasattr(module, name):
                setattr(self, name, coalescer.wrap(getattr(module, name)))

    def __getattr__(self, name: str):          # only reached for what __init__ did not set
        return getattr(self.module, name)

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def __repr__(self) -> str:
        return f"CoalescedNet({self.module.__class__.__name__})"


def coalesced_models(models: AudioModels, coalescer: Coalescer) -> AudioModels:
    """The same models with their network entry points routed through `coalescer`."""
    def wrap(m):
        return None if m is None else CoalescedNet(m, coalescer)
    return AudioModels(decoder=wrap(models.decoder), dvae=wrap(models.dvae), vocos=wrap(models.vocos))
