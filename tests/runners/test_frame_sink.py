"""The model runner V2 frame sink: one step's records to the requests' files, native op vs twin.

`write_frame_records` (csrc/frame_records.cpp) is built into chattts_vllm._C on the GPU machine;
here it is built alone with torch's extension tooling (CPU only, no CUDA needed), so CI checks the
same C++ against its Python twin.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from chattts_vllm.runners.outputs import (FrameReader, FrameSinkThread, new_key, record_size,
                                          write_records_twin)

WORDS = record_size() // 4
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    from chattts_vllm import ops

    if not (ops.HAS_CUDA_OPS and hasattr(torch.ops.chattts_vllm, "write_frame_records")):
        if shutil.which("c++") is None and shutil.which("g++") is None:
            pytest.skip("no C++ compiler to build csrc/frame_records.cpp")
        from torch.utils.cpp_extension import load

        load(name="chattts_frame_records", sources=[str(ROOT / "csrc" / "frame_records.cpp")],
             build_directory=str(tmp_path_factory.mktemp("build")), is_python_module=False,
             extra_cflags=["-O2"])
    return torch.ops.chattts_vllm.write_frame_records


def _step(slots, markers, seed):
    rng = np.random.default_rng(seed)
    rec = np.zeros((len(slots), WORDS), np.int32)
    rec[:, 0] = markers
    rec[:, 1:5] = rng.integers(0, 626, (len(slots), 4))
    rec[:, 5:] = rng.standard_normal((len(slots), WORDS - 5)).astype(np.float32).view(np.int32)
    return rec


def _drain(sink):
    """Wait until the sink thread has taken every job and returned every buffer."""
    deadline = time.monotonic() + 30
    while not (sink.jobs.empty() and sink.free.qsize() == 4):
        assert time.monotonic() < deadline, "sink did not drain"
        time.sleep(0.005)


@pytest.mark.parametrize("impl", ["native", "twin"])
def test_sink_writes_each_request_its_frames(impl, native):
    """Three slots over 300 steps (past the writer's first growth at 256 records), a slot with no
    writer, rows without a record (marker 0), and a slot reused by a second request."""
    sink = FrameSinkThread(8, WORDS, native=native if impl == "native" else False)
    keys = {0: new_key(), 3: new_key(), 5: new_key()}
    for slot, key in keys.items():
        sink.open(slot, key)
    sink.open(6, None)                                    # a plain-text request: no file
    expect = {k: [] for k in keys.values()}
    for step in range(300):
        slots = [5, 0, 6, 3]
        markers = [step + 1, step + 1, step + 1, step + 1 if step % 7 else 0]
        rec = _step(slots, markers, step)
        host = sink.take_buffer()
        host[:4] = torch.from_numpy(rec)
        sink.submit(None, np.asarray(slots), host, 4)
        for i, slot in enumerate(slots):
            if slot in keys:
                expect[keys[slot]].append(rec[i] if markers[i] else None)
    sink.close(3)
    second = new_key()
    sink.open(3, second)                                  # slot 3 reused
    rec = _step([3], [1], 999)
    host = sink.take_buffer()
    host[:1] = torch.from_numpy(rec)
    sink.submit(None, np.asarray([3]), host, 1)
    _drain(sink)
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
    rng = np.random.default_rng(1)
    rec = _step(list(range(64)), rng.integers(0, 5, 64), 3)
    a = np.zeros((64, WORDS), np.int32)
    b = np.zeros((64, WORDS), np.int32)
    order = rng.permutation(64)                          # rows land at scattered addresses
    keep = rng.random(64) < 0.8
    dest_a = np.where(keep, a.ctypes.data + order * WORDS * 4, 0).astype(np.int64)
    dest_b = np.where(keep, b.ctypes.data + order * WORDS * 4, 0).astype(np.int64)
    native(torch.from_numpy(rec), torch.from_numpy(dest_a))
    write_records_twin(rec, dest_b)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a[order[keep]], rec[keep])
    assert not a[order[~keep]].any()


def test_native_rejects_bad_arguments(native):
    rec = torch.zeros(4, WORDS, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="records must be"):
        native(rec.float(), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="dest must be"):
        native(rec, torch.zeros(5, dtype=torch.int64))          # more destinations than rows
