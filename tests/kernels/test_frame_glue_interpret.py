"""MRv2 glue kernels vs their PyTorch twins in the Triton interpreter (CPU CI): small shapes, fp32.

TRITON_INTERPRET must be set before triton is imported, so the cases run in a child process
(frame_glue_cases.py) and report their errors as JSON. (The interpreter rounds fp32 -> bf16 by
truncation, unlike the GPU, so bf16 is checked only by test_frame_glue_gpu.py.)
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TOL = 1e-6          # fp32, max|kernel − twin| / max|twin|


@pytest.fixture(scope="module")
def results() -> dict[str, float]:
    script = Path(__file__).with_name("frame_glue_cases.py")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                          timeout=300, cwd=Path(__file__).parents[2])
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])   # vLLM may log to stdout before it


def test_token_embeddings_match_twin(results):
    embed = {k: v for k, v in results.items() if k.startswith("embed_")}
    assert len(embed) == 12
    for k, v in embed.items():
        want = 1.0 if k.endswith("_ok") else 0.0
        assert (v <= TOL) if k.endswith("_err") else v == want, (k, v)


def test_commit_and_pack_match_twin(results):
    commit = {k: v for k, v in results.items() if k.startswith("commit_")}
    assert len(commit) == 12
    for k, v in commit.items():
        want = 1.0 if k.endswith("_ok") else 0.0
        assert (v <= TOL) if k.endswith("_err") else v == want, (k, v)
