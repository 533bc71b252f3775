"""Every output format decodes back to 24 kHz mono of the right length, one-shot and streamed.
Lossless formats are compared sample by sample; lossy ones by length, within codec padding."""
from __future__ import annotations

import io

import av
import numpy as np
import pytest
import soundfile as sf

from chattts_vllm.audio.formats import FORMATS, MEDIA_TYPES, StreamEncoder, encode_audio, to_pcm16

N = 24000 + 24000 // 3 + 17                     # 1.33 s, not a multiple of any codec frame
WAV = (0.4 * np.sin(2 * np.pi * 330 * np.arange(N) / 24000)).astype(np.float32)
LOSSY_PAD = 2048                                # mp3 encoder delay + last-frame padding


def _decode_av(data: bytes) -> tuple[np.ndarray, int]:
    with av.open(io.BytesIO(data)) as c:
        stream = c.streams.audio[0]
        frames = [f.to_ndarray().reshape(f.layout.nb_channels, -1)[0] if f.format.is_planar
                  else f.to_ndarray().reshape(-1, f.layout.nb_channels)[:, 0]
                  for f in c.decode(stream)]
        y = np.concatenate(frames)
        if y.dtype.kind == "i":                     # s16 / s32 sample formats
            y = y / float(np.iinfo(y.dtype).max + 1)
        return y.astype(np.float32), stream.rate


def _decode(data: bytes, fmt: str) -> tuple[np.ndarray, int]:
    if fmt == "pcm":
        return np.frombuffer(data, "<i2").astype(np.float32) / 32767, 24000
    try:
        y, sr = sf.read(io.BytesIO(data), dtype="float32")
    except Exception:                      # streamed FLAC (no total length): libsndfile refuses
        return _decode_av(data)
    return (y if y.ndim == 1 else y[:, 0]), sr


def _check(decoded: np.ndarray, sr: int, fmt: str) -> None:
    assert sr == 24000
    if fmt in ("wav", "pcm", "flac"):
        assert decoded.shape == (N,)
        assert np.abs(decoded - WAV).max() <= 1e-4        # 16-bit quantization
    else:
        assert N <= decoded.shape[0] <= N + LOSSY_PAD, (fmt, decoded.shape[0])
        assert np.abs(decoded).max() > 0.1          # there is sound in it


@pytest.mark.parametrize("fmt", FORMATS)
def test_oneshot_roundtrip(fmt):
    data = encode_audio(WAV, fmt)
    _check(*_decode(data, fmt), fmt)
    assert MEDIA_TYPES[fmt].startswith("audio/")


@pytest.mark.parametrize("fmt", FORMATS)
def test_stream_roundtrip(fmt):
    enc = StreamEncoder(fmt)
    parts = [enc.write(WAV[i:i + 4800]) for i in range(0, N, 4800)]      # 200 ms chunks
    parts.append(enc.close())
    assert sum(len(p) for p in parts[:-1]) > 0                             # bytes flow before close
    _check(*_decode(b"".join(parts), fmt), fmt)
    assert enc.cheap == (fmt in ("wav", "pcm"))      # only those are encoded on the event loop


def test_wav_stream_header_unknown_size():
    enc = StreamEncoder("wav")
    first = enc.write(WAV[:100])
    assert first[:4] == b"RIFF" and first[4:8] == b"\xff\xff\xff\xff" and len(first) == 44 + 200
    assert enc.write(WAV[100:200]) == to_pcm16(WAV[100:200])


def test_pcm16_clips_and_rounds():
    assert np.frombuffer(to_pcm16(np.array([2.0, -2.0, 0.5], np.float32)), "<i2").tolist() == [
        32767, -32767, 16384]
    assert to_pcm16(np.zeros(0, np.float32)) == b""


def test_unknown_format():
    with pytest.raises(ValueError):
        encode_audio(WAV, "aac")
