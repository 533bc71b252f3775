"""Decoding while the GPT generates (serving/overlap.py): the audio equals the decode after the GPT
(fp32, up to the streamed decode's rounding, 1e-4 abs), a frame re-sampled after it was read falls
back to the one-shot decode, and on a real engine the watcher pushes blocks before the batch ends."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from chattts_vllm.audio.checkpoint import AudioModels, load_decoder, load_dvae, load_vocos
from chattts_vllm.audio.checkpoint import random_audio_state_dicts
from chattts_vllm.gpt.requests import CodeResult
from chattts_vllm.params import InferCodeParams
from chattts_vllm.runners.outputs import FrameWriter, new_key
from chattts_vllm.serving.overlap import OverlappedDecode
from chattts_vllm.serving.pipeline import decode_utterances

TOL = 1e-4


@pytest.fixture(scope="module")
def models() -> AudioModels:
    sd = random_audio_state_dicts(0)
    return AudioModels(load_decoder(sd["Decoder.safetensors"]), load_dvae(sd["DVAE.safetensors"]),
                       load_vocos(sd["Vocos.safetensors"]))


def _frames(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 625, (n, 4)).astype(np.int32), rng.standard_normal((n, 768)).astype(np.float32)


def _assert_same_audio(got: list[np.ndarray], ref: list[np.ndarray]) -> None:
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        assert g.shape == r.shape
        if r.size:
            assert np.abs(g - r).max() <= TOL


@pytest.mark.parametrize("use_decoder", [True, False])
def test_overlap_equals_decode_after_and_falls_back_on_a_resampled_frame(models, tmp_path, monkeypatch,
                                                                         use_decoder):
    """Five requests of four lengths written frame by frame (as the sink writes them) while the
    watcher runs in groups of 2; one row's final codes differ from what was read (re-sampled)."""
    monkeypatch.setenv("CHATTTS_VLLM_FRAME_DIR", str(tmp_path / "frames"))
    lengths = [40, 40, 27, 3, 33]
    data = [_frames(n, i) for i, n in enumerate(lengths)]
    keys = [new_key() for _ in lengths]
    writers = [FrameWriter(k, capacity=n) for k, n in zip(keys, lengths)]
    watcher = OverlappedDecode(models, use_decoder, block=8, group=2, poll_s=0.001)
    watcher.start(keys)

    def engine():                                   # one frame per "step", every live request
        for t in range(max(lengths)):
            for w, (c, h), n in zip(writers, data, lengths):
                if t < n:
                    w.write(t, c[t], h[t])
            time.sleep(0.004)
    th = threading.Thread(target=engine)
    th.start()
    th.join()
    time.sleep(0.05)
    watcher.stop()
    assert watcher.error is None
    # A block waits for the frame after it; the 3-frame row was split from the 27-frame one.
    assert sorted((g.rows, g.pushed) for g in watcher.groups) == [([0, 1], 32), ([2], 24), ([3], 0), ([4], 32)]
    results = [CodeResult(c.copy(), h.copy(), eos=True) for c, h in data]
    results[4].codes[5, 0] = (results[4].codes[5, 0] + 1) % 625  # re-sampled after it was read
    ref = decode_utterances(models, [(r.codes, r.hidden) for r in results], use_decoder)
    got = watcher.finish(results)
    for w in writers:
        w.close()
    _assert_same_audio(got, ref)
    assert [len(w) for w in got] == [512 * n - 256 for n in lengths]


def test_overlap_survives_a_failing_thread(models, tmp_path, monkeypatch):
    """An exception in the watcher thread loses no audio: every row is decoded after."""
    monkeypatch.setenv("CHATTTS_VLLM_FRAME_DIR", str(tmp_path / "frames"))
    c, h = _frames(20, 0)
    key = new_key()
    w = FrameWriter(key, capacity=20)
    watcher = OverlappedDecode(models, block=8, poll_s=0.001)
    watcher.start([key])
    watcher.groups[0].decoder = None               # the first push will raise in the thread
    for t in range(20):
        w.write(t, c[t], h[t])
    deadline = time.time() + 10
    while watcher.error is None and time.time() < deadline:
        time.sleep(0.01)
    assert isinstance(watcher.error, AttributeError)
    watcher.stop()
    got = watcher.finish([CodeResult(c, h, eos=True)])
    w.close()
    _assert_same_audio(got, decode_utterances(models, [(c, h)]))


@pytest.mark.slow
def test_overlap_on_the_engine_equals_decode_after(engine, models):
    """The CPU engine: 6 texts of three lengths, decoded while generated (blocks of 8 frames in
    groups of 4) and after; the watcher pushed before the engine was done."""
    frames = [60, 60, 45, 60, 30, 52]
    texts = [f"overlap test sentence number {i}." for i in range(len(frames))]
    ps = [InferCodeParams(manual_seed=i, min_new_token=n, max_new_token=n) for i, n in enumerate(frames)]
    watcher = OverlappedDecode(models, block=8, group=4)
    results = engine.infer_code(texts, ps, use_tqdm=False, watcher=watcher)
    pushed = [g.pushed for g in watcher.groups]
    got = watcher.finish(results)
    assert watcher.error is None
    assert [r.num_frames for r in results] == frames
    assert max(pushed) >= 8, pushed                # streamed during generation, not all after
    _assert_same_audio(got, decode_utterances(models, [(r.codes, r.hidden) for r in results]))


@pytest.mark.slow
def test_synthesize_overlap_decode_flag(engine):
    """`ChatTTS.synthesize(overlap_decode=True)` gives the audio of the default path."""
    texts = ["first overlap text", "second overlap text", "third one"]
    ps = [InferCodeParams(manual_seed=i, min_new_token=n, max_new_token=n) for i, n in enumerate([40, 40, 25])]
    plain = engine.synthesize(texts, ps, split_text=False)
    overlapped = engine.synthesize(texts, ps, split_text=False, overlap_decode=True)
    _assert_same_audio(overlapped, plain)
    assert [len(w) for w in plain] == [512 * n - 256 for n in (40, 40, 25)]
