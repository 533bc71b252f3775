"""Prometheus metrics of the speech endpoint, served on vLLM's own `/metrics`.

vLLM exposes the process's default registry there. With several API servers
(`--api-server-count`) it serves the multiprocess files instead: prometheus_client writes the
histograms and counters below to them in every API process (vLLM sets PROMETHEUS_MULTIPROC_DIR
before the processes start), so they are summed over processes; the coalescer's counters, read
from live objects, are then not served. What the engine's metrics cannot show:

- time to first audio of streamed requests, split into prepare / engine / decode stages, and
  audio seconds returned;
- requests by kind and outcome;
- whether the audio decode of concurrent streams is really batched: the coalescer's jobs, calls,
  batched calls and retried batches, read from its counters at scrape time (no hot-path cost).
"""
from __future__ import annotations

import time
import weakref

from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from chattts_vllm.timeline import timeline, wall

TTFA = Histogram(
    "chattts_speech_time_to_first_audio_seconds",
    "Streamed /v1/audio/speech requests: from the request's start to its first audio bytes.",
    buckets=(0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0))
FIRST_AUDIO_STAGES = Histogram(
    "chattts_speech_first_audio_stage_seconds",
    "Streamed requests, the time to first audio by stage: prepare (text to engine prompts), engine "
    "(submitted until the frames of the first chunk are reported) and decode (those frames to audio).",
    ["stage"], buckets=(0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0))
AUDIO_SECONDS = Counter(
    "chattts_speech_audio_seconds", "Seconds of audio returned by /v1/audio/speech.", ["stream"])
REQUESTS = Counter(
    "chattts_speech_requests", "/v1/audio/speech requests by kind and outcome.", ["stream", "outcome"])


class CoalescerCollector:
    """The counters of every live `audio.coalesce.Coalescer`, summed (normally there is one)."""

    def __init__(self) -> None:
        self._coalescers: weakref.WeakSet = weakref.WeakSet()

    def add(self, coalescer) -> None:
        self._coalescers.add(coalescer)

    def collect(self):
        stats = [c.stats for c in list(self._coalescers)]
        if not stats:
            return
        for name, attr, doc in (
                ("jobs", "jobs", "Audio network calls asked for by the streams."),
                ("calls", "calls", "Audio network calls run (one per batch)."),
                ("batched_calls", "batched_calls", "Calls that carried more than one stream's job."),
                ("retried_batches", "retried_batches", "Batches that failed and ran job by job.")):
            yield CounterMetricFamily(f"chattts_audio_coalesce_{name}", doc,
                                      value=sum(getattr(s, attr) for s in stats))
        yield GaugeMetricFamily("chattts_audio_coalesce_largest_batch",
                                "Most jobs in one audio call so far.",
                                value=max(s.largest for s in stats))


COALESCERS = CoalescerCollector()
REGISTRY.register(COALESCERS)


def observe_first_audio(t0: float, job) -> None:
    """The stages of one streamed request's first audio (`t0`: the request's start, perf_counter)."""
    if job.first_audio_at is None:
        return
    TTFA.observe(time.perf_counter() - t0)
    for stage, a, b in (("prepare", t0, job.submitted_at),
                        ("engine", job.submitted_at, job.first_frames_at),
                        ("decode", job.first_frames_at, job.first_audio_at)):
        FIRST_AUDIO_STAGES.labels(stage=stage).observe(max(0.0, b - a))
    if (tl := timeline("api")) is not None:
        # Wall-clock stamps, joined with the engine's steps by benchmarks/timeline_report.py.
        first = job.utterances[0]
        tl.event("first_audio", sink=first.sink, start=wall(t0), submitted=wall(job.submitted_at),
                 first_output=wall(first.first_output_at) if first.first_output_at else None,
                 frames=wall(job.first_frames_at), audio=wall(job.first_audio_at))
