"""Endpoint plugin: `POST /v1/audio/speech` and `GET /v1/audio/voices` on `vllm serve`.

Registered as the `vllm.endpoint_plugins` entry `chattts_speech`. vLLM loads endpoint plugins only
when they are named in `VLLM_PLUGINS`, and that variable then filters the general plugins too:

    VLLM_PLUGINS=chattts,chattts_speech vllm serve MODEL_DIR

(`chattts-vllm serve MODEL_DIR` sets it for you.) Responses:
- no `stream_format`: one complete file (exact WAV/FLAC headers, MP3 with its LAME tag);
- `stream_format: "audio"`: the same audio as chunked bytes while it is generated;
- `stream_format: "sse"`: `speech.audio.delta` events (base64 of the encoded bytes), then
  `speech.audio.done` with usage (input tokens, audio frames).
A client that disconnects has its engine requests aborted and their side-channel files removed.
"""
from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from vllm.entrypoints.serve.utils.api_utils import with_cancellation
from vllm.logger import init_logger

from chattts_vllm import ARCHITECTURE
from chattts_vllm.audio.formats import MEDIA_TYPES, SAMPLE_RATE, StreamEncoder, encode_audio
from chattts_vllm.serving import listeners, metrics
from chattts_vllm.serving.protocol import SpeechError, SpeechRequest, parse_speech_request
from chattts_vllm.serving.service import Prepared, SpeechService
from chattts_vllm.serving.streaming import SpeechJob
from chattts_vllm.text.speaker import VOICES


logger = init_logger(__name__)
STATE_KEY = "chattts_speech"

router = APIRouter()


def _error(e: SpeechError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def server_error(e: BaseException) -> SpeechError:
    return SpeechError(f"synthesis failed: {type(e).__name__}: {e}", None, None, 500, "server_error")


def _service(request: Request) -> SpeechService:
    service = getattr(request.app.state, STATE_KEY, None)
    if service is None:
        raise SpeechError("speech synthesis is not available: the served model is not ChatTTS",
                          None, "unavailable", 503, "service_unavailable")
    return service


class ClosingStream(StreamingResponse):
    """Closes the body generator however the response ends, so its cleanup runs at once; `job`
    (already submitted) is closed too, even if the body never started.

    A disconnect cancels the response while it may be sending, not awaiting the generator; the
    generator would then only be closed when garbage-collected.
    """

    def __init__(self, content, *, job: SpeechJob | None = None, **kwargs):
        super().__init__(content, **kwargs)
        self.job = job

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                await self.body_iterator.aclose()
            finally:
                if self.job is not None:
                    self.job.close()


async def encoded_stream(service: SpeechService, job: SpeechJob, prepared: Prepared,
                         req: SpeechRequest, sse: bool,
                         t0: float | None = None) -> AsyncIterator[bytes]:
    """Audio bytes (or SSE events) of a submitted job as its sentences are decoded. Cleanup is
    synchronous.

    `t0` (perf_counter at the request's start) feeds the time-to-first-audio metric."""
    audio, enc = service.audio, StreamEncoder(req.response_format)
    event = (lambda b: b"data: " + json.dumps({"type": "speech.audio.delta", "audio":
             base64.b64encode(b).decode()}).encode() + b"\n\n") if sse else (lambda b: b)
    samples, outcome = 0, "error"
    try:
        async for wav in job.stream(audio, service.stream_config):
            if samples == 0 and wav.size and t0 is not None:
                metrics.observe_first_audio(t0, job)
            samples += wav.size
            # wav / pcm on the loop: a pool round trip per chunk only adds latency and GIL churn.
            if data := (enc.write(wav) if enc.cheap else await audio.run(enc.write, wav)):
                yield event(data)
        if data := (enc.close() if enc.cheap else await audio.run(enc.close)):
            yield event(data)
        if sse:
            done = {"type": "speech.audio.done", "usage": job.usage()}
            yield b"data: " + json.dumps(done).encode() + b"\n\n"
        outcome = "ok"
    except Exception as e:
        logger.exception("speech request %s failed mid-stream", prepared.request_id)
        if not sse:
            raise                              # the chunked body ends without its terminator
        yield b"data: " + json.dumps({"type": "error", **server_error(e).body()}).encode() + b"\n\n"
    finally:
        job.close()
        metrics.AUDIO_SECONDS.labels(stream="true").inc(samples / SAMPLE_RATE)
        metrics.REQUESTS.labels(stream="true", outcome=outcome).inc()


@with_cancellation
async def _respond(service: SpeechService, req: SpeechRequest, raw_request: Request,
                   t0: float | None = None) -> Response:
    stream = "true" if req.stream_format is not None else "false"
    try:
        prepared = await service.prepare(req, f"speech-{uuid.uuid4().hex}")
    except SpeechError as e:
        metrics.REQUESTS.labels(stream=stream, outcome="invalid").inc()
        return _error(e)
    if req.stream_format is not None:
        sse = req.stream_format == "sse"
        media = "text/event-stream" if sse else MEDIA_TYPES[req.response_format]
        # Submit now, not when the response starts iterating its body: under load that start
        # waits for the event loop, and the engine can work meanwhile. No await until the return,
        # and the response closes the job however it ends.
        job = service.start(prepared)
        return ClosingStream(encoded_stream(service, job, prepared, req, sse, t0), job=job,
                             media_type=media)
    job = service.start(prepared, whole=True)
    try:
        wav = await job.waveform(service.audio)
        data = await service.audio.run(encode_audio, wav, req.response_format)
    except Exception as e:
        logger.exception("speech request %s failed", prepared.request_id)
        metrics.REQUESTS.labels(stream=stream, outcome="error").inc()
        return _error(server_error(e))
    finally:
        job.close()
    metrics.REQUESTS.labels(stream=stream, outcome="ok").inc()
    metrics.AUDIO_SECONDS.labels(stream=stream).inc(wav.size / SAMPLE_RATE)
    return Response(data, media_type=MEDIA_TYPES[req.response_format],
                    headers={"X-Audio-Frames": str(job.frames)})


@router.post("/v1/audio/speech")
async def create_speech(raw_request: Request) -> Response:
    t0 = time.perf_counter()
    try:
        service = _service(raw_request)
        req = parse_speech_request(await raw_request.body(), service.served_models)
    except SpeechError as e:
        metrics.REQUESTS.labels(stream="unknown", outcome="invalid").inc()
        return _error(e)
    # The body is read: from here on a disconnect cancels the work (and aborts engine requests).
    return await _respond(service=service, req=req, raw_request=raw_request, t0=t0)


@router.get("/v1/audio/voices")
async def list_voices(raw_request: Request) -> Response:
    try:
        _service(raw_request)
    except SpeechError as e:
        return _error(e)
    return JSONResponse({"object": "list", "data": [
        {"id": name, "object": "voice", "seed": seed} for name, seed in VOICES.items()],
        "also_accepted": ["seed:<int>", "an upstream ChatTTS speaker string", '{"id": <either>}']})


class SpeechPlugin:
    """The `vllm.endpoint_plugins` factory: routes now, the service once the engine is up."""

    name = "chattts_speech"
    required_tasks = ("generate",)

    def attach_router(self, app: FastAPI) -> None:
        app.include_router(router)

    async def init_state(self, engine_client, state, args) -> None:
        if (getattr(args, "api_server_count", 1) or 1) > 1 and not getattr(args, "uds", None) \
                and listeners.enabled():
            # Before the HTTP server starts listening on the socket it was handed.
            listeners.take_own_listener(args.port)
        if engine_client is None:                       # CPU-only render server: no engine
            return
        archs = getattr(engine_client.model_config, "architectures", None) or []
        if ARCHITECTURE not in archs:
            logger.warning("chattts_speech: served model is %s, not %s; speech routes answer 503",
                           archs, ARCHITECTURE)
            return
        setattr(state, STATE_KEY, await SpeechService.create(engine_client, args))
        logger.info("chattts_speech: POST /v1/audio/speech ready (models %s)",
                    getattr(state, STATE_KEY).served_models)
