"""ChatTTS requests to vLLM and their results: the glue shared by the offline API and the server.

A code-pass request is a token prompt, `SamplingParams(temperature=0, stop=[625])` (the engine's own
sampler just takes the winner that the ChatTTS sampler marks) and an `EngineRequest` in
`extra_args` with every ChatTTS parameter, the speaker vector and the side-channel key.
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass

import numpy as np
import torch
from vllm import SamplingParams

from chattts_vllm.config import AUDIO_EOS, EBREAK_ID
from chattts_vllm.params import EngineRequest, InferCodeParams, RefineTextParams
from chattts_vllm.runners.outputs import FrameReader, new_key, record_fields
from chattts_vllm.text.prompt import (ChatTTSTokenizer, TextTooLongError, build_code_prompt,
                                      build_refine_prompt)
from chattts_vllm.text.speaker import decode_prompt_codes, decode_speaker, normalize_speaker


@dataclass
class EnginePrompt:
    prompt: dict                 # {"prompt_token_ids": [...]}
    sampling_params: SamplingParams
    sink: str | None             # side-channel key (code pass)


@dataclass
class CodeResult:
    """One utterance from the code pass, EOS frame dropped (as upstream)."""

    codes: np.ndarray            # [T, 4] int32
    hidden: np.ndarray           # [T, 768] float32: the Decoder's input (may be a strided view)
    eos: bool                    # False when max_new_token ended it

    @property
    def num_frames(self) -> int:
        return len(self.codes)


def _seed(manual_seed: int | None) -> int:
    return manual_seed if manual_seed is not None else secrets.randbits(62)


def _max_tokens(prompt_len: int, max_new: int, min_new: int, max_model_len: int) -> int:
    room = max_model_len - prompt_len
    if room < max(1, min_new):
        raise TextTooLongError(
            f"prompt has {prompt_len} tokens; with max_model_len {max_model_len} there is room "
            f"for {max(room, 0)} frames, fewer than the {max(1, min_new)} required")
    return min(max_new, room)


def code_request(tok: ChatTTSTokenizer, text: str, params: InferCodeParams, *,
                 speaker: torch.Tensor | None = None, max_model_len: int = 4096) -> EnginePrompt:
    """`speaker` (raw 768 fp16) overrides `params.spk_emb`; `params.spk_smp` adds an audio prompt."""
    if speaker is None and params.spk_emb is not None:
        speaker = decode_speaker(params.spk_emb)
    prompt_codes = decode_prompt_codes(params.spk_smp) if params.spk_smp is not None else None
    cp = build_code_prompt(tok, text, has_speaker=speaker is not None, txt_smp=params.txt_smp or "",
                           prompt=params.prompt, prompt_codes=prompt_codes)
    sink = new_key()
    req = EngineRequest(
        mode="code", seed=_seed(params.manual_seed), temperature=params.temperatures(),
        top_p=float(params.top_P), top_k=int(params.top_K),
        repetition_penalty=float(params.repetition_penalty), min_new_token=params.min_new_token,
        text_len=cp.text_len, spk_position=cp.spk_position,
        speaker=normalize_speaker(speaker).numpy().astype("<f4").tobytes() if speaker is not None else None,
        prompt_codes=cp.prompt_codes, sink=sink)
    sp = SamplingParams(
        temperature=0.0, stop_token_ids=[AUDIO_EOS], detokenize=False,
        max_tokens=_max_tokens(len(cp.token_ids), params.max_new_token, params.min_new_token, max_model_len),
        extra_args=req.to_extra_args())
    return EnginePrompt({"prompt_token_ids": cp.token_ids}, sp, sink)


def refine_request(tok: ChatTTSTokenizer, text: str, params: RefineTextParams, *,
                   max_model_len: int = 4096) -> EnginePrompt:
    ids = build_refine_prompt(tok, text, params.prompt)
    req = EngineRequest(
        mode="refine", seed=_seed(params.manual_seed), temperature=[float(params.temperature)],
        top_p=float(params.top_P), top_k=int(params.top_K),
        repetition_penalty=float(params.repetition_penalty), min_new_token=params.min_new_token,
        text_len=len(ids))
    sp = SamplingParams(
        temperature=0.0, stop_token_ids=[EBREAK_ID], detokenize=False,
        max_tokens=_max_tokens(len(ids), params.max_new_token, params.min_new_token, max_model_len),
        extra_args=req.to_extra_args())
    return EnginePrompt({"prompt_token_ids": ids}, sp, None)


def num_frames(token_ids) -> int:
    """Frames reported so far: every emitted id but a final EOS."""
    n = len(token_ids)
    return n - 1 if n and token_ids[-1] == AUDIO_EOS else n


def collect_code_result(sink: str, token_ids, *, remove: bool = True,
                        mapped: bool = False) -> CodeResult:
    """The request's frames from its side-channel file (removed after, unless `remove=False`).

    `mapped`: the hidden states stay a (strided) view of the mapped records, with no copy of
    ~1.4 MB per 10 s utterance, for a caller that decodes them at once: until the result is
    dropped the removed file's pages still occupy the frame directory (tmpfs)."""
    reader = FrameReader(sink)
    try:
        n = num_frames(token_ids)
        if mapped:
            codes, hidden = record_fields(reader.map_records(n))
            codes = codes.copy()
        else:
            codes, hidden = reader.read(0, n)
        if n and not np.array_equal(codes[:, 0], np.asarray(token_ids[:n])):
            raise RuntimeError("frame side channel out of step with the engine's token stream")
        return CodeResult(codes, hidden, eos=bool(token_ids) and token_ids[-1] == AUDIO_EOS)
    finally:
        if remove:
            reader.close()


def refine_result_ids(token_ids) -> list[int]:
    ids = list(token_ids)
    return ids[:-1] if ids and ids[-1] == EBREAK_ID else ids
