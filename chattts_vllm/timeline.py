"""Wall-clock event log across a server's processes, for latency diagnosis.

With `CHATTTS_VLLM_TIMELINE=<dir>`, the engine core logs each ChatTTS request's admission to the
model runner and each step (rows, tokens, arrivals, host time from the step's inputs to its
sampler), and every API process logs each streamed request's first-audio stamps (HTTP start,
submitted, first frames, first audio). Each process appends JSON lines to `<dir>/<role>.<pid>.jsonl`
from a buffer that a daemon thread flushes every half second. Why: the time to first audio of a
burst of simultaneous streams is made in several processes at once, and neither the metrics (means
per stage) nor a stack sampler (aggregates) say which step a request waited for.
`benchmarks/timeline_report.py` joins the files. Off (the default), every call is one `None` test.
"""
from __future__ import annotations

import json
import os
import threading
import time

ENV = "CHATTTS_VLLM_TIMELINE"
FLUSH_S = 0.5


class Timeline:
    """Buffered JSON-lines writer of `(kind, wall time, fields)` events for one process."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lines: list[str] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._flush_loop, daemon=True, name="chattts-timeline").start()

    def event(self, kind: str, t: float | None = None, **fields) -> None:
        line = json.dumps({"kind": kind, "t": time.time() if t is None else t, **fields})
        with self._lock:
            self._lines.append(line)

    def flush(self) -> None:
        with self._lock:
            lines, self._lines = self._lines, []
        if lines:
            with open(self.path, "a") as f:
                f.write("\n".join(lines) + "\n")

    def _flush_loop(self) -> None:
        while True:
            time.sleep(FLUSH_S)
            try:
                self.flush()
            except OSError:
                pass


_timelines: dict[str, Timeline] = {}


def timeline(role: str) -> Timeline | None:
    """This process's timeline for `role` (`engine`, `api`), or None when the variable is unset."""
    folder = os.environ.get(ENV)
    if not folder:
        return None
    if role not in _timelines:
        os.makedirs(folder, exist_ok=True)
        _timelines[role] = Timeline(os.path.join(folder, f"{role}.{os.getpid()}.jsonl"))
    return _timelines[role]


def wall(perf: float) -> float:
    """A `time.perf_counter()` stamp as wall-clock time (to compare stamps across processes)."""
    return time.time() - (time.perf_counter() - perf)
