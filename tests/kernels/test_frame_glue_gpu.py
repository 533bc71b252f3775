"""MRv2 glue kernels vs their PyTorch twins on CUDA at real sizes (run with `pytest -m gpu`).

H = 768, S = 512 slots, max_model_len 2048: a 512-row decode step (one token per slot) and a
300-token prefill (a few requests crossing their speaker position and text/audio boundary).
bf16: <= 1e-2 relative (expected bit-identical: both round every partial sum); fp32: <= 1e-6;
integer outputs identical.
"""
from __future__ import annotations

import pytest
import torch
from frame_glue_cases import commit_case, embed_case

pytestmark = pytest.mark.gpu
DTYPES = {"bf16": (torch.bfloat16, 1e-2), "fp32": (torch.float32, 1e-6)}
S, L, H, V = 512, 2048, 768, 21178


def _decode(seed: int) -> tuple[list[int], list[int]]:
    g = torch.Generator().manual_seed(seed)
    slots = torch.randperm(S, generator=g)
    pos = torch.randint(0, L, (S,), generator=g)
    pos[:8] = 2                                  # a few at the speaker position (text_len >= 4)
    return slots.tolist(), pos.tolist()


def _prefill() -> tuple[list[int], list[int]]:
    """Three requests' chunks, 100 tokens each, from position 0, 50 and 2000 (past the trash)."""
    slots, pos = [], []
    for slot, start in ((7, 0), (300, 50), (511, 2000)):
        slots += [slot] * 100
        pos += list(range(start, start + 100))
    return slots, pos


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("case", ["decode", "prefill"])
def test_token_embeddings(dt, case):
    dtype, tol = DTYPES[dt]
    slots, pos = _decode(1) if case == "decode" else _prefill()
    r = embed_case(S, L, H, V, slots, pos, "cuda", dtype, text_len=16)
    print(f"embed {case} {dt}: {r}")
    assert r["err"] <= tol and r["bad"] == 0 and r["dtype_ok"] == 1


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("B", [8, 37, 512])
def test_commit_and_pack(dt, B):
    dtype, _ = DTYPES[dt]
    r = commit_case(S, L, H, B, "cuda", dtype)
    print(f"commit B={B} {dt}: {r}")
    assert r["ids_bad"] == r["rec_bad"] == r["codes_bad"] == r["untouched_bad"] == 0
    assert r["ids_dtype_ok"] == 1 and r["hidden_err"] == 0
