"""Offline synthesis: texts -> (refine pass) -> code pass on vLLM -> frames (-> audio).

`ChatTTS` wraps one `vllm.LLM` built on a converted checkpoint directory. Each text is its own
request with its own parameters and seed, so the batch is as large as the list you pass.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from chattts_vllm.gpt.requests import (CodeResult, code_request, collect_code_result,
                                       refine_request, refine_result_ids)
from chattts_vllm.runners.outputs import FrameReader
from chattts_vllm.params import InferCodeParams, RefineTextParams
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
        args = {**DEFAULT_ENGINE_ARGS, **engine_args}
        self.llm = LLM(model=str(self.model_dir), **args)
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len

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
                   *, voices: Sequence | None = None, use_tqdm: bool = True) -> list[CodeResult]:
        """Codes and hidden states per text. `voices` (one per text) override `params.spk_emb`."""
        ps = _per_text(params, len(texts), InferCodeParams)
        speakers = [self.voice(v) for v in voices] if voices is not None else [None] * len(texts)
        if len(speakers) != len(texts):
            raise ValueError(f"got {len(speakers)} voices for {len(texts)} texts")
        reqs = [code_request(self.tokenizer, t, p, speaker=s, max_model_len=self.max_model_len)
                for t, p, s in zip(texts, ps, speakers)]
        try:
            outs = self.llm.generate([r.prompt for r in reqs], [r.sampling_params for r in reqs],
                                     use_tqdm=use_tqdm)
            return [collect_code_result(r.sink, o.outputs[0].token_ids) for r, o in zip(reqs, outs)]
        finally:
            for r in reqs:  # no-op for collected results; removes files of failed ones
                FrameReader(r.sink).close()
