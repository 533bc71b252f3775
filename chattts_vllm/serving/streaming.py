"""Engine requests followed from the event loop, turned into audio in sentence order.

`SpeechJob` submits the code-pass requests of one text at once (one batch in the engine) and reads
them back in order. Each `Utterance` iterates `engine_client.generate(...)` in its own task, so all
sentences progress while the caller is still on the first; the caller reads frames [start, stop)
from the side channel once the engine has reported them. Decoder, Vocos and side-channel reads run
in a thread pool, never on the event loop. The stream equals the one-shot decode unless the
low-latency start is asked for (`StreamConfig.first_chunk_frames`, request field
`stream_first_chunk_frames`): sentence 1 then starts after F frames instead of the decoders'
53-frame lookahead, with early chunks after F, 2F, 4F, ... frames (each decoded as if the sentence
ended there) until the exact stream can take over; the audio is exact after the last early chunk
and a 43 ms crossfade.

Cleanup is synchronous (`SpeechJob.close`), because it runs inside a cancelled scope when a client
disconnects: it cancels the request tasks (AsyncLLM aborts a request whose `generate` is cancelled)
and removes the side-channel files. A worker that picks up an aborted request in the step that was
already running can still create its file after that, so removal is repeated a few seconds later.
"""
from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from vllm.sampling_params import RequestOutputKind

from chattts_vllm.audio.checkpoint import AudioModels
from chattts_vllm.audio.coalesce import Coalescer, coalesced_models
from chattts_vllm.gpt.requests import (EnginePrompt, num_frames, refine_request,
                                       refine_result_ids)
from chattts_vllm.runners.outputs import FrameReader
from chattts_vllm.serving.pipeline import (decode_utterance, first_output_frames, frames_input,
                                           stream_decoder)
from chattts_vllm.text.prompt import ChatTTSTokenizer, refine_ids_to_text

LATE_CLEANUP_S = (2.0, 10.0, 60.0)


@dataclass(frozen=True)
class StreamConfig:
    """Frames per decoder push. The first push waits for at least the decoders' lookahead.

    `first_chunk_frames` F > 0 (below the lookahead) switches on the low-latency start: once F
    frames of the first sentence exist, exactly those F are decoded as if the utterance ended
    there, and most of that audio is sent right away; then again after 2F, 4F, ... frames while
    that stays below the lookahead (`early_points`), each chunk crossfaded into the previous one,
    so the client does not fall silent while the exact stream waits for its lookahead. Everything
    after the last early chunk (and a short crossfade) is the exact stream again, so the whole
    stream is a function of the request alone, as the exact one is. A sentence shorter than F
    frames streams exactly. 0 (the default) keeps the whole stream equal to the one-shot decode.
    """

    first_block: int = 24
    block: int = 48
    first_chunk_frames: int = 0

    @classmethod
    def from_env(cls) -> StreamConfig:
        return cls(int(os.environ.get("CHATTTS_VLLM_STREAM_FIRST_BLOCK", cls.first_block)),
                   int(os.environ.get("CHATTTS_VLLM_STREAM_BLOCK", cls.block)),
                   int(os.environ.get("CHATTTS_VLLM_STREAM_FIRST_CHUNK_FRAMES", cls.first_chunk_frames)))


SAMPLES_PER_FRAME = 512     # 24 kHz audio per GPT frame (2 mel frames x hop 256)
HOLD_BACK_FRAMES = 3        # early-chunk frames not sent: their audio lacks most right context
CROSSFADE = 1024            # samples (43 ms) blending the early chunk's held-back audio into the exact one
MIN_FIRST_CHUNK_FRAMES = HOLD_BACK_FRAMES + 1


def early_points(first_chunk_frames: int, lookahead: int) -> list[int]:
    """Frame counts of sentence 1's early chunks: F, 2F, 4F, ... below the decoders' lookahead.

    Each early chunk is a whole-utterance decode of that many frames (bounded: at most
    max(F, lookahead) frames), so the audio keeps coming, twice as much each time, while the exact stream waits
    for its lookahead; one chunk after F frames alone left the client silent for that wait."""
    early = max(first_chunk_frames, MIN_FIRST_CHUNK_FRAMES)
    points = [early]
    while 2 * points[-1] < lookahead:
        points.append(2 * points[-1])
    return points


class _Splice:
    """Joins an early chunk (audio [0, start) already sent, plus its held-back tail) onto the exact
    stream: exact samples before `start` are dropped, the next `len(tail)` are crossfaded from the
    early audio to the exact one, the rest pass unchanged."""

    def __init__(self, start: int, tail: np.ndarray):
        self.start, self.tail = start, tail
        self.pos = 0                               # absolute index of the next exact sample

    def __call__(self, wav: np.ndarray) -> np.ndarray:
        lo, hi = self.pos, self.pos + wav.shape[0]
        self.pos = hi
        end = self.start + self.tail.shape[0]
        if hi <= self.start:
            return wav[:0]
        out = wav[max(0, self.start - lo):].copy()
        a = max(lo, self.start)                    # absolute index of out[0]
        if a < end:
            n = min(hi, end) - a
            w = (np.arange(a - self.start, a - self.start + n, dtype=np.float32) + 0.5) / self.tail.shape[0]
            out[:n] = (1 - w) * self.tail[a - self.start:a - self.start + n] + w * out[:n]
        return out


@dataclass
class AudioRunner:
    """Audio models plus the thread pool that runs them off the event loop.

    With a `coalescer`, the streams' decodes (`nets`) go through it: concurrent same-shape network
    calls of many pool threads become one batched call on its worker (audio/coalesce.py)."""

    models: AudioModels
    executor: Executor
    use_decoder: bool = True
    coalescer: Coalescer | None = None
    nets: AudioModels = field(init=False)       # `models`, routed through the coalescer if any

    def __post_init__(self) -> None:
        self.nets = (self.models if self.coalescer is None
                     else coalesced_models(self.models, self.coalescer))

    async def run(self, fn: Callable, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    @property
    def lookahead(self) -> int:
        return first_output_frames(self.models, self.use_decoder)


async def refine_texts(engine, tok: ChatTTSTokenizer, sentences: list[str], params: list,
                       request_id: str, max_model_len: int) -> tuple[list[str], int]:
    """The refine-text pass for every sentence at once -> (texts, tokens used)."""
    async def one(i: int) -> tuple[str, int]:
        ep = refine_request(tok, sentences[i], params[i], max_model_len=max_model_len)
        final = None
        async for final in engine.generate(ep.prompt, ep.sampling_params, f"{request_id}-refine-{i}"):
            pass
        ids = list(final.outputs[0].token_ids)
        used = len(ep.prompt["prompt_token_ids"]) + len(ids)
        return refine_ids_to_text(tok, refine_result_ids(ids)), used
    done = await asyncio.gather(*(one(i) for i in range(len(sentences))))
    return [t for t, _ in done], sum(n for _, n in done)


class Utterance:
    """One code-pass request: frames reported so far, finished or failed."""

    def __init__(self, engine, ep: EnginePrompt, request_id: str, final_only: bool = False):
        self.sink = ep.sink
        self.reader = FrameReader(ep.sink)
        ep = replace(ep, sampling_params=ep.sampling_params.clone())
        # final_only: nobody reads frames before the end, so the engine builds and delivers no
        # per-step output for this request (one Python wake-up per frame otherwise). Streams take
        # deltas: vLLM's `--stream-interval N` then sends one output per N frames (it cannot
        # thin cumulative outputs), and no output copies the ids sent before.
        ep.sampling_params.output_kind = (RequestOutputKind.FINAL_ONLY if final_only
                                          else RequestOutputKind.DELTA)
        self.cumulative = final_only
        self.prompt_tokens = len(ep.prompt["prompt_token_ids"])
        self.token_ids: list[int] = []
        self.frames = 0
        self.first_output_at: float | None = None   # perf_counter: the engine's first output came
        self.done = False
        self.error: BaseException | None = None
        self._changed = asyncio.Event()
        self._want = 0              # frames the reader waits for: no wake-up per frame before that
        self.task = asyncio.create_task(self._follow(engine, ep, request_id))

    async def _follow(self, engine, ep: EnginePrompt, request_id: str) -> None:
        try:
            async for out in engine.generate(ep.prompt, ep.sampling_params, request_id):
                if self.first_output_at is None:
                    self.first_output_at = time.perf_counter()
                if self.cumulative:
                    self.token_ids = list(out.outputs[0].token_ids)
                else:
                    self.token_ids.extend(out.outputs[0].token_ids)
                self.frames = num_frames(self.token_ids)
                if self.frames >= self._want:
                    self._changed.set()
        except Exception as e:  # surfaced to the reader; cancellation propagates
            self.error = e
        finally:
            self.done = True
            self._changed.set()

    async def wait(self, frames: int) -> None:
        """Until `frames` frames exist or the request has ended (woken once, not per frame:
        with 64 streams that is 64 fewer event-loop wake-ups per engine step)."""
        while True:
            self._changed.clear()
            if self.done or self.frames >= frames:
                return
            self._want = frames
            await self._changed.wait()

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def read(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Frames [start, stop) (thread pool), checked against the engine's token stream."""
        codes, hidden = self.reader.read(start, stop)
        if not np.array_equal(codes[:, 0], np.asarray(self.token_ids[start:stop])):
            raise RuntimeError("frame side channel out of step with the engine's token stream")
        return codes, hidden

    def close(self) -> None:
        aborted = not self.task.done()
        if aborted:
            self.task.cancel()
        self.reader.close()
        if aborted:
            loop = asyncio.get_running_loop()
            for delay in LATE_CLEANUP_S:
                loop.call_later(delay, self.reader.close)


class SpeechJob:
    """The sentences of one request, submitted together; audio comes back in sentence order."""

    # perf_counter stamps of a stream's first audio: submitted (set at start), its frames reported,
    # its audio decoded. They split the time to first audio into engine and decode (metrics.py).
    submitted_at: float = 0.0
    first_frames_at: float | None = None
    first_audio_at: float | None = None
    closed: bool = False

    def __init__(self, engine, requests: list[EnginePrompt], request_id: str, used_tokens: int = 0,
                 first_chunk_frames: int | None = None, whole: bool = False):
        """`whole`: the caller wants `waveform` (one file), not `stream`."""
        self.utterances = [Utterance(engine, r, f"{request_id}-{i}", final_only=whole)
                           for i, r in enumerate(requests)]
        self.used_tokens = used_tokens          # e.g. the refine pass
        self.first_chunk_frames = first_chunk_frames    # the request's choice, else the server's
        self.submitted_at = time.perf_counter()

    def usage(self) -> dict[str, int]:
        inp = sum(u.prompt_tokens for u in self.utterances)
        out = sum(u.frames for u in self.utterances)
        return {"input_tokens": inp, "output_tokens": out,
                "total_tokens": inp + out + self.used_tokens}

    @property
    def frames(self) -> int:
        return sum(u.frames for u in self.utterances)

    async def stream(self, audio: AudioRunner, cfg: StreamConfig) -> AsyncIterator[np.ndarray]:
        """Waveform pieces as they become final: sentence 1 block by block, then sentence 2, ...

        With `cfg.first_chunk_frames`, sentence 1 starts with an early chunk (see StreamConfig).
        """
        if self.first_chunk_frames is not None:
            cfg = replace(cfg, first_chunk_frames=self.first_chunk_frames)
        first = max(cfg.first_block, audio.lookahead)
        for i, u in enumerate(self.utterances):
            dec, start, need = stream_decoder(audio.nets, audio.use_decoder), 0, first
            splice = None
            if i == 0 and 0 < cfg.first_chunk_frames < first:
                for early in early_points(cfg.first_chunk_frames, audio.lookahead):
                    # Exactly `early` frames, however many exist by now: the chunk (and the
                    # crossfades) then depends only on the request, never on how far the engine
                    # got before this task woke up, and same-step streams share a shape.
                    await u.wait(early)
                    u.check()
                    if u.frames < early:             # the sentence ended first: exact from here
                        break
                    t_frames = time.perf_counter()
                    wav = await audio.run(self._decode, u, early, audio)
                    cut = SAMPLES_PER_FRAME * (early - HOLD_BACK_FRAMES)
                    # Audio up to `cut`, crossfaded from the previous early chunk's held-back tail.
                    piece = wav[:cut] if splice is None else _Splice(splice.start, splice.tail)(wav[:cut])
                    splice = _Splice(cut, wav[cut:cut + CROSSFADE])
                    # The first exact push: once it reaches a quarter block past the early audio.
                    need = max(first, early - HOLD_BACK_FRAMES + audio.lookahead + cfg.block // 4)
                    self._stamp_first_audio(t_frames)
                    yield piece
            while True:
                await u.wait(start + need)
                u.check()
                t_frames = time.perf_counter()
                ended, stop = u.done, u.frames       # snapshot: more may arrive during the push
                if stop > start:
                    wav = await audio.run(self._push, u, dec, start, stop, audio.use_decoder)
                    wav = splice(wav) if splice is not None else wav
                    start, need = stop, (cfg.block if wav.size else need)
                    if wav.size:
                        self._stamp_first_audio(t_frames)
                        yield wav
                if ended:
                    break
            t_frames = time.perf_counter()
            tail = await audio.run(lambda: dec.flush().float().cpu().numpy())
            tail = splice(tail) if splice is not None else tail
            u.close()
            if tail.size:
                self._stamp_first_audio(t_frames)   # a sentence shorter than the lookahead
                yield tail

    def _stamp_first_audio(self, frames_at: float) -> None:
        if self.first_audio_at is None:
            self.first_frames_at, self.first_audio_at = frames_at, time.perf_counter()

    @staticmethod
    def _push(u: Utterance, dec, start: int, stop: int, use_decoder: bool) -> np.ndarray:
        codes, hidden = u.read(start, stop)
        return dec.push(frames_input(codes, hidden, use_decoder)).float().cpu().numpy()

    async def waveform(self, audio: AudioRunner) -> np.ndarray:
        """The whole audio: each sentence decoded in one shot as soon as it is complete."""
        parts = []
        for u in self.utterances:
            await u.wait(float("inf"))
            u.check()
            parts.append(await audio.run(self._decode, u, u.frames, audio))
            u.close()
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)

    @staticmethod
    @torch.inference_mode()
    def _decode(u: Utterance, n: int, audio: AudioRunner) -> np.ndarray:
        """Frames [0, n) decoded as a whole utterance: the right edge padded like an ending."""
        codes, hidden = u.read(0, n)
        return decode_utterance(audio.nets, codes, hidden, audio.use_decoder)

    def close(self) -> None:
        """Cancel what still runs and remove the files; a second call does nothing."""
        if self.closed:
            return
        self.closed = True
        for u in self.utterances:
            u.close()
