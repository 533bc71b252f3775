"""Where a process's host time goes: every thread's Python stack sampled at a fixed period.

Used by `benchmarks/profile_gpt_step.py` around one batch, and by any vLLM process of a server with
`CHATTTS_VLLM_STACK_SAMPLE=<path prefix>` (`start_from_env`, called from the plugin's `register`):
the API server (HTTP, output processing, streams, audio pool, coalescer) and the engine core then
each rewrite `<prefix>.<pid>.txt` every few seconds, so a serving benchmark shows what its
processes spent their time on without a profiler that slows them ~3x (cProfile).
"""
from __future__ import annotations

import os
import sys
import threading
import time
from collections import Counter

AREAS = [  # first match wins, innermost frame first: where a sampled moment of host time goes
    ("chattts glue", "chattts_vllm/runners/"), ("chattts model", "chattts_vllm/gpt/"),
    ("chattts ops", "chattts_vllm/ops"), ("chattts serving", "chattts_vllm/serving/"),
    ("chattts audio", "chattts_vllm/audio/"), ("chattts kernels", "/kernels/"),
    ("chattts other", "chattts_vllm/"),
    ("vllm scheduler", "vllm/v1/core/"), ("vllm model runner", "vllm/v1/worker/"),
    ("vllm sampler", "vllm/v1/sample/"), ("vllm output processing", "vllm/v1/engine/"),
    ("vllm attention", "vllm/v1/attention/"), ("vllm entrypoints", "vllm/entrypoints/"),
    ("vllm other", "vllm/"), ("torch", "torch/"), ("triton", "triton/"),
    ("http", "uvicorn/"), ("http", "starlette/"), ("http", "fastapi/"), ("zmq", "zmq/"),
    ("asyncio", "asyncio/"),
]
ENV = "CHATTTS_VLLM_STACK_SAMPLE"
ENV_PERIOD = "CHATTTS_VLLM_STACK_SAMPLE_MS"


# Innermost frames of a thread that is blocked, not working: the event loop's select, a thread
# waiting on a lock, condition, queue or zmq poll. Their samples are "waiting", whatever called.
WAITS = (("selectors.py", "select"), ("threading.py", "wait"), ("queue.py", "get"),
         ("zmq/sugar/poll.py", "poll"), ("concurrent/futures/_base.py", "result"),
         ("vllm/distributed/utils.py", "sched_yield"))


def _area(frame) -> str:
    code = frame.f_code
    if any(code.co_filename.endswith(f) and code.co_name == n for f, n in WAITS):
        return "waiting"
    while frame is not None:
        path = frame.f_code.co_filename
        for area, key in AREAS:
            if key in path:
                return area
        frame = frame.f_back
    return "other"


def _where(code) -> str:
    return f"{code.co_filename.split('site-packages/')[-1]}:{code.co_name}"


class StackSampler:
    """Samples every thread's Python stack at a fixed period (a thread of its own): per thread,
    the share of samples by area (innermost recognised frame) and the top functions (innermost
    frame, and inclusive), as ms per step of the sampled run's wall time. A thread blocked in C
    without the GIL still shows its last Python frame, so a thread's 100 % is wall time, not CPU
    time. The sampler needs the GIL to look, so the switch interval is cut to the period while it
    runs (else samples would cluster where the GIL happens to be released)."""

    def __init__(self, period_s: float):
        self.period = period_s
        self.areas: dict[str, Counter] = {}
        self.own: dict[str, Counter] = {}
        self.incl: dict[str, Counter] = {}
        self.samples = 0
        self.wall = 0.0
        self._stop = threading.Event()

    def __enter__(self):
        self._switch = sys.getswitchinterval()
        sys.setswitchinterval(min(self.period, self._switch))     # never longer than it was
        self._thread = threading.Thread(target=self._run, daemon=True, name="stack-sampler")
        self.t0 = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.t0
        self._stop.set()
        self._thread.join()
        sys.setswitchinterval(self._switch)

    def _run(self) -> None:
        me = threading.get_ident()
        names = {t.ident: t.name for t in threading.enumerate()}
        while not self._stop.wait(self.period):
            self.samples += 1
            for ident, frame in sys._current_frames().items():
                if ident == me:
                    continue
                if ident not in names:
                    names = {t.ident: t.name for t in threading.enumerate()}
                tname = names.get(ident, str(ident))
                self.areas.setdefault(tname, Counter())[_area(frame)] += 1
                self.own.setdefault(tname, Counter())[_where(frame.f_code)] += 1
                seen, f = set(), frame
                while f is not None:
                    key = _where(f.f_code)
                    if key not in seen:
                        seen.add(key)
                        self.incl.setdefault(tname, Counter())[key] += 1
                    f = f.f_back
            # Hold no frame between samples: a frame keeps its locals alive (e.g. a numpy view
            # of a memory map that its owner is about to close).
            frame = f = None

    def report_text(self, steps: int = 1, top: int = 30, unit: str = "ms/step") -> str:
        """The report; times are wall ms per `steps` (1: ms over the whole sampled run)."""
        wall = self.wall or (time.perf_counter() - self.t0)
        ms = wall * 1e3 / max(1, self.samples)                # wall ms one sample stands for
        lines = [f"stack sampler: {self.samples} samples over {wall:.2f} s "
                 f"({ms:.2f} ms apart, asked {self.period * 1e3:.2f})"]
        for tname, areas in sorted(self.areas.items(), key=lambda kv: kv[0]):
            total = sum(areas.values())
            lines.append(f"\n-- thread {tname}: {total} samples ({total * ms / steps:.2f} {unit})")
            for area, n in areas.most_common():
                lines.append(f"   {area:24s} {100 * n / total:5.1f} %  {n * ms / steps:8.2f} {unit}")
            lines.append("   innermost frames:")
            for key, n in self.own[tname].most_common(min(top, 15)):
                lines.append(f"     {n * ms / steps:8.2f} {unit}  {key}")
            lines.append("   inclusive:")
            for key, n in self.incl[tname].most_common(top):
                lines.append(f"     {n * ms / steps:8.2f} {unit}  {key}")
        return "\n".join(lines)

    def report(self, steps: int, top: int) -> None:
        print("\n" + self.report_text(steps, top))


_started: StackSampler | None = None


def start_from_env(dump_every_s: float = 5.0) -> StackSampler | None:
    """With CHATTTS_VLLM_STACK_SAMPLE=<prefix>: sample this process (every
    CHATTTS_VLLM_STACK_SAMPLE_MS, default 2) and rewrite `<prefix>.<pid>.txt` every
    `dump_every_s`, in ms over the whole run so far. Once per process; a no-op without the
    variable."""
    global _started
    prefix = os.environ.get(ENV)
    if not prefix or _started is not None:
        return _started
    _started = StackSampler(float(os.environ.get(ENV_PERIOD, "2")) / 1e3).__enter__()
    path = f"{prefix}.{os.getpid()}.txt"

    def dump() -> None:
        while True:
            time.sleep(dump_every_s)
            try:
                text = f"pid {os.getpid()} argv {' '.join(sys.argv)[:200]}\n" + _started.report_text(unit="ms")
                with open(path + ".tmp", "w") as f:
                    f.write(text)
                os.replace(path + ".tmp", path)
            except (OSError, RuntimeError):     # e.g. a dict changed size while reading: next time
                pass

    threading.Thread(target=dump, daemon=True, name="stack-sampler-dump").start()
    return _started
