"""A KV cache too small for 16 requests forces preemption; outputs must not change.

The small engine runs in-process with requests arriving over the first steps (a fixed schedule),
so the run is deterministic and exercises what a server sees: chunked prefills, requests left
unscheduled for a step, preempted and resumed, and rows vacated by vLLM's batch condensing. The
frame-history check (CHATTTS_VLLM_CHECK_ROWS) fails the step itself if any request's history ever
disagrees with the engine's tokens.
"""
from __future__ import annotations

import random

import numpy as np
import pytest

from chattts_vllm.params import InferCodeParams
from tests.conftest import ENGINE_ARGS

pytestmark = pytest.mark.slow


def _preemptions(llm) -> float:
    return sum(getattr(m, "value", 0) for m in llm.get_metrics() if "preemption" in m.name)


def _staggered(tts, reqs, schedule: dict[int, int]) -> dict[int, list[int]]:
    """Adds request i before step schedule[i]; returns each request's engine token ids."""
    engine, pending, outs, step = tts.llm.llm_engine, dict(schedule), {}, 0
    while len(outs) < len(reqs):
        for i in [i for i, s in pending.items() if s <= step]:
            engine.add_request(f"pre-{i}", reqs[i].prompt, reqs[i].sampling_params)
            del pending[i]
        for o in engine.step():
            if o.finished:
                outs[int(o.request_id.split("-")[1])] = list(o.outputs[0].token_ids)
        step += 1
    return outs


def _retired_by_move(worker) -> int:
    procs = worker.model_runner.input_batch.logitsprocs.all
    return sum(getattr(getattr(p, "state", None), "retired_by_move", 0) for p in procs)


def test_preempted_requests_match_unconstrained_run(engine, model_dir, monkeypatch):
    from chattts_vllm.gpt.requests import code_request, collect_code_result
    from chattts_vllm.synthesize import ChatTTS

    texts = [f"utterance number {i} for the preemption test" for i in range(16)]
    params = [InferCodeParams(manual_seed=100 + i, min_new_token=140, max_new_token=150,
                              temperature=0.5) for i in range(16)]
    voices = ["alloy" if i % 2 else None for i in range(16)]
    ref = engine.infer_code(texts, params, voices=voices, use_tqdm=False)

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    monkeypatch.setenv("CHATTTS_VLLM_CHECK_ROWS", "1")
    # 12 blocks of 128 tokens: room for ~9 of the 16 requests at full length.
    small = ChatTTS(model_dir, **{**ENGINE_ARGS, "num_gpu_blocks_override": 12, "max_num_seqs": 16,
                                 "disable_log_stats": False})
    try:
        reqs = [code_request(small.tokenizer, t, p, speaker=small.voice(v),
                             max_model_len=small.max_model_len)
                for t, p, v in zip(texts, params, voices)]
        rng = random.Random(0)
        schedule = {i: (0 if i < 6 else rng.randint(1, 200)) for i in range(16)}
        outs = _staggered(small, reqs, schedule)
        got = [collect_code_result(r.sink, outs[i]) for i, r in enumerate(reqs)]
        assert _preemptions(small.llm) > 0, "the small cache did not force a preemption"
        assert sum(small.llm.collective_rpc(_retired_by_move)) > 0, \
            "no row was vacated by a batch condense"
    finally:
        del small
    for i in range(16):
        assert got[i].num_frames == ref[i].num_frames
        np.testing.assert_array_equal(got[i].codes, ref[i].codes, err_msg=f"request {i}")
        np.testing.assert_allclose(got[i].hidden, ref[i].hidden, rtol=1e-4, atol=1e-4)
