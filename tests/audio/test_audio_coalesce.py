"""Coalesced network calls (audio/coalesce.py): many threads' streams batched on one worker give the
same audio as each stream alone (fp32, max abs diff <= 1e-5), errors reach every caller of their
group, and the whole-file path through the coalescer equals the plain one."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from audio_upstream import one_thread
from streaming import stream

from chattts_vllm.audio.checkpoint import (AudioModels, decoder_shapes, load_decoder, load_vocos,
                                           random_state_dict, vocos_shapes)
from chattts_vllm.audio.coalesce import CoalescedNet, Coalescer, coalesced_models
from chattts_vllm.serving.pipeline import decode_utterance, decode_utterances

_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)
TOL = 1e-5


@pytest.fixture(scope="module")
def tiny_models():
    """Narrow models with the real depth, hence the real receptive fields (75 and 27 mel frames)."""
    dec = load_decoder(random_state_dict(decoder_shapes(idim=8, odim=16, hidden=16, bn_dim=8), 3))
    voc = load_vocos(random_state_dict(vocos_shapes(dim=16, intermediate=32), 4))
    return dec, voc


def _stream(mel_model, vocos, frames: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    return stream(mel_model, vocos, frames, sizes)[0]


def _hold(co: Coalescer) -> tuple[threading.Event, threading.Thread]:
    """Keep the worker busy until the returned event is set, so that jobs pile up behind it."""
    running, release = threading.Event(), threading.Event()

    def held(x: torch.Tensor) -> torch.Tensor:
        running.set()
        release.wait()
        return x

    t = threading.Thread(target=co.call, args=(held, torch.zeros(1)))
    t.start()
    assert running.wait(30)
    return release, t


def _wait_queued(co: Coalescer, n: int, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while co._queue.qsize() < n:
        assert time.monotonic() < end, f"only {co._queue.qsize()} of {n} jobs queued"
        time.sleep(0.001)


def _run_behind_hold(co: Coalescer, tasks: list) -> list:
    """Runs each zero-argument task on its own thread while the worker is held, so that their
    first coalesced calls all queue in one drain; returns each task's result or exception."""
    out: list = [None] * len(tasks)

    def run(i: int) -> None:
        try:
            out[i] = tasks[i]()
        except BaseException as e:  # noqa: BLE001 - the caller asserts on it
            out[i] = e

    release, holder = _hold(co)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(tasks))]
    for t in threads:
        t.start()
    _wait_queued(co, len(tasks))
    release.set()
    for t in threads + [holder]:
        t.join()
    return out


def test_lone_call_and_batch_dims():
    with Coalescer() as co:
        w = torch.randn(3, 5)
        x = torch.randn(2, 4, 3)
        assert torch.equal(co.call(lambda t: t @ w, x), x @ w)
        assert co.stats.calls == 1 and co.stats.batched_calls == 0


def test_many_threads_stream_equal_to_alone(tiny_models):
    """16 streams of different lengths and block sizes; the first pushes all queue in one drain,
    with different window lengths, so several shape groups run in the same drain."""
    dec, voc = tiny_models
    g = torch.Generator().manual_seed(0)
    n = 16
    lengths = [90 + 13 * (i % 5) for i in range(n)]
    sizes = [[40 + 8 * (i % 3), 24 + (i % 2), 48] for i in range(n)]
    frames = [torch.randn(t, 16, generator=g) for t in lengths]
    with torch.inference_mode():
        alone = [_stream(dec, voc, f, s) for f, s in zip(frames, sizes)]

    with Coalescer() as co:
        cdec, cvoc = CoalescedNet(dec, co), CoalescedNet(voc, co)
        # every stream's first mel call waits behind the hold
        got = _run_behind_hold(co, [lambda i=i: _stream(cdec, cvoc, frames[i], sizes[i])
                                    for i in range(n)])
        stats = co.stats
    diffs = []
    for i in range(n):
        assert not isinstance(got[i], BaseException), got[i]
        assert got[i].shape == alone[i].shape == (512 * lengths[i] - 256,)
        diffs.append((got[i] - alone[i]).abs().max().item())
    print(f"coalesced vs alone: max abs diff {max(diffs):.2e}; {stats}")
    assert max(diffs) <= TOL
    assert stats.calls < stats.jobs - 1 and stats.batched_calls >= 1
    assert stats.largest >= 4 and stats.widest >= 3     # three first-push sizes: three mel shapes


def _queue_behind_hold(co: Coalescer, net, xs: list[torch.Tensor]) -> list:
    """Runs `co.call(net, x)` for every x from its own thread, all queued in one drain."""
    return _run_behind_hold(co, [lambda x=x: co.call(net, x) for x in xs])


def test_a_failing_input_fails_only_its_own_caller_and_worker_survives():
    def net(x: torch.Tensor) -> torch.Tensor:
        if bool((x < 0).any()):
            raise ValueError("negative input")
        return 2 * x

    with Coalescer() as co:
        xs = [torch.full((1, 3), float(v)) for v in (1, -1, 2)] + [torch.full((1, 5), 3.0)]
        out = _queue_behind_hold(co, net, xs)
        # The (3,)-wide batch failed and was re-run job by job: only the negative input errs.
        assert isinstance(out[1], ValueError)
        for i in (0, 2, 3):
            assert torch.equal(out[i], 2 * xs[i])
        assert co.stats.retried_batches == 1 and co.stats.largest == 3
        # The worker is alive and serves later calls.
        assert torch.equal(co.call(net, torch.ones(2, 3)), 2 * torch.ones(2, 3))


def test_batches_are_capped_in_elements():
    """A group larger than `max_elements` runs in several calls, each within the cap."""
    sizes: list[int] = []

    def net(x: torch.Tensor) -> torch.Tensor:
        sizes.append(x.numel())
        return x + 1

    with Coalescer(max_elements=40) as co:
        xs = [torch.full((1, 10), float(i)) for i in range(9)]
        out = _queue_behind_hold(co, net, xs)
    assert all(torch.equal(o, x + 1) for o, x in zip(out, xs))
    assert sizes == [40, 40, 10]


def test_padded_batches_run_on_powers_of_two_with_the_same_rows():
    """pad_batches: 3 and 5 queued rows run as 4 and 8 (zero rows added, dropped from the results),
    a lone row stays 1, and a pad that would pass max_elements is skipped."""
    seen: list[int] = []

    def net(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.shape[0])
        return x * 3 + 1

    for cap, sizes in ((None, (3, 5)), (7 * 4, (7,))):          # 8 rows of 4 would pass 7 * 4
        with Coalescer(pad_batches=True, **({"max_elements": cap} if cap else {})) as co:
            for n in sizes:
                xs = [torch.full((1, 4), float(i)) for i in range(n)]
                out = _queue_behind_hold(co, net, xs)
                assert all(torch.equal(o, x * 3 + 1) for o, x in zip(out, xs))
            assert torch.equal(co.call(net, torch.ones(1, 4)), torch.full((1, 4), 4.0))
    assert seen == [4, 8, 1, 7, 1]


def test_smallest_inputs_run_first_in_a_drain():
    """A first chunk (few frames) queued with other streams' long pushes runs before them."""
    order: list[int] = []

    def net(x: torch.Tensor) -> torch.Tensor:
        order.append(x.shape[1])
        return x

    with Coalescer() as co:
        xs = [torch.zeros(1, t, 3) for t in (48, 12, 96, 12, 48)]
        out = _queue_behind_hold(co, net, xs)
    assert order == [12, 48, 96] and all(torch.equal(o, x) for o, x in zip(out, xs))


def test_closed_coalescer_refuses_calls():
    co = Coalescer()
    co.close()
    assert not co._thread.is_alive()
    with pytest.raises(RuntimeError):
        co.call(lambda x: x, torch.ones(1))


def test_proxy_forwards_everything_else(tiny_models):
    dec, voc = tiny_models
    with Coalescer() as co:
        models = coalesced_models(AudioModels(dec, None, voc), co)
        assert models.dvae is None
        assert models.decoder.context == dec.context and models.vocos.hop_length == voc.hop_length
        assert models.vocos.head is voc.head and next(models.vocos.parameters()) is next(voc.parameters())
        assert models.vocos.decode_frames.__wrapped__ == voc.decode_frames


def test_whole_file_path_through_coalescer_equals_plain(tiny_models):
    """decode_utterance from 6 threads (two lengths, so two groups batch) == the plain decode."""
    dec, voc = tiny_models
    plain = AudioModels(dec, None, voc)
    rng = np.random.default_rng(0)
    hiddens = [rng.standard_normal((t, 16)).astype(np.float32) for t in (30, 30, 30, 41, 41, 7)]
    codes = [np.zeros((len(h), 4), np.int32) for h in hiddens]
    ref = [decode_utterance(plain, c, h) for c, h in zip(codes, hiddens)]
    with Coalescer() as co:
        routed = coalesced_models(plain, co)
        got = _run_behind_hold(co, [lambda c=c, h=h: decode_utterance(routed, c, h)
                                    for c, h in zip(codes, hiddens)])
        stats = co.stats
    for g, r in zip(got, ref):
        assert g.shape == r.shape and np.abs(g - r).max() <= TOL
    assert stats.batched_calls >= 2 and stats.largest >= 3


def test_decode_utterances_equals_each_alone(tiny_models):
    """The offline batch decode (equal lengths share batched calls, max_batch 2 here so a length
    group spans several calls) == each utterance decoded alone, empty ones included."""
    dec, voc = tiny_models
    plain = AudioModels(dec, None, voc)
    rng = np.random.default_rng(1)
    lengths = (30, 41, 30, 0, 30, 41, 7)
    frames = [(np.zeros((t, 4), np.int32), rng.standard_normal((t, 16)).astype(np.float32))
              for t in lengths]
    ref = [decode_utterance(plain, c, h) for c, h in frames]
    got = decode_utterances(plain, frames, max_batch=2)
    assert [len(g) for g in got] == [len(r) for r in ref] == [max(0, 512 * t - 256) for t in lengths]
    for g, r in zip(got, ref):
        assert g.dtype == np.float32 and (g.size == 0 or np.abs(g - r).max() <= TOL)


@pytest.mark.gpu
def test_pipelined_decode_utterances_equal_each_alone_on_gpu():
    """The GPU path of `decode_utterances` (pinned double buffers, async copies both ways): five
    chunks over three lengths, the longest last so the buffers grow while the previous chunk's
    copies may be in flight, twice in a row (the buffers are reused); each row equals its own
    decode_utterance (the pageable path) to bf16 rounding, empty rows included."""
    from audio_upstream import state_dicts

    sd = state_dicts(0)
    dec = load_decoder(sd["Decoder.safetensors"], device="cuda", dtype=torch.bfloat16)
    voc = load_vocos(sd["Vocos.safetensors"], device="cuda", dtype=torch.bfloat16)
    models = AudioModels(decoder=dec, dvae=None, vocos=voc)
    rng = np.random.default_rng(2)
    lengths = (40, 40, 40, 0, 25, 25, 40, 90, 90)
    frames = [(np.zeros((t, 4), np.int32), rng.standard_normal((t, 768)).astype(np.float32))
              for t in lengths]
    with torch.inference_mode():
        ref = [decode_utterance(models, c, h) for c, h in frames]
        runs = [decode_utterances(models, frames, max_batch=2) for _ in range(2)]
    scale = max(np.abs(r).max() for r in ref if r.size)
    for got in runs:
        assert [len(g) for g in got] == [max(0, 512 * t - 256) for t in lengths]
        for g, r in zip(got, ref):
            assert g.dtype == np.float32 and (g.size == 0 or np.abs(g - r).max() <= 1e-2 * scale)


@pytest.mark.gpu
def test_coalesced_streams_equal_alone_on_gpu_triton():
    """Full-size models on CUDA, bf16 as served: 8 lockstep streams batched through the Triton
    kernels (batch 8 instead of 1) give each stream's solo audio; every row of a batched GEMM and
    conv sees the same tiles, so the samples should agree to bf16 rounding at worst."""
    from audio_upstream import state_dicts

    sd = state_dicts(0)
    dec = load_decoder(sd["Decoder.safetensors"], device="cuda", dtype=torch.bfloat16)
    voc = load_vocos(sd["Vocos.safetensors"], device="cuda", dtype=torch.bfloat16)
    models = AudioModels(decoder=dec, dvae=None, vocos=voc)
    g = torch.Generator().manual_seed(1)
    frames = [torch.randn(200, 768, generator=g).cuda().to(torch.bfloat16) for _ in range(8)]
    sizes = [60, 48, 48, 48]
    with torch.inference_mode():
        alone = [_stream(models.decoder, models.vocos, f, sizes).float() for f in frames]
    with Coalescer() as co:
        nets = coalesced_models(models, co)

        def run(f: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                return _stream(nets.decoder, nets.vocos, f, sizes).float()

        got = _run_behind_hold(co, [lambda f=f: run(f) for f in frames])
        stats = co.stats
    scale = max(a.abs().max().item() for a in alone)
    err = max((x - a).abs().max().item() for x, a in zip(got, alone)) / scale
    print(f"coalesced vs alone on CUDA bf16: max rel {err:.2e}; {stats}")
    assert stats.largest >= 4
    assert err <= 1e-2


@pytest.mark.gpu
def test_padded_coalesced_batches_replay_from_graphs_on_gpu():
    """The served GPU setup with CHATTTS_AUDIO_CUDA_GRAPHS=1: coalesced batches of 3, 5 and 6
    streams run padded to 4 and 8 rows and replay from per-shape CUDA graphs; each stream equals its
    solo eager decode (rows are independent: bf16 rounding at worst), and only the padded batch
    sizes were ever captured."""
    from audio_upstream import state_dicts

    from chattts_vllm.audio.graphs import disable_cuda_graphs, enable_cuda_graphs

    sd = state_dicts(0)
    dec = load_decoder(sd["Decoder.safetensors"], device="cuda", dtype=torch.bfloat16)
    voc = load_vocos(sd["Vocos.safetensors"], device="cuda", dtype=torch.bfloat16)
    models = AudioModels(decoder=dec, dvae=None, vocos=voc)
    g = torch.Generator().manual_seed(2)
    hidden = [torch.randn(24, 768, generator=g).numpy() for _ in range(6)]
    codes = np.zeros((24, 4), np.int32)
    alone = [decode_utterance(models, codes, h) for h in hidden]
    for m in (dec, voc):
        enable_cuda_graphs(m, min_calls=1)
    try:
        with Coalescer(pad_batches=True) as co:
            nets = coalesced_models(models, co)
            got = []
            for n in (3, 5, 6, 3):
                got += _run_behind_hold(co, [lambda h=h: decode_utterance(nets, codes, h)
                                             for h in hidden[:n]])
            shapes = {k[0][0] for k in dec.__dict__["_graph_caches"]["decode_frames"]._graphs}
            replays = dec.__dict__["_graph_caches"]["decode_frames"].replays
    finally:
        for m in (dec, voc):
            disable_cuda_graphs(m)
    scale = max(np.abs(a).max() for a in alone)
    want = [alone[i] for n in (3, 5, 6, 3) for i in range(n)]
    err = max(np.abs(x - a).max() for x, a in zip(got, want)) / scale
    print(f"padded + graphs vs alone: max rel {err:.2e}; graph batch sizes {sorted(shapes)}")
    assert shapes <= {1, 4, 8} and {4, 8} <= shapes and replays >= 4
    assert err <= 1e-2
