"""Prometheus metrics of the speech endpoint, served on vLLM's own `/metrics`.

vLLM exposes the process's default registry there (one API server; with several, only its
multiprocess files, which these metrics do not use). What the engine's metrics cannot show:

- time to first audio of streamed requests, and audio seconds returned;
- requests by kind and outcome;
- whether the audio decode of concurrent streams is really batched: the coalescer's jobs, calls,
  batched calls and retried batches, read from its counters at scrape time (no hot-path cost).
"""
from __future__ import annotations

import weakref

from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

TTFA = Histogram(
    "chattts_speech_time_to_first_audio_seconds",
    "Streamed /v1/audio/speech requests: from the request's start to its first audio bytes.",
    buckets=(0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0))
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
