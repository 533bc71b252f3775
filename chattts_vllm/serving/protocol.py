"""The OpenAI speech request (`POST /v1/audio/speech`) and OpenAI-style error bodies.

Fields follow OpenAI's API; `temperature`, `top_p`, `top_k`, `repetition_penalty`, `seed`,
`min_new_token` and `max_new_token` (frames per sentence) are ChatTTS extras, with upstream's
defaults, and `stream_first_chunk_frames` a streaming extra (the `openai` client sends them through `extra_body`). Parsing is done by hand from the raw body, so a
non-JSON body, a wrong type and an unknown format all come back as the same 400 error shape instead
of FastAPI's 422 validation report.
"""
from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from chattts_vllm.audio.formats import FORMATS

MAX_INPUT_CHARS = 4096

# pydantic's loc -> the error code a client can branch on.
_CODES = {"input": "invalid_input", "response_format": "unsupported_format",
          "stream_format": "unsupported_stream_format", "speed": "invalid_speed",
          "voice": "invalid_voice", "model": "invalid_model"}


class SpeechError(ValueError):
    """A request the server refuses with HTTP 400 (or `status`), before any audio is produced."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None,
                 status: int = 400, type: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.type = message, param, code, status, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


class VoiceId(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str


class SpeechRequest(BaseModel):
    """One speech request; unknown fields are ignored, as OpenAI-compatible servers usually do."""

    model: str
    input: str = Field(max_length=MAX_INPUT_CHARS)
    voice: str | VoiceId = "default"
    instructions: str | None = Field(default=None, max_length=MAX_INPUT_CHARS)
    response_format: Literal[FORMATS] = "mp3"               # type: ignore[valid-type]
    speed: float = Field(default=1.0, ge=0.25, le=4.0)
    # None: one complete file; "audio": chunked bytes as they are decoded; "sse": events.
    stream_format: Literal["audio", "sse"] | None = None
    temperature: float = Field(default=0.3, gt=0, le=5)
    top_p: float = Field(default=0.7, gt=0, le=1)
    top_k: int = Field(default=20, ge=1, le=626)
    repetition_penalty: float = Field(default=1.05, gt=0, le=10)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    min_new_token: int = Field(default=0, ge=0)
    max_new_token: int = Field(default=2048, ge=1)
    # Streaming only: frames of the first sentence before an early first chunk (decoded with the
    # right context that exists; everything after it and a 43 ms crossfade is exact). 0: exact
    # stream, first audio after the decoders' lookahead (53 frames); None: the server's default
    # (CHATTTS_VLLM_STREAM_FIRST_CHUNK_FRAMES, 0 unless set).
    stream_first_chunk_frames: int | None = Field(default=None, ge=0, le=4096)

    @property
    def voice_spec(self) -> str | dict:
        return {"id": self.voice.id} if isinstance(self.voice, VoiceId) else self.voice


def _first_error(e: ValidationError) -> SpeechError:
    err = e.errors()[0]
    param = str(err["loc"][0]) if err["loc"] else None
    code = _CODES.get(param or "", "invalid_value")
    if param == "input" and err["type"] == "string_too_long":
        code = "input_too_long"
    if param == "response_format":
        return SpeechError(f"unsupported response_format {err.get('input')!r}; choose one of "
                           f"{', '.join(FORMATS)}", param, code)
    if err["type"] == "missing":
        return SpeechError(f"'{param}' is a required property", param, "missing_required_parameter")
    return SpeechError(f"{param}: {err['msg']}" if param else err["msg"], param, code)


def parse_speech_request(body: bytes, served_models: list[str]) -> SpeechRequest:
    """Raw body -> a checked request, or SpeechError (400) saying which field is wrong."""
    try:
        data = json.loads(body or b"")
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SpeechError(f"request body is not valid JSON ({e})", None, "invalid_json") from None
    if not isinstance(data, dict):
        raise SpeechError("request body must be a JSON object", None, "invalid_json")
    try:
        req = SpeechRequest.model_validate(data)
    except ValidationError as e:
        raise _first_error(e) from None
    if req.model not in served_models:
        raise SpeechError(f"the model `{req.model}` does not exist; this server serves "
                          f"{', '.join(served_models)}", "model", "model_not_found")
    if not req.input.strip():
        raise SpeechError("input is empty", "input", "empty_input")
    return req
