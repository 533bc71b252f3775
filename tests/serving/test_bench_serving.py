"""benchmarks/bench_serving.py runs a tiny sweep against the live test server and writes its JSON
and plot."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_serving.py"


def test_bench_serving_smoke(server, tmp_path):
    r = subprocess.run([sys.executable, str(BENCH), server.url, "--concurrency", "1", "4",
                        "--rounds", "1", "--tag", "smoke", "--out-dir", str(tmp_path),
                        "--min-new-token", "60", "--max-new-token", "60"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (result,) = tmp_path.glob("serving-*-smoke.json")
    data = json.loads(result.read_text())
    assert data["card"] and data["date"] and result.with_suffix(".png").is_file()
    assert [row["concurrency"] for row in data["rows"]] == [1, 4]
    for row in data["rows"]:
        assert row["errors"] == 0 and row["ttfa_p50_ms"] > 0 and row["ttfa_p99_ms"] >= row["ttfa_p50_ms"]
        assert row["audio_s_per_s"] > 0
        # the server's own view of the level, from its /metrics (no coalescer on the CPU)
        assert 0 < row["server_ttfa_mean_ms"] and row["audio_jobs_per_call"] is None
        # ... with its stages and the engine's own latencies (vLLM's histograms)
        assert row["first_audio_engine_mean_ms"] > 0 and row["first_audio_decode_mean_ms"] > 0
        assert row["first_audio_prepare_mean_ms"] is not None
        assert row["engine_ttft_mean_ms"] > 0 and row["engine_itl_mean_ms"] > 0
        # the client's side: its TTFA contains the server's, and its own loop's lag is measured
        assert row["ttfa_mean_ms"] >= row["server_ttfa_mean_ms"]
        assert row["client_loop_lag_p99_ms"] >= row["client_loop_lag_p50_ms"] > -1.0


def test_bench_serving_staggered_arrivals(server, tmp_path):
    """Both arrival patterns in one run. Staggered: client starts spread over one request's
    duration (from the warm-up); each client's first request is the ramp and stays out of the
    latency figures."""
    r = subprocess.run([sys.executable, str(BENCH), server.url, "--concurrency", "2",
                        "--rounds", "2", "--arrivals", "lockstep", "staggered", "--tag", "stagger",
                        "--out-dir", str(tmp_path), "--min-new-token", "30", "--max-new-token", "30"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads(next(tmp_path.glob("serving-*-stagger.json")).read_text())
    lock, stag = data["rows"]
    assert data["arrivals"] == ["lockstep", "staggered"]
    assert (lock["arrivals"], stag["arrivals"]) == ("lockstep", "staggered")
    assert lock["spread_s"] == 0 and stag["spread_s"] > 0
    assert lock["requests"] == 4 and stag["requests"] == 2      # 2 clients x 2 rounds; ramp excluded
    for row in (lock, stag):
        assert row["errors"] == 0 and row["audio_s_total"] > 0 and row["ttfa_p50_ms"] > 0


def test_requests_per_api_process_come_from_the_servers_access_lines(tmp_path):
    sys.path.insert(0, str(BENCH.parent))
    try:
        from bench_serving import api_process_requests
    finally:
        sys.path.remove(str(BENCH.parent))
    log = tmp_path / "server.log"
    log.write_text(
        '(ApiServer_0 pid=11) INFO:     127.0.0.1:1 - "POST /v1/audio/speech HTTP/1.1" 200 OK\n'
        '(ApiServer_1 pid=12) INFO:     127.0.0.1:2 - "POST /v1/audio/speech HTTP/1.1" 200 OK\n'
        '(ApiServer_1 pid=12) INFO:     127.0.0.1:3 - "POST /v1/audio/speech HTTP/1.1" 400 Bad Request\n'
        '(ApiServer_1 pid=12) INFO:     127.0.0.1:4 - "GET /health HTTP/1.1" 200 OK\n'
        '(APIServer pid=13) INFO:     127.0.0.1:5 - "POST /v1/audio/speech HTTP/1.1" 200 OK\n')
    assert api_process_requests(log) == {"0": 2, "1": 2}      # APIServer (one process) counts as 0
    assert api_process_requests(None) == {}


def test_bench_serving_splits_clients_over_processes(server, tmp_path):
    """`--client-procs 1 2`: each level once per value; with 2 processes every client's request
    is still made and measured (4 clients x 2 rounds), and the rows say how they ran."""
    r = subprocess.run([sys.executable, str(BENCH), server.url, "--concurrency", "4", "--rounds", "2",
                        "--client-procs", "1", "2", "--tag", "procs", "--out-dir", str(tmp_path),
                        "--min-new-token", "30", "--max-new-token", "30"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = json.loads(next(tmp_path.glob("serving-*-procs.json")).read_text())["rows"]
    assert (one["client_procs"], two["client_procs"]) == (1, 2)
    for row in (one, two):
        assert row["requests"] == 8 and row["errors"] == 0 and row["ttfa_p50_ms"] > 0
        assert row["audio_s_total"] > 0 and row["wall_s"] > 0
        assert row["client_loop_lag_p99_ms"] is not None
