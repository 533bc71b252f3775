"""The Ray Serve app on a local cluster: 2 CPU engine replicas behind the FastAPI ingress.

40 concurrent real HTTP clients (the `openai` client and streamed httpx requests) all succeed and
land on both replicas; killing a replica under load fails no request (the ingress retries on the
other one) and Serve starts a replacement. The replicas run with `pin_cores`: each on its own half
of the host's cores, the replacement on the half its victim held.
"""
from __future__ import annotations

import base64
import io
import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
import soundfile as sf

from tests.ray.conftest import ENGINE_KWARGS, SR
from tests.serving.conftest import free_port

pytestmark = pytest.mark.slow

MODEL = "chattts"
FRAMES = 24
TEXT = "Hello from Ray Serve."
HEADER = "x-replica-id"


@pytest.fixture(scope="module")
def speech_url(ray_cluster, serving_model_dir):
    from ray import serve

    from chattts_vllm.serving.ray_app import build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = build_app({"model": str(serving_model_dir), "served_model_name": MODEL, "num_replicas": 2,
                     "use_gpu": False, "engine_kwargs": ENGINE_KWARGS, "health_check_period_s": 2,
                     "pin_cores": True,
                     "ingress": {"max_attempts": 5, "retry_delay_s": 0.5}})
    serve.run(app, name="chattts", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def _replica_cores() -> dict[int, list[int]]:
    """CPU affinity of every live SpeechEngine replica process on this host, by pid."""
    import os
    from pathlib import Path

    out = {}
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and b"ServeReplica:chattts:SpeechEngine" in (d / "cmdline").read_bytes():
                out[int(d.name)] = sorted(os.sched_getaffinity(int(d.name)))
        except (OSError, ProcessLookupError):
            pass
    return out


def _assert_disjoint_halves(cores: dict[int, list[int]]) -> None:
    import os

    host = sorted(os.sched_getaffinity(0))
    assert len(cores) == 2, cores
    a, b = cores.values()
    if len(host) >= 2:
        assert not set(a) & set(b) and sorted(a + b) == host, cores


def _body(seed: int, frames: int = FRAMES, **extra) -> dict:
    return dict(model=MODEL, input=TEXT, voice="alloy", seed=seed, min_new_token=frames,
                max_new_token=frames, **extra)


def _openai_wav(url: str, seed: int, frames: int = FRAMES) -> tuple[str, np.ndarray]:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)
    extra = {k: v for k, v in _body(seed, frames).items() if k not in ("model", "input", "voice")}
    raw = client.audio.speech.with_raw_response.create(model=MODEL, input=TEXT, voice="alloy",
                                                       response_format="wav", extra_body=extra)
    y, sr = sf.read(io.BytesIO(raw.content), dtype="float32")
    assert sr == SR
    return raw.headers[HEADER], y


def _streamed(url: str, seed: int, fmt: str) -> tuple[str, np.ndarray]:
    body = _body(seed, response_format="pcm", stream_format=fmt)
    with httpx.stream("POST", f"{url}/v1/audio/speech", json=body, timeout=600) as r:
        assert r.status_code == 200, r.read()
        data = b"".join(r.iter_bytes())
        replica = r.headers[HEADER]
    if fmt == "sse":
        events = [json.loads(line[6:]) for line in data.split(b"\n") if line.startswith(b"data: ")]
        assert events[-1]["type"] == "speech.audio.done", events[-1]
        data = b"".join(base64.b64decode(e["audio"]) for e in events[:-1])
    return replica, np.frombuffer(data, "<i2").astype(np.float32) / 32767


def test_40_concurrent_clients_all_succeed_on_both_replicas(speech_url):
    jobs = [(_openai_wav, (speech_url, i)) for i in range(30)]
    jobs += [(_streamed, (speech_url, 100 + i, "audio" if i % 2 else "sse")) for i in range(10)]
    with ThreadPoolExecutor(40) as ex:
        results = list(ex.map(lambda j: j[0](*j[1]), jobs))
    assert len(results) == 40
    for _, y in results:
        assert y.shape == (FRAMES * 512 - 256,)
    replicas = {r for r, _ in results}
    assert len(replicas) == 2, replicas


def test_errors_are_the_endpoint_errors(speech_url):
    r = httpx.post(f"{speech_url}/v1/audio/speech", json={**_body(1), "voice": "nope"}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["code"] == "unknown_voice"      # from a replica
    r = httpx.post(f"{speech_url}/v1/audio/speech", json={**_body(1), "model": "x"}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["code"] == "model_not_found"    # at the ingress
    r = httpx.post(f"{speech_url}/v1/audio/speech", content=b"{", timeout=60)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    voices = httpx.get(f"{speech_url}/v1/audio/voices", timeout=60).json()["data"]
    assert {"default", "alloy"} <= {v["id"] for v in voices}


def test_replicas_are_pinned_to_disjoint_halves_of_the_cores(speech_url):
    _assert_disjoint_halves(_replica_cores())


def test_killing_a_replica_under_load_fails_no_request(speech_url, ray_cluster):
    ray = ray_cluster
    victim, _ = _openai_wav(speech_url, 0)
    frames = 160                                   # long enough to be in flight at the kill
    with ThreadPoolExecutor(40) as ex:
        futures = [ex.submit(_openai_wav, speech_url, 200 + i, frames) for i in range(40)]
        time.sleep(3)
        assert sum(f.done() for f in futures) < 40
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        results = [f.result() for f in futures]    # raises if any request failed
    for _, y in results:
        assert y.shape == (frames * 512 - 256,)

    # Serve replaces the dead replica: a new id starts answering, the victim never again.
    deadline, seen = time.time() + 300, set()
    while time.time() < deadline:
        with ThreadPoolExecutor(4) as ex:
            seen |= {r for r, _ in ex.map(lambda s: _openai_wav(speech_url, s), range(4))}
        assert victim not in seen
        if len(seen) == 2:
            break
        time.sleep(3)
    assert len(seen) == 2, f"no replacement replica within 300 s; answered by {seen}"
    _assert_disjoint_halves(_replica_cores())          # the replacement took the victim's cores
