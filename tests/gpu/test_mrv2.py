"""The GPU fast path: model runner V2 serves the model, with codes equal to the CPU PyTorch path."""
from __future__ import annotations

import numpy as np
import pytest

from chattts_vllm.params import InferCodeParams
from tests.gpu.reference import REFERENCE, TEXTS, VOICES, build_model, params

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def gpu_model(tmp_path_factory):
    return build_model(tmp_path_factory.mktemp("mrv2"))


def _runner_info(worker) -> tuple[str, str]:
    runner = worker.model_runner
    return type(runner).__module__, type(getattr(runner, "model_state", None)).__name__


def test_mrv2_codes_match_cpu_reference(gpu_model):
    from chattts_vllm.synthesize import ChatTTS

    tts = ChatTTS(gpu_model, dtype="float32", max_model_len=512, gpu_memory_utilization=0.3)
    module, state = tts.llm.llm_engine.collective_rpc(_runner_info)[0]
    assert module == "vllm.v1.worker.gpu.model_runner" and state == "ChatTTSModelState", (module, state)
    ref = np.load(REFERENCE)
    got = tts.infer_code(TEXTS, params(), voices=VOICES)
    report = []
    for i, r in enumerate(got):
        want = ref[f"codes_{i}"]
        n = min(len(want), r.num_frames)
        diff = np.nonzero((r.codes[:n] != want[:n]).any(1))[0]
        h = ref[f"hidden_{i}"]
        report.append((i, r.num_frames, len(want), diff[:3].tolist(),
                       float(np.abs(r.hidden[:8] - h).max() / np.abs(h).max())))
    print("MRV2 PARITY", report)
    for i, n_got, n_want, diff, rel in report:
        assert n_got == n_want and not diff and rel < 1e-3, report


def test_mrv2_seeded_solo_equals_batch_of_256(gpu_model):
    from chattts_vllm.synthesize import ChatTTS

    tts = ChatTTS(gpu_model, dtype="float32", max_model_len=512, gpu_memory_utilization=0.3,
                  max_num_seqs=256)
    texts = [f"request number {i} says hello" for i in range(256)]
    ps = [InferCodeParams(manual_seed=i, min_new_token=20, max_new_token=40,
                          temperature=[0.3, 0.5, 0.7, 0.9] if i % 2 else 0.3) for i in range(256)]
    voices = [["alloy", None, f"seed:{i}"][i % 3] for i in range(256)]
    batch = tts.infer_code(texts, ps, voices=voices, use_tqdm=False)
    for i in (0, 1, 2, 77, 128, 255):
        solo = tts.infer_code([texts[i]], [ps[i]], voices=[voices[i]], use_tqdm=False)[0]
        np.testing.assert_array_equal(solo.codes, batch[i].codes, err_msg=f"request {i}")
