"""Triton kernels vs PyTorch twins in the Triton interpreter (CPU CI): small ragged shapes, fp32.

TRITON_INTERPRET must be set before triton is imported, so the cases run in a child process
(kernel_cases.py) and report their relative errors as JSON.
"""
from __future__ import annotations

import pytest
from interpreter import run_cases

TOL = 1e-5          # fp32, max|kernel − twin| / max|twin|


@pytest.fixture(scope="module")
def errors() -> dict[str, float]:
    return run_cases("kernel_cases.py")


def test_every_kernel_matches_its_twin(errors):
    for name, err in sorted(errors.items()):
        print(f"{name:28s} {err:.2e}")
    bad = {k: v for k, v in errors.items() if not v <= TOL}
    assert not bad, bad


def test_both_code_paths_and_mlp_modes_covered(errors):
    names = set(errors)
    assert any(n.endswith("_tma") for n in names) and any(n.endswith("_ptr") for n in names)
    assert {"block_weight_dil2_split", "block_weight_dil2_fused", "gfsq", "model_decoder_wav",
            "model_dvae_wav", "spectrum_tma", "spectrum_ptr", "istft_first1_last1",
            "istft_first0_last0", "linear_gelu_tma_grid"} <= names
