"""Shared by the runner tests: every test writes side-channel files to its own temporary folder."""
from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(autouse=True)
def _frame_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("CHATTTS_VLLM_FRAME_DIR", str(tmp_path / "frames"))


def random_frames(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n frames: codes (n, 4) int32 in the audio vocabulary, hidden states (n, 768) float32."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 625, (n, 4)).astype(np.int32), rng.standard_normal((n, 768)).astype(np.float32)
