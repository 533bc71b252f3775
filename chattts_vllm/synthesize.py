"""Offline synthesis: texts -> (refine pass) -> code pass on vLLM -> frames -> audio.

`ChatTTS` wraps one `vllm.LLM` built on a converted checkpoint directory. Each text is its own
request with its own parameters and seed, so the batch is as large as the list you pass.
`synthesize` adds the text front end and the audio back end (serving/pipeline.py, shared with the
speech endpoint): each text is normalised and split into sentences, every sentence of every text
goes into one engine batch, and each text's sentences are decoded and concatenated.
"""
from __future__ import annotations

import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from chattts_vllm.gpt.requests import (CodeResult, code_request, collect_code_result,
                                       refine_request, refine_result_ids)
from chattts_vllm.runners.outputs import FrameReader
from chattts_vllm.params import InferCodeParams, RefineTextParams
from chattts_vllm.serving.overlap import FrameWatcher, OverlappedDecode
from chattts_vllm.serving.pipeline import SpeechPlan, decode_utterances
from chattts_vllm.serving.pipeline import split_text as _split
from chattts_vllm.text.prompt import ChatTTSTokenizer, refine_ids_to_text
from chattts_vllm.text.speaker import SpeakerStats, resolve_voice

DEFAULT_ENGINE_ARGS = dict(skip_tokenizer_init=True, enable_prefix_caching=False)


def _per_text(value, n: int, cls):
    if value is None:
        return [cls() for _ in range(n)]
    if isinstance(value, cls):
        return [value] * n
    if len(value) != n:
        raise ValueError(f"got {len(value)} parameter sets for {n} texts")
    return list(value)


class ChatTTS:
    """The ChatTTS GPT on a vLLM engine. Build it under `if __name__ == "__main__":` on CPU."""

    def __init__(self, model_dir: str | os.PathLike, **engine_args):
        from vllm import LLM

        self.model_dir = Path(model_dir)
        self.tokenizer = ChatTTSTokenizer.from_dir(self.model_dir)
        try:
            self.speaker_stats: SpeakerStats | None = SpeakerStats.load(self.model_dir / "chattts")
        except FileNotFoundError:
            self.speaker_stats = None
        self._normalizer = None
        self._audio = None
        args = {**DEFAULT_ENGINE_ARGS, **engine_args}
        self.llm = LLM(model=str(self.model_dir), **args)
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len
        # Seconds of the last `infer_code` by phase (requests built, engine, frames read back):
        # the throughput benchmark records them, since a slow batch is slow in one of the three.
        self.last_timing: dict[str, float] = {}

    def close(self) -> None:
        """Stop the engine core. Where it runs in its own process (vLLM's default), a caller that
        leaves through `os._exit` would otherwise leave that process behind, holding its GPU memory."""
        self.llm.llm_engine.engine_core.shutdown()

    def voice(self, voice):
        """A named voice, `seed:N`, a speaker string or `{"id": ...}` -> raw speaker vector."""
        return resolve_voice(voice, self.speaker_stats)

    def refine_text(self, texts: Sequence[str],
                    params: RefineTextParams | Sequence[RefineTextParams] | None = None,
                    *, return_ids: bool = False) -> list[str] | list[list[int]]:
        ps = _per_text(params, len(texts), RefineTextParams)
        reqs = [refine_request(self.tokenizer, t, p, max_model_len=self.max_model_len)
                for t, p in zip(texts, ps)]
        outs = self.llm.generate([r.prompt for r in reqs], [r.sampling_params for r in reqs],
                                 use_tqdm=False)
        ids = [refine_result_ids(o.outputs[0].token_ids) for o in outs]
        if return_ids:
            return ids
        return [refine_ids_to_text(self.tokenizer, i) for i in ids]

    def infer_code(self, texts: Sequence[str],
                   params: InferCodeParams | Sequence[InferCodeParams] | None = None,
                   *, voices: Sequence | None = None, use_tqdm: bool = True,
                   watcher: FrameWatcher | None = None, mapped: bool = False) -> list[CodeResult]:
        """Codes and hidden states per text. `voices` (one per text) override `params.spk_emb`.

        `mapped`: the hidden states are views of the mapped frame files instead of copies (about
        2.5x faster to collect on the CPU box), for a caller that decodes and drops them at once;
        meanwhile they hold their space in the frame directory (tmpfs).

        `watcher.start(keys)` gets the requests' frame-file keys before the engine runs them and
        `watcher.stop()` comes once it is done, before the files go (serving/overlap.py)."""
        t0 = time.perf_counter()
        ps = _per_text(params, len(texts), InferCodeParams)
        speakers = [self.voice(v) for v in voices] if voices is not None else [None] * len(texts)
        if len(speakers) != len(texts):
            raise ValueError(f"got {len(speakers)} voices for {len(texts)} texts")
        reqs = [code_request(self.tokenizer, t, p, speaker=s, max_model_len=self.max_model_len)
                for t, p, s in zip(texts, ps, speakers)]
        t1 = time.perf_counter()
        try:
            if watcher is not None:
                watcher.start([r.sink for r in reqs])
            try:
                outs = self.llm.generate([r.prompt for r in reqs], [r.sampling_params for r in reqs],
                                         use_tqdm=use_tqdm)
            finally:
                if watcher is not None:
                    watcher.stop()
            t2 = time.perf_counter()
            # Reading back is syscalls and large copies that release the GIL, so a few threads
            # share a big batch (512 x 10 s is ~740 MB of records) instead of one reading it all.
            with ThreadPoolExecutor(max_workers=min(8, max(1, len(reqs) // 16))) as pool:
                results = list(pool.map(lambda r, o: collect_code_result(
                    r.sink, o.outputs[0].token_ids, mapped=mapped), reqs, outs))
            self.last_timing = {"requests_s": t1 - t0, "generate_s": t2 - t1,
                                "collect_s": time.perf_counter() - t2}
            return results
        finally:
            for r in reqs:  # no-op for collected results; removes files of failed ones
                FrameReader(r.sink).close()

    # -- text in, audio out -------------------------------------------------------------------
    @property
    def normalizer(self):
        if self._normalizer is None:
            from chattts_vllm.text.normalize import Normalizer

            self._normalizer = Normalizer()
        return self._normalizer

    def audio_models(self, device: str | None = None, dtype=None):
        """Decoder, DVAE and Vocos of this checkpoint, loaded on first use (GPU if available)."""
        if self._audio is None:
            import torch

            from chattts_vllm.audio.checkpoint import load_audio_models

            device = device or ("cuda" if torch.cuda.is_available() else "cpu")
            self._audio = load_audio_models(self.model_dir, device, dtype or torch.float32)
        return self._audio

    def synthesize(self, texts: str | Sequence[str],
                   params: InferCodeParams | Sequence[InferCodeParams] | None = None,
                   voices: Sequence | None = None, *, use_decoder: bool = True,
                   skip_refine_text: bool = True, refine_params: RefineTextParams | None = None,
                   split_text: bool = True, normalize: bool = True,
                   use_tqdm: bool = False, overlap_decode: bool = False) -> list[np.ndarray]:
        """Texts -> one 24 kHz float32 waveform each.

        Every sentence of a text uses that text's voice (`voices[i]`, else `params.spk_emb`, else
        none) and seed `manual_seed + k` for its k-th sentence. `use_decoder=False` decodes the
        codes with the DVAE instead of the hidden states with the Decoder. `overlap_decode`
        decodes while the GPT generates (serving/overlap.py; the audio is the same up to the
        kernels' rounding). Off by default: with the engine core in this process it slowed an
        H200's GPT more than it saved (2026-11-29, batch 512: 885 -> 662 audio-s/s end to end).
        """
        texts = [texts] if isinstance(texts, str) else list(texts)
        ps = _per_text(params, len(texts), InferCodeParams)
        vs = list(voices) if voices is not None else [None] * len(texts)
        if len(vs) != len(texts):
            raise ValueError(f"got {len(vs)} voices for {len(texts)} texts")
        plans = []
        for text, p, v in zip(texts, ps, vs):
            sentences = _split(self.normalizer, text, split=split_text, normalize=normalize)
            refine = None if skip_refine_text else (refine_params or RefineTextParams())
            plans.append(SpeechPlan.build(sentences, p, self.voice(v) if v is not None else None, refine))
        flat = [(s, p, plan.speaker, r) for plan in plans for s, p, r in
                zip(plan.sentences, plan.params, plan.refine or [None] * len(plan.sentences))]
        sentences = [f[0] for f in flat]
        if not skip_refine_text:
            sentences = self.refine_text(sentences, [f[3] for f in flat])
        models = self.audio_models()
        watcher = OverlappedDecode(models, use_decoder) if overlap_decode else None
        # Decoded right below and dropped: the frames need not be copied out of their files.
        results = self.infer_code(sentences, [f[1] for f in flat], voices=[f[2] for f in flat],
                                  use_tqdm=use_tqdm, watcher=watcher, mapped=True)
        if watcher is not None:
            wavs = watcher.finish(results)
        else:
            wavs = decode_utterances(models, [(r.codes, r.hidden) for r in results], use_decoder)
        out, k = [], 0
        for plan in plans:
            n = len(plan.sentences)
            out.append(np.concatenate(wavs[k:k + n]))
            k += n
        return out
