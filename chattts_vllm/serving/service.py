"""The speech service of one API server: tokenizer, normaliser, voices, audio models, thread pool.

`prepare` turns a checked `SpeechRequest` into the code-pass requests of its sentences (running the
refine pass first when the instructions ask for it). Every user error becomes a `SpeechError` here,
before a single byte of audio is sent, so a bad request costs no engine time and gets a clean 400.
"""
from __future__ import annotations

import asyncio
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from chattts_vllm.audio.checkpoint import load_audio_models
from chattts_vllm.audio.coalesce import Coalescer
from chattts_vllm.audio.convnext import triton_kernels
from chattts_vllm.audio.graphs import freeze_cuda_graphs, graphs_enabled_by_env
from chattts_vllm.gpt.requests import EnginePrompt, code_request
from chattts_vllm.params import InferCodeParams, InvalidParamsError, RefineTextParams
from chattts_vllm.serving import metrics
from chattts_vllm.serving.controls import InvalidInstructionsError, refine_prompt, speed_prompt
from chattts_vllm.serving.pipeline import SpeechPlan, split_text, warm_up_audio
from chattts_vllm.serving.protocol import SpeechError, SpeechRequest
from chattts_vllm.serving.streaming import (AudioRunner, SpeechJob, StreamConfig, early_points,
                                             refine_texts)
from chattts_vllm.text import normalize, prompt
from chattts_vllm.text.normalize import Normalizer
from chattts_vllm.text.prompt import ChatTTSTokenizer
from chattts_vllm.text.speaker import (InvalidSpeakerError, SpeakerStats, UnknownVoiceError,
                                       resolve_voice)

_EMPTY = (normalize.EmptyTextError, prompt.EmptyTextError)
logger = logging.getLogger(__name__)


def audio_device() -> tuple[str, torch.dtype]:
    """CHATTTS_VLLM_AUDIO_DEVICE / _DTYPE; default: the GPU in bfloat16 if there is one, else the
    CPU in float32. On the GPU, float32 Decoder/Vocos GEMMs run on CUDA cores (IEEE, no TF32, to
    match PyTorch to 1e-4), about ten times the GPU time of bf16 on tensor cores, and that time is
    taken from the engine sharing the card; bf16 stays within 1e-2 of float32."""
    device = os.environ.get("CHATTTS_VLLM_AUDIO_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    default = "bfloat16" if torch.device(device).type == "cuda" else "float32"
    dtype = getattr(torch, os.environ.get("CHATTTS_VLLM_AUDIO_DTYPE") or default)
    return device, dtype


def _switch(name: str, device: str) -> bool:
    """An on/off environment switch whose default is on for CUDA audio and off elsewhere."""
    env = os.environ.get(name)
    if env is None or env == "":
        return torch.device(device).type == "cuda"
    return env.strip().lower() not in ("0", "false", "no", "off")


def audio_coalesce(device: str) -> bool:
    """CHATTTS_VLLM_AUDIO_COALESCE; default on for CUDA, where per-stream decodes are launch-bound."""
    return _switch("CHATTTS_VLLM_AUDIO_COALESCE", device)


def audio_threads(coalesce: bool) -> int:
    """CHATTTS_VLLM_AUDIO_THREADS; default 64 with coalescing (a stream's thread mostly waits on the
    coalescer, holding no GIL, so many streams must be able to wait at once), else up to 4."""
    default = 64 if coalesce else min(4, os.cpu_count() or 1)
    return int(os.environ.get("CHATTTS_VLLM_AUDIO_THREADS", default))


INLINE_SPLIT_CHARS = 400          # inputs up to this long are normalised on the event loop
WARM_FIRST_CHUNK_FRAMES = (6, 12)  # first-chunk lengths warmed at start-up besides the server's own
GRAPH_BATCHES = (1, 2, 4, 8, 16, 32, 64)   # coalesced batches (padded) captured with audio graphs


def audio_warm_up(device: str) -> bool:
    """CHATTTS_VLLM_AUDIO_WARMUP; default on for CUDA, where each new decode shape JIT-compiles."""
    return _switch("CHATTTS_VLLM_AUDIO_WARMUP", device)


@dataclass
class Prepared:
    """What a request needs from the engine, all validated."""

    requests: list[EnginePrompt]
    refine_tokens: int
    request_id: str
    first_chunk_frames: int | None = None     # streaming: overrides the server's StreamConfig


class SpeechService:
    def __init__(self, engine, model_dir: str | Path, served_models: list[str], max_model_len: int,
                 threads: int | None = None):
        model_dir = Path(model_dir)
        self.engine = engine
        self.served_models = served_models
        self.max_model_len = max_model_len
        self.tokenizer = ChatTTSTokenizer.from_dir(model_dir)
        self.normalizer = Normalizer()
        try:
            self.stats: SpeakerStats | None = SpeakerStats.load(model_dir / "chattts")
        except FileNotFoundError:
            self.stats = None
        device, dtype = audio_device()
        # With the audio's CUDA graphs on, coalesced batches are padded to powers of two so a
        # few graphs per shape serve every number of streams.
        coalescer = (Coalescer(pad_batches=graphs_enabled_by_env()) if audio_coalesce(device)
                     else None)
        if coalescer is not None:
            metrics.COALESCERS.add(coalescer)
        threads = threads or audio_threads(coalescer is not None)
        self.audio = AudioRunner(load_audio_models(model_dir, device, dtype),
                                 ThreadPoolExecutor(threads, thread_name_prefix="chattts-audio"),
                                 coalescer=coalescer)
        self.stream_config = StreamConfig.from_env()
        if audio_warm_up(device):
            cfg = self.stream_config
            early = sorted({n for f in (cfg.first_chunk_frames, *WARM_FIRST_CHUNK_FRAMES) if f > 0
                            for n in early_points(f, self.audio.lookahead)})
            # With audio CUDA graphs: every shape at every padded batch size, twice (a graph is
            # captured on a shape's second call), then no more captures while serving.
            graphs = graphs_enabled_by_env() and torch.device(device).type == "cuda"
            warm_up_audio(self.audio.models, max(cfg.first_block, self.audio.lookahead), cfg.block,
                          tuple(early), self.audio.use_decoder,
                          batches=GRAPH_BATCHES if graphs else (1,), repeat=2 if graphs else 1)
            if graphs:
                m = self.audio.models
                kept = sum(freeze_cuda_graphs(net) for net in (m.decoder, m.dvae, m.vocos))
                logger.info("chattts: %d audio CUDA graphs captured at start-up, no more while serving", kept)
            triton_kernels("tune_cache").save()     # the autotune picks: a restart skips tuning

    @classmethod
    async def create(cls, engine, args) -> SpeechService:
        """From `vllm serve`'s engine client and arguments; loading runs off the event loop."""
        mc = engine.model_config
        names = list(args.served_model_name or [args.model])
        return await asyncio.to_thread(cls, engine, mc.model, names, mc.max_model_len)

    def _speaker(self, req: SpeechRequest) -> torch.Tensor | None:
        try:
            return resolve_voice(req.voice_spec, self.stats)
        except UnknownVoiceError as e:
            raise SpeechError(str(e), "voice", "unknown_voice") from None
        except (InvalidSpeakerError, ValueError) as e:
            raise SpeechError(str(e), "voice", "invalid_voice") from None

    def _plan(self, req: SpeechRequest, sentences: list[str]) -> SpeechPlan:
        try:
            controls = refine_prompt(req.instructions)
        except InvalidInstructionsError as e:
            raise SpeechError(str(e), "instructions", "invalid_instructions") from None
        try:
            params = InferCodeParams(prompt=speed_prompt(req.speed), temperature=req.temperature,
                                     top_P=req.top_p, top_K=req.top_k,
                                     repetition_penalty=req.repetition_penalty, manual_seed=req.seed,
                                     min_new_token=req.min_new_token, max_new_token=req.max_new_token)
        except InvalidParamsError as e:
            raise SpeechError(str(e), None, "invalid_value") from None  # e.g. min > max_new_token
        refine = None if controls is None else RefineTextParams(prompt=controls, manual_seed=req.seed)
        return SpeechPlan.build(sentences, params, self._speaker(req), refine)

    async def prepare(self, req: SpeechRequest, request_id: str) -> Prepared:
        try:
            if len(req.input) <= INLINE_SPLIT_CHARS:
                # ~0.3 ms: cheaper on the loop than a pool round trip, which under a burst of
                # streams queued behind audio work (H100, 64 streams: ~60 ms of "prepare").
                sentences = split_text(self.normalizer, req.input)
            else:
                sentences = await self.audio.run(split_text, self.normalizer, req.input)
        except _EMPTY as e:
            raise SpeechError(str(e), "input", "empty_input") from None
        plan = self._plan(req, sentences)
        texts, used = plan.sentences, 0
        try:
            if plan.refine is not None:
                texts, used = await refine_texts(self.engine, self.tokenizer, texts, plan.refine,
                                                 request_id, self.max_model_len)
            reqs = [code_request(self.tokenizer, t, p, speaker=plan.speaker,
                                 max_model_len=self.max_model_len) for t, p in zip(texts, plan.params)]
        except _EMPTY as e:
            raise SpeechError(str(e), "input", "empty_input") from None
        except prompt.TextTooLongError as e:
            raise SpeechError(str(e), "input", "input_too_long") from None
        return Prepared(reqs, used, request_id, req.stream_first_chunk_frames)

    def start(self, prepared: Prepared, *, whole: bool = False) -> SpeechJob:
        """Submit every sentence to the engine now (call from the task that will read them).

        `whole`: the audio is wanted as one file (`SpeechJob.waveform`), not streamed."""
        return SpeechJob(self.engine, prepared.requests, prepared.request_id, prepared.refine_tokens,
                         prepared.first_chunk_frames, whole=whole)
