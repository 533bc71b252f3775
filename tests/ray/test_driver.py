"""The batch driver against fake workers (no engine, a few seconds): an actor that exits mid-chunk, an
engine that dies, an item that kills every actor it lands on, and an item that fails on its own."""
from __future__ import annotations

import json
import os

import numpy as np
import soundfile as sf

from chattts_vllm.serving import ray_batch
from chattts_vllm.serving.ray_batch import SynthesisWorker, parse_item, run_batch


def _fake_worker():
    """Defined in a function so Ray ships it by value to its workers."""

    class FakeWorker(SynthesisWorker):
        def _engine(self, model_dir: str, engine_kwargs: dict):
            return None                                # the worker's own __init__, no engine

        def _synthesize(self, items, controls, seed):
            import hashlib

            from vllm.v1.engine.exceptions import EngineDeadError

            from chattts_vllm.audio.formats import encode_audio

            out = []
            for it in items:
                once = self.out_dir / f"once-{it.id}"
                if it.id == "exit-once" and not once.exists():
                    once.touch()
                    os._exit(1)                        # the actor process dies mid-chunk
                if it.id == "engine-dies-once" and not once.exists():
                    once.touch()
                    raise EngineDeadError()
                if it.id == "poison":
                    os._exit(1)
                if it.id == "bad":
                    raise ValueError("no sayable text")
                data = encode_audio(np.full(480, 0.1, np.float32), "wav")
                ray_batch.write_atomic(self.out_dir / ray_batch.wav_name(it.id), data)
                out.append({"id": it.id, "path": ray_batch.wav_name(it.id), "duration": 0.02,
                            "sample_rate": 24000, "sha256": hashlib.sha256(data).hexdigest()})
            return out

    return FakeWorker


def test_driver_requeues_restarts_and_gives_up(ray_cluster, tmp_path, monkeypatch):
    monkeypatch.setattr(ray_batch, "SynthesisWorker", _fake_worker())
    ids = [f"ok-{i}" for i in range(8)] + ["exit-once", "engine-dies-once", "poison", "bad"]
    items = [parse_item(json.dumps({"id": i, "text": "Hi."}), n) for n, i in enumerate(ids)]
    report = run_batch(items, tmp_path, tmp_path, num_actors=2, actor_options={"num_cpus": 0},
                       chunk_size=3, max_attempts=2, progress=False)
    assert set(report.failed) == {"poison", "bad"}
    assert "ValueError: no sayable text" in report.failed["bad"]
    # chunks of 3: [.., ok-7, exit-once] dies; [engine-dies-once, poison, bad] raises
    # EngineDeadError (all three re-queued one by one); poison then kills its actor once more
    assert report.actor_restarts == 3
    entries = [json.loads(x) for x in (tmp_path / "manifest.jsonl").read_text().splitlines()]
    assert sorted(e["id"] for e in entries) == sorted(set(ids) - {"poison", "bad"})
    for e in entries:
        assert sf.info(str(tmp_path / e["path"])).samplerate == 24000

    again = run_batch(items, tmp_path, tmp_path, num_actors=2, actor_options={"num_cpus": 0},
                      chunk_size=3, max_attempts=2, progress=False)
    assert (again.skipped, again.written, set(again.failed)) == (10, 0, {"poison", "bad"})


def _pinned_fake_worker():
    class PinnedFake(_fake_worker()):
        """Each item also records the cores its actor was pinned to (by the worker's __init__)."""

        def _synthesize(self, items, controls, seed):
            for it in items:
                (self.out_dir / f"cores-{it.id}.json").write_text(json.dumps([os.getpid(), self.cores]))
            return super()._synthesize(items, controls, seed)

    return PinnedFake


def test_pinned_actors_get_disjoint_slices_of_the_cores(ray_cluster, tmp_path, monkeypatch):
    """Two 1-CPU actors on the 2-CPU cluster: each pinned to its own half of the host's cores."""
    monkeypatch.setattr(ray_batch, "SynthesisWorker", _pinned_fake_worker())
    items = [parse_item(json.dumps({"id": f"u{i}", "text": "Hi."}), i) for i in range(8)]
    report = run_batch(items, tmp_path, tmp_path, num_actors=2, actor_options={"num_cpus": 1},
                       chunk_size=2, progress=False, pin_cores=True)
    assert report.written == 8
    by_pid = {}
    for f in tmp_path.glob("cores-*.json"):
        pid, cores = json.loads(f.read_text())
        by_pid[pid] = cores
    assert len(by_pid) == 2, by_pid                        # both actors worked
    a, b = by_pid.values()
    host = sorted(os.sched_getaffinity(0))
    if len(host) >= 2:
        assert not set(a) & set(b) and sorted(a + b) == host
    else:
        assert list(a) == list(b) == host                  # one core: nothing to split


def _slow_start_worker():
    class SlowStart(_fake_worker()):
        """Two actors on one (pretended) shared GPU, each engine start taking 3 s."""

        def _gpu_ids(self):
            return ["test-shared"]

        def _engine(self, model_dir: str, engine_kwargs: dict):
            import time
            from pathlib import Path

            t0 = time.time()
            time.sleep(3.0)                            # longer than Ray takes to start a worker
            (Path(self.out_dir) / f"start-{os.getpid()}.json").write_text(json.dumps([t0, time.time()]))

    return SlowStart


def test_engines_on_a_shared_gpu_start_one_after_another(ray_cluster, tmp_path, monkeypatch):
    monkeypatch.setattr(ray_batch, "SynthesisWorker", _slow_start_worker())
    items = [parse_item(json.dumps({"id": f"u{i}", "text": "Hi."}), i) for i in range(6)]
    report = run_batch(items, tmp_path, tmp_path, num_actors=2, actor_options={"num_cpus": 0},
                       chunk_size=3, progress=False)
    assert report.written == 6
    (a0, a1), (b0, b1) = sorted(json.loads(f.read_text()) for f in tmp_path.glob("start-*.json"))
    assert b0 >= a1                                    # the second began after the first was up
