"""Ray scale-out pieces that need no engine: input checks, manifest recovery, re-queueing, and the
Serve deployment options (GPU, tensor parallel, data parallel, autoscaling)."""
from __future__ import annotations

import hashlib
import json
from collections import deque

import numpy as np
import pytest

from chattts_vllm.serving.ray_batch import (BatchItem, BatchReport, Manifest, parse_item,
                                            read_items, requeue_failed, wav_name, write_atomic)


def test_wav_names_are_safe_and_distinct():
    assert wav_name("utt-01") == "utt-01.wav"
    odd = [wav_name(x) for x in ("../etc/passwd", "a b", "a_b", ".hidden", "x" * 300)]
    assert all("/" not in n and not n.startswith(".") and len(n) < 100 for n in odd)
    assert wav_name("a b") != wav_name("a_b")


@pytest.mark.parametrize("line, message", [
    ("{", "not valid JSON"),
    ('{"text": "hi"}', "'id'"),
    ('{"id": 1}', "'text'"),
    ('{"id": 1, "text": "hi", "speed": 9}', "speed"),
    ('{"id": 1, "text": "   "}', "input is empty"),
    ('{"id": 1, "text": "hi", "min_new_token": 9, "max_new_token": 3}', "min_new_token"),
    ('{"id": 1, "text": "hi", "instructions": "[laugh_5]"}', "out of range"),
])
def test_bad_lines_fail_with_the_endpoint_messages(line, message):
    with pytest.raises(ValueError, match=message):
        parse_item(line, 7)


def test_items_keep_request_fields_and_reject_duplicate_ids(tmp_path):
    p = tmp_path / "jobs.jsonl"
    p.write_text('{"id": "a", "text": "Hi.", "voice": "seed:3", "seed": 5, "speed": 2}\n\n'
                 '{"id": 7, "text": "Yo."}\n')
    a, b = read_items(p)
    assert (a.id, a.request.voice_spec, a.request.seed, a.request.speed) == ("a", "seed:3", 5, 2.0)
    assert (b.id, b.request.voice) == ("7", "default")
    p.write_text('{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n')
    with pytest.raises(ValueError, match="duplicate id"):
        read_items(p)


def test_manifest_keeps_one_valid_line_per_id(tmp_path):
    from chattts_vllm.audio.formats import encode_audio

    data = encode_audio(np.zeros(480, np.float32), "wav")
    write_atomic(tmp_path / "a.wav", data)
    good = {"id": "a", "path": "a.wav", "duration": 0.02, "sample_rate": 24000,
            "sha256": hashlib.sha256(data).hexdigest()}
    (tmp_path / "b.wav").write_bytes(data[:50])
    lines = [good, {**good, "id": "b", "path": "b.wav"}, {**good, "id": "c", "path": "c.wav"}, good]
    (tmp_path / "manifest.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"id"')
    m = Manifest(tmp_path)
    assert m.load() == {"a": good}
    assert (tmp_path / "manifest.jsonl").read_text() == json.dumps(good) + "\n"
    assert not list(tmp_path.glob(".*.tmp"))


def test_dead_actor_chunk_is_requeued_item_by_item_until_given_up():
    queue, report = deque([[BatchItem("later", None)]]), BatchReport(total=4)
    chunk = [BatchItem("x", None), BatchItem("y", None, attempts=2), BatchItem("z", None)]
    requeue_failed(queue, chunk, 3, report, RuntimeError("gone"))
    assert [[it.id for it in c] for c in queue] == [["x"], ["z"], ["later"]]   # first, one by one
    assert [c[0].attempts for c in queue] == [1, 1, 0]
    assert list(report.failed) == ["y"]                                        # its 3rd death


def test_batch_command_is_registered():
    from chattts_vllm.cli import build_parser

    args = build_parser().parse_args(["batch", "j.jsonl", "out", "--model", "m", "--num-actors", "2",
                                      "--engine-kwargs", '{"max_model_len": 2048}'])
    assert (args.command, args.num_actors, args.engine_kwargs) == ("batch", 2, {"max_model_len": 2048})


def test_several_engines_per_gpu_fit_and_split_its_memory():
    from chattts_vllm.serving.ray_batch import actors_that_fit, engine_kwargs_for, per_actor

    third = {"num_gpus": 1 / 3, "num_cpus": 1}
    assert per_actor(third) == {"GPU": 1 / 3} and per_actor({"num_cpus": 2}) == {"CPU": 2}
    assert actors_that_fit({"GPU": 1.0, "CPU": 16}, per_actor(third)) == 3    # not 1 // (1/3) == 2
    assert actors_that_fit({"GPU": 2.0}, per_actor(third)) == 6
    assert actors_that_fit({"CPU": 2.0}, per_actor({"num_cpus": 1})) == 2
    assert engine_kwargs_for({"max_model_len": 2048}, third) == {"max_model_len": 2048,
                                                                 "gpu_memory_utilization": 0.3}
    assert engine_kwargs_for({"gpu_memory_utilization": 0.25}, third) == {"gpu_memory_utilization": 0.25}
    assert engine_kwargs_for({}, {"num_gpus": 1}) == {} and engine_kwargs_for({}, {"num_cpus": 1}) == {}


def test_zero_engines_per_gpu_is_refused_before_any_work(tmp_path):
    from chattts_vllm.serving.ray_batch import run_batch

    with pytest.raises(ValueError, match="engines_per_gpu"):
        run_batch([], tmp_path / "out", tmp_path, engines_per_gpu=0)
    assert not (tmp_path / "out").exists()


def test_batch_command_takes_engines_per_gpu_and_pinning():
    from chattts_vllm.cli import build_parser

    args = build_parser().parse_args(["batch", "j.jsonl", "out", "--model", "m", "--engines-per-gpu", "3",
                                      "--pin-cores"])
    assert (args.engines_per_gpu, args.pin_cores) == (3, True)
    assert build_parser().parse_args(["batch", "j", "o", "--model", "m"]).pin_cores is False


# -- Serve deployment options ---------------------------------------------------------------------

def _opts(**args):
    pytest.importorskip("ray.serve")
    from chattts_vllm.serving.ray_app import engine_deployment_options

    return engine_deployment_options(args)


def test_one_gpu_or_one_cpu_per_replica():
    assert _opts(use_gpu=True)["ray_actor_options"]["num_gpus"] == 1
    cpu = _opts(use_gpu=False, num_replicas=2)
    assert cpu["ray_actor_options"]["num_cpus"] == 1 and "num_gpus" not in cpu["ray_actor_options"]
    assert cpu["num_replicas"] == 2
    assert "num_gpus" not in _opts(use_gpu="false", num_replicas="2")["ray_actor_options"]  # CLI


def test_several_replicas_per_gpu():
    assert _opts(use_gpu=True, engines_per_gpu=3)["ray_actor_options"]["num_gpus"] == 1 / 3
    assert "num_gpus" not in _opts(use_gpu=False, engines_per_gpu=3)["ray_actor_options"]
    with pytest.raises(ValueError, match="engines_per_gpu"):
        _opts(use_gpu=True, engines_per_gpu=0)


def test_autoscaling_replaces_num_replicas():
    auto = {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 16}
    o = _opts(use_gpu=True, autoscaling_config=auto)
    assert o["autoscaling_config"] == auto and "num_replicas" not in o


def test_tensor_parallel_on_rays_executor_gets_a_placement_group():
    o = _opts(use_gpu=True, engine_kwargs={"tensor_parallel_size": 2,
                                           "distributed_executor_backend": "ray"})
    assert o["ray_actor_options"]["num_gpus"] == 0
    assert o["placement_group_bundles"] == [{"GPU": 1, "CPU": 2}, {"GPU": 1, "CPU": 1}]


def test_data_parallel_on_ray_leaves_gpus_to_vllm():
    o = _opts(use_gpu=True, engine_kwargs={"data_parallel_size": 2, "data_parallel_backend": "ray"})
    assert o["ray_actor_options"]["num_gpus"] == 0 and "placement_group_bundles" not in o


def test_serve_config_is_valid_and_autoscales():
    import importlib
    from pathlib import Path

    import yaml

    pytest.importorskip("ray.serve")
    from ray.serve.schema import ServeDeploySchema

    cfg = yaml.safe_load((Path(__file__).parents[2] / "configs" / "ray-serve.yaml").read_text())
    app = ServeDeploySchema.model_validate(cfg).applications[0]
    module, fn = app.import_path.split(":")
    assert getattr(importlib.import_module(module), fn).__name__ == "build_app"
    o = _opts(**{**app.args, "use_gpu": True})
    auto = o["autoscaling_config"]
    assert auto["min_replicas"] < auto["max_replicas"]
    assert auto["target_ongoing_requests"] < o["max_ongoing_requests"]
    assert o["ray_actor_options"]["num_gpus"] == 1
    from ray import serve

    from chattts_vllm.serving.ray_app import SpeechEngine

    serve.deployment(SpeechEngine, name="SpeechEngine", **o)      # Serve accepts the options
