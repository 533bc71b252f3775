"""Per-request ChatTTS parameters, with upstream's defaults, and their wire form in `extra_args`.

Names follow upstream (`top_P`, `top_K`, `max_new_token`, ...) so user code ports unchanged. Every
request carries its own copy: nothing here is shared or mutated (upstream's shared default instance
leaks state between calls; ours does not).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from chattts_vllm.config import HIDDEN_SIZE, NUM_VQ

EXTRA_ARGS_KEY = "chattts"


class InvalidParamsError(ValueError):
    """A sampling parameter is out of range; raised before the request reaches the engine."""


def _check_common(p: "RefineTextParams | InferCodeParams") -> None:
    temps = p.temperature if isinstance(p.temperature, (list, tuple)) else [p.temperature]
    for t in temps:
        if not (isinstance(t, (int, float)) and math.isfinite(t) and t > 0):
            raise InvalidParamsError(f"temperature must be a positive number, got {t!r}")
    if not (0 < p.top_P <= 1):
        raise InvalidParamsError(f"top_P must be in (0, 1], got {p.top_P!r}")
    if not (isinstance(p.top_K, int) and p.top_K >= 1):
        raise InvalidParamsError(f"top_K must be a positive integer, got {p.top_K!r}")
    if not (math.isfinite(p.repetition_penalty) and p.repetition_penalty > 0):
        raise InvalidParamsError(f"repetition_penalty must be positive, got {p.repetition_penalty!r}")
    if not (isinstance(p.max_new_token, int) and p.max_new_token >= 1):
        raise InvalidParamsError(f"max_new_token must be >= 1, got {p.max_new_token!r}")
    if not (isinstance(p.min_new_token, int) and 0 <= p.min_new_token <= p.max_new_token):
        raise InvalidParamsError(
            f"min_new_token must be in [0, max_new_token={p.max_new_token}], got {p.min_new_token!r}")
    if p.manual_seed is not None and not (isinstance(p.manual_seed, int) and 0 <= p.manual_seed < 2**63):
        raise InvalidParamsError(f"manual_seed must be a non-negative int64, got {p.manual_seed!r}")


@dataclass
class RefineTextParams:
    """The refine-text pass: the text head adds prosody tokens ([uv_break], [laugh], ...)."""

    prompt: str = ""
    top_P: float = 0.7
    top_K: int = 20
    temperature: float = 0.7
    repetition_penalty: float = 1.0
    max_new_token: int = 384
    min_new_token: int = 0
    manual_seed: int | None = None

    def __post_init__(self) -> None:
        _check_common(self)
        if isinstance(self.temperature, (list, tuple)):
            raise InvalidParamsError("the refine pass takes one temperature, not a list")


@dataclass
class InferCodeParams:
    """The code pass: 4 codebooks per frame, with an optional speaker and audio prompt."""

    prompt: str = "[speed_5]"
    spk_emb: str | None = None          # upstream speaker string; see chattts_vllm.text.speaker
    spk_smp: str | None = None          # upstream prompt-audio string (voice cloning)
    txt_smp: str | None = None          # transcript of spk_smp
    top_P: float = 0.7
    top_K: int = 20
    temperature: float | list[float] = 0.3
    repetition_penalty: float = 1.05
    max_new_token: int = 2048
    min_new_token: int = 0
    manual_seed: int | None = None

    def __post_init__(self) -> None:
        _check_common(self)
        if isinstance(self.temperature, (list, tuple)) and len(self.temperature) != NUM_VQ:
            raise InvalidParamsError(f"a temperature list needs {NUM_VQ} values, got {len(self.temperature)}")

    def temperatures(self) -> list[float]:
        t = self.temperature
        return [float(x) for x in t] if isinstance(t, (list, tuple)) else [float(t)] * NUM_VQ


@dataclass
class EngineRequest:
    """What the engine-side sampler needs for one request; travels in SamplingParams.extra_args.

    Only msgpack-able values: vLLM serialises extra_args between its processes.
    """

    mode: str                               # "code" or "refine"
    seed: int
    temperature: list[float]                # one per codebook (code) or one (refine)
    top_p: float
    top_k: int
    repetition_penalty: float
    min_new_token: int
    text_len: int                           # prompt positions embedded as text
    spk_position: int | None = None         # prompt index that receives the speaker vector
    # The unit-norm 768-d speaker vector as float32 little-endian bytes (a list of floats is
    # accepted too). Bytes, because vLLM deep-copies SamplingParams twice per request and so did
    # the stream: as 768 Python floats each copy took 0.3 ms of the API server's event loop.
    speaker: bytes | list[float] | None = None
    prompt_codes: list[list[int]] | None = None  # (Tp, 4) audio-prompt frames after the text
    sink: str | None = None                 # key of the frame side channel (code mode)
    extras: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.speaker, (bytearray, memoryview)):
            self.speaker = bytes(self.speaker)
        if self.speaker is not None:
            n = len(self.speaker) / 4 if isinstance(self.speaker, bytes) else len(self.speaker)
            if n != HIDDEN_SIZE:       # the engine would fail on it, for every request in its step
                raise ValueError(f"chattts speaker must hold {HIDDEN_SIZE} float32 values, got {n:g}")

    def speaker_vector(self) -> np.ndarray | None:
        """The speaker as a float32 array (a read-only view of the bytes), or None."""
        if self.speaker is None:
            return None
        if isinstance(self.speaker, bytes):
            return np.frombuffer(self.speaker, dtype="<f4")
        return np.asarray(self.speaker, dtype=np.float32)

    def to_extra_args(self) -> dict[str, Any]:
        return {EXTRA_ARGS_KEY: {k: v for k, v in self.__dict__.items() if v is not None}}

    @classmethod
    def from_extra_args(cls, extra_args: dict[str, Any] | None) -> "EngineRequest | None":
        """None when the request is not a ChatTTS one (e.g. vLLM's warm-up or /v1/completions)."""
        if not extra_args or EXTRA_ARGS_KEY not in extra_args:
            return None
        d = dict(extra_args[EXTRA_ARGS_KEY])
        if d.get("mode") not in ("code", "refine"):
            raise ValueError(f"chattts mode must be 'code' or 'refine', got {d.get('mode')!r}")
        return cls(**d)
