"""Waveform (float32, 24 kHz, mono) → bytes: wav, pcm, flac, mp3, opus; one-shot and streaming.

One-shot: `encode_audio(wav, fmt)`. wav and flac go through soundfile (complete headers); mp3
(libmp3lame) and opus (libopus in Ogg) through PyAV, whose encoders are incremental by design.

Streaming: `StreamEncoder(fmt)`; `write(chunk)` returns whatever bytes are ready, `close()` the rest.
  wav   a 44-byte header with unknown sizes (0xFFFFFFFF, as OpenAI's API sends), then PCM16 chunks
  pcm   raw 16-bit little-endian PCM, no header
  mp3   MPEG-2 layer III frames as LAME emits them (encoder delay ≈ 1 frame)
  opus  Ogg pages flushed every 60 ms of audio
  flac  FLAC frames as encoded; STREAMINFO carries no total length or MD5 (unknown when the header
        is sent), which decoders accept
"""
from __future__ import annotations

import io
import struct

import numpy as np

SAMPLE_RATE = 24000
FORMATS = ("wav", "pcm", "flac", "mp3", "opus")
MEDIA_TYPES = {"wav": "audio/wav", "pcm": "audio/pcm", "flac": "audio/flac", "mp3": "audio/mpeg",
               "opus": "audio/ogg"}
_AV = {"mp3": ("mp3", "libmp3lame"), "opus": ("ogg", "libopus"), "flac": ("flac", "flac")}


def _as_float32(wav) -> np.ndarray:
    if hasattr(wav, "detach"):
        wav = wav.detach().float().cpu().numpy()
    wav = np.asarray(wav, dtype=np.float32)
    if wav.ndim != 1:
        raise ValueError(f"expected a mono (N,) waveform, got shape {wav.shape}")
    return wav


def to_pcm16(wav) -> bytes:
    """Float in [-1, 1] (clipped) → 16-bit little-endian PCM bytes."""
    x = np.clip(_as_float32(wav), -1.0, 1.0)
    return np.round(x * 32767.0).astype("<i2").tobytes()


def wav_stream_header(sample_rate: int = SAMPLE_RATE) -> bytes:
    """RIFF/WAVE PCM16 mono header for a stream of unknown length (sizes 0xFFFFFFFF)."""
    unknown = 0xFFFFFFFF
    return (b"RIFF" + struct.pack("<I", unknown) + b"WAVEfmt "
            + struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, sample_rate * 2, 2, 16)
            + b"data" + struct.pack("<I", unknown))


def encode_audio(wav, fmt: str, sample_rate: int = SAMPLE_RATE) -> bytes:
    """A whole waveform → the bytes of one file in `fmt` (see FORMATS)."""
    fmt = _check(fmt)
    x = _as_float32(wav)
    if fmt == "pcm":
        return to_pcm16(x)
    if fmt in ("wav", "flac"):
        import soundfile as sf

        buf = io.BytesIO()
        sf.write(buf, np.clip(x, -1.0, 1.0), sample_rate, format=fmt.upper(), subtype="PCM_16")
        return buf.getvalue()
    buf = io.BytesIO()          # seekable: the mp3 muxer can write its LAME/Xing tag (delay, length)
    enc = StreamEncoder(fmt, sample_rate, _file=buf)
    enc.write(x)
    enc.close()
    return buf.getvalue()


def _check(fmt: str) -> str:
    fmt = fmt.lower()
    if fmt not in FORMATS:
        raise ValueError(f"unsupported audio format {fmt!r}; choose one of {FORMATS}")
    return fmt


class _Sink:
    """Write-only, non-seekable file object: muxers then never rewrite bytes already sent."""

    def __init__(self):
        self.buf = bytearray()

    def write(self, b) -> int:
        self.buf += bytes(b)
        return len(b)

    def take(self) -> bytes:
        out = bytes(self.buf)
        self.buf.clear()
        return out


class StreamEncoder:
    """Chunks of float32 samples in, encoded bytes out (for chunked HTTP responses)."""

    def __init__(self, fmt: str, sample_rate: int = SAMPLE_RATE, _file=None):
        self.fmt = _check(fmt)
        self.sample_rate = sample_rate
        self.media_type = MEDIA_TYPES[self.fmt]
        self._header = wav_stream_header(sample_rate) if self.fmt == "wav" else b""
        self._closed = False
        self._container = None
        if self.fmt in _AV:
            import av

            container_fmt, codec = _AV[self.fmt]
            self._sink = _Sink()
            opts = {"page_duration": "60000"} if container_fmt == "ogg" else {}
            self._container = av.open(_file or self._sink, mode="w", format=container_fmt, options=opts,
                                      container_options={"flush_packets": "1"}, buffer_size=4096)
            self._stream = self._container.add_stream(codec, rate=sample_rate, layout="mono")

    @property
    def cheap(self) -> bool:
        """wav / pcm: a sample conversion (microseconds), worth no thread hop per chunk."""
        return self._container is None

    def write(self, chunk) -> bytes:
        if self._closed:
            raise RuntimeError("write() after close()")
        x = _as_float32(chunk)
        if self._container is None:                       # wav / pcm
            out, self._header = self._header + to_pcm16(x), b""
            return out
        if x.size == 0:
            return self._sink.take()
        import av

        frame = av.AudioFrame.from_ndarray(np.clip(x, -1.0, 1.0)[None], format="flt", layout="mono")
        frame.sample_rate = self.sample_rate
        for packet in self._stream.encode(frame):
            self._container.mux(packet)
        return self._sink.take()

    def close(self) -> bytes:
        if self._closed:
            return b""
        self._closed = True
        if self._container is None:
            out, self._header = self._header, b""
            return out
        for packet in self._stream.encode(None):
            self._container.mux(packet)
        self._container.close()
        return self._sink.take()
