"""`run_batch` on a local Ray cluster: an actor killed mid-run still gives every id exactly once.

The output folder starts out as an interrupted earlier run left it: one finished id (valid WAV and
manifest line), a manifest line whose WAV is corrupt, a duplicate, a torn last line and a stale
temp file. Afterwards the manifest has exactly one line per id, every WAV is 24 kHz, matches its
sha256 and has the expected length, and a rerun has nothing left to do.
"""
from __future__ import annotations

import hashlib
import json
import threading
import time

import numpy as np
import pytest
import soundfile as sf

from tests.ray.conftest import ENGINE_KWARGS, SR

pytestmark = pytest.mark.slow

FRAMES = 30
N = 16


def _jobs(tmp_path):
    path = tmp_path / "jobs.jsonl"
    lines = [{"id": f"utt-{i:02d}", "text": f"Sentence number {i}.", "voice": "alloy", "seed": i,
              "min_new_token": FRAMES, "max_new_token": FRAMES} for i in range(N)]
    lines.append({"id": "done before", "text": "Already there.", "seed": 99})
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def _interrupted_run(out):
    """What a crashed earlier run leaves: one good entry, a bad one, a duplicate, a torn line."""
    from chattts_vllm.audio.formats import encode_audio
    from chattts_vllm.serving.ray_batch import wav_name

    out.mkdir()
    data = encode_audio(np.zeros(1000, np.float32), "wav")
    (out / wav_name("done before")).write_bytes(data)
    good = {"id": "done before", "path": wav_name("done before"), "duration": 1000 / SR,
            "sample_rate": SR, "sha256": hashlib.sha256(data).hexdigest()}
    (out / "utt-03.wav").write_bytes(b"RIFF....truncated")
    bad = {**good, "id": "utt-03", "path": "utt-03.wav"}
    (out / ".utt-04.wav.dead.tmp").write_bytes(b"partial")
    (out / "manifest.jsonl").write_text(
        json.dumps(good) + "\n" + json.dumps(bad) + "\n" + json.dumps(good) + "\n" + '{"id": "utt-0')
    return data


def test_actor_killed_mid_run_still_gives_every_id_once(ray_cluster, serving_model_dir, tmp_path):
    from chattts_vllm.serving.ray_batch import read_items, run_batch

    ray = ray_cluster
    items = read_items(_jobs(tmp_path))
    out = tmp_path / "out"
    before = _interrupted_run(out)

    def lines() -> int:
        return len((out / "manifest.jsonl").read_text().splitlines())

    reports, errors = [], []

    def run():
        try:
            reports.append(run_batch(items, out, serving_model_dir, engine_kwargs=ENGINE_KWARGS,
                                     num_actors=2, actor_options={"num_cpus": 1}, chunk_size=2,
                                     progress=False, name_prefix="test-batch"))
        except BaseException as e:  # surfaced below
            errors.append(e)

    driver = threading.Thread(target=run)
    driver.start()
    deadline = time.time() + 400
    while driver.is_alive() and lines() < 1 + 4 and time.time() < deadline:
        time.sleep(0.5)                       # 1 kept entry + the first two chunks
    assert driver.is_alive(), errors or reports
    ray.kill(ray.get_actor("test-batch-0.0"), no_restart=True)
    driver.join(timeout=400)
    assert not driver.is_alive() and not errors, errors
    report = reports[0]
    assert report.actor_restarts >= 1
    assert report.failed == {}
    assert (report.skipped, report.written) == (1, N)

    entries = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    ids = [e["id"] for e in entries]
    assert sorted(ids) == sorted(it.id for it in items)          # each id exactly once
    for e in entries:
        path = out / e["path"]
        y, sr = sf.read(path, dtype="float32")
        assert sr == e["sample_rate"] == SR
        assert hashlib.sha256(path.read_bytes()).hexdigest() == e["sha256"]
        if e["id"] != "done before":
            assert y.shape == (FRAMES * 512 - 256,) and e["duration"] == pytest.approx(len(y) / SR)
    assert (out / entries[ids.index("done before")]["path"]).read_bytes() == before  # not redone
    assert not list(out.glob(".*.tmp"))

    again = run_batch(items, out, serving_model_dir, progress=False)   # resumable: nothing left
    assert (again.skipped, again.written, again.actor_restarts) == (N + 1, 0, 0)
