"""Concurrent streams through the real SpeechJob.stream / waveform with the audio coalescer on:
each stream still equals its one-shot decode, the coalescer batched across streams, and the
server's switches (CHATTTS_VLLM_AUDIO_COALESCE, _THREADS) pick the documented defaults."""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from test_stream_first_chunk import FakeUtterance, _hidden

from chattts_vllm.audio.checkpoint import (AudioModels, decoder_shapes, load_decoder, load_vocos,
                                           random_state_dict, vocos_shapes)
from chattts_vllm.audio.coalesce import CoalescedNet, Coalescer
from chattts_vllm.serving.pipeline import decode_utterance
from chattts_vllm.serving.service import audio_coalesce, audio_threads, audio_warm_up
from chattts_vllm.serving.streaming import AudioRunner, SpeechJob, StreamConfig


@pytest.fixture(scope="module")
def models():
    dec = load_decoder(random_state_dict(decoder_shapes(idim=8, odim=16, hidden=16, bn_dim=8), 3))
    voc = load_vocos(random_state_dict(vocos_shapes(dim=16, intermediate=32), 4))
    return AudioModels(dec, None, voc)


@pytest.fixture()
def runner(models):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    with Coalescer() as co, ThreadPoolExecutor(16) as pool:
        yield AudioRunner(models, pool, coalescer=co)
    torch.set_num_threads(n)


def _job(hiddens: list[np.ndarray]) -> SpeechJob:
    job = SpeechJob.__new__(SpeechJob)
    job.utterances = [FakeUtterance(h, period=0.002) for h in hiddens]
    job.used_tokens, job.first_chunk_frames = 0, None
    return job


def _oneshot(models: AudioModels, hidden: np.ndarray) -> np.ndarray:
    return decode_utterance(models, np.zeros((len(hidden), 4), np.int32), hidden)


def test_runner_routes_through_the_coalescer(runner, models):
    assert isinstance(runner.nets.decoder, CoalescedNet) and runner.nets.dvae is None
    assert runner.lookahead == 53
    plain = AudioRunner(models, runner.executor)
    assert plain.nets is models


def test_concurrent_streams_equal_oneshot(runner, models):
    texts = [[_hidden(100 + 10 * (i % 3), i)] + ([_hidden(60, 100 + i)] if i % 2 else [])
             for i in range(8)]

    async def one(hiddens):
        job = _job(hiddens)
        chunks = [wav async for wav in job.stream(runner, StreamConfig())]
        job.close()
        return np.concatenate(chunks)

    async def go():
        return await asyncio.gather(*(one(h) for h in texts))

    got = asyncio.run(go())
    for wav, hiddens in zip(got, texts):
        ref = np.concatenate([_oneshot(models, h) for h in hiddens])
        assert wav.shape == ref.shape and np.abs(wav - ref).max() <= 1e-4
    st = runner.coalescer.stats
    print(st)
    assert st.batched_calls >= 1 and st.calls < st.jobs


def test_concurrent_whole_files_equal_oneshot(runner, models):
    texts = [[_hidden(50, i), _hidden(30 + (i % 2), 50 + i)] for i in range(6)]

    async def go():
        jobs = [_job(h) for h in texts]
        out = await asyncio.gather(*(j.waveform(runner) for j in jobs))
        for j in jobs:
            j.close()
        return out

    for wav, hiddens in zip(asyncio.run(go()), texts):
        ref = np.concatenate([_oneshot(models, h) for h in hiddens])
        assert wav.shape == ref.shape and np.abs(wav - ref).max() <= 1e-5


@pytest.mark.parametrize("var,switch", [("CHATTTS_VLLM_AUDIO_COALESCE", audio_coalesce),
                                        ("CHATTTS_VLLM_AUDIO_WARMUP", audio_warm_up)])
@pytest.mark.parametrize("env,device,want", [(None, "cuda", True), (None, "cpu", False),
                                             ("0", "cuda", False), ("1", "cpu", True),
                                             ("off", "cuda:0", False), ("", "cuda:1", True)])
def test_cuda_default_switches(monkeypatch, var, switch, env, device, want):
    if env is None:
        monkeypatch.delenv(var, raising=False)
    else:
        monkeypatch.setenv(var, env)
    assert switch(device) is want


def test_audio_threads_default(monkeypatch):
    monkeypatch.delenv("CHATTTS_VLLM_AUDIO_THREADS", raising=False)
    assert audio_threads(True) == 64 and audio_threads(False) <= 4
    monkeypatch.setenv("CHATTTS_VLLM_AUDIO_THREADS", "8")
    assert audio_threads(True) == 8 == audio_threads(False)
