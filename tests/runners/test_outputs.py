"""The frame side channel: positional records, markers, growth, reopening, bounded waits."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from chattts_vllm.runners.outputs import (FrameReader, FrameWriter, new_key, record_size,
                                          write_step_twin)
from tests.runners.conftest import random_frames


def test_records_round_trip_across_growth_and_reopen():
    key = new_key()
    codes, hidden = random_frames(700)
    w = FrameWriter(key, capacity=4)
    for i in range(300):
        w.write(i, codes[i], hidden[i])
    w.close()
    w = FrameWriter(key, capacity=4)            # a re-added request reopens its file
    rec = np.zeros(record_size() // 4, np.int32)
    for i in range(300, 700):                   # the GPU sink's raw records, as the sink writes them
        rec[0], rec[1:5], rec[5:] = i + 1, codes[i], hidden[i].view(np.int32)
        w.reserve(i)
        write_step_twin(rec[None], np.array([w.base], dtype=np.int64), np.array([w.capacity]))
    w.close()
    r = FrameReader(key)
    got_c, got_h = r.read(0, 700)
    np.testing.assert_array_equal(got_c, codes)
    np.testing.assert_array_equal(got_h, hidden)
    got_c, _ = r.read(650, 700)
    np.testing.assert_array_equal(got_c, codes[650:])
    r.close()
    assert not r.path.exists()


def test_overwrite_keeps_the_last_record():
    key = new_key()
    codes, hidden = random_frames(2)
    w = FrameWriter(key)
    w.write(0, codes[0], hidden[0])
    w.write(0, codes[1], hidden[1])             # re-sampled after a discarded step
    w.close()
    c, h = FrameReader(key).read(0, 1)
    np.testing.assert_array_equal(c[0], codes[1])
    np.testing.assert_array_equal(h[0], hidden[1])


def test_close_and_growth_survive_a_live_row_view():
    """A view of the map kept alive elsewhere (a traceback's or a profiler's frame locals: it
    crashed a CPU server's worker under the stack sampler) must not make close or growth raise;
    the records stay readable and the writer's file descriptor is released."""
    key = new_key()
    codes, hidden = random_frames(40)
    w = FrameWriter(key, capacity=4)
    w.write(0, codes[0], hidden[0])
    held = w.rows[0]                            # a row view outliving the mapping it came from
    for i in range(1, 40):                      # grows (remaps) with the old view alive
        w.write(i, codes[i], hidden[i])
    held2 = w.rows[1]
    w.close()
    assert w.fd == -1 and w.map is None
    c, h = FrameReader(key).read(0, 40)
    np.testing.assert_array_equal(c, codes)
    np.testing.assert_array_equal(h, hidden)
    assert held[0] == 1 and held2[0] == 2       # the views still read their (old) pages
    del held, held2


def test_reader_waits_for_late_frames_and_times_out_on_missing_ones():
    key = new_key()
    codes, hidden = random_frames(3)
    w = FrameWriter(key)
    w.write(0, codes[0], hidden[0])
    r = FrameReader(key)

    def late():
        time.sleep(0.2)
        w.write(1, codes[1], hidden[1])

    t = threading.Thread(target=late)
    t.start()
    c, _ = r.read(0, 2, timeout=5.0)            # frame 1 lands while we wait
    t.join()
    np.testing.assert_array_equal(c, codes[:2])
    with pytest.raises(RuntimeError, match="fewer than 3 frames"):
        r.read(0, 3, timeout=0.1)               # the file is pre-sized: the marker decides
    w.close()


def test_read_records_into_a_callers_array():
    """Several files read into rows of one array (the overlap decode's batched read) give what
    `read` gives; a wrong-shaped or strided target is refused."""
    keys = [new_key() for _ in range(3)]
    data = [random_frames(12, seed=s) for s in range(3)]
    for key, (codes, hidden) in zip(keys, data):
        w = FrameWriter(key)
        for i in range(12):
            w.write(i, codes[i], hidden[i])
        w.close()
    words = record_size() // 4
    batch = np.empty((3, 8, words), np.int32)
    for j, key in enumerate(keys):
        assert np.shares_memory(FrameReader(key).read_records(4, 12, out=batch[j]), batch)
    for j, (codes, hidden) in enumerate(data):
        np.testing.assert_array_equal(batch[j, :, 1:5], codes[4:12])
        np.testing.assert_array_equal(batch[j, :, 5:].view(np.float32), hidden[4:12])
        np.testing.assert_array_equal(batch[j, :, 0], np.arange(5, 13))
    with pytest.raises(ValueError):
        FrameReader(keys[0]).read_records(0, 8, out=np.empty((7, words), np.int32))
    with pytest.raises(ValueError):
        FrameReader(keys[0]).read_records(0, 8, out=np.empty((8, 2 * words), np.int32)[:, ::2])


def test_mapped_records_equal_the_read_ones_and_outlive_the_file():
    """`map_records` (the offline read-back) gives `read_records`' records without a copy; the
    view stays valid after the reader removes the file, is writable without touching the file,
    waits for a late frame, and refuses (no SIGBUS) a range the file does not hold."""
    key = new_key()
    codes, hidden = random_frames(40)
    w = FrameWriter(key, capacity=64)
    for i in range(39):
        w.write(i, codes[i], hidden[i])
    r = FrameReader(key)
    with pytest.raises(RuntimeError, match="fewer than 40 frames"):
        r.map_records(40, timeout=0.1)               # record 39 has no marker yet
    with pytest.raises(RuntimeError, match="fewer than 65 frames"):
        r.map_records(65, timeout=0.1)               # past the end of the 64-record file

    def late():
        time.sleep(0.2)
        w.write(39, codes[39], hidden[39])

    t = threading.Thread(target=late)
    t.start()
    mapped = r.map_records(40, timeout=5.0)
    t.join()
    np.testing.assert_array_equal(mapped, r.read_records(0, 40))
    r.close()
    w.close()
    assert not r.path.exists()
    np.testing.assert_array_equal(mapped[:, 1:5], codes)          # pages outlive the file
    np.testing.assert_array_equal(mapped[:, 5:].view(np.float32), hidden)
    mapped[0, 1] = -7                                              # private: a write stays here
    assert mapped[0, 1] == -7
    assert r.map_records(0).shape == (0, record_size() // 4)


def test_collected_results_match_the_frames_and_survive_cleanup():
    from chattts_vllm.gpt.requests import collect_code_result

    key = new_key()
    codes, hidden = random_frames(30, seed=4)
    w = FrameWriter(key)
    for i in range(30):
        w.write(i, codes[i], hidden[i])
    w.close()
    res = collect_code_result(key, [int(c) for c in codes[:, 0]], mapped=True)
    assert not FrameReader(key).path.exists()
    np.testing.assert_array_equal(res.codes, codes)
    assert res.codes.flags.c_contiguous and not res.hidden.flags.c_contiguous   # a view
    np.testing.assert_array_equal(res.hidden, hidden)
    import torch
    np.testing.assert_array_equal(torch.from_numpy(res.hidden).numpy(), hidden)
    w = FrameWriter(key)
    for i in range(30):
        w.write(i, codes[i], hidden[i])
    w.close()
    copied = collect_code_result(key, [int(c) for c in codes[:, 0]])      # the default: copies
    assert copied.hidden.flags.c_contiguous and copied.hidden.flags.owndata
    np.testing.assert_array_equal(copied.hidden, hidden)
    with pytest.raises(RuntimeError, match="out of step"):
        w = FrameWriter(key)
        for i in range(30):
            w.write(i, codes[i], hidden[i])
        w.close()
        collect_code_result(key, [int(c) + 1 for c in codes[:, 0]], mapped=True)


def test_mapped_records_fall_back_to_a_copy_when_mapping_fails(monkeypatch):
    import mmap as mmap_module

    from chattts_vllm.runners import outputs

    key = new_key()
    codes, hidden = random_frames(5)
    w = FrameWriter(key)
    for i in range(5):
        w.write(i, codes[i], hidden[i])
    w.close()

    def no_map(*a, **k):
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(outputs.mmap, "mmap", no_map)
    rec = FrameReader(key).map_records(5)
    monkeypatch.setattr(outputs.mmap, "mmap", mmap_module.mmap)
    np.testing.assert_array_equal(rec[:, 1:5], codes)
    np.testing.assert_array_equal(rec[:, 5:].view(np.float32), hidden)
    FrameReader(key).close()
