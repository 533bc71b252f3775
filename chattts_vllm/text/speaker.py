"""Voices: speaker strings <-> 768-d fp16 vectors, prompt-audio strings, seeded and named voices.

The string formats are upstream ChatTTS's, so voices shared by its users work here unchanged:
- speaker (`spk_emb`): 768 fp16 little-endian -> raw LZMA2 (preset 9|extreme) -> base16384;
- prompt audio (`spk_smp`): shape as 2 x uint16 LE, then raw LZMA2 of the uint16 LE codes (4, T),
  all base16384.
The GPT never sees the raw vector: `normalize_speaker` gives the unit vector injected at [spk_emb].
"""
from __future__ import annotations

import lzma
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from chattts_vllm.config import HIDDEN_SIZE, NUM_AUDIO_TOKENS, NUM_VQ

SPEAKER_STATS_FILE = "chattts/speaker_stats.safetensors"  # inside a converted model dir
LEGACY_SPEAKER_STATS_FILE = "spk_stat.pt"                 # inside an official asset dir

_LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]
_SPEAKER_BYTES = HIDDEN_SIZE * 2


class InvalidSpeakerError(ValueError):
    """A speaker or prompt-audio string that does not decode to a valid tensor."""


class UnknownVoiceError(ValueError):
    """A voice name that is neither a named voice nor a speaker string."""


# Fixed seeds, so a name always means the same vector for a given set of speaker statistics.
# The numbers are arbitrary; with the official statistics each equals upstream's
# `torch.manual_seed(seed); chat.sample_random_speaker()`.
VOICES: dict[str, int] = {
    "default": 2222,
    "alloy": 1111, "ash": 1234, "ballad": 1528, "coral": 1997, "echo": 2048,
    "fable": 3333, "onyx": 4099, "nova": 5099, "sage": 6653, "shimmer": 7777,
    "verse": 7869, "marin": 8848, "cedar": 9527,
}


# -- base16384 + raw LZMA ---------------------------------------------------------------------

def _b14():
    import pybase16384  # imported on use: the GPU image lacks it, and only voice strings need it

    return pybase16384


def _is_base16384(s: str) -> bool:
    # Data characters are U+4E00..U+8DFF; an optional last one in U+3D01..U+3D06 marks a short tail.
    body, last = s[:-1], s[-1]
    return (all(0x4E00 <= ord(c) <= 0x8DFF for c in body)
            and (0x4E00 <= ord(last) <= 0x8DFF or 0x3D01 <= ord(last) <= 0x3D06))


def _pack(raw: bytes) -> str:
    return _b14().encode_to_string(lzma.compress(raw, format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS))


def _unpack(s: str, what: str, header: int = 0, max_len: int = 1 << 24) -> tuple[bytes, bytes]:
    """base16384 -> (header bytes, LZMA-decompressed rest); bounded so garbage cannot balloon."""
    if not isinstance(s, str) or not s.strip():
        raise InvalidSpeakerError(f"{what}: empty string")
    s = s.strip()
    if not _is_base16384(s):
        raise InvalidSpeakerError(f"{what}: not a base16384 string (unexpected characters)")
    try:
        data = _b14().decode_from_string(s)
    except Exception as e:  # pybase16384 raises SystemError on some malformed tails
        raise InvalidSpeakerError(f"{what}: bad base16384 ({e})") from None
    if len(data) <= header:
        raise InvalidSpeakerError(f"{what}: too short ({len(data)} bytes)")
    dec = lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS)
    try:
        raw = dec.decompress(data[header:], max_length=max_len + 1)
    except lzma.LZMAError as e:
        raise InvalidSpeakerError(f"{what}: bad LZMA stream ({e})") from None
    if len(raw) > max_len:
        raise InvalidSpeakerError(f"{what}: decompresses to more than {max_len} bytes")
    return data[:header], raw


# -- speaker vectors --------------------------------------------------------------------------

def _as_speaker(vec: Any) -> torch.Tensor:
    t = torch.as_tensor(vec).detach().to("cpu", torch.float16).reshape(-1)
    if t.numel() != HIDDEN_SIZE:
        raise InvalidSpeakerError(f"speaker vector must have {HIDDEN_SIZE} values, got {t.numel()}")
    if not torch.isfinite(t).all():
        raise InvalidSpeakerError("speaker vector has non-finite values (in fp16)")
    return t


def encode_speaker(vec: torch.Tensor) -> str:
    """768 values -> upstream speaker string (the vector is stored as fp16)."""
    return _pack(_as_speaker(vec).numpy().astype("<f2").tobytes())


def decode_speaker(s: str) -> torch.Tensor:
    """Upstream speaker string -> (768,) fp16."""
    _, raw = _unpack(s, "speaker string", max_len=_SPEAKER_BYTES)
    if len(raw) != _SPEAKER_BYTES:
        raise InvalidSpeakerError(
            f"speaker string: decodes to {len(raw)} bytes, expected {_SPEAKER_BYTES} "
            f"({HIDDEN_SIZE} fp16 values)")
    return _as_speaker(torch.from_numpy(np.frombuffer(raw, dtype="<f2").astype(np.float16)))


def normalize_speaker(vec: torch.Tensor) -> torch.Tensor:
    """The (768,) fp32 unit vector that replaces the [spk_emb] embedding.

    Upstream L2-normalises the stored fp16 vector (eps 1e-12) and the result is promoted to the
    fp32 embedding dtype; doing it in fp16 here keeps the rounding identical.
    """
    return F.normalize(_as_speaker(vec), p=2.0, dim=0, eps=1e-12).float()


# -- prompt audio (spk_smp) -------------------------------------------------------------------

def _as_codes(codes: Any) -> np.ndarray:
    a = np.asarray(codes.cpu() if isinstance(codes, torch.Tensor) else codes)
    if a.ndim != 2 or a.shape[0] != NUM_VQ:
        raise InvalidSpeakerError(f"prompt codes must have shape ({NUM_VQ}, T), got {a.shape}")
    if a.size and (not np.issubdtype(a.dtype, np.integer) or a.min() < 0
                   or a.max() >= NUM_AUDIO_TOKENS):
        raise InvalidSpeakerError(f"prompt codes must be integers in [0, {NUM_AUDIO_TOKENS})")
    return a


def encode_prompt_codes(codes: torch.Tensor) -> str:
    """(4, T) audio codes -> upstream prompt-audio string (`spk_smp`)."""
    a = _as_codes(codes)
    return _b14().encode_to_string(np.array(a.shape, dtype="<u2").tobytes() + lzma.compress(
        a.astype("<u2").tobytes(), format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS))


def decode_prompt_codes(s: str) -> torch.Tensor:
    """Upstream prompt-audio string -> (4, T) int32 codes."""
    head, raw = _unpack(s, "prompt-audio string", header=4)
    rows, cols = (int(x) for x in np.frombuffer(head, dtype="<u2"))
    if rows != NUM_VQ or len(raw) != 2 * rows * cols:
        raise InvalidSpeakerError(
            f"prompt-audio string: header says ({rows}, {cols}) but holds {len(raw) // 2} codes")
    codes = np.frombuffer(raw, dtype="<u2").astype(np.int32).reshape(rows, cols)
    return torch.from_numpy(_as_codes(codes).copy())


# -- statistics, seeded and named voices ------------------------------------------------------

@dataclass(frozen=True)
class SpeakerStats:
    """Per-dimension std and mean of speaker vectors (768 fp16 each): the random-voice prior."""

    std: torch.Tensor
    mean: torch.Tensor

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> SpeakerStats:
        """Legacy `spk_stat.pt` layout: (1536,) = std then mean, or (2, 768)."""
        t = torch.as_tensor(t).detach().cpu()
        if t.shape not in ((2 * HIDDEN_SIZE,), (2, HIDDEN_SIZE)):
            raise ValueError("speaker statistics must have shape (1536,) or (2, 768), "
                             f"got {tuple(t.shape)}")
        std, mean = t.to(torch.float16).reshape(2, HIDDEN_SIZE)
        if not (torch.isfinite(std).all() and torch.isfinite(mean).all()):
            raise ValueError("speaker statistics have non-finite values")
        return cls(std.clone(), mean.clone())

    @classmethod
    def load(cls, path: str | Path) -> SpeakerStats:
        """From a converted model dir (or its chattts/), an official asset dir, or the file itself."""
        path = Path(path)
        for candidate in (path / SPEAKER_STATS_FILE, path / Path(SPEAKER_STATS_FILE).name,
                          path / LEGACY_SPEAKER_STATS_FILE, path):
            if candidate.is_file():
                return cls.from_tensor(_read_stats_file(candidate))
        raise FileNotFoundError(
            f"no speaker statistics under {path} (looked for {SPEAKER_STATS_FILE} and "
            f"{LEGACY_SPEAKER_STATS_FILE})")

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"std": self.std.contiguous(), "mean": self.mean.contiguous()}


def _read_stats_file(path: Path) -> torch.Tensor:
    """(1536,) or (2, 768) from a safetensors file ('std', 'mean') or a torch-saved tensor/dict."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(obj, dict):
            obj = torch.stack([obj["std"].reshape(-1), obj["mean"].reshape(-1)])
    except Exception as e:  # wrong pickle, missing keys, unreadable file
        raise ValueError(f"{path}: not a speaker-statistics file ({type(e).__name__}: {e})") from None
    if not isinstance(obj, torch.Tensor):
        raise ValueError(f"{path}: expected a tensor, found {type(obj).__name__}")
    return obj


def random_speaker(seed: int, stats: SpeakerStats) -> torch.Tensor:
    """A seeded random voice, (768,) fp16: randn * std + mean, drawn in fp16 as upstream does."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.randn(HIDDEN_SIZE, generator=g, dtype=torch.float16).mul_(stats.std).add_(stats.mean)


def resolve_voice(voice: str | dict | torch.Tensor | None,
                  stats: SpeakerStats | None) -> torch.Tensor | None:
    """A request's voice -> raw (768,) fp16 speaker vector, or None for no speaker ([empty_spk]).

    Accepts a named voice (case-insensitive), `seed:<int>`, an upstream speaker string,
    `{"id": <either>}`, or a tensor. ASCII strings are names (base16384 text is CJK), so a typo
    gives UnknownVoiceError while a damaged speaker string gives InvalidSpeakerError.
    """
    if voice is None:
        return None
    if isinstance(voice, dict):
        if not isinstance(voice.get("id"), str):
            raise UnknownVoiceError('a voice object must look like {"id": "<name or speaker string>"}')
        voice = voice["id"]
    if isinstance(voice, torch.Tensor):
        return _as_speaker(voice)
    if not isinstance(voice, str):
        raise UnknownVoiceError(f"voice must be a string, an object or null, not {type(voice).__name__}")
    name = voice.strip()
    if not name.isascii():
        return decode_speaker(name)
    key = name.lower()
    seed = VOICES.get(key)
    digits = key[5:].strip() if key.startswith("seed:") else ""
    if seed is None and digits.isdigit() and len(digits) <= 18:
        seed = int(digits)
    if seed is not None:
        if stats is None:
            raise ValueError(f"voice {name!r} needs speaker statistics, and none were loaded")
        return random_speaker(seed, stats)
    raise UnknownVoiceError(
        f"unknown voice {name!r}: use one of {', '.join(VOICES)}, 'seed:<int>', "
        "or a ChatTTS speaker string")
