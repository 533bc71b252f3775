"""Host cost of the frame side channel per request: writer open / close, growth, and the read back.

Mirrors one offline batch of the model runner V2 path: `--requests` writers opened through a
`FrameSink` (capacity `--capacity` records), `--frames` steps of one record per request written by
the sink's worker (the Python twin, or the native worker with --native where it is built), the
writers closed, then every request read back the
way `collect_code_result` does (`FrameReader.read(0, n)`, code 0 checked, the file removed).
A last phase times reads that find their last frame missing (it lands `--late-ms` later), the
case of a sink one step behind the engine: the reader's CPU while it polls.

Open and close are timed on the caller's thread (wall and thread CPU time); a step from its push
to written (an older module's `FrameSinkThread` jobs are timed inside its thread). These are bare
costs: in the engine, the twin's thread also competes for the GIL. The frame directory is a fresh folder under
/dev/shm (tmpfs) unless CHATTTS_VLLM_FRAME_DIR is set. Writes
benchmarks/results/frame-channel-cpu-<date>[-<label>].json and prints one line.

    python benchmarks/bench_frame_channel.py [--requests 512] [--frames 470] [--repeat 3]
    # an older outputs.py, e.g. for a before/after pair (its JSON gets a -<label> suffix):
    git show b37f200:chattts_vllm/runners/outputs.py > /tmp/old_outputs.py
    python benchmarks/bench_frame_channel.py --outputs /tmp/old_outputs.py --label before-b37f200
"""
from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import inspect
import json
import os
import platform
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from bench_common import cpu_name


def load_outputs(path: Path | None):
    if path is None:
        from chattts_vllm.runners import outputs
        return outputs
    spec = importlib.util.spec_from_file_location("bench_outputs_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class Timed:
    """Wraps a callable; records wall and thread-CPU microseconds of every call."""

    def __init__(self, fn):
        self.fn, self.wall, self.cpu = fn, [], []

    def __call__(self, *a, **k):
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            return self.fn(*a, **k)
        finally:
            self.cpu.append((time.thread_time() - c0) * 1e6)
            self.wall.append((time.perf_counter() - t0) * 1e6)


def drain(sink, num_buffers: int) -> None:
    if hasattr(sink, "drain"):                  # FrameSink: wait on the worker's step count
        sink.drain()
        return
    deadline = time.monotonic() + 600
    while not (sink.jobs.empty() and sink.free.qsize() == num_buffers):
        if time.monotonic() > deadline:
            raise RuntimeError("frame sink did not drain")
        time.sleep(0.001)
    time.sleep(0.002)           # the last job's wrapper returns after the buffer goes back


def one_batch(mod, args, native) -> dict:
    """One batch through the module's sink: `FrameSink` (open/close on the caller's thread, each
    step timed from push to written) or an older module's `FrameSinkThread` (timed in its thread)."""
    words = mod.record_size(args.hidden) // 4
    R, F = args.requests, args.frames
    current = hasattr(mod, "FrameSink")
    if current:
        sink = mod.FrameSink(R, words, native=native)
        sink.open, sink.close = Timed(sink.open), Timed(sink.close)
        opens, closes, steps = sink.open, sink.close, Timed(lambda: None)
    else:
        sink = mod.FrameSinkThread(R, words, native=native)
        sink._open, sink._close, sink._frames = Timed(sink._open), Timed(sink._close), Timed(sink._frames)
        opens, closes, steps = sink._open, sink._close, sink._frames
    grows = Timed(mod.FrameWriter._grow)
    mod.FrameWriter._grow = lambda self, capacity: grows(self, capacity)
    hinted = current or "capacity" in inspect.signature(mod.FrameSinkThread.open).parameters
    try:
        keys = [mod.new_key() for _ in range(R)]
        for slot, key in enumerate(keys):
            if hinted and args.capacity:
                sink.open(slot, key, args.capacity)
            else:
                sink.open(slot, key)
        drain(sink, 4)
        grows_at_open = len(grows.wall)

        rng = np.random.default_rng(0)
        rec = np.empty((R, words), np.int32)
        rec[:, 5:] = rng.standard_normal((R, words - 5)).astype(np.float32).view(np.int32)
        slots = np.arange(R)
        for step in range(F):
            rec[:, 0] = step + 1
            rec[:, 1:5] = (np.arange(R)[:, None] + step) % 626
            host = sink.take_buffer()
            host[:R] = torch.from_numpy(rec)
            if current:
                t0 = time.perf_counter()
                sink.submit(slots, host, R)
                sink.worker.wait(sink.worker.submitted(), 60.0)
                steps.wall.append((time.perf_counter() - t0) * 1e6)
            else:
                sink.submit(None, slots, host, R)
        drain(sink, 4)
        for slot in range(R):
            sink.close(slot)
        drain(sink, 4)

        read_us, unlink_us = [], []
        want0 = [(np.arange(F) + i) % 626 for i in range(R)]
        for i, key in enumerate(keys):
            t0 = time.perf_counter()
            reader = mod.FrameReader(key, args.hidden)
            codes, hidden = reader.read(0, F)
            if not np.array_equal(codes[:, 0], want0[i]):
                raise RuntimeError("frames read back do not match what was written")
            t1 = time.perf_counter()
            reader.close()
            read_us.append((t1 - t0) * 1e6)
            unlink_us.append((time.perf_counter() - t1) * 1e6)
        assert codes.flags.c_contiguous and hidden.flags.c_contiguous and hidden.dtype == np.float32
    finally:
        del mod.FrameWriter._grow
        mod.FrameWriter._grow = grows.fn

    def med(xs):
        return round(statistics.median(xs), 2) if xs else 0.0

    def tot(xs):
        return round(sum(xs) / R, 2)

    return {
        "open_us": med(opens.wall), "open_cpu_us": med(opens.cpu),
        "close_us": med(closes.wall), "close_cpu_us": med(closes.cpu),
        "grow_us_per_request": tot(grows.wall[grows_at_open:]),
        "grows_per_request": round((len(grows.wall) - grows_at_open) / R, 3),
        "step_write_ms": round(statistics.median(steps.wall) / 1e3, 3),
        "read_us": med(read_us), "read_mean_us": round(statistics.fmean(read_us), 2),
        "unlink_us": med(unlink_us),
    }


def late_reads(mod, args) -> dict:
    """A read that finds its last frame missing (the sink a step behind): the writer adds it
    `--late-ms` after the read starts. Main-thread CPU of the read, which polls meanwhile."""
    F = args.frames
    codes = np.zeros((F, 4), np.int32)
    hidden = np.random.default_rng(1).standard_normal((F, args.hidden)).astype(np.float32)
    cpu, wall = [], []
    for _ in range(args.late_requests):
        key = mod.new_key()
        w = mod.FrameWriter(key, args.hidden, F) if "capacity" in inspect.signature(
            mod.FrameWriter).parameters else mod.FrameWriter(key, args.hidden)
        for i in range(F - 1):
            w.write(i, codes[i], hidden[i])
        reader = mod.FrameReader(key, args.hidden)
        timer = threading.Timer(args.late_ms / 1e3, w.write, (F - 1, codes[F - 1], hidden[F - 1]))
        t0, c0 = time.perf_counter(), time.thread_time()
        timer.start()
        reader.read(0, F)
        cpu.append((time.thread_time() - c0) * 1e6)
        wall.append((time.perf_counter() - t0) * 1e6)
        timer.join()
        w.close()
        reader.close()
    return {"late_read_cpu_us": round(statistics.median(cpu), 2),
            "late_read_wall_us": round(statistics.median(wall), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=512)
    ap.add_argument("--frames", type=int, default=470)
    ap.add_argument("--capacity", type=int, default=470,
                    help="capacity hint passed to the sink's open (0: the writer's default)")
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--late-ms", type=float, default=3.0,
                    help="late-frame reads: the last frame lands this long after the read starts")
    ap.add_argument("--late-requests", type=int, default=64)
    ap.add_argument("--native", action="store_true", help="the csrc op instead of the numpy twin")
    ap.add_argument("--outputs", type=Path, default=None,
                    help="time this copy of chattts_vllm/runners/outputs.py instead")
    ap.add_argument("--label", default="")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()

    mod = load_outputs(args.outputs)
    native = None if args.native else False
    own_dir = "CHATTTS_VLLM_FRAME_DIR" not in os.environ
    if own_dir:
        base = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
        os.environ["CHATTTS_VLLM_FRAME_DIR"] = tempfile.mkdtemp(prefix="bench-frames-", dir=base)
    try:
        runs = [one_batch(mod, args, native) | late_reads(mod, args) for _ in range(args.repeat)]
    finally:
        if own_dir:
            shutil.rmtree(os.environ["CHATTTS_VLLM_FRAME_DIR"], ignore_errors=True)
    summary = {k: round(statistics.median(r[k] for r in runs), 3) for k in runs[0]}
    date = dt.date.today().isoformat()
    result = {"card": cpu_name(), "date": date, "python": platform.python_version(),
              "load_avg_1m": round(os.getloadavg()[0], 2), "cpus": os.cpu_count(),
              "label": args.label, "outputs": str(args.outputs or "chattts_vllm/runners/outputs.py"),
              "requests": args.requests, "frames": args.frames, "capacity_hint": args.capacity,
              "writer": "native" if args.native else "twin", "median": summary, "runs": runs}
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = f"-{args.label}" if args.label else ""
    path = args.out / f"frame-channel-cpu-{date}{suffix}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    s = summary
    print(f"per request ({args.requests} x {args.frames} frames, median of {args.repeat}): "
          f"open {s['open_us']:.1f} us (cpu {s['open_cpu_us']:.1f}), "
          f"close {s['close_us']:.1f} us (cpu {s['close_cpu_us']:.1f}), "
          f"grow {s['grow_us_per_request']:.1f} us ({s['grows_per_request']:.2f} grows), "
          f"read {s['read_us']:.1f} us (mean {s['read_mean_us']:.1f}), unlink {s['unlink_us']:.1f} us, "
          f"read with the last frame {args.late_ms:g} ms late: cpu {s['late_read_cpu_us']:.1f} us; "
          f"step write {s['step_write_ms']:.2f} ms; {result['card']}, load {result['load_avg_1m']} "
          f"-> {path}")


if __name__ == "__main__":
    main()
