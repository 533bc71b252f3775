"""`chattts-vllm demo` (offline `ChatTTS.synthesize`) end to end, and the same audio as the server
gives for the same text, voice and seed: both run the shared pipeline (split, one voice, seed + k)."""
from __future__ import annotations

import subprocess

import numpy as np
import pytest
import soundfile as sf

from tests.serving.conftest import CLI, SR

pytestmark = pytest.mark.slow

TEXT = "The first sentence is here. The second one follows."
FRAMES = 30


def test_demo_command_matches_the_server(server, tmp_path):
    out = tmp_path / "demo.wav"
    r = subprocess.run(
        [CLI, "demo", "--model", str(server.model_dir),
         "--out", str(out), "--text", TEXT, "--voice", "alloy", "--seed", "7",
         "--min-frames", str(FRAMES), "--max-frames", str(FRAMES), "--dtype", "float32"],
        capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"wrote {out}" in r.stdout
    offline, sr = sf.read(out, dtype="int16")
    assert sr == SR and offline.shape == (2 * (FRAMES * 512 - 256),)

    online = server.speech(input=TEXT, voice="alloy", seed=7, min_new_token=FRAMES,
                           max_new_token=FRAMES, response_format="pcm")
    assert online.status_code == 200, online.text
    online = np.frombuffer(online.content, "<i2")
    assert online.shape == offline.shape
    assert np.abs(online.astype(np.int32) - offline).max() <= 3
