"""MRv2 glue kernels vs their PyTorch twins in the Triton interpreter (CPU CI): small shapes, fp32.

TRITON_INTERPRET must be set before triton is imported, so the cases run in a child process
(frame_glue_cases.py) and report their errors as JSON. (The interpreter rounds fp32 -> bf16 by
truncation, unlike the GPU, so bf16 is checked only by test_frame_glue_gpu.py.)
"""
from __future__ import annotations

import pytest
from interpreter import run_cases

TOL = 1e-6          # fp32, max|kernel − twin| / max|twin|


@pytest.fixture(scope="module")
def results() -> dict[str, float]:
    return run_cases("frame_glue_cases.py")


@pytest.mark.parametrize("kernel", ["embed", "commit"])
def test_kernel_matches_twin(results, kernel):
    """Token embeddings and the commit + record packing: errors <= TOL, flags (`_ok`) all set."""
    got = {k: v for k, v in results.items() if k.startswith(kernel + "_")}
    assert len(got) == 12
    for k, v in got.items():
        want = 1.0 if k.endswith("_ok") else 0.0
        assert (v <= TOL) if k.endswith("_err") else v == want, (k, v)
