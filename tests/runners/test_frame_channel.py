"""The frame side channel's sizing and read path: the capacity hint (through the writer and the
sink thread), growth that keeps what is written, exact bytes back as arrays of their own, waits."""
from __future__ import annotations

import threading
import time

import numpy as np
import torch

from chattts_vllm.runners.outputs import (FrameReader, FrameSink, FrameWriter, new_key,
                                          record_size, write_step_twin)
from tests.runners.conftest import random_frames


def test_capacity_hint_sizes_the_file_once_and_a_reopen_never_shrinks():
    key = new_key()
    rec_bytes = record_size()
    codes, hidden = random_frames(600)
    w = FrameWriter(key, capacity=500)          # the worker's hint: the request's max_tokens
    assert w.capacity == 500
    base = w.base
    for i in range(500):                        # frames < the hint: no growth, no remap
        w.write(i, codes[i], hidden[i])
    assert (w.capacity, w.base) == (500, base)
    w.close()
    path = FrameReader(key).path
    assert path.stat().st_size == 500 * rec_bytes
    w = FrameWriter(key, capacity=8)            # reopened with a smaller (or no) hint
    assert w.capacity == 500
    w.close()
    w = FrameWriter(key)
    assert w.capacity == 500
    w.write(550, codes[550], hidden[550])       # past the hint: grows, keeps what is there
    assert w.capacity >= 551
    w.close()
    assert path.stat().st_size >= 551 * rec_bytes
    c, h = FrameReader(key).read(0, 500)
    np.testing.assert_array_equal(c, codes[:500])
    np.testing.assert_array_equal(h, hidden[:500])
    c, _ = FrameReader(key).read(550, 551)
    np.testing.assert_array_equal(c, codes[550:551])


def test_read_returns_the_exact_bytes_as_contiguous_arrays_of_their_own():
    key = new_key()
    words = record_size() // 4
    rng = np.random.default_rng(7)
    rec = rng.integers(-2**31, 2**31, (64, words), dtype=np.int64).astype(np.int32)  # NaN bits too
    rec[:, 0] = np.arange(1, 65)
    w = FrameWriter(key, capacity=64)
    write_step_twin(rec, np.full(64, w.base, dtype=np.int64), np.full(64, 64, dtype=np.int64))
    w.close()
    r = FrameReader(key)
    for start, stop in ((0, 64), (17, 40), (63, 64)):
        codes, hidden = r.read(start, stop)
        assert codes.dtype == np.int32 and hidden.dtype == np.float32
        assert codes.shape == (stop - start, 4) and hidden.shape == (stop - start, words - 5)
        assert codes.flags.c_contiguous and hidden.flags.c_contiguous
        assert codes.flags.writeable and hidden.flags.writeable
        assert not np.shares_memory(codes, hidden)
        assert codes.tobytes() == rec[start:stop, 1:5].tobytes()
        assert hidden.tobytes() == rec[start:stop, 5:].tobytes()
    r.close()


def test_reader_waits_for_a_gap_and_for_a_file_not_there_yet():
    """A record missing in the middle of the range (the sink one step behind on one row) and a
    file the worker has not opened yet: the read waits for both, then returns every frame."""
    key = new_key()
    codes, hidden = random_frames(6)
    r = FrameReader(key)
    box = {}

    def read():
        box["got"] = r.read(0, 6, timeout=10.0)

    t = threading.Thread(target=read)
    t.start()
    time.sleep(0.1)                             # the reader polls a file that does not exist
    w = FrameWriter(key, capacity=6)
    for i in (0, 1, 2, 4, 5):
        w.write(i, codes[i], hidden[i])
    time.sleep(0.1)
    assert t.is_alive()                         # frame 3 is missing
    w.write(3, codes[3], hidden[3])
    t.join(10)
    w.close()
    c, h = box["got"]
    np.testing.assert_array_equal(c, codes)
    np.testing.assert_array_equal(h, hidden)
    r.close()


def test_sink_sizes_each_file_from_the_capacity_at_open_and_drops_past_it():
    """FrameSink.open(slot, key, max_tokens): the file is mapped once at that size (300 steps
    write at one base address); a record past the capacity is dropped and counted, never written
    elsewhere."""
    words = record_size() // 4
    sink = FrameSink(4, words, native=False)
    hinted, small = new_key(), new_key()
    sink.open(0, hinted, 300)
    sink.open(1, small, 10)
    base = int(sink.base[0])
    rec = np.zeros((2, words), np.int32)
    for step in range(300):
        rec[:, 0] = step + 1
        rec[:, 1] = step
        host = sink.take_buffer()
        host[:2] = torch.from_numpy(rec)
        sink.submit(np.array([0, 1]), host, 2)
    sink.drain()
    assert int(sink.base[0]) == base and sink.capacity[0] == 300
    assert sink.worker.dropped() == 290 and sink.reported_drops <= 290
    codes, _ = FrameReader(hinted).read(0, 300, timeout=10)
    np.testing.assert_array_equal(codes[:, 0], np.arange(300))
    codes, _ = FrameReader(small).read(0, 10, timeout=10)
    np.testing.assert_array_equal(codes[:, 0], np.arange(10))
    assert FrameReader(small).path.stat().st_size == 10 * words * 4
    sink.close(0)
    sink.close(1)
