"""Text -> sentences -> engine requests -> audio: the steps the offline API and the server share.

A long text is normalised and split into sentences (`Normalizer.split`); every sentence becomes its
own code-pass request, all submitted together as one batch, with the same speaker vector (one
voice for the whole text) and a per-sentence seed `seed + i` (so a fixed seed fixes the audio, and
two equal sentences still differ slightly, as speech does). Each sentence is decoded at its own
length and the waveforms are concatenated in order; near-silent samples are kept (upstream drops
every |x| <= 1e-5 sample, which would make streamed and non-streamed audio differ).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch

from chattts_vllm.audio.checkpoint import AudioModels
from chattts_vllm.audio.coalesce import coalesced_models
from chattts_vllm.audio.stream import StreamingDecoder
from chattts_vllm.params import InferCodeParams, RefineTextParams
from chattts_vllm.serving.staging import thread_staging
from chattts_vllm.text.normalize import Normalizer

SEED_MOD = 2**63


def split_text(normalizer: Normalizer, text: str, *, split: bool = True,
               normalize: bool = True) -> list[str]:
    """One text -> the sayable sentences to synthesise (EmptyTextError if none)."""
    if split:
        return normalizer.split(text, do_text_normalization=normalize)
    return [normalizer(text, do_text_normalization=normalize)]


def _seeded(params, seed: int | None, i: int):
    return params if seed is None else replace(params, manual_seed=(seed + i) % SEED_MOD)


@dataclass
class SpeechPlan:
    """The engine requests of one text: sentences, their parameters, one voice, optional refine."""

    sentences: list[str]
    params: list[InferCodeParams]
    speaker: torch.Tensor | None                  # raw (768,) fp16, shared by every sentence
    refine: list[RefineTextParams] | None = None  # None: skip the refine pass

    @classmethod
    def build(cls, sentences: list[str], params: InferCodeParams, speaker: torch.Tensor | None,
              refine: RefineTextParams | None = None) -> SpeechPlan:
        seed = params.manual_seed
        return cls(sentences, [_seeded(params, seed, i) for i in range(len(sentences))], speaker,
                   None if refine is None else
                   [_seeded(refine, refine.manual_seed, i) for i in range(len(sentences))])


# -- audio ------------------------------------------------------------------------------------

def mel_model(models: AudioModels, use_decoder: bool = True) -> torch.nn.Module:
    """The Decoder (hidden states, the default) or the DVAE (codes) in front of Vocos."""
    return models.decoder if use_decoder else models.dvae


def frames_input(codes: np.ndarray, hidden: np.ndarray, use_decoder: bool = True) -> torch.Tensor:
    """The rows the mel model reads: (T, 768) hidden states or (T, 4) codes."""
    return torch.from_numpy(hidden if use_decoder else codes.astype(np.int64))


def _decode_on_device(models: AudioModels, x: torch.Tensor, use_decoder: bool,
                      non_blocking: bool = False) -> torch.Tensor:
    """(B, T, ...) equal-length utterances -> (B, 512·T − 256) float32 samples on the models' device."""
    x = x.to(models.vocos.head.out.weight.device, non_blocking=non_blocking)
    return models.vocos.decode_frames(mel_model(models, use_decoder).decode_frames(x)).float()


def _decode_rows(models: AudioModels, x: torch.Tensor, use_decoder: bool) -> np.ndarray:
    """(B, T, ...) equal-length utterances -> (B, 512·T − 256) float32 samples in host memory."""
    return _decode_on_device(models, x, use_decoder).cpu().numpy()


@torch.inference_mode()
def decode_utterance(models: AudioModels, codes: np.ndarray, hidden: np.ndarray,
                     use_decoder: bool = True) -> np.ndarray:
    """One utterance in one shot: T frames -> 512·T − 256 samples (float32, 24 kHz)."""
    if len(codes) == 0:
        return np.zeros(0, np.float32)
    return _decode_rows(models, frames_input(codes, hidden, use_decoder)[None], use_decoder)[0]


@torch.inference_mode()
def decode_utterances(models: AudioModels, frames: list[tuple[np.ndarray, np.ndarray]],
                      use_decoder: bool = True, max_batch: int = 64) -> list[np.ndarray]:
    """Many (codes, hidden) utterances, each decoded as `decode_utterance` decodes it alone.

    Utterances of equal length share batched calls of up to `max_batch` rows (rows are
    independent in these networks, so results match the one-by-one decode up to the kernels'
    rounding): a batch of 512 offline requests is a few dozen launch sequences instead of 512.
    Lengths are not padded to share a batch, since a row's right edge would then see padding
    instead of its own ending."""
    out: list[np.ndarray] = [np.zeros(0, np.float32)] * len(frames)
    by_length: dict[int, list[int]] = {}
    for i, (codes, _) in enumerate(frames):
        if len(codes):
            by_length.setdefault(len(codes), []).append(i)
    chunks = [rows[k:k + max_batch] for rows in by_length.values() for k in range(0, len(rows), max_batch)]
    if next(models.vocos.parameters()).is_cuda:
        _decode_chunks_pipelined(models, frames, chunks, use_decoder, out)
        return out
    for chunk in chunks:
        x = torch.stack([frames_input(*frames[i], use_decoder) for i in chunk])
        for i, wav in zip(chunk, _decode_rows(models, x, use_decoder)):
            out[i] = wav
    return out


def _decode_chunks_pipelined(models: AudioModels, frames: list[tuple[np.ndarray, np.ndarray]],
                             chunks: list[list[int]], use_decoder: bool, out: list) -> None:
    """`decode_utterances` on a GPU: each chunk stacked into a pinned buffer, copied in and its
    audio copied back asynchronously, two buffers each way, so the host copies chunk n-1's audio
    into the result arrays while the GPU decodes chunk n (serving/staging.py says why)."""
    stage = thread_staging()
    pending: tuple[list[int], torch.Tensor, torch.cuda.Event] | None = None
    for n, chunk in enumerate(chunks):
        slot = n % 2
        xs = [frames_input(*frames[i], use_decoder) for i in chunk]
        # Slot `slot` was last used by chunk n-2, whose copies ended before chunk n-1's audio
        # was waited for below: both of its buffers are free.
        x_host = stage.buffer(f"in{slot}", (len(xs), *xs[0].shape), xs[0].dtype)
        torch.stack(xs, out=x_host)
        wav = _decode_on_device(models, x_host, use_decoder, non_blocking=True)
        wav_host = stage.buffer(f"out{slot}", tuple(wav.shape), torch.float32)
        wav_host.copy_(wav, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        if pending is not None:
            _collect(*pending, out)
        pending = (chunk, wav_host, done)
    if pending is not None:
        _collect(*pending, out)


def _collect(chunk: list[int], wav_host: torch.Tensor, done: torch.cuda.Event, out: list) -> None:
    done.synchronize()
    rows = wav_host.numpy().copy()                # the pinned buffer is reused two chunks later
    for j, i in enumerate(chunk):
        out[i] = rows[j]


def stream_decoder(models: AudioModels, use_decoder: bool = True) -> StreamingDecoder:
    return StreamingDecoder(mel_model(models, use_decoder), models.vocos)


def first_output_frames(models: AudioModels, use_decoder: bool = True) -> int:
    """GPT frames a stream needs before its first final sample: the decoders' right context.

    Decoder (75 mel frames) + Vocos (27) of lookahead, plus the 3 spectral frames the first ISTFT
    samples overlap, at 2 mel frames per GPT frame: 53 frames (1.13 s of audio) for the official
    models. A push of fewer frames yields no samples yet.
    """
    voc = models.vocos
    istft = voc.head.istft.window.shape[0] // (2 * voc.hop_length) + 1
    return math.ceil((mel_model(models, use_decoder).context + voc.context + istft) / 2)


@torch.inference_mode()
def warm_up_audio(models: AudioModels, first_push: int, block: int, early: tuple[int, ...] = (),
                  use_decoder: bool = True, batches: tuple[int, ...] = (1,), repeat: int = 1) -> None:
    """Decode silence in every shape one stream asks for: a whole utterance of each `early`
    length (the low-latency first chunk), then a stream's first push, one block and the flush.
    On the GPU the first call of each shape JIT-compiles (and autotunes) Triton kernels for
    seconds; a server does that at start-up, not inside its first requests' time to first audio.

    `batches`: also as lockstep batches of these sizes (the coalescer's padded batches of that many
    streams; their network inputs made contiguous, as the coalescer's concatenation makes them, so
    that a CUDA graph captured here has the key a served batch looks up); `repeat`: each that many
    times (audio CUDA graphs capture on a shape's second call)."""
    width = models.decoder.frame_dim if use_decoder else 4

    def silence(n: int, b: int) -> torch.Tensor:
        """n silent frames: (n, D) for one stream, (b, n, D) for a lockstep batch."""
        x = frames_input(np.zeros((n, 4), np.int64), np.zeros((n, width), np.float32), use_decoder)
        return x if b == 1 else x.expand(b, *x.shape).contiguous()

    for b in batches:
        nets = models if b == 1 else coalesced_models(models, _ContiguousCalls())
        for _ in range(repeat):
            for n in early:
                x = silence(n, b)
                _decode_rows(nets, x[None] if b == 1 else x, use_decoder)
            dec = stream_decoder(nets, use_decoder)
            for n in (first_push, block):
                dec.push(silence(n, b))
            dec.flush()


class _ContiguousCalls:
    """Stands in for a Coalescer in `coalesced_models`: each network call runs at once, on its
    input made contiguous, as a coalesced batch's concatenation makes it."""

    @staticmethod
    def wrap(fn):
        return lambda x, *static: fn(x.contiguous(), *static)
