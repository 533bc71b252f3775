"""CUDA-graph replay of the audio decode, one graph per input shape.

The Triton decode of one batch is ~70 kernel launches (ConvNeXt blocks, convs, head, ISTFT); for
short inputs — a streaming push, one utterance — the host-side launch cost (Triton's launcher and
TMA descriptor setup) exceeds the GPU time. `GraphCache(fn)` captures `fn(x)` for an input shape
the `min_calls`-th time that shape is seen (so one-off lengths never pay a capture) and replays it
afterwards: the input is copied into the graph's static buffer, the graph replays, and the output
is cloned out (so callers own their result). Captures share one memory pool; replays are
serialised by one lock, so the shared pool's intermediates never overlap.

Enabled for the models' decode paths with `enable_cuda_graphs(module)` (Decoder, DVAE, Vocos: see
their `decode_frames`), which `load_audio_models` does on CUDA when `CHATTTS_AUDIO_CUDA_GRAPHS=1`.
The graphs replay the same kernels as eager calls, so results are bit-identical.

`freeze_cuda_graphs(module)` stops new captures: shapes captured so far keep replaying, any other
runs eagerly. The server captures its streams' fixed shapes at start-up and then freezes, because
a capture while serving holds the replay lock for tens of milliseconds while every other stream
waits (what made graphs slower in the server on the H100, 2026-11-28: streaming pushes come in
many shapes).
"""
from __future__ import annotations

import collections
import os
import threading
from typing import Callable

import torch

_LOCK = threading.RLock()
_POOL = None
_LOCAL = threading.local()          # .eager > 0: inside a capture's warm-up (nested caches run eagerly)
GRAPHED_METHODS = ("decode_frames", "spectrum")


def graphs_enabled_by_env() -> bool:
    return os.environ.get("CHATTTS_AUDIO_CUDA_GRAPHS", "0") == "1"


def _pool():
    global _POOL
    if _POOL is None:
        _POOL = torch.cuda.graph_pool_handle()
    return _POOL


class _Entry:
    __slots__ = ("graph", "static_in", "static_out")

    def __init__(self, graph, static_in, static_out):
        self.graph, self.static_in, self.static_out = graph, static_in, static_out


class GraphCache:
    """fn(x) → Tensor, replayed from a CUDA graph per (shape, stride, dtype, device) of x.

    min_calls:   capture when a shape is seen for the min_calls-th time (earlier calls run eagerly);
                 the first eager call also runs any Triton autotuning, which a capture cannot.
    max_entries: least recently used graphs beyond this are dropped.
    max_numel:   inputs larger than this always run eagerly (launch cost is noise there, and every
                 graph's buffers stay allocated).
    """

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], *, min_calls: int = 2,
                 max_entries: int = 32, max_numel: int | None = None, copy_out: bool = True):
        self.fn = fn
        self.min_calls = max(1, min_calls)
        self.max_entries = max_entries
        self.max_numel = max_numel
        self.copy_out = copy_out
        self._graphs: collections.OrderedDict[tuple, _Entry] = collections.OrderedDict()
        self._seen: collections.Counter = collections.Counter()
        self.captures = 0
        self.replays = 0
        self.frozen = False                 # True: no new captures (see freeze_cuda_graphs)

    def _key(self, x: torch.Tensor) -> tuple:
        return tuple(x.shape), x.stride(), x.dtype, x.device, torch.is_inference_mode_enabled()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if (not x.is_cuda or torch.cuda.is_current_stream_capturing() or getattr(_LOCAL, "eager", 0)
                or (self.max_numel is not None and x.numel() > self.max_numel)):
            return self.fn(x)
        key = self._key(x)
        with _LOCK:
            entry = self._graphs.get(key)
            if entry is None and self.frozen:
                return self.fn(x)
            if entry is None:
                self._seen[key] += 1
                if self._seen[key] < self.min_calls:
                    return self.fn(x)
                entry = self._capture(x)
                self._graphs[key] = entry
                while len(self._graphs) > self.max_entries:
                    self._graphs.popitem(last=False)
            else:
                self._graphs.move_to_end(key)
            entry.static_in.copy_(x)
            entry.graph.replay()
            self.replays += 1
            if not self.copy_out:
                return entry.static_out
            so = entry.static_out       # same strides as eager (a padded-row view stays one)
            return torch.empty_strided(so.shape, so.stride(), dtype=so.dtype, device=so.device).copy_(so)

    def _capture(self, x: torch.Tensor) -> _Entry:
        static_in = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
        static_in.copy_(x)
        side = torch.cuda.Stream(x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        _LOCAL.eager = getattr(_LOCAL, "eager", 0) + 1
        try:
            with torch.cuda.stream(side):
                self.fn(static_in)              # warm-up: autotuning, weight re-layout caches
        finally:
            _LOCAL.eager -= 1
        torch.cuda.current_stream(x.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=_pool(), capture_error_mode="thread_local"):
            static_out = self.fn(static_in)
        self.captures += 1
        return _Entry(graph, static_in, static_out)

    def clear(self) -> None:
        with _LOCK:
            self._graphs.clear()
            self._seen.clear()


def graphed_call(module: torch.nn.Module, name: str, eager: Callable, x: torch.Tensor) -> torch.Tensor:
    """`module.<name>(x)`: through its GraphCache when `enable_cuda_graphs` set one, else `eager(x)`."""
    caches = module.__dict__.get("_graph_caches")
    cache = caches.get(name) if caches else None
    return cache(x) if cache is not None else eager(x)


def enable_cuda_graphs(module: torch.nn.Module, **kw) -> torch.nn.Module:
    """Replay `decode_frames` (Decoder, DVAE, Vocos) and `spectrum` (Vocos, the streaming path) from
    per-shape CUDA graphs on CUDA inputs; `kw` go to GraphCache. Returns the module."""
    module.__dict__["_graph_caches"] = {
        name: GraphCache(getattr(module, f"_{name}"), **kw)
        for name in GRAPHED_METHODS if hasattr(module, f"_{name}")}
    return module


def freeze_cuda_graphs(module: torch.nn.Module) -> int:
    """No new captures in `module`'s caches from now on; returns the graphs it keeps."""
    caches = module.__dict__.get("_graph_caches") or {}
    for cache in caches.values():
        cache.frozen = True
    return sum(len(c._graphs) for c in caches.values())


def disable_cuda_graphs(module: torch.nn.Module) -> torch.nn.Module:
    module.__dict__.pop("_graph_caches", None)
    return module
