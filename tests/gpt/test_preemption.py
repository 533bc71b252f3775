"""A KV cache too small for 16 requests forces preemption; outputs must not change."""
from __future__ import annotations

import numpy as np
import pytest

from chattts_vllm.params import InferCodeParams
from tests.conftest import ENGINE_ARGS

pytestmark = pytest.mark.slow


def _preemptions(llm) -> float:
    return sum(getattr(m, "value", 0) for m in llm.get_metrics() if "preemption" in m.name)


@pytest.mark.xfail(strict=False, reason=(
    "known open bug (issue 2 note): in the full suite, after tests/gpt/test_engine_requests.py, "
    "request 11 of the small-KV engine differs from frame 1 (partial codebook agreement, as if "
    "its sampler state or noise key were another request's); passes when run alone or after the "
    "parity tests only. Kept running so the fix shows up as XPASS."))
def test_preempted_requests_match_unconstrained_run(engine, model_dir):
    from chattts_vllm.synthesize import ChatTTS

    texts = [f"utterance number {i} for the preemption test" for i in range(16)]
    params = [InferCodeParams(manual_seed=100 + i, min_new_token=140, max_new_token=150,
                              temperature=0.5) for i in range(16)]
    voices = ["alloy" if i % 2 else None for i in range(16)]
    ref = engine.infer_code(texts, params, voices=voices, use_tqdm=False)

    # 12 blocks of 128 tokens: room for ~9 of the 16 requests at full length.
    small = ChatTTS(model_dir, **{**ENGINE_ARGS, "num_gpu_blocks_override": 12, "max_num_seqs": 16,
                                 "disable_log_stats": False})
    try:
        got = small.infer_code(texts, params, voices=voices, use_tqdm=False)
        assert _preemptions(small.llm) > 0, "the small cache did not force a preemption"
    finally:
        del small
    for i in range(16):
        assert got[i].num_frames == ref[i].num_frames
        np.testing.assert_array_equal(got[i].codes, ref[i].codes, err_msg=f"request {i}")
        np.testing.assert_allclose(got[i].hidden, ref[i].hidden, rtol=1e-4, atol=1e-4)
