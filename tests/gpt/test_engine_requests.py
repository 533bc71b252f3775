"""Engine behaviour of the plugin on CPU: batch isolation, prefix caching, bad input."""
from __future__ import annotations

import random

import numpy as np
import pytest

from chattts_vllm.params import InferCodeParams
from chattts_vllm.text.prompt import EmptyTextError, TextTooLongError
from chattts_vllm.text.speaker import InvalidSpeakerError, UnknownVoiceError

pytestmark = pytest.mark.slow

WORDS = "hello world speech model test voice sound 你 好 世 界 今 天 [uv_break] [laugh]".split()


def _request(i: int):
    rng = random.Random(i)
    text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 9)))
    temperature = ([round(rng.uniform(0.1, 1.0), 3) for _ in range(4)] if i % 3 == 0
                   else round(rng.uniform(0.1, 1.0), 3))
    params = InferCodeParams(
        temperature=temperature, top_P=rng.choice([0.5, 0.7, 0.9, 1.0]),
        top_K=rng.choice([1, 5, 20, 100]), repetition_penalty=rng.choice([1.0, 1.05, 1.3]),
        min_new_token=rng.randint(0, 12), max_new_token=rng.randint(12, 30),
        manual_seed=rng.randrange(2**40), prompt=rng.choice(["[speed_5]", "[speed_2]"]))
    voice = rng.choice([None, "alloy", "nova", f"seed:{i}"])
    return text, params, voice


def test_32_concurrent_requests_equal_their_solo_runs(engine):
    reqs = [_request(i) for i in range(32)]
    batch = engine.infer_code([r[0] for r in reqs], [r[1] for r in reqs],
                              voices=[r[2] for r in reqs], use_tqdm=False)
    for i, (text, params, voice) in enumerate(reqs):
        solo = engine.infer_code([text], [params], voices=[voice], use_tqdm=False)[0]
        assert solo.num_frames == batch[i].num_frames, i
        np.testing.assert_array_equal(solo.codes, batch[i].codes, err_msg=f"request {i}")
        np.testing.assert_allclose(solo.hidden, batch[i].hidden, rtol=1e-4, atol=1e-4)
    # Different seeds and parameters really give different outputs.
    assert len({r.codes.tobytes() for r in batch}) == 32


def test_prefix_caching_is_off_and_voices_differ(engine):
    assert engine.llm.llm_engine.vllm_config.cache_config.enable_prefix_caching is False
    p = InferCodeParams(manual_seed=5, min_new_token=8, max_new_token=8)
    a, b, a2 = engine.infer_code(["same text here"] * 3, [p] * 3, voices=["alloy", "echo", "alloy"],
                                 use_tqdm=False)
    # The last call's time by phase (the throughput benchmark's breakdown of a slow batch).
    assert set(engine.last_timing) == {"requests_s", "generate_s", "collect_s"}
    assert all(v >= 0 for v in engine.last_timing.values()) and engine.last_timing["generate_s"] > 0
    assert not np.array_equal(a.hidden, b.hidden)
    np.testing.assert_array_equal(a.codes, a2.codes)
    np.testing.assert_array_equal(a.hidden, a2.hidden)


def test_bad_input_raises_clearly_and_engine_keeps_serving(engine):
    good = InferCodeParams(manual_seed=9, min_new_token=6, max_new_token=6)
    before = engine.infer_code(["still fine"], [good], use_tqdm=False)[0]
    with pytest.raises(EmptyTextError):
        engine.infer_code(["   "], [good])
    with pytest.raises(TextTooLongError):
        engine.infer_code(["很长的文本" * 400], [good])
    with pytest.raises(InvalidSpeakerError):
        engine.infer_code(["hi"], [InferCodeParams(spk_emb="蘁" * 100)])
    with pytest.raises(UnknownVoiceError):
        engine.infer_code(["hi"], [good], voices=["no-such-voice"])
    with pytest.raises(ValueError):
        InferCodeParams(temperature=-1.0)
    # A raw engine request with malformed ChatTTS arguments is refused by the front end.
    from vllm import SamplingParams

    bad = SamplingParams(temperature=0.0, max_tokens=4,
                         extra_args={"chattts": {"mode": "code", "seed": 1, "temperature": [1.0],
                                                 "top_p": 0.7, "top_k": 20, "repetition_penalty": 1.0,
                                                 "min_new_token": 0, "text_len": 3}})
    with pytest.raises(ValueError):
        engine.llm.generate([{"prompt_token_ids": [21131, 21144, 21132]}], [bad], use_tqdm=False)
    short_speaker = SamplingParams(temperature=0.0, max_tokens=4, extra_args={"chattts": {
        **bad.extra_args["chattts"], "temperature": [1.0] * 4, "spk_position": 1, "speaker": [0.1] * 100}})
    with pytest.raises(ValueError, match="768"):
        engine.llm.generate([{"prompt_token_ids": [21131, 21144, 21132]}], [short_speaker], use_tqdm=False)
    after = engine.infer_code(["still fine"], [good], use_tqdm=False)[0]
    np.testing.assert_array_equal(before.codes, after.codes)
