"""serving/colocate.py: core slices, host-wide slot claims (distinct, freed when the holder dies),
pinning every thread of a process, not only the caller, and one engine start at a time per GPU."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from chattts_vllm.serving.colocate import claim_slot, core_slice, one_start_per_gpu


def test_core_slices_cover_the_cores_once():
    cores = list(range(16))
    for n in (1, 2, 3, 4, 6):
        parts = [core_slice(cores, k, n) for k in range(n)]
        assert sorted(c for p in parts for c in p) == cores
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert core_slice([0, 1], 2, 3) == [0, 1]          # fewer cores than slots: share all
    assert core_slice({5, 1, 3, 7}, 1, 2) == [5, 7]    # any order in, sorted slices out


def test_slots_are_distinct_until_all_are_held(tmp_path):
    a, b = claim_slot(2, tmp_path), claim_slot(2, tmp_path)
    assert {a.index, b.index} == {0, 1}
    assert claim_slot(2, tmp_path) is None
    a.release()
    again = claim_slot(2, tmp_path)
    assert again.index == a.index
    again.release(), b.release()


def test_a_dead_holders_slot_is_free_again(tmp_path):
    code = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from chattts_vllm.serving.colocate import claim_slot
        s = claim_slot(2, Path({str(tmp_path)!r}))
        print(s.index, flush=True)
        time.sleep(60)
    """)
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "0"
        mine = claim_slot(2, tmp_path)
        assert mine.index == 1
    finally:
        holder.kill()
        holder.wait()
    assert claim_slot(2, tmp_path).index == 0          # the kernel dropped the dead holder's lock
    mine.release()


def test_pin_process_moves_threads_that_already_run():
    # In a child: pinning the test process itself would slow every later test.
    code = textwrap.dedent("""
        import json, os, threading
        from chattts_vllm.serving.colocate import pin_process
        stop = threading.Event()
        t = threading.Thread(target=stop.wait); t.start()
        first = min(os.sched_getaffinity(0))
        pin_process([first])
        print(json.dumps([first, sorted(os.sched_getaffinity(t.native_id)), sorted(os.sched_getaffinity(0))]))
        stop.set(); t.join()
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    first, started_before, caller = json.loads(out.stdout)
    assert started_before == caller == [first]


def test_starts_on_one_gpu_wait_for_each_other(tmp_path):
    import threading
    import time

    spans: dict[str, tuple[float, float]] = {}

    def start(name, gpus):
        with one_start_per_gpu(gpus, tmp_path):
            t0 = time.monotonic()
            time.sleep(0.3)
            spans[name] = (t0, time.monotonic())

    threads = [threading.Thread(target=start, args=a) for a in
               (("a", ["0"]), ("b", [0]), ("c", ["1"]), ("ab", ["1", "0"]))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    def overlap(x, y):
        return spans[x][0] < spans[y][1] and spans[y][0] < spans[x][1]

    assert not overlap("a", "b") and not overlap("a", "ab") and not overlap("c", "ab")
    assert not overlap("b", "ab")
    with one_start_per_gpu([], tmp_path):             # no GPU (CPU engines): nothing to hold
        pass


def test_a_start_on_another_gpu_does_not_wait(tmp_path):
    import threading

    done = threading.Event()

    def other():
        with one_start_per_gpu(["1"], tmp_path):
            done.set()

    with one_start_per_gpu(["0"], tmp_path):
        threading.Thread(target=other).start()
        assert done.wait(5)
