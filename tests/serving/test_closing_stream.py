"""`ClosingStream` closes its already-submitted job however the response ends, even when the
body never started (the engine requests are submitted before the response is returned)."""
from __future__ import annotations

import asyncio

import pytest
from starlette.requests import ClientDisconnect

from chattts_vllm.serving.speech import ClosingStream


class FakeJob:
    def __init__(self):
        self.closes = 0

    def close(self):
        self.closes += 1


def _run(send_fails_at: int | None):
    job, started, finished = FakeJob(), [], []

    async def body():
        started.append(True)
        try:
            yield b"a"
            yield b"b"
        finally:
            finished.append(True)

    sent = []

    async def send(message):
        if send_fails_at is not None and len(sent) == send_fails_at:
            raise OSError("client gone")
        sent.append(message)

    async def receive():
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def main():
        resp = ClosingStream(body(), job=job, media_type="audio/pcm")
        await resp({"type": "http", "asgi": {"spec_version": "2.4"}}, receive, send)

    return job, started, finished, sent, main


@pytest.mark.parametrize("fails_at", [None, 0, 2])
def test_job_closed_once_however_the_response_ends(fails_at):
    job, started, finished, sent, main = _run(fails_at)
    if fails_at is None:
        asyncio.run(main())
        assert [m.get("body") for m in sent if m["type"] == "http.response.body"][:2] == [b"a", b"b"]
    else:
        with pytest.raises((OSError, ClientDisconnect)):     # Starlette may report it as a disconnect
            asyncio.run(main())
    assert job.closes == 1                       # closed even when the body never started (fails_at 0)
    assert bool(started) == bool(finished)       # a started body was closed too
