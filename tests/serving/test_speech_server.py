"""POST /v1/audio/speech on a live `vllm serve` (CPU, 2-layer random checkpoint), through the
official `openai` client and raw HTTP: formats, streaming == non-streaming, 32 concurrent clients,
disconnect -> abort, and every bad input -> 400 with the server still serving."""
from __future__ import annotations

import base64
import json
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import openai
import pytest
import requests

from chattts_vllm.audio.formats import FORMATS
from tests.serving.conftest import MODEL, SR, decode

pytestmark = pytest.mark.slow

FRAMES = 60                                 # min_new_token = max_new_token: a known length
TEXT = "Hello from the speech endpoint."
FIXED = dict(seed=11, voice="alloy", min_new_token=FRAMES, max_new_token=FRAMES)


def _client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=300)


def _sse_audio(resp: requests.Response) -> tuple[bytes, dict]:
    audio, done = b"", None
    for line in resp.iter_lines():
        if line.startswith(b"data: "):
            event = json.loads(line[6:])
            if event["type"] == "speech.audio.delta":
                audio += base64.b64decode(event["audio"])
            else:
                assert event["type"] == "speech.audio.done", event
                done = event
    return audio, done


def test_voices_listed(server):
    data = requests.get(f"{server.url}/v1/audio/voices", timeout=10).json()["data"]
    assert {"default", "alloy", "cedar"} <= {v["id"] for v in data}


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_decodes_to_24khz_of_the_expected_length(server, fmt):
    data = _client(server).audio.speech.create(
        model=MODEL, input=TEXT, voice="alloy", response_format=fmt,
        extra_body={k: v for k, v in FIXED.items() if k != "voice"}).content
    y, sr = decode(data, fmt)
    expected = FRAMES * 512 - 256
    assert sr == SR
    if fmt in ("wav", "pcm", "flac"):
        assert y.shape == (expected,)
    else:                                   # encoder delay and last-frame padding
        assert expected <= y.shape[0] <= expected + 2048, y.shape


def test_streamed_audio_equals_non_streamed(server):
    body = dict(input=f"{TEXT} And a second sentence follows it.", response_format="pcm", **FIXED)
    whole = server.speech(**body)
    assert whole.status_code == 200, whole.text
    ref = np.frombuffer(whole.content, "<i2")
    assert ref.shape == (2 * (FRAMES * 512 - 256),)         # two sentences, in order

    t0 = time.perf_counter()
    with requests.post(f"{server.url}/v1/audio/speech", json={"model": MODEL, **body,
                       "stream_format": "audio"}, stream=True, timeout=300) as r:
        chunks = [(time.perf_counter() - t0, c) for c in r.iter_content(None) if c]
    streamed = np.frombuffer(b"".join(c for _, c in chunks), "<i2")
    assert len(chunks) >= 2                                  # pieces, not one body
    assert streamed.shape == ref.shape
    assert np.abs(streamed.astype(np.int32) - ref).max() <= 3  # <= 1e-4 after /32767

    with requests.post(f"{server.url}/v1/audio/speech", json={"model": MODEL, **body,
                       "stream_format": "sse"}, stream=True, timeout=300) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        sse, done = _sse_audio(r)
    assert np.abs(np.frombuffer(sse, "<i2").astype(np.int32) - ref).max() <= 3
    assert done["usage"]["output_tokens"] == 2 * FRAMES and done["usage"]["input_tokens"] > 0

    wav = server.speech(**{**body, "response_format": "wav", "stream_format": "audio"}).content
    y, sr = decode(wav, "wav")
    assert sr == SR and np.abs(y * 32767 - ref).max() <= 3.5


def test_32_concurrent_clients(server):
    client = _client(server)

    def one(i: int) -> int:
        data = client.audio.speech.create(
            model=MODEL, input=f"Client number {i} says hello.", voice=f"seed:{i}",
            response_format="wav", extra_body={"seed": i, "min_new_token": 4, "max_new_token": 40}).content
        y, sr = decode(data, "wav")
        assert sr == SR and y.size > 0 and (y.size + 256) % 512 == 0
        return y.size

    with ThreadPoolExecutor(32) as pool:
        sizes = list(pool.map(one, range(32)))
    assert len(sizes) == 32


def _idle(server, timeout: float = 60) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        busy = server.metric("vllm:num_requests_running") + server.metric("vllm:num_requests_waiting")
        if busy == 0 and not any(server.frame_dir.glob("*.frames")):
            return True
        time.sleep(0.5)
    return False


@pytest.mark.parametrize("stream_format", ["audio", "sse"])
def test_disconnect_mid_stream_aborts_its_requests(server, stream_format):
    assert _idle(server)
    aborted = server.tail(10**7).count(" aborted.")
    text = " ".join(f"Sentence number {i} is here." for i in range(12))
    r = requests.post(f"{server.url}/v1/audio/speech", stream=True, timeout=300, json={
        "model": MODEL, "input": text, "response_format": "pcm", "stream_format": stream_format,
        "min_new_token": 1000, "max_new_token": 1000, "seed": 1})
    assert r.status_code == 200
    next(r.iter_content(1024))                          # the first audio is out ...
    # (The running-requests gauge is published on vLLM's stats interval, so it cannot show
    # "still running" reliably here; the abort lines below prove the requests were running.)
    r.close()                                           # ... and the client goes away
    assert _idle(server), server.tail()                 # engine requests gone, no files left
    assert server.tail(10**7).count(" aborted.") > aborted   # gone by abort, not by finishing


def test_non_streaming_disconnect_aborts_too(server):
    assert _idle(server)
    aborted = server.tail(10**7).count(" aborted.")
    with pytest.raises(requests.Timeout):
        requests.post(f"{server.url}/v1/audio/speech", timeout=3, json={
            "model": MODEL, "response_format": "wav", "min_new_token": 1000, "max_new_token": 1000,
            # 12 sentences x 1000 frames: generation outlasts the client's 3 s on any load
            "input": " ".join(f"Sentence {i} that the client gives up on." for i in range(12))})
    assert _idle(server), server.tail()
    assert server.tail(10**7).count(" aborted.") > aborted


BAD = [
    ("empty input", {"input": ""}, "input"),
    ("blank input", {"input": "   \n "}, "input"),
    ("input too long", {"input": "a" * 4097}, "input"),
    ("unknown voice", {"voice": "nobody"}, "voice"),
    ("malformed speaker string", {"voice": "乙乚乛乜九乞也习乡乢"}, "voice"),
    ("bad voice object", {"voice": {"name": "alloy"}}, "voice"),
    ("unknown format", {"response_format": "aac"}, "response_format"),
    ("speed too low", {"speed": 0.1}, "speed"),
    ("speed too high", {"speed": 4.5}, "speed"),
    ("wrong model", {"model": "tts-1"}, "model"),
    ("bad stream format", {"stream_format": "chunks"}, "stream_format"),
    ("laugh out of range", {"instructions": "[laugh_7]"}, "instructions"),
    ("temperature", {"temperature": -1}, "temperature"),
]


@pytest.mark.parametrize("name,fields,param", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_openai_style_400(server, name, fields, param):
    r = requests.post(f"{server.url}/v1/audio/speech", timeout=60,
                      json={"model": MODEL, "input": "Fine text.", **fields})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param and err["message"]


def test_non_json_body_and_openai_client_errors_then_still_serving(server):
    for body in (b"{not json", b"[1, 2]", b""):
        r = requests.post(f"{server.url}/v1/audio/speech", data=body, timeout=30,
                          headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as e:
        _client(server).audio.speech.create(model=MODEL, input="hi", voice="nobody")
    assert e.value.status_code == 400 and e.value.param == "voice"
    ok = server.speech(input="Still serving after all that.", response_format="wav", max_new_token=20)
    assert ok.status_code == 200 and decode(ok.content, "wav")[1] == SR


def test_instructions_run_the_refine_pass_and_speed_is_accepted(server):
    r = server.speech(input="Tell me a joke.", instructions="laugh a lot, with pauses",
                      speed=2.0, response_format="wav", stream_format="sse", seed=5, max_new_token=30)
    assert r.status_code == 200
    done = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith(b"data: ")][-1]
    # The refine pass's tokens count in total_tokens on top of the code pass.
    usage = done["usage"]
    assert usage["total_tokens"] > usage["input_tokens"] + usage["output_tokens"]


def test_speech_metrics_on_the_metrics_endpoint(server):
    """/metrics carries the endpoint's own series next to vLLM's: requests by outcome, audio
    seconds, and the streamed time to first audio with its prepare / engine / decode split."""
    ok_before = server.metric('chattts_speech_requests_total{outcome="ok",stream="true"}')
    bad_before = server.metric("chattts_speech_requests_total")
    ttfa_before = server.metric("chattts_speech_time_to_first_audio_seconds_count")
    audio_before = server.metric("chattts_speech_audio_seconds_total")
    stage = 'chattts_speech_first_audio_stage_seconds_{}{{stage="{}"}}'
    stages_before = {s: (server.metric(stage.format("count", s)), server.metric(stage.format("sum", s)))
                     for s in ("prepare", "engine", "decode")}
    with requests.post(f"{server.url}/v1/audio/speech", json={"model": MODEL, "input": TEXT,
                       "response_format": "pcm", "stream_format": "audio", **FIXED},
                       stream=True, timeout=300) as r:
        assert r.status_code == 200
        pcm = b"".join(r.iter_content(None))
    assert server.speech(input="", voice="alloy").status_code == 400
    assert server.metric("chattts_speech_time_to_first_audio_seconds_count") == ttfa_before + 1
    # The stages of that first audio: each observed once, engine and decode each taking real time.
    for s, (count, total) in stages_before.items():
        assert server.metric(stage.format("count", s)) == count + 1
        assert server.metric(stage.format("sum", s)) > total or s == "prepare"
    assert server.metric("chattts_speech_audio_seconds_total") - audio_before == \
        pytest.approx(len(pcm) / 2 / SR, rel=1e-6)
    assert server.metric("chattts_speech_requests_total") >= bad_before + 2
    assert server.metric('chattts_speech_requests_total{outcome="ok",stream="true"}') == ok_before + 1


def test_timeline_splits_a_streamed_request_across_the_processes(server):
    """With CHATTTS_VLLM_TIMELINE, the API process's first-audio stamps and the engine's admission
    and steps join by frame file: every stage of the request is there, in order, and the engine
    stepped for it (benchmarks/timeline_report.py reads the same files)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import timeline_report

    t_before = time.time()
    with requests.post(f"{server.url}/v1/audio/speech", json={
            "model": MODEL, "input": TEXT, "response_format": "pcm", "stream_format": "audio",
            "stream_first_chunk_frames": 6, **FIXED}, stream=True, timeout=300) as r:
        assert r.status_code == 200
        b"".join(r.iter_content(None))
    deadline, mine = time.time() + 10, []
    while not mine and time.time() < deadline:
        time.sleep(0.6)                       # the files are flushed every half second
        reqs, steps, _ = timeline_report.load(server.timeline_dir)
        mine = [q for q in reqs if q["start"] >= t_before]
    assert len(mine) == 1, mine
    q = mine[0]
    stamps = [q[k] for k in ("start", "submitted", "add", "first_output", "frames", "audio")]
    assert stamps == sorted(stamps), q
    ms = timeline_report.stage_ms(q)
    assert ms["ttfa"] == pytest.approx(sum(ms[s] for s, _, _ in timeline_report.STAGES), abs=1e-6)
    during = [s for s in steps if q["add"] <= s["t"] <= q["frames"]]
    assert len(during) >= 6                     # the prefill, then one step per frame of the chunk
    assert all(s["rows"] >= 1 and s["tokens"] >= 1 and s["host_ms"] >= 0 for s in during)
