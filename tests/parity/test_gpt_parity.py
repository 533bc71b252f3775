"""The vLLM plugin against upstream ChatTTS 0.2.5 on the same random full-size weights (CPU, fp32)."""
from __future__ import annotations

import numpy as np
import pytest

from chattts_vllm.params import InferCodeParams, RefineTextParams
from chattts_vllm.text.speaker import encode_speaker, random_speaker
from tests.parity.upstream import load_upstream_chat, upstream_code_pass, upstream_refine_ids

pytestmark = pytest.mark.slow

TEXTS = [
    "你好，欢迎使用语音合成。",
    "Hello world, this is a test of speech synthesis.",
    "What is [uv_break]your favorite english food?[laugh][lbreak]",
    "今天天气很好[uv_break]我们去公园散步吧[laugh]",
    "Mixed 中文 and English [lbreak] together",
    "[oral_2]short one",
    "The quick brown fox jumps over the lazy dog.",
    "人工智能正在改变世界",
]
# Speaker seeds; None = no speaker ([empty_spk]).
SPEAKERS = [11, None, 23, None, 37, 41, None, 53]


@pytest.fixture(scope="module")
def upstream(asset_dir):
    return load_upstream_chat(asset_dir)


def _params(i: int, spk: str | None, ours: bool):
    import ChatTTS

    kw = dict(temperature=1e-4, repetition_penalty=1.05, top_P=0.7, top_K=20,
              min_new_token=100, max_new_token=160, manual_seed=1000 + i, spk_emb=spk)
    return InferCodeParams(**kw) if ours else ChatTTS.Chat.InferCodeParams(**kw, show_tqdm=False)


def test_code_pass_matches_upstream(engine, upstream):
    speakers = [random_speaker(s, engine.speaker_stats) if s is not None else None for s in SPEAKERS]
    strings = [encode_speaker(s) if s is not None else None for s in speakers]
    ours = engine.infer_code(TEXTS, [_params(i, s, True) for i, s in enumerate(strings)])
    eos_steps = []
    for i, text in enumerate(TEXTS):
        ref_codes, ref_hidden = upstream_code_pass(upstream, text, _params(i, strings[i], False))
        got = ours[i]
        assert got.num_frames >= 100
        assert got.num_frames == len(ref_codes), f"prompt {i}: EOS step {got.num_frames} vs {len(ref_codes)}"
        np.testing.assert_array_equal(got.codes, ref_codes, err_msg=f"prompt {i}")
        rel = np.abs(got.hidden - ref_hidden).max() / np.abs(ref_hidden).max()
        assert rel <= 1e-4, f"prompt {i}: hidden rel err {rel}"
        eos_steps.append((got.num_frames, got.eos))
    # The boosted EOS makes some utterances stop on their own, so EOS steps are compared too.
    assert sum(e for _, e in eos_steps) >= 2, eos_steps


def test_refine_pass_matches_upstream(engine, upstream):
    import ChatTTS

    texts = TEXTS[:4]
    kw = dict(temperature=1e-4, top_P=0.7, top_K=20, max_new_token=48, min_new_token=0)
    ours = engine.refine_text(texts, [RefineTextParams(**kw, manual_seed=7 + i) for i in range(4)],
                              return_ids=True)
    for i, text in enumerate(texts):
        ref = upstream_refine_ids(upstream, text, ChatTTS.Chat.RefineTextParams(
            **kw, manual_seed=7 + i, show_tqdm=False))
        assert ours[i] == ref, (i, ours[i], ref)
