"""The stack sampler (chattts_vllm/stack_sampler.py): a busy thread's time lands in its area and
function, and a process started with CHATTTS_VLLM_STACK_SAMPLE keeps rewriting its report file."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from chattts_vllm.stack_sampler import StackSampler, _area


def _spin_in_serving_code(stop: threading.Event) -> None:
    # A code object whose file looks like the serving package: the sampler files it there.
    code = compile("while not stop.is_set():\n    sum(range(200))\n",
                   "/x/chattts_vllm/serving/fake.py", "exec")
    exec(code, {"stop": stop})


def _sample_thread(target, name: str, seconds: float) -> StackSampler:
    """Samples for `seconds` while thread `name` runs `target(stop)`; stops and joins it after."""
    stop = threading.Event()
    t = threading.Thread(target=target, args=(stop,), name=name)
    t.start()
    try:
        with StackSampler(0.002) as s:
            time.sleep(seconds)
    finally:
        stop.set()
        t.join()
    return s


def test_busy_thread_is_attributed_to_its_area():
    s = _sample_thread(_spin_in_serving_code, "busy", 0.3)
    assert s.samples > 20
    busy = s.areas["busy"]
    assert busy.most_common(1)[0][0] == "chattts serving"
    text = s.report_text(unit="ms")
    assert "-- thread busy" in text and "chattts serving" in text and "fake.py:<module>" in text


def test_blocked_thread_counts_as_waiting():
    s = _sample_thread(lambda stop: stop.wait(), "blocked", 0.1)
    assert s.areas["blocked"].most_common(1)[0][0] == "waiting"


def test_area_walks_out_to_the_first_known_frame():
    frame = sys._getframe()          # this test's file is under tests/: no area of its own
    assert _area(frame) == "other"


def test_env_starts_a_sampler_that_writes_its_report(tmp_path):
    prefix = tmp_path / "stacks"
    script = ("import time\nfrom chattts_vllm.stack_sampler import start_from_env\n"
              "assert start_from_env(dump_every_s=0.2) is start_from_env()\n"
              "t = time.time()\nwhile time.time() - t < 1.0: sum(range(1000))\n")
    env = {**os.environ, "CHATTTS_VLLM_STACK_SAMPLE": str(prefix), "CHATTTS_VLLM_STACK_SAMPLE_MS": "5",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=120)
    (report,) = tmp_path.glob("stacks.*.txt")
    text = report.read_text()
    assert text.startswith("pid ") and "-- thread MainThread" in text and "samples over" in text
