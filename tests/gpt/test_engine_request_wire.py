"""The wire form of a code request's ChatTTS arguments (`SamplingParams.extra_args`): the speaker
travels as float32 bytes through vLLM's own serialiser, unchanged, and a malformed one is refused
before it reaches an engine step."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder
from vllm import SamplingParams

from chattts_vllm.gpt.requests import code_request
from chattts_vllm.params import EngineRequest, InferCodeParams
from chattts_vllm.text.prompt import ChatTTSTokenizer
from chattts_vllm.text.speaker import normalize_speaker


def _fields(**over):
    return dict(dict(mode="code", seed=1, temperature=[0.3] * 4, top_p=0.7, top_k=20,
                     repetition_penalty=1.05, min_new_token=0, text_len=3, spk_position=1), **over)


def test_the_speaker_crosses_vllms_serialiser_unchanged():
    spk = torch.randn(768, generator=torch.Generator().manual_seed(0)).half()
    ep = code_request(ChatTTSTokenizer.from_dir(), "hello world", InferCodeParams(),
                      speaker=spk)
    wire = MsgpackDecoder(SamplingParams).decode(MsgpackEncoder().encode(ep.sampling_params))
    req = EngineRequest.from_extra_args(wire.extra_args)
    assert isinstance(req.speaker, bytes) and len(req.speaker) == 768 * 4
    np.testing.assert_array_equal(req.speaker_vector(), normalize_speaker(spk).numpy())
    # vLLM deep-copies the parameters per request; the bytes copy as one object.
    assert EngineRequest.from_extra_args(ep.sampling_params.clone().extra_args).speaker == req.speaker


def test_a_list_of_floats_is_still_accepted():
    vec = np.linspace(-1, 1, 768, dtype=np.float32)
    req = EngineRequest(**_fields(speaker=vec.tolist()))
    np.testing.assert_array_equal(req.speaker_vector(), vec)
    assert EngineRequest(**_fields()).speaker_vector() is None


@pytest.mark.parametrize("speaker", [b"\0" * 10, b"\0" * (767 * 4), [0.5] * 100])
def test_a_speaker_of_the_wrong_size_is_refused(speaker):
    with pytest.raises(ValueError, match="768"):
        EngineRequest.from_extra_args(EngineRequest(**_fields()).to_extra_args() | {
            "chattts": _fields(speaker=speaker)})
