"""The low-latency first chunk of a stream (StreamConfig.first_chunk_frames): the first audio leaves
after F frames instead of the decoders' 53-frame lookahead, and everything after the first chunk
and its crossfade equals the one-shot decode, as the exact stream (the default) does throughout.

No engine: frames come from a fake utterance that reports them a few milliseconds apart, through
the real SpeechJob.stream, with narrow audio models of the real depth (hence the real lookahead).
"""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from chattts_vllm.audio.checkpoint import (AudioModels, decoder_shapes, load_decoder, load_vocos,
                                           random_state_dict, vocos_shapes)
from chattts_vllm.serving.pipeline import decode_utterance, warm_up_audio
from chattts_vllm.serving.protocol import SpeechError, parse_speech_request
from chattts_vllm.serving.streaming import (CROSSFADE, HOLD_BACK_FRAMES, MIN_FIRST_CHUNK_FRAMES,
                                            SAMPLES_PER_FRAME, AudioRunner, SpeechJob,
                                            StreamConfig, Utterance, early_points)


class FakeUtterance:
    """Reports one more frame every `period` seconds; reads come from fixed arrays."""

    wait = Utterance.wait
    check = Utterance.check

    def __init__(self, hidden: np.ndarray, period: float = 0.005, burst: int = 1):
        self.hidden = hidden
        self.codes = np.zeros((len(hidden), 4), np.int32)
        self.frames, self.done, self.error = 0, False, None
        self._changed = asyncio.Event()
        self.task = asyncio.create_task(self._produce(period, burst))

    async def _produce(self, period: float, burst: int) -> None:
        while self.frames < len(self.hidden):
            await asyncio.sleep(period)
            self.frames = min(len(self.hidden), self.frames + burst)
            self._changed.set()
        self.done = True
        self._changed.set()

    def read(self, start: int, stop: int):
        return self.codes[start:stop], self.hidden[start:stop]

    def close(self) -> None:
        self.task.cancel()


@pytest.fixture(scope="module")
def audio():
    torch.manual_seed(0)
    dec = load_decoder(random_state_dict(decoder_shapes(idim=8, odim=16, hidden=16, bn_dim=8), 3))
    voc = load_vocos(random_state_dict(vocos_shapes(dim=16, intermediate=32), 4))
    with ThreadPoolExecutor(1) as pool:
        yield AudioRunner(AudioModels(dec, None, voc), pool)


def _hidden(frames: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((frames, 16)).astype(np.float32)


def _run(audio: AudioRunner, hiddens: list[np.ndarray], cfg: StreamConfig,
         job_frames: int | None = None, burst: int = 1) -> tuple[list[np.ndarray], list[int]]:
    """The stream's chunks, and the frames of sentence 1 reported when each chunk was yielded."""
    async def go():
        job = SpeechJob.__new__(SpeechJob)
        job.utterances = [FakeUtterance(h, burst=burst) for h in hiddens]
        job.used_tokens, job.first_chunk_frames = 0, job_frames
        chunks, seen = [], []
        async for wav in job.stream(audio, cfg):
            chunks.append(wav)
            seen.append(job.utterances[0].frames)
        job.close()
        return chunks, seen
    return asyncio.run(go())


def _oneshot(audio: AudioRunner, hidden: np.ndarray) -> np.ndarray:
    return decode_utterance(audio.models, np.zeros((len(hidden), 4), np.int32), hidden)


def test_exact_stream_is_the_default_and_waits_for_the_lookahead(audio):
    assert StreamConfig().first_chunk_frames == 0 and audio.lookahead == 53
    h = _hidden(120, 0)
    chunks, seen = _run(audio, [h], StreamConfig())
    ref = _oneshot(audio, h)
    got = np.concatenate(chunks)
    assert got.shape == ref.shape and np.abs(got - ref).max() <= 1e-4
    assert seen[0] >= audio.lookahead


def test_early_points_double_below_the_lookahead():
    assert early_points(12, 53) == [12, 24, 48]
    assert early_points(16, 53) == [16, 32]
    assert early_points(24, 53) == [24, 48]          # 48 < 53; 96 is past the lookahead
    assert early_points(2, 53)[0] == MIN_FIRST_CHUNK_FRAMES
    assert early_points(40, 53) == [40]


@pytest.mark.parametrize("frames", [12, 16, 24])
def test_early_chunks_then_exact(audio, frames):
    """Early chunks after F, 2F, 4F, ... frames (each decoded as if the utterance ended there) keep
    audio coming while the exact stream waits for its lookahead; from the last one's crossfade on,
    the stream equals the one-shot decode, with no sample lost or doubled."""
    h = _hidden(160, 1)
    chunks, seen = _run(audio, [h], StreamConfig(first_chunk_frames=frames))
    ref = _oneshot(audio, h)
    got = np.concatenate(chunks)
    points = early_points(frames, audio.lookahead)
    sizes = [len(c) for c in chunks[:len(points)]]
    ends = [SAMPLES_PER_FRAME * (e - HOLD_BACK_FRAMES) for e in points]
    print(f"early chunks after {seen[:len(points)]} frames (asked {points}); exact needs "
          f"{audio.lookahead}; early-region max diff {np.abs(got[:ends[-1]] - ref[:ends[-1]]).max():.3f}")
    assert np.cumsum(sizes).tolist() == ends          # chunk k carries its audio up to e_k - 3
    assert all(s < audio.lookahead for s in seen[:len(points)])   # all before the exact stream could
    assert got.shape == ref.shape
    exact_from = ends[-1] + CROSSFADE
    assert np.abs(got[exact_from:] - ref[exact_from:]).max() <= 1e-4
    # each crossfade blends into the newer audio: its last samples are nearly the newer decode's
    assert np.abs(got[exact_from - 8:exact_from] - ref[exact_from - 8:exact_from]).max() <= \
        np.abs(ref).max() * 0.05 + 1e-4
    for e0, e1 in zip(points, points[1:]):           # joint k: the decode of e1 frames takes over
        newer = _oneshot(audio, h[:e1])
        j = SAMPLES_PER_FRAME * (e0 - HOLD_BACK_FRAMES) + CROSSFADE
        assert np.abs(got[j:j + 256] - newer[j:j + 256]).max() <= 1e-4


def test_early_chunk_does_not_depend_on_engine_timing(audio):
    """An engine that reports frames 7 at a time (a busy server) or one by one gives the same
    stream: the early chunk always decodes exactly F frames (before, it decoded however many had
    arrived, so its audio depended on load)."""
    h = _hidden(130, 5)
    slow, _ = _run(audio, [h], StreamConfig(first_chunk_frames=12))
    fast, seen = _run(audio, [h], StreamConfig(first_chunk_frames=12), burst=7)
    assert seen[0] > 12                                   # the engine was past F when it woke up
    assert len(slow[0]) == len(fast[0]) == (12 - HOLD_BACK_FRAMES) * SAMPLES_PER_FRAME
    for a, b in zip(slow[:3], fast[:3]):                    # the same early decodes, bit for bit
        np.testing.assert_array_equal(a, b)
    # after it the exact stream's push sizes follow the engine, which moves only float rounding
    assert np.abs(np.concatenate(slow) - np.concatenate(fast)).max() <= 1e-5


def test_request_choice_overrides_the_server_default_and_only_sentence_one_is_early(audio):
    hs = [_hidden(90, 2), _hidden(80, 3)]
    refs = [_oneshot(audio, h) for h in hs]
    chunks, seen = _run(audio, hs, StreamConfig(first_chunk_frames=0), job_frames=20)
    got = np.concatenate(chunks)
    assert seen[0] < audio.lookahead and got.shape[0] == sum(r.shape[0] for r in refs)
    s2 = got[refs[0].shape[0]:]
    assert np.abs(s2 - refs[1]).max() <= 1e-4           # sentence 2 is exact from its first sample
    # and a request asking for 0 gets the exact stream on a server whose default is early
    chunks, seen = _run(audio, hs[:1], StreamConfig(first_chunk_frames=20), job_frames=0)
    assert seen[0] >= audio.lookahead and np.abs(np.concatenate(chunks) - refs[0]).max() <= 1e-4


def test_utterance_shorter_than_the_early_chunk_is_exact(audio):
    h = _hidden(12, 4)
    chunks, _ = _run(audio, [h], StreamConfig(first_chunk_frames=24))
    ref = _oneshot(audio, h)
    assert np.abs(np.concatenate(chunks) - ref).max() <= 1e-4


def test_request_field():
    body = b'{"model": "chattts", "input": "hi", "stream_format": "audio", "stream_first_chunk_frames": 20}'
    assert parse_speech_request(body, ["chattts"]).stream_first_chunk_frames == 20
    assert parse_speech_request(b'{"model": "chattts", "input": "hi"}', ["chattts"]).stream_first_chunk_frames is None
    with pytest.raises(SpeechError) as e:
        parse_speech_request(b'{"model": "chattts", "input": "hi", "stream_first_chunk_frames": -1}', ["chattts"])
    assert e.value.param == "stream_first_chunk_frames"


def test_warm_up_runs_every_stream_shape(audio):
    """The start-up warm-up decodes each shape a stream asks for: the early chunks, a stream's first
    push, a block and the flush, at the real lookahead (so the first requests JIT nothing new)."""
    seen = []
    dec = audio.models.decoder
    orig = dec.decode_frames
    dec.decode_frames = lambda x: (seen.append(x.shape[1]), orig(x))[1]
    try:
        warm_up_audio(audio.models, audio.lookahead, 48, early=(12, 20))
    finally:
        del dec.decode_frames
    assert seen[:2] == [12, 20]                       # the early chunks, decoded whole
    assert seen[2] == audio.lookahead                 # the first push
    assert len(seen) >= 4 and all(n > 0 for n in seen)  # a block, then the flush


def test_warm_up_with_batches_runs_each_shape_per_batch_and_repeat(audio):
    """With audio CUDA graphs the server warms every shape as each padded batch size, twice (a
    graph is captured on a shape's second call); without, once at batch 1 (as above)."""
    seen = []
    dec = audio.models.decoder
    orig = dec.decode_frames
    dec.decode_frames = lambda x: (seen.append((x.shape[0], x.shape[1], x.is_contiguous())), orig(x))[1]
    try:
        warm_up_audio(audio.models, audio.lookahead, 48, early=(12,), batches=(1, 2), repeat=2)
    finally:
        del dec.decode_frames
    one = [t for b, t, _ in seen if b == 1]
    assert [t for b, t, _ in seen if b == 2] == one           # the same shapes at batch 2,
    assert all(c for b, _, c in seen if b == 2)               # contiguous, as a coalesced batch
    assert len(one) % 2 == 0 and one[:len(one) // 2] == one[len(one) // 2:]   # twice each
    assert one[0] == 12 and one[1] == audio.lookahead
