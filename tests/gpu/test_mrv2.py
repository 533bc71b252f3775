"""The GPU fast path: model runner V2 serves the model, with codes equal to the CPU PyTorch path,
and seeded sampling that does not depend on the batch a request runs in.

fp32 on the GPU is not IEEE fp32 everywhere by default. vLLM 0.26 picks TRITON_ATTN for float32 on
Hopper (FLASH_ATTN and FLASHINFER take fp16/bf16 only; platforms/cuda.py priorities, each backend's
`supported_dtypes`), and its kernel (`v1/attention/ops/triton_unified_attention.py`) calls `tl.dot`
without `input_precision`, which Triton 3.6 resolves to TF32 on NVIDIA (`language/core.py`:
`knobs.language.fp32_default or "tf32"`): inputs rounded to a 10-bit mantissa, about 1e-3 relative
error in the hidden states, enough to flip near-ties of the CPU reference. `TRITON_F32_DEFAULT=ieee`
switches every such `tl.dot` to IEEE fp32 (it is one of Triton's cache-invalidating variables, so a
TF32 build in the cache is not reused). cuBLAS is already exact: vLLM's worker sets
`torch.set_float32_matmul_precision(VLLM_FLOAT32_MATMUL_PRECISION)`, "highest" by default, and
inductor's matmul templates follow that flag. The variable is set before any engine starts here and
is inherited by an engine-core process. `CHATTTS_TEST_TF32=1` leaves it unset, to see the TF32 error;
`CHATTTS_TEST_EAGER=1` runs the parity engine without torch.compile and CUDA graphs.
"""
from __future__ import annotations

import gc
import os

import numpy as np
import pytest

if os.environ.get("CHATTTS_TEST_TF32") != "1":
    os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")     # the spawned core hangs on the GPU box

from chattts_vllm.params import InferCodeParams  # noqa: E402
from tests.gpu.reference import REFERENCE, TEXTS, VOICES, build_model, params  # noqa: E402

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def gpu_model(tmp_path_factory):
    return build_model(tmp_path_factory.mktemp("mrv2"))


def _runner_info(worker) -> tuple[str, str, list[str]]:
    runner = worker.model_runner
    backends = set()
    for groups in getattr(runner, "attn_groups", None) or []:
        for g in groups:
            backends.add(g.backend.get_name())
    return type(runner).__module__, type(getattr(runner, "model_state", None)).__name__, sorted(backends)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def test_mrv2_codes_match_cpu_reference(gpu_model):
    from chattts_vllm.synthesize import ChatTTS

    eager = os.environ.get("CHATTTS_TEST_EAGER") == "1"       # rules torch.compile/graphs in or out
    tts = ChatTTS(gpu_model, dtype="float32", max_model_len=512, gpu_memory_utilization=0.3,
                  enforce_eager=eager)
    module, state, backends = tts.llm.llm_engine.collective_rpc(_runner_info)[0]
    print(f"MRV2 runner {module} {state}, attention {backends}, "
          f"TRITON_F32_DEFAULT={os.environ.get('TRITON_F32_DEFAULT')}, eager={eager}")
    assert module == "vllm.v1.worker.gpu.model_runner" and state == "ChatTTSModelState", (module, state)
    ref = np.load(REFERENCE)
    got = tts.infer_code(TEXTS, params(), voices=VOICES)
    report = []
    for i, r in enumerate(got):
        want = ref[f"codes_{i}"]
        n = min(len(want), r.num_frames)
        diff = np.nonzero((r.codes[:n] != want[:n]).any(1))[0]
        h = ref[f"hidden_{i}"]
        report.append((i, r.num_frames, len(want), diff[:3].tolist(), _rel(r.hidden[:len(h)], h)))
    del tts
    gc.collect()
    print("MRV2 PARITY (prompt, frames, reference frames, first differing frames, hidden rel err)", report)
    print(f"MRV2 PARITY max hidden rel err {max(x[4] for x in report):.2e}, "
          f"{sum(1 for x in report if x[3] or x[1] != x[2])} of {len(report)} prompts differ")
    for i, n_got, n_want, diff, rel in report:
        assert n_got == n_want and not diff and rel < 1e-3, report


def test_mrv2_seeded_solo_equals_batch_of_256(gpu_model):
    """Each probe request alone, then among 256 other requests of different lengths, voices and
    seeds (finishing at different steps, so the batch reshuffles under it): all frames identical."""
    from chattts_vllm.synthesize import ChatTTS

    tts = ChatTTS(gpu_model, dtype="float32", max_model_len=512, gpu_memory_utilization=0.3,
                  max_num_seqs=288)
    sampling = dict(temperature=0.3, top_P=0.7, top_K=20, repetition_penalty=1.05)
    others = [(f"another request, number {i}, with its own words", ["alloy", None, f"seed:{i}"][i % 3],
               InferCodeParams(manual_seed=10_000 + i, min_new_token=20 + i % 60, max_new_token=20 + i % 60,
                               **sampling)) for i in range(256)]
    probes = [(TEXTS[j], VOICES[j], InferCodeParams(manual_seed=77 + j, min_new_token=100, max_new_token=100,
                                                    **{**sampling, **({"temperature": [0.3, 0.5, 0.7, 0.9]}
                                                                      if j % 2 else {})}))
              for j in range(len(TEXTS))]
    batch = list(others)
    where = [int(k * 256 / len(probes)) + k for k in range(len(probes))]   # spread over the batch
    for pos, pr in zip(where, probes):
        batch.insert(pos, pr)
    res = tts.infer_code([b[0] for b in batch], [b[2] for b in batch], voices=[b[1] for b in batch],
                         use_tqdm=False)
    report = []
    for j, (pos, pr) in enumerate(zip(where, probes)):
        solo = tts.infer_code([pr[0]], [pr[2]], voices=[pr[1]], use_tqdm=False)[0]
        inb = res[pos]
        n = min(solo.num_frames, inb.num_frames)
        diff = np.nonzero((solo.codes[:n] != inb.codes[:n]).any(1))[0]
        report.append((j, solo.num_frames, inb.num_frames, diff[:3].tolist(),
                       _rel(inb.hidden[:n], solo.hidden[:n])))
    del tts
    gc.collect()
    print("SOLO vs BATCH (probe, solo frames, batch frames, first differing frames, hidden rel diff)", report)
    for j, n_solo, n_batch, diff, _ in report:
        assert n_solo == n_batch == 100 and not diff, report
