"""The model runner V2 frame sink: steps of records to the requests' files, native worker vs twin.

`FrameSinkWorker` (csrc/frame_sink.cpp) is built into chattts_vllm._C on the GPU machine; here it
is built alone with torch's extension tooling (CPU only, no CUDA: `push`, not the stream-ordered
`push_after_stream`), so CI checks the same C++ against its Python twin (`SinkTwin`).
"""
from __future__ import annotations

import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from chattts_vllm.runners.outputs import (FrameReader, FrameSink, SinkTwin, new_key, pushed,
                                          record_size, write_step_twin)

WORDS = record_size() // 4
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    """A factory of native workers: words -> torch.classes.chattts_vllm.FrameSinkWorker."""
    from chattts_vllm import ops

    if not (ops.HAS_CUDA_OPS and hasattr(torch.classes.chattts_vllm, "FrameSinkWorker")):
        if shutil.which("c++") is None and shutil.which("g++") is None:
            pytest.skip("no C++ compiler to build csrc/frame_sink.cpp")
        from torch.utils.cpp_extension import load

        load(name="chattts_frame_sink", sources=[str(ROOT / "csrc" / "frame_sink.cpp")],
             build_directory=str(tmp_path_factory.mktemp("build")), is_python_module=False,
             extra_cflags=["-O2"])
    return torch.classes.chattts_vllm.FrameSinkWorker


def _step(n, markers, seed):
    rng = np.random.default_rng(seed)
    rec = np.zeros((n, WORDS), np.int32)
    rec[:, 0] = markers
    rec[:, 1:5] = rng.integers(0, 626, (n, 4))
    rec[:, 5:] = rng.standard_normal((n, WORDS - 5)).astype(np.float32).view(np.int32)
    return rec


@pytest.mark.parametrize("impl", ["native", "twin"])
def test_sink_writes_each_request_its_frames(impl, native):
    """Three slots over 300 steps, a slot with no file, rows without a record (marker 0), a slot
    closed and reused by a second request while earlier steps may still be in flight."""
    sink = FrameSink(8, WORDS, native=native if impl == "native" else False)
    assert sink.native == (impl == "native")
    keys = {0: new_key(), 3: new_key(), 5: new_key()}
    for slot, key in keys.items():
        sink.open(slot, key, 300)
    sink.open(6, None)                                    # a plain-text request: no file
    expect = {k: [] for k in keys.values()}
    for step in range(300):
        slots = [5, 0, 6, 3]
        markers = [step + 1, step + 1, step + 1, step + 1 if step % 7 else 0]
        rec = _step(4, markers, step)
        host = sink.take_buffer()
        host[:4] = torch.from_numpy(rec)
        sink.submit(np.asarray(slots), host, 4)
        for i, slot in enumerate(slots):
            if slot in keys:
                expect[keys[slot]].append(rec[i] if markers[i] else None)
    sink.close(3)
    second = new_key()
    sink.open(3, second, 4)                               # slot 3 reused
    rec = _step(1, [1], 999)
    host = sink.take_buffer()
    host[:1] = torch.from_numpy(rec)
    sink.submit(np.asarray([3]), host, 1)
    sink.drain()
    assert not sink.closing and sink.worker.dropped() == 0
    for key in (keys[0], keys[5]):
        codes, hidden = FrameReader(key).read(0, 300, timeout=5)
        want = np.stack(expect[key])
        np.testing.assert_array_equal(codes, want[:, 1:5])
        np.testing.assert_array_equal(hidden.view(np.int32), want[:, 5:])
    got = np.fromfile(FrameReader(keys[3]).path, dtype=np.int32).reshape(-1, WORDS)
    for i, want in enumerate(expect[keys[3]]):
        if want is None:
            assert got[i, 0] == 0                         # no record: the slot stays unmarked
        else:
            np.testing.assert_array_equal(got[i], want)
    codes, _ = FrameReader(second).read(0, 1, timeout=5)
    np.testing.assert_array_equal(codes[0], rec[0, 1:5])


def test_native_equals_twin_byte_for_byte(native):
    """Scattered rows into two regions: the worker and the twin write the same bytes, skip the
    same rows (marker 0, no file) and drop the same rows (past capacity)."""
    rng = np.random.default_rng(1)
    rec = _step(64, rng.integers(0, 6, 64), 3)
    regions = [np.zeros((64 * 8, WORDS), np.int32) for _ in range(2)]
    slot_row = rng.permutation(64)                       # each row's file starts at a scattered record
    has_file = rng.random(64) < 0.8
    capacity = rng.integers(1, 8, 64).astype(np.int64)
    bases = [np.where(has_file, r.ctypes.data + slot_row * 8 * WORDS * 4, 0).astype(np.int64)
             for r in regions]
    worker = native(WORDS)
    seq = worker.push(torch.from_numpy(rec), torch.from_numpy(bases[0]), torch.from_numpy(capacity))
    assert worker.wait(seq, 10.0)
    dropped = write_step_twin(rec, bases[1], capacity)
    np.testing.assert_array_equal(regions[0], regions[1])
    assert worker.dropped() == dropped == int(((rec[:, 0] > capacity) & has_file).sum())
    assert worker.completed() == worker.submitted() == seq == 1
    written = (rec[:, 0] > 0) & has_file & (rec[:, 0] <= capacity)
    for i in np.flatnonzero(written):
        np.testing.assert_array_equal(regions[0][slot_row[i] * 8 + rec[i, 0] - 1], rec[i])
    assert np.count_nonzero(regions[0][:, 0]) == written.sum()


def test_native_rejects_bad_arguments(native):
    """Bad arguments come back as error codes (never a C++ exception out of the class), which
    `pushed` turns into RuntimeErrors; nothing is queued for them."""
    worker = native(WORDS)
    rec = torch.zeros(4, WORDS, dtype=torch.int32)
    z = torch.zeros(4, dtype=torch.int64)
    assert worker.push(rec.float(), z, z) == -1
    assert worker.push(rec, torch.zeros(5, dtype=torch.int64), torch.zeros(5, dtype=torch.int64)) == -2
    with pytest.raises(RuntimeError, match="records must be"):
        pushed(worker.push(rec[:, :3].contiguous(), z, z))
    if not torch.cuda.is_available():
        assert worker.push_after_stream(rec, z, z, 0) == -4
    assert native(0).push(rec, z, z) == -5
    assert worker.submitted() == 0
    assert not worker.wait(1, 0.05)                      # a step never pushed: times out, False


def test_worker_dropped_with_steps_in_flight_still_writes_them(native):
    """Python may let go of a worker whose steps are still queued (a request's end races the
    sink): the thread writes them and stops on its own, never joining itself or touching freed
    state. 300 workers, each dropped right after its pushes."""
    import time

    regions = [np.zeros((4, WORDS), np.int32) for _ in range(300)]
    rec = torch.from_numpy(_step(1, [1], 7))
    for region in regions:
        worker = native(WORDS)
        for _ in range(3):
            worker.push(rec, torch.tensor([region.ctypes.data]), torch.tensor([4]))
        del worker
    deadline = time.time() + 10
    while not all(r[0, 0] == 1 for r in regions) and time.time() < deadline:
        time.sleep(0.01)
    for region in regions:
        np.testing.assert_array_equal(region[0], rec[0].numpy())


def test_twin_waits_for_its_event_before_writing():
    """SinkTwin (the CUDA path without the extension) writes a step only after its event."""
    class Gate:
        def __init__(self):
            self.go = threading.Event()

        def synchronize(self):
            self.go.wait(10)

    twin = SinkTwin(WORDS)
    region = np.zeros((2, WORDS), np.int32)
    rec = _step(1, [2], 5)
    gate = Gate()
    seq = twin.push(torch.from_numpy(rec), torch.tensor([region.ctypes.data]), torch.tensor([2]), gate)
    assert not twin.wait(seq, 0.05)                   # times out: False, never a hang
    assert twin.completed() == 0 and not region.any()
    gate.go.set()
    assert twin.wait(seq, 10.0)
    np.testing.assert_array_equal(region[1], rec[0])


@pytest.mark.gpu
def test_native_push_after_stream_writes_after_the_copy_lands(native):
    """On CUDA the worker takes a step only when the stream has copied it: a copy queued behind a
    ~50 ms GPU sleep is not written before it lands, then its bytes are exact."""
    worker = native(WORDS)
    region = np.zeros((4, WORDS), np.int32)
    rec = torch.from_numpy(_step(2, [1, 3], 11)).cuda()
    host = torch.zeros(2, WORDS, dtype=torch.int32, pin_memory=True)
    torch.cuda._sleep(50_000_000)                         # ~50 ms of GPU time ahead of the copy
    host.copy_(rec, non_blocking=True)
    base = torch.tensor([region.ctypes.data] * 2, dtype=torch.int64)
    seq = worker.push_after_stream(host, base, torch.tensor([4, 4]), torch.cuda.current_stream().cuda_stream)
    assert worker.completed() < seq and not region.any()
    assert worker.wait(seq, 10.0)
    np.testing.assert_array_equal(region[[0, 2]], rec.cpu().numpy())
