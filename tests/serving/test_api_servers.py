"""`chattts-vllm serve ... --api-server-count 2`: vLLM's own front-end scale-out, with the speech
endpoint in every API server process.

Each API process has its own event loop, audio models and decode thread pool, so the per-frame
Python work of many streams is split between processes (the lever for time to first audio at 64
streams). What must hold: every process serves speech, a request's audio does not depend on which
process took it, and /metrics adds up the processes' speech series.
"""
from __future__ import annotations

import asyncio
import re
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests

from tests.live_server import live_server
from tests.serving.conftest import MODEL, SR, cpu_serve_command, metric

FRAMES = 30
BODY = dict(model=MODEL, input="Two front ends, one engine.", voice="alloy", seed=21,
            min_new_token=FRAMES, max_new_token=FRAMES, response_format="pcm")


@pytest.fixture(scope="module")
def two_front_ends(serving_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("api-servers")
    argv, env, port = cpu_serve_command(serving_model_dir, root, "--max-num-seqs", "32",
                                        "--api-server-count", "2")
    url, log = f"http://127.0.0.1:{port}", root / "serve.log"
    with live_server(argv, env, log, f"{url}/health"):
        yield url, log


def test_every_api_process_serves_the_same_audio(two_front_ends):
    url, log = two_front_ends
    ttfa_before = metric(url, "chattts_speech_time_to_first_audio_seconds_count")

    def one(stream: bool) -> bytes:
        body = {**BODY, "stream_format": "audio"} if stream else BODY
        with requests.post(f"{url}/v1/audio/speech", json=body, stream=stream, timeout=300) as r:
            assert r.status_code == 200, r.text
            return b"".join(r.iter_content(None))

    # 16 connections: the kernel spreads them over both processes' shared port.
    with ThreadPoolExecutor(16) as pool:
        streamed = list(pool.map(one, [True] * 12))
        whole = list(pool.map(one, [False] * 4))
    assert len(streamed[0]) >= 2 * (FRAMES - 1) * 512      # pcm int16, ~512 samples per frame
    # Whichever process served it, and whatever shared its engine steps: the same audio, up to
    # the ~1e-4 (3 of 32767) that the incremental decode may differ by from the whole one
    # (test_speech_server.test_streamed_audio_equals_non_streamed), which also covers the float
    # noise of the GPT's hidden states in different batch compositions (test_inproc: codes
    # identical, audio within 1e-4). Same length: the same frames were sampled.
    ref = np.frombuffer(whole[0], "<i2").astype(np.int32)
    pcm = [np.frombuffer(b, "<i2").astype(np.int32) for b in streamed + whole]
    assert all(len(x) == len(ref) for x in pcm), [len(x) for x in pcm]
    diffs = [int(np.abs(x - ref).max()) for x in pcm]
    assert max(diffs) <= 3, diffs

    served_by = set(re.findall(r"\(ApiServer_(\d+) pid=\d+\).*POST /v1/audio/speech", log.read_text()))
    assert served_by == {"0", "1"}
    # Both processes' first-audio observations reach the one /metrics.
    assert metric(url, "chattts_speech_time_to_first_audio_seconds_count") == ttfa_before + 12
    assert metric(url, "chattts_speech_audio_seconds_total") >= 16 * (FRAMES - 1) * 512 / SR


def listening_sockets(port: int) -> int:
    """Sockets in LISTEN (state 0A) on `port`, from the kernel's tables (this network namespace)."""
    n = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            n += state == "0A" and int(local.rsplit(":", 1)[1], 16) == port
    return n


def test_api_processes_listen_on_their_own_sockets(two_front_ends):
    """Each API process has its own SO_REUSEPORT socket (vLLM alone has one socket that both
    accept on, so a burst of connections lands mostly in one process), and a burst of 32
    connections reaches both processes."""
    url, log = two_front_ends
    port = int(url.rsplit(":", 1)[1])
    assert listening_sockets(port) == 2

    async def burst(n: int) -> None:
        async def one(i: int) -> None:
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(f"GET /v1/audio/voices?burst={i} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            await w.drain()
            head = await r.readuntil(b"\r\n\r\n")
            await r.readexactly(int(re.search(rb"content-length: (\d+)", head, re.I).group(1)))
            w.close()
        await asyncio.gather(*(one(i) for i in range(n)))

    asyncio.run(burst(32))
    # The access log lines: written by each process after its response, so on a loaded machine the
    # last can land a while after the client has its bytes (CI once saw 31 of 32 after 0.5 s).
    deadline, per = time.time() + 15, {}
    while sum(len(v) for v in per.values()) < 32 and time.time() < deadline:
        time.sleep(0.2)
        per = {}
        for m in re.finditer(r"\(ApiServer_(\d+) pid=\d+\).*GET /v1/audio/voices\?burst=(\d+)", log.read_text()):
            per.setdefault(m.group(1), set()).add(m.group(2))
    assert sum(len(v) for v in per.values()) == 32
    # The kernel hashes connections to sockets: P(fewer than 6 of 32 in one of 2) ~ 1e-4.
    assert len(per) == 2 and min(len(v) for v in per.values()) >= 6, per
